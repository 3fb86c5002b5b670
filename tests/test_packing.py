"""Int4 packing in the GPTQ layout round-trips bit-exactly."""

from __future__ import annotations

import pytest
import torch

from offline_calibrate.quantize import quantize_rtn
from vllm_glowq.packing import dequantize, pack_cols, pack_rows, unpack_cols, unpack_rows


def codes(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 16, (rows, cols), generator=torch.Generator().manual_seed(seed)).to(torch.uint8)


def test_rows_round_trip_including_the_sign_bit():
    c = codes(64, 40)
    c[7] = 15  # top nibble set: the int32 word is negative
    packed = pack_rows(c)
    assert packed.dtype == torch.int32 and packed.shape == (8, 40)
    assert (packed < 0).any()
    assert torch.equal(unpack_rows(packed), c)


@pytest.mark.parametrize("cols", [8, 40, 172])
def test_cols_round_trip_with_padding(cols):
    c = codes(3, cols, seed=cols)
    packed = pack_cols(c)
    assert packed.shape == (3, -(-cols // 8))
    assert torch.equal(unpack_cols(packed, cols), c)


def test_gptq_nibble_order():
    """Row 8i+b of the codes sits at bits 4b..4b+3 of word i (low nibble first)."""
    c = torch.zeros(8, 1, dtype=torch.uint8)
    c[1, 0] = 0xA
    assert int(pack_rows(c)[0, 0]) == 0xA << 4


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [16, -1])
def test_quantized_weight_decodes_to_its_dequantized_weight(sym, group_size):
    weight = torch.randn(36, 64, generator=torch.Generator().manual_seed(1))
    q = quantize_rtn(weight, group_size, sym)
    assert torch.equal(dequantize(q.qweight, q.scales, q.qzeros), q.dequantized)
    assert (q.qzeros is None) == sym
    groups = 1 if group_size == -1 else 64 // group_size
    assert q.scales.shape == (groups, 36) and q.scales.dtype == torch.float16
    # Round-to-nearest: every weight is within half a step of its code.
    step = q.scales.float().repeat_interleave(64 // groups, dim=0).t()
    assert ((weight - q.dequantized).abs() <= step / 2 + 1e-6).all()


@pytest.mark.parametrize("sym", [False, True])
def test_all_zero_and_tiny_groups_quantize_to_finite_values(sym):
    """Zero-padded heads (stories260k-vllm) and denormal-sized groups must not give NaN codes."""
    weight = torch.zeros(16, 64)
    weight[:, 32:] = 1e-9 * torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    q = quantize_rtn(weight, 32, sym)
    assert torch.isfinite(q.dequantized).all() and (q.scales > 0).all()
    assert torch.equal(q.dequantized[:, :32], torch.zeros(16, 32))
    assert (q.dequantized - weight).abs().max() < 1e-4
    assert torch.equal(dequantize(q.qweight, q.scales, q.qzeros), q.dequantized)
