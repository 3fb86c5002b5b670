"""The MoE correction folded into the experts' codes (vllm_glowq/moe_fold.py, moe_marlin.folded_forward).

* CPU: the folded codes keep the base codes and scales exactly and append A as int4 rows; the
  int4 A costs a bounded share of the correction (balanced rank components, searched clip);
  which layers fold; the folded block through a stand-in for Marlin's GEMM (dequantized codes
  of whatever the forward hands it, the pairs as its sort lists them) and the activation kernel
  in Triton's interpreter, against a float64 reference of the folded math, and against exact
  GlowQ within the int4-A bound; the loader folds and hands the folded factors on; the GEMM
  call binds to the installed vLLM's `moe_wna16_marlin_gemm`; the folded activation compiles
  for sm_90 without spills.
* GPU (skipped without CUDA): the folded block through vLLM's Marlin MoE GEMMs against the
  float64 folded reference, bf16 and fp16, symmetric and asymmetric codes, 1 to 600 tokens, and
  inside a CUDA graph.
"""

from __future__ import annotations

import inspect

import pytest
import torch
from test_moe_marlin import (
    KERNEL_FILE,
    TOLERANCE,
    compile_activation_for_hopper,
    cuda,
    dense_of,
    make_codes,
    make_factors,
    reference_block,
    relative_error,
    routing,
    spilled_bytes,
)
from interpreter import load_interpreted

from vllm_glowq import moe_fold, moe_marlin

# the int4 A's share of the correction (relative Frobenius error of the folded correction against
# the exact one): about 0.09-0.10 on Gaussian factors with decaying rank components
INT4_A_BOUND = 0.15


@pytest.fixture(scope="module")
def grouped():
    pytest.importorskip("triton")
    return load_interpreted(KERNEL_FILE, "glowq_moe_lowrank_fold_interpreted")


def decaying_factors(experts: int, hidden: int, inter: int, rank: int, seed: int = 0) -> dict:
    """make_factors' shared-B factors with rank components decaying 30-fold, as calibrated A has."""
    f = make_factors(experts, hidden, inter, rank, "group", seed=seed)
    decay = torch.logspace(0, -1.5, rank, dtype=torch.float64)
    f["a13"] = f["a13"] * decay
    f["a2"] = f["a2"] * decay
    return f


def folded_reference(w13: tuple, w2: tuple, folded: moe_fold.FoldedFactors, hidden: int, inter: int):
    """reference_block's (w13, w2, factors) for the folded math: the base codes, and A as the
    folded codes' last rows dequantized, B as folded."""
    d13, d2 = dense_of(*w13), dense_of(*w2)
    f = dict(b13=None, a13=None, b2=None, a2=None)
    if folded.b13 is not None:
        f["b13"], f["a13"] = folded.b13.double(), d13[:, :, hidden:]
    if folded.b2 is not None:
        r2 = folded.b2.shape[1]
        f["b2"], f["a2"] = folded.b2.double(), d2[:, :, inter:inter + r2]
    return d13[:, :, :hidden], d2[:, :, :inter], f


def marlin_standin(x, out, codes, scales, zeros, workspace, alignment, weights, top_k, weigh, quant_type_id):
    """Marlin MoE's GEMM on GPTQ-layout codes: for every pair its sort lists, out[p] =
    x[p // top_k] @ W_e^T (times p's router weight with `weigh`)."""
    dense = dense_of(codes, scales, zeros)
    padded = int(alignment.padded.item())
    ids = alignment.sorted_ids[:padded].long()
    experts = alignment.expert_ids.long().repeat_interleave(alignment.block_m)[:padded]
    for p, e in zip(ids.tolist(), experts.tolist()):
        if p < alignment.num_pairs:
            row = dense[e] @ x[p // top_k].double()
            out[p] = (row * weights.reshape(-1)[p] if weigh else row).to(out.dtype)
    return out


# ----- CPU: the fold ---------------------------------------------------------------------------


@pytest.mark.parametrize("group,sym", [(32, True), (64, False), (-1, True), (-1, False)])
def test_folded_codes_keep_the_base_and_append_a(group, sym):
    experts, k, n, rank = 3, 256, 96, 24
    gen = torch.Generator().manual_seed(1)
    codes = make_codes(experts, k, n, k if group < 0 else group, sym, torch.bfloat16, gen)
    a = torch.randn(experts, n, rank, generator=gen, dtype=torch.float64)
    rows = moe_fold.padded_rank(rank)
    q, s, z = moe_fold.fold_codes(codes["qweight"], codes["scales"], codes["zeros"], a, rows, torch.bfloat16)
    assert q.shape == (experts, (k + rows) // 8, n) and torch.equal(q[:, : k // 8], codes["qweight"])
    dense = dense_of(q, s, z)
    assert torch.equal(dense[:, :, :k], codes["dense"])  # the base weights, exactly
    assert torch.equal(dense[:, :, k + rank:], torch.zeros(experts, n, rows - rank, dtype=torch.float64))
    error = (dense[:, :, k:k + rank] - a).norm() / a.norm()
    assert 0.02 < error < 0.12, error  # int4 rows, one scale per output row
    assert s.shape[1] * moe_fold.folded_group(k, group, rows) == k + rows and s.dtype == torch.bfloat16


def test_balancing_is_exact_and_lowers_the_int4_error():
    f = decaying_factors(4, 256, 96, 64)
    x = torch.randn(16, 256, dtype=torch.float64)
    exact = torch.einsum("tr,enr->etn", x @ f["b13"].t(), f["a13"])
    a, b = moe_fold.balance(f["a13"], f["b13"], across_experts=True)
    assert torch.allclose(torch.einsum("tr,enr->etn", x @ b.t(), a), exact)

    def int4_error(a, b):
        codes, scales = moe_fold.quantize_rows(a, torch.float32)
        folded = torch.einsum("tr,enr->etn", x @ b.t(), (codes.double() - 8) * scales.double()[..., None])
        return ((folded - exact).norm() / exact.norm()).item()

    balanced, plain = int4_error(a, b), int4_error(f["a13"], f["b13"])
    assert balanced < 0.8 * plain and balanced < 0.11, (balanced, plain)
    a2, b2 = moe_fold.balance(f["a2"], f["b2"], across_experts=False)
    h = torch.randn(4, 8, 96, dtype=torch.float64)
    assert torch.allclose(torch.einsum("etk,erk,enr->etn", h, b2, a2), torch.einsum("etk,erk,enr->etn", h, f["b2"],
                                                                                      f["a2"]))


def test_which_layers_fold():
    b13, a13, a2 = torch.zeros(8, 64), torch.zeros(4, 32, 8), torch.zeros(4, 64, 8)
    assert moe_fold.unfoldable_reason(b13, a13, a2) is None
    assert moe_fold.unfoldable_reason(None, None, a2) is None  # GlowQ-S: the down correction alone
    assert "share module" in moe_fold.unfoldable_reason(torch.zeros(4, 16, 64), a13, a2)
    assert "no correction" in moe_fold.unfoldable_reason(None, None, None)
    assert moe_fold.padded_rank(64) == 128 and moe_fold.padded_rank(130) == 256
    assert moe_fold.folded_group(2048, 128, 128) == 128 and moe_fold.folded_group(768, -1, 128) == 128
    assert moe_fold.folded_group(96, -1, 128) == 32


# ----- CPU: the folded block -------------------------------------------------------------------

FOLD_CASES = [  # tokens, experts, top_k, parts, sym (Marlin's block sizes 8, 8, 48 and 64)
    (1, 4, 2, "both", True), (9, 4, 2, "both", False), (60, 4, 2, "w13", True), (120, 3, 2, "w2", False)]


@pytest.mark.parametrize("case", FOLD_CASES, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_folded_block_matches_float64(grouped, case, dtype):
    """The folded math to the working dtype's rounding; exact GlowQ within the int4-A bound of
    its correction, which the plain block misses by its whole size."""
    tokens, experts, top_k, parts, sym = case
    hidden, inter, rank, group = 128, 64, 16, 32
    gen = torch.Generator().manual_seed(tokens)
    w13 = make_codes(experts, hidden, 2 * inter, group, sym, dtype, gen)
    w2 = make_codes(experts, inter, hidden, group, sym, dtype, gen)
    f = decaying_factors(experts, hidden, inter, rank, seed=tokens)
    if parts == "w13":
        f["b2"] = f["a2"] = None
    if parts == "w2":
        f["b13"] = f["a13"] = None
    for key in ("b13", "b2"):  # what the working dtype holds of B
        if f[key] is not None:
            f[key] = f[key].to(dtype).double()
    folded13, folded2, folded = moe_fold.fold(
        tuple(w13[k] for k in ("qweight", "scales", "zeros")), tuple(w2[k] for k in ("qweight", "scales", "zeros")),
        *(None if f[k] is None else f[k].to(dtype) for k in ("b13", "a13", "b2", "a2")), dtype)
    experts_codes = moe_marlin.Int4Experts(folded13[0], folded2[0], folded13[1], folded2[1], folded13[2], folded2[2],
                                           torch.zeros(1))
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    weights, ids = routing(tokens, experts, top_k, seed=tokens)
    out = moe_marlin.folded_forward(experts_codes, folded, x, weights, ids, gemm=marlin_standin,
                                    align=grouped.align_reference, kernels=grouped)
    ref = reference_block(x, *folded_reference(folded13, folded2, folded, hidden, inter), weights, ids)
    assert relative_error(out, ref) < TOLERANCE[dtype]
    exact = reference_block(x, w13["dense"], w2["dense"], f, weights, ids)
    plain = reference_block(x, w13["dense"], w2["dense"], dict.fromkeys(f), weights, ids)
    correction = (exact - plain).norm()
    assert (out.double() - exact).norm() / correction < INT4_A_BOUND
    assert (plain - exact).norm() / correction > 0.99


def test_folded_activation_writes_h_and_s_side_by_side(grouped):
    """h in the first I columns, S = B2_e h (rounded h, as the kernel reads it) in the next r2
    and zeros up to the padded width, for every pair the sort lists (Marlin's block of 8 in a
    16-row tile)."""
    tokens, experts, top_k, inter, r2, width = 9, 4, 2, 64, 8, 16
    gen = torch.Generator().manual_seed(0)
    w13_out = torch.randn(tokens * top_k, 2 * inter, generator=gen)
    b2 = torch.randn(experts, r2, inter, generator=gen)
    _, ids = routing(tokens, experts, top_k)
    out = torch.full((tokens * top_k, inter + width), float("nan"))
    grouped.activate_folded(w13_out, b2, grouped.align_reference(ids, 8, experts), out)
    gate, up = w13_out.double().chunk(2, dim=-1)
    h = torch.nn.functional.silu(gate) * up
    assert torch.allclose(out[:, :inter].double(), h, rtol=1e-5, atol=1e-6)
    s = torch.einsum("pk,prk->pr", out[:, :inter].double(), b2.double()[ids.reshape(-1).long()])
    assert torch.allclose(out[:, inter:inter + r2].double(), s, rtol=1e-4, atol=1e-5)
    assert torch.equal(out[:, inter + r2:], torch.zeros(tokens * top_k, width - r2))


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_folded_activation_compiles_for_hopper(dtype):
    """`activate_folded`'s launch on Qwen3-30B-A3B's experts (I = 768: twelve chunks of 64 in one
    program, S's 128 padded columns) at every Marlin block size, for sm_90 without spills."""
    for block_m in (8, 16, 32, 48, 64):
        kernel = compile_activation_for_hopper(dtype, dtype, block_m, HAS13=False, HAS2=True, ADDED=False,
                                               BLOCK_I=64, CHUNKS=12, BLOCK_R13=16, BLOCK_R2=128)
        assert kernel.asm["cubin"] and spilled_bytes(kernel) in (0, None), block_m


# ----- CPU: glue -------------------------------------------------------------------------------


def test_gemm_call_binds_to_the_installed_marlin_moe_op(monkeypatch):
    """compat.marlin_moe_gemm's arguments bind to the installed vLLM's `moe_wna16_marlin_gemm`
    (0.26 takes act-order arguments that 0.32 dropped), sizes from the tensors."""
    from vllm import _custom_ops as ops

    from vllm_glowq.kernels.moe_lowrank_triton import align_reference

    seen = {}
    signature = inspect.signature(ops.moe_wna16_marlin_gemm)
    monkeypatch.setattr(ops, "moe_wna16_marlin_gemm",
                        lambda *args, **kw: seen.update(signature.bind(*args, **kw).arguments))
    _, ids = routing(5, 4, 2)
    x, out = torch.zeros(5, 160), torch.zeros(10, 96)
    moe_marlin.compat.marlin_moe_gemm(x, out, torch.zeros(1), torch.zeros(1), None, torch.zeros(1),
                                      align_reference(ids, 8, 4), torch.ones(5, 2), 2, False,
                                      moe_marlin.compat.int4_weight_type(sym=True).id)
    assert (seen["size_m"], seen["size_n"], seen["size_k"], seen["top_k"]) == (5, 96, 160, 2)
    assert seen["moe_block_size"] == 8 and seen["mul_topk_weights"] is False and seen["b_qzeros"] is None


def test_loaded_layer_folds_its_correction(monkeypatch):
    """GlowQMoEMethod's GPU branch after loading (repack stood in for, recording what it gets):
    the codes it repacks carry A's rows, the A parameters are gone, the B parameters hold what
    the folded forward multiplies, and the custom op's forward receives FoldedFactors."""
    from vllm_glowq import moe
    from vllm_glowq.loading import ExpectedTensors

    e, h, i, r = 4, 128, 64, 8
    gen = torch.Generator().manual_seed(0)
    w13, w2 = make_codes(e, h, 2 * i, 64, True, torch.bfloat16, gen), make_codes(e, i, h, 64, True, torch.bfloat16, gen)
    f = make_factors(e, h, i, r, "group")
    layer = torch.nn.Module()
    for name, value in (("w13_qweight", w13["qweight"]), ("w2_qweight", w2["qweight"]), ("w13_scales", w13["scales"]),
                        ("w2_scales", w2["scales"]), ("w13_glowq_B", f["b13"]), ("w13_glowq_A", f["a13"]),
                        ("w2_glowq_B", f["b2"]), ("w2_glowq_A", f["a2"])):
        dtype = value.dtype if value.dtype == torch.int32 else torch.float16
        layer.register_parameter(name, torch.nn.Parameter(value.to(dtype), requires_grad=False))
    layer.activation = "silu"
    method = moe.GlowQMoEMethod.__new__(moe.GlowQMoEMethod)
    method.prefix, method.on_gpu, method.params_dtype = "test.fold.mlp.experts", True, torch.bfloat16
    method.own_kernels, method.codes, method.factors = False, None, None
    method.expected = ExpectedTensors(method.prefix)
    seen = {}

    def repack(*args):
        seen["repack"] = args
        return moe_marlin.Int4Experts(args[0], args[3], args[1], args[4], None, None, torch.zeros(2))

    monkeypatch.setattr(moe_marlin, "repack", repack)
    monkeypatch.setattr(moe_marlin, "FOLD_INTO_CODES", True)
    method.process_weights_after_loading(layer)
    rows = moe_fold.padded_rank(r)
    assert seen["repack"][0].shape == (e, (h + rows) // 8, 2 * i) and seen["repack"][3].shape == (e, (i + rows) // 8, h)
    assert not hasattr(layer, "w13_glowq_A") and not hasattr(layer, "w2_glowq_A")
    factors = method.factors
    assert isinstance(factors, moe_fold.FoldedFactors) and factors.b13.data_ptr() == layer.w13_glowq_B.data_ptr()
    assert factors.b13.shape == (rows, h) and factors.b2.shape == (e, r, i) and factors.r2_padded == rows
    monkeypatch.setattr(moe_marlin, "folded_forward", lambda *args: seen.setdefault("forward", args) and torch.zeros(1))
    torch.ops.glowq.moe(torch.zeros(2, h), torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32), method.prefix)
    assert seen["forward"][0] is method.int4 and seen["forward"][1] is factors


# ----- GPU: through vLLM's Marlin MoE GEMMs ------------------------------------------------------

GPU_FOLD_CASES = [(8, 2, 16, True), (64, 8, 64, False), (64, 8, 16, True)]  # experts, top_k, rank, sym


def gpu_folded_block(experts: int, rank: int, sym: bool, dtype: torch.dtype, gen):
    """Codes and factors of a Marlin-sized layer, folded and repacked on the GPU, with the
    float64 reference of the folded math."""
    h, i, g = 512, 256, 128
    w13, w2 = make_codes(experts, h, 2 * i, g, sym, dtype, gen), make_codes(experts, i, h, g, sym, dtype, gen)
    f = decaying_factors(experts, h, i, rank)
    on = lambda t: None if t is None else t.cuda()  # noqa: E731
    folded13, folded2, folded = moe_fold.fold(
        tuple(on(w13[k]) for k in ("qweight", "scales", "zeros")), tuple(on(w2[k]) for k in ("qweight", "scales", "zeros")),
        *(f[k].to("cuda", dtype) for k in ("b13", "a13", "b2", "a2")), dtype)
    int4 = moe_marlin.repack(*folded13, *folded2, dtype)
    cpu = lambda t: None if t is None else t.cpu()  # noqa: E731
    reference = folded_reference(tuple(map(cpu, folded13)), tuple(map(cpu, folded2)),
                                 moe_fold.FoldedFactors(cpu(folded.b13), cpu(folded.b2), folded.r2_padded), h, i)
    return int4, folded, reference, h


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", GPU_FOLD_CASES, ids=lambda c: "-".join(map(str, c)))
def test_gpu_folded_block_matches_float64(dtype, case):
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    experts, top_k, rank, sym = case
    gen = torch.Generator().manual_seed(experts + rank)
    int4, folded, reference, h = gpu_folded_block(experts, rank, sym, dtype, gen)
    for tokens in (1, 3, 16, 64, 257, 600):
        x = torch.randn(tokens, h, generator=gen).to(dtype)
        weights, ids = routing(tokens, experts, top_k, seed=tokens)
        out = moe_marlin.forward(int4, folded, x.cuda(), weights.cuda(), ids.cuda(), MoEActivation.SILU)
        error = relative_error(out.cpu(), reference_block(x, *reference, weights, ids))
        assert error < TOLERANCE[dtype], (tokens, error)


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
def test_gpu_folded_block_inside_a_cuda_graph(tokens):
    from test_moe_marlin import check_graph_replays
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    int4, folded, reference, h = gpu_folded_block(64, 16, True, torch.bfloat16, torch.Generator().manual_seed(tokens))
    check_graph_replays(lambda x, weights, ids: moe_marlin.forward(int4, folded, x, weights, ids, MoEActivation.SILU),
                        tokens, h, 64, 8, torch.bfloat16, reference)
