"""Checks that need the model's config but none of its weights, run before any are loaded.

A calibration of a large model reads gigabytes and runs for minutes before it writes; a bad
device name, a group size that fits no layer, a read-only or full disk, or an output that would
replace the source must be refused before all that, in one line with the fix.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from vllm_glowq.format import PACK_FACTOR, GlowQConfig, format_version_for, packable
from vllm_glowq.validate import (
    CHECKPOINT_FLOAT,
    PACKED_DTYPE,
    CheckpointLinears,
    checkpoint_linears,
    expected_tensors,
    meta_model,
)

from .options import CalibrationOptions, OptionsError

_LOG = logging.getLogger(__name__)
DEFAULT_SEQ_LEN = 2048  # calibration window when --seq-len is not given (capped by the model)
_DTYPE_BYTES = {PACKED_DTYPE: 4, CHECKPOINT_FLOAT: 2, "float32": 4, "float64": 8}


def check_device(name: str) -> torch.device:
    """`auto`, `cpu`, `cuda` or `cuda:N`, and only a CUDA device that exists."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise OptionsError(f"--device {name!r} is not a device name; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise OptionsError(f"--device {name!r} is not supported; use auto, cpu, cuda or cuda:N")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise OptionsError(f"--device {name} was given, but this machine has no usable CUDA GPU; use --device cpu")
    if device.index is not None and device.index >= count:
        raise OptionsError(f"--device {name}: there are only {count} CUDA devices (cuda:0 to cuda:{count - 1})")
    return device


def resolve_seq_len(options: CalibrationOptions, hf_config) -> None:
    """Fill in the default --seq-len: DEFAULT_SEQ_LEN, or the model's limit when smaller."""
    if options.seq_len is not None:
        return
    limit = getattr(hf_config, "max_position_embeddings", None) or DEFAULT_SEQ_LEN
    options.seq_len = min(DEFAULT_SEQ_LEN, limit)
    if options.seq_len < DEFAULT_SEQ_LEN:
        _LOG.info("--seq-len %d (the model's max_position_embeddings; the default is %d)",
                  options.seq_len, DEFAULT_SEQ_LEN)


def model_linears(hf_config) -> CheckpointLinears:
    """The model's linears under checkpoint names: those the checkpoint quantizes (every
    expert's projections included) and the MoE routers, which it never does."""
    return checkpoint_linears(meta_model(hf_config.to_dict()))


def check_group_size_fits(linears: CheckpointLinears, group_size: int) -> None:
    """Refuse a group size that leaves every linear in full precision (an 'int4' checkpoint
    that is not quantized at all), or that does not fit a block's experts (quantized all or
    none, as vLLM runs them as one layer)."""
    widths = sorted({k for k, _ in linears.quantizable.values()})
    if all(packable(k, group_size) for k in widths):
        raise OptionsError(
            f"--group-size {group_size} fits none of the model's linears (in-features {widths}): each must be a "
            f"multiple of the group size and of {PACK_FACTOR}, so nothing would be quantized; use a group size "
            f"that divides them, e.g. 32, 64 or 128, or -1 (one group per row)"
        )
    for block, (gate, *_, down) in linears.experts.items():
        hidden, intermediate = linears.quantizable[gate][0], linears.quantizable[down][0]
        reason = packable(hidden, group_size) or packable(intermediate, group_size)
        if reason:
            raise OptionsError(
                f"the experts of {block} cannot be quantized: {reason}; choose a --group-size that divides both "
                f"the hidden size ({hidden}) and the expert intermediate size ({intermediate})"
            )


def planned_config(linears: CheckpointLinears, options: CalibrationOptions) -> GlowQConfig:
    """The checkpoint's config if every unit keeps its correction (the largest it can be)."""
    unpackable = [name for name, (k, _) in linears.quantizable.items() if packable(k, options.group_size)]
    config = GlowQConfig(bits=options.bits, group_size=options.group_size, sym=options.sym, rank=options.rank,
                         share=options.share, modules_to_not_convert=sorted([*unpackable, *linears.routers]),
                         format_version=format_version_for(bool(linears.experts)))
    if options.rank > 0:
        config.lowrank_units = sorted({config.unit_of(name) for name in linears.quantizable if name not in unpackable})
    return config


def estimated_checkpoint_bytes(hf_config, linears: CheckpointLinears, options: CalibrationOptions) -> int:
    """Bytes of the checkpoint's tensors, from their shapes, with every unit restored."""
    model_config: dict[str, Any] = hf_config.to_dict()
    model_dtype = str(model_config.get("dtype") or model_config.get("torch_dtype") or "float32")
    total = 0
    for spec in expected_tensors(model_config, planned_config(linears, options)).values():
        dtype = spec.dtypes[0] if len(spec.dtypes) == 1 else model_dtype.removeprefix("torch.")
        total += _DTYPE_BYTES.get(dtype, 2) * _numel(spec.shape)
    return total


def _numel(shape: tuple[int, ...]) -> int:
    count = 1
    for size in shape:
        count *= size
    return count


class OutputLocationError(ValueError):
    pass


def check_not_source(output: Path, source: str) -> None:
    """The output must not be, or contain, the source model: replacing it would lose the
    full-precision weights, and a GlowQ checkpoint cannot be calibrated again."""
    source_path = Path(source).expanduser()
    if not source_path.exists():
        return  # a hub id
    resolved_source, resolved_output = source_path.resolve(), output.resolve()
    if resolved_output == resolved_source or resolved_output in resolved_source.parents:
        raise OutputLocationError(
            f"--output {output} would replace the source model {source}, and its full-precision weights "
            "would be lost (a GlowQ checkpoint cannot be calibrated again); choose another --output"
        )


def check_writable(output: Path) -> None:
    """Create and remove a folder where the checkpoint will be staged."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    except OSError as exc:
        raise OutputLocationError(
            f"cannot write the checkpoint: creating a folder in {output.parent} failed ({exc.strerror}); "
            "choose a writable --output"
        ) from None


def check_free_space(output: Path, needed_bytes: int) -> None:
    free = shutil.disk_usage(output.parent).free
    if free < needed_bytes:
        raise OutputLocationError(
            f"the checkpoint needs about {needed_bytes / 1e9:.2f} GB but only {free / 1e9:.2f} GB are free in "
            f"{output.parent}; free some space or choose another --output"
        )


def warn_without_chat_template(tokenizer) -> None:
    """The checkpoint inherits the source's tokenizer; without a chat template vLLM answers
    every chat completion with HTTP 400, which surprises whoever serves a base model."""
    if tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        _LOG.warning(
            "the source model's tokenizer has no chat template, so vllm serve will answer chat completions "
            "with HTTP 400: use completions, or serve with --chat-template FILE"
        )
