"""A Triton path for the correction y += A (B x), for comparison in the microbenchmark.

Two kernels instead of the plugin's two cuBLAS GEMMs plus the out-of-place add:

1. shrink: R = x B^T, split along K over many programs (B is only r x K, so one program per
   token block would read it with a single SM) and summed into an fp32 R with atomics;
2. expand: y[:, block] += R A[block]^T, in place, one program per output block.

It is not wired into the plugin: the microbenchmark measures whether it would pay.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _shrink(x_ptr, b_ptr, r_ptr, T, K, stride_x, K_PER_SPLIT: tl.constexpr, RANK: tl.constexpr,
            BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_r = tl.arange(0, RANK)
    acc = tl.zeros((BLOCK_T, RANK), dtype=tl.float32)
    for kk in range(0, K_PER_SPLIT, BLOCK_K):
        offs_k = pid_k * K_PER_SPLIT + kk + tl.arange(0, BLOCK_K)
        xt = tl.load(x_ptr + offs_t[:, None] * stride_x + offs_k[None, :],
                     mask=(offs_t[:, None] < T) & (offs_k[None, :] < K), other=0.0)
        bt = tl.load(b_ptr + offs_r[None, :] * K + offs_k[:, None], mask=offs_k[:, None] < K, other=0.0)
        acc += tl.dot(xt, bt)
    tl.atomic_add(r_ptr + offs_t[:, None] * RANK + offs_r[None, :], acc, mask=offs_t[:, None] < T)


@triton.jit
def _expand(r_ptr, a_ptr, y_ptr, T, N, stride_y, RANK: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, RANK)
    r = tl.load(r_ptr + offs_t[:, None] * RANK + offs_r[None, :], mask=offs_t[:, None] < T, other=0.0)
    a = tl.load(a_ptr + offs_n[None, :] * RANK + offs_r[:, None], mask=offs_n[None, :] < N, other=0.0)
    mask = (offs_t[:, None] < T) & (offs_n[None, :] < N)
    y_ptrs = y_ptr + offs_t[:, None] * stride_y + offs_n[None, :]
    y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
    y += tl.dot(r.to(a.dtype), a)
    tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


def _block_t(t: int) -> int:
    return 16 if t <= 16 else 32 if t <= 32 else 64


def correction_inplace(x: torch.Tensor, b: torch.Tensor, a: torch.Tensor, y: torch.Tensor,
                       k_per_split: int = 256) -> torch.Tensor:
    """y += (x B^T) A^T in place; x [T, K], B [r, K], A [N, r], y [T, N], all contiguous rows."""
    t, k = x.shape
    rank, n = b.shape[0], a.shape[0]
    reduced = torch.zeros(t, rank, device=x.device, dtype=torch.float32)
    bt = _block_t(t)
    _shrink[(triton.cdiv(t, bt), triton.cdiv(k, k_per_split))](
        x, b, reduced, t, k, x.stride(0), K_PER_SPLIT=k_per_split, RANK=rank, BLOCK_T=bt, BLOCK_K=64)
    block_n = 128
    _expand[(triton.cdiv(t, bt), triton.cdiv(n, block_n))](
        reduced, a, y, t, n, y.stride(0), RANK=rank, BLOCK_T=bt, BLOCK_N=block_n)
    return y
