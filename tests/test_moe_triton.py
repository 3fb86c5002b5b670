"""The project's own int4 MoE kernels (kernels/moe_w4a16_triton.py, vllm_glowq/moe_triton.py)
against a float64 reference.

* CPU, Triton's interpreter: the whole expert block on both paths (pairs and sorted blocks,
  each forced) on odd shapes (column tiles past I and H, K split into several chunks, stale
  blocks past the aligned pairs), shared and per-module B, GlowQ-S layers with one of the two
  corrections, rank 0, symmetric and asymmetric codes, fp16 (bf16 too on the pairs path: the
  interpreter has no bfloat16 arithmetic for the tensor-core products); the K split and the
  tickets the pairs path leaves zeroed for the next launch; the kernels compiled for sm_90 by
  Triton's NVIDIA backend (no GPU needed).
* GPU (skipped without CUDA): the same block on the real kernels at Qwen3-MoE-like shapes, 1
  to 600 tokens, with a negative control, and inside a CUDA graph.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from interpreter import load_interpreted  # noqa: E402
from test_moe_marlin import (  # noqa: E402
    TOLERANCE,
    as_factors,
    check_graph_replays,
    compile_for_hopper,
    spilled_bytes,
    make_codes,
    make_factors,
    reference_block,
    relative_error,
    routing,
)

from vllm_glowq import moe_triton
from vllm_glowq.kernels.moe_lowrank_triton import align_reference

KERNELS_DIR = Path(moe_triton.__file__).parent / "kernels"
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# Triton's interpreter truncates float32 to bfloat16 where a GPU rounds to nearest (half the
# values of a random tensor come out one ulp lower), about doubling bf16's rounding error
INTERPRETER_TOLERANCE = {**TOLERANCE, torch.bfloat16: 2 * TOLERANCE[torch.bfloat16]}


@pytest.fixture(scope="module")
def kernels():
    """The kernel module in Triton's interpreter, with the dense kernel's and the fused path's
    helpers (and the per-pair shrink) interpreted too."""
    pytest.importorskip("triton")
    return load_interpreted(KERNELS_DIR / "moe_w4a16_triton.py", "glowq_moe_w4a16_interpreted",
                            helpers=("vllm_glowq.kernels.w4a16_triton", "vllm_glowq.kernels.moe_fused_triton"))


def codes_and_block(experts, hidden, inter, group, sym, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    w13, w2 = make_codes(experts, hidden, 2 * inter, group, sym, dtype, gen), make_codes(experts, inter, hidden, group,
                                                                                         sym, dtype, gen)
    pack = lambda w: moe_triton.repack(w["qweight"], w["scales"], w["zeros"], dtype)  # noqa: E731
    return w13, w2, pack(w13), pack(w2), gen


# tokens, experts, top_k, hidden, inter, group: I and H off the 64-column tiles, K in several blocks
CPU_CASES = [(1, 4, 2, 128, 48, 32), (3, 5, 3, 64, 80, 16), (6, 3, 1, 96, 32, 32), (9, 8, 2, 64, 64, 64)]


# each variant on two of the shapes, and on each path once (the whole product took four times as long)
CPU_VARIANT_CASES = [
    ("group-sym", CPU_CASES[0]), ("group-sym", CPU_CASES[1]), ("module-asym", CPU_CASES[1]),
    ("module-asym", CPU_CASES[2]), ("gate-up-only-asym", CPU_CASES[0]), ("gate-up-only-asym", CPU_CASES[3]),
    ("down-only-sym", CPU_CASES[2]), ("down-only-sym", CPU_CASES[3]), ("rank0-sym", CPU_CASES[0]),
    ("rank0-sym", CPU_CASES[3])]
CPU_PATH_CASES = [(path, variant, case) for i, (variant, case) in enumerate(CPU_VARIANT_CASES)
                  for j, path in enumerate(moe_triton.PATHS) if (i + j) % 2 == 0]


@pytest.mark.parametrize("path,variant,case", CPU_PATH_CASES,
                         ids=lambda v: v if isinstance(v, str) else "-".join(map(str, v)))
def test_block_matches_float64_in_the_interpreter(kernels, case, path, variant):
    tokens, experts, top_k, hidden, inter, group = case
    share = "module" if variant.startswith("module") else "group"
    rank = 0 if variant.startswith("rank0") else 8
    # the interpreter has no bfloat16 arithmetic for tl.dot's operands: bf16 on the pairs path only
    dtype = torch.float16 if sum(case) % 2 or path == "blocks" else torch.bfloat16
    w13, w2, codes13, codes2, gen = codes_and_block(experts, hidden, inter, group, variant.endswith("sym") and
                                                    not variant.endswith("asym"), dtype, sum(case))
    f = make_factors(experts, hidden, inter, max(rank, 1), share, has13=rank > 0 and variant != "down-only-sym",
                     has2=rank > 0 and variant != "gate-up-only-asym", seed=tokens)
    factors = as_factors(f, dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weights, ids = routing(tokens, experts, top_k, seed=tokens + 1)
    out = moe_triton.forward(codes13, codes2, factors, x, weights, ids, path=path, align=align_reference,
                             kernels=kernels)
    ref = reference_block(x, w13["dense"], w2["dense"], f, weights, ids)
    assert relative_error(out, ref) < INTERPRETER_TOLERANCE[dtype]
    if f["a13"] is not None or f["a2"] is not None:  # negative control: the correction is really there
        plain = reference_block(x, w13["dense"], w2["dense"], {k: None for k in f}, weights, ids)
        assert relative_error(plain.float(), ref) > 5 * INTERPRETER_TOLERANCE[dtype]


def test_pairs_path_splits_k_and_leaves_its_tickets_zeroed(kernels):
    """One token: few tiles, so K is split into several chunks per tile, and the launch's first
    programs compute R; a second call (what a CUDA-graph replay does) gives the same output on
    the same workspace."""
    hidden, inter, experts, dtype = 256, 64, 4, torch.bfloat16
    w13, w2, codes13, codes2, gen = codes_and_block(experts, hidden, inter, 32, True, dtype, 3)
    f = make_factors(experts, hidden, inter, 8, "group")
    factors = as_factors(f, dtype)
    x = torch.randn(1, hidden, generator=gen).to(dtype)
    weights, ids = routing(1, experts, 2, seed=5)
    space = kernels.workspace(x.device)
    assert kernels.pairs_split(2 * 1, hidden // 32, space.sm_count) > 1
    first = moe_triton.forward(codes13, codes2, factors, x, weights, ids, path="pairs", kernels=kernels)
    assert int(space.sync.abs().sum()) == 0 and int(space.counters.abs().sum()) == 0  # tickets, the shrink's counts
    again = moe_triton.forward(codes13, codes2, factors, x, weights, ids, path="pairs", kernels=kernels)
    assert torch.equal(first, again)
    assert relative_error(first, reference_block(x, w13["dense"], w2["dense"], f, weights, ids)) < TOLERANCE[dtype]


def test_split_is_a_divisor_near_the_wanted_programs(kernels):
    assert kernels.pairs_split(8 * 12, 16, 132) == 16  # one token of Qwen3-30B-A3B's w13: as many as K allows
    assert kernels.pairs_split(1000, 16, 132) == 2
    assert kernels.pairs_split(5000, 6, 132) == 1
    assert 6 % kernels.pairs_split(8 * 32 * 8, 6, 132) == 0


def test_paths_follow_the_pair_count():
    assert moe_triton.path_for(8) == "pairs" and moe_triton.path_for(moe_triton.PAIRS_MAX_PAIRS) == "pairs"
    assert moe_triton.path_for(moe_triton.PAIRS_MAX_PAIRS + 1) == "rows"
    assert moe_triton.path_for(moe_triton.ROWS_MAX_PAIRS + 1) == "blocks"
    assert moe_triton.rows_block_m(128, 128) == 2 and moe_triton.rows_block_m(512, 128) == 4  # 16 and 64 tokens


def test_rows_split_fits_the_workspace(kernels):
    """The rows path splits K no finer than the partials the workspace holds."""
    space = kernels.Workspace(torch.device("cpu"))
    space.reserve(3 * 100, 0)
    assert kernels._rows_split(1, 16, 100, space) == 2  # wanted 16; 4 would need 400 floats
    space.reserve(10_000, 0)
    assert kernels._rows_split(1, 16, 100, space) == 16


def test_unsupported_shapes_are_named():
    assert "float32" in moe_triton.unsupported_reason(128, 64, 128, 64, torch.float32)
    assert "hidden size 72 with group_size=72" in moe_triton.unsupported_reason(72, 64, 72, 64, torch.bfloat16)
    assert moe_triton.unsupported_reason(2048, 768, 128, 128, torch.bfloat16) is None


# the own kernels' integers that are multiples of 16 on Qwen3-30B-A3B's experts besides every
# stride: sizes and ranks (not the counts: pairs, tokens, top_k, chunks, splits, programs)
OWN_ALIGNED = ("I", "K", "H", "N", "R13", "R2", "group_size", "k_chunk", "shrink_chunk")


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_kernels_compile_for_hopper(dtype):
    """Every kernel with the launch's constexprs, compiled for sm_90 by Triton's NVIDIA backend."""
    from vllm_glowq.kernels import moe_w4a16_triton as k

    def compile_one(fn, pointers: dict, constexprs: dict, warps: int):
        names = [n for n in fn.arg_names if n not in constexprs]
        signature = {n: (f"*{pointers.get(n, dtype)}" if n.endswith("_ptr") else "i32") for n in names}
        signature.update({n: "constexpr" for n in constexprs})
        aligned = tuple(n for n in names if n.startswith("stride_") or n in OWN_ALIGNED)
        kernel = compile_for_hopper(fn, signature, constexprs, warps, aligned=aligned)
        assert kernel.asm["cubin"]
        assert spilled_bytes(kernel) in (0, None), (fn.__name__, constexprs, warps)  # the launch's warps fit

    ints = dict(qw_ptr="i32", z_ptr="u8", perm_ptr="i32", ids_ptr="i32", sync_ptr="i32", counters_ptr="i32",
                gemm_ptr="fp32", part_ptr="fp32", r_ptr="fp32", weights_ptr="fp32", sorted_ptr="i32",
                expert_ptr="i32", padded_ptr="i32")
    magic = dict(bf16=(0x4300, 128.0), fp16=(0x6400, 1024.0))[dtype]
    for zeros, corrected, marlin in ((False, True, False), (True, False, False), (False, True, True),
                                     (False, False, True)):
        compile_one(k._gate_up_pairs_kernel, ints, dict(HAS_ZEROS=zeros, HAS13=corrected, HAS2=corrected,
                                                        SHRINK=corrected, BN=64, BK=128, SPLITS=16, PREFETCH=False,
                                                        BLOCK_R=16, SHRINK_BK=32, MARLIN=marlin), k.PAIRS_WARPS)
        compile_one(k._down_pairs_kernel, ints, dict(TOP_K=8, HAS_ZEROS=zeros, HAS2=corrected, BN=64, BK=128,
                                                     BLOCK_C=16, SPLITS=16, PREFETCH=False, MARLIN=marlin),
                    k.PAIRS_WARPS)
        if marlin:
            continue
        for block_m, (block_n, warps) in k.ROWS_LAUNCH.items():
            compile_one(k._gate_up_rows_kernel, ints, dict(HAS_ZEROS=zeros, HAS13=corrected, HAS2=corrected,
                                                           BLOCK_M=block_m, BN=block_n, BK=128, SPLITS=16), warps)
            compile_one(k._down_rows_kernel, ints, dict(TOP_K=8, HAS_ZEROS=zeros, HAS2=corrected, BLOCK_M=block_m,
                                                        BN=block_n, BK=128, BLOCK_C=16, SPLITS=16), warps)
        for block_m in (16, 32, 64):
            compile_one(k._gate_up_blocks_kernel, ints, dict(
                HAS_ZEROS=zeros, HAS13=corrected, HAS2=corrected, BLOCK_M=block_m, BN=64, BK=128, BLOCK_R13=64,
                BLOCK_R2=64, MAGIC=magic[0], MAGIC_VALUE=magic[1]), k.blocks_warps(block_m))
            compile_one(k._down_blocks_kernel, ints, dict(
                HAS_ZEROS=zeros, HAS2=corrected, BLOCK_M=block_m, BN=64, BK=128, BLOCK_R2=64, MAGIC=magic[0],
                MAGIC_VALUE=magic[1]), k.blocks_warps(block_m))


def test_loaded_layer_hands_own_codes_and_factors_to_the_gpu_forward(monkeypatch):
    """GlowQMoEMethod's branch for VLLM_GLOWQ_KERNEL=glowq after loading (the real repack, the
    forward stood in for): the codes and scales are replaced by the kernels' layout under the
    same names, the asymmetric zero points stay unpacked, and the custom op goes to
    moe_triton.forward with the factors in the activation dtype."""
    from vllm_glowq import moe
    from vllm_glowq.loading import ExpectedTensors
    from vllm_glowq.packing import unrepack_planes

    e, h, i, r, g = 4, 64, 32, 8, 32
    gen = torch.Generator().manual_seed(0)
    layer = torch.nn.Module()
    shapes = {"w13_qweight": (e, h // 8, 2 * i), "w2_qweight": (e, i // 8, h), "w13_scales": (e, h // g, 2 * i),
              "w2_scales": (e, i // g, h), "w13_qzeros": (e, h // g, 2 * i), "w2_qzeros": (e, i // g, h),
              "w13_glowq_B": (r, h), "w13_glowq_A": (e, 2 * i, r), "w2_glowq_B": (e, r, i), "w2_glowq_A": (e, h, r)}
    for name, shape in shapes.items():
        if name.endswith(("scales", "glowq_A", "glowq_B")):
            data = torch.rand(shape, generator=gen).half()
        else:  # codes int32 (any bits), zero points uint8 codes
            data = torch.randint(0, 15, shape, generator=gen).to(torch.int32 if "qweight" in name else torch.uint8)
        layer.register_parameter(name, torch.nn.Parameter(data, requires_grad=False))
    gptq = layer.w13_qweight.data.clone()
    method = moe.GlowQMoEMethod.__new__(moe.GlowQMoEMethod)
    method.prefix, method.on_gpu, method.own_kernels = "own.mlp.experts", True, True
    method.params_dtype = torch.bfloat16
    method.plan = moe.ExpertsPlan(method.prefix, ("gate_proj", "up_proj", "down_proj"), e, h, i, i, 0)
    method.expected = ExpectedTensors(method.prefix)
    method.int4 = method.codes = method.factors = None
    method.process_weights_after_loading(layer)
    w13, w2 = method.codes
    assert layer.w13_qweight is not None and layer.w13_qweight.data_ptr() == w13.qweight.data_ptr()
    assert torch.equal(unrepack_planes(w13.qweight[1], w13.block_k), gptq[1])
    assert layer.w2_scales.dtype == torch.bfloat16 and w2.zeros.dtype == torch.uint8 and w2.group_size == g
    factors = method.factors
    assert factors.b13 is layer.w13_glowq_B and factors.a2.dtype == torch.bfloat16
    seen = {}
    monkeypatch.setattr(moe_triton, "forward", lambda *args: seen.setdefault("args", args) and torch.zeros(1))
    torch.ops.glowq.moe(torch.zeros(2, h), torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32), method.prefix)
    assert seen["args"][0] is w13 and seen["args"][1] is w2 and seen["args"][2] is factors


# ----- GPU -------------------------------------------------------------------------------------

GPU_CASES = [  # experts, top_k, rank, share, sym
    (8, 2, 16, "group", True), (64, 8, 16, "group", False), (64, 8, 16, "module", True), (64, 8, 0, "group", True)]
GPU_TOKENS = [1, 3, 8, 16, 64, 257, 600]
GPU_SHAPE = dict(hidden=512, inter=256, group=128)


def gpu_block(experts, dtype, sym, seed):
    h, i, g = GPU_SHAPE["hidden"], GPU_SHAPE["inter"], GPU_SHAPE["group"]
    w13, w2, codes13, codes2, gen = codes_and_block(experts, h, i, g, sym, dtype, seed)
    on = lambda c: moe_triton.ExpertCodes(c.qweight.cuda(), c.scales.cuda(),  # noqa: E731
                                          None if c.zeros is None else c.zeros.cuda(), c.group_size, c.block_k)
    moe_triton.reserve(torch.device("cuda"), h, i, codes13, codes2)
    return w13, w2, on(codes13), on(codes2), gen


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("path", moe_triton.PATHS)
def test_gpu_block_matches_float64(dtype, case, path):
    experts, top_k, rank, share, sym = case
    w13, w2, codes13, codes2, gen = gpu_block(experts, dtype, sym, experts + rank)
    f = make_factors(experts, GPU_SHAPE["hidden"], GPU_SHAPE["inter"], max(rank, 1), share, has13=rank > 0,
                     has2=rank > 0)
    factors = as_factors(f, dtype, "cuda")
    for tokens in GPU_TOKENS:
        if path == "pairs" and tokens * top_k > 4 * moe_triton.PAIRS_MAX_PAIRS:
            continue
        x = torch.randn(tokens, GPU_SHAPE["hidden"], generator=gen).to(dtype)
        weights, ids = routing(tokens, experts, top_k, seed=tokens)
        out = moe_triton.forward(codes13, codes2, factors, x.cuda(), weights.cuda(), ids.cuda(),
                                 path=path)
        ref = reference_block(x, w13["dense"], w2["dense"], f, weights, ids)
        assert relative_error(out.cpu(), ref) < TOLERANCE[dtype], (tokens, relative_error(out.cpu(), ref))
        if rank:
            plain = reference_block(x, w13["dense"], w2["dense"], {k: None for k in f}, weights, ids)
            assert relative_error(plain.float(), ref) > 5 * TOLERANCE[dtype], tokens


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64, 80])  # the pairs, rows (two block sizes) and blocks paths
@pytest.mark.parametrize("share", ["group", "module"])
def test_gpu_block_inside_a_cuda_graph(tokens, share):
    """Captured once (the path the pair count picks), replayed on new inputs."""
    experts, top_k, dtype = 64, 8, torch.bfloat16
    w13, w2, codes13, codes2, _ = gpu_block(experts, dtype, True, tokens)
    f = make_factors(experts, GPU_SHAPE["hidden"], GPU_SHAPE["inter"], 16, share)
    factors = as_factors(f, dtype, "cuda")
    check_graph_replays(lambda x, weights, ids: moe_triton.forward(codes13, codes2, factors, x, weights, ids), tokens,
                        GPU_SHAPE["hidden"], experts, top_k, dtype, (w13["dense"], w2["dense"], f))


# ----- the pairs path on Marlin's layout (moe_marlin.decode_views) ---------------------------------

# tokens, experts, top_k, hidden, inter, group (None: one group per column); hidden and inter multiples
# of 64, as Marlin MoE needs (moe_marlin.unsupported_reason)
MARLIN_CASES = [(1, 4, 2, 128, 64, 32), (3, 5, 3, 64, 128, 64), (2, 3, 2, 128, 64, None)]


def marlin_experts(w13: dict, w2: dict, dtype: torch.dtype):
    """The codes as vLLM's Marlin MoE kernels hold them (vLLM's own reference packing and scale
    permutation), with the views the decode GEMVs read."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import marlin_moe_permute_scales
    from vllm.model_executor.layers.quantization.utils.marlin_utils_test import get_weight_perm, marlin_weights

    from vllm_glowq import moe_marlin
    from vllm_glowq.packing import unpack_rows

    def one(w):
        experts, k, n = w["qweight"].shape[0], w["qweight"].shape[1] * 8, w["qweight"].shape[2]
        codes = torch.stack([marlin_weights(unpack_rows(q), k, n, 4, get_weight_perm(4)) for q in w["qweight"]])
        groups = w["scales"].shape[1]
        scales = marlin_moe_permute_scales(w["scales"].to(dtype), k, n, moe_marlin.marlin_group_size(k, groups))
        return codes, scales, groups

    (c13, s13, g13), (c2, s2, g2) = one(w13), one(w2)
    int4 = moe_marlin.Int4Experts(c13, c2, s13, s2, None, None, torch.zeros(1))
    return moe_marlin.decode_views(int4, g13, g2)


@pytest.mark.parametrize("case", MARLIN_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("rank", [8, 0])
def test_pairs_path_reads_marlins_layout(kernels, case, rank):
    """The decode GEMVs on the Marlin codes (grouped and per-column scales) against float64, with
    the correction (shared B, R computed in the w13 launch) and without (plain int4)."""
    pytest.importorskip("vllm.model_executor.layers.quantization.utils.marlin_utils_test")
    tokens, experts, top_k, hidden, inter, group = case
    dtype = torch.bfloat16 if rank else torch.float16
    gen = torch.Generator().manual_seed(tokens + hidden + inter)
    w13 = make_codes(experts, hidden, 2 * inter, group or hidden, True, dtype, gen)
    w2 = make_codes(experts, inter, hidden, group or inter, True, dtype, gen)
    codes13, codes2 = marlin_experts(w13, w2, dtype)
    f = make_factors(experts, hidden, inter, max(rank, 1), "group", has13=rank > 0, has2=rank > 0, seed=tokens)
    factors = as_factors(f, dtype)
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weights, ids = routing(tokens, experts, top_k, seed=tokens + 1)
    out = moe_triton.forward(codes13, codes2, factors, x, weights, ids, path="pairs", kernels=kernels)
    ref = reference_block(x, w13["dense"], w2["dense"], f, weights, ids)
    assert relative_error(out, ref) < INTERPRETER_TOLERANCE[dtype]
    with pytest.raises(ValueError, match="pairs path only"):
        moe_triton.forward(codes13, codes2, factors, x, weights, ids, path="rows", kernels=kernels)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rank,share", [(16, "group"), (16, "module"), (0, "group")])
def test_gpu_pairs_path_on_marlins_layout(dtype, rank, share):
    """The decode GEMVs on the Marlin layout (computed in torch, as bench/moe_microbench.py
    --own-only does: no vLLM needed) at 1 to 4 tokens of top-8, against float64, and inside a
    CUDA graph."""
    import moe_microbench

    from vllm_glowq import moe_marlin

    experts, top_k, h, i = 64, 8, GPU_SHAPE["hidden"], GPU_SHAPE["inter"]
    gen = torch.Generator().manual_seed(rank + len(share))
    w13 = make_codes(experts, h, 2 * i, GPU_SHAPE["group"], True, dtype, gen)
    w2 = make_codes(experts, i, h, GPU_SHAPE["group"], True, dtype, gen)
    (c13, s13), (c2, s2) = (moe_microbench.marlin_layout(w["qweight"].cuda(), w["scales"].to(dtype).cuda())
                            for w in (w13, w2))
    int4 = moe_marlin.Int4Experts(c13, c2, s13, s2, None, None, torch.zeros(1, device="cuda"))
    codes13, codes2 = moe_marlin.decode_views(int4, w13["scales"].shape[1], w2["scales"].shape[1])
    moe_triton.reserve(torch.device("cuda"), h, i, codes13, codes2)
    f = make_factors(experts, h, i, max(rank, 1), share, has13=rank > 0, has2=rank > 0)
    factors = as_factors(f, dtype, "cuda")
    for tokens in (1, 3, 4):
        x = torch.randn(tokens, h, generator=gen).to(dtype)
        weights, ids = routing(tokens, experts, top_k, seed=tokens)
        out = moe_triton.forward(codes13, codes2, factors, x.cuda(), weights.cuda(), ids.cuda(), path="pairs")
        ref = reference_block(x, w13["dense"], w2["dense"], f, weights, ids)
        assert relative_error(out.cpu(), ref) < TOLERANCE[dtype], (tokens, relative_error(out.cpu(), ref))
    check_graph_replays(lambda x, weights, ids: moe_triton.forward(codes13, codes2, factors, x, weights, ids,
                                                                   path="pairs"),
                        1, h, experts, top_k, dtype, (w13["dense"], w2["dense"], f))
