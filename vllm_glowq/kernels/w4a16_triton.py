"""The project's W4A16 GEMM in plain Triton, with GlowQ's correction fused in: `out = x deq(Wq)^T + (x B^T) A^T + bias`.

Where Gluon runs, the tensor-core kernel (w4a16_mma.py) takes its place; this one serves the
rest (Triton without Gluon) and, in Triton's interpreter, the CPU tests of the fused design.

Two kernels, both reading qweight int32 [K / 8, N] in the layout the plugin repacks the
checkpoint's GPTQ words into at load time (packing.repack_planes: per K block the eight nibble
planes stacked), so the plugin keeps one copy of the weights:

* `gemm` (decode and small batches): one launch computes the int4 GEMM and the correction.
  - The first `shrink_programs` programs compute R = x B^T, each over one (token block, rank
    block, K chunk), added into an fp32 workspace with atomics; they are first in the grid, so
    they are dispatched first and never wait for anything.
  - GEMM items compute one (token block, output tile, K chunk) of the int4 GEMM each, and one
    expand item per tile computes R A_tile^T once R is complete. The expand items sit in the
    middle of the grid: late enough that R is done when they start, early enough that they are
    done before the last GEMM items.
  - Every item stores its product as one of the tile's partials in an fp32 workspace; the last
    to finish (a ticket counter per tile) sums them, many partials per load, adds the bias and
    writes the tile, so no program waits for another's GEMM and the correction adds no step to
    the last tile's critical path. The last expand item zeroes R and the counters, so every
    launch (the next layer, the next CUDA-graph replay) finds a clean workspace.
  B x is computed once per layer however many modules share B (GlowQ's point).
* `dequantize` (prefill): writes W_eff = deq(Wq) + (A B)^T as a dense [K, N] matrix into a
  workspace for cuBLAS. At thousands of tokens the GEMM is compute-bound, cuBLAS's dense GEMM
  beats any int4 mainloop here, and folding the correction into the weight makes it free.

Dequantization uses exact small integers: a nibble q OR-ed into the mantissa of MAGIC
(128.0 in bf16, 1024.0 in fp16) is the number MAGIC + q, two of them per 32-bit operation, and
the tensor cores multiply those directly. Per K block the kernel subtracts (MAGIC + z) times
the block's sum of x and multiplies by the group's scale: no per-weight float arithmetic.

Only the launch configuration depends on the token count; every shape and pointer is an
argument, so CUDA graphs capture one launch per batch size.
"""

from __future__ import annotations

import triton
import triton.language as tl


# The high nibble of a pair is read as the whole 32-bit pair: float32 128 + q_high plus the low
# half's bits 0x4300 + q_low as the low mantissa bits, 2^-16 each. 0x4300 / 2^16 comes off with
# the zero point; q_low / 2^16 (at most 15 / 65536 of x per weight, 2^-13 of the weight's own
# 128) stays, far below bf16's output rounding, and saves one and-operation per two weights.
HIGH_BIAS = tl.constexpr(0x4300 / 65536)


@triton.jit
def _add(a, b):
    return a + b


@triton.jit
def _sum(values, axis: tl.constexpr):
    """tl.sum, through a builtin: the interpreter runs this file's kernels even when Triton was
    imported before TRITON_INTERPRET was set (the tests), which tl.sum's own @jit prevents."""
    return tl.reduce(values, axis, _add)


@triton.jit
def _stack_rows(a, b):
    """[R, C], [R, C] -> [2R, C]: a above b (the joined axis becomes the outermost one)."""
    return tl.reshape(tl.permute(tl.join(a, b), (2, 0, 1)), (2 * a.shape[0], a.shape[1]))


@triton.jit
def _register_magic(N, MAGIC: tl.constexpr):
    """MAGIC in both halves of a 32-bit value that stays in a register: (N >> 31) is 0 for any
    real N, but the compiler cannot know it. So the and with 0x000F000F and the or with the magic
    fuse into one three-input LOP3 (an instruction takes one immediate: two constants made it
    two operations per pair of nibbles). The one-token path uses it; in the tensor-core paths
    (_nibble_pair) it made the 16-token loop compile longer (345 -> 465 SASS instructions)."""
    return (N >> 31) | (MAGIC | (MAGIC << 16))


@triton.jit
def _nibble_pair(words, shift: tl.constexpr, MAGIC: tl.constexpr, DTYPE: tl.constexpr):
    """Nibbles `shift/4` and `shift/4 + 4` of each word as MAGIC + q in DTYPE (one and-or for both)."""
    pair = ((words >> shift) & 0x000F000F) | (MAGIC | (MAGIC << 16))
    low = (pair & 0xFFFF).to(tl.int16).to(DTYPE, bitcast=True)
    high = (pair >> 16).to(tl.int16).to(DTYPE, bitcast=True)
    return low, high


@triton.jit
def _unpack(words, MAGIC: tl.constexpr, DTYPE: tl.constexpr):
    """Repacked words [KW, C] of one K block -> [8 KW, C] values MAGIC + q in the block's row order.

    Nibble p = f + 2g + 4h of word kk holds block row KW (4f + 2g + h) + kk (packing.py's
    `repack_planes`), so the eight nibble planes are stacked, never interleaved: each thread
    keeps its words' values, and x is one contiguous tile.
    """
    n0, n4 = _nibble_pair(words, 0, MAGIC, DTYPE)
    n1, n5 = _nibble_pair(words, 4, MAGIC, DTYPE)
    n2, n6 = _nibble_pair(words, 8, MAGIC, DTYPE)
    n3, n7 = _nibble_pair(words, 12, MAGIC, DTYPE)
    return _stack_rows(_stack_rows(_stack_rows(n0, n4), _stack_rows(n2, n6)),
                       _stack_rows(_stack_rows(n1, n5), _stack_rows(n3, n7)))


@triton.jit
def _zero_point_term(z_ptr, group, offs_n, N, stride_zg, HAS_ZEROS: tl.constexpr, MAGIC_VALUE: tl.constexpr):
    """MAGIC + z for one group and output tile (z = 8 for symmetric codes), float32 [BN]."""
    if HAS_ZEROS:
        zeros = tl.load(z_ptr + group * stride_zg + offs_n, mask=offs_n < N, other=0).to(tl.float32)
    else:
        zeros = tl.full(offs_n.shape, 8.0, tl.float32)
    return zeros + MAGIC_VALUE


@triton.jit
def _int4_block_sum(x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, k_start, k_end, M, N, group_size,
                    stride_xm, stride_qk, stride_sg, stride_zg, acc,
                    HAS_ZEROS: tl.constexpr, BK: tl.constexpr, MAGIC: tl.constexpr,
                    MAGIC_VALUE: tl.constexpr, DTYPE: tl.constexpr):
    """acc + sum over k in [k_start, k_end) of x[m, k] deq(W)[k, n] on the tensor cores (BK divides the group)."""
    offs_kw = tl.arange(0, BK // 8)
    offs_k = tl.arange(0, BK)
    m_ok = offs_m[:, None] < M
    n_ok = offs_n < N
    for k0 in range(k_start, k_end, BK):
        words = tl.load(qw_ptr + (k0 // 8 + offs_kw)[:, None] * stride_qk + offs_n[None, :],
                        mask=n_ok[None, :], other=0)
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :], mask=m_ok, other=0.0)
        group = k0 // group_size
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        zero_term = _zero_point_term(z_ptr, group, offs_n, N, stride_zg, HAS_ZEROS, MAGIC_VALUE)
        # (MAGIC + q) - (MAGIC + z) = q - z, exact in DTYPE: the dot sees the integer codes
        codes = _unpack(words, MAGIC, DTYPE) - zero_term.to(DTYPE)[None, :]
        acc += tl.dot(x, codes) * scale[None, :]
    return acc


@triton.jit
def _gemv_block_sum(x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, k_start, k_end, N, group_size,
                    stride_qk, stride_sg, stride_zg, acc, HAS_ZEROS: tl.constexpr, BK: tl.constexpr,
                    PREFETCH: tl.constexpr):
    """The one-token case without tensor cores: acc [1, BN] + x deq(W) over [k_start, k_end).

    Two nibbles per and-or become the bf16 numbers 128 + q in the halves of a word; shifting
    each half to the top gives the same number as float32, so every weight costs about one
    integer operation and one fused multiply-add, and the sum over K stays inside each thread.
    Triton pipelines only loads that feed tl.dot, so with PREFETCH the next block's words are
    loaded by hand before this block's arithmetic, to keep a load in flight while it runs.
    """
    offs_kw = tl.arange(0, BK // 8)
    n_ok = offs_n < N
    total = tl.full(offs_n.shape, 0.0, tl.float32)
    rows = offs_kw[:, None] * stride_qk + offs_n[None, :]
    magic = _register_magic(N, 0x4300)
    words = tl.load(qw_ptr + (k_start // 8) * stride_qk + rows, mask=n_ok[None, :], other=0)
    for k0 in range(k_start, k_end, BK):
        if PREFETCH:  # the last block loads itself once more rather than past the chunk
            following = tl.load(qw_ptr + (tl.minimum(k0 + BK, k_end - BK) // 8) * stride_qk + rows,
                                mask=n_ok[None, :], other=0)
        else:
            words = tl.load(qw_ptr + (k0 // 8) * stride_qk + rows, mask=n_ok[None, :], other=0)
        products = tl.full(words.shape, 0.0, tl.float32)  # per word: the sum over its eight nibbles
        x_rows = tl.full(offs_kw.shape, 0.0, tl.float32)
        x_high_rows = tl.full(offs_kw.shape, 0.0, tl.float32)
        for p in tl.static_range(4):
            pair = ((words >> (4 * p)) & 0x000F000F) | magic
            low = (pair << 16).to(tl.float32, bitcast=True)  # 128 + q exactly
            high = pair.to(tl.float32, bitcast=True)  # 128 + q + HIGH_BIAS + q_low / 2^16, see below
            plane = (BK // 8) * (4 * (p % 2) + 2 * (p // 2))  # nibble p's rows; nibble p + 4's follow
            x_low = tl.load(x_ptr + k0 + plane + offs_kw).to(tl.float32)
            x_high = tl.load(x_ptr + k0 + plane + BK // 8 + offs_kw).to(tl.float32)
            products += x_low[:, None] * low  # two statements: two fused multiply-adds
            products += x_high[:, None] * high
            x_rows += x_low + x_high
            x_high_rows += x_high
        raw = _sum(products, axis=0) - HIGH_BIAS * _sum(x_high_rows, axis=0)  # one add per word, inside each thread
        x_sum = _sum(x_rows, axis=0)
        group = k0 // group_size
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        zero_term = _zero_point_term(z_ptr, group, offs_n, N, stride_zg, HAS_ZEROS, 128.0)
        total += (raw - x_sum * zero_term) * scale
        if PREFETCH:
            words = following
    return acc + total[None, :]


@triton.jit
def _shrink(x_ptr, b_ptr, r_ptr, item, M, K, RANK, stride_xm, stride_bk, shrink_chunk,
            BM: tl.constexpr, BR: tl.constexpr, SBK: tl.constexpr):
    """R[m block, r block] += x[m block, chunk] B[r block, chunk]^T for one shrink item.

    One token (BM == 1) multiplies on the CUDA cores: a tensor-core tile would pad the token to
    16 rows, and these programs must finish before the first epilogue needs R."""
    r_blocks = (RANK + BR - 1) // BR
    k_chunks = (K + shrink_chunk - 1) // shrink_chunk
    k_chunk = item % k_chunks
    r_block = (item // k_chunks) % r_blocks
    m_block = item // (k_chunks * r_blocks)
    offs_m = m_block * BM + tl.arange(0, BM)
    offs_r = r_block * BR + tl.arange(0, BR)
    offs_k = tl.arange(0, SBK)
    k_end = tl.minimum(K, (k_chunk + 1) * shrink_chunk)
    if BM == 1:
        products = tl.full((BR, SBK), 0.0, tl.float32)
        for k0 in range(k_chunk * shrink_chunk, k_end, SBK):
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptr + k0 + offs_k, mask=k_ok, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + offs_r[:, None] * stride_bk + (k0 + offs_k)[None, :],
                        mask=(offs_r[:, None] < RANK) & k_ok[None, :], other=0.0)
            products += b.to(tl.float32) * x[None, :]
        tl.atomic_add(r_ptr + offs_r, _sum(products, axis=1), mask=offs_r < RANK, sem="relaxed")
    else:
        acc = tl.full((BM, BR), 0.0, tl.float32)
        for k0 in range(k_chunk * shrink_chunk, k_end, SBK):
            k_ok = (k0 + offs_k) < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
                        mask=(offs_m[:, None] < M) & k_ok[None, :], other=0.0)
            b_t = tl.load(b_ptr + offs_r[None, :] * stride_bk + (k0 + offs_k)[:, None],
                          mask=(offs_r[None, :] < RANK) & k_ok[:, None], other=0.0)
            acc = tl.dot(x, b_t, acc)
        tl.atomic_add(r_ptr + offs_m[:, None] * RANK + offs_r[None, :], acc,
                      mask=(offs_m[:, None] < M) & (offs_r[None, :] < RANK), sem="relaxed")


@triton.jit
def _expand(r_ptr, a_ptr, offs_m, offs_n, M, N, RANK, stride_an, acc, BR: tl.constexpr, RANK_BLOCKS: tl.constexpr,
            DTYPE: tl.constexpr):
    """acc + R[m, :] A[n, :]^T, reading R from L2 (.cg), where the shrink's atomics landed.

    The rank blocks are unrolled (RANK_BLOCKS is a compile-time count), so their loads are
    independent and can issue together rather than one round trip per block. (Loading all of
    A's tile before the split-K sum, to overlap the two, took 128 registers per thread at one
    token and made gate_up 40% slower on the H200.)"""
    for i in tl.static_range(RANK_BLOCKS):
        offs_r = i * BR + tl.arange(0, BR)
        reduced = tl.load(r_ptr + offs_m[:, None] * RANK + offs_r[None, :],
                          mask=(offs_m[:, None] < M) & (offs_r[None, :] < RANK), other=0.0, cache_modifier=".cg")
        a_t = tl.load(a_ptr + offs_n[None, :] * stride_an + offs_r[:, None],
                      mask=(offs_n[None, :] < N) & (offs_r[:, None] < RANK), other=0.0)
        if offs_m.shape[0] == 1:
            acc += _sum(reduced.to(DTYPE).to(tl.float32).reshape(BR, 1) * a_t.to(tl.float32), axis=0)[None, :]
        else:
            acc = tl.dot(reduced.to(DTYPE), a_t, acc)
    return acc


@triton.jit
def _sum_partials(part_ptr, offs_m, offs_n, M, N, split_k, SPLITS: tl.constexpr):
    """The tile's sum over every K chunk's partial (the caller's own included, stored like the rest).

    SPLITS partials per load: a loop of one load per split would chain split_k dependent round
    trips to L2 into the tile's critical path (16-32 at one token), this chains split_k / SPLITS."""
    offs_s = tl.arange(0, SPLITS)
    tile = offs_m[:, None] * N + offs_n[None, :]
    in_tile = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    total = tl.full(tile.shape, 0.0, tl.float32)
    for s0 in range(0, split_k, SPLITS):
        splits = s0 + offs_s
        parts = tl.load(part_ptr + splits[:, None, None] * M * N + tile[None, :, :],
                        mask=(splits < split_k)[:, None, None] & in_tile[None, :, :], other=0.0, cache_modifier=".cg")
        total += _sum(parts, axis=0)
    return total


@triton.jit
def _contribute(part_ptr, bias_ptr, out_ptr, sync_ptr, acc, slot, tile, contributors, offs_m, offs_n, M, N,
                stride_om, HAS_BIAS: tl.constexpr, SPLITS: tl.constexpr, DTYPE: tl.constexpr):
    """Add one program's share of a tile (a K chunk's product or the correction); the tile's last
    contributor (a ticket counter per tile) sums the partials, adds the bias and writes it."""
    in_tile = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    if contributors > 1:
        tl.store(part_ptr + slot * M * N + offs_m[:, None] * N + offs_n[None, :], acc, mask=in_tile)
        # The barrier puts every thread's partial stores before the ticket's release; acq_rel
        # publishes them and, for the last arrival, makes the others' visible.
        tl.debug_barrier()
        last = tl.atomic_add(sync_ptr + 2 + tile, 1, sem="acq_rel") == contributors - 1
        if last:
            tl.atomic_xchg(sync_ptr + 2 + tile, 0)
            acc = _sum_partials(part_ptr, offs_m, offs_n, M, N, contributors, SPLITS)
    else:
        last = True
    if last:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + offs_m[:, None] * stride_om + offs_n[None, :], acc.to(DTYPE), mask=in_tile)


@triton.jit
def _tile_offsets(tile, N, BM: tl.constexpr, BN: tl.constexpr):
    n_tiles = (N + BN - 1) // BN
    return (tile // n_tiles) * BM + tl.arange(0, BM), (tile % n_tiles) * BN + tl.arange(0, BN)


@triton.jit(do_not_specialize=["M"])
def gemm_kernel(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, b_ptr, a_ptr, out_ptr, part_ptr, r_ptr, sync_ptr,
                M, N, K, RANK, group_size, split_k, k_chunk, shrink_chunk, shrink_programs, expand_first,
                stride_xm, stride_qk, stride_sg, stride_zg, stride_bk, stride_an, stride_om,
                HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, CORRECT: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                BR: tl.constexpr, RANK_BLOCKS: tl.constexpr, SBM: tl.constexpr, SBK: tl.constexpr,
                MAGIC: tl.constexpr, MAGIC_VALUE: tl.constexpr, PREFETCH: tl.constexpr, SPLITS: tl.constexpr):
    """See the module docstring. sync_ptr: [0] shrink items done, [1] expand items done, [2 + t] tile t's tickets.

    With a correction the grid runs the shrink items, the GEMM items before `expand_first`, one
    expand item per tile, then the other GEMM items: placed mid-grid, R is complete long before
    the expand items start and they are done before the last GEMM items, so the correction adds
    no step to the last tile's critical path; placed last, they hold no program slot while the
    GEMM items stream (the launch configuration chooses, w4a16.GemmConfig.expand_at)."""
    DTYPE = x_ptr.dtype.element_ty
    pid = tl.program_id(0)
    tiles = (M + BM - 1) // BM * ((N + BN - 1) // BN)
    if CORRECT:
        if pid < shrink_programs:
            _shrink(x_ptr, b_ptr, r_ptr, pid, M, K, RANK, stride_xm, stride_bk, shrink_chunk, SBM, BR, SBK)
            tl.debug_barrier()  # every thread's atomics into R precede the release of the count
            tl.atomic_add(sync_ptr, 1, sem="release")
        elif pid >= expand_first and pid < expand_first + tiles:
            _expand_item(r_ptr, a_ptr, bias_ptr, out_ptr, part_ptr, sync_ptr, pid - expand_first, tiles, M, N, RANK,
                         split_k, shrink_programs, stride_an, stride_om, HAS_BIAS, BM, BN, BR, RANK_BLOCKS, SPLITS,
                         DTYPE)
        else:
            item = pid - shrink_programs - tiles * (pid >= expand_first + tiles).to(tl.int32)
            _gemm_item(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, sync_ptr, item, split_k + 1, M, N,
                       K, group_size, split_k, k_chunk, stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
                       HAS_ZEROS, HAS_BIAS, BM, BN, BK, MAGIC, MAGIC_VALUE, DTYPE, PREFETCH, SPLITS)
    else:
        _gemm_item(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, sync_ptr, pid, split_k, M, N,
                   K, group_size, split_k, k_chunk, stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
                   HAS_ZEROS, HAS_BIAS, BM, BN, BK, MAGIC, MAGIC_VALUE, DTYPE, PREFETCH, SPLITS)


@triton.jit
def _gemm_item(x_ptr, qw_ptr, s_ptr, z_ptr, bias_ptr, out_ptr, part_ptr, sync_ptr, item, contributors, M, N, K,
               group_size, split_k, k_chunk, stride_xm, stride_qk, stride_sg, stride_zg, stride_om,
               HAS_ZEROS: tl.constexpr, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VALUE: tl.constexpr, DTYPE: tl.constexpr,
               PREFETCH: tl.constexpr, SPLITS: tl.constexpr):
    """One (token block, output tile, K chunk) of the int4 GEMM, contributed to its tile."""
    split = item % split_k
    tile = item // split_k
    offs_m, offs_n = _tile_offsets(tile, N, BM, BN)
    k_start = split * k_chunk
    acc = tl.full((BM, BN), 0.0, tl.float32)
    if BM == 1:
        acc = _gemv_block_sum(x_ptr, qw_ptr, s_ptr, z_ptr, offs_n, k_start, tl.minimum(K, k_start + k_chunk), N,
                              group_size, stride_qk, stride_sg, stride_zg, acc, HAS_ZEROS, BK, PREFETCH)
    else:
        acc = _int4_block_sum(x_ptr, qw_ptr, s_ptr, z_ptr, offs_m, offs_n, k_start, tl.minimum(K, k_start + k_chunk),
                              M, N, group_size, stride_xm, stride_qk, stride_sg, stride_zg, acc,
                              HAS_ZEROS, BK, MAGIC, MAGIC_VALUE, DTYPE)
    _contribute(part_ptr, bias_ptr, out_ptr, sync_ptr, acc, split, tile, contributors, offs_m, offs_n, M, N,
                stride_om, HAS_BIAS, SPLITS, DTYPE)


@triton.jit
def _await_count(counter_ptr, count):
    """Wait until the counter reaches `count` (the shrink programs counting themselves done).
    Spin on plain (volatile) loads, which many programs can issue at once, not on atomics,
    which queue at the counter's address in front of the shrink programs' own increments; then
    an acquire (its result used, or the compiler drops it) orders the reads of R after the
    shrink programs' writes."""
    while tl.load(counter_ptr, volatile=True) < count:
        pass
    arrived = tl.atomic_add(counter_ptr, 0, sem="acquire")
    while arrived < count:
        arrived = tl.atomic_add(counter_ptr, 0, sem="acquire")


@triton.jit
def _expand_item(r_ptr, a_ptr, bias_ptr, out_ptr, part_ptr, sync_ptr, tile, tiles, M, N, RANK, split_k,
                 shrink_programs, stride_an, stride_om, HAS_BIAS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                 BR: tl.constexpr, RANK_BLOCKS: tl.constexpr, SPLITS: tl.constexpr, DTYPE: tl.constexpr):
    """R A_tile^T, once R is complete, contributed to the tile as its last partial (slot split_k).
    The last expand item to have read R zeroes it and the counters for the next launch (the next
    layer, the next CUDA-graph replay)."""
    offs_m, offs_n = _tile_offsets(tile, N, BM, BN)
    _await_count(sync_ptr, shrink_programs)
    acc = _expand(r_ptr, a_ptr, offs_m, offs_n, M, N, RANK, stride_an, tl.full((BM, BN), 0.0, tl.float32), BR,
                  RANK_BLOCKS, DTYPE)
    tl.debug_barrier()  # all of this program's reads of R are done
    if tl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == tiles - 1:  # every expand item has read R
        zero = tl.full((BM, BR), 0.0, tl.float32)
        for m0 in range(0, M, BM):
            rows = m0 + tl.arange(0, BM)
            for r0 in range(0, RANK, BR):
                cols = r0 + tl.arange(0, BR)
                tl.store(r_ptr + rows[:, None] * RANK + cols[None, :], zero,
                         mask=(rows[:, None] < M) & (cols[None, :] < RANK))
        tl.atomic_xchg(sync_ptr, 0)
        tl.atomic_xchg(sync_ptr + 1, 0)
    _contribute(part_ptr, bias_ptr, out_ptr, sync_ptr, acc, split_k, tile, split_k + 1, offs_m, offs_n, M, N,
                stride_om, HAS_BIAS, SPLITS, DTYPE)


@triton.jit
def dequantize_kernel(qw_ptr, s_ptr, z_ptr, b_ptr, a_ptr, w_ptr, N, K, RANK, group_size,
                      stride_qk, stride_sg, stride_zg, stride_bk, stride_an, stride_wk,
                      HAS_ZEROS: tl.constexpr, CORRECT: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      BR: tl.constexpr, MAGIC: tl.constexpr, MAGIC_VALUE: tl.constexpr):
    """W_eff[k, n] = (q - z) s + sum_r B[r, k] A[n, r] for one K block and BN columns, into w_ptr [K, N].

    Each nibble plane is written to its own rows (packing.plane_rows), so no tile is reordered."""
    DTYPE = w_ptr.dtype.element_ty
    KW: tl.constexpr = BK // 8
    k0 = tl.program_id(0) * BK
    offs_kw = tl.arange(0, KW)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    n_ok = offs_n < N
    words = tl.load(qw_ptr + (k0 // 8 + offs_kw)[:, None] * stride_qk + offs_n[None, :], mask=n_ok[None, :], other=0)
    group = k0 // group_size
    scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    zero_term = _zero_point_term(z_ptr, group, offs_n, N, stride_zg, HAS_ZEROS, MAGIC_VALUE)
    for p in tl.static_range(4):
        low, high = _nibble_pair(words, 4 * p, MAGIC, DTYPE)
        rows = k0 + KW * (4 * (p % 2) + 2 * (p // 2)) + offs_kw  # nibble p's rows; nibble p + 4's follow
        _store_plane(low, rows, offs_n, n_ok, scale, zero_term, b_ptr, a_ptr, w_ptr, RANK, stride_bk, stride_an,
                     stride_wk, CORRECT, BR, DTYPE)
        _store_plane(high, rows + KW, offs_n, n_ok, scale, zero_term, b_ptr, a_ptr, w_ptr, RANK, stride_bk,
                     stride_an, stride_wk, CORRECT, BR, DTYPE)


@triton.jit
def _store_plane(values, rows, offs_n, n_ok, scale, zero_term, b_ptr, a_ptr, w_ptr, RANK, stride_bk, stride_an,
                 stride_wk, CORRECT: tl.constexpr, BR: tl.constexpr, DTYPE: tl.constexpr):
    """One plane's rows of W_eff: (MAGIC + q - (MAGIC + z)) s, plus B[:, rows]^T A^T when correcting."""
    weight = (values.to(tl.float32) - zero_term[None, :]) * scale[None, :]
    if CORRECT:
        for r0 in range(0, RANK, BR):
            offs_r = r0 + tl.arange(0, BR)
            b_t = tl.load(b_ptr + offs_r[None, :] * stride_bk + rows[:, None], mask=offs_r[None, :] < RANK, other=0.0)
            a_t = tl.load(a_ptr + offs_n[None, :] * stride_an + offs_r[:, None],
                          mask=n_ok[None, :] & (offs_r[:, None] < RANK), other=0.0)
            weight = tl.dot(b_t, a_t, weight)
    tl.store(w_ptr + rows[:, None] * stride_wk + offs_n[None, :], weight.to(DTYPE), mask=n_ok[None, :])


@triton.jit
def _nibbles_j_and_j4(words, j: tl.constexpr):
    """Nibbles j and j + 4 of every word, joined along a new last axis."""
    return tl.join((words >> (4 * j)) & 0xF, (words >> (4 * j + 16)) & 0xF)


@triton.jit
def dequantize_fragments_kernel(qw_ptr, s_ptr, z_ptr, b_ptr, a_ptr, w_ptr, N, RANK, stride_sg, stride_zg, stride_bk,
                                stride_an, stride_wk, HAS_ZEROS: tl.constexpr, CORRECT: tl.constexpr,
                                GROUP_BLOCKS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, RP: tl.constexpr,
                                CHUNKS: tl.constexpr):
    """W_eff[k, n] = (q - z) s + sum_r B[r, k] A[n, r] for one K block and CHUNKS blocks of BN
    columns of the tensor-core layout (packing.repack_fragments: word (t, n, s) nibble j + 4 b is
    block row 32 s + 8 j + 2 t + b). With the correction B's block is read once per program (one
    read per BN columns cost gate_up about 235 MB from L2 at 64 columns) and the nibbles are put
    in row order in registers, so it is one product over the whole rank (RP: padded to a power
    of two) per column block and every row is written once, rounded once; without, each
    nibble's rows are written as they come."""
    DTYPE = w_ptr.dtype.element_ty
    S: tl.constexpr = BK // 32
    block = tl.program_id(0)
    group = block // GROUP_BLOCKS
    offs_t = tl.arange(0, 4)[:, None, None]
    offs_s = tl.arange(0, S)[None, None, :]
    rows = block * BK + tl.arange(0, BK)
    if CORRECT:
        offs_r = tl.arange(0, RP)
        b_t = tl.load(b_ptr + offs_r[None, :] * stride_bk + rows[:, None], mask=offs_r[None, :] < RANK, other=0.0)
    for chunk in range(CHUNKS):
        offs_n = (tl.program_id(1) * CHUNKS + chunk) * BN + tl.arange(0, BN)
        n_ok = offs_n < N
        words = tl.load(qw_ptr + block * 4 * N * S + (offs_t * N + offs_n[None, :, None]) * S + offs_s,
                        mask=n_ok[None, :, None], other=0)
        scale = tl.load(s_ptr + group * stride_sg + offs_n, mask=n_ok, other=0.0).to(tl.float32)
        zero_term = _zero_point_term(z_ptr, group, offs_n, N, stride_zg, HAS_ZEROS, 0.0)
        if CORRECT:  # [t, n, s, b, j % 2, j // 2] -> row 32 s + 16 (j // 2) + 8 (j % 2) + 2 t + b
            codes = tl.join(tl.join(_nibbles_j_and_j4(words, 0), _nibbles_j_and_j4(words, 1)),
                            tl.join(_nibbles_j_and_j4(words, 2), _nibbles_j_and_j4(words, 3)))
            codes = tl.reshape(tl.permute(codes, (2, 5, 4, 0, 3, 1)), [BK, BN])
            weight = (codes.to(tl.float32) - zero_term[None, :]) * scale[None, :]
            a_t = tl.load(a_ptr + offs_n[None, :] * stride_an + offs_r[:, None],
                          mask=n_ok[None, :] & (offs_r[:, None] < RANK), other=0.0)
            weight = tl.dot(b_t, a_t, weight)
            tl.store(w_ptr + rows[:, None] * stride_wk + offs_n[None, :], weight.to(DTYPE), mask=n_ok[None, :])
        else:  # each nibble's rows straight from the words: plain int4 prefill at 1.03x bf16 cuBLAS, 1.10x reordered (H200)
            for nibble in tl.static_range(8):
                codes = ((words >> (4 * nibble)) & 0xF).to(tl.float32)
                nibble_rows = block * BK + 32 * offs_s + 8 * (nibble % 4) + 2 * offs_t + nibble // 4
                tl.store(w_ptr + nibble_rows * stride_wk + offs_n[None, :, None],
                         ((codes - zero_term[None, :, None]) * scale[None, :, None]).to(DTYPE),
                         mask=n_ok[None, :, None])
