"""Two launches of the project's W4A16 GEMM (plain int4) with one launch configuration, for a profiler.

    python bench/kernel_probe.py K N TOKENS BLOCK_N SPLIT_K WARPS STAGES

bench/kernel_ncu.sh runs it under Nsight Compute for the configurations docs/benchmarks.md quotes.
"""

from __future__ import annotations

import sys

import torch

from vllm_glowq.kernels import w4a16

GROUP = 128


def main() -> None:
    k, n, tokens, block_n, split, warps, stages = map(int, sys.argv[1:8])
    qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
    scales = (torch.rand(k // GROUP, n, device="cuda") * 0.004).to(torch.bfloat16)
    x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
    w4a16.workspace(x.device).reserve(n, k, 0, torch.bfloat16)
    block_m = 1 if tokens == 1 else 16 if tokens <= 16 else 64
    config = w4a16.GemmConfig(block_m, block_n, GROUP, split, warps, stages)
    for _ in range(2):
        w4a16.gemm(x, qweight, scales, None, None, None, None, GROUP, config)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
