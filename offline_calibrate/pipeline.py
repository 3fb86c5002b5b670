"""The calibration pipeline: a sequential pass over the decoder layers.

Only one decoder layer and its input activations sit on the compute device at a time: the
layer's inputs are captured, its linears' input second moments are collected by hooks while the
full-precision layer runs, then each unit is quantized and factorized, and the layer's
full-precision outputs become the next layer's inputs (statistics come from the original
model, as in GlowQ).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from vllm_glowq.format import packable, unit_name

from . import moe
from .architectures import ArchitectureSpec, decoder_layers, layer_linears, spec_for
from .factorize import UnitFactors, factorize_unit, whitening
from .options import CalibrationOptions
from .quantize import QuantizedWeight, quantize_rtn
from .moe_reference import replace_experts
from .reference import ReferenceLinear, linear_names, replace_linear
from .statistics import InputStatistics

_LOG = logging.getLogger(__name__)
FACTOR_DTYPE = torch.float16


@dataclass
class UnitResult:
    """One restoration unit: its members, factors (None for rank 0) and importance metrics."""

    name: str
    members: list[str]
    factors: UnitFactors | None
    metrics: dict[str, float]
    extra_params: int


@dataclass
class CalibrationResult:
    quantized: dict[str, QuantizedWeight]
    skipped: dict[str, str]  # module name -> why it stays full precision
    units: list[UnitResult]
    timings: dict[str, float] = field(default_factory=dict)
    experts: dict[str, dict] = field(default_factory=dict)  # MoE block -> routed token counts


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


def calibrate_input_set(
    names, modules, sigma, options: CalibrationOptions, result: CalibrationResult, keep_dequantized: bool
):
    """Quantize the linears that read one input; factorize each unit among them. `modules`
    need only `.weight` and `.in_features` (an expert's slice of a fused parameter will do)."""
    k = modules[0].in_features
    reason = packable(k, options.group_size)
    if reason:
        for name in names:
            result.skipped[name] = reason
            _LOG.warning("%s stays in full precision: %s", name, reason)
        return
    for name, module in zip(names, modules):
        result.quantized[name] = quantize_rtn(module.weight.data, options.group_size, options.sym)
    white = whitening(sigma) if options.rank > 0 else None
    for unit, idx in _units_of(names, options.share).items():
        weights = [modules[i].weight.data.float() for i in idx]
        deq = [result.quantized[names[i]].dequantized.to(weights[0].device) for i in idx]
        factors = None
        if options.rank > 0:
            factors = factorize_unit(
                [w - d for w, d in zip(weights, deq)], weights, white, options.rank,
                options.svd, options.oversample, options.power_iters, options.seed,
            )
            factors.a = [a.to(FACTOR_DTYPE).cpu() for a in factors.a]
            factors.b = factors.b.to(FACTOR_DTYPE).cpu()
        factor = white.factor if factors is not None else None
        extra = 0 if factors is None else factors.b.numel() + sum(a.numel() for a in factors.a)
        result.units.append(
            UnitResult(unit, [names[i] for i in idx], factors, unit_metrics(weights, deq, factors, factor), extra)
        )
    for name in names:
        result.quantized[name] = result.quantized[name].to_cpu(keep_dequantized)


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
    windows: torch.Tensor,
    options: CalibrationOptions,
    device: torch.device,
    keep_dequantized: bool = False,
) -> CalibrationResult:
    """Quantize and factorize every decoder layer, one layer on `device` at a time.

    `keep_dequantized` keeps each module's dequantized fp32 weight on the CPU (to build the
    in-memory quantized model); it costs 4 bytes per weight, so it is off by default.
    """
    result = CalibrationResult({}, {}, [])
    layers = decoder_layers(model, spec)
    with torch.no_grad(), phase(result.timings, "capture_inputs"):
        hidden, kwargs = capture_layer_inputs(model, layers, windows, device)
    progress = tqdm(range(len(layers)), desc="calibrating layers", unit="layer")
    for index in progress:
        layer = layers[index].to(device)
        input_sets = spec.layer_input_sets(layer)
        is_moe = spec.is_moe_layer(layer)
        stats, expert_stats = InputStatistics(), None
        if options.rank > 0:  # plain round-to-nearest (rank 0) needs no input statistics
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
                names = [f"{spec.layers_path}.{index}.{spec.checkpoint_name(m)}" for m in input_set]
                moment = stats.moments.get(input_set[0])
                sigma = None if moment is None else moment.finalize(options.shrinkage)
                calibrate_input_set(
                    names, layer_linears(layer, input_set), sigma, options, result, keep_dequantized
                )
            if is_moe:
                names = moe.block_names(layer, f"{spec.layers_path}.{index}", spec)
                moe.calibrate_block(layer, names, expert_stats, options, result, keep_dequantized)
        layers[index].to("cpu")
        hidden = outputs
        progress.set_postfix(units=len(result.units))
    return result


def build_quantized_model(model, result: CalibrationResult, restored: Iterable[str]):
    """A copy of `model` computing the quantized function in memory (dequantized weights from
    the codes, fp16 factors of the restored units); needs `keep_dequantized=True`."""
    restored = set(restored)
    factors = {}
    for unit in result.units:
        if unit.name in restored:
            b = unit.factors.b.float()  # one tensor for all members (an experts unit has hundreds)
            factors.update({m: (a.float(), b) for m, a in zip(unit.members, unit.factors.a)})
    quantized = copy.deepcopy(model)
    spec = spec_for(model.config)
    for name in linear_names(quantized):
        if name in result.quantized:
            module = quantized.get_submodule(spec.module_path(name))
            weight = result.quantized[name].dequantized.to(module.weight.device, module.weight.dtype)
            bias = None if module.bias is None else module.bias.data
            replace_linear(quantized, spec.module_path(name),
                           ReferenceLinear(weight, bias, *factors.get(name, (None, None))))
    dtype = next(model.parameters()).dtype

    def member(name: str):
        return (result.quantized[name].dequantized, *factors.get(name, (None, None)))

    replace_experts(quantized, spec, member, dtype)
    return quantized
