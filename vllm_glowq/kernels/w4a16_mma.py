"""The tensor-core W4A16 GEMM in Gluon, on codes stored in the order mma.m16n8k16 holds them.

`out = x deq(Wq)^T + (x B^T) A^T + bias` in one launch (GlowQ's R = x B^T once per layer,
however many modules share B), on mma.sync (Ampere and later) or, with WGMMA, on Hopper's
warpgroup MMA for many tokens. Written in Gluon, Triton's dialect with explicit
layouts (Triton >= 3.5), because the layout is the whole point:

* The product is swapped, out^T [N, T] = deq(W) [N, K] x^T [K, T]: the weight is operand A
  (16 rows per MMA) and the tokens fill the 8-wide operand B, so a handful of tokens wastes
  little of each MMA.
* Per K block of BK = 32 S inputs the codes are stored int32 [4 (t), N, S] (packing.repack_fragments):
  the word of (t, n, s) holds, in nibble j + 4 b, the code of input 32 s + 8 j + 2 t + b, which
  is where lane 4 g + t of a warp holds row n's operand-A values. A thread loads its words with
  one 16-byte load per row and turns nibbles j and j + 4 into its bf16 pair with one LOP3
  (OR-ed into MAGIC: the number MAGIC + q) and one HADD2 (minus MAGIC + 8): nothing moves
  between threads. Asymmetric codes take (z - 8) sum x off each output after the MMA. (H200, bench/results/kernel/mma_probe_2026-12-03.json: 16 tokens per
  Llama-3-8B decoder layer in 81 us against 168 for the Triton kernel's tensor-core path.)
* x passes through shared memory once per K block (read back with ldmatrix).
* The first `shrink_programs` programs compute R = x B^T, one (token block, K chunk) each on the
  tensor cores, added into an fp32 workspace with atomics. First in the grid, they are
  dispatched first and wait for nothing.
* Split K: every GEMM program stores its fp32 partial; the tile's last (a ticket per tile, as
  in w4a16_triton.py) sums them, adds the bias and writes the tile. R A_tile^T (one more MMA,
  once every shrink program has counted itself in) is added either by that last contributor
  or, with EXPAND_ITEMS, by one more program per tile as a partial of its own, off the GEMM
  items' critical path. The last tile to have read R zeroes it and the counters, so every
  launch finds a clean workspace.
* WGMMA (_gemm_block_sum_wgmma): the same codes, scaled in registers, are the warpgroup MMA's
  operand A (its register layout is mma.sync's, a warpgroup's four warps stacked along the
  rows), x goes through NVMMA-swizzled shared memory as operand B, and the accumulator chains
  over K blocks and then over R A_tile^T (added by each tile's first K chunk). (H200,
  bench/results/kernel/micro_vs_vllm_wgmma_2026-12-04.json: 64 tokens per Llama-3-8B decoder
  layer in 120 us with the correction against 165 on mma.sync and 122 for Machete's plain int4.)
"""

from __future__ import annotations

import triton  # noqa: F401  (Gluon lives inside Triton)
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy, mma_v2
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait


@gluon.constexpr_function
def mma_layout(warps):
    """Accumulator of mma.m16n8k16 over [BN, BT]: warps stacked along the output rows (16 each)."""
    return gl.NVMMADistributedLayout(version=[2, 0], warps_per_cta=[warps, 1], instr_shape=[16, 8])


@gluon.constexpr_function
def words_layout(block_n, sigma, warps):
    """[BN, 4, S] words: lane 4 g + t holds rows g and g + 8 of each warp's 16 (further row tiles
    of 16 * warps in further registers) and all S words of its t, contiguous for 16-byte loads."""
    regs = [[0, 0, 1 << i] for i in range(sigma.bit_length() - 1)] + [[8, 0, 0]]
    regs += [[16 * warps << i, 0, 0] for i in range((block_n // (16 * warps)).bit_length() - 1)]
    lanes = [[0, 1, 0], [0, 2, 0], [1, 0, 0], [2, 0, 0], [4, 0, 0]]
    warp_bases = [[16 << i, 0, 0] for i in range(warps.bit_length() - 1)]
    return gl.DistributedLinearLayout(reg_bases=regs, lane_bases=lanes, warp_bases=warp_bases, block_bases=[],
                                      shape=[block_n, 4, sigma])


@gluon.constexpr_function
def rows_layout(block_k, warps):
    """A [rows, BK] tile read along K: 8 contiguous elements (16 bytes) per thread."""
    along_k = min(32, block_k // 8)
    return gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[32 // along_k, along_k],
                            warps_per_cta=[warps, 1], order=[1, 0])


@gluon.jit
def _code_pairs(words, j: gl.constexpr, magic, DTYPE: gl.constexpr):
    """Nibbles j and j + 4 of every word as DTYPE numbers MAGIC + q, joined along a new last axis."""
    pair = ((words >> (4 * j)) & 0x000F000F) | magic
    low = (pair & 0xFFFF).to(gl.int16).to(DTYPE, bitcast=True)
    high = (pair >> 16).to(gl.int16).to(DTYPE, bitcast=True)
    return gl.join(low, high)


@gluon.jit
def _operand_a(words, magic, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr, DTYPE: gl.constexpr):
    """Words [BN, 4, S] -> MAGIC + q as operand A [BN, BK]: axes (n, t, s, b, j % 2, j // 2) are
    reordered to k = 32 s + 16 (j // 2) + 8 (j % 2) + 2 t + b; no value changes thread."""
    codes = gl.join(gl.join(_code_pairs(words, 0, magic, DTYPE), _code_pairs(words, 1, magic, DTYPE)),
                    gl.join(_code_pairs(words, 2, magic, DTYPE), _code_pairs(words, 3, magic, DTYPE)))
    codes = gl.reshape(gl.permute(codes, (0, 2, 5, 4, 1, 3)), [BN, BK])
    return gl.convert_layout(codes, A_L, assert_trivial=True)


@gluon.jit
def _shrink(x_ptr, b_ptr, r_ptr, item, M, K, RANK, stride_xm, stride_bk, shrink_chunk, BT: gl.constexpr,
            BK: gl.constexpr, RP: gl.constexpr, MMA: gl.constexpr, num_warps: gl.constexpr):
    """R[token block, :] += x[token block, chunk] B[:, chunk]^T for one shrink program (R^T = B x^T,
    as the GEMM), BK inputs per step (64 rather than the GEMM's 128: the register count of the
    whole kernel is its largest branch's, 90 against 72 per thread at 8 tokens, sm_90 compile)."""
    LD: gl.constexpr = rows_layout(BK, num_warps)
    k_chunks = gl.cdiv(K, shrink_chunk)
    t0 = item // k_chunks * BT
    k_start = item % k_chunks * shrink_chunk
    ranks = gl.arange(0, RP, layout=gl.SliceLayout(1, LD))
    cols = gl.expand_dims(gl.arange(0, BK, layout=gl.SliceLayout(0, LD)), 0)
    b_ptrs = b_ptr + gl.expand_dims(ranks, 1) * stride_bk + k_start + cols
    t_rows = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, LD))
    x_ptrs = x_ptr + gl.expand_dims(t_rows, 1) * stride_xm + k_start + cols
    acc = gl.zeros([RP, BT], gl.float32, MMA)
    for _ in range(k_start, gl.minimum(K, k_start + shrink_chunk), BK):
        b = gl.load(b_ptrs, mask=gl.expand_dims(ranks < RANK, 1), other=0.0)
        xv = gl.load(x_ptrs, mask=gl.expand_dims(t_rows < M, 1), other=0.0)
        acc = mma_v2(gl.convert_layout(b, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)),
                     gl.convert_layout(gl.permute(xv, (1, 0)), gl.DotOperandLayout(operand_index=1, parent=MMA,
                                                                                   k_width=2)), acc)
        b_ptrs += BK
        x_ptrs += BK
    r_rows = gl.arange(0, RP, layout=gl.SliceLayout(1, MMA))
    r_cols = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, MMA))
    gl.atomic_add(r_ptr + gl.expand_dims(r_cols, 0) * RANK + gl.expand_dims(r_rows, 1), acc,
                  mask=gl.expand_dims(r_rows < RANK, 1) & gl.expand_dims(r_cols < M, 0), sem="relaxed")


@gluon.jit
def _await_r(sync_ptr, shrink_programs):
    """Wait until every shrink program has added its part of R (sync_ptr[0] counts them)."""
    # Spin on plain (volatile) loads, which many programs can issue at once, then an acquire
    # (its result used, or the compiler drops it) orders the reads of R after the shrink's atomics.
    while gl.load(sync_ptr, volatile=True) < shrink_programs:
        pass
    arrived = gl.atomic_add(sync_ptr, 0, sem="acquire")
    while arrived < shrink_programs:
        arrived = gl.atomic_add(sync_ptr, 0, sem="acquire")


@gluon.jit
def _release_r(r_ptr, sync_ptr, M, RANK, tiles, RP: gl.constexpr, num_warps: gl.constexpr):
    """Count this tile's reads of R done; the last tile zeroes R and the counters sync_ptr[0:2]."""
    LD: gl.constexpr = rows_layout(RP, num_warps)
    ranks = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(0, LD)), 0)
    gl.thread_barrier()  # this program's reads of R are done
    if gl.atomic_add(sync_ptr + 1, 1, sem="acq_rel") == tiles - 1:  # every tile has read R
        for m0 in range(0, M, 64):
            rows = m0 + gl.arange(0, 64, layout=gl.SliceLayout(1, LD))
            gl.store(r_ptr + gl.expand_dims(rows, 1) * RANK + ranks, gl.zeros([64, RP], gl.float32, LD),
                     mask=gl.expand_dims(rows < M, 1) & (ranks < RANK))
        gl.atomic_xchg(sync_ptr, 0)
        gl.atomic_xchg(sync_ptr + 1, 0)


@gluon.jit
def _factor_a_tile(a_ptr, n0, N, RANK, stride_an, BN: gl.constexpr, RP: gl.constexpr, num_warps: gl.constexpr):
    """A[tile rows, :] [BN, RP], the rank padded with zeros."""
    LD: gl.constexpr = rows_layout(RP, num_warps)
    a_rows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, LD))
    ranks = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(0, LD)), 0)
    return gl.load(a_ptr + gl.expand_dims(a_rows, 1) * stride_an + ranks,
                   mask=gl.expand_dims(a_rows < N, 1) & (ranks < RANK), other=0.0)


@gluon.jit
def _r_rows(r_ptr, t0, M, RANK, BT: gl.constexpr, RP: gl.constexpr, DTYPE: gl.constexpr, num_warps: gl.constexpr):
    """R[t0 : t0 + BT, :] as DTYPE [BT, RP], read past the caches (other programs' atomics wrote it)."""
    LD: gl.constexpr = rows_layout(RP, num_warps)
    ranks = gl.expand_dims(gl.arange(0, RP, layout=gl.SliceLayout(0, LD)), 0)
    t_rows = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, LD))
    return gl.load(r_ptr + gl.expand_dims(t_rows, 1) * RANK + ranks, mask=gl.expand_dims(t_rows < M, 1) & (ranks < RANK),
                   other=0.0, cache_modifier=".cg").to(DTYPE)


@gluon.jit
def _expand(r_ptr, a_ptr, sync_ptr, n0, t0, M, N, RANK, tiles, shrink_programs, stride_an, acc, BN: gl.constexpr,
            BT: gl.constexpr, RP: gl.constexpr, MMA: gl.constexpr, num_warps: gl.constexpr):
    """acc + A[tile, :] R[tokens, :]^T on the tensor cores (rank padded to RP with zeros), once
    R is complete."""
    DTYPE: gl.constexpr = a_ptr.dtype.element_ty
    a_tile = _factor_a_tile(a_ptr, n0, N, RANK, stride_an, BN, RP, num_warps)
    _await_r(sync_ptr, shrink_programs)
    r_tile = _r_rows(r_ptr, t0, M, RANK, BT, RP, DTYPE, num_warps)
    a_op = gl.convert_layout(a_tile, gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2))
    r_op = gl.convert_layout(gl.permute(r_tile, (1, 0)), gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2))
    acc = mma_v2(a_op, r_op, acc)
    _release_r(r_ptr, sync_ptr, M, RANK, tiles, RP, num_warps)
    return acc


@gluon.jit
def _expand_wgmma(r_ptr, a_ptr, sync_ptr, n0, t0, M, N, RANK, tiles, shrink_programs, stride_an, acc,
                  BN: gl.constexpr, BT: gl.constexpr, RP: gl.constexpr, ACC: gl.constexpr, num_warps: gl.constexpr):
    """_expand on the warpgroup MMA, chained into the GEMM's accumulator: R^T goes through shared
    memory 64 tokens at a time (a whole 256-token tile of R would take 128 registers a thread)."""
    DTYPE: gl.constexpr = a_ptr.dtype.element_ty
    a_op = gl.convert_layout(_factor_a_tile(a_ptr, n0, N, RANK, stride_an, BN, RP, num_warps),
                             gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2))
    r_smem = gl.allocate_shared_memory(DTYPE, [BT, RP], gl.NVMMASharedLayout.get_default_for([BT, RP], DTYPE))
    CHUNK: gl.constexpr = 64 if BT > 64 else BT
    _await_r(sync_ptr, shrink_programs)
    for chunk in gl.static_range(0, BT, CHUNK):
        r_smem.slice(chunk, CHUNK).store(_r_rows(r_ptr, t0 + chunk, M, RANK, CHUNK, RP, DTYPE, num_warps))
    fence_async_shared()
    gl.thread_barrier()
    acc = warpgroup_mma(a_op, r_smem.permute((1, 0)), acc)
    _release_r(r_ptr, sync_ptr, M, RANK, tiles, RP, num_warps)
    return acc


@gluon.jit
def _copy_next_x_wait_this(x_smem, x_ptrs, x_mask, kb, kb1, buffer, BK: gl.constexpr):
    """cp.async of K block kb + 1's x (x_ptrs: block kb's) into the buffer other than `buffer`,
    then wait for this thread's copy of block kb (into `buffer`, started a block earlier)."""
    if kb + 1 < kb1:
        async_copy.async_copy_global_to_shared(x_smem.index(1 - buffer), x_ptrs + BK, mask=x_mask)
        async_copy.commit_group()
        async_copy.wait_group(1)
    else:
        async_copy.wait_group(0)


@gluon.jit
def _gemm_block_sum(x_ptr, w_ptr, s_ptr, z_ptr, n0, t0, kb0, kb1, M, N, magic, stride_xm, stride_sg, stride_zg,
                    HAS_ZEROS: gl.constexpr, EVEN_N: gl.constexpr, GROUP_BLOCKS: gl.constexpr, BN: gl.constexpr,
                    BT: gl.constexpr, BK: gl.constexpr, MAGIC_VALUE: gl.constexpr, PREFETCH_X: gl.constexpr,
                    MMA: gl.constexpr, num_warps: gl.constexpr):
    """sum over K blocks [kb0, kb1) of deq(W)[tile rows, block] x[tokens, block]^T, fp32 [BN, BT].
    With PREFETCH_X the next block's x is copied a block ahead into a second shared buffer
    (cp.async, no registers: a register prefetch made the compiler repack bf16 pairs, +25%
    instructions at 16 tokens), so its L2 latency hides behind this block's MMAs."""
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    S: gl.constexpr = BK // 32
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=MMA, k_width=2)
    B_L: gl.constexpr = gl.DotOperandLayout(operand_index=1, parent=MMA, k_width=2)
    WL: gl.constexpr = words_layout(BN, S, num_warps)
    XL: gl.constexpr = rows_layout(BK, num_warps)
    rows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))
    ts = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WL)))
    sig = gl.arange(0, S, layout=gl.SliceLayout(0, gl.SliceLayout(1, WL)))
    rows3 = gl.expand_dims(gl.expand_dims(rows, 1), 2)
    w_ptrs = (w_ptr + kb0 * (4 * N * S) + (gl.expand_dims(gl.expand_dims(ts, 0), 2) * N + rows3) * S
              + gl.expand_dims(gl.expand_dims(sig, 0), 1))
    w_mask = rows3 < N if not EVEN_N else None  # no mask: the loads stay unpredicated
    x_rows = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, XL))
    x_ptrs = (x_ptr + kb0 * BK + gl.expand_dims(x_rows, 1) * stride_xm
              + gl.expand_dims(gl.arange(0, BK, layout=gl.SliceLayout(0, XL)), 0))
    x_mask = gl.expand_dims(x_rows < M, 1)
    out_rows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, MMA))
    n_ok = out_rows < N
    # two x buffers with PREFETCH_X (the next block's copy in flight), else one
    x_smem = gl.allocate_shared_memory(DTYPE, [2 if PREFETCH_X else 1, BT, BK],
                                       gl.SwizzledSharedLayout(vec=8, per_phase=1, max_phase=8, order=[1, 0]))
    total = gl.zeros([BN, BT], gl.float32, MMA)
    words_next = gl.load(w_ptrs, mask=w_mask, other=0 if not EVEN_N else None)
    if PREFETCH_X:
        async_copy.async_copy_global_to_shared(x_smem.index(0), x_ptrs, mask=x_mask)
        async_copy.commit_group()
    for kb in range(kb0, kb1):
        words = words_next
        if kb + 1 < kb1:  # the next block's words in flight while this one is unpacked
            w_ptrs += 4 * N * S
            words_next = gl.load(w_ptrs, mask=w_mask, other=0 if not EVEN_N else None)
        if not PREFETCH_X:
            xv = gl.load(x_ptrs, mask=x_mask, other=0.0)
        group = kb // GROUP_BLOCKS
        scale = gl.load(s_ptr + group * stride_sg + out_rows, mask=n_ok, other=0.0).to(gl.float32)
        gl.thread_barrier()  # the previous block's reads of x_smem are done
        if PREFETCH_X:
            buffer = (kb - kb0) % 2
            _copy_next_x_wait_this(x_smem, x_ptrs, x_mask, kb, kb1, buffer, BK)
            x_now = x_smem.index(buffer)
        else:
            x_now = x_smem.index(0)
            x_now.store(xv)
        x_ptrs += BK
        gl.thread_barrier()
        x_op = x_now.permute((1, 0)).load(B_L)
        # (MAGIC + q) - (MAGIC + 8) = q - 8, exact: the tensor cores see the integer codes
        codes = _operand_a(words, magic, BN, BK, A_L, DTYPE) - (MAGIC_VALUE + 8.0)
        acc = mma_v2(codes, x_op, gl.zeros([BN, BT], gl.float32, MMA))
        if HAS_ZEROS:
            # sum (q - z) x = sum (q - 8) x - (z - 8) sum x, with sum x from one more MMA on a constant
            # operand of ones (16 HMMA per K block at 64 rows; a z per code pair took 68 byte permutes,
            # summing x in registers about 60 instructions: sm_90 compile)
            zeros = gl.load(z_ptr + group * stride_zg + out_rows, mask=n_ok, other=0).to(gl.float32) - 8.0
            x_sums = mma_v2(gl.full([BN, BK], 1.0, DTYPE, A_L), x_op, gl.zeros([BN, BT], gl.float32, MMA))
            acc -= gl.expand_dims(zeros, 1) * x_sums
        total += acc * gl.expand_dims(scale, 1)
    return total


@gluon.constexpr_function
def wgmma_layout(block_t, warps):
    """Accumulator of Hopper's wgmma over [BN, BT]: one warpgroup per 64 output rows, BT tokens as N."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[warps, 1], instr_shape=[16, block_t, 16])


@gluon.constexpr_function
def epilogue_layout(wgmma, block_n, block_t, warps):
    """The layout a tile is summed and stored in: the MMA accumulator's, or after the warpgroup MMA
    (up to 256 tokens) 4 consecutive output columns per thread: one 16-byte partial store each
    rather than a 64-bit address per value (a 128 x 128 tile spilled 976 bytes, sm_90 compile)."""
    if not wgmma:
        return mma_layout(warps)
    along_n = min(32, block_n // 4)
    return gl.BlockedLayout(size_per_thread=[4, 1], threads_per_warp=[along_n, 32 // along_n],
                            warps_per_cta=[1, warps], order=[0, 1])


@gluon.jit
def _scaled_operand_a(words, magic, scale, zero, BN: gl.constexpr, BK: gl.constexpr, A_L: gl.constexpr,
                      DTYPE: gl.constexpr):
    """Words -> (q - z) s as operand A [BN, BK] in DTYPE, for a chained accumulator: (MAGIC + q) -
    (MAGIC + z) is exact and the product rounds once, as the dense path's weight does. scale and
    zero (MAGIC + z): DTYPE [BN] in SliceLayout(1, A_L), so pairs stay as the MMA reads them."""
    codes = _operand_a(words, magic, BN, BK, A_L, DTYPE)
    return (codes - gl.expand_dims(zero, 1)) * gl.expand_dims(scale, 1)


@gluon.jit
def _unpack_block(words, kb, s_ptr, z_ptr, rows, n_ok, magic, stride_sg, stride_zg, HAS_ZEROS: gl.constexpr,
                  GROUP_BLOCKS: gl.constexpr, BN: gl.constexpr, BK: gl.constexpr, MAGIC_VALUE: gl.constexpr,
                  A_L: gl.constexpr, DTYPE: gl.constexpr):
    """K block kb's words as scaled codes, operand A of the warpgroup MMA."""
    group = kb // GROUP_BLOCKS
    zero = gl.full([BN], MAGIC_VALUE + 8.0, DTYPE, gl.SliceLayout(1, A_L))
    if HAS_ZEROS:
        zero = (gl.load(z_ptr + group * stride_zg + rows, mask=n_ok, other=8).to(gl.float32) + MAGIC_VALUE).to(DTYPE)
    scale = gl.load(s_ptr + group * stride_sg + rows, mask=n_ok, other=0.0)
    return _scaled_operand_a(words, magic, scale, zero, BN, BK, A_L, DTYPE)


@gluon.jit
def _x_block_ready(x_smem, x_ptrs, x_mask, kb, kb1, buffer, BK: gl.constexpr):
    """x of K block kb (at x_ptrs) in x_smem[buffer] for every warp's warpgroup MMA, block kb + 1's
    copy started into the other buffer once every warp's MMAs on it are done."""
    gl.thread_barrier()
    _copy_next_x_wait_this(x_smem, x_ptrs, x_mask, kb, kb1, buffer, BK)
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _gemm_block_sum_wgmma(x_ptr, w_ptr, s_ptr, z_ptr, n0, t0, kb0, kb1, M, N, magic, stride_xm, stride_sg,
                          stride_zg, HAS_ZEROS: gl.constexpr, EVEN_N: gl.constexpr, GROUP_BLOCKS: gl.constexpr,
                          BN: gl.constexpr, BT: gl.constexpr, BK: gl.constexpr, MAGIC_VALUE: gl.constexpr,
                          CODES_IN_SMEM: gl.constexpr, num_warps: gl.constexpr):
    """_gemm_block_sum on Hopper's warpgroup MMA, for many tokens: the scaled codes are operand A
    from registers, x (copied a block ahead by cp.async) operand B from shared memory, and the
    accumulator chains across K blocks, so it is held once (64 x 256: 128 registers a thread).
    From registers, a program's MMAs wait for its unpacking: ptxas put the wait for asynchronous
    MMAs before any unpacking issued behind them, with one set of code registers carried around
    the loop or two alternating (sm_90 compiles). With CODES_IN_SMEM the codes go through two
    shared buffers (stmatrix) and block kb + 1 is unpacked while block kb's MMAs run, which
    ptxas keeps (sm_90 compile; not timed yet: the sweep and the GPU test try it)."""
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    S: gl.constexpr = BK // 32
    ACC: gl.constexpr = wgmma_layout(BT, num_warps)
    A_L: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=ACC, k_width=2)
    WL: gl.constexpr = words_layout(BN, S, num_warps)
    XL: gl.constexpr = rows_layout(BK, num_warps)
    rows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, A_L))
    n_ok = rows < N
    w_rows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, gl.SliceLayout(2, WL)))
    ts = gl.arange(0, 4, layout=gl.SliceLayout(0, gl.SliceLayout(2, WL)))
    sig = gl.arange(0, S, layout=gl.SliceLayout(0, gl.SliceLayout(1, WL)))
    rows3 = gl.expand_dims(gl.expand_dims(w_rows, 1), 2)
    w_ptrs = (w_ptr + (gl.expand_dims(gl.expand_dims(ts, 0), 2) * N + rows3) * S
              + gl.expand_dims(gl.expand_dims(sig, 0), 1))  # of K block 0: + kb * 4 N S
    w_mask = rows3 < N if not EVEN_N else None
    x_rows = t0 + gl.arange(0, BT, layout=gl.SliceLayout(1, XL))
    x_ptrs = (x_ptr + gl.expand_dims(x_rows, 1) * stride_xm
              + gl.expand_dims(gl.arange(0, BK, layout=gl.SliceLayout(0, XL)), 0))  # of K block 0: + kb * BK
    x_mask = gl.expand_dims(x_rows < M, 1)
    x_smem = gl.allocate_shared_memory(DTYPE, [2, BT, BK], gl.NVMMASharedLayout.get_default_for([BT, BK], DTYPE))
    async_copy.async_copy_global_to_shared(x_smem.index(0), x_ptrs + kb0 * BK, mask=x_mask)
    async_copy.commit_group()
    total = gl.zeros([BN, BT], gl.float32, ACC)
    words = gl.load(w_ptrs + kb0 * (4 * N * S), mask=w_mask, other=0 if not EVEN_N else None)
    if CODES_IN_SMEM:
        a_smem = gl.allocate_shared_memory(DTYPE, [2, BN, BK], gl.NVMMASharedLayout.get_default_for([BN, BK], DTYPE))
        a_smem.index(0).store(_unpack_block(words, kb0, s_ptr, z_ptr, rows, n_ok, magic, stride_sg, stride_zg,
                                            HAS_ZEROS, GROUP_BLOCKS, BN, BK, MAGIC_VALUE, A_L, DTYPE))
        following = gl.minimum(kb0 + 1, kb1 - 1)  # past the chunk's end: its last block again, unused
        words = gl.load(w_ptrs + following * (4 * N * S), mask=w_mask, other=0 if not EVEN_N else None)
        for kb in range(kb0, kb1):
            buffer = (kb - kb0) % 2
            _x_block_ready(x_smem, x_ptrs + kb * BK, x_mask, kb, kb1, buffer, BK)  # codes of kb stored too
            running = warpgroup_mma(a_smem.index(buffer), x_smem.index(buffer).permute((1, 0)), total, is_async=True)
            codes = _unpack_block(words, following, s_ptr, z_ptr, rows, n_ok, magic, stride_sg, stride_zg, HAS_ZEROS,
                                  GROUP_BLOCKS, BN, BK, MAGIC_VALUE, A_L, DTYPE)
            following = gl.minimum(kb + 2, kb1 - 1)
            words = gl.load(w_ptrs + following * (4 * N * S), mask=w_mask, other=0 if not EVEN_N else None)
            a_smem.index(1 - buffer).store(codes)  # its last reader, block kb - 1's MMAs, is done
            total = warpgroup_mma_wait(0, deps=[running])
    else:
        for kb in range(kb0, kb1):
            codes = _unpack_block(words, kb, s_ptr, z_ptr, rows, n_ok, magic, stride_sg, stride_zg, HAS_ZEROS,
                                  GROUP_BLOCKS, BN, BK, MAGIC_VALUE, A_L, DTYPE)
            # the next block's words in flight while this one's MMAs run
            words = gl.load(w_ptrs + gl.minimum(kb + 1, kb1 - 1) * (4 * N * S), mask=w_mask,
                            other=0 if not EVEN_N else None)
            _x_block_ready(x_smem, x_ptrs + kb * BK, x_mask, kb, kb1, (kb - kb0) % 2, BK)
            total = warpgroup_mma(codes, x_smem.index((kb - kb0) % 2).permute((1, 0)), total)
    return total


# split_k == 1 specialised into a constant makes Triton 3.6's lowering to LLVM fail an assertion
# (ConvertTritonGPUToLLVM, SmallVector index; offline sm_90 compile, and on the H200 for 256-token
# launches), and M changes every step: neither becomes a constant.
@gluon.jit(do_not_specialize=["M", "split_k"])
def gemm_kernel(x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, b_ptr, a_ptr, out_ptr, part_ptr, r_ptr, sync_ptr,
                M, N, K, RANK, split_k, k_chunk, shrink_chunk, shrink_programs, magic, stride_xm, stride_sg,
                stride_zg, stride_bk, stride_an, stride_om,
                HAS_ZEROS: gl.constexpr, HAS_BIAS: gl.constexpr, CORRECT: gl.constexpr, EXPAND_ITEMS: gl.constexpr,
                EVEN_N: gl.constexpr, GROUP_BLOCKS: gl.constexpr, BN: gl.constexpr, BT: gl.constexpr,
                BK: gl.constexpr, RP: gl.constexpr, SBT: gl.constexpr, SBK: gl.constexpr,
                MAGIC_VALUE: gl.constexpr, PREFETCH_X: gl.constexpr, WGMMA: gl.constexpr, CODES_IN_SMEM: gl.constexpr,
                num_warps: gl.constexpr):
    """See the module docstring. After the shrink programs, one (token block, output tile, K chunk)
    per program; token blocks of a tile are adjacent programs, so they read its words from L2
    together. With EXPAND_ITEMS, one more program per tile after those computes R A_tile^T as the
    tile's last partial, off the critical path of its GEMM items (the Triton kernel's design);
    without, the tile's last contributor expands. sync_ptr: [0] shrink programs done, [1] tiles
    that read R, [2 + tile] the tile's tickets."""
    DTYPE: gl.constexpr = x_ptr.dtype.element_ty
    MMA: gl.constexpr = mma_layout(num_warps)
    EPI: gl.constexpr = epilogue_layout(WGMMA, BN, BT, num_warps)
    pid = gl.program_id(0)
    if CORRECT:
        if pid < shrink_programs:
            _shrink(x_ptr, b_ptr, r_ptr, pid, M, K, RANK, stride_xm, stride_bk, shrink_chunk, SBT, SBK, RP,
                    mma_layout(num_warps), num_warps)
            gl.thread_barrier()  # every thread's atomics into R precede the release of the count
            gl.atomic_add(sync_ptr, 1, sem="release")
            return
        pid -= shrink_programs
    t_tiles = gl.cdiv(M, BT)
    tiles = t_tiles * gl.cdiv(N, BN)
    tile = pid % tiles
    t0 = (tile % t_tiles) * BT
    n0 = (tile // t_tiles) * BN
    split = pid // tiles
    contributors = split_k + 1 if CORRECT and EXPAND_ITEMS else split_k
    if CORRECT and EXPAND_ITEMS and split == split_k:
        total = gl.convert_layout(_expand(r_ptr, a_ptr, sync_ptr, n0, t0, M, N, RANK, tiles, shrink_programs,
                                          stride_an, gl.zeros([BN, BT], gl.float32, MMA), BN, BT, RP, MMA, num_warps),
                                  EPI)
    elif WGMMA:
        kb0 = split * (k_chunk // BK)
        total = _gemm_block_sum_wgmma(x_ptr, w_ptr, s_ptr, z_ptr, n0, t0, kb0, gl.minimum(kb0 + k_chunk // BK, K // BK),
                                      M, N, magic, stride_xm, stride_sg, stride_zg, HAS_ZEROS, EVEN_N, GROUP_BLOCKS,
                                      BN, BT, BK, MAGIC_VALUE, CODES_IN_SMEM, num_warps)
        if CORRECT and split == 0:  # the correction is linear: any one contributor may add it
            total = _expand_wgmma(r_ptr, a_ptr, sync_ptr, n0, t0, M, N, RANK, tiles, shrink_programs, stride_an,
                                  total, BN, BT, RP, wgmma_layout(BT, num_warps), num_warps)
        total = gl.convert_layout(total, EPI)
    else:
        kb0 = split * (k_chunk // BK)
        total = _gemm_block_sum(x_ptr, w_ptr, s_ptr, z_ptr, n0, t0, kb0, gl.minimum(kb0 + k_chunk // BK, K // BK), M,
                                N, magic, stride_xm, stride_sg, stride_zg, HAS_ZEROS, EVEN_N, GROUP_BLOCKS, BN, BT,
                                BK, MAGIC_VALUE, PREFETCH_X, MMA, num_warps)

    out_rows = n0 + gl.arange(0, BN, layout=gl.SliceLayout(1, EPI))
    n_ok = out_rows < N
    out_cols = t0 + gl.arange(0, BT, layout=gl.SliceLayout(0, EPI))
    tile_offs = gl.expand_dims(out_cols, 0) * N + gl.expand_dims(out_rows, 1)
    in_tile = gl.expand_dims(n_ok, 1) & gl.expand_dims(out_cols < M, 0)
    last = contributors == 1
    if contributors > 1:
        gl.store(part_ptr + split * M * N + tile_offs, total, mask=in_tile)
        gl.thread_barrier()  # every thread's partial precedes the ticket's release
        last = gl.atomic_add(sync_ptr + 2 + tile, 1, sem="acq_rel") == contributors - 1
        if last:
            gl.atomic_xchg(sync_ptr + 2 + tile, 0)
            total = gl.zeros([BN, BT], gl.float32, EPI)
            for s in range(contributors):
                total += gl.load(part_ptr + s * M * N + tile_offs, mask=in_tile, other=0.0, cache_modifier=".cg")
    if last:
        if CORRECT and not EXPAND_ITEMS and not WGMMA:
            total = _expand(r_ptr, a_ptr, sync_ptr, n0, t0, M, N, RANK, tiles, shrink_programs, stride_an, total,
                            BN, BT, RP, MMA, num_warps)
        if HAS_BIAS:
            total += gl.expand_dims(gl.load(bias_ptr + out_rows, mask=n_ok, other=0.0).to(gl.float32), 1)
        gl.store(out_ptr + gl.expand_dims(out_cols, 0) * stride_om + gl.expand_dims(out_rows, 1), total.to(DTYPE),
                 mask=in_tile)
