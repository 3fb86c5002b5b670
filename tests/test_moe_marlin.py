"""The GPU path of the GlowQ experts (vllm_glowq/moe_marlin.py, kernels/moe_lowrank_triton.py and
kernels/moe_fused_triton.py) against a float64 reference.

* CPU, Triton's interpreter: the grouped kernel on odd shapes (every mask, stale blocks past
  the aligned pairs, router-weight scaling, accumulation), and its launch configurations
  compiled for sm_90 by Triton's NVIDIA backend (no GPU needed); the correction callbacks around a
  stand-in for vLLM's `fused_marlin_moe` that keeps its documented contract (one w13 row per
  (token, expert) pair, the activation callback, w2 rows scaled by the router weight, the
  top-k sum callback), for shared and per-module B, GlowQ-S layers with only one of the two
  corrections, Marlin's block sizes (8, 48 and 64: one sort for Marlin and the correction) and
  the grouped path's own (16, 32). float32 (exact indexing) and float16.
* CPU, layout glue: the unpacked zero points the loader keeps give exactly what vLLM's own
  conversion gives from the GPTQ-packed ones; the calls into `fused_marlin_moe` and (the grouped
  path's one sort) `_fused_marlin_moe` bind to the installed vLLM's signatures, and the block
  size the grouped path sorts at is the one vLLM's `fused_marlin_moe` picks; the shape checks.
* CPU, the fused small-batch path (kernels/moe_fused_triton.py) in the interpreter: each of
  its kernels against float64 fed the kernels' own rounded inputs (bf16 and fp16, 1 to 24
  pairs, top-k 1, 2 and 8, shared and per-module B, only one of the two corrections), its
  callbacks around the stand-in, the choice of path, and sm_90 compilation.
* GPU (skipped without CUDA), on both correction paths (fused and grouped, each forced; the
  grouped one beside Marlin's GEMMs as shipped, inside its callbacks, and that with its own sort
  and R in series, as before ONE_SORT and R_ON_SIDE_STREAM): the
  whole block through vLLM's Marlin MoE GEMMs on repacked codes, bf16 and fp16, 8 and 64
  experts, top-2 and top-8, rank 0 and 16, shared and per-module B, symmetric and asymmetric
  codes, 1 to 600 tokens; with the correction removed the same comparison must fail (negative
  control); the block inside a CUDA graph.
"""

from __future__ import annotations

import inspect
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_timing import capture  # noqa: E402
from interpreter import load_interpreted  # noqa: E402

from vllm_glowq import moe_marlin
from vllm_glowq.packing import dequantize, pack_cols, pack_rows

KERNEL_FILE = Path(moe_marlin.__file__).parent / "kernels" / "moe_lowrank_triton.py"
FUSED_FILE = KERNEL_FILE.with_name("moe_fused_triton.py")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (vLLM's Marlin MoE kernels)")
# relative Frobenius error against float64: the working dtype's rounding of the w13 output, the
# activation and the w2 output (bf16 2^-9, fp16 2^-12 relative per element) with headroom
TOLERANCE = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}


# ----- the float64 reference --------------------------------------------------------------------


def make_factors(num_experts: int, hidden: int, inter: int, rank: int, share: str, has13: bool = True,
                 has2: bool = True, seed: int = 0) -> dict[str, torch.Tensor | None]:
    """float64 factors large enough that the correction moves the output far past the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    f: dict[str, torch.Tensor | None] = dict(b13=None, a13=None, b2=None, a2=None)
    if has13:
        r13 = rank if share == "group" else 2 * rank
        f["b13"] = randn(rank, hidden) / hidden**0.5 if share == "group" else randn(num_experts, r13, hidden) / hidden**0.5
        f["a13"] = randn(num_experts, 2 * inter, r13) * 0.5 / r13**0.5
        if share == "module":  # block-diagonal: gate rows read gate's B, up rows up's
            f["a13"][:, :inter, rank:] = 0
            f["a13"][:, inter:, :rank] = 0
    if has2:
        f["b2"] = randn(num_experts, rank, inter) / inter**0.5
        f["a2"] = randn(num_experts, hidden, rank) * 0.5 / rank**0.5
    return f


def reference_block(x, w13, w2, factors, topk_weights, topk_ids) -> torch.Tensor:
    """sum_k w_k [W2_e h + A2_e (B2_e h)],  h = silu(gate) * up of  W13_e x + A13_e (B13 x), in float64.

    Expert by expert over the pairs routed to it: gathering each pair's weights instead would
    materialize [pairs, 2I, H] float64 (gigabytes at a few hundred tokens)."""
    x = x.double()
    tokens = torch.arange(x.shape[0]).repeat_interleave(topk_ids.shape[1]).to(x.device)
    experts = topk_ids.reshape(-1).long()
    y = torch.zeros(experts.numel(), w2.shape[1], dtype=torch.float64, device=x.device)
    for e in experts.unique().tolist():
        pairs = (experts == e).nonzero().squeeze(1)
        xp = x[tokens[pairs]]
        g = xp @ w13[e].t()
        if factors["a13"] is not None:
            b13 = factors["b13"] if factors["b13"].dim() == 2 else factors["b13"][e]
            g = g + (xp @ b13.t()) @ factors["a13"][e].t()
        gate, up = g.chunk(2, dim=-1)
        h = F.silu(gate) * up
        out = h @ w2[e].t()
        if factors["a2"] is not None:
            out = out + (h @ factors["b2"][e].t()) @ factors["a2"][e].t()
        y[pairs] = out
    y = y * topk_weights.reshape(-1, 1).double()
    return y.view(x.shape[0], topk_ids.shape[1], -1).sum(dim=1)


def routing(tokens: int, num_experts: int, top_k: int, seed: int = 0, device: str = "cpu"):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, num_experts, generator=gen)
    weights, ids = torch.softmax(logits, dim=-1).topk(top_k, dim=-1)
    return (weights / weights.sum(-1, keepdim=True)).to(device), ids.to(torch.int32).to(device)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


def as_factors(f: dict, dtype: torch.dtype, device: str = "cpu") -> moe_marlin.ExpertFactors:
    """The factors in the working dtype; `f` is rounded to it in place, so the reference sees
    exactly the values the kernels multiply."""
    for k, v in f.items():
        if v is not None:
            f[k] = v.to(dtype).double()
    return moe_marlin.ExpertFactors(**{k: None if v is None else v.to(device, dtype).contiguous() for k, v in f.items()})


def as_int8_factors(f: dict, dtype: torch.dtype, device: str = "cpu") -> moe_marlin.ExpertFactors:
    """`as_factors`, then A13, B2 and A2 as int8 codes (ExpertFactors.to_int8); `f` gets the
    values those codes and scales stand for, so the reference sees what the kernels multiply."""
    factors = as_factors(f, dtype, device).to_int8()
    for k in ("a13", "b2", "a2"):
        if f[k] is not None:
            f[k] = getattr(factors, k).cpu().double() * getattr(factors, f"{k}_scale").cpu().double()[..., None]
    return factors


def test_int8_rows_stay_within_half_a_step():
    """One scale per row: every entry within half a step of its row's scale; an all-zero row
    gets zero codes (no division by zero); B13 is not touched."""
    factor = torch.randn(3, 5, 64, dtype=torch.float64)
    factor[1, 2] = 0
    codes, scales = moe_marlin.int8_rows(factor)
    assert codes.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (3, 5)
    assert codes.abs().max() == 127 and (codes[1, 2] == 0).all() and scales[1, 2] == 0
    error = (codes.double() * scales.double()[..., None] - factor).abs()
    assert (error <= scales.double()[..., None] * 0.5 + 1e-7).all()
    f = as_factors(make_factors(4, 32, 16, 4, "group"), torch.bfloat16)
    int8 = f.to_int8()
    assert int8.b13 is f.b13 and int8.int8 and not f.int8 and int8.a2_scale.shape == (4, 32)


# ----- CPU: the grouped kernel in Triton's interpreter ------------------------------------------


@pytest.fixture(scope="module")
def grouped():
    pytest.importorskip("triton")
    return load_interpreted(KERNEL_FILE, "glowq_moe_lowrank_interpreted")


# pairs' source rows per token (row_div = top_k) or per pair; N and K off the tile sizes
KERNEL_CASES = [  # tokens, experts, top_k, N, K, block_m (8 and 48: Marlin's, in part of a tile)
    (1, 4, 2, 48, 8, 16), (5, 4, 3, 100, 24, 16), (13, 8, 2, 70, 130, 32), (40, 3, 2, 64, 16, 64),
    (7, 4, 2, 150, 64, 16), (9, 4, 2, 40, 24, 8), (30, 4, 3, 70, 64, 48)]


@pytest.mark.parametrize("case", KERNEL_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("per_token", [True, False], ids=["per-token", "per-pair"])
@pytest.mark.parametrize("scaled", [False, True], ids=["plain", "router-weighted"])
@pytest.mark.parametrize("tiles", ["one-tile", "all-tiles"])
def test_grouped_kernel_matches_float64(grouped, case, per_token, scaled, tiles, monkeypatch):
    """With "all-tiles" every program takes as many column tiles as there are (a power of two;
    the last program's tiles may run past N) and, where scaled, x comes as 3 slices to sum."""
    tokens, experts, top_k, n, k, block_m = case
    if tiles == "all-tiles":
        monkeypatch.setattr(grouped, "PROGRAMS_PER_SM", 0)
    gen = torch.Generator().manual_seed(sum(case))
    weights, ids = routing(tokens, experts, top_k, seed=tokens)
    pairs = tokens * top_k
    slices = 3 if scaled and tiles == "all-tiles" else 1
    x = torch.randn(slices, tokens if per_token else pairs, k, generator=gen)
    w = torch.randn(experts, n, k, generator=gen)
    out = torch.randn(pairs, n + 5, generator=gen)[:, :n]  # a row stride beyond N
    before = out.clone()
    scale = weights.reshape(-1).float() if scaled else None
    grouped.launch(x if slices > 1 else x[0], w, out, grouped.align_reference(ids, block_m, experts),
                   row_div=top_k if per_token else 1, scale=scale, accumulate=True)
    src = torch.arange(pairs) // top_k if per_token else torch.arange(pairs)
    ref = torch.einsum("pnk,pk->pn", w.double()[ids.reshape(-1).long()], x.double().sum(0)[src])
    if scaled:
        ref *= weights.reshape(-1, 1).double()
    assert torch.allclose(out.double(), before.double() + ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", KERNEL_CASES[:4], ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_grouped_kernel_takes_int8_factors(grouped, case, dtype):
    """int8 codes with their row scales (the A2 expand: router-weighted, accumulated): the same
    sums as the factor they stand for; codes without scales, or scales of the wrong shape, are
    refused by name."""
    tokens, experts, top_k, n, k, block_m = case
    gen = torch.Generator().manual_seed(sum(case))
    weights, ids = routing(tokens, experts, top_k, seed=tokens)
    pairs = tokens * top_k
    x = torch.randn(pairs, k, generator=gen).to(dtype)
    codes, scales = moe_marlin.int8_rows(torch.randn(experts, n, k, generator=gen))
    out = torch.randn(pairs, n, generator=gen).to(dtype)
    before = out.clone()
    alignment = grouped.align_reference(ids, block_m, experts)
    grouped.launch(x, codes, out, alignment, scale=weights.reshape(-1).float(), accumulate=True, weight_scale=scales)
    w = codes.double() * scales.double()[..., None]
    ref = torch.einsum("pnk,pk->pn", w[ids.reshape(-1).long()], x.double()) * weights.reshape(-1, 1).double()
    assert relative_error(out - before, ref) < TOLERANCE[dtype]
    with pytest.raises(ValueError, match="int8 factor codes need their scales"):
        grouped.launch(x, codes, out, alignment)
    with pytest.raises(ValueError, match="takes float32 scales of shape"):
        grouped.launch(x, codes, out, alignment, weight_scale=scales[:, :-1])


def compile_for_hopper(fn, signature: dict, constexprs: dict, warps: int = 4, aligned: tuple[str, ...] = ()):
    """`fn` compiled for sm_90 by Triton's NVIDIA backend (no GPU needed); skips where that
    backend cannot run. As Triton's launcher does at run time, every pointer and the integers
    named in `aligned` (multiples of 16 on the production shapes) are declared divisible by 16:
    without that the compiler neither vectorizes nor pipelines the loads, and the registers and
    spills it reports are not those of the kernel that runs (e.g. 202 against 71 registers)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    divisible = [name for name, kind in signature.items() if kind.startswith("*") or name in aligned]
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    try:
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    except RuntimeError as exc:
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            pytest.skip(f"Triton cannot compile for NVIDIA GPUs here: {exc}")
        raise


# a stack frame is spilled registers only where the allocator ran out: at 255 registers a thread
# (Triton sets no lower cap); ptxas also keeps small frames at 40-72 registers now and then
REGISTERS_SPENT = 240


def spilled_bytes(kernel) -> int | None:
    """Bytes a thread of a compiled kernel spills (cuobjdump's resource usage: its stack frame
    where its registers are spent, REGISTERS_SPENT or more; 0 otherwise), or None where Triton
    ships no cuobjdump."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not os.access(tool, os.X_OK):
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(kernel.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([str(tool), "--dump-resource-usage", cubin.name], capture_output=True, text=True)
    found = re.search(r"REG:(\d+) STACK:(\d+)", usage.stdout)
    if found is None:
        return None
    registers, stack = map(int, found.groups())
    return stack if registers >= REGISTERS_SPENT else 0


# the grouped kernels' integers that are multiples of 16 on Qwen3-30B-A3B's experts (sizes, ranks,
# strides), as Triton's launcher finds them; not the pair count, top_k (ROW_DIV) or the slices
GROUPED_ALIGNED = ("N", "K", "stride_xm", "stride_we", "stride_wn", "stride_om", "stride_slice", "I", "R13", "R2",
                   "stride_w13", "stride_r", "stride_a13e", "stride_b2e", "stride_h", "stride_add", "stride_wse",
                   "stride_a13se", "stride_b2se")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_grouped_kernel_compiles_for_hopper(dtype):
    """The configurations `launch` picks, compiled for sm_90 by Triton's NVIDIA backend (no GPU
    needed): what the interpreter cannot check (types, layouts, the scalar branch)."""
    from vllm_glowq.kernels import moe_lowrank_triton

    pointers = dict(x_ptr=dtype, w_ptr=dtype, out_ptr=dtype, scale_ptr="fp32", w_scale_ptr="fp32", sorted_ptr="i32",
                    expert_ptr="i32", padded_ptr="i32")
    integers = ("num_pairs", "N", "K", "ROW_DIV", "stride_xm", "stride_we", "stride_wn", "stride_om", "x_slices",
                "stride_slice", "stride_wse")
    for block_m in (8, 16, 32, 48, 64):  # Marlin's block sizes
        rows = moe_lowrank_triton.tile_rows(block_m)
        # the shrinks (`--share module`'s per pair, N = 2r: 16 or 64 columns; the w2 shrink beside
        # Marlin, K = I) and the w2 expand, router-weighted: in the callbacks it reads `activate`'s
        # float32 partials and accumulates, beside Marlin it reads S and writes; beside Marlin
        # with int8 factors too
        for block_n, accumulate, scaled, tiles, int8 in (
                (64, False, False, 1, False), (16, False, False, 1, False), (64, True, True, 1, False),
                (64, True, True, 16, False), (64, False, True, 16, False), (64, False, False, 1, True),
                (64, False, True, 16, True)):
            constexprs = dict(ACCUMULATE=accumulate, HAS_SCALE=scaled, W_INT8=int8, BLOCK_M=rows, BLOCK_ROWS=block_m,
                              BLOCK_N=block_n, BLOCK_K=64, TILES=tiles, ONE_K_BLOCK=scaled)
            x = {"x_ptr": "fp32"} if accumulate else {}
            if int8:
                x["w_ptr"] = "i8"
            signature = {**{k: f"*{v}" for k, v in {**pointers, **x}.items()}, **{k: "i32" for k in integers},
                         **{k: "constexpr" for k in constexprs}}
            kernel = compile_for_hopper(moe_lowrank_triton._grouped_lowrank_kernel, signature, constexprs,
                                        moe_lowrank_triton.warps_for(rows), aligned=GROUPED_ALIGNED)
            assert kernel.asm["cubin"], (block_m, block_n)
            assert spilled_bytes(kernel) in (0, None), (block_m, block_n)  # the launch picks warps that fit


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_grouped_activation_compiles_for_hopper(dtype):
    """`activate`'s kernel at every block size and with each factor, for sm_90 (no GPU needed)."""
    for block_m in (8, 16, 32, 48, 64):
        # in the callbacks (A13 R and the w2 shrink inside), and beside Marlin (A13 R added)
        # (and with int8 factors: both in the callbacks, the shrink beside Marlin)
        for has13, has2, added, int8 in ((True, True, False, False), (True, False, False, False),
                                         (False, True, False, False), (False, False, True, False),
                                         (False, True, True, False), (True, True, False, True),
                                         (False, True, True, True)):
            kernel = compile_activation_for_hopper(dtype, "fp32", block_m, HAS13=has13, HAS2=has2, ADDED=added,
                                                   INT8=int8, BLOCK_I=64, CHUNKS=1, BLOCK_R13=64, BLOCK_R2=64)
            assert kernel.asm["cubin"], (block_m, has13, has2)
            assert spilled_bytes(kernel) in (0, None), (block_m, has13, has2)


def compile_activation_for_hopper(dtype: str, partials: str, block_m: int, **constexprs):
    """`_grouped_activate_kernel` for sm_90 with S written as `partials` (float32 slices, or the
    activation dtype beside h on the folded path), tiles for Marlin's `block_m`, on the warps
    the launcher picks."""
    from vllm_glowq.kernels import moe_lowrank_triton

    factor = "i8" if constexprs.get("INT8") else dtype
    pointers = dict(w13_ptr=dtype, r_ptr=dtype, a13_ptr=factor, b2_ptr=factor, h_ptr=dtype, part_ptr=partials,
                    add_ptr=dtype, a13_scale_ptr="fp32", b2_scale_ptr="fp32", sorted_ptr="i32", expert_ptr="i32",
                    padded_ptr="i32")
    integers = ("num_pairs", "I", "R13", "R2", "R2_OUT", "ROW_DIV", "stride_w13", "stride_r", "stride_a13e",
                "stride_b2e", "stride_h", "stride_add", "stride_part", "stride_part_slice", "stride_a13se",
                "stride_b2se")
    rows = moe_lowrank_triton.tile_rows(block_m)
    constexprs = dict(BLOCK_M=rows, BLOCK_ROWS=block_m, **{"INT8": False, **constexprs})
    signature = {**{k: f"*{v}" for k, v in pointers.items()}, **{k: "i32" for k in integers},
                 **{k: "constexpr" for k in constexprs}}
    return compile_for_hopper(moe_lowrank_triton._grouped_activate_kernel, signature, constexprs,
                              moe_lowrank_triton.warps_for(rows), aligned=GROUPED_ALIGNED + ("R2_OUT", "stride_part"))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_topk_sum_compiles_for_hopper(dtype):
    """`sum_topk`'s kernel (Marlin's w2 rows and the correction's, summed over top_k) for sm_90."""
    from vllm_glowq.kernels import moe_lowrank_triton

    constexprs = dict(TOP_K=8, BLOCK_H=moe_lowrank_triton.SUM_BLOCK_H)
    signature = {"rows_ptr": f"*{dtype}", "extra_ptr": f"*{dtype}", "out_ptr": f"*{dtype}",
                 **{k: "i32" for k in ("H", "stride_rt", "stride_rk", "stride_et", "stride_ek", "stride_out")},
                 **{k: "constexpr" for k in constexprs}}
    kernel = compile_for_hopper(moe_lowrank_triton._sum_topk_kernel, signature, constexprs, 4,
                                aligned=("stride_rt", "stride_rk", "stride_et", "stride_ek", "stride_out"))
    assert kernel.asm["cubin"] and spilled_bytes(kernel) in (0, None)


def test_decode_keeps_one_column_tile_per_program():
    """Several column tiles per program only where the busy blocks alone fill the GPU."""
    from vllm_glowq.kernels.moe_lowrank_triton import tiles_per_program

    assert tiles_per_program(8, 32, 132) == 1  # one token at top-8: eight blocks
    assert tiles_per_program(256, 32, 132) == 8  # 256 tokens: 2048 pairs in about 256 blocks of 16
    assert tiles_per_program(10_000, 3, 132) == 2  # never past the tiles there are


def test_alignment_reference_has_vllms_layout(grouped):
    _, ids = routing(7, 5, 2)
    a = grouped.align_reference(ids, 16, 5)
    valid = a.sorted_ids[: a.padded.item()]
    assert a.padded.item() % 16 == 0 and sorted(valid[valid < 14].tolist()) == list(range(14))
    for block in range(a.padded.item() // 16):
        members = valid[block * 16:(block + 1) * 16]
        members = members[members < 14].long()
        assert (ids.reshape(-1)[members] == a.expert_ids[block]).all()


def test_block_size_follows_pairs_per_expert(grouped):
    assert grouped.block_m_for(8, 128) == 16  # decode: top-8 of 128 experts
    assert grouped.block_m_for(64 * 8, 128) == 16
    assert grouped.block_m_for(300, 8) == 64
    assert grouped.block_m_for(50, 2) == 32


# ----- CPU: the fused small-batch kernels in Triton's interpreter ------------------------------


@pytest.fixture(scope="module")
def fused():
    """The fused kernels in Triton's interpreter, stepping through the rank 16 columns at a time:
    the tests' ranks (8 to 32) then take one and two steps (shipped: 64 columns, one step up to
    rank 64), and the interpreter, which pays for every masked column, runs about 3x faster."""
    triton = pytest.importorskip("triton")
    module = load_interpreted(FUSED_FILE, "glowq_moe_fused_interpreted")
    module.RANK_BLOCK = triton.language.constexpr(16)
    return module


FUSED_CASES = [  # tokens, experts, top_k, inter: 1 to 24 pairs, 3 to 17 chunks of I (past one load of partials)
    (1, 4, 1, 48), (3, 4, 2, 80), (1, 16, 8, 272), (3, 9, 8, 40)]
FUSED_PARTS = [("group", "both"), ("module", "both"), ("group", "w13"), ("module", "w2")]
# the 17-chunk case (a fifth of a minute each in the interpreter) with both corrections only
FUSED_PARAMS = [(case, *parts) for case in FUSED_CASES for parts in FUSED_PARTS
                if case != FUSED_CASES[2] or parts[1] == "both"]


@pytest.mark.parametrize("case,share,parts", FUSED_PARAMS,
                         ids=lambda v: "-".join(map(str, v)) if isinstance(v, tuple) else v)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fused_kernels_match_float64(fused, case, share, parts, dtype):
    """Each step of the fused path against float64 fed the kernels' own rounded inputs: the
    activation (the corrected w13 output rounded to the dtype, SiLU rounded, then the product),
    the down factor's partial sums, and the top-k sum with the router-weighted expand."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    tokens, experts, top_k, inter = case
    hidden, rank, pairs = 48, 16, tokens * top_k
    gen = torch.Generator().manual_seed(pairs + inter)
    f = make_factors(experts, hidden, inter, rank, share, has13=parts != "w2", has2=parts != "w13", seed=pairs)
    factors = as_factors(f, dtype)
    weights, ids = routing(tokens, experts, top_k, seed=pairs)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13_out = torch.randn(pairs, 2 * inter, generator=gen).to(dtype)
    w2_out = (torch.randn(tokens, top_k, hidden, generator=gen) / 4).to(dtype)  # so that the expand shows
    hooks = moe_marlin.FusedCorrectionHooks(factors, x, weights, ids, kernels=fused)
    h = torch.empty(pairs, inter, dtype=dtype)
    hooks.activation(MoEActivation.SILU, h, w13_out, topk_ids=ids, expert_map=None)
    e, src = ids.reshape(-1).long(), torch.arange(pairs) // top_k
    # Triton's interpreter truncates float32 to bfloat16 (GPUs round to nearest): up to one unit
    # in the last place per rounding instead of half of one, and biased, through three roundings
    g, eps = w13_out.double(), torch.finfo(dtype).eps * (3 if dtype == torch.bfloat16 else 1)
    if f["a13"] is not None:
        b13 = f["b13"]
        reduced = x.double()[src] @ b13.t() if share == "group" else torch.einsum("prk,pk->pr", b13[e], x.double()[src])
        held = hooks.reduced.double()[src if share == "group" else slice(None)]  # R as the kernel reads it
        assert relative_error(held, reduced) < eps
        g = (g + torch.einsum("pnr,pr->pn", f["a13"][e], held)).to(dtype).double()
    gate, up = g.chunk(2, dim=-1)
    assert relative_error(h, F.silu(gate).to(dtype).double() * up) < eps
    if f["a2"] is None:
        return
    shrunk = torch.einsum("prk,pk->pr", f["b2"][e], h.double())
    assert torch.allclose(hooks.partials.double().sum(0), shrunk, rtol=1e-4, atol=1e-4)
    out = hooks.moe_sum(w2_out, torch.empty(tokens, hidden, dtype=dtype), ids, None)
    expand = torch.einsum("pnr,pr->pn", f["a2"][e], shrunk) * weights.reshape(-1, 1).double()
    ref = w2_out.double() + expand.view(tokens, top_k, hidden)
    assert relative_error(out, ref.sum(dim=1)) < eps
    assert relative_error(w2_out.double().sum(dim=1), ref.sum(dim=1)) > 0.1  # the expand matters here


def test_fused_chunks_follow_the_batch(fused):
    assert fused.chunk_for(8, 768, fused.CHUNKS_I) == 32  # one token, top-8: 192 items
    assert fused.chunk_for(256, 768, fused.CHUNKS_I) == 64
    assert fused.chunk_for(1, 2048, fused.CHUNKS_H) == 32 and fused.chunk_for(32, 2048, fused.CHUNKS_H) == 128
    assert fused.chunk_for(1, 40, fused.CHUNKS_I) == 16  # nothing fills the programs: the smallest


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_fused_kernels_compile_for_hopper(dtype):
    """The three fused kernels at the configurations their launchers pick, compiled for sm_90."""
    from vllm_glowq.kernels import moe_fused_triton as k

    cases = [
        (k._activate_kernel, ("w13_ptr", "r_ptr", "a13_ptr", "b2_ptr", "h_ptr"), ("part_ptr",),
         ("num_pairs", "I", "R13", "R2", "ROW_DIV", "num_chunks", "stride_w13", "stride_r", "stride_a13e",
          "stride_b2e", "stride_h"),
         [dict(HAS13=True, HAS2=True, BLOCK_I=32), dict(HAS13=False, HAS2=True, BLOCK_I=64),
          dict(HAS13=True, HAS2=False, BLOCK_I=16)]),
        (k._sum_topk_kernel, ("w2_ptr", "a2_ptr", "out_ptr"), ("part_ptr", "weights_ptr"),
         ("num_tokens", "H", "R2", "num_chunks", "stride_w2", "stride_a2e", "stride_out"),
         [dict(TOP_K=8, BLOCK_H=32, BLOCK_C=16), dict(TOP_K=2, BLOCK_H=128, BLOCK_C=16)]),
        (k._shrink_pairs_kernel, ("x_ptr", "b_ptr", "r_ptr"), (),
         ("num_pairs", "N", "K", "TOP_K", "stride_x", "stride_be", "stride_r"), [dict(BLOCK_N=64, BLOCK_K=128)]),
    ]
    for fn, typed, floats, integers, configs in cases:
        for constexprs in configs:
            signature = {**{n: f"*{dtype}" for n in typed}, **{n: "*fp32" for n in floats}, "ids_ptr": "*i32",
                         **{n: "i32" for n in integers}, **{n: "constexpr" for n in constexprs}}
            signature = {n: signature[n] for n in fn.arg_names}
            assert compile_for_hopper(fn, signature, constexprs).asm["cubin"], (fn.__name__, constexprs)


def test_the_path_follows_the_pair_count(monkeypatch):
    """Fused up to FUSED_MAX_PAIRS pairs, grouped past it; any activation but the gated SiLU
    is refused by name on both paths."""
    monkeypatch.setattr(moe_marlin, "CorrectionHooks", lambda *args: "grouped")
    monkeypatch.setattr(moe_marlin, "BesideCorrectionHooks", lambda *args: "grouped")
    monkeypatch.setattr(moe_marlin, "FUSED_MAX_PAIRS", 32)  # shipped 0 (off); the rule, wherever it is set
    f = as_factors(make_factors(4, 32, 16, 4, "group"), torch.float32)
    small = moe_marlin.FUSED_MAX_PAIRS // 2  # tokens, at top-2
    big = small + 1
    x = torch.randn(big, 32)
    weights, ids = routing(big, 4, 2)
    assert moe_marlin.takes_fused_path(moe_marlin.FUSED_MAX_PAIRS) and not moe_marlin.takes_fused_path(big * 2)
    hooks = lambda n, activation="silu", fused=None: moe_marlin.correction_hooks(  # noqa: E731
        f, x[:n], weights[:n], ids[:n], 4, activation, fused)
    assert isinstance(hooks(1), moe_marlin.FusedCorrectionHooks) and isinstance(hooks(small), moe_marlin.FusedCorrectionHooks)
    assert hooks(big) == "grouped" and hooks(1, fused=False) == "grouped"
    assert isinstance(hooks(big, fused=True), moe_marlin.FusedCorrectionHooks)
    for fused in (True, False, None):
        with pytest.raises(ValueError, match="gated SiLU only"):
            hooks(1, "gelu", fused=fused)
    assert moe_marlin.correction_hooks(moe_marlin.ExpertFactors(), x, weights, ids, 4, "silu") is None
    int8 = f.to_int8()  # the grouped path only: the fused kernels take factors in the activation dtype
    assert not moe_marlin.takes_fused_path(1, int8) and moe_marlin.takes_fused_path(1, f)
    assert moe_marlin.correction_hooks(int8, x[:1], weights[:1], ids[:1], 4, "silu") == "grouped"
    with pytest.raises(ValueError, match="not int8"):
        moe_marlin.correction_hooks(int8, x[:1], weights[:1], ids[:1], 4, "silu", fused=True)


# ----- CPU: the callbacks around a stand-in for fused_marlin_moe ---------------------------------


def simulated_marlin(x, w13, w2, topk_weights, topk_ids, activation_func, moe_sum):
    """vLLM's fused_marlin_moe as its callbacks see it, on dense weights (working dtype)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    tokens, top_k = topk_ids.shape
    experts = topk_ids.reshape(-1).long()
    xp = x[torch.arange(tokens).repeat_interleave(top_k)]
    w13_out = torch.einsum("pnk,pk->pn", w13[experts], xp)
    hidden = w13_out.new_empty((w13_out.shape[0], w13_out.shape[1] // 2))
    activation_func(MoEActivation.SILU, hidden, w13_out, topk_ids=topk_ids, expert_map=None)
    w2_out = torch.einsum("pnk,pk->pn", w2[experts], hidden) * topk_weights.reshape(-1, 1).to(x.dtype)
    output = x.new_empty(x.shape)
    if moe_sum is None:
        return w2_out.view(tokens, top_k, -1).sum(dim=1)
    return moe_sum(w2_out.view(tokens, top_k, -1), output, topk_ids, None)


HOOK_CASES = [  # tokens, experts, top_k (Marlin's block sizes 8, 8, 48 and 64)
    (1, 4, 2), (9, 4, 2), (60, 4, 2), (120, 3, 2)]
# the fused path on the small cases only: the interpreter takes about 30 ms per (pair, chunk);
# the grouped path with its correction beside Marlin (as shipped) on all, inside the callbacks
# on two, beside Marlin with the w2 shrink inside the activation on two, and with its own sort
# (ONE_SORT off: block sizes 16 and 32) on two
PATH_CASES = ([("grouped", c) for c in HOOK_CASES] + [("fused", c) for c in HOOK_CASES[:2]]
              + [("grouped-in-callbacks", c) for c in HOOK_CASES[1:3]]
              + [("grouped-shrink-in-activation", c) for c in HOOK_CASES[1:3]]
              + [("grouped-two-sorts", c) for c in HOOK_CASES[1:3]])


@pytest.mark.parametrize("path,case", PATH_CASES, ids=lambda c: c if isinstance(c, str) else "-".join(map(str, c)))
@pytest.mark.parametrize("share", ["group", "module"])
@pytest.mark.parametrize("parts", ["both", "w13", "w2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_callbacks_add_the_correction(grouped, fused, path, case, share, parts, dtype, monkeypatch):
    monkeypatch.setattr(moe_marlin, "ONE_SORT", path != "grouped-two-sorts")
    monkeypatch.setattr(moe_marlin, "W2_SHRINK_BESIDE", path != "grouped-shrink-in-activation")
    check_callbacks(grouped, fused, path, case, share, parts, dtype)


@pytest.mark.parametrize("path", ["grouped", "grouped-in-callbacks", "grouped-shrink-in-activation"])
@pytest.mark.parametrize("share", ["group", "module"])
def test_callbacks_take_int8_factors(grouped, path, share, monkeypatch):
    """The grouped paths with A13, B2 and A2 as int8 codes (VLLM_GLOWQ_MOE_FACTORS=int8): the
    block equals the float64 block of the factors those codes stand for."""
    monkeypatch.setattr(moe_marlin, "W2_SHRINK_BESIDE", path != "grouped-shrink-in-activation")
    for case in HOOK_CASES[1:3]:
        check_callbacks(grouped, None, path, case, share, "both", torch.float16, int8=True)


@pytest.mark.parametrize("block_i,chunks", [(16, 1), (16, 3), (32, 2), (16, 4)])
def test_activation_takes_several_chunks_per_program(grouped, block_i, chunks, monkeypatch):
    """`activate` with ACTIVATE_CHUNKS chunks of ACTIVATE_BLOCK_I columns per program (I = 64:
    with 16 columns and 3 chunks the second program's last two chunks lie past I)."""
    monkeypatch.setattr(grouped, "ACTIVATE_BLOCK_I", block_i)
    monkeypatch.setattr(grouped, "ACTIVATE_CHUNKS", chunks)
    for case in HOOK_CASES[1:3]:
        check_callbacks(grouped, None, "grouped-in-callbacks", case, "group", "both", torch.float32)


def check_callbacks(grouped, fused, path: str, case: tuple, share: str, parts: str, dtype: torch.dtype,
                    int8: bool = False) -> None:
    """The block through `simulated_marlin` with the hooks of `path` against float64, and the
    plain block far from it (so the correction is what is checked); with `int8` the factors as
    int8 codes."""
    tokens, experts, top_k = case
    hidden, inter, rank = 96, 64, 8
    gen = torch.Generator().manual_seed(tokens)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / hidden**0.5).to(dtype).double()
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / inter**0.5).to(dtype).double()
    f = make_factors(experts, hidden, inter, rank, share, has13=parts != "w2", has2=parts != "w13", seed=tokens)
    weights, ids = routing(tokens, experts, top_k, seed=tokens)
    factors = as_int8_factors(f, dtype) if int8 else as_factors(f, dtype)
    if path == "fused":
        hooks = moe_marlin.FusedCorrectionHooks(factors, x, weights, ids, kernels=fused)
    else:
        align = lambda topk_ids, block_m, e: grouped.align_reference(topk_ids, block_m, e)  # noqa: E731
        hooks_class = moe_marlin.CorrectionHooks if path == "grouped-in-callbacks" else moe_marlin.BesideCorrectionHooks
        hooks = hooks_class(factors, x, weights, ids, experts, align=align, kernels=grouped)
    out = simulated_marlin(x, w13.to(dtype), w2.to(dtype), weights, ids, hooks.activation,
                           hooks.moe_sum if factors.a2 is not None else None)
    ref = reference_block(x, w13, w2, f, weights, ids)
    plain = reference_block(x, w13, w2, make_factors(experts, hidden, inter, rank, share, False, False), weights, ids)
    error = relative_error(out, ref)
    assert error < TOLERANCE[dtype], error
    assert relative_error(plain.float(), ref) > 30 * TOLERANCE[torch.float16]  # the correction matters here


# ----- CPU: layout glue ----------------------------------------------------------------------------


def test_unpacked_zero_points_give_vllms_marlin_layout():
    """The loader keeps zero points unpacked; Marlin's packing of them must equal what vLLM
    makes of the same zero points in the packed GPTQ-style layout (our nibble order)."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import moe_packed_to_marlin_zero_points

    zeros = torch.randint(0, 16, (3, 4, 256), dtype=torch.uint8)
    packed = torch.stack([pack_cols(z) for z in zeros])
    assert torch.equal(moe_marlin.marlin_zero_points(zeros), moe_packed_to_marlin_zero_points(packed, 4, 256, 4))


def test_call_binds_to_the_installed_fused_marlin_moe(monkeypatch):
    from vllm.model_executor.layers.fused_moe.experts import marlin_moe

    seen = {}
    signature = inspect.signature(marlin_moe.fused_marlin_moe)
    monkeypatch.setattr(marlin_moe, "fused_marlin_moe", lambda **kw: seen.update(signature.bind(**kw).arguments))
    int4 = moe_marlin.Int4Experts(*(torch.zeros(2, 4, 8) for _ in range(4)), None, None, torch.zeros(4))
    moe_marlin.forward(int4, moe_marlin.ExpertFactors(), torch.zeros(3, 64), torch.ones(3, 2), torch.zeros(3, 2),
                       activation="silu")
    assert seen["quant_type_id"] == moe_marlin.compat.int4_weight_type(sym=True).id
    assert "activation_func" not in seen and seen["moe_sum"] is None  # rank 0: Marlin alone


@pytest.mark.parametrize("tokens,experts,top_k", [(1, 128, 8), (16, 128, 8), (64, 128, 8), (120, 128, 8),
                                                   (256, 128, 8), (600, 128, 8), (2048, 128, 8), (3, 8, 2)])
def test_marlin_block_size_is_vllms(tokens, experts, top_k, monkeypatch):
    """compat.marlin_moe_block_size picks the block `fused_marlin_moe` of the installed vLLM sorts
    into (the grouped path's one sort must be the one Marlin would make)."""
    from vllm.model_executor.layers.fused_moe.experts import marlin_moe

    class Sorted(Exception):
        pass

    def record(topk_ids, block_size_m, *args, **kwargs):
        raise Sorted(block_size_m)

    monkeypatch.setattr(marlin_moe, "moe_align_block_size", record)
    hidden, inter = 128, 64
    with pytest.raises(Sorted) as sorted_at:
        marlin_moe.fused_marlin_moe(
            hidden_states=torch.zeros(tokens, hidden, dtype=torch.bfloat16),
            w1=torch.zeros(experts, hidden // 16, 4 * inter, dtype=torch.int32),
            w2=torch.zeros(experts, inter // 16, 2 * hidden, dtype=torch.int32), bias1=None, bias2=None,
            w1_scale=torch.zeros(1), w2_scale=torch.zeros(1), topk_weights=torch.ones(tokens, top_k),
            topk_ids=torch.zeros(tokens, top_k, dtype=torch.int32),
            quant_type_id=moe_marlin.compat.int4_weight_type(sym=True).id, global_num_experts=experts)
    assert sorted_at.value.args[0] == moe_marlin.compat.marlin_moe_block_size(tokens, top_k, experts)


def test_grouped_path_hands_its_sort_to_marlin(monkeypatch):
    """With ONE_SORT the grouped path sorts the pairs once, at Marlin's block size, and calls
    the installed vLLM's `_fused_marlin_moe` with that sort and its activation callback (the
    keywords bind to that version's signature); the result is summed over top_k."""
    from vllm.model_executor.layers.fused_moe.experts import marlin_moe

    from vllm_glowq.kernels.moe_lowrank_triton import align_reference

    tokens, experts, top_k, hidden, inter = 5, 4, 2, 64, 32
    seen = {}
    signature = inspect.signature(marlin_moe._fused_marlin_moe)

    def fake(**kwargs):
        seen.update(signature.bind(**kwargs).arguments)
        return torch.ones(tokens * top_k, hidden)

    monkeypatch.setattr(marlin_moe, "_fused_marlin_moe", fake)
    monkeypatch.setattr(moe_marlin.compat, "moe_align", align_reference)
    monkeypatch.setattr(moe_marlin, "ONE_SORT", True)
    int4 = moe_marlin.Int4Experts(*(torch.zeros(experts, 4, 8) for _ in range(4)), None, None, torch.zeros(4))
    # the w2 correction only: the stand-in calls no callback, so nothing is forked at construction
    factors = as_factors(make_factors(experts, hidden, inter, 4, "group", has13=False), torch.float32)
    weights, ids = routing(tokens, experts, top_k)
    out = moe_marlin.forward(int4, factors, torch.randn(tokens, hidden), weights, ids, "silu", fused=False)
    assert torch.equal(out, torch.full((tokens, hidden), float(top_k)))
    block = moe_marlin.compat.marlin_moe_block_size(tokens, top_k, experts)
    assert seen["block_size_m"] == block and seen["num_topk"] == top_k
    assert torch.equal(seen["sorted_token_ids"], align_reference(ids, block, experts).sorted_ids)
    assert isinstance(seen["activation_func"].__self__, moe_marlin.CorrectionHooks)


def test_unsupported_shapes_are_named():
    ok = moe_marlin.unsupported_reason(2048, 768, 128, 128, torch.bfloat16)
    assert ok is None
    assert "float32" in moe_marlin.unsupported_reason(2048, 768, 128, 128, torch.float32)
    assert "multiple of 64" in moe_marlin.unsupported_reason(2048, 96, 128, 96, torch.bfloat16)
    assert "multiple of 128" in moe_marlin.unsupported_reason(2000, 768, 80, 128, torch.bfloat16)
    assert "group_size=256" in moe_marlin.unsupported_reason(2048, 768, 256, 256, torch.bfloat16)
    assert moe_marlin.unsupported_reason(2048, 64, 128, 64, torch.float16) is None  # one group along I
    assert moe_marlin.marlin_group_size(768, 6) == 128 and moe_marlin.marlin_group_size(768, 1) == -1


@pytest.mark.parametrize("factors", ["full", "int8"])
def test_loaded_layer_hands_marlin_codes_and_factors_to_the_gpu_forward(factors, monkeypatch):
    """GlowQMoEMethod's GPU branch after loading (repack and forward stood in for): the codes
    are replaced by what repack returns under the same names, the factors reach the forward in
    the activation dtype (or, with VLLM_GLOWQ_MOE_FACTORS=int8, A13, B2 and A2 as int8 codes
    that replace the layer's parameters, B13 as it was), and the custom op's forward goes to
    moe_marlin.forward."""
    from vllm_glowq import moe
    from vllm_glowq.loading import ExpectedTensors

    e, h, i, r = 4, 64, 32, 8
    layer = torch.nn.Module()
    for name, shape, dtype in (("w13_qweight", (e, h // 8, 2 * i), torch.int32), ("w2_qweight", (e, i // 8, h), torch.int32),
                               ("w13_scales", (e, 1, 2 * i), torch.float16), ("w2_scales", (e, 1, h), torch.float16),
                               ("w13_glowq_B", (r, h), torch.float16), ("w13_glowq_A", (e, 2 * i, r), torch.float16),
                               ("w2_glowq_B", (e, r, i), torch.float16), ("w2_glowq_A", (e, h, r), torch.float16)):
        layer.register_parameter(name, torch.nn.Parameter(torch.ones(shape, dtype=dtype), requires_grad=False))
    layer.activation = "silu"
    method = moe.GlowQMoEMethod.__new__(moe.GlowQMoEMethod)
    method.prefix, method.on_gpu, method.params_dtype = "test.mlp.experts", True, torch.bfloat16
    method.own_kernels, method.codes, method.factors = False, None, None
    method.expected = ExpectedTensors(method.prefix)
    marlin = [torch.full((e, 7), v) for v in range(4)]
    monkeypatch.setattr(moe_marlin, "repack", lambda *args: moe_marlin.Int4Experts(*marlin, None, None, torch.zeros(2)))
    monkeypatch.setattr(moe_marlin, "FOLD_INTO_CODES", False)  # tests/test_moe_fold.py loads folded layers
    monkeypatch.setenv("VLLM_GLOWQ_MOE_FACTORS", factors)
    method.process_weights_after_loading(layer)
    assert layer.w13_qweight.data_ptr() == marlin[0].data_ptr() and layer.w2_scales.data_ptr() == marlin[3].data_ptr()
    assert not hasattr(layer, "w13_qzeros")
    factors = method.factors
    assert factors.b13 is layer.w13_glowq_B and factors.a2 is layer.w2_glowq_A and factors.a13 is layer.w13_glowq_A
    assert factors.b13.dtype == torch.bfloat16 and factors.any
    if factors.int8:
        assert {layer.w13_glowq_A.dtype, layer.w2_glowq_B.dtype, layer.w2_glowq_A.dtype} == {torch.int8}
        assert factors.a2_scale is layer.w2_glowq_A_scale and factors.a13_scale.shape == (e, 2 * i)
    else:
        assert factors.b2.dtype == torch.bfloat16 and not hasattr(layer, "w2_glowq_A_scale")
    seen = {}
    monkeypatch.setattr(moe_marlin, "forward", lambda *args: seen.setdefault("args", args) and torch.zeros(1))
    torch.ops.glowq.moe(torch.zeros(2, h), torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32), method.prefix)
    assert seen["args"][0] is method.int4 and seen["args"][1] is factors and seen["args"][5] == "silu"


# ----- GPU: the whole block through vLLM's Marlin MoE kernels -------------------------------------


def make_codes(num_experts: int, k: int, n: int, group: int, sym: bool, dtype: torch.dtype, gen) -> dict:
    """Random codes in the checkpoint layout (per expert), scales representable in `dtype` (the
    kernel's scales), and the float64 dense weights [E, N, K] they stand for."""
    groups = k // group
    codes = torch.randint(0, 16, (num_experts, k, n), generator=gen)
    scales = (torch.rand(num_experts, groups, n, generator=gen) * 0.01 + 0.004).to(dtype).to(torch.float16)
    zeros = None if sym else torch.randint(0, 16, (num_experts, groups, n), generator=gen, dtype=torch.uint8)
    qweight = torch.stack([pack_rows(c) for c in codes])
    return dict(qweight=qweight, scales=scales, zeros=zeros, dense=dense_of(qweight, scales, zeros))


def dense_of(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None) -> torch.Tensor:
    """[E, N, K] float64 of GPTQ-layout codes per expert (zero points unpacked uint8, or None)."""
    return torch.stack([dequantize(qweight[e], scales[e], None if zeros is None else pack_cols(zeros[e]),
                                   dtype=torch.float64) for e in range(qweight.shape[0])])


GPU_CASES = [  # experts, top_k, rank, share, sym
    (8, 2, 16, "group", True), (8, 2, 0, "group", True), (64, 8, 16, "group", False), (64, 8, 16, "module", True),
    (64, 8, 0, "group", False), (8, 2, 16, "module", False)]
GPU_TOKENS = [1, 3, 16, 64, 257, 600]
# moe_marlin.forward's `fused`; "grouped-in-callbacks": the grouped path's correction inside Marlin's
# callbacks; "grouped-serial": that with its own sort and R in series too
FORCED_PATH = {"fused": True, "grouped": False, "grouped-in-callbacks": False, "grouped-serial": False,
               "grouped-shrink-in-activation": False, "grouped-int8": False, "default": None, "gemv": None}


def set_path(path: str, monkeypatch) -> None:
    """The module switches a test path stands for (the decode GEMVs on up to 32 pairs; the
    grouped path in the callbacks, and as it ran before ONE_SORT and R_ON_SIDE_STREAM)."""
    if path == "gemv":
        monkeypatch.setattr(moe_marlin, "GEMV_MAX_PAIRS", 32)
    if path in ("grouped-in-callbacks", "grouped-serial"):
        monkeypatch.setattr(moe_marlin, "CORRECTION_BESIDE", False)
    if path == "grouped-shrink-in-activation":
        monkeypatch.setattr(moe_marlin, "W2_SHRINK_BESIDE", False)
    if path == "grouped-serial":
        monkeypatch.setattr(moe_marlin, "ONE_SORT", False)
        monkeypatch.setattr(moe_marlin, "R_ON_SIDE_STREAM", False)
GPU_SHAPE = dict(hidden=512, inter=256, group=128)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("path", ["fused", "grouped", "grouped-in-callbacks", "grouped-serial",
                                  "grouped-shrink-in-activation", "grouped-int8", "default", "gemv"])
def test_gpu_block_matches_float64(dtype, case, path, monkeypatch):
    """Every token count on the path asked for (the fused one past FUSED_MAX_PAIRS too; the
    default's own choice; with `gemv` the decode GEMVs on the Marlin codes switched on up to 32
    pairs, where the codes are symmetric)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    set_path(path, monkeypatch)
    experts, top_k, rank, share, sym = case
    h, i, g = GPU_SHAPE["hidden"], GPU_SHAPE["inter"], GPU_SHAPE["group"]
    gen = torch.Generator().manual_seed(experts + rank)
    w13, w2 = make_codes(experts, h, 2 * i, g, sym, dtype, gen), make_codes(experts, i, h, g, sym, dtype, gen)
    on = lambda t: None if t is None else t.cuda()  # noqa: E731
    int4 = moe_marlin.repack(on(w13["qweight"]), on(w13["scales"]), on(w13["zeros"]), on(w2["qweight"]),
                             on(w2["scales"]), on(w2["zeros"]), dtype)
    f = make_factors(experts, h, i, rank, share, has13=rank > 0, has2=rank > 0)
    plain = {k: None for k in f}
    factors = (as_int8_factors if path == "grouped-int8" else as_factors)(f, dtype, "cuda")
    for tokens in GPU_TOKENS:
        x = torch.randn(tokens, h, generator=gen).to(dtype)
        weights, ids = routing(tokens, experts, top_k, seed=tokens)
        out = moe_marlin.forward(int4, factors, x.cuda(), weights.cuda(), ids.cuda(), MoEActivation.SILU,
                                 fused=FORCED_PATH[path])
        ref = reference_block(x, w13["dense"], w2["dense"], f, weights, ids)
        error = relative_error(out.cpu(), ref)
        assert error < TOLERANCE[dtype], (tokens, error)
        if rank:  # negative control: without the correction the same bar must fail clearly
            uncorrected = reference_block(x, w13["dense"], w2["dense"], plain, weights, ids)
            assert relative_error(uncorrected.float(), ref) > 5 * TOLERANCE[dtype], tokens


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
@pytest.mark.parametrize("share", ["group", "module"])
@pytest.mark.parametrize("path", ["fused", "grouped", "grouped-in-callbacks", "grouped-serial",
                                  "grouped-shrink-in-activation", "grouped-int8", "gemv"])
def test_gpu_block_inside_a_cuda_graph(tokens, share, path, monkeypatch):
    """Captured once, replayed on new inputs copied into the captured buffers (with the grouped
    path's second stream inside the graph)."""
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    set_path(path, monkeypatch)

    experts, top_k, rank, dtype = 64, 8, 16, torch.bfloat16
    h, i, g = GPU_SHAPE["hidden"], GPU_SHAPE["inter"], GPU_SHAPE["group"]
    gen = torch.Generator().manual_seed(tokens)
    w13, w2 = make_codes(experts, h, 2 * i, g, True, dtype, gen), make_codes(experts, i, h, g, True, dtype, gen)
    int4 = moe_marlin.repack(w13["qweight"].cuda(), w13["scales"].cuda(), None, w2["qweight"].cuda(),
                             w2["scales"].cuda(), None, dtype)
    f = make_factors(experts, h, i, rank, share)
    factors = (as_int8_factors if path == "grouped-int8" else as_factors)(f, dtype, "cuda")
    check_graph_replays(lambda x, weights, ids: moe_marlin.forward(int4, factors, x, weights, ids, MoEActivation.SILU,
                                                                   fused=FORCED_PATH[path]),
                        tokens, h, experts, top_k, dtype, (w13["dense"], w2["dense"], f))


def check_graph_replays(block, tokens: int, hidden: int, experts: int, top_k: int, dtype: torch.dtype,
                        reference: tuple) -> None:
    """`block(x, weights, ids)` captured once in a CUDA graph, replayed on new inputs copied
    into the captured buffers, each replay against the float64 reference of (w13, w2, factors)."""
    x = torch.zeros(tokens, hidden, device="cuda", dtype=dtype)
    weights = torch.zeros(tokens, top_k, device="cuda")
    ids = torch.zeros(tokens, top_k, device="cuda", dtype=torch.int32)
    graph, out = capture(lambda: block(x, weights, ids))
    for seed in range(3):
        fresh_x = torch.randn(tokens, hidden, generator=torch.Generator().manual_seed(seed)).to(dtype)
        fresh_w, fresh_ids = routing(tokens, experts, top_k, seed=seed + 10)
        x.copy_(fresh_x)
        weights.copy_(fresh_w)
        ids.copy_(fresh_ids)
        graph.replay()
        torch.cuda.synchronize()
        ref = reference_block(fresh_x, *reference, fresh_w, fresh_ids)
        assert relative_error(out.cpu(), ref) < TOLERANCE[dtype], seed


def test_decode_gemvs_take_symmetric_codes_up_to_their_pair_count(monkeypatch):
    """With GEMV_MAX_PAIRS set, moe_marlin.forward hands symmetric experts' small steps to the
    pairs path on the same codes (no Marlin call), and keeps Marlin past it, for asymmetric
    codes and when a correction path is forced; off (0) it never does."""
    from vllm_glowq import moe_triton

    calls = []
    monkeypatch.setattr(moe_triton, "forward", lambda *args, **kwargs: calls.append(kwargs["path"]) or "gemv")
    monkeypatch.setattr(moe_marlin.compat, "fused_marlin_moe", lambda **kwargs: "marlin")
    sym = moe_marlin.Int4Experts(*[torch.zeros(1)] * 4, None, None, torch.zeros(1), gemv=("w13", "w2"))
    asym = moe_marlin.Int4Experts(*[torch.zeros(1)] * 7)
    x, weights = torch.randn(5, 8), torch.rand(5, 2)
    ids = torch.zeros(5, 2, dtype=torch.int32)
    run = lambda experts, tokens, fused=None: moe_marlin.forward(  # noqa: E731
        experts, moe_marlin.ExpertFactors(), x[:tokens], weights[:tokens], ids[:tokens], "silu", fused)
    assert moe_marlin.GEMV_MAX_PAIRS == 0 and run(sym, 1) == "marlin"  # off until a GPU has timed them
    monkeypatch.setattr(moe_marlin, "GEMV_MAX_PAIRS", 4)
    assert run(sym, 2) == "gemv" and calls == ["pairs"]
    assert run(sym, 3) == "marlin" and run(asym, 1) == "marlin" and run(sym, 1, fused=True) == "marlin"
