"""`calibrate()`: a Hugging Face causal LM in, a complete GlowQ checkpoint folder out.

The model is never loaded whole: it is built empty (skeleton.py), the embeddings are read to
capture the first layer's inputs, each decoder layer is read from the safetensors shards when
its turn comes (source.py, pipeline.py), and the checkpoint is written as the layers finish
(checkpoint.py) into a temporary folder that is renamed into place when complete (writer.py).
A GGUF file (or a pytorch_model.bin) is the exception: transformers loads it whole, and its
layers are taken from memory (source.py says why). Everything that can be checked from the
config, the safetensors headers and the weights' values is checked before the first layer is
calibrated.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from vllm_glowq import __version__
from vllm_glowq.format import GlowQConfig, format_version_for
from vllm_glowq.moe_layout import checkpoint_tensors
from vllm_glowq.validate import CheckpointLinears

from .architectures import ArchitectureSpec, decoder_layers, spec_for
from .checkpoint import StreamingCheckpoint
from .data import calibration_windows
from .heldout import HeldoutCurve, Inputs
from .memory import peak_memory_bytes, return_large_blocks_to_the_os
from .loading import check_seq_len, load_config, load_tokenizer
from .options import CalibrationOptions
from .pipeline import CalibrationResult, calibrate_layers, capture_layer_inputs, check_rank, phase
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
from .selection import Selection, select_units
from .shards import MAX_SHARD_BYTES
from .skeleton import empty, empty_model, fill, layer_state, outside_state, place_buffers
from .source import ModelSource, WeightSource, open_source, resolve_source
from .writer import atomic_folder, check_output, output_lock, write_json

_LOG = logging.getLogger(__name__)
REPORT_FILE = "glowq_report.json"
GENERATION_CONFIG = "generation_config.json"


def prepare(model: str | Path | ModelSource, options: CalibrationOptions,
            gguf_file: str | None = None) -> tuple[ModelSource, Any, CheckpointLinears]:
    """Every check that needs the config but no weights; returns (the model's source, HF config,
    the model's linears under checkpoint names). Fills in the default --seq-len."""
    options.validate()
    check_device(options.device)
    source = resolve_source(model, gguf_file)
    hf_config = load_config(source)
    resolve_seq_len(options, hf_config)
    check_seq_len(hf_config, options.seq_len)
    linears = model_linears(hf_config)
    check_group_size_fits(linears, options.group_size)
    return source, hf_config, linears


@dataclass
class _Run:
    """One calibration's inputs, all checked: the source, its empty model, the data."""

    model_source: ModelSource
    options: CalibrationOptions
    linears: CheckpointLinears
    spec: ArchitectureSpec
    tokenizer: Any
    train: torch.Tensor
    heldout: torch.Tensor
    source: WeightSource
    model: torch.nn.Module
    device: torch.device
    timings: dict[str, float] = field(default_factory=dict)


def _open_run(model_source: ModelSource, hf_config, linears: CheckpointLinears, options: CalibrationOptions) -> _Run:
    """The tokenizer, the data and the weights, each checked (every weight is read once here,
    for NaN and Inf) before the first layer is calibrated."""
    timings: dict[str, float] = {}
    tokenizer = load_tokenizer(model_source)
    warn_without_chat_template(tokenizer)
    extra = options.heldout_samples if options.restore == "auto" else 0
    train, heldout = calibration_windows(
        options.dataset, tokenizer, hf_config.vocab_size, options.samples, options.seq_len, options.seed, extra
    )
    spec = spec_for(hf_config)
    with phase(timings, "load"):
        source = open_source(model_source, hf_config, spec.experts, options.seq_len)
        model = empty_model(hf_config, source.dtype)
        groups = [outside_state(model, spec), *(layer_state(model, spec, i) for i in range(hf_config.num_hidden_layers))]
        source.require({name: meta for group in groups for name, meta in group.items()})
        check_rank(model, spec, options)
        source.check_finite(groups)
    device = check_device(options.device)
    return _Run(model_source, options, linears, spec, tokenizer, train, heldout, source, model, device, timings)


def _calibrate_into(run: _Run, staging: Path) -> tuple[CalibrationResult, GlowQConfig, Selection]:
    """Calibrate layer by layer, writing the checkpoint's tensors into `staging` as they come."""
    options, model, spec = run.options, run.model, run.spec
    checkpoint = StreamingCheckpoint(staging)
    with phase(run.timings, "write"):
        checkpoint.write(checkpoint_tensors(run.source.read(outside_state(model, spec)), spec.experts))
    train_inputs = heldout_inputs = None
    if options.rank > 0:  # plain round-to-nearest needs no activations
        hidden, kwargs = _capture(run, torch.cat([run.train, run.heldout]))
        train_inputs, heldout_inputs = (hidden[: len(run.train)], kwargs), (hidden[len(run.train):], kwargs)
    result = calibrate_layers(model, spec, train_inputs, options, run.device, run.source, checkpoint)
    result.timings = _add_timings(run.timings, result.timings)
    curve = None
    if heldout_inputs is not None and options.restore == "auto":
        curve = HeldoutCurve(model, spec, run.source, run.device, result, options, run.heldout, heldout_inputs,
                             checkpoint.layer_factors).measure
    with phase(result.timings, "select_units"):
        selection = select_units(result, options, curve)
    config = GlowQConfig(
        bits=options.bits,
        group_size=options.group_size,
        sym=options.sym,
        rank=options.rank,
        share=options.share,
        lowrank_units=selection.restored,
        modules_to_not_convert=sorted(result.skipped),
        producer=_producer(str(run.model_source), options),
        format_version=format_version_for(bool(run.linears.experts)),
    )
    restored = set(selection.restored)
    with phase(result.timings, "write"):
        checkpoint.finish({name for unit in result.units if unit.name in restored for name in unit.factor_tensors()})
        _write_metadata(run, staging, config)
    return result, config, selection


def _capture(run: _Run, windows: torch.Tensor) -> Inputs:
    """The first decoder layer's inputs for `windows`: only what runs before it is filled in."""
    with phase(run.timings, "load"):
        fill(run.model, outside_state(run.model, run.spec, head=False), run.source, run.device)
        place_buffers(run.model, run.device)
    with torch.no_grad(), phase(run.timings, "capture_inputs"):
        inputs = capture_layer_inputs(run.model, decoder_layers(run.model, run.spec), windows, run.device)
    empty(run.model)
    return inputs


def _add_timings(first: dict[str, float], second: dict[str, float]) -> dict[str, float]:
    return {key: first.get(key, 0.0) + second.get(key, 0.0) for key in {**first, **second}}


def _write_metadata(run: _Run, staging: Path, config: GlowQConfig) -> None:
    """config.json (with quantization_config), the tokenizer and the generation config, which
    `from_pretrained` would have read from the source folder (or derived from the config)."""
    from transformers import GenerationConfig

    hf_config = run.model.config.to_dict()
    hf_config["quantization_config"] = config.to_dict()
    write_json(staging / "config.json", hf_config)
    run.tokenizer.save_pretrained(staging)
    generation = run.model.generation_config
    if (run.model_source.folder / GENERATION_CONFIG).is_file():
        generation = GenerationConfig.from_pretrained(run.model_source.folder)
    if generation is not None:
        generation.save_pretrained(staging)


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


def report(result: CalibrationResult, config: GlowQConfig, selection: Selection, options: CalibrationOptions) -> dict:
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
        if unit.fit is not None:
            entry.update(unit.fit)
        units.append(entry)
    return {
        "format": config.to_dict(),
        "options": options.to_dict(),
        "units": units,
        "skipped_modules": result.skipped,
        "experts": result.experts,
        "selection": selection.summary(),
        "timings_s": {k: round(v, 3) for k, v in result.timings.items()},
        "peak_memory_bytes": peak_memory_bytes(),
    }


def calibrate(
    model: str | Path | ModelSource,
    output: str | Path,
    options: CalibrationOptions | None = None,
    overwrite: bool = False,
    gguf_file: str | None = None,
) -> Path:
    """Calibrate `model` (a local HF folder, a hub id, or a GGUF file; with `gguf_file`, that GGUF
    file in the folder or hub repository: source.resolve_source) and write a GlowQ checkpoint to
    `output`."""
    options = options or CalibrationOptions()
    output = Path(output).absolute()
    options.validate()
    return_large_blocks_to_the_os()
    check_not_source(output, str(model))
    check_output(output, overwrite)
    check_writable(output)
    with output_lock(output):
        start = time.perf_counter()
        model_source, hf_config, linears = prepare(model, options, gguf_file)
        size = estimated_checkpoint_bytes(hf_config, linears, options)
        check_free_space(output, size + min(size, MAX_SHARD_BYTES))  # a shard's bytes are copied into place
        run = _open_run(model_source, hf_config, linears, options)
        with atomic_folder(output, overwrite) as staging:
            result, config, selection = _calibrate_into(run, staging)
            result.timings["total"] = time.perf_counter() - start
            write_json(staging / REPORT_FILE, report(result, config, selection, options))
    _LOG.info("wrote %s", output)
    return output


def load_report(checkpoint: str | Path) -> dict:
    return json.loads((Path(checkpoint) / REPORT_FILE).read_text())
