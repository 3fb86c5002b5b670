"""The project's W4A16 kernels (vllm_glowq/kernels/w4a16*.py) against a float64 reference.

* CPU: both load-time repackings (packing.repack_planes for the Triton kernel: each K block's
  nibble planes stacked; packing.repack_fragments for the tensor-core kernel: MMA fragment
  order) round-trip exactly; in Triton's interpreter both dequantize kernels, reading the
  repacked words, must reproduce the checkpoint's dequantization bit for bit (Gluon, the
  tensor-core GEMM's dialect, has no interpreter: it is tested on the GPU only); the GEMM kernel (shrink programs, split-K tickets, last-arrival
  epilogue, workspace cleanup) on small odd shapes, sym and asym, group sizes 64/128/per-row,
  with and without a correction. float16 (the interpreter has no bfloat16 arithmetic).
* GPU (skipped without CUDA), for both layouts: every path (tensor-core kernel, on Hopper on the
  warpgroup MMA from 17 to WGMMA_MAX_TOKENS tokens; Triton kernel: one token without tensor
  cores, <= 64 tokens on the tensor cores; dequantize + cuBLAS above; and each GEMM kernel itself up to
  WORKSPACE_TOKENS, where more than 16 rows run the interleaved tile) on the Llama-3-8B
  layer shapes and odd ones, bf16 and fp16, sym and asym, group sizes 64/128/-1, rank 0/16/64,
  repeated on fresh inputs (a race shows as a moving error); inside a CUDA graph replayed many
  times. A negative control: the same output without the correction must fail the bar.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_timing import capture  # noqa: E402

from vllm_glowq.kernels.w4a16 import block_k_for, fragments_block_k

from vllm_glowq.packing import (dequantize, pack_cols, pack_rows, repack_fragments, repack_planes, unrepack_fragments,
                                unrepack_planes)

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")
# Relative Frobenius error against float64 allowed per output dtype: the output's own rounding
# (bf16 2^-9, fp16 2^-12 relative per element) with headroom for the bf16/fp16 R = B x.
TOLERANCE = {torch.bfloat16: 4e-3, torch.float16: 1.5e-3}


def make_layer(k: int, n: int, group: int, rank: int, sym: bool, dtype: torch.dtype, seed: int = 0,
               device: str = "cpu", layout: str = "planes") -> dict:
    """Random codes in the checkpoint layout with scales and factors in `dtype` (as the plugin
    holds them), the float64 dense weight they stand for, and factors large enough that the
    correction moves the output far beyond the tolerance."""
    gen = torch.Generator().manual_seed(seed)
    g = k if group == -1 else group
    codes = torch.randint(0, 16, (k, n), generator=gen)
    scales = (torch.rand(k // g, n, generator=gen) * 0.02 + 0.005).to(dtype)
    zeros = None if sym else torch.randint(0, 16, (k // g, n), generator=gen)
    checkpoint_qweight = pack_rows(codes)
    dense = dequantize(checkpoint_qweight, scales.float(), None if sym else pack_cols(zeros)).double()
    if layout == "planes":  # what the plugin does at load time for the Triton kernel
        qweight = repack_planes(checkpoint_qweight, block_k_for(k, g))
    else:  # and for the tensor-core kernel
        qweight = repack_fragments(checkpoint_qweight, fragments_block_k(k, g))
    factor_b = (torch.randn(rank, k, generator=gen) * 0.3 / k**0.5).to(dtype) if rank else None
    factor_a = (torch.randn(n, rank, generator=gen) * 2.4 / rank**0.5).to(dtype) if rank else None  # same size at every rank
    on = lambda t: None if t is None else t.to(device)  # noqa: E731
    return dict(qweight=on(qweight), scales=on(scales), zeros=on(None if sym else zeros.to(torch.uint8)),
                factor_b=on(factor_b), factor_a=on(factor_a), group=g, dense=on(dense))


def reference(x: torch.Tensor, layer: dict, bias: torch.Tensor | None, with_correction: bool = True) -> torch.Tensor:
    out = x.double() @ layer["dense"].t()
    if with_correction and layer["factor_a"] is not None:
        out += (x.double() @ layer["factor_b"].double().t()) @ layer["factor_a"].double().t()
    if bias is not None:
        out += bias.double()
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert torch.isfinite(out).all()
    return ((out.double() - ref).norm() / ref.norm()).item()


def run(module, x, layer, bias):
    return module.forward(x, layer["qweight"], layer["scales"], layer["zeros"], bias, layer["factor_b"],
                          layer["factor_a"], layer["group"])


# ----- CPU: the Triton interpreter -------------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted():
    """A fresh copy of the kernel modules whose kernels run in Triton's interpreter."""
    pytest.importorskip("triton")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    saved = {name: sys.modules.pop(name) for name in list(sys.modules) if name.startswith("vllm_glowq.kernels")}
    try:
        module = importlib.import_module("vllm_glowq.kernels.w4a16")
        importlib.import_module("vllm_glowq.kernels.w4a16_triton")
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    space = module.Workspace.__new__(module.Workspace)  # CPU tensors stand in for device memory
    space.device = torch.device("cpu")
    space.partial = torch.empty(1 << 16, dtype=torch.float32)
    space.reduced = torch.zeros(0, dtype=torch.float32)
    space.sync = torch.zeros(2, dtype=torch.int32)
    space.dense, space.sm_count, space.hopper, space.tuned = {}, 4, False, {}
    module._workspaces[space.device] = space
    yield module
    for name in [n for n in sys.modules if n.startswith("vllm_glowq.kernels")]:
        del sys.modules[name]
    sys.modules.update(saved)


def test_block_k_is_capped_by_max_block_k(monkeypatch):
    from vllm_glowq.kernels import w4a16

    assert block_k_for(4096, 128) == 128 and block_k_for(576, 576) == 64 and block_k_for(4096, 32) == 32
    monkeypatch.setattr(w4a16, "MAX_BLOCK_K", 64)
    assert block_k_for(4096, 128) == 64 and block_k_for(4096, 32) == 32


@pytest.mark.parametrize("shape", [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096), (576, 1000),
                                   (1152, 600), (8192, 57344)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_warpgroup_launch_defaults_fit_the_hardware_and_workspace(shape):
    """What choose_mma_config gives Hopper from WGMMA_MIN_TOKENS up: a warpgroup per 64 rows, an
    accumulator of at most 128 fp32 registers a thread, shared memory within an H100's 227 KB,
    and split K only where the partials workspace holds it (mma_gemm refuses the rest)."""
    from vllm_glowq.kernels import w4a16

    k, n = shape
    group = 64 if k % 128 else 128
    for tokens in (w4a16.WGMMA_MIN_TOKENS, 32, 33, 64, 65, 100, 128, 200, 256, 300, w4a16.WGMMA_MAX_TOKENS):
        config = w4a16.choose_mma_config(tokens, n, k, group, 132, hopper=True)
        assert config.wgmma and not config.expand_items, config
        assert config.block_n % (16 * config.num_warps) == 0 and config.block_n >= 64, config
        assert config.block_t & (config.block_t - 1) == 0 and 8 <= config.block_t <= 256, config
        assert config.block_n * config.block_t // (32 * config.num_warps) <= 128, config  # accumulator registers
        assert 2 * 2 * config.block_t * w4a16.MAX_BLOCK_K <= 227 * 1024, config  # x's two buffers
        k_blocks = k // w4a16.fragments_block_k(k, group)
        assert 1 <= config.split_k <= min(8, k_blocks), config
        if config.split_k > 1:
            assert tokens <= w4a16.WORKSPACE_TOKENS and config.split_k * tokens * n * 4 <= w4a16.PARTIAL_SUM_BYTES
    assert not w4a16.choose_mma_config(16, n, k, group, 132, hopper=True).wgmma  # mma.sync up to 16 tokens


@pytest.mark.parametrize("block_k", [16, 32, 64, 128])
def test_repacking_round_trips_exactly(block_k):
    codes = torch.randint(0, 16, (4 * block_k, 40))
    qweight = pack_rows(codes)
    repacked = repack_planes(qweight, block_k)
    assert repacked.shape == qweight.shape and repacked.dtype == torch.int32
    assert torch.equal(unrepack_planes(repacked, block_k), qweight)
    assert not torch.equal(repacked, qweight)  # it is a different layout


@pytest.mark.parametrize("block_k", [32, 64, 128])
def test_fragment_repacking_round_trips_exactly(block_k):
    codes = torch.randint(0, 16, (4 * block_k, 40))
    qweight = pack_rows(codes)
    repacked = repack_fragments(qweight, block_k)
    assert repacked.shape == (4, 4, 40, block_k // 32) and repacked.dtype == torch.int32
    assert torch.equal(unrepack_fragments(repacked), qweight)
    # block 1, lane pair t = 2, output 5: nibble j + 4 b of word s holds row 32 s + 8 j + 2 t + b
    word = int(repacked[1, 2, 5, block_k // 32 - 1]) & 0xFFFFFFFF
    for j in range(4):
        for b in range(2):
            row = block_k + 32 * (block_k // 32 - 1) + 8 * j + 4 + b
            assert (word >> 4 * (j + 4 * b)) & 0xF == codes[row, 5]


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [64, 128, -1])
def test_interpreted_fragment_dequantize_matches_the_checkpoint_bit_for_bit(interpreted, sym, group):
    k, n = 256, 72
    layer = make_layer(k, n, group, 0, sym, torch.float16, layout="fragments")
    dense = interpreted.dequantize_fragments(layer["qweight"], layer["scales"], layer["zeros"], None, None,
                                             layer["group"], torch.float16)
    assert torch.equal(dense.t(), layer["dense"].half())


@pytest.mark.parametrize("sym,group,rank", [(True, 128, 16), (False, 64, 24)], ids=["sym-r16", "asym-r24"])
def test_interpreted_fragment_dequantize_folds_the_correction_in(interpreted, sym, group, rank):
    """Prefill's weight, deq(Wq) + (A B)^T, rounded once; rank 24 leaves a partial 16-rank chunk."""
    k, n = 256, 72
    layer = make_layer(k, n, group, rank, sym, torch.float16, layout="fragments")
    dense = interpreted.dequantize_fragments(layer["qweight"], layer["scales"], layer["zeros"], layer["factor_b"],
                                             layer["factor_a"], layer["group"], torch.float16)
    folded = layer["dense"] + layer["factor_a"].double() @ layer["factor_b"].double()
    assert relative_error(dense.t(), folded) < 2.0**-11  # fp16 rounding of each weight, and no more
    assert relative_error(dense.t(), layer["dense"]) > 0.1  # the correction is there


@pytest.mark.parametrize("sym", [True, False], ids=["sym", "asym"])
@pytest.mark.parametrize("group", [64, 128, -1])
def test_interpreted_dequantize_matches_the_checkpoint_bit_for_bit(interpreted, sym, group):
    k, n = 256, 72
    layer = make_layer(k, n, group, 0, sym, torch.float16)
    dense = interpreted.dequantize(layer["qweight"], layer["scales"], layer["zeros"], None, None, layer["group"],
                                   torch.float16)
    assert torch.equal(dense.t(), layer["dense"].half())


# tokens, K, N, group, rank, sym, launch overrides: every mask (N not a multiple of the tile,
# one token, a second token block), split-K with several chunks, shrink chunks over K
INTERPRETED_CASES = [
    (1, 256, 72, 64, 16, False, dict(block_n=32, split_k=4)),
    (1, 320, 24, 64, 16, True, dict(block_n=16, split_k=5, shrink_chunk=128)),  # one-token shrink: 2 blocks, 1 short
    (1, 256, 40, 64, 16, True, dict(block_n=16, split_k=4, expand_at=0.5)),  # expand items mid-grid
    (3, 256, 40, 64, 16, True, dict(block_n=16, split_k=2, expand_at=0.0)),  # expand items before every GEMM item
    (1, 256, 48, -1, 0, True, dict(block_n=16, split_k=2)),
    (3, 256, 40, 128, 16, True, dict(block_n=16, split_k=2, shrink_chunk=128, shrink_block_k=64)),
    (5, 384, 56, 128, 32, False, dict(block_n=32, split_k=3)),
    (7, 256, 40, 64, 16, False, dict(block_n=16, split_k=2)),  # 16-token tile, K blocks of 64: no planes
    (20, 128, 24, 64, 16, True, dict(block_m=32, block_n=16, split_k=1)),
    # the last program sums the partials in loads of partial_rows: 7 chunks in 2 loads (one short)
    (1, 448, 40, 64, 16, True, dict(block_n=16, split_k=7, partial_rows=4)),
    (9, 448, 24, 64, 0, False, dict(block_n=16, split_k=7, partial_rows=2)),
]


@pytest.mark.parametrize("case", INTERPRETED_CASES, ids=lambda c: f"t{c[0]}k{c[1]}n{c[2]}g{c[3]}r{c[4]}")
def test_interpreted_gemm_matches_reference(interpreted, case):
    tokens, k, n, group, rank, sym, overrides = case
    layer = make_layer(k, n, group, rank, sym, torch.float16, seed=tokens)
    bias = torch.randn(n).half()
    space = interpreted.workspace(torch.device("cpu"))
    space.reserve(n, k, rank, torch.float16)
    defaults = interpreted.choose_gemm_config(tokens, n, k, layer["group"], space.sm_count)
    config = interpreted.GemmConfig(**{**defaults.__dict__, **overrides})
    x = torch.randn(tokens, k).half()
    out = interpreted.gemm(x, layer["qweight"], layer["scales"], layer["zeros"], bias, layer["factor_b"],
                           layer["factor_a"], layer["group"], config)
    ref = reference(x, layer, bias)
    assert relative_error(out, ref) < TOLERANCE[torch.float16]
    if rank:  # negative control: the bar is tight enough to see a missing correction
        assert relative_error(out, reference(x, layer, bias, with_correction=False)) > 10 * TOLERANCE[torch.float16]
    assert not space.sync.any() and not space.reduced.any(), "the launch left its workspace dirty"


# ----- GPU ---------------------------------------------------------------------------------------

# K, N: Llama-3-8B's qkv, gate_up and down (o_proj has qkv's K), and odd ones (N not a multiple of
# any tile; K = 576 has no 128 block: SmolLM2's hidden size)
GPU_SHAPES = [(4096, 6144), (4096, 28672), (14336, 4096), (576, 1000), (1152, 600)]
GPU_TOKENS = [1, 7, 16, 64, 100, 256, 300, 600]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sym,group", [(True, 128), (False, 64), (True, -1)], ids=["sym-g128", "asym-g64", "sym-rows"])
@pytest.mark.parametrize("rank", [0, 16, 64])
@pytest.mark.parametrize("layout", ["fragments", "planes"])
def test_gpu_every_path_matches_reference(shape, dtype, sym, group, rank, layout):
    """`fragments`: the tensor-core kernel (w4a16_mma.py) and its dequantize; `planes`: the Triton kernel."""
    from vllm_glowq.kernels import w4a16

    k, n = shape
    if group != -1 and k % group:
        pytest.skip(f"group size {group} does not divide K={k}: such modules stay in full precision")
    layer = make_layer(k, n, group, rank, sym, dtype, seed=k + n + rank, device="cuda", layout=layout)
    w4a16.workspace(torch.device("cuda", 0)).reserve(n, k, rank, dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    kernel = w4a16.mma_gemm if layout == "fragments" else w4a16.gemm
    for tokens in GPU_TOKENS:
        for rep in range(3):  # fresh inputs each time: a race shows as a moving error
            x = torch.randn(tokens, k, device="cuda", dtype=dtype)
            use_bias = bias if rep == 1 else None
            out = run(w4a16, x, layer, use_bias)
            if w4a16.GEMM_MAX_TOKENS < tokens <= w4a16.WORKSPACE_TOKENS and rep == 2:  # the GEMM kernel itself
                out = kernel(x, layer["qweight"], layer["scales"], layer["zeros"], None, layer["factor_b"],
                             layer["factor_a"], layer["group"])
            ref = reference(x, layer, use_bias)
            err = relative_error(out, ref)
            assert err < TOLERANCE[dtype], f"{tokens} tokens: relative error {err:.2e}"
            if rank:
                assert relative_error(out, reference(x, layer, use_bias, False)) > 5 * TOLERANCE[dtype]
    space = w4a16.workspace(torch.device("cuda", 0))
    torch.cuda.synchronize()
    assert not space.sync.any() and not space.reduced.any()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 6144), (576, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("sym,group,rank", [(True, 128, 64), (False, 64, 16)], ids=["sym-r64", "asym-r16"])
@pytest.mark.parametrize("expand_items", [True, False], ids=["expand-items", "last-expands"])
def test_gpu_fragments_either_expander_and_one_k_chunk_match_reference(shape, sym, group, rank, expand_items):
    """The tensor-core kernel with the correction's expand in programs of its own (the default) or
    in each tile's last contributor, split K as chosen and in one chunk (split_k 1, which must not
    become a compile-time constant: gemm_kernel's do_not_specialize), x copied a block ahead or not."""
    from vllm_glowq.kernels import w4a16

    k, n = shape
    if k % group:
        pytest.skip(f"group size {group} does not divide K={k}: such modules stay in full precision")
    layer = make_layer(k, n, group, rank, sym, torch.bfloat16, seed=k + rank, device="cuda", layout="fragments")
    space = w4a16.workspace(torch.device("cuda", 0))
    space.reserve(n, k, rank, torch.bfloat16)
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    for tokens in (1, 7, 16, 64):
        config = dataclasses.replace(w4a16.choose_mma_config(tokens, n, k, layer["group"], space.sm_count),
                                     expand_items=expand_items)
        # one K chunk with x loaded in the loop, the chosen split with x copied a block ahead
        for split_k, prefetch_x in ((1, False), (config.split_k, True)):
            x = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            launch = dataclasses.replace(config, split_k=split_k, prefetch_x=prefetch_x)
            out = w4a16.mma_gemm(x, layer["qweight"], layer["scales"], layer["zeros"], bias, layer["factor_b"],
                                 layer["factor_a"], layer["group"], launch)
            err = relative_error(out, reference(x, layer, bias))
            assert err < TOLERANCE[torch.bfloat16], f"{tokens} tokens, split {split_k}: relative error {err:.2e}"
    torch.cuda.synchronize()
    assert not space.sync.any() and not space.reduced.any()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(4096, 6144), (14336, 4096), (576, 1000)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("sym,group,rank", [(True, 128, 64), (False, 64, 16), (True, -1, 0)],
                         ids=["sym-r64", "asym-r16", "rows-r0"])
def test_gpu_warpgroup_mma_tiles_match_reference(shape, dtype, sym, group, rank):
    """Warpgroup-MMA tiles of both token ranges, 4 and 8 warps, codes from registers and through
    shared memory (Hopper only), in one K chunk and split, at token counts that fill a tile,
    leave one short, and need several token tiles."""
    from vllm_glowq.kernels import w4a16

    if not w4a16.workspace(torch.device("cuda", 0)).hopper:
        pytest.skip("the warpgroup MMA runs on Hopper (sm_90) only")
    k, n = shape
    if group != -1 and k % group:
        pytest.skip(f"group size {group} does not divide K={k}: such modules stay in full precision")
    layer = make_layer(k, n, group, rank, sym, dtype, seed=k + rank, device="cuda", layout="fragments")
    space = w4a16.workspace(torch.device("cuda", 0))
    space.reserve(n, k, rank, dtype)
    bias = torch.randn(n, device="cuda", dtype=dtype)
    tiles = [(64, 64, 4, False), (64, 128, 4, True), (128, 64, 4, False), (128, 128, 4, True), (256, 64, 4, False),
             (32, 64, 4, True), (128, 256, 8, False), (256, 128, 8, True)]  # tokens, rows, warps, codes in smem
    for block_t, block_n, warps, codes_in_smem in tiles:
        for tokens in (17, block_t, 300):
            for split_k in (1, 3) if tokens <= w4a16.WORKSPACE_TOKENS else (1,):
                config = w4a16.MmaConfig(block_n, block_t, split_k, num_warps=warps, expand_items=False, wgmma=True,
                                         codes_in_smem=codes_in_smem)
                x = torch.randn(tokens, k, device="cuda", dtype=dtype)
                out = w4a16.mma_gemm(x, layer["qweight"], layer["scales"], layer["zeros"], bias, layer["factor_b"],
                                     layer["factor_a"], layer["group"], config)
                err = relative_error(out, reference(x, layer, bias))
                assert err < TOLERANCE[dtype], f"{config}, {tokens} tokens: relative error {err:.2e}"
                if rank:
                    assert relative_error(out, reference(x, layer, bias, False)) > 5 * TOLERANCE[dtype]
    torch.cuda.synchronize()
    assert not space.sync.any() and not space.reduced.any()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 64])
@pytest.mark.parametrize("layout", ["fragments", "planes"])
def test_gpu_cuda_graph_of_several_layers_replays_exactly(tokens, layout):
    """A decode step's worth of layers (Llama-3-8B's four shapes, twice) in one CUDA graph."""
    from vllm_glowq.kernels import w4a16

    shapes = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)] * 2
    layers = [make_layer(k, n, 128, 64, True, torch.bfloat16, seed=i, device="cuda", layout=layout)
              for i, (k, n) in enumerate(shapes)]
    for (k, n) in shapes:
        w4a16.workspace(torch.device("cuda", 0)).reserve(n, k, 64, torch.bfloat16)
    inputs = [torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for k, _ in shapes]

    def step():
        return [run(w4a16, x, layer, None) for layer, x in zip(layers, inputs)]

    graph, captured = capture(step)
    for _ in range(3):
        for x in inputs:
            x.normal_()
        for _ in range(20):
            graph.replay()
        torch.cuda.synchronize()
        for layer, x, got in zip(layers, inputs, captured):
            assert relative_error(got, reference(x, layer, None)) < TOLERANCE[torch.bfloat16]
