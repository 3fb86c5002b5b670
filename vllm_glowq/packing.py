"""Int4 packing in the GPTQ layout, and dequantization.

Shared by the calibrator (pack), the PyTorch reference forward (unpack + dequantize) and the
plugin's dense fallback. Pure torch, no vLLM import.
"""

from __future__ import annotations

import torch

from .format import PACK_FACTOR, SYM_ZERO_POINT

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int64)  # nibble b of a word sits at bits 4b..4b+3


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return (words - ((words >> 31) << 32)).to(torch.int32)


def pack_rows(codes: torch.Tensor) -> torch.Tensor:
    """uint4 codes [K, N] -> int32 [K / 8, N], eight consecutive rows per word (qweight)."""
    k, n = codes.shape
    if k % PACK_FACTOR:
        raise ValueError(f"cannot pack {k} rows into int32 words: not a multiple of {PACK_FACTOR}")
    grouped = codes.to(torch.int64).reshape(k // PACK_FACTOR, PACK_FACTOR, n)
    words = (grouped << _SHIFTS.to(codes.device).view(1, -1, 1)).sum(dim=1)
    return _to_int32(words)


def unpack_rows(words: torch.Tensor) -> torch.Tensor:
    """int32 [K / 8, N] -> uint8 codes [K, N]; inverse of pack_rows."""
    kw, n = words.shape
    nibbles = (words.to(torch.int64).unsqueeze(1) >> _SHIFTS.to(words.device).view(1, -1, 1)) & 0xF
    return nibbles.reshape(kw * PACK_FACTOR, n).to(torch.uint8)


def pack_cols(codes: torch.Tensor) -> torch.Tensor:
    """uint4 codes [G, N] -> int32 [G, ceil(N / 8)] (qzeros); padding nibbles are zero."""
    g, n = codes.shape
    padded = torch.zeros(g, -(-n // PACK_FACTOR) * PACK_FACTOR, dtype=torch.int64, device=codes.device)
    padded[:, :n] = codes.to(torch.int64)
    grouped = padded.reshape(g, -1, PACK_FACTOR)
    words = (grouped << _SHIFTS.to(codes.device).view(1, 1, -1)).sum(dim=2)
    return _to_int32(words)


def unpack_cols(words: torch.Tensor, n: int) -> torch.Tensor:
    """int32 [G, ceil(N / 8)] -> uint8 codes [G, N]; inverse of pack_cols."""
    g, nw = words.shape
    nibbles = (words.to(torch.int64).unsqueeze(2) >> _SHIFTS.to(words.device).view(1, 1, -1)) & 0xF
    return nibbles.reshape(g, nw * PACK_FACTOR)[:, :n].to(torch.uint8)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    qzeros: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Packed GPTQ-layout tensors -> dense weight [N, K] (PyTorch Linear layout).

    The group size is implied by the shapes (K / scales.shape[0]). `qzeros=None` means
    symmetric codes with the implicit zero point 8.
    """
    codes = unpack_rows(qweight).to(torch.float32)  # [K, N]
    k, n = codes.shape
    groups = scales.shape[0]
    if k % groups:
        raise ValueError(f"qweight has {k} input rows, which {groups} scale groups do not divide")
    if qzeros is None:
        zeros = torch.full((groups, n), float(SYM_ZERO_POINT), device=codes.device)
    else:
        zeros = unpack_cols(qzeros, n).to(torch.float32)
    per_row = k // groups
    weight = (codes - zeros.repeat_interleave(per_row, dim=0)) * scales.to(torch.float32).repeat_interleave(
        per_row, dim=0
    )
    return weight.t().contiguous().to(dtype)


def plane_rows(block_k: int) -> torch.Tensor:
    """[8, block_k / 8]: the row of a K block that nibble p of word kk holds in the kernel layout.

    Nibble p = f + 2g + 4h of word kk holds row KW (4f + 2g + h) + kk (KW = block_k / 8): the
    eight nibble planes are stacked along the block, so the kernel (kernels/w4a16_triton.py)
    unpacks a tile without moving values between threads, and x stays one contiguous tile.
    """
    kw = block_k // PACK_FACTOR
    nibble = torch.arange(PACK_FACTOR).view(-1, 1)
    plane = 4 * (nibble % 2) + 2 * ((nibble // 2) % 2) + nibble // 4
    return plane * kw + torch.arange(kw).view(1, -1)


def repack_planes(qweight: torch.Tensor, block_k: int) -> torch.Tensor:
    """GPTQ-layout int32 [K / 8, N] -> the kernel layout (same shape; plane_rows per K block)."""
    codes = unpack_rows(qweight)
    k, n = codes.shape
    if k % block_k:
        raise ValueError(f"{k} input rows do not split into K blocks of {block_k}")
    gathered = codes.view(k // block_k, block_k, n)[:, plane_rows(block_k).to(codes.device), :].to(torch.int64)
    words = (gathered << _SHIFTS.to(codes.device).view(1, -1, 1, 1)).sum(dim=1)  # [blocks, KW, N]
    return _to_int32(words.reshape(k // PACK_FACTOR, n))


def unrepack_planes(qweight: torch.Tensor, block_k: int) -> torch.Tensor:
    """Inverse of repack_planes: the kernel layout -> GPTQ-layout int32 [K / 8, N]."""
    kw, n = block_k // PACK_FACTOR, qweight.shape[1]
    k = qweight.shape[0] * PACK_FACTOR
    words = qweight.to(torch.int64).view(k // block_k, 1, kw, n)
    nibbles = (words >> _SHIFTS.to(qweight.device).view(1, -1, 1, 1)) & 0xF  # [blocks, 8, KW, N]
    codes = torch.empty(k // block_k, block_k, n, dtype=torch.int64, device=qweight.device)
    codes[:, plane_rows(block_k).to(qweight.device).reshape(-1), :] = nibbles.reshape(k // block_k, block_k, n)
    return pack_rows(codes.reshape(k, n))


def repack_fragments(qweight: torch.Tensor, block_k: int) -> torch.Tensor:
    """GPTQ-layout int32 [K / 8, N] -> the tensor-core kernel's layout int32 [K / BK, 4, N, BK / 32].

    Per K block, word (t, n, s) holds in nibble j + 4 b the code of block row 32 s + 8 j + 2 t + b:
    the rows lane 4 g + t of an mma.m16n8k16 holds for output n (kernels/w4a16_mma.py), so the
    kernel unpacks each thread's own words in place. Same number of words as the input.
    """
    codes = unpack_rows(qweight)
    k, n = codes.shape
    if k % block_k or block_k % 32:
        raise ValueError(f"{k} input rows do not split into K blocks of {block_k} (a multiple of 32)")
    sigma = block_k // 32
    nibbles = codes.to(torch.int64).view(k // block_k, sigma, 4, 4, 2, n)  # [block, s, j, t, b, n]
    nibbles = nibbles.permute(0, 3, 5, 1, 4, 2).reshape(k // block_k, 4, n, sigma, PACK_FACTOR)  # nibble 4 b + j
    return _to_int32((nibbles << _SHIFTS.to(codes.device)).sum(-1)).contiguous()


def unrepack_fragments(words: torch.Tensor) -> torch.Tensor:
    """Inverse of repack_fragments: int32 [K / BK, 4, N, BK / 32] -> GPTQ-layout int32 [K / 8, N]."""
    blocks, _, n, sigma = words.shape
    nibbles = (words.to(torch.int64).unsqueeze(-1) >> _SHIFTS.to(words.device)) & 0xF  # [block, t, n, s, 4 b + j]
    codes = nibbles.view(blocks, 4, n, sigma, 2, 4).permute(0, 3, 5, 1, 4, 2)  # [block, s, j, t, b, n]
    return pack_rows(codes.reshape(blocks * sigma * 32, n))
