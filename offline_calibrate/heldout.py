"""GlowQ-S `--restore auto` without a second copy of the model: its held-out perplexity curve,
one layer at a time.

`auto` needs the quantized model's held-out perplexity with the top-k units restored, for every
k of its curve. Instead of building a quantized copy of the whole model, the held-out windows'
hidden states are carried through the layers for all points of the curve together: each layer
is read from the source once more, quantized again (round-to-nearest is deterministic, so these
are the checkpoint's codes), given its factors, and run once for every distinct set of units
restored up to it. Points of the curve that restore the same units in every layer so far share
their hidden states, so the first layers run once or a few times rather than once per point.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .architectures import ArchitectureSpec, decoder_layers
from .moe import block_names, expert_weights, experts_module
from .moe_reference import replace_layer_experts
from .options import CalibrationOptions
from .pipeline import CalibrationResult, UnitResult, run_layer
from .quantize import quantize_rtn
from .reference import ReferenceLinear, replace_linear
from .skeleton import empty, fill, layer_state, outside_state
from .source import WeightSource

Inputs = tuple[list[torch.Tensor], dict]  # a layer's input per window, and its keyword arguments


class HeldoutCurve:
    """What `measure(ranked, ks)` needs besides the units: the empty model, its source, the
    held-out windows and the first layer's inputs for them, and each layer's factors."""

    def __init__(self, model, spec: ArchitectureSpec, source: WeightSource, device: torch.device,
                 result: CalibrationResult, options: CalibrationOptions, windows: torch.Tensor, inputs: Inputs,
                 layer_factors: Callable[[int], dict[str, torch.Tensor]]) -> None:
        self.model, self.spec, self.source, self.device = model, spec, source, device
        self.result, self.options, self.windows, self.inputs = result, options, windows, inputs
        self.layer_factors = layer_factors

    @torch.no_grad()
    def measure(self, ranked: list[UnitResult], ks: list[int]) -> list[dict]:
        """[{k, perplexity}] with the first k of `ranked` restored, for each k in `ks`."""
        restored = {k: frozenset(u.name for u in ranked[:k]) for k in ks}
        hidden, kwargs = self.inputs
        states: dict[frozenset, list[torch.Tensor]] = {frozenset(): hidden}
        so_far = dict.fromkeys(ks, frozenset())  # per point: the restored units in the layers done
        layers = decoder_layers(self.model, self.spec)
        for index in tqdm(range(len(layers)), desc="GlowQ-S auto", unit="layer"):
            prefix = f"{self.spec.layers_path}.{index}"
            units = [u for u in self.result.units if u.has_factors and u.name.startswith(prefix + ".")]
            layer = self._quantized_layer(index, units)
            next_states, next_so_far = {}, {}
            for k in ks:
                key = so_far[k] | (restored[k] & {u.name for u in units})
                if key not in next_states:
                    _switch(layer, prefix, self.spec, units, restored[k])
                    next_states[key] = run_layer(layer, states[so_far[k]], kwargs)
                next_so_far[k] = key
            states, so_far = next_states, next_so_far
            empty(layer)
        fill(self.model, outside_state(self.model, self.spec), self.source, self.device)
        nll = {key: self._nll(final) for key, final in states.items()}
        empty(self.model)
        return [{"k": k, "perplexity": math.exp(nll[so_far[k]])} for k in ks]

    def _quantized_layer(self, index: int, units: list[UnitResult]) -> torch.nn.Module:
        """Layer `index` read from the source, with dequantized int4 weights and the factors of
        `units` (switched on and off by `_switch`), as the checkpoint's reference forward has it."""
        spec, prefix = self.spec, f"{self.spec.layers_path}.{index}"
        fill(self.model, layer_state(self.model, spec, index), self.source, self.device)
        layer = decoder_layers(self.model, spec)[index]
        factors = _member_factors(units, self.layer_factors(index), self.device)
        paths = [p for input_set in spec.layer_input_sets(layer) for p in input_set]
        for path in [*paths, *spec.shared_expert_gate_up(layer)]:
            name = f"{prefix}.{spec.checkpoint_name(path)}"
            if name in self.result.skipped:
                continue
            module = layer.get_submodule(path)
            weight = self._dequantized(module.weight.data).to(module.weight.dtype)
            bias = None if module.bias is None else module.bias.data
            replace_linear(layer, path, ReferenceLinear(weight, bias, *factors.get(name, (None, None))))
        if spec.is_moe_layer(layer):
            weights = expert_weights(experts_module(layer, spec.experts), block_names(layer, prefix, spec))

            def member(name: str):
                return (self._dequantized(weights[name]), *factors.get(name, (None, None)))

            replace_layer_experts(layer, prefix, spec, member, self.model.dtype)
        return layer

    def _dequantized(self, weight: torch.Tensor) -> torch.Tensor:
        return quantize_rtn(weight, self.options.group_size, self.options.sym).dequantized

    def _nll(self, final: list[torch.Tensor]) -> float:
        """Mean next-token NLL of the held-out windows from the last layer's outputs, computed
        as `evaluate.mean_nll` computes it from the model's logits."""
        norm = self.model.get_submodule(self.spec.final_norm)
        head = self.model.get_output_embeddings()
        total, count = 0.0, 0
        for hidden, window in zip(final, self.windows):
            ids = window.to(self.device)
            logits = head(norm(hidden))[0, :-1].float()
            total += float(F.cross_entropy(logits, ids[1:], reduction="sum"))
            count += ids.shape[0] - 1
        return total / count


def _member_factors(units: list[UnitResult], tensors: dict[str, torch.Tensor],
                    device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """member -> (A, B) in float32, one B tensor shared by a unit's members."""
    out = {}
    for unit in units:
        b_name, *a_names = unit.factor_tensors()
        b = tensors[b_name].float().to(device)
        out.update({m: (tensors[a].float().to(device), b) for m, a in zip(unit.members, a_names)})
    return out


def _switch(layer: torch.nn.Module, prefix: str, spec: ArchitectureSpec, units: list[UnitResult],
            restored: frozenset) -> None:
    """Turn each member's correction on for the restored units, off for the others."""
    for unit in units:
        for member in unit.members:
            path = spec.module_path(member)[len(prefix) + 1:]
            layer.get_submodule(path).correct = unit.name in restored
