"""GlowQ's custom ops: a corrected layer around one of vLLM's int4 kernels, `torch.ops.glowq.linear`
(`base(x) + A (B x)`), and the project's own int4 GEMM with the correction fused in,
`torch.ops.glowq.int4_linear` (kernels/w4a16.py; chosen per layer in kernel_choice.py).

Both ops are opaque to torch.compile (their fake implementations give the output's shape), so
Dynamo traces one call per layer and CUDA graphs capture whatever the op launches. For `linear`
the layer is found by name (`register_layer`, done at load time), the way vLLM's attention op
finds its layer, because the op runs the layer's int4 kernel itself: only then can the
correction overlap it.

Inside `linear`, the path is chosen per call from the device, dtype and token count:

* `overlap` (CUDA, bf16/fp16, up to OVERLAP_MAX_TOKENS tokens: decode): C = A (B x) runs on a
  second stream while the int4 GEMM runs on the current one; the join adds C. At decode the
  correction is a few small launches whose latency, not their bytes, sets the cost (11-15 us per
  layer on an H200 in series), so hiding it behind the GEMM leaves one elementwise add on the
  critical path. Both branches are captured into the CUDA graph as a fork and a join.
* `fused` (CUDA, bf16/fp16, up to FUSED_MAX_TOKENS tokens): the GEMM, then one Triton launch for
  the whole correction (`kernels.lowrank_triton`), in series.
* `split` (CUDA, any token count): R = x B^T by cuBLAS on the second stream while the GEMM
  runs, then one Triton launch that writes y + R A^T; the prefill case, where the correction
  is bandwidth-bound and the shrink (reading all of x) hides behind the compute-bound GEMM.
* `torch` (CPU, float32, or no Triton): the GEMM, then R = x B^T and addmm.

`VLLM_GLOWQ_CORRECTION=overlap|fused|split|torch` forces one path on CUDA (for benchmarks and
for ruling the kernels out when debugging); the default `auto` takes `overlap` for decode-sized
batches and `split` above.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

PATHS = ("auto", "overlap", "fused", "split", "torch")
ENV_PATH = "VLLM_GLOWQ_CORRECTION"
# Token counts up to which the fused kernel and the overlap pay (bench/correction_microbench.py
# and bench/vllm_bench.py on the H200); the fused kernel's workspace is sized for its limit.
FUSED_MAX_TOKENS = 64
OVERLAP_MAX_TOKENS = 256
_TRITON_DTYPES = (torch.bfloat16, torch.float16)

BaseForward = Callable[[torch.nn.Module, torch.Tensor, "torch.Tensor | None"], torch.Tensor]


def _path_from_env() -> str:
    path = os.environ.get(ENV_PATH, "auto").strip().lower() or "auto"
    if path not in PATHS:
        raise ValueError(f"{ENV_PATH}={path!r} is not one of {', '.join(PATHS)}")
    return path


FORCED_PATH = _path_from_env()


class _DeviceState:
    """Per-device resources, created at load time (before CUDA graphs are captured, so captured
    launches keep pointing at live memory): the fused kernel's fp32 R workspace and two int32
    counters, which every fused launch leaves zeroed so one buffer serves all layers in turn, the
    side stream of the overlap path and the SM count."""

    def __init__(self, device: torch.device) -> None:
        self.reduced = torch.zeros(0, dtype=torch.float32, device=device)
        self.sync = torch.zeros(2, dtype=torch.int32, device=device)
        self.side_stream = torch.cuda.Stream(device)
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count

    def reserve(self, rank: int) -> None:
        if self.reduced.numel() < FUSED_MAX_TOKENS * rank:
            self.reduced = torch.zeros(FUSED_MAX_TOKENS * rank, dtype=torch.float32, device=self.sync.device)


_devices: dict[torch.device, _DeviceState] = {}
_layers: dict[str, tuple[torch.nn.Module, BaseForward]] = {}


def _device_state(device: torch.device, rank: int) -> _DeviceState:
    if device not in _devices:
        _devices[device] = _DeviceState(device)
    _devices[device].reserve(rank)
    return _devices[device]


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """The device's second stream, shared by every layer that overlaps work with its GEMMs (the
    overlap and split paths here, the MoE grouped correction in vllm_glowq/moe_marlin.py).
    Layers ask for it at load time, so it exists before CUDA graphs are captured."""
    return _device_state(device, 0).side_stream


def start_beside(device: torch.device, work: Callable[[], object]) -> Callable[[], None]:
    """Fork: `work` runs on the device's second stream after what the current stream has queued,
    while the current stream goes on. Returns the join (the current stream waits for `work`).
    Every tensor `work` touches must be allocated on the current stream before the fork and used
    there only after the join, so the caching allocator never sees cross-stream use. On a CPU
    (Triton's interpreter in the tests) `work` runs in line."""
    if device.type != "cuda":
        work()
        return lambda: None
    main, side = torch.cuda.current_stream(device), side_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        work()
    return lambda: main.wait_stream(side)


def register_layer(name: str, layer: torch.nn.Module, base: BaseForward) -> None:
    """Make `layer` (holding glowq_B, glowq_A) callable as torch.ops.glowq.linear(x, bias, name).

    A later registration under the same name (a new engine in the same process) replaces it.
    """
    _layers[name] = (layer, base)
    device = layer.glowq_A.device
    if device.type == "cuda" and FORCED_PATH != "torch" and _triton_available():
        _device_state(device, layer.glowq_A.shape[1])


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_path(x: torch.Tensor) -> str:
    if x.device.type != "cuda" or x.dtype not in _TRITON_DTYPES or FORCED_PATH == "torch" or not _triton_available():
        return "torch"
    tokens = x.shape[0]
    if FORCED_PATH == "auto":
        return "overlap" if tokens <= OVERLAP_MAX_TOKENS else "split"
    if FORCED_PATH == "fused" and tokens > FUSED_MAX_TOKENS:
        return "split"  # the workspace holds FUSED_MAX_TOKENS rows
    return FORCED_PATH


def linear(x: torch.Tensor, bias: torch.Tensor | None, layer_name: str, out_features: int) -> torch.Tensor:
    """The registered layer's base GEMM plus its correction, for x [T, K]."""
    layer, base = _layers[layer_name]
    factor_b, factor_a = layer.glowq_B, layer.glowq_A
    path = choose_path(x)
    if path in ("overlap", "split"):
        return _overlapped(x, bias, layer, base, factor_b, factor_a, path)
    return correct(x, base(layer, x, bias), factor_b, factor_a, path)


def _linear_fake(x: torch.Tensor, bias: torch.Tensor | None, layer_name: str, out_features: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], out_features))


def _overlapped(x, bias, layer, base: BaseForward, factor_b, factor_a, path: str) -> torch.Tensor:
    """Fork (`start_beside`): the side stream computes R = x B^T (`overlap`: and C = R A^T too)
    while the int4 GEMM runs. Join: out + C (`overlap`), or one Triton launch for y + R A^T
    (`split`)."""
    reduced = x.new_empty((x.shape[0], factor_b.shape[0]))
    corrections = x.new_empty((x.shape[0], factor_a.shape[0])) if path == "overlap" else None

    def side_work() -> None:
        torch.mm(x, factor_b.t(), out=reduced)
        if corrections is not None:
            torch.mm(reduced, factor_a.t(), out=corrections)

    join = start_beside(x.device, side_work)
    out = base(layer, x, bias)
    join()
    if corrections is not None:
        return out.add_(corrections)
    return correct(x, out, factor_b, factor_a, "split", reduced=reduced)


def correct(x: torch.Tensor, y: torch.Tensor, factor_b: torch.Tensor, factor_a: torch.Tensor,
            path: str = "torch", reduced: torch.Tensor | None = None) -> torch.Tensor:
    """y + A (B x) for x [T, K], y [T, N], B [r, K], A [N, r] on `path` (fused, split or torch),
    in series; `split` takes R = x B^T from `reduced` when the caller computed it already."""
    if path == "torch" or x.shape[0] == 0:
        return torch.addmm(y, F.linear(x, factor_b), factor_a.t())
    from .kernels import lowrank_triton

    x = x if x.stride(-1) == 1 else x.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    out = torch.empty_like(y)
    tokens, k = x.shape
    n, rank = factor_a.shape
    state = _device_state(x.device, rank)
    fused = path == "fused" and tokens <= FUSED_MAX_TOKENS  # the workspace's capacity
    config = lowrank_triton.choose_config(tokens, k, n, rank, state.sm_count, fused)
    if fused:
        reduced, sync = state.reduced, state.sync
    else:
        reduced, sync = (F.linear(x, factor_b) if reduced is None else reduced), None
    lowrank_triton.launch(x, factor_b, factor_a, y, out, reduced, sync, config)
    return out


def int4_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                bias: torch.Tensor | None, factor_b: torch.Tensor | None, factor_a: torch.Tensor | None,
                group_size: int) -> torch.Tensor:
    """The project's int4 GEMM with the correction fused in (kernels/w4a16.py), for x [T, K].

    Takes its tensors as arguments (unlike `linear`, it calls no vLLM kernel, so it needs no
    layer registry); the kernels' shared workspace was sized when the layer was loaded."""
    from .kernels import w4a16

    return w4a16.forward(x, qweight, scales, zeros, bias, factor_b, factor_a, group_size)


def _int4_linear_fake(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                      bias: torch.Tensor | None, factor_b: torch.Tensor | None, factor_a: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    return x.new_empty((x.shape[0], scales.shape[1]))  # qweight's N sits where its layout puts it


def _register() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    # CompositeExplicitAutograd: one implementation for every device (it picks the path itself)
    direct_register_custom_op("linear", linear, mutates_args=[], fake_impl=_linear_fake, target_lib=_library,
                              dispatch_key="CompositeExplicitAutograd")
    direct_register_custom_op("int4_linear", int4_linear, mutates_args=[], fake_impl=_int4_linear_fake,
                              target_lib=_library, dispatch_key="CompositeExplicitAutograd")


# The op lives in its own namespace (torch.ops.glowq), so it cannot collide with vLLM's ops.
_library = torch.library.Library("glowq", "FRAGMENT")
_register()
