"""Which int4 GEMM runs a GlowQ layer: vLLM's own kernel, the project's, or dense weights.

Decided once per layer at load time, because the weights are kept in one layout only (vLLM's
kernels repack them; the project's kernel reads the checkpoint's GPTQ layout as stored).

`VLLM_GLOWQ_KERNEL` forces a choice for benchmarks and debugging:

* `auto` (default): the project's kernel for layers with a correction where it runs on the
  warpgroup MMA (Hopper): on the H200 GlowQ through it decodes at 1.21 / 1.03 / 1.03x plain
  int4 on Machete at batch 1 / 16 / 64 with 0.90x the throughput, against 0.82-0.86 / 0.79-0.82
  / 0.85-0.89x and 0.91-0.92x for Machete with the correction on a side stream (runs
  `vllm_wgmma_2026-12-04` and `vllm_issue10`, `vllm_main`, `vllm_overlap_first`:
  docs/benchmarks.md). Elsewhere vLLM's kernel where it has one for the layer (plain int4
  layers: Machete's throughput is 6% higher; other GPUs: not measured), else the project's
  kernel (odd shapes, asymmetric zero points vLLM cannot pack, GPUs vLLM has no W4A16 kernel
  for), else dense dequantized weights. One layout is kept per layer, so a choice holds for
  every batch;
* `glowq`: the project's kernel with the correction fused in; a layer it cannot run is an error;
  MoE experts run the project's own MoE kernels (moe_triton.py; `auto` keeps Marlin MoE for
  them until a GPU has timed the two);
* `vllm`: vLLM's kernel, dense weights where it has none (the plugin before the project's kernel);
* `dense`: dense dequantized weights everywhere (a reference for debugging).

`VLLM_GLOWQ_MOE_FACTORS` says how the experts' correction factors are held on the Marlin MoE
path: `auto` (default: moe_marlin.FACTORS_INT8, what the GPU measurements chose), `int8` (A13,
B2 and A2 as int8 codes with one float32 scale per row: half the bytes the correction reads
beside Marlin's GEMMs and half its memory), or `full` (the model's dtype, as the checkpoint
stores them). The checkpoint is the same either way; the codes are made at load time.

No vLLM import: the choice is plain data, testable anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from .format import GlowQFormatError

ENV_KERNEL = "VLLM_GLOWQ_KERNEL"
KERNEL_MODES = ("auto", "glowq", "vllm", "dense")
GLOWQ, VLLM, DENSE = "glowq", "vllm", "dense"


ENV_MOE_FACTORS = "VLLM_GLOWQ_MOE_FACTORS"
MOE_FACTOR_MODES = ("auto", "int8", "full")


def moe_factor_mode() -> str:
    """The VLLM_GLOWQ_MOE_FACTORS setting, checked (the front end calls this before an engine starts)."""
    mode = os.environ.get(ENV_MOE_FACTORS, "auto").strip().lower() or "auto"
    if mode not in MOE_FACTOR_MODES:
        raise GlowQFormatError(f"{ENV_MOE_FACTORS}={mode!r} is not one of {', '.join(MOE_FACTOR_MODES)}; "
                               "unset it for auto.")
    return mode


def kernel_mode() -> str:
    """The VLLM_GLOWQ_KERNEL setting, checked (the front end calls this before an engine starts)."""
    mode = os.environ.get(ENV_KERNEL, "auto").strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise GlowQFormatError(f"{ENV_KERNEL}={mode!r} is not one of {', '.join(KERNEL_MODES)}; unset it for auto.")
    return mode


@dataclass(frozen=True)
class KernelChoice:
    kind: str  # GLOWQ, VLLM or DENSE
    why: str


def choose(mode: str, vllm_kernel: str | None, vllm_refusal: str, glowq_refusal: str | None,
           glowq_faster: bool = False) -> KernelChoice:
    """`vllm_kernel`: the class name vLLM would use (None: `vllm_refusal` says why not);
    `glowq_refusal`: why the project's kernel cannot run the layer (None: it can);
    `glowq_faster`: the project's kernel was measured faster for such a layer on this GPU."""
    if mode == DENSE:
        return KernelChoice(DENSE, f"{ENV_KERNEL}=dense")
    if mode == GLOWQ:
        if glowq_refusal is not None:
            raise GlowQFormatError(f"{ENV_KERNEL}=glowq, but {glowq_refusal}; unset it or use vllm.")
        return KernelChoice(GLOWQ, f"{ENV_KERNEL}=glowq")
    if mode == "auto" and glowq_faster and glowq_refusal is None:
        return KernelChoice(GLOWQ, "the correction fused into the project's kernel is faster here than vLLM's kernel "
                                   "with the correction beside it")
    if vllm_kernel is not None:
        why = f"{ENV_KERNEL}=vllm" if mode == VLLM else "vLLM's kernel is the faster one for this layer here"
        return KernelChoice(VLLM, why)
    if mode == "auto" and glowq_refusal is None:
        return KernelChoice(GLOWQ, f"vLLM has no int4 kernel for it ({vllm_refusal})")
    reasons = vllm_refusal if mode == VLLM else f"{vllm_refusal}; and {glowq_refusal}"
    return KernelChoice(DENSE, reasons)
