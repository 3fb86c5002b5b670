"""Triton kernels for the GlowQ correction `out = y + A (B x)` on NVIDIA GPUs.

Why a kernel of our own: at decode the correction moves little data (B and A are r x K and
N x r, r = 64) but as two cuBLAS GEMMs plus an out-of-place add it costs 11-15 us per layer on an
H200 -- launches and tiny grids, not bytes (docs/benchmarks.md). One launch does it all here:

1. shrink: R = x B^T, split along K into enough work items to occupy every SM, each added into
   an fp32 workspace R with atomics;
2. a grid barrier: every program counts itself in and waits until all have arrived, so R is
   complete (the grid is at most one program per SM, so all programs are resident at once);
3. expand: out[:, tile] = y[:, tile] + R A[tile]^T, one output tile per work item;
4. the last program to finish zeroes R and the two counters, so the next launch (the next
   layer, or the next CUDA-graph replay) starts from a clean workspace without a memset.

For many tokens the correction is bandwidth-bound and the grid barrier buys nothing, so the
"split" mode takes R from cuBLAS (`torch.mm`) and launches the same kernel for step 3 only.

The kernels use only Triton builtins (`tl.full`, integer division; not the `@jit` helpers
`tl.zeros`, `tl.cdiv`), so Triton's interpreter can run them on a CPU for the tests even when
Triton was imported before TRITON_INTERPRET was set. Only the launch configuration depends
on the token count; every shape and pointer is a kernel argument, so CUDA graphs capture one
launch per batch size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

# Work per shrink item: about this many bytes of x and B. Small items keep each program's chain
# of dependent loads short (the launch is latency-bound); the H200 sweep in docs/benchmarks.md
# found 24 KiB faster than 48 KiB for 1-64 tokens.
SHRINK_ITEM_BYTES = 24 * 1024


@triton.jit
def _shrink_into_workspace(x_ptr, b_ptr, r_ptr, M, K, RANK, stride_xm, stride_bk, stride_rm, pid, nprog,
                           BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                           K_SPLIT: tl.constexpr):
    """R[m, r] += sum over one K chunk of x[m, k] B[r, k], for this program's work items."""
    m_blocks = (M + BLOCK_M - 1) // BLOCK_M
    r_blocks = (RANK + BLOCK_R - 1) // BLOCK_R
    k_chunks = (K + K_SPLIT - 1) // K_SPLIT
    for item in range(pid, m_blocks * r_blocks * k_chunks, nprog):
        k_chunk = item % k_chunks
        m_block = item // (k_chunks * r_blocks)
        r_block = (item // k_chunks) % r_blocks
        offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_r = r_block * BLOCK_R + tl.arange(0, BLOCK_R)
        acc = tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32)
        for k0 in range(0, K_SPLIT, BLOCK_K):
            offs_k = k_chunk * K_SPLIT + k0 + tl.arange(0, BLOCK_K)
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                        mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
            b_t = tl.load(b_ptr + offs_r[None, :] * stride_bk + offs_k[:, None],
                          mask=(offs_r[None, :] < RANK) & (offs_k[:, None] < K), other=0.0)
            acc = tl.dot(x, b_t, acc)
        tl.atomic_add(r_ptr + offs_m[:, None] * stride_rm + offs_r[None, :], acc,
                      mask=(offs_m[:, None] < M) & (offs_r[None, :] < RANK), sem="relaxed")


@triton.jit
def _expand_add(r_ptr, a_ptr, y_ptr, out_ptr, M, N, RANK, stride_rm, stride_an, stride_ym, stride_om, pid, nprog,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr):
    """out[m, n] = y[m, n] + sum_r R[m, r] A[n, r], one (token block, output tile) per item."""
    n_blocks = (N + BLOCK_N - 1) // BLOCK_N
    for item in range(pid, (M + BLOCK_M - 1) // BLOCK_M * n_blocks, nprog):
        offs_m = (item // n_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (item % n_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            # .cg: read R from L2, where the other programs' atomics landed, never a stale L1 line
            reduced = tl.load(r_ptr + offs_m[:, None] * stride_rm + offs_r[None, :],
                              mask=(offs_m[:, None] < M) & (offs_r[None, :] < RANK), other=0.0, cache_modifier=".cg")
            a_t = tl.load(a_ptr + offs_n[None, :] * stride_an + offs_r[:, None],
                          mask=(offs_n[None, :] < N) & (offs_r[:, None] < RANK), other=0.0)
            acc = tl.dot(reduced.to(a_t.dtype), a_t, acc)
        mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
        y = tl.load(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :],
                 (y.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _zero_workspace(r_ptr, M, RANK, stride_rm, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr):
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        for r0 in range(0, RANK, BLOCK_R):
            offs_r = r0 + tl.arange(0, BLOCK_R)
            tl.store(r_ptr + offs_m[:, None] * stride_rm + offs_r[None, :],
                     tl.full((BLOCK_M, BLOCK_R), 0.0, tl.float32),
                     mask=(offs_m[:, None] < M) & (offs_r[None, :] < RANK))


@triton.jit(do_not_specialize=["M"])
def _correction_kernel(x_ptr, b_ptr, a_ptr, y_ptr, out_ptr, r_ptr, sync_ptr, M, K, N, RANK,
                       stride_xm, stride_bk, stride_an, stride_ym, stride_om, stride_rm,
                       FUSED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, K_SPLIT: tl.constexpr):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    if FUSED:
        _shrink_into_workspace(x_ptr, b_ptr, r_ptr, M, K, RANK, stride_xm, stride_bk, stride_rm, pid, nprog,
                               BLOCK_M, BLOCK_K, BLOCK_R, K_SPLIT)
        # acq_rel: publishes this program's atomics into R and, for the last arrival, sees the others'
        arrived = tl.atomic_add(sync_ptr, 1, sem="acq_rel") + 1
        while arrived < nprog:
            arrived = tl.atomic_add(sync_ptr, 0, sem="acquire")
    _expand_add(r_ptr, a_ptr, y_ptr, out_ptr, M, N, RANK, stride_rm, stride_an, stride_ym, stride_om, pid, nprog,
                BLOCK_M, BLOCK_N, BLOCK_R)
    if FUSED:
        finished = tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel")
        if finished == nprog - 1:  # everyone has read R: clean up for the next launch
            _zero_workspace(r_ptr, M, RANK, stride_rm, BLOCK_M, BLOCK_R)
            tl.atomic_xchg(sync_ptr, 0)
            tl.atomic_xchg(sync_ptr + 1, 0)


@dataclass(frozen=True)
class LaunchConfig:
    """Tile sizes and grid of one launch; `programs` never exceeds the SM count when fused."""

    block_m: int
    block_n: int
    block_k: int
    block_r: int
    k_split: int
    programs: int
    num_warps: int = 4


def _pow2_between(value: int, low: int, high: int) -> int:
    return max(low, min(high, triton.next_power_of_2(max(1, value))))


def choose_config(tokens: int, k: int, n: int, rank: int, sm_count: int, fused: bool) -> LaunchConfig:
    """Launch configuration for `tokens` rows (tl.dot needs tiles of at least 16)."""
    block_m = _pow2_between(tokens, 16, 64)
    block_r = _pow2_between(rank, 16, 64)
    # wide output tiles, except for mid-sized batches of narrow layers (the H200 sweep)
    block_n = 128 if tokens <= 16 or n >= 16384 or not fused else 64
    block_k = 64
    m_blocks = triton.cdiv(tokens, block_m)
    expand_items = m_blocks * triton.cdiv(n, block_n)
    if not fused:
        return LaunchConfig(block_m, block_n, block_k, block_r, block_k, min(expand_items, 8 * sm_count))
    per_column = 2 * (block_m + block_r)  # bytes of x and B per K column of one item
    k_split = _pow2_between(SHRINK_ITEM_BYTES // per_column, block_k, triton.next_power_of_2(k))
    shrink_items = m_blocks * triton.cdiv(rank, block_r) * triton.cdiv(k, k_split)
    return LaunchConfig(block_m, block_n, block_k, block_r, k_split, min(sm_count, max(shrink_items, expand_items)))


def launch(x: torch.Tensor, factor_b: torch.Tensor, factor_a: torch.Tensor, y: torch.Tensor, out: torch.Tensor,
           reduced: torch.Tensor, sync: torch.Tensor | None, config: LaunchConfig) -> None:
    """One kernel launch. Fused: `reduced` is the zeroed fp32 workspace (at least M x r) and
    `sync` two zeroed int32 counters; split: `reduced` holds R = x B^T and `sync` is None."""
    tokens, k = x.shape
    n, rank = factor_a.shape
    fused = sync is not None
    _correction_kernel[(config.programs,)](
        x, factor_b, factor_a, y, out, reduced, sync if fused else reduced, tokens, k, n, rank,
        x.stride(0), factor_b.stride(0), factor_a.stride(0), y.stride(0), out.stride(0),
        rank if fused else reduced.stride(0),
        FUSED=fused, BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k,
        BLOCK_R=config.block_r, K_SPLIT=config.k_split, num_warps=config.num_warps)
