"""The corrected layer op `torch.ops.glowq.linear` (base(x) + A (B x)) and its paths.

* CPU: the torch path against a float64 reference, the op on a registered layer, its fake
  implementation under torch.compile(fullgraph=True), torch.library.opcheck, the path switch.
* Triton interpreter (CPU): the kernel's indexing, masking, split-K atomics and workspace reset
  for odd shapes, in float16 (the interpreter mishandles bfloat16 stores). The interpreter runs
  programs one after another, so the fused mode runs with one program (a barrier across several
  would wait forever); the barrier itself is tested on the GPU.
* GPU (skipped without CUDA): every path (overlap, fused, split) for the Llama-3-8B layer
  shapes and odd ones, in bf16 and fp16, against float64; the fused kernel's workspace must be
  clean after every launch, including inside CUDA graphs replayed many times and under
  torch.compile with CUDA graphs.

Accuracy bar: the error against float64 may be at most ERROR_FACTOR times the error of the
plain PyTorch computation in the same dtype (the plugin's previous path), plus a floor.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from gpu_timing import capture  # noqa: E402
import torch.nn.functional as F

from vllm_glowq import correction

KERNEL_FILE = Path(correction.__file__).parent / "kernels" / "lowrank_triton.py"
ERROR_FACTOR = 1.5
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Triton kernels)")


def _case(tokens: int, k: int, n: int, rank: int, dtype: torch.dtype, device: str = "cpu", seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=gen).to(device, dtype)
    b = (torch.randn(rank, k, generator=gen) * 0.05).to(device, dtype)
    a = (torch.randn(n, rank, generator=gen) * 0.05).to(device, dtype)
    y = torch.randn(tokens, n, generator=gen).to(device, dtype)
    return x, y, b, a


def _reference(x, y, b, a) -> torch.Tensor:
    return y.double() + (x.double() @ b.double().t()) @ a.double().t()


def _assert_close_to_reference(out, x, y, b, a) -> None:
    ref = _reference(x, y, b, a)
    plain = torch.addmm(y, F.linear(x, b), a.t())  # the same math in the working dtype
    floor = 1e-6 * ref.abs().max().item()
    assert out.shape == y.shape and out.dtype == y.dtype
    err = (out.double() - ref).abs().max().item()
    plain_err = (plain.double() - ref).abs().max().item()
    assert err <= ERROR_FACTOR * plain_err + floor, f"max error {err:.3g} vs PyTorch's {plain_err:.3g}"


class DenseLayer(torch.nn.Module):
    """A stand-in for a loaded GlowQ layer: a dense base weight plus its factors."""

    def __init__(self, name: str, k: int, n: int, rank: int, dtype: torch.dtype, device: str = "cpu"):
        super().__init__()
        gen = torch.Generator().manual_seed(n + k)
        self.weight = torch.nn.Parameter((torch.randn(n, k, generator=gen) / k**0.5).to(device, dtype), requires_grad=False)
        self.glowq_B = torch.nn.Parameter((torch.randn(rank, k, generator=gen) * 0.05).to(device, dtype), requires_grad=False)
        self.glowq_A = torch.nn.Parameter((torch.randn(n, rank, generator=gen) * 0.05).to(device, dtype), requires_grad=False)
        self.name = name
        correction.register_layer(name, self, lambda layer, x, bias: F.linear(x, layer.weight, bias))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.glowq.linear(x, None, self.name, self.weight.shape[0])

    def check(self, x: torch.Tensor, out: torch.Tensor) -> None:
        _assert_close_to_reference(out, x, F.linear(x, self.weight), self.glowq_B, self.glowq_A)


# ----- CPU: torch path, registration, fake implementation -------------------------------------


def test_cpu_layer_op_matches_reference():
    layer = DenseLayer("cpu.layer", 96, 40, 8, torch.float32)
    x = torch.randn(7, 96)
    assert correction.choose_path(x) == "torch"
    out = layer(x)
    assert torch.allclose(out.double(), _reference(x, F.linear(x, layer.weight), layer.glowq_B, layer.glowq_A),
                          atol=1e-4)


def test_op_leaves_its_input_untouched():
    x, y, b, a = _case(3, 64, 32, 8, torch.float32)
    before = y.clone()
    correction.correct(x, y, b, a)
    assert torch.equal(y, before)


def test_opcheck_and_compile_with_fake_implementation():
    layer = DenseLayer("cpu.compiled", 64, 48, 8, torch.float32)
    x = torch.randn(5, 64)
    torch.library.opcheck(torch.ops.glowq.linear.default, (x, None, layer.name, 48))
    compiled = torch.compile(lambda x: layer(x).relu(), fullgraph=True, dynamic=True)
    for tokens in (5, 9):
        x = torch.randn(tokens, 64)
        assert torch.allclose(compiled(x), layer(x).relu(), atol=1e-5)


def test_bad_path_setting_is_refused(monkeypatch):
    monkeypatch.setenv(correction.ENV_PATH, "fastest")
    with pytest.raises(ValueError, match="VLLM_GLOWQ_CORRECTION='fastest' is not one of auto, overlap, fused, split, torch"):
        correction._path_from_env()


# ----- Triton interpreter on the CPU ----------------------------------------------------------


@pytest.fixture(scope="module")
def interpreted():
    """A fresh copy of the kernel module whose kernels run in Triton's interpreter."""
    triton = pytest.importorskip("triton")
    if tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7):
        pytest.skip(f"Triton {triton.__version__}'s interpreter cannot take program ids as range() bounds")
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec = importlib.util.spec_from_file_location("glowq_correction_interpreted", KERNEL_FILE)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old
    yield module


# tokens, K, N, rank: odd sizes hit every mask (K not a multiple of the K block, N of the output
# tile, rank of 16, and rank > 64 as in per-module layers with stacked Bs)
ODD_SHAPES = [(1, 256, 96, 16), (5, 300, 70, 24), (37, 512, 200, 64), (3, 192, 100, 130), (70, 128, 64, 8)]


@pytest.mark.parametrize("shape", ODD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "split"])
def test_interpreted_kernel_matches_reference(interpreted, shape, fused):
    tokens, k, n, rank = shape
    x, y, b, a = _case(tokens, k, n, rank, torch.float16)
    programs = 1 if fused else 3
    config = interpreted.choose_config(tokens, k, n, rank, programs, fused)
    out = torch.full_like(y, float("nan"))
    if fused:
        reduced, sync = torch.zeros(tokens * rank), torch.zeros(2, dtype=torch.int32)
    else:
        reduced, sync = F.linear(x, b), None
    interpreted.launch(x, b, a, y, out, reduced, sync, config)
    _assert_close_to_reference(out, x, y, b, a)
    if fused:
        assert not reduced.any() and not sync.any(), "the fused kernel must leave its workspace zeroed"


def test_fused_config_never_exceeds_the_sm_count(interpreted):
    for tokens in (1, 16, 64, 256):
        for k, n, rank in ((4096, 6144, 64), (14336, 4096, 64), (4096, 28672, 128), (64, 32, 8)):
            config = interpreted.choose_config(tokens, k, n, rank, 132, True)
            assert 1 <= config.programs <= 132
            assert config.k_split % config.block_k == 0


# ----- GPU ------------------------------------------------------------------------------------

# Llama-3-8B's layers at rank 64 (GlowQ) and per-module qkv (three stacked Bs), plus odd shapes.
GPU_SHAPES = [(4096, 6144, 64), (4096, 4096, 64), (4096, 28672, 64), (14336, 4096, 64), (4096, 6144, 192),
              (1000, 1000, 24), (4104, 600, 8)]
GPU_TOKENS = [1, 3, 16, 64, 100, 256, 257, 2048]


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_gpu_paths_match_reference(shape, dtype, monkeypatch):
    k, n, rank = shape
    layer = DenseLayer(f"gpu.{k}x{n}x{rank}", k, n, rank, dtype, "cuda")
    for path in ("overlap", "fused", "split"):
        monkeypatch.setattr(correction, "FORCED_PATH", path)
        for tokens in GPU_TOKENS:
            x = torch.randn(tokens, k, device="cuda", dtype=dtype)
            # every call accurate: the fused kernel's workspace was clean before each launch (a
            # leftover R would be added again). Not bit-identical: its split-K fp32 atomics sum
            # in a different order each time.
            for _ in range(3):
                layer.check(x, layer(x))
    state = correction._devices[torch.device("cuda", 0)]
    torch.cuda.synchronize()
    assert not state.reduced.any() and not state.sync.any()


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("path", ["overlap", "fused", "split"])
def test_gpu_cuda_graph_of_several_layers_replays_exactly(path, monkeypatch):
    """A decode step's worth of layers (four shapes, twice) in one CUDA graph."""
    monkeypatch.setattr(correction, "FORCED_PATH", path)
    layers = [DenseLayer(f"graph.{i}", k, n, 64, torch.bfloat16, "cuda")
              for i, (k, n) in enumerate([(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)] * 2)]
    inputs = [torch.randn(16, layer.weight.shape[1], device="cuda", dtype=torch.bfloat16) for layer in layers]

    def step():
        return [layer(x) for layer, x in zip(layers, inputs)]

    graph, captured = capture(step)
    for _ in range(50):
        graph.replay()
    torch.cuda.synchronize()
    for layer, x, got in zip(layers, inputs, captured):
        layer.check(x, got)


@cuda
@pytest.mark.gpu
def test_gpu_compiled_model_uses_the_op():
    """torch.compile with CUDA graphs (mode reduce-overhead) around the op, as vLLM runs it."""
    layer = DenseLayer("compiled.gpu", 4096, 6144, 64, torch.bfloat16, "cuda")
    x = torch.randn(8, 4096, device="cuda", dtype=torch.bfloat16)
    compiled = torch.compile(lambda x: layer(x) * 2, mode="reduce-overhead", fullgraph=True)
    want = layer(x) * 2
    for _ in range(5):
        got = compiled(x)
    assert torch.equal(got, want)  # the overlap path: cuBLAS, deterministic
