"""Loading the source model (found by source.resolve_source): its config, checked before any
weight is read, then its weights and tokenizer."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from vllm_glowq.format import QUANT_METHOD

from .architectures import spec_for

if TYPE_CHECKING:
    from .source import ModelSource


class ModelLoadError(ValueError):
    pass


def load_config(source: ModelSource):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.folder, **source.pretrained_kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors...
        if source.gguf_file:
            from .gguf_file import unreadable_gguf_message

            raise ModelLoadError(unreadable_gguf_message(source.folder / source.gguf_file, exc)) from None
        raise ModelLoadError(f"cannot read the model config of {str(source)!r} ({type(exc).__name__}: {exc})") from None
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        what = "a GlowQ checkpoint" if method == QUANT_METHOD else f"already quantized ({method})"
        raise ModelLoadError(f"{source} is {what}; calibrate from the full-precision model")
    spec_for(config)
    if source.gguf_file and not config.architectures:  # a GGUF names none; vLLM picks its model class by it
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config


def load_model(source: ModelSource, config, seq_len: int, dtype: str | torch.dtype = "auto",
               with_missing: bool = False):
    """The full-precision model on the CPU in `dtype` ("auto": the checkpoint's; a GGUF file is
    dequantized into float32), after checking the config (from load_config) and every weight;
    `with_missing` also returns the tensors the checkpoint lacked."""
    from transformers import AutoModelForCausalLM

    check_seq_len(config, seq_len)
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(
            source.folder, dtype=dtype, output_loading_info=True, **source.pretrained_kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {str(source)!r} ({type(exc).__name__}: {exc})") from None
    check_finite(hf_model)
    return (hf_model.eval(), sorted(info["missing_keys"])) if with_missing else hf_model.eval()


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
        return AutoTokenizer.from_pretrained(source.folder, **source.pretrained_kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {str(source)!r} ({type(exc).__name__}: {exc})") from None
