"""A grouped low-rank product for the experts' correction: `out[p] (+)= s_p * W_e x[src(p)]`
for every (token, routed expert) pair p, W_e the pair's expert's factor. This is the path for
batches past moe_marlin.FUSED_MAX_PAIRS pairs (0 as shipped: every batch), where experts
receive several pairs each and tensor-core tiles pay for the sorting and the extra launches;
below it kernels/moe_fused_triton.py runs (no sorting, three launches, vector products).

vLLM's Marlin MoE GEMMs write one row per pair, `p = token * top_k + k` (the rows of its
`intermediate_cache1`, and of the w2 output before the top-k sum). This kernel walks the pairs
in the order `moe_align_block_size` sorts them: blocks of BLOCK_ROWS pairs that all belong to
one expert (padding entries hold the pair count and are skipped), so each program loads a tile
of its expert's factor once and multiplies it with up to BLOCK_ROWS pairs on the tensor cores,
in tiles of BLOCK_M rows (Marlin's blocks of 8 and 48 fill 16 and 64).
The same launch serves every step of the correction (vllm_glowq/moe_marlin.py):

* w13 expand: x = R = B13 x_t [T, r] (one row per token, `row_div = top_k`), W = A13 [E, 2I, r],
  accumulated into the w13 output before the activation;
* w2 shrink: x = h [P, I] (the activation's output), W = B2 [E, r, I], into S [P, r];
* w2 expand: x = S, W = A2 [E, H, r], scaled by the pair's router weight and accumulated into
  the w2 output before the top-k sum;
* `--share module` checkpoints: the w13 shrink too, x = x_t, W = B13 [E, 2r, H].

A13, B2 and A2 may be int8 codes with one float32 scale per row (VLLM_GLOWQ_MOE_FACTORS=int8,
moe_marlin.ExpertFactors.to_int8): half the bytes these launches read beside Marlin's GEMMs;
the codes are converted to the activation dtype (exactly) and the scales applied after the dot.

Like kernels/lowrank_triton.py it uses only Triton builtins (`tl.full`, integer division), so
Triton's interpreter runs it on a CPU for the tests; the grid depends only on tensor shapes
and the valid block count is read on the device, so CUDA graphs capture one launch per batch
size. `align_reference` is a plain-torch copy of the alignment's layout for those tests.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_pairs", "stride_slice"])  # one compiled kernel for every token count
def _grouped_lowrank_kernel(x_ptr, w_ptr, out_ptr, scale_ptr, w_scale_ptr, sorted_ptr, expert_ptr, padded_ptr,
                            num_pairs, N, K, ROW_DIV, stride_xm, stride_we, stride_wn, stride_om, x_slices,
                            stride_slice, stride_wse, ACCUMULATE: tl.constexpr, HAS_SCALE: tl.constexpr,
                            W_INT8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_ROWS: tl.constexpr,
                            BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TILES: tl.constexpr,
                            ONE_K_BLOCK: tl.constexpr):
    """One block of an expert's pairs (BLOCK_ROWS of them, in a tile of BLOCK_M rows) and TILES
    consecutive tiles of BLOCK_N output columns. With ONE_K_BLOCK (K <= BLOCK_K: the expands,
    whose K is the rank) x is loaded, and its slices summed, once for all the program's tiles.
    With W_INT8 the factor holds int8 codes, multiplied in the output's dtype and scaled per
    output column (w_scale [E, N], float32) after the dot."""
    block = tl.program_id(0)
    expert = tl.load(expert_ptr + block)
    # blocks past the padded pair count hold stale ids; an expert of -1 is not on this rank
    if (block * BLOCK_ROWS < tl.load(padded_ptr)) & (expert >= 0):
        pairs = _block_pairs(sorted_ptr, block, num_pairs, BLOCK_M, BLOCK_ROWS)
        valid = pairs < num_pairs
        rows = tl.where(valid, pairs // ROW_DIV, 0).to(tl.int64)
        safe = tl.where(valid, pairs, 0).to(tl.int64)
        w_base = w_ptr + expert.to(tl.int64) * stride_we
        if HAS_SCALE:
            scale = tl.load(scale_ptr + pairs, mask=valid, other=0.0).to(tl.float32)
        if ONE_K_BLOCK:
            x_once = _summed_x(x_ptr, rows, valid, 0, K, stride_xm, x_slices, stride_slice, BLOCK_K)
        for t in range(TILES):
            offs_n = (tl.program_id(1) * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
            if ONE_K_BLOCK:  # no K loop: fewer registers (sm_90, 8 tiles: 128 a thread, 167 with the loop)
                offs_k = tl.arange(0, BLOCK_K)
                w_t = _factor_tile(w_base, offs_n, offs_k, N, K, stride_wn, out_ptr, W_INT8)
                acc = tl.dot(x_once.to(w_t.dtype), w_t)
            else:
                acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    offs_k = k0 + tl.arange(0, BLOCK_K)
                    x = _summed_x(x_ptr, rows, valid, k0, K, stride_xm, x_slices, stride_slice, BLOCK_K)
                    w_t = _factor_tile(w_base, offs_n, offs_k, N, K, stride_wn, out_ptr, W_INT8)
                    acc = tl.dot(x.to(w_t.dtype), w_t, acc)
            if W_INT8:
                acc = acc * _column_scales(w_scale_ptr, expert, stride_wse, offs_n, N)[None, :]
            if HAS_SCALE:
                acc = acc * scale[:, None]
            out_ptrs = out_ptr + safe[:, None] * stride_om + offs_n[None, :]
            mask = valid[:, None] & (offs_n[None, :] < N)
            if ACCUMULATE:
                acc += tl.load(out_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _factor_tile(w_base, offs_n, offs_k, N, K, stride_wn, out_ptr, W_INT8: tl.constexpr):
    """A [BLOCK_K, BLOCK_N] tile of one expert's factor [N, K]; int8 codes (W_INT8) converted to
    the output's dtype (exact: |code| <= 127), their scales applied after the dot."""
    w_t = tl.load(w_base + offs_n[None, :] * stride_wn + offs_k[:, None],
                  mask=(offs_n[None, :] < N) & (offs_k[:, None] < K), other=0)
    if W_INT8:
        w_t = w_t.to(out_ptr.dtype.element_ty)
    return w_t


@triton.jit
def _column_scales(scale_ptr, expert, stride_se, offs, count):
    """One expert's float32 scales of an int8 factor at `offs` (zero past `count`)."""
    return tl.load(scale_ptr + expert.to(tl.int64) * stride_se + offs, mask=offs < count, other=0.0)


@triton.jit
def _block_pairs(sorted_ptr, block, num_pairs, BLOCK_M: tl.constexpr, BLOCK_ROWS: tl.constexpr):
    """The pair ids of one aligned block, BLOCK_ROWS of them in a tile of BLOCK_M rows (tl.dot
    takes 16 rows at least; Marlin's blocks of 8 or 48 fill part of a tile): the rows past
    BLOCK_ROWS and the block's padding hold `num_pairs`, which no valid pair has."""
    offs = tl.arange(0, BLOCK_M)
    return tl.load(sorted_ptr + block * BLOCK_ROWS + offs, mask=offs < BLOCK_ROWS, other=num_pairs)


@triton.jit
def _summed_x(x_ptr, rows, valid, k0, K, stride_xm, x_slices, stride_slice, BLOCK_K: tl.constexpr):
    """The block's rows of x on [k0, k0 + BLOCK_K), summed over x's slices (`activate`'s
    partials of S = B2_e h: one slice per chunk of I)."""
    offs_k = k0 + tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]
    x_mask = valid[:, None] & (offs_k[None, :] < K)
    x = tl.load(x_ptrs, mask=x_mask, other=0.0)
    for c in range(1, x_slices):
        x += tl.load(x_ptrs + c * stride_slice, mask=x_mask, other=0.0)
    return x


@triton.jit(do_not_specialize=["num_pairs"])
def _grouped_activate_kernel(w13_ptr, r_ptr, a13_ptr, b2_ptr, h_ptr, part_ptr, add_ptr, a13_scale_ptr, b2_scale_ptr,
                             sorted_ptr, expert_ptr, padded_ptr, num_pairs, I, R13, R2, R2_OUT, ROW_DIV, stride_w13,
                             stride_r, stride_a13e, stride_b2e, stride_h, stride_add, stride_part, stride_part_slice,
                             stride_a13se, stride_b2se, HAS13: tl.constexpr, HAS2: tl.constexpr,
                             ADDED: tl.constexpr, INT8: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_ROWS: tl.constexpr, BLOCK_I: tl.constexpr, CHUNKS: tl.constexpr,
                             BLOCK_R13: tl.constexpr, BLOCK_R2: tl.constexpr):
    """One (block of an expert's pairs, CHUNKS consecutive chunks of BLOCK_I columns of I): per
    chunk, gate/up = w13_out + A13_e R (HAS13) or + the pair's row of add_ptr [P, 2I] (ADDED:
    the product made beforehand, beside Marlin's GEMM), rounded as the w13 output would hold
    them, h = SiLU(gate) * up rounded as vLLM's `silu_and_mul` rounds; with HAS2 the chunks'
    partial S = B2_e h summed into the program's own slice of part_ptr (R2_OUT columns per pair
    row, zero past R2; rows stride_part apart, slices stride_part_slice): float32 partials
    [programs along I, P, R2] with no atomics, so nothing to zero and the same sums every run,
    or with one program along I the whole S in the activation dtype, written beside h (the
    folded path's w2 input [P, I + R2_OUT]). R is loaded once for all the chunks. With INT8,
    A13 and B2 hold int8 codes scaled per output row (a13_scale [E, 2I], b2_scale [E, R2])."""
    block = tl.program_id(0)
    expert = tl.load(expert_ptr + block)
    if (block * BLOCK_ROWS < tl.load(padded_ptr)) & (expert >= 0):
        dtype = h_ptr.dtype.element_ty
        pairs = _block_pairs(sorted_ptr, block, num_pairs, BLOCK_M, BLOCK_ROWS)
        valid = pairs < num_pairs
        safe = tl.where(valid, pairs, 0).to(tl.int64)
        offs_r = tl.arange(0, BLOCK_R13)
        if HAS13:
            sources = tl.where(valid, pairs // ROW_DIV, 0).to(tl.int64)
            reduced = tl.load(r_ptr + sources[:, None] * stride_r + offs_r[None, :],
                              mask=valid[:, None] & (offs_r[None, :] < R13), other=0.0)
        offs_s = tl.arange(0, BLOCK_R2)
        summed = tl.full((BLOCK_M, BLOCK_R2), 0.0, tl.float32)
        for c in range(CHUNKS):
            offs_i = (tl.program_id(1) * CHUNKS + c) * BLOCK_I + tl.arange(0, BLOCK_I)
            mask = valid[:, None] & (offs_i[None, :] < I)
            rows = w13_ptr + safe[:, None] * stride_w13 + offs_i[None, :]
            gate = tl.load(rows, mask=mask, other=0.0).to(tl.float32)
            up = tl.load(rows + I, mask=mask, other=0.0).to(tl.float32)
            if HAS13:
                a13_t = a13_ptr + expert.to(tl.int64) * stride_a13e + offs_i[None, :] * R13 + offs_r[:, None]
                a_mask = (offs_r[:, None] < R13) & (offs_i[None, :] < I)
                gate_fix = tl.dot(reduced, tl.load(a13_t, mask=a_mask, other=0).to(reduced.dtype))
                up_fix = tl.dot(reduced, tl.load(a13_t + I * R13, mask=a_mask, other=0).to(reduced.dtype))
                if INT8:
                    gate_fix *= _column_scales(a13_scale_ptr, expert, stride_a13se, offs_i, I)[None, :]
                    up_fix *= _column_scales(a13_scale_ptr + I, expert, stride_a13se, offs_i, I)[None, :]
                gate += gate_fix
                up += up_fix
            if ADDED:
                added = add_ptr + safe[:, None] * stride_add + offs_i[None, :]
                gate += tl.load(added, mask=mask, other=0.0).to(tl.float32)
                up += tl.load(added + I, mask=mask, other=0.0).to(tl.float32)
            if HAS13 or ADDED:
                gate = gate.to(dtype).to(tl.float32)
                up = up.to(dtype).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
            hidden = (silu * up).to(dtype)  # zero on masked rows and columns
            tl.store(h_ptr + safe[:, None] * stride_h + offs_i[None, :], hidden, mask=mask)
            if HAS2:
                b2_t = tl.load(b2_ptr + expert.to(tl.int64) * stride_b2e + offs_s[None, :] * I + offs_i[:, None],
                               mask=(offs_i[:, None] < I) & (offs_s[None, :] < R2), other=0)
                summed = tl.dot(hidden, b2_t.to(dtype), summed)
        if HAS2:
            if INT8:
                summed *= _column_scales(b2_scale_ptr, expert, stride_b2se, offs_s, R2)[None, :]
            slots = part_ptr + tl.program_id(1) * stride_part_slice + safe[:, None] * stride_part + offs_s[None, :]
            tl.store(slots, summed.to(part_ptr.dtype.element_ty), mask=valid[:, None] & (offs_s[None, :] < R2_OUT))


@triton.jit(do_not_specialize=["H"])
def _sum_topk_kernel(rows_ptr, extra_ptr, out_ptr, H, stride_rt, stride_rk, stride_et, stride_ek, stride_out,
                     TOP_K: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[t] = sum over k of rows[t, k] + extra[t, k], for BLOCK_H columns of one token
    (float32 sums, rounded once)."""
    token = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    mask = offs < H
    acc = tl.full((BLOCK_H,), 0.0, tl.float32)
    for k in range(TOP_K):
        acc += tl.load(rows_ptr + token * stride_rt + k * stride_rk + offs, mask=mask, other=0.0).to(tl.float32)
        acc += tl.load(extra_ptr + token * stride_et + k * stride_ek + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + token * stride_out + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@dataclass(frozen=True)
class Alignment:
    """Pairs sorted by expert in blocks of `block_m` (vLLM's `moe_align_block_size` layout; any of
    Marlin MoE's block sizes, 8 to 64, or `block_m_for`'s):
    `sorted_ids` [>= padded] pair ids, padding = the pair count; `expert_ids` one expert per
    block; `padded` [1] the number of valid entries of `sorted_ids` (a multiple of block_m)."""

    sorted_ids: torch.Tensor
    expert_ids: torch.Tensor
    padded: torch.Tensor
    block_m: int
    num_pairs: int


def tile_rows(block_m: int) -> int:
    """Rows of the grouped kernels' tiles for aligned blocks of `block_m` pairs: a power of two,
    16 at least (tl.dot's smallest)."""
    return _pow2_between(block_m, 16, 1 << 30)


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Pairs per block where the pairs are sorted for the own kernels (vllm_glowq/moe_triton.py;
    the Marlin path sorts at Marlin's block size): about as many as an expert receives (16 is
    tl.dot's minimum), so decode pads each expert's one or two pairs to 16 rows and prefill
    fills 64-row tiles."""
    per_expert = num_pairs / max(1, num_experts)
    for block in (16, 32):
        if per_expert <= block:
            return block
    return 64


# Launch constants of the grouped kernels, as the H100 ran them (bench/moe_microbench.py
# --grouped-sweep times others): output columns per tile of `launch`; columns of I per chunk of
# `activate` and chunks per program (more chunks per program: fewer programs, R loaded once for
# them, fewer partial slices for the w2 expand to sum, and a loop the compiler can pipeline).
PRODUCT_BLOCK_N = 64
ACTIVATE_BLOCK_I = 64
ACTIVATE_CHUNKS = 1
GROUPED_WARPS: int | None = None  # None: `warps_for`'s rule
# programs per SM that `launch` keeps at least, where it can, when it gives each program several
# column tiles (2.2x faster than one tile per program at 256 tokens on the H100: 32.5 against
# 72.6 us, bench/results/moe_micro_h100_2026-12-07_run2.json; other values untimed)
PROGRAMS_PER_SM = 4


def launch(x: torch.Tensor, weight: torch.Tensor, out: torch.Tensor, alignment: Alignment, row_div: int = 1,
           scale: torch.Tensor | None = None, accumulate: bool = False, block_n: int | None = None,
           weight_scale: torch.Tensor | None = None) -> None:
    """out[p, :N] (+)= scale[p] * weight[e_p] @ x[p // row_div] for every pair p.

    x [rows, K] (rows = pairs / row_div), or [slices, rows, K] whose slices are summed first
    (`activate`'s partials); weight [E, N, K], out [pairs, >= N], all with unit stride in their
    last dimension; scale [pairs] (float32, the router weights) or None; weight_scale [E, N]
    (float32) for int8 weight codes (`weight[e, n] * weight_scale[e, n]` is the factor).
    """
    slices, x = (x.shape[0], x) if x.dim() == 3 else (1, x.unsqueeze(0))
    _, n, k = weight.shape
    if x.stride(-1) != 1 or weight.stride(-1) != 1 or out.stride(-1) != 1 or weight.stride(1) != k:
        raise ValueError("grouped_lowrank needs row-major x, weight and out")
    _check_int8(weight, weight_scale)
    if block_n is None:
        block_n = _pow2_between(n, 16, PRODUCT_BLOCK_N)
    block_k = _pow2_between(k, 16, 64)
    blocks = alignment.expert_ids.numel()
    n_tiles = triton.cdiv(n, block_n)
    tiles = tiles_for(alignment, n_tiles, weight.shape[0], out.device)
    _grouped_lowrank_kernel[(blocks, triton.cdiv(n_tiles, tiles))](
        x, weight, out, out if scale is None else scale, out if weight_scale is None else weight_scale,
        alignment.sorted_ids, alignment.expert_ids, alignment.padded, alignment.num_pairs, n, k, row_div, x.stride(1),
        weight.stride(0), weight.stride(1), out.stride(0), slices, x.stride(0),
        0 if weight_scale is None else weight_scale.stride(0), ACCUMULATE=accumulate, HAS_SCALE=scale is not None,
        W_INT8=weight_scale is not None, BLOCK_M=tile_rows(alignment.block_m), BLOCK_ROWS=alignment.block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, TILES=tiles, ONE_K_BLOCK=k <= block_k,
        num_warps=warps_for(tile_rows(alignment.block_m)))


def _check_int8(weight: torch.Tensor | None, weight_scale: torch.Tensor | None) -> None:
    """int8 factor codes come with their float32 scales [E, N] (unit stride), and only they do."""
    if weight is None:
        return
    if (weight.dtype == torch.int8) != (weight_scale is not None):
        raise ValueError("int8 factor codes need their scales, and only int8 codes take scales")
    if weight_scale is not None and (weight_scale.dtype != torch.float32 or weight_scale.shape != weight.shape[:2]
                                     or weight_scale.stride(-1) != 1):
        raise ValueError(f"an int8 factor {tuple(weight.shape)} takes float32 scales of shape "
                         f"{tuple(weight.shape[:2])}, not {weight_scale.dtype} {tuple(weight_scale.shape)}")


def tiles_for(alignment: Alignment, n_tiles: int, num_experts: int, device: torch.device) -> int:
    """`launch`'s column tiles per program: `tiles_per_program` for the blocks that hold pairs
    (at most one partial block per expert besides the full ones)."""
    busy = min(alignment.expert_ids.numel(),
               alignment.num_pairs // alignment.block_m + min(alignment.num_pairs, num_experts))
    return tiles_per_program(busy, n_tiles, _sm_count(device))


def tiles_per_program(blocks: int, n_tiles: int, sm_count: int) -> int:
    """Column tiles per program of the grouped product: a power of two (each one a compiled
    variant), as many as keep PROGRAMS_PER_SM programs per SM for `blocks` busy blocks of pairs
    (so decode keeps one tile per program).

    One tile per program repeated, for every tile, the load of the block's x and the sum of its
    slices: at the w2 expand, x is the 12 float32 partials of S per pair (one per 64 rows of
    I), so at 256 tokens (2048 pairs, about 250 blocks, 32 tiles of the hidden size) that was
    about 390 MB of L2 reads for a launch that writes 8 MB; on the H100 it took 71.8 us against
    Marlin MoE's 196.6 for both GEMMs (bench/results/moe_micro_h100_2026-12-07.json)."""
    tiles = 1
    while tiles * 2 <= n_tiles and blocks * triton.cdiv(n_tiles, tiles * 2) >= PROGRAMS_PER_SM * sm_count:
        tiles *= 2
    return tiles


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    """SMs of a CUDA device; on a CPU (Triton's interpreter in the tests) an H100's 132."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def activate(w13_out: torch.Tensor, reduced: torch.Tensor | None, a13: torch.Tensor | None,
             b2: torch.Tensor | None, alignment: Alignment, hidden: torch.Tensor, row_div: int,
             added: torch.Tensor | None = None, a13_scale: torch.Tensor | None = None,
             b2_scale: torch.Tensor | None = None) -> torch.Tensor | None:
    """hidden[p] = SiLU(gate) * up of w13_out[p] [P, 2I] + a13[e_p] @ reduced[p // row_div]
    (a13 [E, 2I, r13] or None) or + added[p] (added [P, 2I]: that product made beforehand; not
    with a13), and with b2 [E, r2, I] the partials [slices, P, r2] (float32, one slice per
    ACTIVATE_CHUNKS chunks of ACTIVATE_BLOCK_I columns of I) of b2[e_p] @ hidden[p] whose sum
    `launch` takes as its x (None without b2): the w13 expand, the activation and the w2 shrink
    in one launch. a13_scale [E, 2I] and b2_scale [E, r2] (float32) go with int8 factor codes
    (`launch`'s weight_scale; both factors int8, or neither)."""
    pairs, inter = hidden.shape
    if added is not None and a13 is not None:
        raise ValueError("the grouped MoE activation adds either A13 R or a product made beforehand, not both")
    block_i = _pow2_between(inter, 16, ACTIVATE_BLOCK_I)
    per_program = min(ACTIVATE_CHUNKS, triton.cdiv(inter, block_i))
    slices = triton.cdiv(inter, block_i * per_program)
    r2 = 1 if b2 is None else b2.shape[1]
    partials = None if b2 is None else torch.empty((slices, pairs, r2), dtype=torch.float32, device=hidden.device)
    _activate(w13_out, reduced, a13, b2, alignment, hidden, row_div, added, partials, r2, block_i, per_program,
              a13_scale, b2_scale)
    return partials


def activate_folded(w13_out: torch.Tensor, b2: torch.Tensor | None, alignment: Alignment,
                    hidden: torch.Tensor) -> None:
    """The folded path's w2 input (vllm_glowq/moe_fold.py): hidden [P, I + R2] gets
    h = SiLU(gate) * up of w13_out [P, 2I] in its first I columns and, with b2 [E, r2, I],
    S = b2[e_p] @ h in the last R2 (zero past r2), in the activation dtype: one program along I
    per block of pairs, which sums S in registers over all of I."""
    inter = w13_out.shape[1] // 2
    block_i = _pow2_between(inter, 16, ACTIVATE_BLOCK_I)
    chunks = triton.cdiv(inter, block_i)
    if b2 is None:
        _activate(w13_out, None, None, None, alignment, hidden, 1, None, None, 1, block_i, chunks)
        return
    _activate(w13_out, None, None, b2, alignment, hidden[:, :inter], 1, None, hidden[:, inter:],
              hidden.shape[1] - inter, block_i, chunks)


def _activate(w13_out, reduced, a13, b2, alignment: Alignment, hidden: torch.Tensor, row_div: int, added, part,
              r2_out: int, block_i: int, per_program: int, a13_scale=None, b2_scale=None) -> None:
    """One `_grouped_activate_kernel` launch: `part` [slices, P, >= r2_out] (float32 partials) or
    [P, >= r2_out] (one slice, beside h), written r2_out columns per pair."""
    pairs, inter = hidden.shape
    if any(t is not None and t.stride(-1) != 1 for t in (w13_out, reduced, hidden, added, part)) or \
            any(t is not None and not t.is_contiguous() for t in (a13, b2)):
        raise ValueError("the grouped MoE activation needs row-major activations and contiguous factors")
    _check_int8(a13, a13_scale)
    _check_int8(b2, b2_scale)
    kinds = {t.dtype == torch.int8 for t in (a13, b2) if t is not None}
    if len(kinds) > 1:
        raise ValueError("the grouped MoE activation takes A13 and B2 both in int8 or both in the activation dtype")
    int8 = kinds == {True}
    r13 = 1 if a13 is None else a13.shape[2]
    r2 = 1 if b2 is None else b2.shape[1]
    slices = triton.cdiv(inter, block_i * per_program)
    sliced = part is not None and part.dim() == 3
    _grouped_activate_kernel[(alignment.expert_ids.numel(), slices)](
        w13_out, w13_out if reduced is None else reduced, w13_out if a13 is None else a13,
        w13_out if b2 is None else b2, hidden, hidden if part is None else part,
        w13_out if added is None else added, w13_out if a13_scale is None else a13_scale,
        w13_out if b2_scale is None else b2_scale, alignment.sorted_ids, alignment.expert_ids, alignment.padded,
        alignment.num_pairs, inter, r13, r2, r2_out, row_div, w13_out.stride(0),
        0 if reduced is None else reduced.stride(0), 0 if a13 is None else a13.stride(0),
        0 if b2 is None else b2.stride(0), hidden.stride(0), 0 if added is None else added.stride(0),
        0 if part is None else part.stride(-2), part.stride(0) if sliced else 0,
        0 if a13_scale is None else a13_scale.stride(0), 0 if b2_scale is None else b2_scale.stride(0),
        HAS13=a13 is not None, HAS2=b2 is not None, ADDED=added is not None, INT8=int8,
        BLOCK_M=tile_rows(alignment.block_m), BLOCK_ROWS=alignment.block_m, BLOCK_I=block_i, CHUNKS=per_program,
        BLOCK_R13=_pow2_between(r13, 16, 1 << 30), BLOCK_R2=_pow2_between(r2_out, 16, 1 << 30),
        num_warps=warps_for(tile_rows(alignment.block_m)))


SUM_BLOCK_H = 1024  # columns per program of `sum_topk`


def sum_topk(rows: torch.Tensor, extra: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [T, H] = the sum over top_k of rows [T, top_k, H] + extra [T, top_k, H] in one
    launch (Marlin's w2 rows and the w2 correction's, each pair's own): what stays in series of
    the w2 correction run beside Marlin's GEMM."""
    tokens, top_k, hidden = rows.shape
    if rows.stride(-1) != 1 or extra.stride(-1) != 1 or out.stride(-1) != 1 or extra.shape != rows.shape:
        raise ValueError("sum_topk needs [T, top_k, H] rows and extra with unit stride along H")
    block_h = _pow2_between(hidden, 16, SUM_BLOCK_H)
    _sum_topk_kernel[(tokens, triton.cdiv(hidden, block_h))](
        rows, extra, out, hidden, rows.stride(0), rows.stride(1), extra.stride(0), extra.stride(1), out.stride(0),
        TOP_K=top_k, BLOCK_H=block_h, num_warps=4)
    return out


def warps_for(block_m: int) -> int:
    """Warps per program of both grouped kernels for tiles of `block_m` rows: GROUPED_WARPS where
    set, else 4 up to 32 rows and 8 at 64. That rule came from sm_90 compiles without the
    launcher's alignment facts, which reported 130-254 registers and spills at 4 warps past 32
    rows; compiled as the launcher specializes them (tests/test_moe_marlin.py's compile tests
    now do), both kernels take 40-117 registers at 4 warps on every tile and spill nowhere, so
    the rule is a guess for the GPU to settle (bench/moe_microbench.py --grouped-sweep)."""
    if GROUPED_WARPS is not None:
        return GROUPED_WARPS
    return 4 if block_m <= 32 else 8


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(1, value))))


def align_reference(topk_ids: torch.Tensor, block_m: int, num_experts: int) -> Alignment:
    """vLLM's `moe_align_block_size` layout computed in torch (for the tests and Triton's CPU
    interpreter; the GPU path calls vLLM's op): each expert's pairs in ascending order, padded
    with the pair count to a multiple of block_m, experts in ascending order."""
    flat = topk_ids.reshape(-1).to(torch.int64)
    pairs = flat.numel()
    ids, experts = [], []
    for e in range(num_experts):
        mine = torch.nonzero(flat == e).flatten()
        if mine.numel() == 0:
            continue
        blocks = -(-mine.numel() // block_m)
        padded = torch.full((blocks * block_m,), pairs, dtype=torch.int64)
        padded[: mine.numel()] = mine
        ids.append(padded)
        experts += [e] * blocks
    count = sum(t.numel() for t in ids)
    # like vLLM's op, leave stale entries past the valid blocks: the kernel must not read them
    tail = 2 * block_m
    sorted_ids = torch.cat([*ids, torch.full((tail,), 10**6, dtype=torch.int64)]).to(torch.int32)
    expert_ids = torch.tensor(experts + [num_experts + 7] * (tail // block_m), dtype=torch.int32)
    return Alignment(sorted_ids.to(topk_ids.device), expert_ids.to(topk_ids.device),
                     torch.tensor([count], dtype=torch.int32, device=topk_ids.device), block_m, pairs)
