"""The experts' int4 GEMMs of the project's own, with GlowQ's correction inside them.

vLLM's Marlin MoE kernels take no operand for the correction, so on that path
(vllm_glowq/moe_marlin.py) the correction runs as launches of its own beside Marlin's, and a
decode step pays for them: 0.72x plain int4 MoE at one token on the H200, 19 us of a 53 us
layer for about 4.7 MB of factors. Here the correction is part of the expert GEMMs, as the
dense kernel (w4a16_triton.py) does for linear layers, whose helpers these kernels call:

* the w13 GEMM's epilogue adds A13_e R (R = B13 x, one row per token: the shared B), applies
  SiLU-and-mul and stores h, then the chunk's share of the
  down correction's own factor, B2_e h, as a partial sum (kernels/moe_fused_triton.py's
  `activate_pair`, the same epilogue that path runs on Marlin's output);
* the w2 GEMM's epilogue adds w_p A2_e S_p (S_p the pair's partials summed) and the router
  weight, and the top-k sum.

Codes are in the dense kernel's nibble-plane layout, per expert (`packing.repack_planes`):
qweight [E, K / 8, N] int32, scales [E, G, N] in the activation dtype, zero points [E, G, N]
uint8 or none (symmetric: z = 8). Three paths over that one layout, chosen per call from the
number of (token, expert) pairs (vllm_glowq/moe_triton.py):

* pairs (decode, small batches): every (pair, column chunk, K chunk) is one program on the
  CUDA cores (`w4a16_triton._gemv_block_sum`), no sorting: at one token the eight routed
  experts' 19 MB would otherwise be read by a few dozen programs. Each program stores its
  float32 partial; the last of a tile's programs to arrive (a ticket per tile, as in the dense
  kernel) sums them and runs the epilogue. For w2 a tile is a token's chunk of H and its
  programs are all its pairs' K chunks, so the top-k sum needs no launch of its own. With the
  shared B the w13 launch's first programs compute R = B13 x (`_shrink_item`): two launches
  per layer.
* rows (batches where experts receive a few pairs each): the pairs sorted by expert in blocks
  of 2 or 4, each (block, column chunk, K chunk) program reading its chunk of one expert's
  codes once for all of the block's pairs (`_gemv_rows`), with the pairs path's tickets and
  epilogues.
* blocks (larger batches): the pairs sorted by expert in blocks of BLOCK_M
  (vLLM's `moe_align_block_size`), one (block, column tile) per program on the tensor cores
  (`w4a16_triton._int4_block_sum`), the correction's products in the epilogue as `tl.dot`s;
  w2 writes one row per pair, summed over top-k by one torch op.

Tickets live in a zeroed int32 buffer that the last arrival of each tile zeroes again, so a
captured CUDA graph replays on a clean one. Only Triton builtins and the dense kernel's
helpers appear, so Triton's interpreter runs these kernels on a CPU for the tests. The pairs
and blocks paths were timed on the H200 (docs/benchmarks.md); the rows path, the fused shrink
and the launch shapes are not tuned yet (bench/moe_microbench.py times them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from vllm_glowq.kernels import moe_fused_triton as pairs_lib
from vllm_glowq.kernels import w4a16_triton as dense  # absolute: tests load this file alone
from vllm_glowq.kernels.w4a16 import _MAGIC, padded_rank


@triton.jit
def _ticket(sync_ptr, tile, contributors):
    """Whether this program is the last of `contributors` to arrive at `tile` (which it then
    resets); its partial stores precede the ticket (barrier + acq_rel), and the others' are
    visible to the last."""
    tl.debug_barrier()
    last = tl.atomic_add(sync_ptr + tile, 1, sem="acq_rel") == contributors - 1
    if last:
        tl.atomic_xchg(sync_ptr + tile, 0)
    return last


@triton.jit
def _shrink_item(x_ptr, b13_ptr, rpart_ptr, counters_ptr, item, num_tokens, K, R13, stride_x, shrink_chunk,
                 BLOCK_R: tl.constexpr, SHRINK_BK: tl.constexpr):
    """R's partial over one K chunk for one token, R[c, t, :] = B13[:, chunk] x[t, chunk], into
    its own slot (no atomics, nothing to zero); then counted done (release)."""
    chunks = (K + shrink_chunk - 1) // shrink_chunk
    token = item // chunks
    k_start = (item % chunks) * shrink_chunk
    k_end = tl.minimum(K, k_start + shrink_chunk)
    offs_k = tl.arange(0, SHRINK_BK)
    x_row = x_ptr + token.to(tl.int64) * stride_x
    slot = rpart_ptr + ((item % chunks) * num_tokens + token).to(tl.int64) * R13
    for r0 in range(0, R13, BLOCK_R):  # rank blocks of 16 rows: few registers beside the GEMV's
        offs_r = r0 + tl.arange(0, BLOCK_R)
        products = tl.full((BLOCK_R, SHRINK_BK), 0.0, tl.float32)
        for k0 in range(k_start, k_end, SHRINK_BK):
            k_ok = k0 + offs_k < K
            x = tl.load(x_row + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            b = tl.load(b13_ptr + offs_r[:, None] * K + (k0 + offs_k)[None, :],
                        mask=(offs_r[:, None] < R13) & k_ok[None, :], other=0.0)
            products += b.to(tl.float32) * x[None, :]
        tl.store(slot + offs_r, dense._sum(products, 1), mask=offs_r < R13)
    tl.debug_barrier()  # every thread's stores precede the count
    tl.atomic_add(counters_ptr, 1, sem="release")


@triton.jit
def _release_shrink(counters_ptr, consumers):
    """Count one reader of R done; the last resets both counters for the next launch."""
    tl.debug_barrier()
    if tl.atomic_add(counters_ptr + 1, 1, sem="acq_rel") == consumers - 1:
        tl.atomic_xchg(counters_ptr, 0)
        tl.atomic_xchg(counters_ptr + 1, 0)


@triton.jit(do_not_specialize=["num_pairs", "num_tokens", "shrink_programs"])
def _gate_up_pairs_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, r_ptr, a13_ptr, b2_ptr, ids_ptr, h_ptr, part_ptr,
                          gemm_ptr, sync_ptr, b13_ptr, counters_ptr, num_pairs, num_tokens, I, K, R13, R2, TOP_K,
                          ROW_DIV, group_size, split_k, k_chunk, shrink_programs, shrink_chunk, stride_x, stride_qe,
                          stride_qk, stride_se, stride_sg, stride_ze, stride_zg, stride_r, stride_a13e, stride_b2e,
                          stride_h, scale_chunk, HAS_ZEROS: tl.constexpr, HAS13: tl.constexpr, HAS2: tl.constexpr,
                          SHRINK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLITS: tl.constexpr,
                          PREFETCH: tl.constexpr, BLOCK_R: tl.constexpr, SHRINK_BK: tl.constexpr,
                          MARLIN: tl.constexpr):
    """With SHRINK, the first `shrink_programs` programs compute R = B13 x (partials per K
    chunk into r_ptr, [chunks, tokens, R13] float32), first in the grid so they are dispatched
    first and wait for nothing. Every other program: (pair, chunk of I, K chunk), its gate and
    up columns' partial sums over the K chunk; the chunk's last arrival adds them up and runs
    `activate_pair` (with SHRINK once R is complete)."""
    item = tl.program_id(0)
    if SHRINK:
        if item < shrink_programs:
            _shrink_item(x_ptr, b13_ptr, r_ptr, counters_ptr, item, num_tokens, K, R13, stride_x, shrink_chunk,
                         BLOCK_R, SHRINK_BK)
        else:
            _gate_up_pair_item(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, r_ptr, a13_ptr, b2_ptr, ids_ptr, h_ptr,
                               part_ptr, gemm_ptr, sync_ptr, counters_ptr, item - shrink_programs, num_pairs,
                               num_tokens, I, K, R13, R2, TOP_K, ROW_DIV, group_size, split_k, k_chunk,
                               shrink_programs, shrink_chunk, stride_x, stride_qe, stride_qk, stride_se, stride_sg,
                               stride_ze, stride_zg, stride_r, stride_a13e, stride_b2e, stride_h, scale_chunk,
                               HAS_ZEROS, HAS13, HAS2, SHRINK, BN, BK, SPLITS, PREFETCH, MARLIN)
    else:
        _gate_up_pair_item(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, r_ptr, a13_ptr, b2_ptr, ids_ptr, h_ptr, part_ptr,
                           gemm_ptr, sync_ptr, counters_ptr, item, num_pairs, num_tokens, I, K, R13, R2, TOP_K,
                           ROW_DIV, group_size, split_k, k_chunk, shrink_programs, shrink_chunk, stride_x, stride_qe,
                           stride_qk, stride_se, stride_sg, stride_ze, stride_zg, stride_r, stride_a13e, stride_b2e,
                           stride_h, scale_chunk, HAS_ZEROS, HAS13, HAS2, SHRINK, BN, BK, SPLITS, PREFETCH, MARLIN)


@triton.jit
def _gate_up_pair_item(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, r_ptr, a13_ptr, b2_ptr, ids_ptr, h_ptr, part_ptr,
                       gemm_ptr, sync_ptr, counters_ptr, item, num_pairs, num_tokens, I, K, R13, R2, TOP_K, ROW_DIV,
                       group_size, split_k, k_chunk, shrink_programs, shrink_chunk, stride_x, stride_qe, stride_qk,
                       stride_se, stride_sg, stride_ze, stride_zg, stride_r, stride_a13e, stride_b2e, stride_h,
                       scale_chunk, HAS_ZEROS: tl.constexpr, HAS13: tl.constexpr, HAS2: tl.constexpr,
                       SHRINK: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, SPLITS: tl.constexpr,
                       PREFETCH: tl.constexpr, MARLIN: tl.constexpr):
    """One (pair, chunk of I, K chunk) of the pairs path's w13 GEMM and, for the chunk's last
    arrival, its epilogue."""
    split = item % split_k
    tile = item // split_k  # = pair * chunks + chunk
    chunks = (I + BN - 1) // BN
    pair = (tile // chunks).to(tl.int64)
    chunk = tile % chunks
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    offs_n = chunk * BN + tl.arange(0, BN)
    x_row = x_ptr + (pair // TOP_K).to(tl.int64) * stride_x
    qw = qw_ptr + expert * stride_qe
    s = s_ptr + expert * stride_se
    z = z_ptr + expert * stride_ze
    k_start = split * k_chunk
    k_end = tl.minimum(K, k_start + k_chunk)
    gate = _codes_block_sum(x_row, qw, s, z, perm_ptr, offs_n, chunk * BN, 0, k_start, k_end, I, group_size,
                            stride_qk, stride_sg, stride_zg, scale_chunk, HAS_ZEROS, BK, PREFETCH, MARLIN)
    up = _codes_block_sum(x_row, qw, s, z, perm_ptr, offs_n, chunk * BN, I, k_start, k_end, I, group_size, stride_qk,
                          stride_sg, stride_zg, scale_chunk, HAS_ZEROS, BK, PREFETCH, MARLIN)
    if split_k > 1:
        # partials [split_k, pairs, 2I]: gate's columns, then up's
        at = gemm_ptr + split * num_pairs * 2 * I + pair * 2 * I + offs_n[None, :]
        tl.store(at, gate, mask=offs_n[None, :] < I)
        tl.store(at + I, up, mask=offs_n[None, :] < I)
    _finish_gate_up(dense._sum(gate, 0), dense._sum(up, 0), pair, expert, chunk, chunks, offs_n, gemm_ptr, sync_ptr,
                    counters_ptr, r_ptr, a13_ptr, b2_ptr, h_ptr, part_ptr, num_pairs, num_tokens, I, K, R13, R2,
                    ROW_DIV, split_k, shrink_programs, shrink_chunk, stride_r, stride_a13e, stride_b2e, stride_h, HAS13,
                    HAS2, SHRINK, SPLITS)


@triton.jit
def _finish_gate_up(gate, up, pair, expert, chunk, chunks, offs_n, gemm_ptr, sync_ptr, counters_ptr, r_ptr, a13_ptr,
                    b2_ptr, h_ptr, part_ptr, num_pairs, num_tokens, I, K, R13, R2, ROW_DIV, split_k, shrink_programs,
                    shrink_chunk, stride_r, stride_a13e, stride_b2e, stride_h, HAS13: tl.constexpr,
                    HAS2: tl.constexpr, SHRINK: tl.constexpr, SPLITS: tl.constexpr):
    """A pair's chunk of I once a program has its K chunk's gate and up ([BN] each, stored as
    partials [split_k, pairs, 2I] where K is split): the chunk's last arrival adds the partials
    up and runs `activate_pair`, with SHRINK once the launch's shrink programs have stored R."""
    if split_k > 1:
        last = _ticket(sync_ptr, pair * chunks + chunk, split_k)
    else:
        last = True
    if last:
        if split_k > 1:
            row = tl.full((1,), 0, tl.int64) + pair
            gate = dense._sum(dense._sum_partials(gemm_ptr, row, offs_n, num_pairs, 2 * I, split_k, SPLITS), 0)
            up = dense._sum(dense._sum_partials(gemm_ptr, row, offs_n + I, num_pairs, 2 * I, split_k, SPLITS), 0)
        r_slices = 1
        if SHRINK:
            dense._await_count(counters_ptr, shrink_programs)  # every shrink program has stored its R
            r_slices = (K + shrink_chunk - 1) // shrink_chunk
        pairs_lib.activate_pair(gate, up, pair, expert, offs_n, offs_n < I, r_ptr, a13_ptr, b2_ptr, h_ptr, part_ptr,
                                num_pairs, I, R13, R2, ROW_DIV, chunk, stride_r, stride_a13e, stride_b2e, stride_h,
                                HAS13, HAS2, r_slices, num_tokens * R13)
        if SHRINK:
            _release_shrink(counters_ptr, num_pairs * chunks)


@triton.jit(do_not_specialize=["num_tokens"])
def _down_pairs_kernel(h_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, part_ptr, a2_ptr, ids_ptr, weights_ptr, out_ptr,
                       gemm_ptr, sync_ptr, num_tokens, H, I, R2, num_chunks, group_size, split_k, k_chunk,
                       stride_h, stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg, stride_a2e,
                       stride_out, scale_chunk, TOP_K: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS2: tl.constexpr,
                       BN: tl.constexpr, BK: tl.constexpr, BLOCK_C: tl.constexpr,
                       SPLITS: tl.constexpr, PREFETCH: tl.constexpr, MARLIN: tl.constexpr):
    """Program (token, chunk of H, routed expert k, K chunk): w_p h_p deq(W2_e) over the K
    chunk; the tile's last arrival (of TOP_K * split_k) sums them, adds every pair's
    w_p A2_e S_p and writes the token's output chunk."""
    item = tl.program_id(0)
    contributors = TOP_K * split_k
    slot = item % contributors  # = k * split_k + split
    tile = item // contributors  # = token * chunks + chunk
    chunks = (H + BN - 1) // BN
    token = tile // chunks
    offs_n = (tile % chunks) * BN + tl.arange(0, BN)
    n_ok = offs_n < H
    pair = token * TOP_K + slot // split_k
    expert = tl.load(ids_ptr + pair).to(tl.int64)
    k_start = (slot % split_k) * k_chunk
    acc = _codes_block_sum(h_ptr + pair.to(tl.int64) * stride_h, qw_ptr + expert * stride_qe,
                           s_ptr + expert * stride_se, z_ptr + expert * stride_ze, perm_ptr, offs_n,
                           (tile % chunks) * BN, 0, k_start,
                           tl.minimum(I, k_start + k_chunk), H, group_size, stride_qk, stride_sg, stride_zg,
                           scale_chunk, HAS_ZEROS, BK, PREFETCH, MARLIN)
    acc = acc * tl.load(weights_ptr + pair)
    row = tl.full((1,), 0, tl.int64) + token
    # partials [TOP_K * split_k, tokens, H]
    tl.store(gemm_ptr + slot * num_tokens * H + row[:, None] * H + offs_n[None, :], acc, mask=n_ok[None, :])
    if _ticket(sync_ptr, tile, contributors):
        _finish_token(gemm_ptr, part_ptr, a2_ptr, ids_ptr, weights_ptr, out_ptr, token, offs_n, num_tokens, H, R2,
                      num_chunks, contributors, stride_a2e, stride_out, TOP_K, HAS2, BLOCK_C, SPLITS)


@triton.jit
def _finish_token(gemm_ptr, part_ptr, a2_ptr, ids_ptr, weights_ptr, out_ptr, token, offs_n, num_tokens, H, R2,
                  num_chunks, contributors, stride_a2e, stride_out, TOP_K: tl.constexpr, HAS2: tl.constexpr,
                  BLOCK_C: tl.constexpr, SPLITS: tl.constexpr):
    """A token's output chunk, by the last of its w2 tile's programs: the sum of the tile's
    partials (every routed expert's K chunks, router-weighted) and every pair's w_p A2_e S_p."""
    n_ok = offs_n < H
    row = tl.full((1,), 0, tl.int64) + token
    total = dense._sum(dense._sum_partials(gemm_ptr, row, offs_n, num_tokens, H, contributors, SPLITS), 0)
    if HAS2:
        for k in range(TOP_K):  # not unrolled: one pair's registers at a time
            p = token * TOP_K + k
            e = tl.load(ids_ptr + p).to(tl.int64)
            total += tl.load(weights_ptr + p) * pairs_lib.down_correction(
                part_ptr, a2_ptr, p, e, offs_n, n_ok, num_tokens * TOP_K, R2, num_chunks, stride_a2e, BLOCK_C)
    tl.store(out_ptr + token.to(tl.int64) * stride_out + offs_n, total.to(out_ptr.dtype.element_ty), mask=n_ok)


HIGH_BIAS = dense.HIGH_BIAS


@triton.jit
def _codes_block_sum(x_ptr, qw_ptr, s_ptr, z_ptr, perm_ptr, offs_n, n_start, col0, k_start, k_end, N, group_size,
                     stride_qk, stride_sg, stride_zg, scale_chunk, HAS_ZEROS: tl.constexpr, BK: tl.constexpr,
                     PREFETCH: tl.constexpr, MARLIN: tl.constexpr):
    """x deq(W) over [k_start, k_end) for the columns col0 + offs_n (offs_n = n_start + arange,
    masked below col0 + N), float32 [1, BN], from the codes in either layout: the kernels'
    nibble planes, or with MARLIN the layout vLLM's Marlin MoE kernels read."""
    if MARLIN:
        return _marlin_gemv_block_sum(x_ptr, qw_ptr, s_ptr, perm_ptr, n_start + col0, k_start, k_end, N + col0,
                                      group_size, stride_qk, stride_sg, scale_chunk, offs_n.shape[0], BK)[None, :]
    return dense._gemv_block_sum(x_ptr, qw_ptr + col0, s_ptr + col0, z_ptr + col0, offs_n, k_start, k_end, N,
                                 group_size, stride_qk, stride_sg, stride_zg,
                                 tl.full((1, offs_n.shape[0]), 0.0, tl.float32), HAS_ZEROS, BK, PREFETCH)


@triton.jit
def _marlin_gemv_block_sum(x_ptr, qw_ptr, s_ptr, perm_ptr, n_start, k_start, k_end, N, group_size, stride_qk,
                           stride_sg, scale_chunk, BN: tl.constexpr, BK: tl.constexpr):
    """x deq(W) over [k_start, k_end) on the CUDA cores for the BN columns from n_start (a
    multiple of 64), float32 [BN], from symmetric int4 codes (w = (q - 8) s) in Marlin's
    layout, so that one copy of the experts serves both Marlin MoE (larger batches) and these
    GEMVs (decode).

    That layout (vLLM's `gptq_marlin_moe_repack`): a row of int32 words per 16 rows of K; along
    it, for every 64 columns, 128 words. Word c * 16 + a * 4 + j of those holds the columns
    16 j + c (nibbles 0, 4, 1, 5) and 16 j + c + 8 (nibbles 2, 6, 3, 7) at the K rows 2a,
    2a + 1, 2a + 8 and 2a + 9 of the 16. So the words are read as they lie, [16-row tiles,
    64-column groups x c, a, j] (contiguous rows, vector loads), each gives with one and-or per
    pair of nibbles two K rows as the dense kernel's 128 + q numbers
    (w4a16_triton._gemv_block_sum) for each of its two columns, the sums over K run over the
    tiles and a, and the columns come back into their order once, after the loop. Scales are
    permuted within chunks of `scale_chunk` columns: column n's sits at perm[n % scale_chunk]."""
    KT: tl.constexpr = BK // 16
    GC: tl.constexpr = BN // 8  # (64-column group, c)
    t = tl.arange(0, KT)[:, None, None, None]
    gc = tl.arange(0, GC)[None, :, None, None]
    a = tl.arange(0, 4)[None, None, :, None]
    j = tl.arange(0, 4)[None, None, None, :]
    words_at = t * stride_qk + (n_start // 64) * 128 + gc * 16 + a * 4 + j
    words_ok = n_start + (gc // 8) * 64 < N
    k_rows = t * 16 + 2 * a  # the first of each word's four K rows, [KT, 1, 4, 1]
    # the natural columns of the per-column sums [GC, 4]: 16 j + 8 b + c in group g
    group_col = n_start + (tl.arange(0, GC) // 8 * 64 + tl.arange(0, GC) % 8)[:, None] + 16 * tl.arange(0, 4)[None, :]
    scale_at0 = _marlin_scale_position(perm_ptr, group_col, scale_chunk)
    scale_at1 = _marlin_scale_position(perm_ptr, group_col + 8, scale_chunk)
    cols_ok = group_col < N
    magic = dense._register_magic(N, 0x4300)
    total0 = tl.full((GC, 4), 0.0, tl.float32)
    total1 = tl.full((GC, 4), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BK):
        words = tl.load(qw_ptr + (k0 // 16) * stride_qk + words_at, mask=words_ok, other=0)
        rows = x_ptr + k0 + k_rows
        x0 = tl.load(rows).to(tl.float32)
        x1 = tl.load(rows + 1).to(tl.float32)
        x8 = tl.load(rows + 8).to(tl.float32)
        x9 = tl.load(rows + 9).to(tl.float32)
        high_rows = dense._sum(dense._sum(dense._sum(dense._sum(x1 + x9, 0), 0), 0), 0)
        x_sum = dense._sum(dense._sum(dense._sum(dense._sum(x0 + x8, 0), 0), 0), 0) + high_rows
        offset = x_sum * 136.0 + HIGH_BIAS * high_rows  # 136: the magic 128 plus the symmetric zero point 8
        group = (k0 // group_size) * stride_sg
        scale0 = tl.load(s_ptr + group + scale_at0, mask=cols_ok, other=0.0).to(tl.float32)
        scale1 = tl.load(s_ptr + group + scale_at1, mask=cols_ok, other=0.0).to(tl.float32)
        total0 += (_marlin_column_sums(words, x0, x1, x8, x9, magic) - offset) * scale0
        total1 += (_marlin_column_sums(words >> 8, x0, x1, x8, x9, magic) - offset) * scale1
    # [GC, 4 j, 2 b] -> [groups, j, b, c] -> the natural order g * 64 + 16 j + 8 b + c
    both = tl.reshape(tl.join(total0, total1), (BN // 64, 8, 4, 2))
    return tl.reshape(tl.permute(both, (0, 2, 3, 1)), (BN,))


@triton.jit
def _marlin_column_sums(words, x0, x1, x8, x9, magic):
    """Per (group and c, j): the sum over the block's K rows of x times 128 + q for the column
    whose nibbles sit at 0, 4, 1, 5 of `words` (shifted by 8 for the other), before the offset."""
    first = (words & 0x000F000F) | magic  # rows 2a (low half) and 2a + 1 (high half)
    second = ((words >> 4) & 0x000F000F) | magic  # rows 2a + 8 and 2a + 9
    products = x0 * (first << 16).to(tl.float32, bitcast=True)
    products += x1 * first.to(tl.float32, bitcast=True)
    products += x8 * (second << 16).to(tl.float32, bitcast=True)
    products += x9 * second.to(tl.float32, bitcast=True)
    return dense._sum(dense._sum(products, 0), 1)


@triton.jit
def _marlin_scale_position(perm_ptr, columns, scale_chunk):
    """Where Marlin's permuted scales keep each of `columns`."""
    return (columns // scale_chunk) * scale_chunk + tl.load(perm_ptr + columns % scale_chunk)


@triton.jit
def _gemv_rows(x_ptr, x_rows, rows_ok, stride_x, qw_ptr, s_ptr, z_ptr, offs_n, k_start, k_end, N, group_size,
               stride_qk, stride_sg, stride_zg, HAS_ZEROS: tl.constexpr, BK: tl.constexpr):
    """x[rows] deq(W) over [k_start, k_end) on the CUDA cores, float32 [BM, BN]: the dense
    kernel's one-token GEMV (w4a16_triton._gemv_block_sum, same arithmetic) for the few rows
    of one expert's sorted block, each word unpacked once for all of them."""
    KW: tl.constexpr = BK // 8
    offs_kw = tl.arange(0, KW)
    n_ok = offs_n < N
    words_at = offs_kw[:, None] * stride_qk + offs_n[None, :]
    magic = dense._register_magic(N, 0x4300)
    x_base = x_ptr + x_rows[:, None] * stride_x
    total = tl.full((x_rows.shape[0], offs_n.shape[0]), 0.0, tl.float32)
    for k0 in range(k_start, k_end, BK):
        words = tl.load(qw_ptr + (k0 // 8) * stride_qk + words_at, mask=n_ok[None, :], other=0)
        products = tl.full((x_rows.shape[0], KW, offs_n.shape[0]), 0.0, tl.float32)
        x_sums = tl.full((x_rows.shape[0], KW), 0.0, tl.float32)
        x_high_sums = tl.full((x_rows.shape[0], KW), 0.0, tl.float32)
        for p in tl.static_range(4):
            pair = ((words >> (4 * p)) & 0x000F000F) | magic
            low = (pair << 16).to(tl.float32, bitcast=True)  # 128 + q exactly
            high = pair.to(tl.float32, bitcast=True)  # 128 + q + HIGH_BIAS + q_low / 2^16
            plane = KW * (4 * (p % 2) + 2 * (p // 2))  # nibble p's rows; nibble p + 4's follow
            x_low = tl.load(x_base + k0 + plane + offs_kw[None, :], mask=rows_ok[:, None], other=0.0).to(tl.float32)
            x_high = tl.load(x_base + k0 + plane + KW + offs_kw[None, :], mask=rows_ok[:, None],
                             other=0.0).to(tl.float32)
            products += x_low[:, :, None] * low[None, :, :]
            products += x_high[:, :, None] * high[None, :, :]
            x_sums += x_low + x_high
            x_high_sums += x_high
        raw = dense._sum(products, 1) - HIGH_BIAS * dense._sum(x_high_sums, 1)[:, None]
        group = k0 // group_size
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        zero_term = dense._zero_point_term(z_ptr, group, offs_n, N, stride_zg, HAS_ZEROS, 128.0)
        total += (raw - dense._sum(x_sums, 1)[:, None] * zero_term[None, :]) * scale[None, :]
    return total


@triton.jit
def _entry(values, m: tl.constexpr):
    """Entry m of a [BM] tensor (Triton has no indexing: a masked sum)."""
    return dense._sum(tl.where(tl.arange(0, values.shape[0]) == m, values, 0), 0)


@triton.jit
def _row(values, m: tl.constexpr):
    """Row m of a [BM, C] tensor, [C]."""
    return dense._sum(tl.where((tl.arange(0, values.shape[0]) == m)[:, None], values, 0.0), 0)


@triton.jit
def _rows_item(sorted_ptr, expert_ptr, padded_ptr, num_pairs, N, split_k, BLOCK_M: tl.constexpr, BN: tl.constexpr):
    """A rows-path program's K chunk, column chunk (of `chunks`) and sorted block (`_block_rows`)."""
    item = tl.program_id(0)
    chunks = (N + BN - 1) // BN
    block = item // (split_k * chunks)
    pairs, valid, expert, live = _block_rows(block, sorted_ptr, expert_ptr, padded_ptr, num_pairs, BLOCK_M)
    return item % split_k, (item // split_k) % chunks, chunks, pairs, valid, expert, live


@triton.jit(do_not_specialize=["num_pairs"])
def _gate_up_rows_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, r_ptr, a13_ptr, b2_ptr, sorted_ptr, expert_ptr, padded_ptr,
                         h_ptr, part_ptr, gemm_ptr, sync_ptr, num_pairs, I, K, R13, R2, TOP_K, ROW_DIV, group_size,
                         split_k, k_chunk, stride_x, stride_qe, stride_qk, stride_se, stride_sg, stride_ze,
                         stride_zg, stride_r, stride_a13e, stride_b2e, stride_h,
                         HAS_ZEROS: tl.constexpr, HAS13: tl.constexpr, HAS2: tl.constexpr, BLOCK_M: tl.constexpr,
                         BN: tl.constexpr, BK: tl.constexpr, SPLITS: tl.constexpr):
    """Program (sorted block, chunk of I, K chunk): gate and up of the block's pairs (one expert)
    on the CUDA cores, each word read once for all of them; per pair the chunk's last arrival
    runs `activate_pair`, as on the pairs path."""
    split, chunk, chunks, pairs, valid, expert, live = _rows_item(sorted_ptr, expert_ptr, padded_ptr, num_pairs, I,
                                                                  split_k, BLOCK_M, BN)
    if live:
        offs_n = chunk * BN + tl.arange(0, BN)
        qw = qw_ptr + expert * stride_qe
        s = s_ptr + expert * stride_se
        z = z_ptr + expert * stride_ze
        k_start = split * k_chunk
        k_end = tl.minimum(K, k_start + k_chunk)
        tokens = pairs // TOP_K
        gate = _gemv_rows(x_ptr, tokens, valid, stride_x, qw, s, z, offs_n, k_start, k_end, I, group_size, stride_qk,
                          stride_sg, stride_zg, HAS_ZEROS, BK)
        up = _gemv_rows(x_ptr, tokens, valid, stride_x, qw + I, s + I, z + I, offs_n, k_start, k_end, I, group_size,
                        stride_qk, stride_sg, stride_zg, HAS_ZEROS, BK)
        if split_k > 1:  # partials [split_k, pairs, 2I], as on the pairs path
            at = gemm_ptr + split * num_pairs * 2 * I + pairs[:, None] * 2 * I + offs_n[None, :]
            mask = valid[:, None] & (offs_n[None, :] < I)
            tl.store(at, gate, mask=mask)
            tl.store(at + I, up, mask=mask)
        for m in tl.static_range(BLOCK_M):
            if _entry(valid.to(tl.int32), m) > 0:
                _finish_gate_up(_row(gate, m), _row(up, m), _entry(pairs, m), expert, chunk, chunks, offs_n, gemm_ptr,
                                sync_ptr, sync_ptr, r_ptr, a13_ptr, b2_ptr, h_ptr, part_ptr, num_pairs, 1, I, K, R13,
                                R2, ROW_DIV, split_k, 0, K, stride_r, stride_a13e, stride_b2e, stride_h, HAS13, HAS2,
                                False, SPLITS)


@triton.jit(do_not_specialize=["num_tokens"])
def _down_rows_kernel(h_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, a2_ptr, ids_ptr, sorted_ptr, expert_ptr, padded_ptr,
                      weights_ptr, out_ptr, gemm_ptr, sync_ptr, num_tokens, H, I, R2, num_chunks, group_size,
                      split_k, k_chunk, stride_h, stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg,
                      stride_a2e, stride_out, TOP_K: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS2: tl.constexpr,
                      BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_C: tl.constexpr,
                      SPLITS: tl.constexpr):
    """Program (sorted block, chunk of H, K chunk): w_p h_p deq(W2_e) for the block's pairs,
    each stored as its token's partial (slot k * split_k + split, k the pair's place in the
    top-k); a token's tile is done when all TOP_K * split_k partials are in (`_finish_token`)."""
    split, chunk, chunks, pairs, valid, expert, live = _rows_item(sorted_ptr, expert_ptr, padded_ptr,
                                                                  num_tokens * TOP_K, H, split_k, BLOCK_M, BN)
    if live:
        offs_n = chunk * BN + tl.arange(0, BN)
        k_start = split * k_chunk
        acc = _gemv_rows(h_ptr, pairs, valid, stride_h, qw_ptr + expert * stride_qe, s_ptr + expert * stride_se,
                         z_ptr + expert * stride_ze, offs_n, k_start, tl.minimum(I, k_start + k_chunk), H, group_size,
                         stride_qk, stride_sg, stride_zg, HAS_ZEROS, BK)
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
        slots = (pairs % TOP_K) * split_k + split
        tl.store(gemm_ptr + (slots * num_tokens + pairs // TOP_K)[:, None] * H + offs_n[None, :], acc,
                 mask=valid[:, None] & (offs_n[None, :] < H))
        contributors = TOP_K * split_k
        for m in tl.static_range(BLOCK_M):
            token = _entry(pairs, m) // TOP_K
            if _entry(valid.to(tl.int32), m) > 0:
                if _ticket(sync_ptr, token * chunks + chunk, contributors):
                    _finish_token(gemm_ptr, part_ptr, a2_ptr, ids_ptr, weights_ptr, out_ptr, token, offs_n,
                                  num_tokens, H, R2, num_chunks, contributors, stride_a2e, stride_out, TOP_K, HAS2,
                                  BLOCK_C, SPLITS)


@triton.jit
def _block_rows(block, sorted_ptr, expert_ptr, padded_ptr, num_pairs, BLOCK_M: tl.constexpr):
    """A sorted block's pair ids (0 where padding), which of them are real, its expert, and
    whether it is in use (blocks past the padded count hold stale ids; -1: not this rank's)."""
    expert = tl.load(expert_ptr + block).to(tl.int64)
    live = (block * BLOCK_M < tl.load(padded_ptr)) & (expert >= 0)
    pairs = tl.load(sorted_ptr + block * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    return tl.where(valid, pairs, 0).to(tl.int64), valid, expert, live


@triton.jit(do_not_specialize=["num_pairs", "num_tokens"])
def _gate_up_blocks_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, r_ptr, a13_ptr, b2_ptr, sorted_ptr, expert_ptr, padded_ptr,
                           h_ptr, part_ptr, num_pairs, num_tokens, I, K, R13, R2, TOP_K, ROW_DIV, group_size,
                           stride_x, stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg, stride_r,
                           stride_a13e, stride_b2e, stride_h,
                           HAS_ZEROS: tl.constexpr, HAS13: tl.constexpr, HAS2: tl.constexpr,
                           BLOCK_M: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, BLOCK_R13: tl.constexpr,
                           BLOCK_R2: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VALUE: tl.constexpr):
    """Program (sorted block, chunk of I): gate and up of the block's pairs on the tensor cores,
    + R A13_e^T, h = SiLU(gate) * up, and the chunk's partial h B2_e^T."""
    pairs, valid, expert, live = _block_rows(tl.program_id(0), sorted_ptr, expert_ptr, padded_ptr, num_pairs,
                                             BLOCK_M)
    if live:
        DTYPE = h_ptr.dtype.element_ty
        chunk = tl.program_id(1)
        offs_n = chunk * BN + tl.arange(0, BN)
        n_ok = offs_n < I
        tokens = pairs // TOP_K
        qw = qw_ptr + expert * stride_qe
        s = s_ptr + expert * stride_se
        z = z_ptr + expert * stride_ze
        zero = tl.full((BLOCK_M, BN), 0.0, tl.float32)
        gate = dense._int4_block_sum(x_ptr, qw, s, z, tokens, offs_n, 0, K, num_tokens, I, group_size, stride_x,
                                     stride_qk, stride_sg, stride_zg, zero, HAS_ZEROS, BK, MAGIC, MAGIC_VALUE, DTYPE)
        up = dense._int4_block_sum(x_ptr, qw + I, s + I, z + I, tokens, offs_n, 0, K, num_tokens, I, group_size,
                                   stride_x, stride_qk, stride_sg, stride_zg, zero, HAS_ZEROS, BK, MAGIC, MAGIC_VALUE,
                                   DTYPE)
        if HAS13:
            offs_r = tl.arange(0, BLOCK_R13)
            reduced = tl.load(r_ptr + (pairs // ROW_DIV)[:, None] * stride_r + offs_r[None, :],
                              mask=valid[:, None] & (offs_r[None, :] < R13), other=0.0).to(DTYPE)
            a_t = a13_ptr + expert * stride_a13e + offs_n[None, :] * R13 + offs_r[:, None]
            a_ok = n_ok[None, :] & (offs_r[:, None] < R13)
            gate = tl.dot(reduced, tl.load(a_t, mask=a_ok, other=0.0).to(DTYPE), gate)
            up = tl.dot(reduced, tl.load(a_t + I * R13, mask=a_ok, other=0.0).to(DTYPE), up)
        gate = gate.to(DTYPE).to(tl.float32)  # what the w13 output holds
        up = up.to(DTYPE).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(DTYPE).to(tl.float32)
        hidden = (silu * up).to(DTYPE)
        tl.store(h_ptr + pairs[:, None] * stride_h + offs_n[None, :], hidden, mask=valid[:, None] & n_ok[None, :])
        if HAS2:
            offs_s = tl.arange(0, BLOCK_R2)
            b_t = tl.load(b2_ptr + expert * stride_b2e + offs_s[None, :] * I + offs_n[:, None],
                          mask=n_ok[:, None] & (offs_s[None, :] < R2), other=0.0).to(DTYPE)
            partial = tl.dot(hidden, b_t)  # [BLOCK_M, BLOCK_R2]
            slots = (chunk * num_pairs + pairs)[:, None] * R2 + offs_s[None, :]
            tl.store(part_ptr + slots, partial, mask=valid[:, None] & (offs_s[None, :] < R2))


@triton.jit(do_not_specialize=["num_pairs"])
def _down_blocks_kernel(h_ptr, qw_ptr, s_ptr, z_ptr, part_ptr, a2_ptr, sorted_ptr, expert_ptr, padded_ptr,
                        weights_ptr, out_ptr, num_pairs, H, I, R2, num_chunks, group_size,
                        stride_h, stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg, stride_a2e,
                        stride_out, HAS_ZEROS: tl.constexpr, HAS2: tl.constexpr, BLOCK_M: tl.constexpr,
                        BN: tl.constexpr, BK: tl.constexpr, BLOCK_R2: tl.constexpr, MAGIC: tl.constexpr,
                        MAGIC_VALUE: tl.constexpr):
    """Program (sorted block, chunk of H): out[p] = w_p (h_p deq(W2_e) + S_p A2_e^T), one row per pair."""
    pairs, valid, expert, live = _block_rows(tl.program_id(0), sorted_ptr, expert_ptr, padded_ptr, num_pairs,
                                             BLOCK_M)
    if live:
        DTYPE = h_ptr.dtype.element_ty
        offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = offs_n < H
        acc = dense._int4_block_sum(h_ptr, qw_ptr + expert * stride_qe, s_ptr + expert * stride_se,
                                    z_ptr + expert * stride_ze, pairs, offs_n, 0, I, num_pairs, H, group_size,
                                    stride_h, stride_qk, stride_sg, stride_zg, tl.full((BLOCK_M, BN), 0.0, tl.float32),
                                    HAS_ZEROS, BK, MAGIC, MAGIC_VALUE, DTYPE)
        if HAS2:
            offs_s = tl.arange(0, BLOCK_R2)
            reduced = tl.full((BLOCK_M, BLOCK_R2), 0.0, tl.float32)
            s_ok = valid[:, None] & (offs_s[None, :] < R2)
            for c in range(0, num_chunks):
                reduced += tl.load(part_ptr + (c * num_pairs + pairs)[:, None] * R2 + offs_s[None, :], mask=s_ok,
                                   other=0.0)
            a_t = tl.load(a2_ptr + expert * stride_a2e + offs_n[None, :] * R2 + offs_s[:, None],
                          mask=n_ok[None, :] & (offs_s[:, None] < R2), other=0.0).to(DTYPE)
            acc = tl.dot(reduced.to(DTYPE), a_t, acc)
        acc = acc * tl.load(weights_ptr + pairs, mask=valid, other=0.0)[:, None]
        tl.store(out_ptr + pairs[:, None] * stride_out + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=valid[:, None] & n_ok[None, :])


# ----- launches ---------------------------------------------------------------------------------

PAIRS_PER_SM = 8  # programs per SM the pairs path aims for by splitting K (a guess, not timed)
PAIRS_BLOCK_N = 64  # columns per program of the pairs path (the dense one-token path's tile)
# warps per program of the pairs path, on either layout: on Marlin's, with the correction, the
# H100 took 89.0 us per layer at one token at 2 warps, 96.2 at 4 and 121.0 at 8 (Qwen3-30B-A3B
# shapes, bench/results/moe_micro_own_h100_2026-12-07.json)
PAIRS_WARPS = 2
# the rows path's (columns per program, warps) by pairs per sorted block: the fewest warps at which
# both kernels compiled for sm_90 without spilling, in compiles that lacked the alignment facts
# Triton's launcher adds at run time (which overstated registers and spills: kernels/
# moe_fused_triton.RANK_BLOCK); a guess until a GPU times the alternatives
ROWS_LAUNCH = {2: (64, 4), 4: (32, 8)}
ROWS_MIN_BLOCK_N = 32
_PARTIALS_PER_LOAD = 16


def pairs_split(tiles: int, k_blocks: int, sm_count: int) -> int:
    """K chunks per tile for the pairs path: a divisor of the K blocks that gives about
    PAIRS_PER_SM programs per SM (fewer chunks where the tiles already fill the GPU)."""
    wanted = math.ceil(PAIRS_PER_SM * sm_count / max(1, tiles))
    return min((d for d in range(1, k_blocks + 1) if k_blocks % d == 0), key=lambda d: (d < wanted, abs(d - wanted)))


class Workspace:
    """Per-device float32 partials, zeroed tickets and the fused shrink's counters of the pairs
    and rows paths, sized at load time (before CUDA graphs are captured, moe_triton.reserve);
    every launch leaves the tickets and counters zeroed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.partial = torch.empty(0, dtype=torch.float32, device=device)
        self.sync = torch.zeros(0, dtype=torch.int32, device=device)
        self.counters = torch.zeros(2, dtype=torch.int32, device=device)  # the pairs path's fused shrink
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8

    def reserve(self, floats: int, tickets: int) -> None:
        """Grow to at least `floats` float32 partials and `tickets` tickets (moe_triton.reserve
        sizes them for a layer)."""
        if self.partial.numel() < floats:
            self.partial = torch.empty(floats, dtype=torch.float32, device=self.device)
        if self.sync.numel() < tickets:
            self.sync = torch.zeros(tickets, dtype=torch.int32, device=self.device)


_workspaces: dict[torch.device, Workspace] = {}


def workspace(device: torch.device) -> Workspace:
    if device not in _workspaces:
        _workspaces[device] = Workspace(device)
    return _workspaces[device]


def _strides(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> tuple[int, ...]:
    """(stride_qe, stride_qk, stride_se, stride_sg, stride_ze, stride_zg) of one projection's codes."""
    z = (0, 0) if zeros is None else (zeros.stride(0), zeros.stride(1))
    return (qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1), *z)


@dataclass(frozen=True)
class MarlinScales:
    """Where Marlin keeps each column's scale: column c's at (c // chunk) * chunk +
    positions[c % chunk] (vLLM's `marlin_permute_scales` permutes within chunks of 64 columns,
    of 32 with one group per column), int32 on the codes' device."""

    positions: torch.Tensor
    chunk: int


def marlin_scales(permutation: list[int], device: torch.device) -> MarlinScales:
    """MarlinScales from the permutation Marlin applies (stored[i] = original[permutation[i]])."""
    positions = torch.empty(len(permutation), dtype=torch.int32)
    positions[torch.tensor(permutation)] = torch.arange(len(permutation), dtype=torch.int32)
    return MarlinScales(positions.to(device), len(permutation))


def _check_marlin_tiles(marlin: MarlinScales | None) -> None:
    """The Marlin-layout GEMV reads whole 64-column groups: a program's columns must be some."""
    if marlin is not None and PAIRS_BLOCK_N % 64:
        raise ValueError(f"PAIRS_BLOCK_N={PAIRS_BLOCK_N}: the GEMVs on Marlin's layout take multiples of 64 columns")


SHRINK_CHUNK = 256  # K columns of B13 per shrink program of the pairs path (8 per token at K = 2048)


def gate_up_pairs(x, qweight, scales, zeros, group_size: int, block_k: int, reduced, a13, b2, topk_ids, hidden,
                  row_div: int, space: Workspace, b13=None, marlin: MarlinScales | None = None):
    """hidden [P, I] = SiLU(gate) * up of x deq(W13_e) + A13_e R, pair by pair (W13 [E, K/8, 2I]
    in the kernel layout, or with `marlin` symmetric codes [E, K/16, 4I] in Marlin's), and with
    b2 the partial sums [chunks, P, r2] of B2_e h that `down_pairs` reads (None without b2). R
    comes as `reduced` (rows `row_div` pairs apart), or, given the shared `b13` [r, K] instead,
    the launch's first programs compute it (one launch less per layer)."""
    pairs, inter = hidden.shape
    tokens, k = x.shape
    _check_marlin_tiles(marlin)
    chunks = triton.cdiv(inter, PAIRS_BLOCK_N)
    split = pairs_split(pairs * chunks, k // block_k, space.sm_count)
    r13 = 1 if a13 is None else a13.shape[2]
    r2 = 1 if b2 is None else b2.shape[1]
    partials = None if b2 is None else torch.empty((chunks, pairs, r2), dtype=torch.float32, device=x.device)
    shrink = b13 is not None
    shrink_programs = tokens * triton.cdiv(k, SHRINK_CHUNK) if shrink else 0
    if shrink:  # R's partials per K chunk: [chunks, tokens, r]
        reduced = torch.empty((triton.cdiv(k, SHRINK_CHUNK), tokens, r13), dtype=torch.float32, device=x.device)
    dummy = hidden
    _gate_up_pairs_kernel[(shrink_programs + pairs * chunks * split,)](
        x, qweight, scales, dummy if zeros is None else zeros, topk_ids if marlin is None else marlin.positions,
        dummy if reduced is None else reduced,
        dummy if a13 is None else a13, dummy if b2 is None else b2, topk_ids, hidden,
        dummy if partials is None else partials, space.partial, space.sync, b13 if shrink else dummy, space.counters,
        pairs, tokens, inter, k, r13, r2, topk_ids.shape[1], row_div, group_size, split, k // split, shrink_programs,
        SHRINK_CHUNK, x.stride(0), *_strides(qweight, scales, zeros), 0 if reduced is None else reduced.stride(-2),
        0 if a13 is None else a13.stride(0), 0 if b2 is None else b2.stride(0), hidden.stride(0),
        1 if marlin is None else marlin.chunk, HAS_ZEROS=zeros is not None, HAS13=a13 is not None,
        HAS2=b2 is not None, SHRINK=shrink, BN=PAIRS_BLOCK_N, BK=block_k,
        SPLITS=min(_PARTIALS_PER_LOAD, triton.next_power_of_2(split)), PREFETCH=False, BLOCK_R=16, SHRINK_BK=32,
        MARLIN=marlin is not None, num_warps=PAIRS_WARPS)
    return partials


def down_pairs(hidden, qweight, scales, zeros, group_size: int, block_k: int, partials, a2, topk_ids, topk_weights,
               out, space: Workspace, marlin: MarlinScales | None = None):
    """out [T, H] = sum over top-k of w_p (h_p deq(W2_e) + A2_e S_p), S_p from `gate_up_pairs`
    (W2 in either layout, as there)."""
    tokens, top_k = topk_ids.shape
    inter, h = hidden.shape[1], out.shape[1]
    _check_marlin_tiles(marlin)
    chunks = triton.cdiv(h, PAIRS_BLOCK_N)
    split = pairs_split(tokens * chunks * top_k, inter // block_k, space.sm_count)
    r2 = 1 if a2 is None else a2.shape[2]
    contributors = top_k * split
    _down_pairs_kernel[(tokens * chunks * contributors,)](
        hidden, qweight, scales, out if zeros is None else zeros, topk_ids if marlin is None else marlin.positions,
        out if partials is None else partials,
        out if a2 is None else a2, topk_ids, topk_weights, out, space.partial, space.sync, tokens, h, inter, r2,
        1 if partials is None else partials.shape[0], group_size, split, inter // split, hidden.stride(0),
        *_strides(qweight, scales, zeros), 0 if a2 is None else a2.stride(0), out.stride(0),
        1 if marlin is None else marlin.chunk, TOP_K=top_k, HAS_ZEROS=zeros is not None, HAS2=a2 is not None,
        BN=PAIRS_BLOCK_N, BK=block_k, BLOCK_C=_PARTIALS_PER_LOAD,
        SPLITS=min(_PARTIALS_PER_LOAD, triton.next_power_of_2(contributors)), PREFETCH=False,
        MARLIN=marlin is not None, num_warps=PAIRS_WARPS)
    return out


shrink_pairs = pairs_lib.shrink_pairs  # R per pair for `--share module` checkpoints


def gate_up_rows(x, qweight, scales, zeros, group_size: int, block_k: int, reduced, a13, b2, alignment, top_k: int,
                 hidden, row_div: int, space: Workspace):
    """As `gate_up_pairs`, on pairs sorted by expert in small blocks (`alignment`): each program
    multiplies its K chunk of one expert's columns with all of the block's pairs."""
    pairs, inter = hidden.shape
    k = x.shape[1]
    block_n, warps = ROWS_LAUNCH[alignment.block_m]
    chunks = triton.cdiv(inter, block_n)
    blocks = alignment.expert_ids.numel()
    split = _rows_split(min(blocks, pairs) * chunks, k // block_k, pairs * 2 * inter, space)
    r13 = 1 if a13 is None else a13.shape[2]
    r2 = 1 if b2 is None else b2.shape[1]
    partials = None if b2 is None else torch.empty((chunks, pairs, r2), dtype=torch.float32, device=x.device)
    dummy = hidden
    _gate_up_rows_kernel[(blocks * chunks * split,)](
        x, qweight, scales, dummy if zeros is None else zeros, dummy if reduced is None else reduced,
        dummy if a13 is None else a13, dummy if b2 is None else b2, alignment.sorted_ids, alignment.expert_ids,
        alignment.padded, hidden, dummy if partials is None else partials, space.partial, space.sync, pairs, inter, k,
        r13, r2, top_k, row_div, group_size, split, k // split, x.stride(0), *_strides(qweight, scales, zeros),
        0 if reduced is None else reduced.stride(0), 0 if a13 is None else a13.stride(0),
        0 if b2 is None else b2.stride(0), hidden.stride(0),
        HAS_ZEROS=zeros is not None, HAS13=a13 is not None, HAS2=b2 is not None, BLOCK_M=alignment.block_m,
        BN=block_n, BK=block_k, SPLITS=min(_PARTIALS_PER_LOAD, triton.next_power_of_2(split)), num_warps=warps)
    return partials


def down_rows(hidden, qweight, scales, zeros, group_size: int, block_k: int, partials, a2, topk_ids, topk_weights,
              alignment, out, space: Workspace):
    """As `down_pairs`, on pairs sorted by expert in small blocks (`alignment`)."""
    tokens, top_k = topk_ids.shape
    pairs, inter = hidden.shape
    h = out.shape[1]
    block_n, warps = ROWS_LAUNCH[alignment.block_m]
    chunks = triton.cdiv(h, block_n)
    blocks = alignment.expert_ids.numel()
    split = _rows_split(min(blocks, pairs) * chunks, inter // block_k, pairs * h, space)
    r2 = 1 if a2 is None else a2.shape[2]
    _down_rows_kernel[(blocks * chunks * split,)](
        hidden, qweight, scales, out if zeros is None else zeros, out if partials is None else partials,
        out if a2 is None else a2, topk_ids, alignment.sorted_ids, alignment.expert_ids, alignment.padded,
        topk_weights, out, space.partial, space.sync, tokens, h, inter, r2,
        1 if partials is None else partials.shape[0], group_size, split, inter // split, hidden.stride(0),
        *_strides(qweight, scales, zeros), 0 if a2 is None else a2.stride(0), out.stride(0),
        TOP_K=top_k, HAS_ZEROS=zeros is not None, HAS2=a2 is not None, BLOCK_M=alignment.block_m, BN=block_n,
        BK=block_k, BLOCK_C=_PARTIALS_PER_LOAD,
        SPLITS=min(_PARTIALS_PER_LOAD, triton.next_power_of_2(top_k * split)), num_warps=warps)
    return out


def _rows_split(tiles: int, k_blocks: int, floats_per_split: int, space: Workspace) -> int:
    """The rows path's K split: `pairs_split`'s, at most what the workspace's partials hold."""
    split = pairs_split(tiles, k_blocks, space.sm_count)
    while split > 1 and split * floats_per_split > space.partial.numel():
        split = max(d for d in range(1, split) if k_blocks % d == 0)
    return split


BLOCKS_BLOCK_N = 64  # columns per program of the blocks path (not timed)


def blocks_warps(block_m: int) -> int:
    """Warps per program of the blocks path: compiled for sm_90 (cuobjdump here, no GPU) its
    kernels spilled at 4 warps past 16 rows (32 bytes a thread at 32 rows, 360 and 184 at 64)
    and fit at 8 (174-252 registers). Not timed yet."""
    return 4 if block_m <= 16 else 8


def gate_up_blocks(x, qweight, scales, zeros, group_size: int, block_k: int, reduced, a13, b2, alignment, top_k: int,
                   hidden, row_div: int):
    """As `gate_up_pairs`, on pairs sorted by expert (`alignment`, moe_lowrank_triton.Alignment)."""
    pairs, inter = hidden.shape
    tokens, k = x.shape
    chunks = triton.cdiv(inter, BLOCKS_BLOCK_N)
    r13 = 1 if a13 is None else a13.shape[2]
    r2 = 1 if b2 is None else b2.shape[1]
    partials = None if b2 is None else torch.empty((chunks, pairs, r2), dtype=torch.float32, device=x.device)
    magic, magic_value = _MAGIC[x.dtype]
    dummy = hidden
    _gate_up_blocks_kernel[(alignment.expert_ids.numel(), chunks)](
        x, qweight, scales, dummy if zeros is None else zeros, dummy if reduced is None else reduced,
        dummy if a13 is None else a13, dummy if b2 is None else b2, alignment.sorted_ids, alignment.expert_ids,
        alignment.padded, hidden, dummy if partials is None else partials, pairs, tokens, inter, k, r13, r2, top_k,
        row_div, group_size, x.stride(0), *_strides(qweight, scales, zeros),
        0 if reduced is None else reduced.stride(0), 0 if a13 is None else a13.stride(0),
        0 if b2 is None else b2.stride(0), hidden.stride(0),
        HAS_ZEROS=zeros is not None, HAS13=a13 is not None, HAS2=b2 is not None, BLOCK_M=alignment.block_m,
        BN=BLOCKS_BLOCK_N, BK=block_k, BLOCK_R13=padded_rank(r13), BLOCK_R2=padded_rank(r2), MAGIC=magic,
        MAGIC_VALUE=magic_value, num_warps=blocks_warps(alignment.block_m))
    return partials


def down_blocks(hidden, qweight, scales, zeros, group_size: int, block_k: int, partials, a2, alignment, topk_weights,
                rows):
    """rows [P, H] = w_p (h_p deq(W2_e) + A2_e S_p), one row per pair (summed over top-k by the caller)."""
    pairs, inter = hidden.shape
    h = rows.shape[1]
    r2 = 1 if a2 is None else a2.shape[2]
    magic, magic_value = _MAGIC[hidden.dtype]
    _down_blocks_kernel[(alignment.expert_ids.numel(), triton.cdiv(h, BLOCKS_BLOCK_N))](
        hidden, qweight, scales, rows if zeros is None else zeros, rows if partials is None else partials,
        rows if a2 is None else a2, alignment.sorted_ids, alignment.expert_ids, alignment.padded, topk_weights, rows,
        pairs, h, inter, r2, 1 if partials is None else partials.shape[0], group_size, hidden.stride(0),
        *_strides(qweight, scales, zeros), 0 if a2 is None else a2.stride(0), rows.stride(0),
        HAS_ZEROS=zeros is not None, HAS2=a2 is not None, BLOCK_M=alignment.block_m, BN=BLOCKS_BLOCK_N, BK=block_k,
        BLOCK_R2=padded_rank(r2), MAGIC=magic, MAGIC_VALUE=magic_value, num_warps=blocks_warps(alignment.block_m))
    return rows
