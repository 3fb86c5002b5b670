"""The experts' correction at small batch in two launches, without sorting the pairs by expert.

At decode a step routes a few (token, expert) pairs to mostly distinct experts, so the tensor
cores of kernels/moe_lowrank_triton.py have nothing to batch: what costs there is the number of
launches (the alignment and one grouped launch per factor). Here every program takes one pair
at a time, reads its expert id straight from `topk_ids` (pair p = token * top_k + k, the rows
of vLLM's Marlin outputs) and multiplies with vectors, no `tl.dot`:

* `activate` (in `fused_marlin_moe`'s activation callback), per pair and chunk of the
  intermediate size I: gate/up = w13_out[p] + A13_e R[src(p)] on the chunk's rows, rounded to
  the activation dtype as the w13 output would hold them; h = SiLU(gate) * up rounded as vLLM's
  `silu_and_mul` rounds (SiLU, then the product); and the chunk's share of the down
  correction's own factor, B2_e[:, chunk] h[chunk], into a float32 workspace of partial sums
  [chunks, P, r]. One slot per chunk instead of atomics into [P, r]: atomics need the
  workspace zeroed first (one more launch per layer, the very cost this path removes) and sum
  in a different order on every run; the partials cost kernel B a few KiB more reads per token.
* `sum_topk` (in the `moe_sum` callback), per token and chunk of the hidden size H:
  out[t] = sum_k w2_out[p] + w_p A2_e S[p], S[p] the sum of the pair's partials: the
  correction's expand fused into the top-k sum (w2_out already carries the router weight w_p,
  which Marlin applies; the correction gets it here).
* `shrink_pairs` (only for `--share module`, one B13 per expert): R[p] = B13_e x_t per pair.

Each kernel runs `PROGRAMS` programs at most (a constant; each loops over its share of the
(pair or token, chunk) items), so the launch overhead and the grid stay fixed while the work
grows with the batch; the grids depend only on tensor shapes, so CUDA graphs capture them.
Chunk sizes are picked to give at least about half as many items as programs. Only Triton
builtins appear, so Triton's interpreter runs these kernels on a CPU for the tests. Launch
shapes are not tuned on a GPU yet (bench/moe_microbench.py times them).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

PROGRAMS = 256  # programs per launch at most: about two per SM of an H100/H200
CHUNKS_I = (64, 32, 16)  # rows of the intermediate size per item of `activate`, largest first
CHUNKS_H = (128, 64, 32)  # columns of the hidden size per item of `sum_topk`
_PARTIALS_PER_LOAD = 16  # partial sums of S that `sum_topk` adds per load


@triton.jit
def _add(a, b):
    """tl.sum's combine function: tl.sum and tl.cdiv are themselves @triton.jit functions, which
    Triton's interpreter cannot call from a kernel loaded as tests/interpreter.py loads it."""
    return a + b


# The per-pair products take the rank RANK_BLOCK columns at a time: one step, whole-rank tiles,
# at rank 64 and below.
# - Whole-rank tiles (as shipped): on the H200 the correction cost 24 us per layer at one token
#   over the same kernels without it (bench/results/moe_micro.json).
# - Steps of 8 in a loop (commit 07d0d71): each step's loads waited for the previous step's; on
#   the H100 the correction cost 60 us (bench/results/moe_micro_h100_2026-12-07.json).
# - Steps of 16 unrolled 4 times: 45 us on the H100 (moe_micro_own_h100_2026-12-07_run2.json).
# Both narrower steps were chosen for spills that sm_90 compiles reported without the alignment
# facts Triton's launcher adds at run time (255 registers, 536-840 bytes spilled at 2 warps);
# compiled as launched, the whole-rank tiles take 80-128 registers in the pairs kernels and 56-80
# in the standalone fused ones, and spill nowhere.
RANK_BLOCK = tl.constexpr(64)


@triton.jit
def activate_pair(gate, up, pair, expert, offs_i, mask_i, r_ptr, a13_ptr, b2_ptr, h_ptr, part_ptr, num_pairs, I, R13,
                  R2, ROW_DIV, chunk, stride_r, stride_a13e, stride_b2e, stride_h, HAS13: tl.constexpr,
                  HAS2: tl.constexpr, r_slices, stride_slice):
    """One pair's chunk of the intermediate size, from its gate and up rows (float32 [BLOCK_I]):
    adds A13_e R, stores h = SiLU(gate) * up and, with HAS2, the chunk's partial B2_e h.
    kernels/moe_w4a16_triton.py calls it on its own GEMM's rows, with R as `r_slices` float32
    partial sums `stride_slice` apart where its own programs computed R."""
    dtype = h_ptr.dtype.element_ty
    if HAS13:
        row = r_ptr + (pair // ROW_DIV).to(tl.int64) * stride_r
        a13_rows = a13_ptr + expert * stride_a13e + offs_i[:, None] * R13
        for r0 in range(0, R13, RANK_BLOCK):
            offs_r = r0 + tl.arange(0, RANK_BLOCK)
            reduced = tl.full((RANK_BLOCK,), 0.0, tl.float32)
            for c in range(0, r_slices):
                reduced += tl.load(row + c * stride_slice + offs_r, mask=offs_r < R13, other=0.0,
                                   cache_modifier=".cg").to(tl.float32)
            mask = mask_i[:, None] & (offs_r[None, :] < R13)
            gate += tl.reduce(tl.load(a13_rows + offs_r[None, :], mask=mask, other=0.0).to(tl.float32)
                              * reduced[None, :], 1, _add)
            up += tl.reduce(tl.load(a13_rows + I * R13 + offs_r[None, :], mask=mask, other=0.0).to(tl.float32)
                            * reduced[None, :], 1, _add)
        gate = gate.to(dtype).to(tl.float32)  # what the w13 output would hold
        up = up.to(dtype).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    hidden = (silu * up).to(dtype)
    tl.store(h_ptr + pair.to(tl.int64) * stride_h + offs_i, hidden, mask=mask_i)
    if HAS2:
        slot = part_ptr + (chunk * num_pairs + pair).to(tl.int64) * R2
        for s0 in range(0, R2, RANK_BLOCK):
            offs_s = s0 + tl.arange(0, RANK_BLOCK)
            b2 = tl.load(b2_ptr + expert * stride_b2e + offs_s[:, None] * I + offs_i[None, :],
                         mask=(offs_s[:, None] < R2) & mask_i[None, :], other=0.0).to(tl.float32)
            tl.store(slot + offs_s, tl.reduce(b2 * hidden.to(tl.float32)[None, :], 1, _add), mask=offs_s < R2)


@triton.jit
def down_correction(part_ptr, a2_ptr, pair, expert, offs_h, mask_h, num_pairs, R2, num_chunks, stride_a2e,
                    BLOCK_C: tl.constexpr):
    """A2_e S_p on a chunk of the hidden size (float32 [BLOCK_H]), S_p the sum of the pair's
    partials that `activate_pair` stored, BLOCK_C chunks per load."""
    total = tl.full(offs_h.shape, 0.0, tl.float32)
    for s0 in range(0, R2, RANK_BLOCK):
        offs_s = s0 + tl.arange(0, RANK_BLOCK)
        reduced = tl.full((RANK_BLOCK,), 0.0, tl.float32)
        for c0 in range(0, num_chunks, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            slots = (offs_c[:, None] * num_pairs + pair).to(tl.int64) * R2 + offs_s[None, :]
            parts = tl.load(part_ptr + slots, mask=(offs_c[:, None] < num_chunks) & (offs_s[None, :] < R2),
                            other=0.0)
            reduced += tl.reduce(parts, 0, _add)
        a2 = tl.load(a2_ptr + expert * stride_a2e + offs_h[:, None] * R2 + offs_s[None, :],
                     mask=mask_h[:, None] & (offs_s[None, :] < R2), other=0.0).to(tl.float32)
        total += tl.reduce(a2 * reduced[None, :], 1, _add)
    return total


@triton.jit(do_not_specialize=["num_pairs"])
def _activate_kernel(w13_ptr, r_ptr, a13_ptr, b2_ptr, ids_ptr, h_ptr, part_ptr, num_pairs, I, R13, R2, ROW_DIV,
                     num_chunks, stride_w13, stride_r, stride_a13e, stride_b2e, stride_h,
                     HAS13: tl.constexpr, HAS2: tl.constexpr, BLOCK_I: tl.constexpr):
    for item in range(tl.program_id(0), num_pairs * num_chunks, tl.num_programs(0)):
        pair = item // num_chunks
        chunk = item % num_chunks
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        offs_i = chunk * BLOCK_I + tl.arange(0, BLOCK_I)
        mask_i = offs_i < I
        row = w13_ptr + pair.to(tl.int64) * stride_w13
        gate = tl.load(row + offs_i, mask=mask_i, other=0.0).to(tl.float32)
        up = tl.load(row + I + offs_i, mask=mask_i, other=0.0).to(tl.float32)
        activate_pair(gate, up, pair, expert, offs_i, mask_i, r_ptr, a13_ptr, b2_ptr, h_ptr, part_ptr, num_pairs, I,
                      R13, R2, ROW_DIV, chunk, stride_r, stride_a13e, stride_b2e, stride_h, HAS13, HAS2, 1, 0)


@triton.jit(do_not_specialize=["num_tokens"])
def _sum_topk_kernel(w2_ptr, part_ptr, a2_ptr, ids_ptr, weights_ptr, out_ptr, num_tokens, H, R2, num_chunks,
                     stride_w2, stride_a2e, stride_out, TOP_K: tl.constexpr, BLOCK_H: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    tiles = (H + BLOCK_H - 1) // BLOCK_H
    num_pairs = num_tokens * TOP_K
    for item in range(tl.program_id(0), num_tokens * tiles, tl.num_programs(0)):
        token = item // tiles
        offs_h = (item % tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
        mask_h = offs_h < H
        acc = tl.full((BLOCK_H,), 0.0, tl.float32)
        for k in tl.static_range(TOP_K):
            pair = token * TOP_K + k
            acc += tl.load(w2_ptr + pair.to(tl.int64) * stride_w2 + offs_h, mask=mask_h, other=0.0).to(tl.float32)
            expert = tl.load(ids_ptr + pair).to(tl.int64)
            acc += tl.load(weights_ptr + pair) * down_correction(part_ptr, a2_ptr, pair, expert, offs_h, mask_h,
                                                                 num_pairs, R2, num_chunks, stride_a2e, BLOCK_C)
        tl.store(out_ptr + token.to(tl.int64) * stride_out + offs_h, acc.to(out_ptr.dtype.element_ty), mask=mask_h)


@triton.jit(do_not_specialize=["num_pairs"])
def _shrink_pairs_kernel(x_ptr, b_ptr, ids_ptr, r_ptr, num_pairs, N, K, TOP_K, stride_x, stride_be, stride_r,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    tiles = (N + BLOCK_N - 1) // BLOCK_N
    for item in range(tl.program_id(0), num_pairs * tiles, tl.num_programs(0)):
        pair = item // tiles
        offs_n = (item % tiles) * BLOCK_N + tl.arange(0, BLOCK_N)
        expert = tl.load(ids_ptr + pair).to(tl.int64)
        x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_x
        acc = tl.full((BLOCK_N,), 0.0, tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_row + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)
            w = tl.load(b_ptr + expert * stride_be + offs_n[:, None] * K + offs_k[None, :],
                        mask=(offs_n[:, None] < N) & (offs_k[None, :] < K), other=0.0).to(tl.float32)
            acc += tl.reduce(w * x[None, :], 1, _add)
        tl.store(r_ptr + pair.to(tl.int64) * stride_r + offs_n, acc.to(r_ptr.dtype.element_ty), mask=offs_n < N)


def chunk_for(items: int, size: int, chunks: tuple[int, ...]) -> int:
    """The largest chunk of `size` that still gives `items * chunks` about PROGRAMS / 2 items
    (the smallest chunk when none does): big chunks when the batch fills the programs, small
    ones at one token so that more than a handful of SMs load the factors."""
    for chunk in chunks:
        if items * triton.cdiv(size, chunk) >= PROGRAMS // 2:
            return chunk
    return chunks[-1]


def _grid(items: int) -> tuple[int]:
    return (max(1, min(PROGRAMS, items)),)


def _rows(*tensors: torch.Tensor | None) -> None:
    """The kernels take row strides for activations but assume contiguous factors and routing."""
    if any(t is not None and t.stride(-1) != 1 for t in tensors):
        raise ValueError("the fused MoE correction needs tensors with unit stride in their last dimension")


def _contiguous(*tensors: torch.Tensor | None) -> None:
    if any(t is not None and not t.is_contiguous() for t in tensors):
        raise ValueError("the fused MoE correction needs contiguous factors, topk_ids and topk_weights")


def activate(w13_out: torch.Tensor, reduced: torch.Tensor | None, a13: torch.Tensor | None, b2: torch.Tensor | None,
             topk_ids: torch.Tensor, hidden: torch.Tensor, row_div: int) -> torch.Tensor | None:
    """hidden[p] = SiLU(gate) * up of w13_out[p] [P, 2I] + a13[e_p] @ reduced[p // row_div]
    (a13 [E, 2I, r13] or None), and, with b2 [E, r2, I], the partial sums [chunks, P, r2]
    (float32) of b2[e_p] @ hidden[p] that `sum_topk` adds up (None without b2)."""
    pairs, inter = hidden.shape
    _rows(w13_out, reduced, hidden)
    _contiguous(a13, b2, topk_ids)
    r13 = 1 if a13 is None else a13.shape[2]
    r2 = 1 if b2 is None else b2.shape[1]
    block_i = chunk_for(pairs, inter, CHUNKS_I)
    chunks = triton.cdiv(inter, block_i)
    partials = None if b2 is None else torch.empty((chunks, pairs, r2), dtype=torch.float32, device=hidden.device)
    _activate_kernel[_grid(pairs * chunks)](
        w13_out, w13_out if reduced is None else reduced, w13_out if a13 is None else a13,
        w13_out if b2 is None else b2, topk_ids, hidden, hidden if partials is None else partials,
        pairs, inter, r13, r2, row_div, chunks, w13_out.stride(0), 0 if reduced is None else reduced.stride(0),
        0 if a13 is None else a13.stride(0), 0 if b2 is None else b2.stride(0), hidden.stride(0),
        HAS13=a13 is not None, HAS2=b2 is not None, BLOCK_I=block_i,
        num_warps=4)
    return partials


def sum_topk(w2_out: torch.Tensor, partials: torch.Tensor, a2: torch.Tensor, topk_ids: torch.Tensor,
             topk_weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out[t] = sum_k w2_out[t, k] + w[t, k] a2[e] @ S[t * top_k + k] (w2_out [T, top_k, H],
    S the sum of `partials` [chunks, P, r2] over chunks, topk_weights [T, top_k] float32)."""
    tokens, top_k, hidden = w2_out.shape
    rows = w2_out.view(tokens * top_k, hidden)
    _rows(rows, out)
    _contiguous(partials, a2, topk_ids, topk_weights)
    block_h = chunk_for(tokens, hidden, CHUNKS_H)
    r2 = a2.shape[2]
    _sum_topk_kernel[_grid(tokens * triton.cdiv(hidden, block_h))](
        rows, partials, a2, topk_ids, topk_weights, out, tokens, hidden, r2, partials.shape[0], rows.stride(0),
        a2.stride(0), out.stride(0), TOP_K=top_k, BLOCK_H=block_h,
        BLOCK_C=_PARTIALS_PER_LOAD, num_warps=4)
    return out


def shrink_pairs(x: torch.Tensor, b13: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
    """R[p] = b13[e_p] @ x[p // top_k] for every pair (b13 [E, N, H]): [P, N] in x's dtype."""
    pairs, top_k = topk_ids.numel(), topk_ids.shape[1]
    _, n, k = b13.shape
    _rows(x)
    _contiguous(b13, topk_ids)
    reduced = x.new_empty((pairs, n))
    block_n = _pow2(min(n, 64))
    _shrink_pairs_kernel[_grid(pairs * triton.cdiv(n, block_n))](
        x, b13, topk_ids, reduced, pairs, n, k, top_k, x.stride(0), b13.stride(0), reduced.stride(0),
        BLOCK_N=block_n, BLOCK_K=min(128, _pow2(k)), num_warps=4)
    return reduced


def _pow2(value: int) -> int:
    return max(16, triton.next_power_of_2(value))
