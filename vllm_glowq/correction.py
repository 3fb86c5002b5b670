"""The correction `out = y + A (B x)` as one vLLM custom op, `torch.ops.glowq.correct`.

The op is opaque to torch.compile (its fake implementation gives the output's shape), so Dynamo
traces one call per layer and CUDA graphs capture whatever the op launches. Inside, the path
is chosen per call from the device, dtype and token count:

* `fused` (CUDA, bf16/fp16, up to FUSED_MAX_TOKENS tokens): one Triton launch
  (`correction_triton`), the decode case, where launches and not bytes set the cost;
* `split` (CUDA, more tokens): R = x B^T by cuBLAS, then the Triton expand-and-add;
* `torch` (CPU, float32, or no Triton): R = x B^T, then addmm.

`VLLM_GLOWQ_CORRECTION=fused|split|torch` forces one path on CUDA (for benchmarks and for
ruling the kernels out when debugging); the default `auto` does the above.
"""

from __future__ import annotations

import logging
import os

import torch
import torch.nn.functional as F

logger = logging.getLogger("vllm.glowq")

PATHS = ("auto", "fused", "split", "torch")
ENV_PATH = "VLLM_GLOWQ_CORRECTION"
# Above this many tokens the fused kernel's K-split atomics cost more than the second launch
# it saves (bench/correction_microbench.py on the H200); the workspace is sized for it.
FUSED_MAX_TOKENS = 256
_TRITON_DTYPES = (torch.bfloat16, torch.float16)


def _path_from_env() -> str:
    path = os.environ.get(ENV_PATH, "auto").strip().lower() or "auto"
    if path not in PATHS:
        raise ValueError(f"{ENV_PATH}={path!r} is not one of {', '.join(PATHS)}")
    return path


FORCED_PATH = _path_from_env()


class _Workspace:
    """Per-device fp32 R buffer and two int32 counters for the fused kernel.

    Every fused launch leaves them zeroed, so one buffer serves all layers (they run one after
    another on one stream). It only grows at load time (`reserve`), before CUDA graphs are
    captured, so captured launches keep pointing at live memory.
    """

    def __init__(self) -> None:
        self.reduced: dict[torch.device, torch.Tensor] = {}
        self.sync: dict[torch.device, torch.Tensor] = {}

    def reserve(self, device: torch.device, rank: int) -> None:
        need = FUSED_MAX_TOKENS * rank
        current = self.reduced.get(device)
        if current is None or current.numel() < need:
            self.reduced[device] = torch.zeros(need, dtype=torch.float32, device=device)
            self.sync.setdefault(device, torch.zeros(2, dtype=torch.int32, device=device))

    def get(self, device: torch.device, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        self.reserve(device, rank)
        return self.reduced[device], self.sync[device]


_workspace = _Workspace()
_sm_count: dict[torch.device, int] = {}


def reserve_workspace(device: torch.device, rank: int) -> None:
    """Size the fused kernel's workspace for a layer of this total rank (no-op off CUDA)."""
    if device.type == "cuda" and FORCED_PATH != "torch" and _triton_available():
        _workspace.reserve(device, rank)


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def choose_path(x: torch.Tensor) -> str:
    if x.device.type != "cuda" or x.dtype not in _TRITON_DTYPES or FORCED_PATH == "torch" or not _triton_available():
        return "torch"
    if FORCED_PATH != "auto":
        return FORCED_PATH
    return "fused" if x.shape[0] <= FUSED_MAX_TOKENS else "split"


def correct(x: torch.Tensor, y: torch.Tensor, factor_b: torch.Tensor, factor_a: torch.Tensor) -> torch.Tensor:
    """out = y + A (B x) for x [T, K], y [T, N], B [r, K], A [N, r]; y is left untouched."""
    path = choose_path(x)
    if path == "torch" or x.shape[0] == 0:
        return torch.addmm(y, F.linear(x, factor_b), factor_a.t())
    from . import correction_triton

    x = x if x.stride(-1) == 1 else x.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    out = torch.empty_like(y)
    tokens, k = x.shape
    n, rank = factor_a.shape
    device = x.device
    if device not in _sm_count:
        _sm_count[device] = torch.cuda.get_device_properties(device).multi_processor_count
    fused = path == "fused" and tokens <= FUSED_MAX_TOKENS
    config = correction_triton.choose_config(tokens, k, n, rank, _sm_count[device], fused)
    if fused:
        reduced, sync = _workspace.get(device, rank)
    else:
        reduced, sync = F.linear(x, factor_b), None
    correction_triton.launch(x, factor_b, factor_a, y, out, reduced, sync, config)
    return out


def _correct_fake(x: torch.Tensor, y: torch.Tensor, factor_b: torch.Tensor, factor_a: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(y)


def _register() -> None:
    from vllm.utils.torch_utils import direct_register_custom_op

    # CompositeExplicitAutograd: one implementation for every device (it picks the path itself)
    direct_register_custom_op("correct", correct, mutates_args=[], fake_impl=_correct_fake, target_lib=_library,
                              dispatch_key="CompositeExplicitAutograd")


# The op lives in its own namespace (torch.ops.glowq), so it cannot collide with vLLM's ops.
_library = torch.library.Library("glowq", "FRAGMENT")
_register()
