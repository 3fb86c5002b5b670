"""How fast can a one-token int4 kernel stream its weights? Load patterns alone, against the GEMM.

The one-token GEMM reaches about a third of the copy bandwidth on gate_up, and its launch
sweep barely moves that. This probe separates the weight stream from the arithmetic: a Triton
kernel with the GEMM's grid (one program per 64-column tile and K chunk) that only loads the
int32 words and folds them with one xor each, in two layouts of the same bytes:

* `rows`: the kernel's layout, [K / 8, N] row-major: each iteration reads 16 rows of 256 bytes,
  one GPTQ row (N words) apart;
* `panels`: [N / 64, K / 8, 64]: each 64-column panel's rows back to back, so every program
  streams one contiguous run.

If `rows` alone is as slow as the GEMM, the access pattern bounds the kernel; if `panels` is
much faster, a panel layout pays. The GEMM itself (w4a16.gemm, plain int4, default config) and
a bf16 copy of the same bytes are timed in the same run. CUDA only.

    python bench/load_probe.py [--out probe.json]
"""

from __future__ import annotations

import argparse
import json
import math

import torch
import triton
import triton.language as tl

from gpu_timing import copy_bandwidth, seconds_per_call
from vllm_glowq.kernels import w4a16

SHAPES = {"gate_up_proj": (4096, 28672), "down_proj": (14336, 4096), "qkv_proj": (4096, 6144)}
ROTATE_BYTES = 400 * 1024**2
PANEL = tl.constexpr(64)


@triton.jit
def _stream_kernel(qw_ptr, out_ptr, N, KW, k_chunk_words, PANELS: tl.constexpr, BN: tl.constexpr,
                   ROWS: tl.constexpr):
    """xor of every word of one (column tile, K chunk) into out: the GEMM's loads, no arithmetic."""
    pid = tl.program_id(0)
    n_tiles = N // BN
    split = pid // n_tiles
    tile = pid % n_tiles
    offs_n = tile * BN + tl.arange(0, BN)
    offs_r = tl.arange(0, ROWS)
    if PANELS:
        column = (offs_n // PANEL) * (KW * PANEL) + offs_n % PANEL
        row_stride = PANEL
    else:
        column = offs_n
        row_stride = N
    acc = tl.zeros((ROWS, BN), tl.int32)
    start = split * k_chunk_words
    for r0 in range(start, tl.minimum(KW, start + k_chunk_words), ROWS):
        acc ^= tl.load(qw_ptr + (r0 + offs_r)[:, None] * row_stride + column[None, :])
    tl.store(out_ptr + pid * BN + tl.arange(0, BN), tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def to_panels(qweight: torch.Tensor) -> torch.Tensor:
    kw, n = qweight.shape
    return qweight.reshape(kw, n // PANEL, PANEL).permute(1, 0, 2).contiguous()


def time_stream(words: list[torch.Tensor], n: int, kw: int, panels: bool, block_n: int, split: int, warps: int) -> float:
    out = torch.empty(split * n, dtype=torch.int32, device="cuda")
    chunk = math.ceil(kw / split / 16) * 16
    grid = (split * (n // block_n),)
    calls = [lambda w=w: _stream_kernel[grid](w, out, n, kw, chunk, PANELS=panels, BN=block_n, ROWS=16,
                                              num_warps=warps) for w in words]
    return seconds_per_call(calls)


def time_gemm(words: list[torch.Tensor], scales: torch.Tensor, k: int) -> float:
    x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
    w4a16.workspace(x.device).reserve(words[0].shape[1], k, 0, torch.bfloat16)
    return seconds_per_call([lambda w=w: w4a16.gemm(x, w, scales, None, None, None, None, 128) for w in words])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("load_probe.py needs a CUDA GPU")
    bandwidth = copy_bandwidth()
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    results = {"copy_bandwidth": bandwidth, "device": torch.cuda.get_device_name(), "rows": []}
    for layer, (k, n) in SHAPES.items():
        kw = k // 8
        count = max(2, math.ceil(ROTATE_BYTES / (kw * n * 4)))
        rows = [torch.randint(-2**31, 2**31 - 1, (kw, n), dtype=torch.int32, device="cuda") for _ in range(count)]
        panels = [to_panels(w) for w in rows]
        nbytes = kw * n * 4
        scales = torch.full((k // 128, n), 0.01, dtype=torch.bfloat16, device="cuda")
        default = w4a16.choose_gemm_config(1, n, k, 128, sms)
        cases = {"gemm_default": time_gemm(rows, scales, k)}
        for split in sorted({default.split_k, 2 * default.split_k, max(1, default.split_k // 2)}):
            for warps in (1, 2, 4):
                for block_n in (64, 128):
                    for name, words in (("rows", rows), ("panels", panels)):
                        cases[f"{name} bn{block_n} split{split} w{warps}"] = time_stream(
                            words, n, kw, name == "panels", block_n, split, warps)
        for name, seconds in sorted(cases.items(), key=lambda item: item[1]):
            print(f"{layer:13s} {name:28s} {seconds * 1e6:7.1f} us  {nbytes / seconds / bandwidth:5.2f} of copy")
        results["rows"].append({"layer": layer, "k": k, "n": n, "bytes": nbytes, "default": str(default),
                                "us": {name: s * 1e6 for name, s in cases.items()}})
        del rows, panels
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
