"""GlowQ experts on CUDA GPUs through the project's own int4 MoE kernels, the correction inside
the expert GEMMs (kernels/moe_w4a16_triton.py says how).

The alternative to moe_marlin.py, which keeps vLLM's Marlin MoE GEMMs and adds the correction
in launches of its own around them: on the H200 that path decodes at 0.72-0.78x plain int4
MoE (docs/benchmarks.md), and the launches, not the factors' bytes, cost it. Each layer keeps
one layout: the codes are repacked once at load time into the dense kernel's nibble planes
per expert (`repack`), so the choice between the two paths is made per layer when the model
loads (vllm_glowq/moe.py; `VLLM_GLOWQ_KERNEL=glowq` picks this one).

Per call, `forward` takes one of three paths by the number of (token, expert) pairs (`path_for`):

* pairs, up to PAIRS_MAX_PAIRS: no sorting, two launches (w13, whose first programs compute
  R = B13 x, and w2; three with `--share module`'s per-pair R), each pair's
  expert read for that pair; on the H200 plain int4 through it took 20.5 us per Qwen3-30B-A3B
  layer at one token against 31.1 for Marlin MoE, and fell behind from 8 tokens, where pairs
  share experts (docs/benchmarks.md);
* rows, up to ROWS_MAX_PAIRS: the pairs sorted by expert (vLLM's `moe_align_block_size`) in
  blocks of 2 or 4 (`rows_block_m`), each program reading a chunk of one expert's codes once for
  all of its block's pairs, on the CUDA cores with the pairs path's epilogues (not timed yet);
* blocks, beyond: sorted in tensor-core tiles (five launches; 2.3-2.5x slower than Marlin MoE
  from 16 tokens on the H200).

The thresholds are first guesses until bench/moe_microbench.py's sweep times the paths side by
side. Shapes depend only on the token count, so CUDA graphs capture every path; torch.compile
sees the block through the `torch.ops.glowq.moe` custom op.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .kernels.w4a16 import block_k_for
from .packing import repack_planes

if TYPE_CHECKING:  # the kernels import Triton, which only the GPU paths need
    from .kernels.moe_w4a16_triton import MarlinScales

PAIRS_MAX_PAIRS = 32  # (token, expert) pairs up to which `forward` takes the pairs path
ROWS_MAX_PAIRS = 512  # ... and the rows path (64 tokens at top-8; a guess, not timed)
PATHS = ("pairs", "rows", "blocks")
_DTYPES = (torch.bfloat16, torch.float16)


@dataclass
class ExpertCodes:
    """One projection of every expert in the kernels' layout (from `repack`)."""

    qweight: torch.Tensor  # [E, K / 8, N] int32, packing.repack_planes per expert in K blocks of block_k
    scales: torch.Tensor  # [E, G, N] activation dtype
    zeros: torch.Tensor | None  # [E, G, N] uint8; None: symmetric codes (z = 8)
    group_size: int
    block_k: int
    # symmetric codes left in vLLM's Marlin MoE layout ([E, K / 16, 2N], scales permuted as these
    # positions say): moe_marlin.py's decode path, the pairs path only
    marlin: MarlinScales | None = None

    def launch_args(self) -> tuple:
        return self.qweight, self.scales, self.zeros, self.group_size, self.block_k

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1] * (16 if self.marlin is not None else 8)


def unsupported_reason(hidden: int, inter_local: int, group_h: int, group_i: int, dtype: torch.dtype) -> str | None:
    """Why the project's MoE kernels cannot run these experts (None when they can)."""
    if dtype not in _DTYPES:
        return f"the int4 MoE kernels take bfloat16 or float16 activations, not {dtype} (use --dtype bfloat16)"
    for name, features, group in (("hidden", hidden, group_h), ("expert intermediate", inter_local, group_i)):
        if block_k_for(features, group) is None:
            return f"the {name} size {features} with group_size={group} has no K block of 16-128 that divides both"
    return None


def repack(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, dtype: torch.dtype) -> ExpertCodes:
    """The kernels' layout from the checkpoint's (per rank): qweight [E, K/8, N] int32 (GPTQ
    packing along K), scales [E, G, N], zero points [E, G, N] unpacked (uint8) or None."""
    k = qweight.shape[1] * 8
    group = k // scales.shape[1]
    block_k = block_k_for(k, group)
    codes = torch.stack([repack_planes(q, block_k) for q in qweight])
    return ExpertCodes(codes, scales.to(dtype).contiguous(), None if zeros is None else zeros.contiguous(), group,
                       block_k)


def reserve(device: torch.device, hidden: int, inter_local: int, w13: ExpertCodes, w2: ExpertCodes) -> None:
    """Size the pairs and rows paths' workspace for a layer (at load time, before graph capture)."""
    from .kernels import moe_w4a16_triton as kernels

    needs = (_workspace_needs("pairs", PAIRS_MAX_PAIRS, hidden, inter_local, w13, w2, kernels),
             _workspace_needs("rows", ROWS_MAX_PAIRS, hidden, inter_local, w13, w2, kernels))
    kernels.workspace(device).reserve(*map(max, zip(*needs)))


def _workspace_needs(path: str, num_pairs: int, hidden: int, inter: int, w13: ExpertCodes, w2: ExpertCodes,
                     kernels) -> tuple[int, int]:
    """(float32 partials, tickets) a call of `num_pairs` pairs needs on the pairs path (its finest
    K split) or the rows path (a split of one: `gate_up_rows` splits no finer than what fits)."""
    if path == "pairs":
        floats = num_pairs * max(2 * inter * (hidden // w13.block_k), hidden * (inter // w2.block_k))
        return floats, num_pairs * -(-max(inter, hidden) // kernels.PAIRS_BLOCK_N)
    return num_pairs * max(2 * inter, hidden), num_pairs * -(-max(inter, hidden) // kernels.ROWS_MIN_BLOCK_N)


def rows_block_m(num_pairs: int, num_experts: int) -> int:
    """Pairs per sorted block of the rows path: about what an expert receives (every row of a
    block costs its multiply-adds, used or not), 2 or 4."""
    return 2 if num_pairs <= 2 * num_experts else 4


def path_for(num_pairs: int) -> str:
    """The path `forward` takes for this many (token, expert) pairs."""
    return "pairs" if num_pairs <= PAIRS_MAX_PAIRS else "rows" if num_pairs <= ROWS_MAX_PAIRS else "blocks"


def forward(w13: ExpertCodes, w2: ExpertCodes, factors, x: torch.Tensor, topk_weights: torch.Tensor,
            topk_ids: torch.Tensor, path: str | None = None, align: Callable | None = None,
            kernels=None) -> torch.Tensor:
    """The routed experts' output [T, H] (router weights applied, top-k summed); `factors` a
    moe_marlin.ExpertFactors. `path` forces one of PATHS (tests, bench/moe_microbench.py);
    `align` and `kernels` default to vLLM's op and kernels/moe_w4a16_triton.py (the CPU tests
    pass a torch stand-in and the module loaded into Triton's interpreter)."""
    if kernels is None:
        from .kernels import moe_w4a16_triton as kernels
    tokens, top_k = topk_ids.shape
    if tokens == 0:
        return torch.zeros_like(x)
    x = x.contiguous()
    topk_ids = topk_ids.contiguous()
    topk_weights = topk_weights.float().contiguous()
    num_pairs, inter = tokens * top_k, w2.in_features
    path = path or path_for(num_pairs)
    if w13.marlin is not None and path != "pairs":
        raise ValueError(f"codes in Marlin's layout run on the pairs path only, not {path!r}")
    # the pairs path computes the shared B's R = B13 x inside its w13 launch
    own_shrink = path == "pairs" and factors.a13 is not None and factors.b13.dim() == 2
    reduced, row_div = (None, top_k) if own_shrink else _reduced(factors, x, topk_ids, top_k, kernels)
    hidden = x.new_empty((num_pairs, inter))
    out = torch.empty_like(x)
    space = kernels.workspace(x.device)
    if path in ("pairs", "rows"):
        # a no-op where `reserve` ran at load time (more pairs than its bounds: tests, the sweep)
        space.reserve(*_workspace_needs(path, num_pairs, x.shape[1], inter, w13, w2, kernels))
    if path == "pairs":
        partials = kernels.gate_up_pairs(x, *w13.launch_args(), reduced, factors.a13, factors.b2, topk_ids, hidden,
                                         row_div, space, b13=factors.b13 if own_shrink else None, marlin=w13.marlin)
        return kernels.down_pairs(hidden, *w2.launch_args(), partials, factors.a2, topk_ids, topk_weights, out, space,
                                  marlin=w2.marlin)
    num_experts = w13.qweight.shape[0]
    align = align or _vllm_align
    if path == "rows":
        alignment = align(topk_ids, rows_block_m(num_pairs, num_experts), num_experts)
        partials = kernels.gate_up_rows(x, *w13.launch_args(), reduced, factors.a13, factors.b2, alignment, top_k,
                                        hidden, row_div, space)
        return kernels.down_rows(hidden, *w2.launch_args(), partials, factors.a2, topk_ids, topk_weights, alignment,
                                 out, space)
    from .kernels.moe_lowrank_triton import block_m_for

    alignment = align(topk_ids, block_m_for(num_pairs, num_experts), num_experts)
    partials = kernels.gate_up_blocks(x, *w13.launch_args(), reduced, factors.a13, factors.b2, alignment, top_k,
                                      hidden, row_div)
    rows = kernels.down_blocks(hidden, *w2.launch_args(), partials, factors.a2, alignment, topk_weights,
                               x.new_empty((num_pairs, x.shape[1])))
    return torch.sum(rows.view(tokens, top_k, -1), dim=1, out=out)


def _reduced(factors, x: torch.Tensor, topk_ids: torch.Tensor, top_k: int, kernels) -> tuple[torch.Tensor | None, int]:
    """What A13 multiplies and the pair -> row divisor: R = B13 x once per token (the shared B),
    or per pair with one B per expert (`--share module`)."""
    if factors.a13 is None:
        return None, 1
    if factors.b13.dim() == 2:
        return F.linear(x, factors.b13), top_k
    return kernels.shrink_pairs(x, factors.b13, topk_ids), 1


def _vllm_align(topk_ids: torch.Tensor, block_m: int, num_experts: int):
    from . import compat

    return compat.moe_align(topk_ids, block_m, num_experts)
