"""The `glowq` QuantizationConfig: parses a checkpoint's quantization_config and gives each
vLLM linear layer its method.

vLLM builds one config per engine from `config.json` (`quant_method: "glowq"` is enough; the
`--quantization glowq` flag is optional), then asks `get_quant_method(layer, prefix)` for every
layer while the model is constructed. Fused layers (`qkv_proj`, `gate_up_proj`) are mapped back
to the checkpoint's module names through `packed_modules_mapping`, which the model fills in.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import LinearBase, UnquantizedLinearMethod
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

from . import compat, kernel_choice
from .kernels import w4a16
from .format import (
    QUANT_METHOD,
    SHARED_INPUT_GROUPS,
    GlowQConfig,
    GlowQFormatError,
    is_experts_unit,
)
from .linear import GlowQLinearMethod, LayerPlan
from .validate import check_checkpoint

logger = logging.getLogger("vllm.glowq")
_registered = False


class GlowQQuantConfig(QuantizationConfig):
    """vLLM's view of a GlowQ checkpoint: the parsed `GlowQConfig` plus layer planning."""

    def __init__(self, glowq: GlowQConfig | None = None) -> None:
        if glowq is None:
            # vLLM constructs the class without arguments when `--quantization glowq` is given
            # for a model whose config.json has no quantization_config.
            raise GlowQFormatError(
                "--quantization glowq was given, but the model's config.json has no "
                "quantization_config: it is not a GlowQ checkpoint (make one with glowq-calibrate, "
                "or drop --quantization glowq)."
            )
        super().__init__()
        kernel_choice.kernel_mode()  # a bad VLLM_GLOWQ_KERNEL stops the front end, not a worker
        kernel_choice.moe_factor_mode()  # and so does a bad VLLM_GLOWQ_MOE_FACTORS
        w4a16.check_tuned_table()  # and so does a bad VLLM_GLOWQ_TUNED_CONFIGS
        self.glowq = glowq
        # experts unit -> linear layers (a shared expert's gate_up_proj) whose B the expert
        # layer loads, since the checkpoint stores that B once (vllm_glowq/moe.py)
        self.b_borrowers: dict[str, list[torch.nn.Module]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "b_borrowers": {}}  # layers never travel with the config

    def __repr__(self) -> str:
        g = self.glowq
        return (f"GlowQQuantConfig(bits={g.bits}, group_size={g.group_size}, sym={g.sym}, rank={g.rank}, "
                f"share={g.share!r}, lowrank_units={len(g.lowrank_units)})")

    @classmethod
    def get_name(cls) -> str:
        return QUANT_METHOD

    @classmethod
    def get_supported_act_dtypes(cls) -> list[torch.dtype]:
        # bf16/fp16 run vLLM's int4 kernels; float32 runs the dense fallback (exact reference).
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 75  # Turing: the oldest GPU with a W4A16 kernel (Marlin) in vLLM

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the config lives in config.json's quantization_config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> GlowQQuantConfig:
        return cls(GlowQConfig.from_dict(config))

    def maybe_update_config(self, model_name: str, *_args: Any, **_kwargs: Any) -> None:
        """vLLM's hook after the config is built, in the front-end process: validates a local
        checkpoint's config and every tensor header before an engine starts, so a broken
        checkpoint fails in seconds instead of minutes into weight loading. (The hook's
        signature differs between vLLM versions, hence the catch-all arguments.)"""
        folder = Path(model_name)
        if folder.is_dir():
            check_checkpoint(folder)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        """GlowQ for quantized linears and experts, unquantized for modules_to_not_convert (and
        routers), None otherwise (embeddings and attention then use vLLM's defaults)."""
        if compat.is_routed_experts(layer):
            return self.experts_method(layer, prefix)
        if not isinstance(layer, LinearBase):
            return None
        members = self.member_names(prefix)
        kept = [m for m in members if not self.glowq.is_quantized(m)]
        if len(kept) == len(members):
            return UnquantizedLinearMethod()
        if kept:
            raise GlowQFormatError(
                f"GlowQ config keeps {kept} in full precision but quantizes the other modules fused "
                f"into vLLM layer {prefix!r}; vLLM needs all of {list(members)} quantized or none."
            )
        plan = self.plan_layer(prefix, members)
        for unit in plan.factor_units:
            if unit != prefix and unit not in members:  # a shared expert's gate/up: B is the experts'
                self.b_borrowers.setdefault(unit, []).append(layer)
        return GlowQLinearMethod(self.glowq, plan)

    def experts_method(self, layer: torch.nn.Module, prefix: str):
        """GlowQ for an MoE expert layer (None, vLLM's unquantized method, if its experts were
        kept in full precision)."""
        from .moe import GlowQMoEMethod

        gate = compat.expert_checkpoint_names(layer)[0]
        if not self.glowq.is_quantized(f"{prefix}.0.{gate}"):  # all or none: validate.py
            return None
        return GlowQMoEMethod(self.glowq, layer, prefix, self.b_borrowers)

    def member_names(self, prefix: str) -> tuple[str, ...]:
        """Checkpoint module names behind a vLLM layer, in shard order."""
        parent, _, leaf = prefix.rpartition(".")
        # Some MoE models leave their dense MLPs' gate_up_proj out of the mapping (Qwen3-MoE).
        packed = self.packed_modules_mapping.get(leaf) or SHARED_INPUT_GROUPS.get(leaf)
        if not packed:
            return (prefix,)
        return tuple(f"{parent}.{m}" if parent else m for m in packed)

    def plan_layer(self, prefix: str, members: tuple[str, ...]) -> LayerPlan:
        units: list[str] = []
        member_unit: list[int | None] = []
        for member in members:
            unit = self.glowq.unit_of(member)
            if not self.glowq.has_factors(unit):
                member_unit.append(None)
                continue
            if unit != prefix and unit not in members and not is_experts_unit(unit):
                raise GlowQFormatError(
                    f"GlowQ unit {unit!r} (from module {member!r}) matches neither vLLM layer {prefix!r} "
                    f"nor its modules {list(members)}; this model's layer names are unsupported."
                )
            if unit not in units:
                units.append(unit)
            member_unit.append(units.index(unit))
        return LayerPlan(prefix, members, tuple(units), tuple(member_unit))


def register_glowq() -> None:
    """Register `glowq` with vLLM once per process (vLLM calls plugins in every process)."""
    global _registered
    if _registered:
        return
    register_quantization_config(QUANT_METHOD)(GlowQQuantConfig)
    _registered = True
    problem = compat.unsupported_vllm_message()
    if problem:
        logger.warning(problem)
