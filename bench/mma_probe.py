"""Probe: a tensor-core W4A16 GEMM for 2-64 tokens written in Gluon, against the project's kernel.

The project's Triton kernel runs 16 tokens at about 2x Marlin's time on the H200
(bench/results/kernel/defaults_expand_last_2026-12-03.json: 171 us per Llama-3-8B decoder layer
at 16 tokens, Marlin about 75): compiled for sm_90 its loop takes 5.4 SASS instructions per weight
per thread, most of them moving dequantized values into the layout tl.dot wants. Gluon
(Triton's explicit-layout dialect, Triton >= 3.5) lets the kernel say where every value lives, so
the codes can be stored in the order mma.m16n8k16's A fragments hold them and be unpacked in place:

* the GEMM is swapped, out^T [N, T] = deq(W) [N, K] . x^T [K, T], so the weight is operand A
  (16 rows per MMA) and a handful of tokens fill the 8-wide operand B;
* per K block of BK = 32 S inputs the codes are stored [4 (t), N, S (s)] int32: the word of
  (t, n, s) holds, in nibble j + 4 b, the code of input k = 32 s + 8 j + 2 t + b, which is what
  lane 4 g + t of an MMA holds for row n (see mma_layout() below); a thread loads its words with
  two 16-byte loads per K block and turns nibbles j and j + 4 into one bf16 pair with a mask
  and an OR (the exponent trick of the project's kernel: 128 + code);
* x goes through shared memory once per K block and is read with ldmatrix;
* the scale is applied to each K block's fp32 MMA result (group size a multiple of BK).

Splits of K add fp32 partials with atomics (a production kernel would reuse the project's
ticketed reduction); one split stores bf16 directly. Symmetric codes only in this probe.
Prints each configuration's time beside the project's kernel (int4, no correction) and cuBLAS bf16
on the same layers, and each output's error against a float64 reference.

    python bench/mma_probe.py --out mma_probe.json [--tokens 16,64]
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import mma_v2

GROUP = 128
LAYERS = {"qkv_proj": (4096, 6144), "o_proj": (4096, 4096), "gate_up_proj": (4096, 28672), "down_proj": (14336, 4096)}
ROTATE_BYTES = 400 * 1024**2
# bf16 128.0 twice: OR-ed onto two codes it makes the pair (128 + c0, 128 + c1). Passed as an argument so the
# compiler keeps it in a register, where mask and OR become one LOP3 (as an immediate they are two).
MAGIC = 0x43004300


# ----- layouts ---------------------------------------------------------------------------------


@gluon.constexpr_function
def mma_layout(warps):
    """Accumulator of mma.m16n8k16: warps stacked along the output rows (16 each)."""
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])


@gluon.constexpr_function
def words_layout(block_n, sigma, warps):
    """[BN, 4, S] int32 words: lane 4 g + t holds rows g and g + 8 of each warp's 16 (then further
    row tiles of 16 * warps) and all S words of its t, contiguous for 16-byte loads."""
    regs = [[0, 0, 1 << i] for i in range(sigma.bit_length() - 1)] + [[8, 0, 0]]
    regs += [[16 * warps << i, 0, 0] for i in range((block_n // (16 * warps)).bit_length() - 1)]
    lanes = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp_bases = [[16 << i, 0, 0] for i in range(warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=warp_bases, block_bases=[],
                                      shape=[block_n, 4, sigma])


@gluon.constexpr_function
def x_layout(block_k, warps):
    """x tile [BT, BK]: 8 contiguous bf16 per thread along K."""
    along_k = min(32, block_k // 8)
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // along_k, along_k],
                            warps_per_cta=[warps, 1], order=[1, 0])


# ----- kernel ----------------------------------------------------------------------------------


@gluon.jit
def _code_pairs(words, j: gl.constexpr, magic):
    """Nibbles j and j + 4 of every word as bf16 (128 + code), joined along a new last axis."""
    pair = ((words >> (4 * j)) & 0x000F000F) | magic
    low = (pair & 0xFFFF).to(gl.int16).to(gl.bfloat16, bitcast=True)
    high = (pair >> 16).to(gl.int16).to(gl.bfloat16, bitcast=True)
    return gl.join(low, high)


@gluon.jit
def mma_gemm_kernel(x_ptr, w_ptr, s_ptr, out_ptr, out32_ptr, M, N, K, k_chunk, stride_xm, stride_sg, magic,
                    GROUP_BLOCKS: gl.constexpr, BN: gl.constexpr, BT: gl.constexpr, BK: gl.constexpr, ATOMIC: gl.constexpr,
                    num_warps: gl.constexpr):
    S: gl.constexpr = BK // 32
    MMA: gl.constexpr = mma_layout(num_warps)
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    WL: gl.constexpr = words_layout(BN, S, num_warps)
    XL: gl.constexpr = x_layout(BK, num_warps)
    X_SMEM: gl.constexpr = gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0])

    pid = gl.program_id(0)
    n_tiles = N // BN
    t_tiles = gl.cdiv(M, BT)
    n0 = (pid % n_tiles) * BN
    t0 = (pid // n_tiles % t_tiles) * BT
    kb0 = pid // (n_tiles * t_tiles) * (k_chunk // BK)
    kb1 = gl.minimum(kb0 + k_chunk // BK, K // BK)

    rows = gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))
    ts = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WL)))
    sig = gl.arange(0, S, layout=gl.SliceLayout(0, gl.SliceLayout(1, WL)))
    w_offs = ((gl.expand_dims(gl.expand_dims(ts, 0), 2) * N + gl.expand_dims(gl.expand_dims(rows + n0, 1), 2)) * S
              + gl.expand_dims(gl.expand_dims(sig, 0), 1))
    x_rows = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, XL))
    x_cols = gl.arange(0, BK, layout=gl.SliceLayout(0, XL))
    x_offs = gl.expand_dims(x_rows, 1) * stride_xm + gl.expand_dims(x_cols, 0)
    x_mask = gl.expand_dims(x_rows < M, 1)
    s_cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    x_smem = gl.allocate_shared_memory(gl.bfloat16, [BT, BK], X_SMEM)

    total = gl.zeros([BN, BT], gl.float32, MMA)
    w_ptrs = w_ptr + kb0 * (4 * N * S) + w_offs
    x_ptrs = x_ptr + kb0 * BK + x_offs
    s_ptrs = s_ptr + (kb0 // GROUP_BLOCKS) * stride_sg + s_cols
    words_next = gl.load(w_ptrs)
    for kb in range(kb0, kb1):
        words = words_next
        if kb + 1 < kb1:  # the next block's words in flight while this one is unpacked
            w_ptrs += 4 * N * S
            words_next = gl.load(w_ptrs)
        xv = gl.load(x_ptrs, mask=x_mask, other=0.0)
        x_ptrs += BK
        scale = gl.load(s_ptrs).to(gl.float32)
        if (kb + 1) % GROUP_BLOCKS == 0:
            s_ptrs += stride_sg

        gl.thread_barrier()
        x_smem.store(xv)
        gl.thread_barrier()
        xb = x_smem.permute((1, 0)).load(B_L)

        codes = gl.join(gl.join(_code_pairs(words, 0, magic), _code_pairs(words, 1, magic)),
                        gl.join(_code_pairs(words, 2, magic), _code_pairs(words, 3, magic)))
        codes = gl.reshape(gl.permute(codes, (0, 2, 5, 4, 1, 3)), [BN, BK])
        codes = gl.convert_layout(codes, A_L, assert_trivial=True) - 136.0  # symmetric zero 8 + 128
        acc = mma_v2(codes, xb, gl.zeros([BN, BT], gl.float32, MMA))
        total += acc * gl.expand_dims(scale, 1)

    out_rows = gl.expand_dims(s_cols, 1)
    out_cols = gl.expand_dims(t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, MMA)), 0)
    out_mask = out_cols < M
    if ATOMIC:
        gl.atomic_add(out32_ptr + out_cols * N + out_rows, total, mask=out_mask)
    else:
        gl.store(out_ptr + out_cols * N + out_rows, total.to(gl.bfloat16), mask=out_mask)


# ----- host ------------------------------------------------------------------------------------


def repack_mma(codes: torch.Tensor, block_k: int) -> torch.Tensor:
    """uint4 codes [K, N] -> int32 [K / BK, 4, N, BK / 32]: word (t, n, s) nibble j + 4 b holds k = 32 s + 8 j + 2 t + b."""
    k, n = codes.shape
    sigma = block_k // 32
    nib = codes.to(torch.int64).view(k // block_k, sigma, 4, 4, 2, n)  # [kb, s, j, t, b, n]
    nib = nib.permute(0, 3, 5, 1, 4, 2).reshape(k // block_k, 4, n, sigma, 8)  # [kb, t, n, s, 4 b + j]
    words = (nib << (4 * torch.arange(8, device=codes.device))).sum(-1)
    return (words - ((words >> 31) << 32)).to(torch.int32).contiguous()


def mma_gemm(x: torch.Tensor, words: torch.Tensor, scales: torch.Tensor, out32: torch.Tensor, block_n: int,
             block_t: int, split: int, warps: int = 4) -> torch.Tensor:
    """x [T, K] bf16 -> [T, N] bf16 (split == 1) or fp32 added into out32 (split > 1)."""
    tokens, k = x.shape
    block_k = words.shape[-1] * 32
    n = words.shape[2]
    assert n % block_n == 0 and k % block_k == 0
    chunk = math.ceil(k // block_k / split) * block_k
    split = math.ceil(k / chunk)
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    grid = (n // block_n) * math.ceil(tokens / block_t) * split
    mma_gemm_kernel[(grid,)](x, words, scales, out, out32, tokens, n, k, chunk, x.stride(0), scales.stride(0), MAGIC,
                             GROUP_BLOCKS=GROUP // block_k, BN=block_n, BT=block_t, BK=block_k, ATOMIC=split > 1, num_warps=warps)
    return out if split == 1 else out32


def main() -> None:
    from gpu_timing import copy_bandwidth, seconds_per_call
    from vllm_glowq.kernels import w4a16
    from vllm_glowq.packing import pack_rows, repack_planes

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4,16,64")
    parser.add_argument("--out")
    args = parser.parse_args()
    started = time.time()
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}", flush=True)
    rows = []
    for layer, (k, n) in LAYERS.items():
        count = max(2, math.ceil(ROTATE_BYTES / (k * n // 2)))
        codes = [torch.randint(0, 16, (k, n), dtype=torch.uint8, device="cuda") for _ in range(count)]
        scales = [(torch.rand(k // GROUP, n, device="cuda") * 0.004 + 0.001).to(torch.bfloat16) for _ in codes]
        words = [repack_mma(c, 128) for c in codes]
        planes = [repack_planes(pack_rows(c), w4a16.block_k_for(k, GROUP)) for c in codes]
        dense = [((c.float() - 8) * s.float().repeat_interleave(GROUP, 0)).t().contiguous().to(torch.bfloat16)
                 for c, s in zip(codes, scales[: max(2, math.ceil(ROTATE_BYTES / (2 * k * n)))])]
        w4a16.workspace(codes[0].device).reserve(n, k, 0, torch.bfloat16)
        out32 = torch.zeros(max(int(t) for t in args.tokens.split(",")), n, device="cuda")
        for tokens in [int(t) for t in args.tokens.split(",")]:
            xs = [torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for _ in codes]
            ref = xs[0].double() @ ((codes[0].double() - 8) * scales[0].double().repeat_interleave(GROUP, 0))
            row = {"layer": layer, "tokens": tokens, "us": {}, "error": {}, "configs": []}

            def record(name, calls, check):
                got = check().double()
                row["error"][name] = ((got - ref).norm() / ref.norm()).item()
                row["us"][name] = seconds_per_call(calls) * 1e6

            record("int4", [lambda x=x, q=q, s=s: w4a16.forward(x, q, s, None, None, None, None, GROUP)
                            for x, q, s in zip(xs, planes, scales)],
                   lambda: w4a16.forward(xs[0], planes[0], scales[0], None, None, None, None, GROUP))
            record("bf16", [lambda x=x, w=dense[i % len(dense)]: F.linear(x, w) for i, x in enumerate(xs)],
                   lambda: F.linear(xs[0], dense[0]))
            for block_n in (64, 128):
                for block_t in sorted({16, min(64, max(16, tokens))}):
                    for split in (1, 2, 4, 8):
                        name = f"mma BN{block_n} BT{block_t} split{split}"

                        def check(block_n=block_n, block_t=block_t, split=split):
                            out32[:tokens].zero_()
                            return mma_gemm(xs[0], words[0], scales[0], out32[:tokens], block_n, block_t, split)

                        try:
                            record(name, [lambda x=x, w=w, s=s, bn=block_n, bt=block_t, sp=split:
                                          mma_gemm(x, w, s, out32[:tokens], bn, bt, sp)
                                          for x, w, s in zip(xs, words, scales)], check)
                            row["configs"].append(name)
                        except Exception as exc:  # a configuration that does not compile is a finding too
                            row["error"][name] = f"{type(exc).__name__}: {str(exc)[:300]}"
            best = min(row["configs"], key=lambda c: row["us"][c], default=None)
            row["best"] = best
            print(f"{layer:>12} T={tokens:<3} int4 {row['us']['int4']:7.2f} us | bf16 {row['us']['bf16']:7.2f} | "
                  f"best {best}: {row['us'].get(best, float('nan')):7.2f} (err {row['error'].get(best)})", flush=True)
            rows.append(row)
    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    print(f"done in {time.time() - started:.0f} s")


if __name__ == "__main__":
    main()
