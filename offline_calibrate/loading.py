"""Loading the source model: path checks and config checks before any weight is read."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vllm_glowq.format import QUANT_METHOD, GlowQFormatError
from vllm_glowq.validate import read_json

from .architectures import spec_for


class ModelLoadError(ValueError):
    pass


def resolve_model(model: str) -> str:
    """A local folder with a readable config.json, or for a hub id (`org/name`, when no such
    path exists) the snapshot folder with its config and tokenizer. The config is parsed here
    so that a broken one is blamed, not the tokenizer that transformers happens to load first."""
    path = Path(model).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"model folder {path} has no config.json: not a Hugging Face model folder")
        try:
            read_json(path / "config.json")
        except GlowQFormatError as exc:
            raise ModelLoadError(str(exc)) from None
        return str(path)
    looks_local = model.startswith((".", "/", "~")) or model.count("/") != 1
    if looks_local:
        raise ModelLoadError(f"model path {model} does not exist")
    from .hub import fetch_metadata

    return fetch_metadata(model)  # a hub id: its snapshot folder, weights fetched later (hub.fetch_weights)


def load_config(model: str):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as exc:  # transformers raises OSError, ValueError, HTTP errors...
        raise ModelLoadError(f"cannot read the model config of {model!r} ({type(exc).__name__}: {exc})") from None
    quant = getattr(config, "quantization_config", None)
    if quant is not None:
        method = quant.get("quant_method") if isinstance(quant, dict) else getattr(quant, "quant_method", None)
        what = "a GlowQ checkpoint" if method == QUANT_METHOD else f"already quantized ({method})"
        raise ModelLoadError(f"{model} is {what}; calibrate from the full-precision model")
    spec_for(config)
    return config


def load_model(model: str, config, seq_len: int, with_missing: bool = False):
    """The full-precision model on the CPU, after checking the config (from load_config) and
    every weight; `with_missing` also returns the tensors the checkpoint lacked."""
    from transformers import AutoModelForCausalLM

    check_seq_len(config, seq_len)
    try:
        hf_model, info = AutoModelForCausalLM.from_pretrained(model, dtype="auto", output_loading_info=True)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the weights of {model!r} ({type(exc).__name__}: {exc})") from None
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


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model)
    except Exception as exc:
        raise ModelLoadError(f"cannot load the tokenizer of {model!r} ({type(exc).__name__}: {exc})") from None
