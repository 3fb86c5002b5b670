"""GPU kernels of vllm-glowq (Triton; imported only where they run, never by `import vllm_glowq`).

* `w4a16`, `w4a16_triton`: the project's int4 GEMM with the correction fused in, and the
  dequantize-and-fold kernel for prefill.
* `lowrank_triton`: the correction alone, beside one of vLLM's int4 kernels (the fallback).
"""
