"""Loading the source model (found by sources.resolve_source): its config, checked before any
weight is read, then its weights and tokenizer."""

from __future__ import annotations

import math

import torch

from vllm_glowq.format import QUANT_METHOD

from .architectures import SUPPORTED, spec_for
from .sources import ModelLoadError, ModelSource, gguf_architecture


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location, **source.pretrained_kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors...
        if source.gguf_file:
            raise ModelLoadError(_unreadable_gguf_message(source, exc)) from None
        raise ModelLoadError(f"cannot read the model config of {str(source)!r} ({type(exc).__name__}: {exc})") from None
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        what = "a GlowQ checkpoint" if method == QUANT_METHOD else f"already quantized ({method})"
        raise ModelLoadError(f"{source} is {what}; calibrate from the full-precision model")
    spec_for(config)
    return config


def _unreadable_gguf_message(source: ModelSource, exc: Exception) -> str:
    """A GGUF file transformers cannot read: damaged, or of an architecture it does not build."""
    import transformers
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    takes = sorted(set(SUPPORTED) & set(GGUF_CONFIG_MAPPING))
    architecture = gguf_architecture(source)
    reason = f"{type(exc).__name__}: {exc}"
    if architecture in takes:
        return f"cannot read the GGUF file {source} ({reason}): it is truncated or damaged; get it again"
    return (
        f"transformers {transformers.__version__} cannot build a model from the GGUF file {source} of "
        f"architecture {architecture!r} ({reason}); glowq-calibrate takes GGUF files of {', '.join(takes)}"
    )


def load_model(source: ModelSource, config, seq_len: int, dtype: str | torch.dtype = "auto"):
    """The full-precision model on the CPU in `dtype` ("auto": the checkpoint's), after checking
    the config (from load_config) and every weight. A GGUF source is dequantized by
    transformers, into float32 for "auto"."""
    from transformers import AutoModelForCausalLM

    check_seq_len(config, seq_len)
    try:
        hf_model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **source.pretrained_kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {str(source)!r} ({type(exc).__name__}: {exc})") from None
    check_finite(hf_model)
    if not hf_model.config.architectures:  # a GGUF names none, and vLLM picks its model class by it
        hf_model.config.architectures = [type(hf_model).__name__]
    return hf_model.eval()


def check_seq_len(config, seq_len: int) -> None:
    max_positions = getattr(config, "max_position_embeddings", math.inf)
    if seq_len > max_positions:
        raise ModelLoadError(f"--seq-len {seq_len} exceeds the model's max_position_embeddings ({max_positions})")


def check_finite(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if not bool(torch.isfinite(param).all()):
            raise ModelLoadError(f"weight {name} contains NaN or Inf values; the model is corrupt")


def load_tokenizer(source: ModelSource):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(source.location, **source.pretrained_kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {str(source)!r} ({type(exc).__name__}: {exc})") from None
