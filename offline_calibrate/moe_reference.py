"""The reference forward of an MoE block's experts: per-expert dequantized weights plus A (B x).

`ReferenceExperts` replaces transformers' fused experts module and is called the same way,
`experts(x, top_k_index, top_k_weights)`, so the block's own router (kept in full precision)
and shared expert run unchanged. Its children are the experts, each holding one
`ReferenceLinear` per projection under the checkpoint's names, so `experts.3.gate_proj` (or
`experts.3.w1`) is a module that GlowQ-S can switch on and off like any other member.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .architectures import ArchitectureSpec
from .moe import ExpertNames, block_names
from .reference import ReferenceLinear

# member name -> (dequantized weight [N, K], A [N, r] or None, B [r, K] or None)
MemberWeights = Callable[[str], tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]]


class ReferenceExperts(torch.nn.ModuleList):
    """Experts 0..E-1 as children; forward follows transformers' eager expert loop."""

    def __init__(self, experts: list[torch.nn.Module], projections: tuple[str, str, str], act_fn) -> None:
        super().__init__(experts)
        self.projections = projections
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        gate, up, down = self.projections
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            h = self.act_fn(getattr(expert, gate)(x)) * getattr(expert, up)(x)
            y = getattr(expert, down)(h) * top_k_weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return out


def build_experts(names: ExpertNames, act_fn, member: MemberWeights, dtype: torch.dtype) -> ReferenceExperts:
    experts = []
    for e in range(names.num_experts):
        expert = torch.nn.Module()
        for which, leaf in enumerate(names.spec.projections):
            weight, a, b = member(names.projection(e, which))
            setattr(expert, leaf, ReferenceLinear(weight.to(dtype), None, a, b))
        experts.append(expert)
    return ReferenceExperts(experts, names.spec.projections, act_fn)


def replace_experts(model: torch.nn.Module, spec: ArchitectureSpec, member: MemberWeights, dtype: torch.dtype) -> None:
    """Swap every MoE layer's fused experts for ReferenceExperts built from `member`."""
    for index, layer in enumerate(model.get_submodule(spec.layers_path)):
        replace_layer_experts(layer, f"{spec.layers_path}.{index}", spec, member, dtype)


def replace_layer_experts(layer: torch.nn.Module, prefix: str, spec: ArchitectureSpec, member: MemberWeights,
                          dtype: torch.dtype) -> None:
    """The same for one decoder layer (`prefix` is its name); nothing for a dense layer."""
    if not spec.is_moe_layer(layer):
        return
    names = block_names(layer, prefix, spec)
    block = layer.get_submodule(spec.experts.block)
    block.experts = build_experts(names, block.experts.act_fn, member, dtype)
