"""Round-to-nearest group-wise int4 quantization into the GPTQ layout."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_glowq.format import SYM_ZERO_POINT
from vllm_glowq.packing import pack_cols, pack_rows

MAX_CODE = 15
# Smallest normal float16: scales are clamped *after* rounding to fp16 (clamping before would
# let a tiny or all-zero group's scale round to 0 and its codes become NaN).
MIN_SCALE = torch.finfo(torch.float16).tiny


@dataclass
class QuantizedWeight:
    """Packed int4 tensors of one Linear, plus its dequantized weight for the error."""

    qweight: torch.Tensor  # int32 [K / 8, N]
    scales: torch.Tensor  # float16 [G, N]
    qzeros: torch.Tensor | None  # int32 [G, ceil(N / 8)], None when symmetric
    dequantized: torch.Tensor | None  # float32 [N, K], exactly what the packed tensors decode to

    def to_cpu(self) -> QuantizedWeight:
        """The packed tensors on the CPU, without the dequantized weight (4 bytes a weight)."""
        return QuantizedWeight(
            self.qweight.cpu(), self.scales.cpu(), None if self.qzeros is None else self.qzeros.cpu(), None
        )

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"qweight": self.qweight, "scales": self.scales}
        if self.qzeros is not None:
            out["qzeros"] = self.qzeros
        return out


def quantize_rtn(weight: torch.Tensor, group_size: int, sym: bool) -> QuantizedWeight:
    """Quantize a [N, K] weight to 4-bit codes per group of `group_size` input features.

    Asymmetric: the group's range is widened to include 0 (as GPTQ does) so the zero point is
    always a valid code. Symmetric: codes are offset by 8 ("uint4b8"). Scales are rounded to
    fp16 *before* the codes are chosen, so the stored tensors decode to `dequantized` exactly.
    """
    n, k = weight.shape
    g = k if group_size == -1 else group_size
    w = weight.detach().to(torch.float32).reshape(n, k // g, g)
    if sym:
        scale = _fp16_scale(w.abs().amax(dim=2) / (MAX_CODE // 2))
        zero = torch.full_like(scale, float(SYM_ZERO_POINT))
    else:
        wmin = w.amin(dim=2).clamp_max(0.0)
        wmax = w.amax(dim=2).clamp_min(0.0)
        scale = _fp16_scale((wmax - wmin) / MAX_CODE)
        zero = torch.round(-wmin / scale).clamp(0, MAX_CODE)
    codes = torch.clamp(torch.round(w / scale.unsqueeze(2)) + zero.unsqueeze(2), 0, MAX_CODE)
    codes = codes.reshape(n, k).t().to(torch.uint8)  # [K, N]
    scales = scale.t().contiguous().to(torch.float16)  # [G, N]
    qzeros = None if sym else pack_cols(zero.t().to(torch.uint8))
    # Decoded from the unpacked codes, so comparing with a checkpoint read back tests packing.
    dequantized = ((codes.t().reshape(n, k // g, g).float() - zero.unsqueeze(2)) * scale.unsqueeze(2)).reshape(n, k)
    return QuantizedWeight(pack_rows(codes), scales, qzeros, dequantized)


def _fp16_scale(scale: torch.Tensor) -> torch.Tensor:
    """Round to fp16 (what the checkpoint stores), then keep it away from zero."""
    return scale.to(torch.float16).to(torch.float32).clamp_min(MIN_SCALE)
