"""The PyTorch reference forward of a GlowQ model: dequantized int4 weight plus A (B x).

It is what `glowq-eval` measures and what the vLLM plugin is tested against. It computes in
the model's dtype (fp32 by default), with every member of a unit holding the same B tensor.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open

from vllm_glowq.format import (
    FACTOR_A,
    QZEROS,
    QWEIGHT,
    SCALES,
    GlowQConfig,
    factor_b_name,
    tensor_name,
)
from vllm_glowq.packing import dequantize
from vllm_glowq.validate import check_checkpoint

from .architectures import decoder_layers, spec_for


class ReferenceLinear(torch.nn.Module):
    """y = x W^T + b + (x B^T) A^T; without factors it is a plain (dequantized) linear."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        a: torch.Tensor | None = None,
        b: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)
        self.a = None if a is None else torch.nn.Parameter(a.to(weight.dtype), requires_grad=False)
        self.b = None if b is None else torch.nn.Parameter(b.to(weight.dtype), requires_grad=False)
        self.correct = a is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)
        if self.correct:
            y = y + F.linear(F.linear(x, self.b), self.a)
        return y


def linear_names(model: torch.nn.Module) -> list[str]:
    """Checkpoint names of the decoder layers' linears (not the experts, which are no
    nn.Linear: moe_reference), in the architecture's order."""
    spec = spec_for(model.config)
    names = []
    for index, layer in enumerate(decoder_layers(model, spec)):
        paths = [member for input_set in spec.layer_input_sets(layer) for member in input_set]
        paths += list(spec.shared_expert_gate_up(layer))
        names += [f"{spec.layers_path}.{index}.{spec.checkpoint_name(path)}" for path in paths]
    return names


def replace_linear(model: torch.nn.Module, name: str, new: torch.nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent), leaf, new)


def read_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint that `check_checkpoint` has accepted."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(checkpoint.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
    return tensors


def _reference_module(
    tensors: dict[str, torch.Tensor], name: str, config: GlowQConfig, dtype: torch.dtype
) -> ReferenceLinear:
    bias = tensors.pop(tensor_name(name, "bias"), None)
    bias = None if bias is None else bias.to(dtype)
    if not config.is_quantized(name):
        return ReferenceLinear(tensors.pop(tensor_name(name, "weight")).to(dtype), bias)
    zeros = None if config.sym else tensors.pop(tensor_name(name, QZEROS))
    weight = dequantize(tensors.pop(tensor_name(name, QWEIGHT)), tensors.pop(tensor_name(name, SCALES)), zeros)
    unit = config.unit_of(name)
    if not config.has_factors(unit):
        return ReferenceLinear(weight.to(dtype), bias)
    a, b = tensors.pop(tensor_name(name, FACTOR_A)), tensors[factor_b_name(unit)]
    return ReferenceLinear(weight.to(dtype), bias, a.float(), b.float())


def load_reference_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers model computing the GlowQ checkpoint's function (no vLLM involved)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .moe_reference import replace_experts  # it builds on this module's ReferenceLinear

    checkpoint = Path(checkpoint)
    raw, config = check_checkpoint(checkpoint)  # names, dtypes and shapes, before any tensor is read
    hf_config = AutoConfig.for_model(**raw)
    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    spec = spec_for(model.config)
    tensors = read_tensors(checkpoint)
    for unit in config.lowrank_units:  # converted once: every member then shares one B tensor
        tensors[factor_b_name(unit)] = tensors[factor_b_name(unit)].to(dtype)
    for name in linear_names(model):
        replace_linear(model, spec.module_path(name), _reference_module(tensors, name, config, dtype))

    def expert(name: str):
        module = _reference_module(tensors, name, config, dtype)
        return module.weight.data, module.a, module.b

    replace_experts(model, spec, expert, dtype)
    for unit in config.lowrank_units:
        tensors.pop(factor_b_name(unit), None)
    _load_rest(model, {spec.module_path(k): v for k, v in tensors.items()}, dtype)
    return model.eval()


def _load_rest(model: torch.nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Embeddings, norms, routers and the LM head (validated already); a tied head shares the
    embedding."""
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
