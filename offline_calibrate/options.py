"""Calibration options, validated before any model is loaded."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from vllm_glowq.format import PACK_FACTOR, SHARE_GROUP, SHARE_MODES, SUPPORTED_BITS

from .data import RANDOM_DATASET


class OptionsError(ValueError):
    pass


@dataclass
class CalibrationOptions:
    bits: int = 4
    group_size: int = 128
    sym: bool = False
    rank: int = 64
    share: str = SHARE_GROUP
    dataset: str = RANDOM_DATASET
    samples: int = 32
    seq_len: int | None = None  # None: 2048, or the model's max_position_embeddings when smaller
    seed: int = 0
    shrinkage: float = 0.05
    oversample: int = 10
    power_iters: int = 2
    svd: str = "auto"
    device: str = "auto"
    restore: str = "all"
    metric: str = "singular_sum"
    max_extra_bytes: int | None = None
    heldout_samples: int = 8

    def validate(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise OptionsError(f"--bits {self.bits} is not supported; supported: {list(SUPPORTED_BITS)}")
        if self.group_size == 0 or self.group_size < -1:
            raise OptionsError(f"--group-size must be a positive integer or -1 (per row), got {self.group_size}")
        if self.group_size != -1 and self.group_size % PACK_FACTOR:
            raise OptionsError(
                f"--group-size {self.group_size} is not a multiple of {PACK_FACTOR} (int4 codes are packed "
                f"{PACK_FACTOR} inputs per int32 word); use e.g. 32, 64 or 128, or -1 (per row)"
            )
        if self.rank < 0:
            raise OptionsError(f"--rank must be >= 0 (0 = plain round-to-nearest int4), got {self.rank}")
        if self.share not in SHARE_MODES:
            raise OptionsError(f"--share must be one of {list(SHARE_MODES)}, got {self.share!r}")
        if self.samples < 1 or (self.seq_len is not None and self.seq_len < 2):
            raise OptionsError(f"--samples must be >= 1 and --seq-len >= 2 (got {self.samples}, {self.seq_len})")
        if not 0.0 <= self.shrinkage <= 1.0:
            raise OptionsError(f"--shrinkage must lie in [0, 1], got {self.shrinkage}")
        if self.svd not in ("auto", "exact", "randomized"):
            raise OptionsError(f"--svd must be auto, exact or randomized, got {self.svd!r}")
        if self.oversample < 0 or self.power_iters < 0:
            raise OptionsError("--oversample and --power-iters must be >= 0")
        from .selection import validate_selection_options

        validate_selection_options(self)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)
