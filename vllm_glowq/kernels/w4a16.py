"""Host side of the project's W4A16 kernels: which layers they take, launch configurations, the
per-device workspace, and the forward `x deq(Wq)^T + (x B^T) A^T + bias`.

Two kernels, each with its own repacked layout (the plugin keeps one, chosen at load time):
the tensor-core kernel in Gluon (w4a16_mma.py, `mma_gemm`; codes in MMA fragment order), used
wherever Gluon runs (Triton 3.5+, compute capability 8.0+), and the Triton kernel
(w4a16_triton.py, `gemm`; nibble planes) elsewhere. `forward` tells them apart by qweight's
rank. On the H200 (bench/results/kernel/micro_mma_fused_2026-12-03.json) a Llama-3-8B decoder
layer with the correction took 72.8 / 92.2 / 207.7 us at 1 / 16 / 64 tokens on the tensor-core
kernel, 75.5 / 173.0 / 417.4 on the Triton kernel.

Where the GPU's tuned launch table (tuned.py) has an entry for the layer shape and token
count, forward() runs that launch or dequantizes, as the table says. Otherwise:
up to GEMM_MAX_TOKENS tokens (decode, small batches) one GEMM launch does everything; on
Hopper the tensor-core kernel runs on the warpgroup MMA from WGMMA_MIN_TOKENS to
WGMMA_MAX_TOKENS tokens (mma.sync below). Above that the layer's weight, with the correction
folded in, is dequantized into a shared dense workspace and multiplied by cuBLAS. On the H200
(bench/results/kernel/micro_wgmma_sweep*_2026-12-04.json) a Llama-3-8B decoder layer with the
correction took 122 us at 64 tokens on the warpgroup MMA (mma.sync: about 151), 342 against 474
dequantized at 256, 582 against 598 at 512, 2306 against 1434 at 2048.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, fields

import torch

from . import tuned

GEMM_MAX_TOKENS = 64
# Largest K block (and repacking block). Smaller blocks cut the one-token path's registers per
# thread, which lets wider tiles amortize x's loads (offline sm_90 compile: 3.13 SASS
# instructions per weight at 256 columns and 64 rows against 3.61 at 64 and 128), but the 16-token
# loop compiles longer with 64 rows (7.6 against 5.4). Not timed yet: `bench/kernel_microbench.py
# --max-block-k 64` times it.
MAX_BLOCK_K = 128
SHRINK_MAX_TOKENS = 64  # tokens per shrink program of the tensor-core kernel (its R tile: RP x tokens)
WORKSPACE_TOKENS = 256  # rows the gemm workspace holds (the microbenchmark times gemm up to here)
# From 17 tokens on Hopper the tensor-core kernel runs on the warpgroup MMA, up to this many
# tokens; forward() dequantizes beyond. H200, a Llama-3-8B decoder layer with the correction
# (bench/results/kernel/micro_wgmma_sweep*_2026-12-04.json): 582 us at 512 tokens against 598
# dequantized, 2306 against 1434 at 2048.
WGMMA_MIN_TOKENS = 17
WGMMA_MAX_TOKENS = 512
WGMMA_LAUNCH_TOKENS = 8192  # rows one warpgroup-MMA launch takes (its R workspace: 2 MB at rank 64)
# column blocks one prefill dequantize program folds the correction into, reading B's block once
# (not timed yet: `bench/kernel_microbench.py --tokens 2048` shows glowq_dense against int4_dense)
DEQUANTIZE_CHUNKS = 4
PARTIAL_SUM_BYTES = 32 * 1024**2  # split-K partials that choose_gemm_config splits into (fp32 tiles)
_MAGIC = {torch.bfloat16: (0x4300, 128.0), torch.float16: (0x6400, 1024.0)}  # bits and value of MAGIC


@dataclass(frozen=True)
class GemmConfig:
    """Tiles and grid of one `gemm_kernel` launch (block_* are Triton block sizes)."""

    block_m: int
    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3
    block_r: int = 16  # rank block of the shrink and expand
    shrink_block_k: int = 128
    shrink_chunk: int = 512  # K columns per shrink program (choose_gemm_config: one K block at one token)
    prefetch: bool = False  # one-token path: load the next K block by hand first (not measured yet; the sweep tries it)
    partial_rows: int | None = None  # split-K partials the last program sums per load (None: partial_rows_for)
    # with a correction: the share of GEMM items the grid runs before the expand items (H200 sweep,
    # bench/results/kernel/sweep_expand_at_2026-12-02.json: last is fastest or within 1% everywhere,
    # gate_up 30.6 -> 29.7 us at one token and 74.0 -> 68.1 at 16: they take no slot from the GEMM)
    expand_at: float = 1.0


def block_k_for(k: int, group_size: int) -> int | None:
    """The K block: at most one group (scales apply per block) and MAX_BLOCK_K, at least 16
    (tl.dot), dividing K. It fixes the repacked layout too (packing.repack_planes)."""
    for block in (128, 64, 32, 16):
        if block <= MAX_BLOCK_K and k % block == 0 and (group_size == k or group_size % block == 0):
            return block
    return None


def partial_rows_for(config: GemmConfig, split: int) -> int:
    """Split-K partials per load in a tile's final sum: as many as 32 fp32 registers per thread
    hold. Compiled for sm_90 (bench/kernel_sass.py) that adds no register at one token, where
    the mainloop sets the count; with 16-token tiles 8 per load would take 128 registers to 168."""
    if config.partial_rows:
        return config.partial_rows
    fits = max(1, 32 * 32 * config.num_warps // (config.block_m * config.block_n))
    return min(1 << (split - 1).bit_length(), 1 << (fits.bit_length() - 1))  # powers of two (tl.arange)


def unsupported_reason(k: int, n: int, group_size: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the kernels cannot run this layer, or None when they can."""
    if device.type != "cuda":
        return "the GlowQ int4 kernels run on CUDA GPUs only"
    if torch.cuda.get_device_capability(device) < (8, 0):
        return "the GlowQ int4 kernels need compute capability 8.0 (Ampere) or newer"
    if dtype not in _MAGIC:
        return f"the GlowQ int4 kernels take bfloat16 or float16 activations, not {dtype}"
    if k % group_size:
        return f"group_size={group_size} does not divide in_features={k}"
    if block_k_for(k, group_size) is None:
        return f"in_features={k} with group_size={group_size} has no K block of 16-128 that divides both"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "Triton is not installed"
    return None


def choose_gemm_config(tokens: int, n: int, k: int, group_size: int, sm_count: int) -> GemmConfig:
    """Launch configuration for `tokens` rows: split K until the grid holds enough programs per SM.

    Tile shapes, warps and programs per SM follow the H200 sweeps (bench/kernel_microbench.py
    --sweep, 2026-12-02): one token runs the tensor-core-free path in tiles of 64 outputs, one
    warp (the fastest for every layer with the correction), about 16 programs per SM, and K
    chunks of 2-4 blocks (gate_up at 7 blocks took 32.2 us, at 4 30.6; o_proj at one block 11.2,
    at two 10.6); up to 16 tokens tensor-core tiles of 64 outputs with 3 stages and about 4
    programs per SM.
    """
    block_k = block_k_for(k, group_size)
    k_blocks = k // block_k
    if tokens == 1:
        block_m, block_n, warps, stages, per_sm = 1, 64, 1, 2, 16
        # many one-block shrink programs: R is complete before the expand items need it, and
        # 64-column blocks take no more registers than the GEMV
        shrink = dict(shrink_block_k=64, shrink_chunk=64)
    else:
        block_m = 16 if tokens <= 16 else 32 if tokens <= 32 else 64
        block_n, warps, stages, per_sm = 64, 4, 3, 4
        shrink = {}
    tiles = math.ceil(tokens / block_m) * math.ceil(n / block_n)
    wanted = max(1, math.ceil(per_sm * sm_count / tiles))
    if tokens == 1:
        wanted = math.ceil(k_blocks / min(4, max(2, math.ceil(k_blocks / wanted))))
    split = min(k_blocks, wanted, max(1, PARTIAL_SUM_BYTES // (4 * tokens * n) - 1))  # + the correction's
    return GemmConfig(block_m, block_n, block_k, split, warps, stages, **shrink)


def padded_rank(rank: int) -> int:
    """The correction's rank as the tensor-core products take it: a power of two, at least 16
    (tl.arange and the MMA's K), the padding zeros."""
    return max(16, 1 << max(0, rank - 1).bit_length())


def has_warpgroup_mma(device: torch.device) -> bool:
    """Hopper (sm_90): the tensor-core kernel runs on the warpgroup MMA from WGMMA_MIN_TOKENS up."""
    return torch.cuda.get_device_capability(device)[0] == 9


class Workspace:
    """Per-device buffers shared by every layer in turn (kernels run one after another on one
    stream). Sized at load time, before CUDA graphs are captured, so captured launches keep
    pointing at live memory; every gemm launch leaves `reduced` and `sync` zeroed."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.partial = torch.empty(PARTIAL_SUM_BYTES // 4, dtype=torch.float32, device=device)
        self.reduced = torch.zeros(0, dtype=torch.float32, device=device)
        self.sync = torch.zeros(2, dtype=torch.int32, device=device)
        self.dense: dict[torch.dtype, torch.Tensor] = {}
        self.sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        self.hopper = has_warpgroup_mma(device)
        self.tuned = tuned.load(tuned.table_path(torch.cuda.get_device_name(device)), MMA_FIELDS)

    def reserve(self, n: int, k: int, rank: int, dtype: torch.dtype) -> None:
        """Grow the buffers for a layer of N outputs, K inputs and this correction rank."""
        # a tile split in one K chunk still has two partials with a correction (its product, R A^T)
        if self.partial.numel() < 2 * WORKSPACE_TOKENS * n:
            self.partial = torch.empty(2 * WORKSPACE_TOKENS * n, dtype=torch.float32, device=self.device)
        if self.reduced.numel() < self.max_tokens() * rank:
            self.reduced = torch.zeros(self.max_tokens() * rank, dtype=torch.float32, device=self.device)
        tickets = 2 + math.ceil(WORKSPACE_TOKENS / 16) * math.ceil(n / 16)
        if self.sync.numel() < tickets:
            self.sync = torch.zeros(tickets, dtype=torch.int32, device=self.device)
        if self.dense.get(dtype, torch.empty(0)).numel() < k * n:
            self.dense[dtype] = torch.empty(k * n, dtype=dtype, device=self.device)

    def tuned_launch(self, n: int, k: int, tokens: int) -> MmaConfig | str | None:
        """The tensor-core kernel's launch for this layer and token count from the GPU's tuned
        table (tuned.py): an MmaConfig, tuned.DENSE, or None where the table has no entry (or
        more tokens than one launch takes)."""
        entry = tuned.lookup(self.tuned, n, k, tokens)
        if isinstance(entry, dict):
            return MmaConfig(**entry) if tokens <= self.max_tokens() else None
        return entry

    def max_tokens(self) -> int:
        """Tokens one tensor-core launch takes here (the R workspace's rows)."""
        return WGMMA_LAUNCH_TOKENS if self.hopper else WORKSPACE_TOKENS

    def dense_matrix(self, k: int, n: int, dtype: torch.dtype) -> torch.Tensor:
        """The dense workspace as a [K, N] matrix, grown first if needed (valid until the next call)."""
        self.reserve(n, k, 0, dtype)
        return self.dense[dtype][: k * n].view(k, n)


_reported: set = set()
_workspaces: dict[torch.device, Workspace] = {}


def workspace(device: torch.device) -> Workspace:
    if device not in _workspaces:
        _workspaces[device] = Workspace(device)
    return _workspaces[device]


def forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
            bias: torch.Tensor | None, factor_b: torch.Tensor | None, factor_a: torch.Tensor | None,
            group_size: int) -> torch.Tensor:
    """x [T, K] -> [T, N]; qweight int32 [K/8, N] in the Triton kernel's layout (packing.repack_planes
    with block_k_for(K, group_size)) or int32 [K/BK, 4, N, BK/32] in the tensor-core kernel's
    (packing.repack_fragments with fragments_block_k(K, group_size)), scales [G, N] (x's dtype),
    zeros uint8 [G, N] or None, factors B [r, K] and A [N, r] or None (plain int4)."""
    fragments = qweight.dim() == 4
    tokens = x.shape[0]
    space = workspace(x.device)
    if fragments:
        launch = space.tuned_launch(qweight.shape[2], x.shape[1], tokens)
        if launch == tuned.DENSE:
            return dense_forward(x, qweight, scales, zeros, bias, factor_b, factor_a, group_size)
        if launch is not None:
            return mma_gemm(x, qweight, scales, zeros, bias, factor_b, factor_a, group_size, launch)
    if tokens <= GEMM_MAX_TOKENS or (fragments and space.hopper and tokens <= WGMMA_MAX_TOKENS):
        return (mma_gemm if fragments else gemm)(x, qweight, scales, zeros, bias, factor_b, factor_a, group_size)
    return dense_forward(x, qweight, scales, zeros, bias, factor_b, factor_a, group_size)


def dense_forward(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                  bias: torch.Tensor | None, factor_b: torch.Tensor | None, factor_a: torch.Tensor | None,
                  group_size: int) -> torch.Tensor:
    """forward() above the GEMM's token range, either layout: W_eff = deq(Wq) + (A B)^T written
    into the dense workspace, then cuBLAS."""
    dense = (dequantize_fragments if qweight.dim() == 4 else dequantize)(qweight, scales, zeros, factor_b, factor_a,
                                                                         group_size, x.dtype)
    return torch.mm(x, dense) if bias is None else torch.addmm(bias, x, dense)


def gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         bias: torch.Tensor | None, factor_b: torch.Tensor | None, factor_a: torch.Tensor | None,
         group_size: int, config: GemmConfig | None = None) -> torch.Tensor:
    """One `gemm_kernel` launch, for up to WORKSPACE_TOKENS rows (forward() uses it up to GEMM_MAX_TOKENS)."""
    from .w4a16_triton import gemm_kernel

    tokens, k = x.shape
    if tokens > WORKSPACE_TOKENS:
        raise ValueError(f"gemm takes at most {WORKSPACE_TOKENS} rows, got {tokens}; forward() dequantizes above")
    n = qweight.shape[1]
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    correct = factor_a is not None
    rank = factor_a.shape[1] if correct else 0
    space = workspace(x.device)
    config = config or choose_gemm_config(tokens, n, k, group_size, space.sm_count)
    m_blocks = math.ceil(tokens / config.block_m)
    shrink_block_m = 1 if config.block_m == 1 else max(16, config.block_m)  # CUDA cores, else tl.dot's smallest tile
    shrink_programs = 0
    if correct:
        shrink_programs = (math.ceil(tokens / shrink_block_m) * math.ceil(rank / config.block_r)
                           * math.ceil(k / config.shrink_chunk))
    chunk_blocks = math.ceil(k // config.block_k / config.split_k)
    split = math.ceil(k // config.block_k / chunk_blocks)  # every chunk non-empty
    tiles = m_blocks * math.ceil(n / config.block_n)
    if (split + correct) * tokens * n > space.partial.numel():
        raise ValueError(f"{config} needs {split + correct} partial slots of {tokens} x {n}, more than the workspace "
                         "holds; reserve() the layer first or choose a smaller split")
    grid = shrink_programs + tiles * split + (tiles if correct else 0)  # + one expand item per tile
    expand_first = shrink_programs + round(tiles * split * config.expand_at)
    magic, magic_value = _MAGIC[x.dtype]
    dummy = space.sync
    handle = gemm_kernel[(grid,)](
        x, qweight, scales, dummy if zeros is None else zeros, dummy if bias is None else bias,
        factor_b if correct else dummy, factor_a if correct else dummy, out, space.partial,
        space.reduced, space.sync, tokens, n, k, rank, group_size, split, chunk_blocks * config.block_k, config.shrink_chunk,
        shrink_programs, expand_first, x.stride(0), qweight.stride(0), scales.stride(0),
        0 if zeros is None else zeros.stride(0), factor_b.stride(0) if correct else 0,
        factor_a.stride(0) if correct else 0, out.stride(0),
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, CORRECT=correct,
        BM=config.block_m, BN=config.block_n, BK=config.block_k,
        BR=config.block_r, RANK_BLOCKS=max(1, math.ceil(rank / config.block_r)), SBM=shrink_block_m,
        SBK=config.shrink_block_k, MAGIC=magic, MAGIC_VALUE=magic_value,
        PREFETCH=config.prefetch, SPLITS=partial_rows_for(config, split + correct), num_warps=config.num_warps,
        num_stages=config.num_stages)
    if os.environ.get("GLOWQ_DEBUG") and config not in _reported:
        _reported.add(config)
        print(f"gemm {config}: regs {handle.n_regs} spills {handle.n_spills} smem {handle.metadata.shared}", flush=True)
    return out


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               factor_b: torch.Tensor | None, factor_a: torch.Tensor | None, group_size: int,
               dtype: torch.dtype, block_n: int = 128) -> torch.Tensor:
    """W_eff = deq(Wq) + (A B)^T as [K, N] in the shared dense workspace (valid until the next call)."""
    from .w4a16_triton import dequantize_kernel

    k, n = qweight.shape[0] * 8, qweight.shape[1]
    space = workspace(qweight.device)
    dense = space.dense_matrix(k, n, dtype)
    block_k = block_k_for(k, group_size)
    correct = factor_a is not None
    magic, magic_value = _MAGIC[dtype]
    dummy = space.sync
    dequantize_kernel[(k // block_k, math.ceil(n / block_n))](
        qweight, scales, dummy if zeros is None else zeros, factor_b if correct else dummy,
        factor_a if correct else dummy, dense, n, k, factor_a.shape[1] if correct else 0, group_size,
        qweight.stride(0), scales.stride(0), 0 if zeros is None else zeros.stride(0),
        factor_b.stride(0) if correct else 0, factor_a.stride(0) if correct else 0, dense.stride(0),
        HAS_ZEROS=zeros is not None, CORRECT=correct, BN=block_n, BK=block_k, BR=16, MAGIC=magic,
        MAGIC_VALUE=magic_value, num_warps=4)
    return dense


# ----- the tensor-core kernel (w4a16_mma.py: Gluon, codes in MMA fragment order) -----------------


@dataclass(frozen=True)
class MmaConfig:
    """Tiles and grid of one w4a16_mma.gemm_kernel launch."""

    block_n: int  # output rows per program: 16 per warp per MMA row tile
    block_t: int  # tokens per program: MMA columns, 8 per MMA
    split_k: int
    num_warps: int = 4
    shrink_blocks: int = 2  # K blocks per shrink program (R = x B^T): many short programs finish first
    # with a correction: one more program per tile expands (a partial) instead of the tile's last
    # contributor, off its critical path as in the Triton kernel
    expand_items: bool = True
    prefetch_x: bool = False  # x of the next K block copied ahead (cp.async): pays for 64-token tiles
    wgmma: bool = False  # Hopper's warpgroup MMA (x always copied ahead), for many tokens
    codes_in_smem: bool = False  # warpgroup MMA: codes through shared memory, unpacked during the previous MMAs


MMA_FIELDS = frozenset(field.name for field in fields(MmaConfig))  # what a tuned launch table may set


def check_tuned_table() -> None:
    """Read the table VLLM_GLOWQ_TUNED_CONFIGS names now, so a bad one stops the front end before
    an engine starts (each worker reads it again for its GPU)."""
    if os.environ.get(tuned.ENV_TUNED):
        tuned.load(tuned.table_path(""), MMA_FIELDS)


def fragments_block_k(k: int, group_size: int) -> int | None:
    """The tensor-core kernel's K block (and repacked layout): block_k_for's, at least 32 (one word
    of 8 codes per lane pair of an MMA row fragment), else None."""
    block = block_k_for(k, group_size)
    return block if block is not None and block >= 32 else None


def mma_unsupported_reason(k: int, n: int, group_size: int, dtype: torch.dtype, device: torch.device) -> str | None:
    """Why the tensor-core kernel cannot run this layer (unsupported_reason's reasons and its own), or None."""
    reason = unsupported_reason(k, n, group_size, dtype, device)
    if reason is not None:
        return reason
    if fragments_block_k(k, group_size) is None:
        return f"in_features={k} with group_size={group_size} has no K block of 32-128 that divides both"
    try:
        from triton.experimental.gluon.language.nvidia.ampere import mma_v2  # noqa: F401
        from triton.experimental.gluon.language.nvidia.hopper import warpgroup_mma  # noqa: F401
    except ImportError:
        return "this Triton has no Gluon (Triton 3.5 or newer)"
    return None


def choose_mma_config(tokens: int, n: int, k: int, group_size: int, sm_count: int, hopper: bool = False) -> MmaConfig:
    """From the H200 sweeps (bench/results/kernel/mma_probe_2026-12-03.json, micro_mma_fused_2026-12-03.json,
    micro_vs_vllm_2026-12-04.json, micro_prefetch_2026-12-04.json; us per call, default -> the
    sweep's best, Llama-3-8B layers):

    * rows per tile: 64 up to 16 tokens, 128 for very wide layers (gate_up), long K (down: 18.7
      -> 17.6 at 1 token, 23.8 -> 21.2 at 16) and above 16 tokens (o_proj at 64: 25.6 -> 23.2);
    * tokens per tile: 8 up to 8 tokens, else 16; above 16 tokens very wide layers and long K
      all 64 in one tile with x copied a block ahead (gate_up at 64: 74.4 -> 63.1, down 47.2 ->
      44.5; the copy ahead loses 0.1-4 us on every smaller tile);
    * K split until about 4 programs per SM (qkv at 16 tokens: split 8 14.2, 4 14.6, 2 19.0), at
      most 8 chunks, above 16 tokens 16-token tiles in chunks of at least 16 K blocks (qkv at 64:
      27.7 -> 23.0, o_proj 20.9 -> 19.8), very wide layers in one chunk, their tile's one program
      expanding the correction itself (gate_up 82.0 -> 74.4);
    * otherwise the correction's expand in programs of its own (qkv: 14.0 -> 11.5 at 1 token,
      16.9 -> 14.0 at 16), and one K block per shrink program up to 16 tokens except for very
      wide layers (gate_up at 16: 29.8 -> 28.4).

    17-63 tokens follow the 64-token choice untimed; o_proj at 1-16 tokens runs 0.5-0.9 us faster
    split in 4 than in the 8 this gives."""
    k_blocks = k // fragments_block_k(k, group_size)
    wide = n // 64 >= 3 * sm_count  # gate_up on the H200
    long_k = k_blocks >= 64  # down
    if hopper and tokens >= WGMMA_MIN_TOKENS:
        return choose_wgmma_config(tokens, n, k_blocks, sm_count, wide, long_k)
    whole_tokens = tokens > 16 and (wide or long_k)  # one 64-token tile, x copied ahead
    block_n = 128 if wide or long_k or tokens > 16 else 64
    block_t = 8 if tokens <= 8 else 64 if whole_tokens else 16
    tiles = math.ceil(tokens / block_t) * math.ceil(n / block_n)
    split = min(8, round(4 * sm_count / tiles))
    if tokens > 16 and wide:
        split = 1
    elif tokens > 16 and not whole_tokens:
        split = min(split, k_blocks // 16)
    split = max(1, min(k_blocks, split, PARTIAL_SUM_BYTES // (4 * tokens * n) - 1))  # + R A^T's partial
    return MmaConfig(block_n, block_t, split, shrink_blocks=2 if wide or tokens > 16 else 1,
                     expand_items=not (wide and tokens > 16), prefetch_x=whole_tokens)


def choose_wgmma_config(tokens: int, n: int, k_blocks: int, sm_count: int, wide: bool, long_k: bool) -> MmaConfig:
    """Hopper's warpgroup MMA from WGMMA_MIN_TOKENS up, from the H200 sweep
    (bench/results/kernel/micro_wgmma_sweep2_2026-12-04.json; us per call, Llama-3-8B layers, the
    rule's launch -> the sweep's best where they differ):

    * tokens per tile 32 up to 32 tokens, else 64, except very wide layers (gate_up) above 64:
      128 x 256 rows on 8 warps up to 128 tokens, 256 x 128 up to 256 (80.5 and 151.3 against
      87.8 and 167.0 on 128 x 64), 128 x 64 beyond;
    * rows per tile 64 up to 32 tokens (gate_up at 32: 37.9 against 47.4 with 64 x 128), then 128
      for very wide layers up to 64 tokens and long K (down), else 64 while the layer has rows
      for most SMs in 64-row tiles (qkv at 256: 44.3), 128 where it has fewer (o_proj at 256:
      31.4, at 512 56.0 against 70.1);
    * above 64 tokens long K in 128-token tiles of 64 rows up to 128 tokens (down: 48.8);
    * K split to about 3 programs per SM (a power of two, at most 8; long K twice that up to 64
      tokens: down at 32, 24.1 with 8 against 27.8 with 4), very wide layers in one chunk;
    * the shrink's chunk: 8 K blocks for very wide layers above 64 tokens (gate_up at 128: 80.5
      against 87.5 with 2), 4 for long K (down at 256: 82.6 against 85.5), else 2.

    Up to 16 tokens the mma.sync kernel stays (within 1 us of the best everywhere but down).
    `wide`, `long_k`: choose_mma_config's kinds of layer."""
    warps = 4
    if wide and tokens > 64:
        block_t, block_n, warps = (128, 256, 8) if tokens <= 128 else (256, 128, 8) if tokens <= 256 else (128, 64, 4)
    elif long_k and 64 < tokens <= 128:
        block_t, block_n = 128, 64
    else:
        block_t = 32 if tokens <= 32 else 64
        few_rows = n // 64 < 0.7 * sm_count
        block_n = 64 if tokens <= 32 else 128 if wide or long_k or (few_rows and tokens > 64) else 64
    tiles = math.ceil(tokens / block_t) * math.ceil(n / block_n)
    split = 1
    if not wide and tokens <= WORKSPACE_TOKENS:
        wanted = 3 * sm_count / tiles * (2 if long_k and tokens <= 64 else 1)
        split = 1 << max(0, math.floor(math.log2(max(1.0, wanted))))
        split = max(1, min(8, k_blocks, split, PARTIAL_SUM_BYTES // (4 * tokens * n)))
    shrink_blocks = 8 if wide and tokens > 64 else 4 if long_k and tokens > 64 else 2
    return MmaConfig(block_n, block_t, split, num_warps=warps, shrink_blocks=shrink_blocks, expand_items=False,
                     wgmma=True)


def mma_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
             bias: torch.Tensor | None, factor_b: torch.Tensor | None, factor_a: torch.Tensor | None,
             group_size: int, config: MmaConfig | None = None) -> torch.Tensor:
    """One tensor-core launch, the correction included, for up to WORKSPACE_TOKENS rows."""
    from .w4a16_mma import gemm_kernel

    tokens, k = x.shape
    space = workspace(x.device)
    if tokens > space.max_tokens():
        raise ValueError(f"mma_gemm takes at most {space.max_tokens()} rows here, got {tokens}; forward() dequantizes "
                         "above")
    blocks, _, n, sigma = qweight.shape
    block_k = 32 * sigma
    out = torch.empty(tokens, n, dtype=x.dtype, device=x.device)
    if tokens == 0:
        return out
    x = x if x.stride(-1) == 1 else x.contiguous()
    correct = factor_a is not None
    config = config or choose_mma_config(tokens, n, k, group_size, space.sm_count, space.hopper)
    if config.wgmma and not space.hopper:
        raise ValueError(f"{config} runs on Hopper's warpgroup MMA; this GPU has none")
    if not config.wgmma and tokens > WORKSPACE_TOKENS:
        raise ValueError(f"{config} takes at most {WORKSPACE_TOKENS} rows, got {tokens}")
    chunk_blocks = math.ceil(blocks / config.split_k)
    split = math.ceil(blocks / chunk_blocks)  # every chunk non-empty
    expand_items = correct and config.expand_items and not config.wgmma  # the warpgroup MMA chains it in
    contributors = split + expand_items
    if contributors > 1 and (tokens > WORKSPACE_TOKENS or contributors * tokens * n > space.partial.numel()):
        raise ValueError(f"{config} needs {contributors} partial slots of {tokens} x {n}, more than the workspace "
                         "holds; reserve() the layer first or choose a smaller split")
    shrink_chunk = config.shrink_blocks * block_k
    shrink_block_t = min(config.block_t, SHRINK_MAX_TOKENS)
    shrink_programs = math.ceil(tokens / shrink_block_t) * math.ceil(k / shrink_chunk) if correct else 0
    grid = shrink_programs + contributors * math.ceil(tokens / config.block_t) * math.ceil(n / config.block_n)
    magic, magic_value = _MAGIC[x.dtype]
    rank = factor_a.shape[1] if correct else 0
    dummy = space.sync
    handle = gemm_kernel[(grid,)](
        x, qweight, scales, dummy if zeros is None else zeros, dummy if bias is None else bias,
        factor_b if correct else dummy, factor_a if correct else dummy, out, space.partial, space.reduced,
        space.sync, tokens, n, k, rank, split, chunk_blocks * block_k, shrink_chunk, shrink_programs,
        magic | magic << 16, x.stride(0), scales.stride(0), 0 if zeros is None else zeros.stride(0),
        factor_b.stride(0) if correct else 0, factor_a.stride(0) if correct else 0, out.stride(0),
        HAS_ZEROS=zeros is not None, HAS_BIAS=bias is not None, CORRECT=correct, EXPAND_ITEMS=expand_items,
        EVEN_N=n % config.block_n == 0,
        GROUP_BLOCKS=group_size // block_k, BN=config.block_n, BT=config.block_t, BK=block_k,
        RP=padded_rank(rank), SBT=shrink_block_t, SBK=min(64, block_k),
        MAGIC_VALUE=magic_value, PREFETCH_X=config.prefetch_x, WGMMA=config.wgmma,
        CODES_IN_SMEM=config.codes_in_smem, num_warps=config.num_warps)
    if os.environ.get("GLOWQ_DEBUG") and config not in _reported:
        _reported.add(config)
        print(f"mma_gemm {config}: regs {handle.n_regs} spills {handle.n_spills} smem {handle.metadata.shared}",
              flush=True)
    return out


def dequantize_fragments(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         factor_b: torch.Tensor | None, factor_a: torch.Tensor | None, group_size: int,
                         dtype: torch.dtype, block_n: int = 64, chunks: int = DEQUANTIZE_CHUNKS) -> torch.Tensor:
    """dequantize() for the tensor-core layout: W_eff = deq(Wq) + (A B)^T as [K, N] in the shared
    dense workspace, the correction added in the same kernel (valid until the next call)."""
    from .w4a16_triton import dequantize_fragments_kernel

    blocks, _, n, sigma = qweight.shape
    block_k = 32 * sigma
    k = blocks * block_k
    space = workspace(qweight.device)
    dense = space.dense_matrix(k, n, dtype)
    correct = factor_a is not None
    dummy = space.sync
    rank = factor_a.shape[1] if correct else 0
    chunks = chunks if correct else 1  # without a correction there is no B to share between column blocks
    dequantize_fragments_kernel[(blocks, math.ceil(n / (block_n * chunks)))](
        qweight, scales, dummy if zeros is None else zeros, factor_b if correct else dummy,
        factor_a if correct else dummy, dense, n, rank, scales.stride(0),
        0 if zeros is None else zeros.stride(0), factor_b.stride(0) if correct else 0,
        factor_a.stride(0) if correct else 0, dense.stride(0), HAS_ZEROS=zeros is not None, CORRECT=correct,
        GROUP_BLOCKS=group_size // block_k, BN=block_n, BK=block_k, RP=padded_rank(rank), CHUNKS=chunks, num_warps=4)
    return dense
