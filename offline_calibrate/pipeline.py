"""The calibration pipeline: a sequential pass over the decoder layers.

The model is an empty skeleton (skeleton.py); each decoder layer is read from the source when
its turn comes, and only it and the activations are held: its linears' input second moments
are collected by hooks while the full-precision layer runs, each unit is quantized and
factorized, the layer's checkpoint tensors go to the sink (written, not kept), the layer is
emptied again, and its full-precision outputs become the next layer's inputs (statistics come
from the original model, as in GlowQ). Plain round-to-nearest (rank 0) needs no statistics, so
it runs no forward pass at all.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

from vllm_glowq.format import FACTOR_A, factor_b_name, packable, tensor_name, unit_name
from vllm_glowq.moe_layout import checkpoint_tensors

from . import moe
from .architectures import ArchitectureSpec, decoder_layers, layer_linears
from .factorize import UnitFactors, factorize_unit, whitening
from .options import CalibrationOptions
from .quantize import QuantizedWeight, quantize_rtn
from .skeleton import empty, fill, layer_state
from .source import WeightSource
from .statistics import InputStatistics

_LOG = logging.getLogger(__name__)
FACTOR_DTYPE = torch.float16


@dataclass
class UnitResult:
    """One restoration unit: its members, importance metrics, and what its factors achieved
    (`fit`: None without factors, i.e. rank 0). The factors themselves go to the sink."""

    name: str
    members: list[str]
    metrics: dict[str, float]
    extra_params: int
    fit: dict[str, Any] | None

    @property
    def has_factors(self) -> bool:
        return self.fit is not None

    def factor_tensors(self) -> list[str]:
        """The checkpoint names of the unit's factors: its B, then each member's A."""
        return [factor_b_name(self.name), *(tensor_name(m, FACTOR_A) for m in self.members)]


@dataclass
class CalibrationResult:
    skipped: dict[str, str]  # module name -> why it stays full precision
    units: list[UnitResult]
    timings: dict[str, float] = field(default_factory=dict)
    experts: dict[str, dict] = field(default_factory=dict)  # MoE block -> routed token counts


@dataclass
class LayerOutput:
    """What one decoder layer adds to the checkpoint: packed weights and factor tensors."""

    quantized: dict[str, QuantizedWeight] = field(default_factory=dict)  # module name -> codes
    factors: dict[str, torch.Tensor] = field(default_factory=dict)  # checkpoint name -> fp16 A or B


class LayerSink(Protocol):
    """Takes a finished layer's tensors (under checkpoint names) and its factors."""

    def write_layer(self, index: int, tensors: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]) -> None:
        ...


class _StopForward(Exception):
    pass


@contextmanager
def phase(timings: dict[str, float], name: str):
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def capture_layer_inputs(model, layers, windows: torch.Tensor, device: torch.device) -> tuple[list, dict]:
    """Run the model up to the first decoder layer; return its per-sample hidden states and kwargs."""
    captured: list[torch.Tensor] = []
    shared_kwargs: dict[str, Any] = {}

    def grab(_module, args, kwargs):
        captured.append(args[0] if args else kwargs["hidden_states"])
        shared_kwargs.update({k: v for k, v in kwargs.items() if k != "hidden_states"})
        raise _StopForward

    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for window in windows:
            try:
                model(window.unsqueeze(0).to(device), use_cache=False)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured, shared_kwargs


def run_layer(layer, inputs: list[torch.Tensor], kwargs: dict) -> list[torch.Tensor]:
    outputs = []
    for hidden in inputs:
        out = layer(hidden, **kwargs)
        outputs.append(out[0] if isinstance(out, tuple) else out)
    return outputs


def unit_metrics(weights, dequantized, factors: UnitFactors | None, white) -> dict[str, float]:
    """Importance metrics of a unit (GlowQ-S ranks units by one of them).

    The whitened forms use any W with W W^T = Sigma: norms and inner products of M W equal
    those of M Sigma^{1/2}.
    """
    w = torch.cat([x.double() for x in weights])
    q = torch.cat([x.double() for x in dequantized])
    e = w - q
    cos = lambda a, b: float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-30))  # noqa: E731
    metrics = {
        "frobenius": float(e.norm()),
        "norm_error": float(e.norm() / w.norm()),
        "cosine": 1.0 - cos(w, q),
    }
    if factors is not None:
        ew, ww, qw = e @ white, w @ white, q @ white
        metrics.update(
            singular_sum=float(factors.singular_values.sum()),
            whitened_frobenius=float(ew.norm()),
            whitened_norm_error=float(ew.norm() / ww.norm()),
            whitened_cosine=1.0 - cos(ww, qw),
            gain=float(factors.whitened_error_before**2 - factors.whitened_error_after**2),
        )
    return metrics


def calibrate_input_set(names, modules, sigma, options: CalibrationOptions, result: CalibrationResult,
                        output: LayerOutput) -> None:
    """Quantize the linears that read one input; factorize each unit among them. `modules`
    need only `.weight` and `.in_features` (an expert's slice of a fused parameter will do)."""
    k = modules[0].in_features
    reason = packable(k, options.group_size)
    if reason:
        for name in names:
            result.skipped[name] = reason
            _LOG.warning("%s stays in full precision: %s", name, reason)
        return
    quantized = {name: quantize_rtn(module.weight.data, options.group_size, options.sym)
                 for name, module in zip(names, modules)}
    white = whitening(sigma) if options.rank > 0 else None
    for unit, idx in _units_of(names, options.share).items():
        weights = [modules[i].weight.data.float() for i in idx]
        deq = [quantized[names[i]].dequantized.to(weights[0].device) for i in idx]
        factors = None
        if options.rank > 0:
            factors = factorize_unit(
                [w - d for w, d in zip(weights, deq)], weights, white, options.rank,
                options.svd, options.oversample, options.power_iters, options.seed,
            )
        factor = white.factor if factors is not None else None
        metrics = unit_metrics(weights, deq, factors, factor)
        result.units.append(_unit_result(unit, [names[i] for i in idx], factors, metrics, output))
    output.quantized.update({name: q.to_cpu() for name, q in quantized.items()})


def _unit_result(unit: str, members: list[str], factors: UnitFactors | None, metrics: dict[str, float],
                 output: LayerOutput) -> UnitResult:
    """The unit's entry; its fp16 factors (if any) go to the layer's output."""
    if factors is None:
        return UnitResult(unit, members, metrics, 0, None)
    b = factors.b.to(FACTOR_DTYPE).cpu().contiguous()
    a = [x.to(FACTOR_DTYPE).cpu().contiguous() for x in factors.a]
    result = UnitResult(unit, members, metrics, b.numel() + sum(x.numel() for x in a),
                        {"whitened_error_before": factors.whitened_error_before,
                         "whitened_error_after": factors.whitened_error_after, "whitening": factors.whitening})
    output.factors.update(zip(result.factor_tensors(), [b, *a]))
    return result


def check_rank(model, spec: ArchitectureSpec, options: CalibrationOptions) -> None:
    """Refuse a rank no unit can have before any calibration work (layers of one kind share
    one shape; a group size that does not fit the experts was refused before loading them)."""
    checked: set[bool] = set()  # is_moe_layer values seen: one layer of each kind is enough
    for index, layer in enumerate(decoder_layers(model, spec)):
        if spec.is_moe_layer(layer) in checked:
            continue
        checked.add(spec.is_moe_layer(layer))
        for input_set in spec.layer_input_sets(layer):
            names = [f"{spec.layers_path}.{index}.{spec.checkpoint_name(m)}" for m in input_set]
            modules = layer_linears(layer, input_set)
            for unit, idx in _units_of(names, options.share).items():
                limit = min(sum(modules[i].out_features for i in idx), modules[0].in_features)
                if options.rank > limit:
                    raise ValueError(
                        f"--rank {options.rank} is larger than the error matrix of {unit} allows "
                        f"(at most {limit} = min(out_features, in_features))"
                    )
        if spec.is_moe_layer(layer):
            names = moe.block_names(layer, f"{spec.layers_path}.{index}", spec)
            moe.check_block_rank(names, moe.experts_module(layer, spec.experts), options)


def _units_of(names: list[str], share: str) -> dict[str, list[int]]:
    """unit name -> indices of its members among `names`."""
    by_unit: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        by_unit.setdefault(unit_name(name, share), []).append(i)
    return by_unit


def calibrate_layers(
    model,
    spec: ArchitectureSpec,
    inputs: tuple[list[torch.Tensor], dict] | None,
    options: CalibrationOptions,
    device: torch.device,
    source: WeightSource,
    sink: LayerSink,
) -> CalibrationResult:
    """Quantize and factorize every decoder layer of the empty `model`, reading each from
    `source` onto `device` when its turn comes. `inputs` (the first layer's captured inputs
    and keyword arguments) is None for rank 0, which runs no layer."""
    result = CalibrationResult({}, [])
    layers = decoder_layers(model, spec)
    hidden, kwargs = inputs if inputs is not None else (None, {})
    progress = tqdm(range(len(layers)), desc="calibrating layers", unit="layer")
    for index in progress:
        prefix = f"{spec.layers_path}.{index}"
        with phase(result.timings, "load"):
            fill(model, layer_state(model, spec, index), source, device)
        layer = layers[index]
        output = LayerOutput()
        outputs = _calibrate_layer(layer, prefix, spec, hidden, kwargs, options, result, output)
        with phase(result.timings, "write"):
            sink.write_layer(index, layer_tensors(layer, prefix, spec, output.quantized), output.factors)
        empty(layer)
        hidden = outputs
        progress.set_postfix(units=len(result.units))
    return result


def _calibrate_layer(layer, prefix: str, spec: ArchitectureSpec, hidden: list[torch.Tensor] | None, kwargs: dict,
                     options: CalibrationOptions, result: CalibrationResult, output: LayerOutput):
    """One filled layer: statistics from its forward pass (unless rank 0), then every input set
    quantized and factorized into `output`; returns the layer's outputs (None for rank 0)."""
    input_sets = spec.layer_input_sets(layer)
    is_moe = spec.is_moe_layer(layer)
    stats, expert_stats, outputs = InputStatistics(), None, None
    if hidden is not None:
        for input_set in input_sets:
            stats.watch(input_set[0], layer_linears(layer, input_set)[0])
        if is_moe:
            expert_stats = moe.ExpertStatistics(moe.experts_module(layer, spec.experts))
        with torch.no_grad(), phase(result.timings, "forward_statistics"):
            outputs = run_layer(layer, hidden, kwargs)
        stats.remove()
        if expert_stats is not None:
            expert_stats.remove()
    with torch.no_grad(), phase(result.timings, "quantize_factorize"):
        for input_set in input_sets:
            names = [f"{prefix}.{spec.checkpoint_name(m)}" for m in input_set]
            moment = stats.moments.get(input_set[0])
            sigma = None if moment is None else moment.finalize(options.shrinkage)
            calibrate_input_set(names, layer_linears(layer, input_set), sigma, options, result, output)
        if is_moe:
            names = moe.block_names(layer, prefix, spec)
            moe.calibrate_block(layer, names, expert_stats, options, result, output)
    return outputs


def layer_tensors(layer, prefix: str, spec: ArchitectureSpec, quantized: dict[str, QuantizedWeight]):
    """A calibrated layer's checkpoint tensors but its factors: each quantized module's packed
    tensors in place of its weight, everything else (norms, biases, routers) as it is."""
    state = checkpoint_tensors({f"{prefix}.{k}": v for k, v in layer.state_dict().items()}, spec.experts)
    for name, packed in quantized.items():
        state.pop(tensor_name(name, "weight"))
        state.update({tensor_name(name, key): t for key, t in packed.tensors().items()})
    return state
