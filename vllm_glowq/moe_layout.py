"""Where transformers 5 keeps a Mixture-of-Experts block's tensors, and what checkpoints call them.

transformers 5 holds a block's experts as one module with fused 3-D parameters,
`experts.gate_up_proj` [E, 2I, H] (gate rows first) and `experts.down_proj` [E, H, I], called
as `experts(x, top_k_index, top_k_weights)`. Checkpoints (save_pretrained's, GlowQ's, and
what vLLM's expert loader reads) name each expert `BLOCK.experts.{e}.{gate,up,down}` with the
family's projection names, and Mixtral's in-memory `mlp` is `block_sparse_moe` there.

The calibrator writes checkpoints through `checkpoint_state_dict` and the validator
(validate.py) expects tensors from the same function applied to a model on the meta device,
so the names written and the names checked cannot drift apart. Importable without vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import EXPERTS

FUSED_GATE_UP = "gate_up_proj"  # transformers 5: [E, 2I, H], gate rows then up rows
FUSED_DOWN = "down_proj"  # transformers 5: [E, H, I]


@dataclass(frozen=True)
class ExpertsSpec:
    """A model family's MoE block, as transformers 5 builds it and as checkpoints name it.

    The routers (`full_precision`) stay in full precision; a shared expert (a dense MLP
    reading the block's input, Qwen2-MoE) joins the experts' gate/up unit.
    """

    block: str  # the block's module path in a decoder layer
    checkpoint_block: str  # the block's name in checkpoints
    projections: tuple[str, str, str]  # an expert's gate, up and down names in checkpoints
    full_precision: tuple[str, ...]  # linears of the block that are never quantized (routers)
    shared_expert: str | None = None  # attribute of the block holding a shared expert MLP

    def checkpoint_name(self, module_path: str) -> str:
        """A module's (or tensor's) name in checkpoints, from its path in the model."""
        return self._swap_block(module_path, self.block, self.checkpoint_block)

    def module_path(self, checkpoint_name: str) -> str:
        """Inverse of checkpoint_name."""
        return self._swap_block(checkpoint_name, self.checkpoint_block, self.block)

    @staticmethod
    def _swap_block(name: str, old: str, new: str) -> str:
        return name if old == new else name.replace(f".{old}.", f".{new}.")


_QWEN_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
EXPERTS_BY_MODEL_TYPE: dict[str, ExpertsSpec] = {
    "qwen3_moe": ExpertsSpec("mlp", "mlp", _QWEN_PROJECTIONS, ("gate",)),
    "qwen2_moe": ExpertsSpec("mlp", "mlp", _QWEN_PROJECTIONS, ("gate", "shared_expert_gate"),
                             shared_expert="shared_expert"),
    "mixtral": ExpertsSpec("mlp", "block_sparse_moe", ("w1", "w3", "w2"), ("gate",)),
}


def is_fused_experts(module: torch.nn.Module) -> bool:
    """Whether a module holds a block's experts as transformers 5's fused 3-D parameters."""
    gate_up = getattr(module, FUSED_GATE_UP, None)
    return isinstance(gate_up, torch.Tensor) and gate_up.dim() == 3


def checkpoint_state_dict(model: torch.nn.Module, experts: ExpertsSpec | None) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint names: fused expert parameters split into
    per-expert `.weight` tensors (views, so a meta-device model costs nothing), the block
    renamed where checkpoints name it differently."""
    return checkpoint_tensors(model.state_dict(), experts)


def checkpoint_tensors(state: dict[str, torch.Tensor], experts: ExpertsSpec | None) -> dict[str, torch.Tensor]:
    """`checkpoint_state_dict` for any part of a model, given its state dict under full names
    (`model.layers.3.mlp.experts.gate_up_proj`, ...)."""
    out = {}
    for name, tensor in state.items():
        parent, _, leaf = name.rpartition(".")
        if experts is not None and parent.endswith(f".{experts.block}.{EXPERTS}"):
            out.update(_split_experts(experts.checkpoint_name(parent), leaf, tensor, experts))
        else:
            out[name if experts is None else experts.checkpoint_name(name)] = tensor
    return out


def _split_experts(prefix: str, leaf: str, fused: torch.Tensor, experts: ExpertsSpec) -> dict[str, torch.Tensor]:
    out = {}
    for e, names in enumerate(expert_tensor_names(prefix, leaf, fused.shape[0], experts)):
        parts = fused[e].chunk(2, dim=0) if leaf == FUSED_GATE_UP else (fused[e],)
        out.update(zip(names, parts))
    return out


def expert_tensor_names(prefix: str, leaf: str, num_experts: int, experts: ExpertsSpec) -> list[tuple[str, ...]]:
    """Per expert, the checkpoint tensors that make up its slice of the fused parameter `leaf`
    of the experts module `prefix` (checkpoint name): (gate, up) for gate_up_proj, (down,)."""
    gate, up, down = experts.projections
    if leaf == FUSED_GATE_UP:
        leaves: tuple[str, ...] = (gate, up)
    elif leaf == FUSED_DOWN:
        leaves = (down,)
    else:
        raise ValueError(f"{prefix}.{leaf} is a fused expert parameter the GlowQ format does not know")
    return [tuple(f"{prefix}.{e}.{name}.weight" for name in leaves) for e in range(num_experts)]


def fuse_experts(per_expert: list[tuple[torch.Tensor, ...]]) -> torch.Tensor:
    """The inverse of the split: one fused parameter from each expert's tensors, in the order
    `expert_tensor_names` gives them (gate rows before up rows, as transformers 5 fuses them)."""
    return torch.stack([torch.cat(parts, dim=0) for parts in per_expert])
