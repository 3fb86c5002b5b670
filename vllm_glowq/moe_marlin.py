"""GlowQ experts on CUDA GPUs: vLLM's WNA16 Marlin MoE GEMMs on the checkpoint's int4 codes,
with the correction folded into those GEMMs or added by Triton kernels of the project's own.

With FOLD_INTO_CODES (off as shipped: slower on the H100), layers whose gate/up correction
shares one B13 run `folded_forward` instead: A13 and A2 folded into the codes at load time
(vllm_glowq/moe_fold.py), so Marlin's two GEMMs compute the correction from x with R = B13 x
appended and h with S = B2_e h appended.

Why this split. vLLM's `fused_marlin_moe` (experts/marlin_moe.py, a public function in every
supported version) runs the whole expert block: it sorts the (token, expert) pairs by expert
(`moe_align_block_size`), runs the w13 GEMM into one row per pair, calls its `activation_func`
callback on that output, runs the w2 GEMM (which multiplies each pair's row by its router
weight) and calls its `moe_sum` callback to add each token's top-k rows. Those two callbacks are
exactly where the correction belongs, and they are the hooks vLLM's own MoE LoRA uses on Marlin
(`activation_with_lora`, `moe_sum_with_lora`). Both vLLM 0.26 and 0.32 call
`moe_sum(w2_out [T, top_k, H], output [T, H], topk_ids, expert_map)` and return what it returns.

The grouped path (`CorrectionHooks`, kernels/moe_lowrank_triton.py) runs Marlin MoE's GEMMs with:

* before them, R = B13 x once per token ([T, r], one cuBLAS GEMM on a second stream, overlapping
  the sort and the w13 GEMM; joined before `activation_func` reads it): never per pair, which is
  the point of sharing B; and the pairs sorted by expert (vLLM's `moe_align_block_size` at
  Marlin's own block size, handed to Marlin through compat.marlin_moe_sorted, so the pairs are
  sorted once; the grouped kernels run blocks of 8 in tiles of 16 rows, as `tl.dot` needs);
* `activation_func`: one grouped launch per (block of an expert's pairs, chunk of I): for
  every pair p = (t, e), gate/up = w13_out[p] + A13_e R[t], h = SiLU(gate) * up (the gated
  SiLU, the one activation vllm_glowq/moe.py admits), and the chunk's share of S[p] = B2_e h[p];
* `moe_sum`: w2_out[p] += w_p A2_e S[p] (one grouped launch, w_p the router weight Marlin
  already applied to w2_out), then the top-k sum as usual.

That is two launches on the critical path besides Marlin's own and the sum, and R beside them
(seven launches in series on the first H200 run, when a decode step cost 0.72x plain int4 MoE
at one token, ~39 us per layer; five on the H100's second run, 0.91x; ONE_SORT and
R_ON_SIDE_STREAM switch back to that). As shipped (CORRECTION_BESIDE, `BesideCorrectionHooks`)
the same products run on the second stream beside Marlin's GEMMs instead: A13_e R for every
pair beside the w13 GEMM, the w2 shrink and expand beside the w2 GEMM; in series stay the
activation's launch, which adds A13_e R, and the top-k sum, which adds the w2 correction. Up to
FUSED_MAX_PAIRS pairs, `takes_fused_path`, the fused path (`FusedCorrectionHooks`,
kernels/moe_fused_triton.py) needs no sorting and three launches: R = B13 x (in series); in
`activation_func` one kernel per (pair, chunk of I) adds A13_e R, applies SiLU-and-mul and
computes the chunk's share of S = B2_e h; in `moe_sum` one
kernel per token adds w_p A2_e S[p] to each w2_out row inside the top-k sum. It multiplies
vectors, not tiles, so larger batches, where pairs share experts, keep the grouped path. With
`--share module` both paths compute R per pair (on the fused path one more launch, no sorting).

The alternatives were worse: calling the Marlin GEMM op (`moe_wna16_marlin_gemm`) directly means
re-implementing vLLM's workspaces and activation plumbing, which changed between 0.26 and 0.32
(the grouped path calls the body of `fused_marlin_moe` after its sort, `_fused_marlin_moe`,
whose keywords are the same in both, and mirrors only the block-size rule: compat.py);
building a `FusedMoEKernel` around a custom experts class is refused by
`make_wna16_moe_kernel` (it checks the class against a list) and its prepare/finalize adds
nothing without expert parallelism.

Decode steps can skip Marlin MoE altogether where the codes are symmetric (`takes_gemv_path`,
up to GEMV_MAX_PAIRS pairs; off until a GPU has timed it): moe_triton's pairs path, GEMVs of
the project's own that read the very same Marlin-layout codes and scales (`decode_views`) with
the correction inside them, two launches a layer. Marlin MoE's fixed costs are what a decode
step pays most for (31 us per Qwen3-30B-A3B layer at one token on the H200 for 19 MB of codes,
4.6 us at copy bandwidth).

The codes are repacked once at load time (`repack`, vLLM's `gptq_marlin_moe_repack` and scale
and zero-point permutations), replacing the checkpoint layout: one copy of the int4 weights.
Rank 0 (plain int4) layers call `fused_marlin_moe` without callbacks. Everything here runs on
the current CUDA stream with shapes fixed by the token count, so the whole block is captured by
CUDA graphs (the path is chosen from the pair count, fixed per graph); torch.compile sees it
through the `torch.ops.glowq.moe` custom op (vllm_glowq/moe.py). FUSED_MAX_PAIRS comes from
bench/moe_microbench.py on an H200; the kernels' launch shapes are not tuned yet.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import compat
from .moe_fold import FoldedFactors

MARLIN_GROUP_SIZES = (32, 64, 128)  # besides one group per row (channelwise, -1)
# how vLLM's `marlin_permute_scales` orders scales (stored[i] = original[perm[i]]) within chunks
# of 64 columns, or of 32 with one group per column (vLLM's `get_scale_perms`; a CPU test checks
# these against it, so a change in vLLM is caught)
MARLIN_SCALE_PERM = [i + 8 * j for i in range(8) for j in range(8)]
MARLIN_SCALE_PERM_SINGLE = [2 * i + j for i in range(4) for j in (0, 1, 8, 9, 16, 17, 24, 25)]
# (token, expert) pairs up to which the fused correction runs: 0, the grouped path at every batch.
# On the H200 with whole-rank tiles in its kernels the fused path was faster than the grouped one
# up to 8 pairs and as fast at 32 (bench/results/moe_micro_2026-12-02.json, moe_micro.json); on
# the H100 with the rank stepped in a loop it was slower at every count (104.4 against 52.8 us
# per layer at one token) and the engine decoded at 4.55 ms per step at batch 1 with it, 3.18
# without (bench/results/vllm_moe_h100*_2026-12-07.json). Its kernels are back to whole-rank
# tiles (kernels/moe_fused_triton.RANK_BLOCK), untimed: `bench/moe_microbench.py --threshold-sweep`
# prints the count to set here.
FUSED_MAX_PAIRS = 0
# (token, expert) pairs up to which symmetric experts skip Marlin MoE for the project's GEMVs on
# the same codes (moe_triton's pairs path): 0, off. bench/moe_microbench.py times them (`gemv`)
# and prints up to how many pairs they beat Marlin MoE with the fused correction. On their own
# layout plain int4 through them took 20.5 us per Qwen3-30B-A3B layer at one token against
# Marlin MoE's 31.1, 48.4 against 50.4 at 4 tokens (32 pairs), 84.1 against 72.8 at 8 (H200,
# bench/results/moe_micro.json); on Marlin's layout without factors the H100 took 38.1 us
# against Marlin MoE's 32.0 at one token (bench/results/moe_micro_h100_2026-12-07.json).
GEMV_MAX_PAIRS = 0
# The grouped path sorts the pairs once, at Marlin MoE's own block size, and hands that sort to
# Marlin (compat.marlin_moe_sorted) instead of sorting them again at a block size of its own:
# the second sort cost 4.3 us a layer at every batch on the H100 (its two kernels, besides the
# gaps; bench/results/moe_micro_h100_2026-12-07_run2.json). False: the two sorts, as timed there.
# bench/moe_microbench.py times both (`grouped` and `grouped_two_sorts`); not timed yet.
ONE_SORT = True
# The grouped path computes R = B13 x on a second stream (vllm_glowq/correction.start_beside) while
# the sort and Marlin's w13 GEMM run, joining before the activation that reads it, instead of
# in series before them (cuBLAS took 5.0-5.3 us a layer at every batch on the H100, same run).
# bench/moe_microbench.py times both (`grouped` and `grouped_serial_r`); not timed yet.
R_ON_SIDE_STREAM = True
# The grouped path runs its correction on that second stream beside Marlin MoE's two GEMMs
# (BesideCorrectionHooks) rather than inside its callbacks: A13_e R for every pair while the w13
# GEMM runs, the w2 shrink and expand while the w2 GEMM runs. What stays in series is the
# addition of each product inside a launch that runs anyway: the activation's and the top-k
# sum's. In the callbacks, the two grouped launches took 40.6 of the 202 us a layer at 64
# tokens on the H100 (against 149.9 for plain Marlin MoE) where their factors take about 21 us
# to read at its bandwidth (bench/results/moe_micro_h100_2026-12-07_run2.json); beside it they
# share the GPU with Marlin's GEMMs. False: in the callbacks (R_ON_SIDE_STREAM decides where R
# runs). On the H100 beside Marlin ran at 44.4 / 121.9 / 173.3 / 243.9 us a layer at 1 / 16 / 64 /
# 256 tokens, in the callbacks 46.4 / 136.3 / 185.7 / 276.6, plain Marlin MoE 32.9 / 106.1 / 147.6 /
# 215.3 (bench/results/moe_micro_h100_2026-12-07_run3.json; the correction's kernels overlap
# Marlin's: their times sum past the wall time).
CORRECTION_BESIDE = True
# Beside Marlin, the w2 correction's shrink S = B2_e h runs on the second stream too (one grouped
# launch with the rank as its 64 columns: 8 programs at one token, each reading its expert's whole
# B2, 98 KB) or, False, inside the activation's launch (12 programs per block of pairs, the float32
# partials of S summed by the expand), which puts B2's reads in series but shortens the chain
# beside the w2 GEMM. bench/moe_microbench.py times both (`grouped`, `grouped_shrink_in_activation`).
W2_SHRINK_BESIDE = True
# Beside Marlin, R = B13 x (shared B13) is forked before the pairs are sorted, since it does not
# need the sort: at one token the sort (4.5 us) and Marlin's w13 GEMM (about 12 us) were as long
# as the chain R (5.6 us) -> A13_e R (about 5 us) the activation waits for (H100, run3). False:
# R and A13_e R forked together after the sort. bench/moe_microbench.py times both (`grouped`,
# `grouped_r_after_sort`); not timed yet.
R_BEFORE_SORT = True
# Fold the correction into Marlin MoE's GEMMs at load time where the layer's B13 is shared
# (vllm_glowq/moe_fold.py): A13 and A2 become int4 rows of each expert's codes and the tokens'
# activations get R = B13 x and S = B2_e h appended. Off: on the H100 it ran at 0.39 / 0.67 /
# 0.73 / 0.75x plain Marlin MoE per layer at 1 / 16 / 64 / 256 tokens against 0.74 / 0.87 /
# 0.85 / 0.88x for the grouped correction beside Marlin (bench/results/moe_micro_h100_2026-12-07_run3.json):
# Marlin's GEMMs took only 8-9% longer with the extra rows, but the activation that writes S
# (one program per block of pairs over all of I) took 36-52 us, and R = B13 x and the copy of x
# run in series, where the grouped path runs beside Marlin's GEMMs.
FOLD_INTO_CODES = False
# The experts' factors (A13, B2, A2) as int8 codes with one float32 scale per row, made at load
# time (ExpertFactors.to_int8), where VLLM_GLOWQ_MOE_FACTORS is auto: at 64 tokens nearly every
# expert is routed, and the correction beside Marlin reads 68.5 MB of bf16 factors per
# Qwen3-30B-A3B layer against Marlin's 302 MB of codes, slowing Marlin by sharing the GPU's
# bandwidth (128.9 -> 151.7 us on the H100, bench/results/moe_micro_h100_2026-12-07_run3.json).
# Off until a GPU has timed it (bench/moe_microbench.py `grouped_int8`).
FACTORS_INT8 = False


def factors_in_int8() -> bool:
    """Whether the Marlin path holds the experts' factors in int8 (VLLM_GLOWQ_MOE_FACTORS, else FACTORS_INT8)."""
    from .kernel_choice import moe_factor_mode

    mode = moe_factor_mode()
    return FACTORS_INT8 if mode == "auto" else mode == "int8"
_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class Int4Experts:
    """An expert layer's codes in the Marlin MoE layout (from `repack`)."""

    w13: torch.Tensor  # [E, H / 16, 4I] int32
    w2: torch.Tensor  # [E, I / 16, 2H] int32
    scales13: torch.Tensor  # [E, G13, 2I] activation dtype, permuted
    scales2: torch.Tensor  # [E, G2, H]
    zeros13: torch.Tensor | None  # [E, G13, 2I / 8] int32, Marlin's packing; None: symmetric (uint4b8)
    zeros2: torch.Tensor | None
    workspace: torch.Tensor  # Marlin's lock workspace (zeroed; the kernel leaves it zeroed)
    # the same tensors as the project's decode GEMVs read them (`decode_views`; None: asymmetric codes)
    gemv: tuple | None = None  # (w13, w2) moe_triton.ExpertCodes

    @property
    def num_experts(self) -> int:
        return self.w13.shape[0]

    @property
    def quant_type_id(self) -> int:
        return compat.int4_weight_type(sym=self.zeros13 is None).id


@dataclass
class ExpertFactors:
    """The correction of an expert layer in the activation dtype (None where it has none), or
    with `int8` its per-expert factors as int8 codes with float32 scales per output row.

    b13 [r, H] (one B for all experts) or [E, 2r, H] (`--share module`: gate's rows, then up's);
    a13 [E, 2I, r] or [E, 2I, 2r] (block-diagonal); b2 [E, r, I]; a2 [E, H, r]; the scales
    a13_scale [E, 2I], b2_scale [E, r], a2_scale [E, H]. B13 stays in the activation dtype (read
    once per token by cuBLAS, and by a shared expert's gate/up too)."""

    b13: torch.Tensor | None = None
    a13: torch.Tensor | None = None
    b2: torch.Tensor | None = None
    a2: torch.Tensor | None = None
    a13_scale: torch.Tensor | None = None
    b2_scale: torch.Tensor | None = None
    a2_scale: torch.Tensor | None = None

    @property
    def any(self) -> bool:
        return self.a13 is not None or self.a2 is not None

    @property
    def int8(self) -> bool:
        return any(s is not None for s in (self.a13_scale, self.b2_scale, self.a2_scale))

    def to_int8(self) -> ExpertFactors:
        """A13, B2 and A2 as int8 codes, each output row scaled by its largest magnitude / 127
        (FACTORS_INT8: half the bytes the grouped correction reads beside Marlin's GEMMs)."""
        quantized = {}
        for name in ("a13", "b2", "a2"):
            factor = getattr(self, name)
            if factor is not None:
                quantized[name], quantized[f"{name}_scale"] = int8_rows(factor)
        return ExpertFactors(b13=self.b13, **quantized)


def int8_rows(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """factor [E, N, K] -> (int8 codes [E, N, K], float32 scales [E, N]): symmetric, one scale
    per row (codes * scales[..., None] is the factor within half a step)."""
    full = factor.float()
    scales = full.abs().amax(dim=-1) / 127.0
    codes = torch.round(full / scales.clamp_min(torch.finfo(torch.float32).tiny)[..., None])
    return codes.clamp_(-127, 127).to(torch.int8).contiguous(), scales.contiguous()


def marlin_group_size(features: int, groups: int) -> int:
    """The group size Marlin is told for `features` input rows in `groups` scale groups."""
    return -1 if groups == 1 else features // groups


def unsupported_reason(hidden: int, inter_local: int, group_h: int, group_i: int, dtype: torch.dtype) -> str | None:
    """Why the Marlin MoE kernels cannot run these experts (None when they can)."""
    if dtype not in _DTYPES:
        return f"the int4 MoE kernels take bfloat16 or float16 activations, not {dtype} (use --dtype bfloat16)"
    if hidden % 128:
        return f"hidden size {hidden} is not a multiple of 128 (vLLM's Marlin MoE kernels)"
    if inter_local % 64:
        return (f"the expert intermediate size per tensor-parallel rank, {inter_local}, is not a multiple of 64 "
                "(vLLM's Marlin MoE kernels; GlowQ does not pad experts); use a smaller tensor_parallel_size")
    for name, features, group in (("hidden", hidden, group_h), ("expert intermediate", inter_local, group_i)):
        if group < features and group not in MARLIN_GROUP_SIZES:
            return f"group_size={group} along the {name} size (Marlin takes {MARLIN_GROUP_SIZES} or one group per row)"
    return None


def repack(qweight13: torch.Tensor, scales13: torch.Tensor, zeros13: torch.Tensor | None, qweight2: torch.Tensor,
           scales2: torch.Tensor, zeros2: torch.Tensor | None, dtype: torch.dtype) -> Int4Experts:
    """Marlin's layout from the checkpoint's (per rank): qweight [E, K/8, N] int32 (GPTQ
    packing along K), scales [E, K/g, N], zero points [E, K/g, N] unpacked (uint8) or None."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import (
        marlin_make_workspace_new,
        marlin_moe_permute_scales,
    )

    def one(qweight, scales, zeros):
        k, n = qweight.shape[1] * 8, qweight.shape[2]
        group = marlin_group_size(k, scales.shape[1])
        codes = compat.marlin_moe_repack(qweight.contiguous(), size_k=k, size_n=n)
        permuted = marlin_moe_permute_scales(scales.to(dtype).contiguous(), size_k=k, size_n=n, group_size=group)
        return codes, permuted, None if zeros is None else marlin_zero_points(zeros)

    w13, s13, z13 = one(qweight13, scales13, zeros13)
    w2, s2, z2 = one(qweight2, scales2, zeros2)
    int4 = Int4Experts(w13, w2, s13, s2, z13, z2, marlin_make_workspace_new(qweight13.device, 4))
    if z13 is None and z2 is None:
        int4.gemv = decode_views(int4, scales13.shape[1], scales2.shape[1])
    return int4


def decode_views(int4: Int4Experts, groups13: int, groups2: int) -> tuple:
    """The symmetric codes and scales of `int4`, unchanged, as moe_triton's pairs path reads
    them with its Marlin-layout GEMV (kernels/moe_w4a16_triton._marlin_gemv_block_sum): no
    second copy of the experts."""
    from .kernels.moe_w4a16_triton import marlin_scales
    from .kernels.w4a16 import block_k_for
    from .moe_triton import ExpertCodes

    def view(codes: torch.Tensor, scales: torch.Tensor, groups: int):
        k = codes.shape[1] * 16
        group = k // groups
        permutation = MARLIN_SCALE_PERM if groups > 1 else MARLIN_SCALE_PERM_SINGLE
        return ExpertCodes(codes, scales, None, group, block_k_for(k, group),
                           marlin=marlin_scales(permutation, codes.device))

    return view(int4.w13, int4.scales13, groups13), view(int4.w2, int4.scales2, groups2)


def marlin_zero_points(zeros: torch.Tensor) -> torch.Tensor:
    """Raw zero points [E, G, N] (w = (q - z) s) -> Marlin's permuted, packed int32 [E, G, N/8]."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_zero_points as permute

    groups, n = zeros.shape[1:]
    return torch.stack([permute(z.to(torch.int32), groups, n, 4) for z in zeros])


def takes_fused_path(num_pairs: int, factors: ExpertFactors | None = None) -> bool:
    """Whether a call of `num_pairs` (token, expert) pairs runs the fused correction (fewer
    launches, no sorting) rather than the grouped one (tensor cores on pairs sorted by expert);
    int8 factors run the grouped one only."""
    return num_pairs <= FUSED_MAX_PAIRS and not (factors is not None and factors.int8)


def takes_gemv_path(experts: Int4Experts, num_pairs: int, factors: ExpertFactors | None = None) -> bool:
    """Whether a call runs the project's decode GEMVs on the Marlin codes (symmetric codes, up
    to GEMV_MAX_PAIRS pairs, factors in the activation dtype) rather than Marlin MoE's GEMMs."""
    return experts.gemv is not None and num_pairs <= GEMV_MAX_PAIRS and not (factors is not None and factors.int8)


def forward(experts: Int4Experts, factors: ExpertFactors, x: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, activation, fused: bool | None = None) -> torch.Tensor:
    """The routed experts' output [T, H] (router weights applied, top-k summed). `fused` forces
    Marlin MoE with one of the correction's paths (the tests and bench/moe_microbench.py run
    both); None lets `takes_gemv_path` and `takes_fused_path` decide."""
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if fused is None and takes_gemv_path(experts, topk_ids.numel(), factors):
        if not compat.plain_gated_silu(activation, {}):
            raise ValueError(f"the MoE decode GEMVs compute the gated SiLU only, not {activation!r}")
        from .moe_triton import forward as gemv_forward

        return gemv_forward(*experts.gemv, factors, x, topk_weights, topk_ids, path="pairs")
    x = x.contiguous()  # Marlin's requirement (a no-op for vLLM's hidden states)
    topk_weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    if isinstance(factors, FoldedFactors):
        refuse_other_activations(activation, {})
        return folded_forward(experts, factors, x, topk_weights, topk_ids)
    hooks = correction_hooks(factors, x, topk_weights, topk_ids, experts.num_experts, activation, fused)
    common = dict(hidden_states=x, w1=experts.w13, w2=experts.w2, w1_scale=experts.scales13, w2_scale=experts.scales2,
                  w1_zeros=experts.zeros13, w2_zeros=experts.zeros2, topk_weights=topk_weights, topk_ids=topk_ids,
                  quant_type_id=experts.quant_type_id, activation=activation, workspace=experts.workspace)
    if isinstance(hooks, CorrectionHooks) and hooks.marlins_sort:
        w2_out = compat.marlin_moe_sorted(hooks.alignment, activation_func=hooks.activation, **common)
        return hooks.moe_sum(w2_out, torch.empty_like(x), topk_ids, None)
    return compat.fused_marlin_moe(
        global_num_experts=experts.num_experts, activation_func=None if hooks is None else hooks.activation,
        moe_sum=None if hooks is None or factors.a2 is None else hooks.moe_sum, **common)


def folded_forward(experts: Int4Experts, factors: FoldedFactors, x: torch.Tensor, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor, gemm: Callable | None = None, align: Callable | None = None,
                   kernels=None) -> torch.Tensor:
    """The routed experts' output [T, H] with the correction folded into the codes
    (vllm_glowq/moe_fold.py): the pairs sorted once, x with R = B13 x appended, Marlin's w13
    GEMM, one launch for SiLU-and-mul with S = B2_e h appended, Marlin's w2 GEMM (router
    weights applied), the top-k sum; x contiguous and topk_weights float32, as `forward` hands
    them. `gemm`, `align` and `kernels` default to vLLM's ops and kernels/moe_lowrank_triton.py;
    the CPU tests pass stand-ins and the interpreter."""
    if kernels is None:
        from .kernels import moe_lowrank_triton as kernels
    gemm, align = gemm or compat.marlin_moe_gemm, align or compat.moe_align
    tokens, hidden = x.shape
    top_k, pairs = topk_ids.shape[1], topk_ids.numel()
    inter = experts.scales13.shape[2] // 2
    block_m = compat.marlin_moe_block_size(tokens, top_k, experts.num_experts)
    alignment = align(topk_ids, block_m, experts.num_experts)
    if factors.b13 is not None:
        widened = x.new_empty((tokens, hidden + factors.b13.shape[0]))
        widened[:, :hidden].copy_(x)
        torch.mm(x, factors.b13.t(), out=widened[:, hidden:])
        x = widened
    w13_out = x.new_empty((pairs, 2 * inter))
    gemm(x, w13_out, experts.w13, experts.scales13, experts.zeros13, experts.workspace, alignment, topk_weights,
         top_k, False, experts.quant_type_id)
    hidden_in = x.new_empty((pairs, inter + factors.r2_padded))
    kernels.activate_folded(w13_out, factors.b2, alignment, hidden_in)
    w2_out = x.new_empty((pairs, hidden))
    gemm(hidden_in, w2_out, experts.w2, experts.scales2, experts.zeros2, experts.workspace, alignment, topk_weights,
         1, True, experts.quant_type_id)
    return w2_out.view(tokens, top_k, hidden).sum(dim=1)


def correction_hooks(factors: ExpertFactors, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     num_experts: int, activation, fused: bool | None = None):
    """The callbacks of one call (None without a correction): fused up to FUSED_MAX_PAIRS pairs,
    grouped otherwise; both compute the gated SiLU, the only activation they take."""
    if not factors.any:
        return None
    if not compat.plain_gated_silu(activation, {}):
        raise ValueError(f"the MoE correction computes the gated SiLU only, not {activation!r}")
    if fused and factors.int8:
        raise ValueError("the fused MoE correction takes factors in the activation dtype, not int8")
    if fused or (fused is None and takes_fused_path(topk_ids.numel(), factors)):
        return FusedCorrectionHooks(factors, x, topk_weights, topk_ids)
    return (BesideCorrectionHooks if CORRECTION_BESIDE else CorrectionHooks)(factors, x, topk_weights, topk_ids,
                                                                             num_experts)


def refuse_other_activations(activation, callback_kwargs: dict) -> None:
    """The correction's callbacks compute the gated SiLU only (vllm_glowq/moe.py admits no other)."""
    if not compat.plain_gated_silu(activation, callback_kwargs):
        raise ValueError(f"the MoE correction computes the gated SiLU only; vLLM asked for {activation!r} "
                         f"with {callback_kwargs}")


class CorrectionHooks:
    """The correction around Marlin MoE's GEMMs, inside its callbacks: built before them (R =
    B13 x once per token, the pairs sorted by expert), then called back (`activation`, `moe_sum`).
    With ONE_SORT the sort is at Marlin's block size and `forward` hands it to Marlin
    (`marlins_sort`); with R_ON_SIDE_STREAM R is computed on a second stream and joined in
    `activation`.

    `align` defaults to vLLM's op and `kernels` to kernels/moe_lowrank_triton.py; the CPU tests
    pass a plain-torch stand-in and the kernel module loaded into Triton's interpreter.
    """

    def __init__(self, factors: ExpertFactors, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 num_experts: int, align: Callable | None = None, kernels=None) -> None:
        if kernels is None:
            from .kernels import moe_lowrank_triton as kernels
        self.grouped, self.factors, self.topk_weights = kernels, factors, topk_weights
        self.top_k, self.marlins_sort = topk_ids.shape[1], ONE_SORT
        self.shared = factors.b13 is not None and factors.b13.dim() == 2  # one B13 for all experts: R per token
        self.row_div = self.top_k if self.shared else 1  # pair p reads row p // row_div of R
        self.reduced = None  # what A13 multiplies: R [T, r] (shared B13) or [P, 2r] (one B per expert projection)
        if factors.a13 is not None:
            self.reduced = x.new_empty((x.shape[0], factors.b13.shape[0]) if self.shared
                                       else (topk_ids.numel(), factors.b13.shape[1]))
        self.join = None  # the wait for the second stream's work, issued before its results are read
        self.partials = None  # S = B2_e h's partial sums, from `activation` to `moe_sum`
        self.prepare(x, topk_ids, num_experts, align or compat.moe_align)

    def sort(self, x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: Callable):
        """The pairs sorted by expert, at Marlin's block size with ONE_SORT, else at the grouped kernels'."""
        block_m = (compat.marlin_moe_block_size(x.shape[0], self.top_k, num_experts) if ONE_SORT
                   else self.grouped.block_m_for(topk_ids.numel(), num_experts))
        return align(topk_ids, block_m, num_experts)

    def prepare(self, x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: Callable) -> None:
        """R (beside the sort with R_ON_SIDE_STREAM) and the sort."""
        f = self.factors
        if f.a13 is not None and self.shared:
            if R_ON_SIDE_STREAM:
                from .correction import start_beside

                self.join = start_beside(x.device, lambda: self.reduce_shared(x))
            else:
                self.reduce_shared(x)
        self.alignment = self.sort(x, topk_ids, num_experts, align)
        if f.a13 is not None and not self.shared:
            self.grouped.launch(x, f.b13, self.reduced, self.alignment, row_div=self.top_k)

    def reduce_shared(self, x: torch.Tensor) -> None:
        """R = B13 x once per token (one B13 for all experts) into `reduced`."""
        torch.mm(x, self.factors.b13.t(), out=self.reduced)

    def joined(self) -> None:
        """The current stream waits for the second stream's work (once)."""
        if self.join is not None:
            self.join()
            self.join = None

    def activation(self, activation, output: torch.Tensor, w13_out: torch.Tensor, **kwargs) -> torch.Tensor:
        """output [P, I] = SiLU(gate) * up of w13_out [P, 2I] + A13_e R, and the partials of
        S = B2_e h for `moe_sum`, in one grouped launch (w13_out left as it is)."""
        refuse_other_activations(activation, kwargs)
        self.joined()
        f = self.factors
        self.partials = self.grouped.activate(w13_out, self.reduced, f.a13, f.b2, self.alignment, output, self.row_div,
                                              a13_scale=f.a13_scale, b2_scale=f.b2_scale)
        return output

    def moe_sum(self, w2_out: torch.Tensor, output: torch.Tensor, topk_ids: torch.Tensor, expert_map) -> torch.Tensor:
        """w2_out [T, top_k, H] += w_p A2_e S_p (where the layer has A2), then the sum over top_k
        into output [T, H]."""
        if self.factors.a2 is not None:
            rows = w2_out.view(-1, w2_out.shape[-1])
            self.grouped.launch(self.partials, self.factors.a2, rows, self.alignment,
                                scale=self.topk_weights.reshape(-1), accumulate=True,
                                weight_scale=self.factors.a2_scale)
        return torch.sum(w2_out, dim=1, out=output)


class BesideCorrectionHooks(CorrectionHooks):
    """The grouped correction on the device's second stream, beside Marlin MoE's GEMMs
    (CORRECTION_BESIDE): R = B13 x forked before the sort (R_BEFORE_SORT), A13_e R for every
    pair after it, while the w13 GEMM runs; `activation` joins, adds that product and applies
    SiLU-and-mul (one launch), then forks the w2 correction (S = B2_e h, or with W2_SHRINK_BESIDE
    off its partials from the activation's launch; then w_p A2_e S) while the w2 GEMM runs; `moe_sum` joins and sums
    Marlin's rows and the correction's over top_k in one launch. Every buffer the second stream
    touches is allocated before the forks and held here until the last join (the activation's
    output, Marlin's buffer, too)."""

    def prepare(self, x: torch.Tensor, topk_ids: torch.Tensor, num_experts: int, align: Callable) -> None:
        from .correction import start_beside

        f = self.factors
        pairs = topk_ids.numel()
        early_r = f.a13 is not None and self.shared and R_BEFORE_SORT
        if early_r:  # joined with A13_e R below: the second stream runs its work in order
            start_beside(x.device, lambda: self.reduce_shared(x))
        self.alignment = self.sort(x, topk_ids, num_experts, align)
        # A13_e R per pair, read by the activation; then w_p A2_e S, written after it: one buffer
        rows = [0 if w is None else w.shape[1] for w in (f.a13, f.a2)]
        per_pair = x.new_empty(pairs * max(rows))
        self.added = None if f.a13 is None else per_pair[: pairs * rows[0]].view(pairs, rows[0])
        self.shrunk = None  # S = B2_e h, where the second stream computes it (W2_SHRINK_BESIDE)
        if f.a2 is not None:
            if W2_SHRINK_BESIDE:
                self.shrunk = x.new_empty((pairs, f.b2.shape[1]))
            self.expanded = per_pair[: pairs * rows[1]].view(pairs, rows[1])
        self.hidden = None  # the activation's output, read beside the w2 GEMM
        if f.a13 is not None:
            self.join = start_beside(x.device, lambda: self.expand13(x, reduce=not early_r))

    def expand13(self, x: torch.Tensor, reduce: bool = True) -> None:
        """A13_e R for every pair into `added`, after R (with `reduce`: R made here first)."""
        f = self.factors
        if not self.shared:
            self.grouped.launch(x, f.b13, self.reduced, self.alignment, row_div=self.top_k)
        elif reduce:
            self.reduce_shared(x)
        self.grouped.launch(self.reduced, f.a13, self.added, self.alignment, row_div=self.row_div,
                            weight_scale=f.a13_scale)

    def correct_w2(self) -> None:
        f = self.factors
        if self.shrunk is not None:
            self.grouped.launch(self.hidden, f.b2, self.shrunk, self.alignment, weight_scale=f.b2_scale)
        shrunk = self.partials if self.shrunk is None else self.shrunk
        self.grouped.launch(shrunk, f.a2, self.expanded, self.alignment, scale=self.topk_weights.reshape(-1),
                            weight_scale=f.a2_scale)

    def activation(self, activation, output: torch.Tensor, w13_out: torch.Tensor, **kwargs) -> torch.Tensor:
        """output [P, I] = SiLU(gate) * up of w13_out [P, 2I] + A13_e R, then the w2 correction forked."""
        refuse_other_activations(activation, kwargs)
        self.joined()
        shrink_here = self.factors.a2 is not None and self.shrunk is None  # the partials of S, for correct_w2
        f = self.factors
        self.partials = self.grouped.activate(w13_out, None, None, f.b2 if shrink_here else None, self.alignment,
                                              output, self.row_div, added=self.added,
                                              b2_scale=f.b2_scale if shrink_here else None)
        if self.factors.a2 is not None:
            from .correction import start_beside

            self.hidden = output
            self.join = start_beside(output.device, self.correct_w2)
        return output

    def moe_sum(self, w2_out: torch.Tensor, output: torch.Tensor, topk_ids: torch.Tensor, expert_map) -> torch.Tensor:
        """output [T, H] = the sum over top_k of w2_out [T, top_k, H] and the w2 correction's rows
        (one launch after the join)."""
        if self.join is None:  # no w2 correction was forked
            return torch.sum(w2_out, dim=1, out=output)
        self.joined()
        return self.grouped.sum_topk(w2_out, self.expanded.view(w2_out.shape), output)


class FusedCorrectionHooks:
    """The correction around one `fused_marlin_moe` call at small batch, in three launches and
    without sorting (kernels/moe_fused_triton.py): R = B13 x before the call (one GEMM per
    token; per pair for `--share module`, one more launch), then `activation` (correction,
    SiLU-and-mul and the down factor's shrink in one kernel) and `moe_sum` (the down
    correction's expand inside the top-k sum).

    `kernels` defaults to kernels/moe_fused_triton.py; the CPU tests pass the module loaded
    into Triton's interpreter."""

    def __init__(self, factors: ExpertFactors, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 kernels=None) -> None:
        if kernels is None:
            from .kernels import moe_fused_triton as kernels
        self.kernels, self.factors = kernels, factors
        self.topk_ids, self.topk_weights = topk_ids.contiguous(), topk_weights.contiguous()
        self.reduced, self.row_div = None, 1  # R [T, r] read by pair p at row p // top_k, or R [P, 2r]
        if factors.a13 is not None:
            if factors.b13.dim() == 2:
                self.reduced, self.row_div = F.linear(x, factors.b13), topk_ids.shape[1]
            else:
                self.reduced = kernels.shrink_pairs(x, factors.b13, self.topk_ids)
        self.partials = None  # the down correction's partial sums, from `activation` to `moe_sum`

    def activation(self, activation, output: torch.Tensor, w13_out: torch.Tensor, **kwargs) -> torch.Tensor:
        """output [P, I] = SiLU(gate) * up of w13_out [P, 2I] + A13_e R (w13_out left as it is)."""
        refuse_other_activations(activation, kwargs)
        self.partials = self.kernels.activate(w13_out, self.reduced, self.factors.a13, self.factors.b2,
                                              self.topk_ids, output, self.row_div)
        return output

    def moe_sum(self, w2_out: torch.Tensor, output: torch.Tensor, topk_ids: torch.Tensor, expert_map) -> torch.Tensor:
        """output [T, H] = the sum over top_k of w2_out [T, top_k, H] + w_p A2_e S_p."""
        return self.kernels.sum_topk(w2_out, self.partials, self.factors.a2, self.topk_ids, self.topk_weights, output)
