"""The PyTorch reference forward of a GlowQ model: dequantized int4 weight plus A (B x).

It is what `glowq-eval` measures and what the vLLM plugin is tested against. It computes in
the model's dtype (fp32 by default), with every member of a unit holding the same B tensor.
"""

from __future__ import annotations

import json
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
    GlowQFormatError,
    factor_b_name,
    tensor_name,
)
from vllm_glowq.packing import dequantize

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


def read_config(checkpoint: Path) -> tuple[dict, GlowQConfig]:
    """config.json as a dict without its quantization_config, and the parsed GlowQ config."""
    config_path = checkpoint / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{checkpoint} has no config.json: not a model folder")
    raw = json.loads(config_path.read_text())
    if "quantization_config" not in raw:
        raise GlowQFormatError(f"{config_path} has no quantization_config: not a GlowQ checkpoint")
    return raw, GlowQConfig.from_dict(raw.pop("quantization_config"))


def read_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{checkpoint} holds no .safetensors files")
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                tensors.update({key: handle.get_tensor(key) for key in handle.keys()})
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise GlowQFormatError(f"{file} is not a readable safetensors file ({exc})") from None
    return tensors


def _take(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise GlowQFormatError(f"the checkpoint is missing tensor {name!r}")
    return tensors.pop(name)


def _reference_module(
    tensors: dict[str, torch.Tensor], name: str, config: GlowQConfig, dtype: torch.dtype
) -> ReferenceLinear:
    bias = tensors.pop(tensor_name(name, "bias"), None)
    bias = None if bias is None else bias.to(dtype)
    if not config.is_quantized(name):
        return ReferenceLinear(_take(tensors, tensor_name(name, "weight")).to(dtype), bias)
    zeros = None if config.sym else _take(tensors, tensor_name(name, QZEROS))
    weight = dequantize(_take(tensors, tensor_name(name, QWEIGHT)), _take(tensors, tensor_name(name, SCALES)), zeros)
    unit = config.unit_of(name)
    if not config.has_factors(unit):
        return ReferenceLinear(weight.to(dtype), bias)
    a = _take(tensors, tensor_name(name, FACTOR_A))
    b = tensors.get(factor_b_name(unit))
    if b is None:
        raise GlowQFormatError(f"the checkpoint is missing tensor {factor_b_name(unit)!r}")
    if a.shape != (weight.shape[0], config.rank) or b.shape != (config.rank, weight.shape[1]):
        raise GlowQFormatError(
            f"{name}: factor shapes A {tuple(a.shape)}, B {tuple(b.shape)} do not fit weight "
            f"{tuple(weight.shape)} at rank {config.rank}"
        )
    return ReferenceLinear(weight.to(dtype), bias, a.float(), b.float())


def load_reference_model(checkpoint: str | Path, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A transformers model computing the GlowQ checkpoint's function (no vLLM involved)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    checkpoint = Path(checkpoint)
    raw, config = read_config(checkpoint)
    hf_config = AutoConfig.for_model(**raw)
    from .moe_reference import replace_experts

    model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    spec = spec_for(model.config)
    tensors = read_tensors(checkpoint)
    for unit in config.lowrank_units:  # converted once: every member then shares one B tensor
        if factor_b_name(unit) in tensors:
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
    """Embeddings, norms, routers and the LM head; a tied head shares the embedding."""
    replaced = {f"{name}." for name, m in model.named_modules() if isinstance(m, ReferenceLinear)}
    expected = {name for name, _ in model.named_parameters() if not name.startswith(tuple(replaced))}
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - expected)
    if missing or unexpected:
        raise GlowQFormatError(f"checkpoint tensors do not match the model: missing {missing[:5]}, "
                               f"unexpected {unexpected[:5]}")
    model.load_state_dict({k: v.to(dtype) for k, v in tensors.items()}, strict=False)
    if model.config.tie_word_embeddings:
        model.tie_weights()
