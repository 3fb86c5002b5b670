"""Supported architectures, declared as data: where the decoder layers are and which linears
read the same input (and so share one right factor B)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from vllm_glowq.format import SHARED_INPUT_GROUPS
from vllm_glowq.moe_layout import EXPERTS_BY_MODEL_TYPE, ExpertsSpec


@dataclass(frozen=True)
class ArchitectureSpec:
    """`input_sets` lists, per decoder layer, the linears that read one input, in stack order;
    the logits are the output head applied to `final_norm` of the last layer's output.

    With `experts`, a layer whose `experts.block` holds experts is an MoE layer: its input sets
    under that block are replaced by the experts (offline_calibrate/moe.py); layers whose block
    is a dense MLP (Qwen2/3-MoE's `mlp_only_layers`) keep them.
    """

    layers_path: str
    input_sets: tuple[tuple[str, ...], ...]
    experts: ExpertsSpec | None = None
    final_norm: str = "model.norm"  # applied to the last layer's output before the head

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
        return module_path if self.experts is None else self.experts.checkpoint_name(module_path)

    def module_path(self, checkpoint_name: str) -> str:
        """Inverse of checkpoint_name."""
        return checkpoint_name if self.experts is None else self.experts.module_path(checkpoint_name)


_ATTN = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_MLP = ("mlp.gate_proj", "mlp.up_proj")
_LLAMA_LIKE = ArchitectureSpec(
    layers_path="model.layers",
    input_sets=(_ATTN, ("self_attn.o_proj",), _MLP, ("mlp.down_proj",)),
)
# Qwen2/2.5 add a bias to q/k/v, Qwen3 adds q/k RMS norms: neither changes which linears share
# an input, and biases and norms are carried over unquantized.
SUPPORTED: dict[str, ArchitectureSpec] = {
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "qwen3_moe": replace(_LLAMA_LIKE, experts=EXPERTS_BY_MODEL_TYPE["qwen3_moe"]),
    "qwen2_moe": replace(_LLAMA_LIKE, experts=EXPERTS_BY_MODEL_TYPE["qwen2_moe"]),
    # Mixtral's MLP is its experts: attention only, no dense gate/up/down in any layer.
    "mixtral": replace(_LLAMA_LIKE, input_sets=_LLAMA_LIKE.input_sets[:2], experts=EXPERTS_BY_MODEL_TYPE["mixtral"]),
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
