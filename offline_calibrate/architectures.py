"""Supported architectures, declared as data: where the decoder layers are and which linears
read the same input (and so share one right factor B)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_glowq.format import SHARED_INPUT_GROUPS


@dataclass(frozen=True)
class ArchitectureSpec:
    """`input_sets` lists, per decoder layer, the linears that read one input, in stack order."""

    layers_path: str
    input_sets: tuple[tuple[str, ...], ...]


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
}


class UnsupportedModelError(ValueError):
    pass


def spec_for(config) -> ArchitectureSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by glowq-calibrate; supported: "
            f"{', '.join(sorted(SUPPORTED))} (Llama 2/3, Mistral, Qwen2/2.5/3 causal LMs)."
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
