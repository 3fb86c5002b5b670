"""GlowQ's expert correction folded into the experts' own int4 GEMMs, at load time (issue 11;
moe_marlin.FOLD_INTO_CODES, off as shipped).

Shared B lets the correction ride inside vLLM's Marlin MoE GEMMs:

    W13_e x + A13_e (B13 x) = [W13_e | A13_e] [x ; R],   R = B13 x, the same for every expert
    W2_e h + A2_e (B2_e h)  = [W2_e | A2_e] [h ; S],     S = B2_e h, per pair

Each expert's codes get r more input rows (A_e^T as int4 codes), the tokens' activations get R
appended (one small GEMM a layer), and the activation's output gets S appended (computed in the
activation's own launch). Marlin then reads A_e with the expert's codes. It was built on the
reading that Marlin MoE's GEMMs leave no room beside them (each program asks for its share of
the SM's whole shared memory, csrc/moe/marlin_moe_wna16/ops.cu), so that a correction made by
kernels of its own could only add its time. The H100 showed otherwise: the grouped correction
on a second stream overlapped them (the microbenchmark's kernel times sum past its wall time),
and that path ran at 0.74 / 0.87 / 0.85 / 0.88x plain int4 MoE per layer at 1 / 16 / 64 / 256
tokens against this one's 0.39 / 0.67 / 0.73 / 0.75x (bench/results/moe_micro_h100_2026-12-07_run3.json).
Marlin took only 8-9% longer with the folded rows; what cost was S's activation launch (one
program per block of pairs over the whole of I: 36-52 us) and R = B13 x with the copy of x in
series (about 6 us). The fold stays as a switch for a faster activation to revisit.

The price is A in int4. Each output row of A_e gets one scale over its rank entries (symmetric,
the clip searched for the least squared error), after the rank components are balanced
(A <- A D^-1, B <- D B, exact in real arithmetic), so that the few large components do not set
the step for the many small ones. The rank rows are padded with zeros to FOLD_RANK_MULTIPLE so K
keeps Marlin's 128-deep tiles (64 lets it run on 64-deep tiles only). The base codes keep their
values; their scales are repeated where the folded layout needs a finer group.

Pure torch in the checkpoint's GPTQ layout: moe_marlin.repack then lays the folded codes out
for Marlin, and the CPU tests check the fold against float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .format import SYM_ZERO_POINT
from .packing import pack_rows

FOLD_RANK_MULTIPLE = 128  # rank rows padded to a multiple of this (Marlin's K tiles are 64 or 128 deep)
_MARLIN_GROUPS = (128, 64, 32)
_CLIPS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)  # fractions of a row's largest |a| its int4 step is fitted to


@dataclass
class FoldedFactors:
    """What stays outside the experts' GEMMs once A13 and A2 are folded into their codes:
    b13 [R13, H] (D13 B13, zero rows up to R13) whose product R = x b13^T fills the last R13
    input columns of the w13 GEMM; b2 [E, r2, I] (D2_e B2_e) whose product S = B2_e h fills
    the last R2 input columns of the w2 GEMM (R2 = r2 padded, the padding zero). None where the
    layer has no such correction."""

    b13: torch.Tensor | None
    b2: torch.Tensor | None
    r2_padded: int = 0


def unfoldable_reason(b13: torch.Tensor | None, a13: torch.Tensor | None, a2: torch.Tensor | None) -> str | None:
    """Why these factors cannot be folded (None when they can): the w13 fold needs one B13 for
    every expert (`--share group`, the default); per-module B makes R expert-specific."""
    if a13 is None and a2 is None:
        return "the layer has no correction"
    if a13 is not None and b13.dim() != 2:
        return "the gate/up correction has one B per expert projection (--share module)"
    return None


def padded_rank(rank: int) -> int:
    return -(-rank // FOLD_RANK_MULTIPLE) * FOLD_RANK_MULTIPLE


def folded_group(k: int, group: int, rows: int) -> int:
    """The one group size of the folded K = k + rows input rows: a Marlin group size that divides
    the base group (or k, channelwise: group -1) and the padded rank rows."""
    base = k if group < 0 else group
    for size in _MARLIN_GROUPS:
        if base % size == 0 and rows % size == 0 and k % size == 0:
            return size
    raise ValueError(f"no Marlin group size divides group {group}, K {k} and {rows} rank rows")


def balance(a: torch.Tensor, b: torch.Tensor, across_experts: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A D^-1 and D B with D the root-mean-square of each rank component of A: over every
    expert where B is shared (a [E, N, r], b [r, K]), per expert otherwise (b [E, r, K])."""
    a, b = a.double(), b.double()
    dims = (0, 1) if across_experts else (1,)
    d = a.pow(2).mean(dim=dims, keepdim=True).sqrt()  # [1, 1, r] or [E, 1, r]
    d = torch.where(d > 0, d, torch.ones_like(d))
    b_scaled = b * (d.view(-1, 1) if across_experts else d.transpose(1, 2))
    return a / d, b_scaled


def quantize_rows(a: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 of each row of a [..., n, r]: codes [..., n, r] in 0..15 (zero point 8) and
    scales [..., n] representable in `dtype`, the clip of each row the one with the least
    squared error among _CLIPS."""
    a = a.double()
    peak = a.abs().amax(dim=-1)
    best_err = torch.full_like(peak, float("inf"))
    best_codes = torch.zeros(a.shape, dtype=torch.uint8, device=a.device)
    best_scales = torch.ones_like(peak)
    for clip in _CLIPS:
        scales = (peak * clip / 7).to(dtype).double()
        scales = torch.where(scales > 0, scales, torch.ones_like(scales))
        q = torch.clamp(torch.round(a / scales[..., None]), -8, 7)
        err = (a - q * scales[..., None]).pow(2).sum(dim=-1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scales = torch.where(better, scales, best_scales)
        best_codes = torch.where(better[..., None], (q + SYM_ZERO_POINT).to(torch.uint8), best_codes)
    return best_codes, best_scales.to(dtype)


def fold_codes(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, a: torch.Tensor,
               rows: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One projection's codes with A appended as `rows` more input rows (zero past A's rank).

    qweight [E, K/8, N] int32 (GPTQ), scales [E, K/g, N], zeros [E, K/g, N] uint8 or None,
    a [E, N, r] -> the same three for K + rows input rows in one group size (folded_group),
    scales in `dtype`."""
    experts, k, n, rank = qweight.shape[0], qweight.shape[1] * 8, qweight.shape[2], a.shape[2]
    group = folded_group(k, k // scales.shape[1], rows)
    repeat = k // scales.shape[1] // group
    codes, row_scales = quantize_rows(a, dtype)  # [E, N, r], [E, N]
    padded = torch.full((experts, rows, n), SYM_ZERO_POINT, dtype=torch.uint8, device=a.device)
    padded[:, :rank] = codes.transpose(1, 2)
    folded_q = torch.cat([qweight, torch.stack([pack_rows(c) for c in padded])], dim=1)
    folded_s = torch.cat([scales.to(dtype).repeat_interleave(repeat, dim=1),
                          row_scales[:, None, :].expand(experts, rows // group, n)], dim=1).contiguous()
    folded_z = None
    if zeros is not None:
        rank_zeros = torch.full((experts, rows // group, n), SYM_ZERO_POINT, dtype=zeros.dtype, device=zeros.device)
        folded_z = torch.cat([zeros.repeat_interleave(repeat, dim=1), rank_zeros], dim=1).contiguous()
    return folded_q, folded_s, folded_z


def fold(w13: tuple, w2: tuple, b13: torch.Tensor | None, a13: torch.Tensor | None, b2: torch.Tensor | None,
         a2: torch.Tensor | None, dtype: torch.dtype) -> tuple[tuple, tuple, FoldedFactors]:
    """w13 and w2 as (qweight, scales, zeros) in the GPTQ layout, with their corrections folded
    in where the layer has them (unfoldable_reason must be None), and what stays outside."""
    folded_b13 = folded_b2 = None
    rows2 = 0
    if a13 is not None:
        a, b = balance(a13, b13, across_experts=True)
        rows = padded_rank(b.shape[0])
        w13 = fold_codes(*w13, a, rows, dtype)
        folded_b13 = torch.zeros(rows, b.shape[1], dtype=dtype, device=b.device)
        folded_b13[: b.shape[0]] = b.to(dtype)
    if a2 is not None:
        a, b = balance(a2, b2, across_experts=False)
        rows2 = padded_rank(b.shape[1])
        w2 = fold_codes(*w2, a, rows2, dtype)
        folded_b2 = b.to(dtype).contiguous()
    return w13, w2, FoldedFactors(folded_b13, folded_b2, rows2)
