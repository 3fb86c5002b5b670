"""Supported architectures, declared as data: where the decoder layers are and which linears
read the same input (and so share one right factor B)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_glowq.format import SHARED_INPUT_GROUPS


@dataclass(frozen=True)
class ExpertsSpec:
    """A Mixture-of-Experts block, as transformers 5 builds it and as checkpoints name it.

    In memory the experts are one module (`block.experts`) with fused 3-D parameters
    `gate_up_proj` [E, 2I, H] (gate rows first) and `down_proj` [E, H, I], called as
    `experts(x, top_k_index, top_k_weights)`; checkpoints (and vLLM's loader) name each expert
    `checkpoint_block.experts.{e}.{gate,up,down}`. The router and any other gate stay in full
    precision; a shared expert (a dense MLP reading the block's input) joins the experts'
    gate/up unit.
    """

    block: str  # the block's module path in a decoder layer
    checkpoint_block: str  # the block's name in checkpoints
    projections: tuple[str, str, str]  # an expert's gate, up and down names in checkpoints
    full_precision: tuple[str, ...]  # linears of the block that are never quantized (routers)
    shared_expert: str | None = None  # attribute of the block holding a shared expert MLP


@dataclass(frozen=True)
class ArchitectureSpec:
    """`input_sets` lists, per decoder layer, the linears that read one input, in stack order.

    With `experts`, a layer whose `experts.block` holds experts is an MoE layer: its input sets
    under that block are replaced by the experts (offline_calibrate/moe.py); layers whose block
    is a dense MLP (Qwen2/3-MoE's `mlp_only_layers`) keep them.
    """

    layers_path: str
    input_sets: tuple[tuple[str, ...], ...]
    experts: ExpertsSpec | None = None

    def is_moe_layer(self, layer: torch.nn.Module) -> bool:
        return self.experts is not None and hasattr(layer.get_submodule(self.experts.block), "experts")

    def layer_input_sets(self, layer: torch.nn.Module) -> tuple[tuple[str, ...], ...]:
        """The input sets of one decoder layer's ordinary linears (a shared expert's down
        projection included; its gate/up belong to the experts)."""
        if not self.is_moe_layer(layer):
            return self.input_sets
        block = self.experts.block
        sets = tuple(s for s in self.input_sets if not s[0].startswith(f"{block}."))
        if self.experts.shared_expert is not None:
            sets += ((f"{block}.{self.experts.shared_expert}.down_proj",),)
        return sets

    def shared_expert_gate_up(self, layer: torch.nn.Module) -> tuple[str, ...]:
        """Paths of a shared expert's gate/up linears, which join the experts' gate/up unit."""
        if not self.is_moe_layer(layer) or self.experts.shared_expert is None:
            return ()
        return tuple(f"{self.experts.block}.{self.experts.shared_expert}.{leaf}" for leaf in ("gate_proj", "up_proj"))

    def checkpoint_name(self, module_path: str) -> str:
        """A module's name in checkpoints (Mixtral's in-memory `mlp` is `block_sparse_moe`)."""
        return _swap_block(module_path, self.experts, to_checkpoint=True)

    def module_path(self, checkpoint_name: str) -> str:
        """Inverse of checkpoint_name."""
        return _swap_block(checkpoint_name, self.experts, to_checkpoint=False)


def _swap_block(name: str, experts: ExpertsSpec | None, to_checkpoint: bool) -> str:
    if experts is None or experts.block == experts.checkpoint_block:
        return name
    old, new = (experts.block, experts.checkpoint_block) if to_checkpoint else (experts.checkpoint_block, experts.block)
    return name.replace(f".{old}.", f".{new}.")


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_LIKE = ArchitectureSpec(
    layers_path="model.layers",
    input_sets=(_ATTN, ("self_attn.o_proj",), _MLP, ("mlp.down_proj",)),
)
_QWEN_EXPERTS = ExpertsSpec("mlp", "mlp", ("gate_proj", "up_proj", "down_proj"), ("gate",))
# Qwen2/2.5 add a bias to q/k/v, Qwen3 adds q/k RMS norms: neither changes which linears share
# an input, and biases and norms are carried over unquantized.
SUPPORTED: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen3_moe": ArchitectureSpec(_LLAMA_LIKE.layers_path, _LLAMA_LIKE.input_sets, _QWEN_EXPERTS),
    "qwen2_moe": ArchitectureSpec(
        _LLAMA_LIKE.layers_path,
        _LLAMA_LIKE.input_sets,
        ExpertsSpec("mlp", "mlp", ("gate_proj", "up_proj", "down_proj"), ("gate", "shared_expert_gate"),
                    shared_expert="shared_expert"),
    ),
    "mixtral": ArchitectureSpec(
        _LLAMA_LIKE.layers_path,
        (_ATTN, ("self_attn.o_proj",)),
        ExpertsSpec("mlp", "block_sparse_moe", ("w1", "w3", "w2"), ("gate",)),
    ),
}
_FAMILIES = "Llama 2/3, Mistral, Qwen2/2.5/3 causal LMs; Qwen2-MoE, Qwen3-MoE, Mixtral"


class UnsupportedModelError(ValueError):
    pass


def spec_for(config) -> ArchitectureSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by glowq-calibrate; supported: "
            f"{', '.join(sorted(SUPPORTED))} ({_FAMILIES})."
        )
    return _check_groups_match_format(SUPPORTED[model_type])


def _check_groups_match_format(spec: ArchitectureSpec) -> ArchitectureSpec:
    """Multi-member input sets must be exactly the format's fused groups (where B is stored)."""
    fused_members = {members for members in SHARED_INPUT_GROUPS.values()}
    for input_set in spec.input_sets:
        leaves = tuple(name.rpartition(".")[2] for name in input_set)
        if len(leaves) > 1 and leaves not in fused_members:
            raise AssertionError(f"input set {leaves} is not a fused group of the checkpoint format")
    return spec


def decoder_layers(model: torch.nn.Module, spec: ArchitectureSpec) -> torch.nn.ModuleList:
    return model.get_submodule(spec.layers_path)


def layer_linears(layer: torch.nn.Module, input_set: tuple[str, ...]) -> list[torch.nn.Linear]:
    return [layer.get_submodule(name) for name in input_set]
