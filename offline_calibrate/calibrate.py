"""`calibrate()`: a Hugging Face causal LM in, a complete GlowQ checkpoint folder out."""

from __future__ import annotations

import json
import logging
import resource
import time
from pathlib import Path
from typing import Any

import torch

from vllm_glowq import __version__
from vllm_glowq.format import FACTOR_A, FACTOR_B, GlowQConfig, tensor_name

from .architectures import spec_for
from .data import calibration_windows
from .loading import check_seq_len, load_config, load_model, load_tokenizer
from .options import CalibrationOptions
from .pipeline import CalibrationResult, calibrate_layers, check_rank, phase
from .selection import select_units
from .sources import ModelSource, resolve_source
from .preflight import (
    check_device,
    check_free_space,
    check_group_size_fits,
    check_not_source,
    check_writable,
    estimated_checkpoint_bytes,
    model_linears,
    resolve_seq_len,
    warn_without_chat_template,
)
from .writer import atomic_folder, check_output, output_lock, save_tensors, write_json

_LOG = logging.getLogger(__name__)
REPORT_FILE = "glowq_report.json"


def prepare(
    model_ref: str | Path | ModelSource, options: CalibrationOptions
) -> tuple[ModelSource, Any, dict[str, tuple[int, int]]]:
    """Every check that needs the config but no weights; returns (the model's source, HF
    config, the linears to quantize). Fills in the default --seq-len."""
    options.validate()
    check_device(options.device)
    source = resolve_source(model_ref)
    hf_config = load_config(source)
    resolve_seq_len(options, hf_config)
    check_seq_len(hf_config, options.seq_len)
    linears = model_linears(hf_config)
    check_group_size_fits(linears, options.group_size)
    return source, hf_config, linears


def run_calibration(model_ref: str | Path | ModelSource, options: CalibrationOptions, keep_dequantized: bool = False):
    """Load the model and calibrate it in memory; returns (model, tokenizer, result, config, heldout)."""
    timings: dict[str, float] = {}
    source, hf_config, _ = prepare(model_ref, options)
    tokenizer = load_tokenizer(source)
    warn_without_chat_template(tokenizer)
    extra = options.heldout_samples if options.restore == "auto" else 0
    # Data problems (an empty file, too little text) are found before the weights are loaded.
    train, heldout = calibration_windows(
        options.dataset, tokenizer, hf_config.vocab_size, options.samples, options.seq_len, options.seed, extra
    )
    with phase(timings, "load"):
        model = load_model(source, hf_config, options.seq_len)
    spec = spec_for(hf_config)
    check_rank(model, spec, options)
    device = check_device(options.device)
    _place_outside_layers(model, spec.layers_path, device)
    keep_dequantized = keep_dequantized or options.restore == "auto"
    result = calibrate_layers(model, spec, train, options, device, keep_dequantized)
    result.timings = {**timings, **result.timings}
    with phase(result.timings, "select_units"):
        selection = select_units(model, result, options, heldout, device)
    model.to("cpu")
    config = GlowQConfig(
        bits=options.bits,
        group_size=options.group_size,
        sym=options.sym,
        rank=options.rank,
        share=options.share,
        lowrank_units=selection.restored,
        modules_to_not_convert=sorted(result.skipped),
        producer=_producer(str(source), options),
    )
    return model, tokenizer, result, config, selection


def _place_outside_layers(model, layers_path: str, device: torch.device) -> None:
    """Everything but the decoder layers (embeddings, rotary, final norm, head) on the device."""
    parent_path, _, attr = layers_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    layers = getattr(parent, attr)
    setattr(parent, attr, torch.nn.ModuleList())
    try:
        model.to(device)
    finally:
        setattr(parent, attr, layers)


def _producer(model_ref: str, options: CalibrationOptions) -> dict[str, Any]:
    return {
        "name": "vllm-glowq",
        "version": __version__,
        "source_model": model_ref,
        "dataset": options.dataset,
        "samples": options.samples,
        "seq_len": options.seq_len,
        "seed": options.seed,
        "shrinkage": options.shrinkage,
        "svd": options.svd,
        "restore": options.restore,
        "metric": options.metric,
    }


def checkpoint_tensors(model, result: CalibrationResult, config: GlowQConfig) -> dict[str, torch.Tensor]:
    """Every tensor of the checkpoint under its format name."""
    restored = set(config.lowrank_units)
    state = dict(model.state_dict())
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for name, quantized in result.quantized.items():
        state.pop(tensor_name(name, "weight"))
        state.update({tensor_name(name, key): t for key, t in quantized.tensors().items()})
    for unit in result.units:
        if unit.name in restored:
            state[tensor_name(unit.name, FACTOR_B)] = unit.factors.b
            for member, a in zip(unit.members, unit.factors.a):
                state[tensor_name(member, FACTOR_A)] = a
    return state


def report(result: CalibrationResult, config: GlowQConfig, selection, options: CalibrationOptions) -> dict:
    restored = set(config.lowrank_units)
    units = []
    for unit in result.units:
        entry = {
            "unit": unit.name,
            "members": unit.members,
            "restored": unit.name in restored,
            "extra_params": unit.extra_params,
            "metrics": unit.metrics,
        }
        if unit.factors is not None:
            entry.update(
                whitened_error_before=unit.factors.whitened_error_before,
                whitened_error_after=unit.factors.whitened_error_after,
                whitening=unit.factors.whitening,
            )
        units.append(entry)
    peak_cpu = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    peak_gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return {
        "format": config.to_dict(),
        "options": options.to_dict(),
        "units": units,
        "skipped_modules": result.skipped,
        "selection": selection.summary(),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "peak_memory_bytes": {"cpu_rss": peak_cpu, "gpu_allocated": peak_gpu},
    }


def calibrate(
    model: str | Path | ModelSource,
    output: str | Path,
    options: CalibrationOptions | None = None,
    overwrite: bool = False,
) -> Path:
    """Calibrate `model` (a local HF folder, a hub id, or a GGUF file: sources.resolve_source)
    and write a GlowQ checkpoint to `output`."""
    options = options or CalibrationOptions()
    output = Path(output).absolute()
    options.validate()
    check_not_source(output, str(model))
    check_output(output, overwrite)
    check_writable(output)
    with output_lock(output):
        source, hf_config, linears = prepare(model, options)
        check_free_space(output, estimated_checkpoint_bytes(hf_config, linears, options))
        return _calibrate_into(source, output, options, overwrite)


def _calibrate_into(model: ModelSource, output: Path, options: CalibrationOptions, overwrite: bool) -> Path:
    start = time.perf_counter()
    hf_model, tokenizer, result, config, selection = run_calibration(model, options)
    with atomic_folder(output, overwrite) as staging:
        with phase(result.timings, "write"):
            save_tensors(staging, checkpoint_tensors(hf_model, result, config))
            hf_config = hf_model.config.to_dict()
            hf_config["quantization_config"] = config.to_dict()
            write_json(staging / "config.json", hf_config)
            tokenizer.save_pretrained(staging)
            if getattr(hf_model, "generation_config", None) is not None:
                hf_model.generation_config.save_pretrained(staging)
        result.timings["total"] = time.perf_counter() - start
        write_json(staging / REPORT_FILE, report(result, config, selection, options))
    _LOG.info("wrote %s", output)
    return output


def load_report(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / REPORT_FILE).read_text())
