"""The GlowQ checkpoint format, defined once.

Both the calibrator (`offline_calibrate`, which writes checkpoints) and the vLLM plugin
(`vllm_glowq`, which reads them) import this module, so tensor names, config keys and the
format version can never drift apart. docs/format.md describes the same thing for people.

This module must stay importable without vLLM (the calibrator runs without it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

QUANT_METHOD = "glowq"
FORMAT_VERSION = 1
SUPPORTED_FORMAT_VERSIONS = (1,)
SUPPORTED_BITS = (4,)

# Per-module tensor suffixes (the GPTQ layout, so vLLM's W4A16 kernels can run the base GEMM).
QWEIGHT = "qweight"  # int32 [K / 8, N]: eight 4-bit codes along the input dim, low nibble first
SCALES = "scales"  # float16 [K / group, N]
QZEROS = "qzeros"  # int32 [K / group, ceil(N / 8)]: raw zero points z (w = (q - z) * s); asym only
# Low-rank correction.
FACTOR_A = "glowq_A"  # float16 [N_i, rank], one per module
FACTOR_B = "glowq_B"  # float16 [rank, K], one per unit (stored under the unit's fused name)

PACK_FACTOR = 8  # 4-bit codes per int32
SYM_ZERO_POINT = 8  # symmetric codes are uint4 with an implicit zero point of 8 ("uint4b8")

# Modules that read the same input and therefore share one right factor B. The key is the
# name vLLM gives the fused layer, which is also where B is stored in the checkpoint.
SHARED_INPUT_GROUPS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
SHARE_GROUP = "group"  # GlowQ: one B per input-sharing group
SHARE_MODULE = "module"  # baseline (QERA-exact / EoRA objective): one B per module
SHARE_MODES = (SHARE_GROUP, SHARE_MODULE)


class GlowQFormatError(ValueError):
    """A checkpoint or quantization_config that does not follow the GlowQ format."""


def fused_name(module_name: str) -> str | None:
    """`model.layers.0.self_attn.k_proj` -> `model.layers.0.self_attn.qkv_proj`, else None."""
    parent, _, leaf = module_name.rpartition(".")
    for fused, members in SHARED_INPUT_GROUPS.items():
        if leaf in members:
            return f"{parent}.{fused}" if parent else fused
    return None


def unit_name(module_name: str, share: str) -> str:
    """Name of the restoration unit a module belongs to; B is stored under this name."""
    if share == SHARE_GROUP:
        return fused_name(module_name) or module_name
    return module_name


def unit_members(unit: str, share: str) -> tuple[str, ...]:
    """The HF module names whose A factors are applied to this unit's R = B x."""
    parent, _, leaf = unit.rpartition(".")
    if share == SHARE_GROUP and leaf in SHARED_INPUT_GROUPS:
        return tuple(f"{parent}.{m}" if parent else m for m in SHARED_INPUT_GROUPS[leaf])
    return (unit,)


def tensor_name(module_name: str, suffix: str) -> str:
    return f"{module_name}.{suffix}"


@dataclass
class GlowQConfig:
    """The `quantization_config` block of a GlowQ checkpoint's config.json.

    `lowrank_units` lists the units that carry factors (all of them for full GlowQ, a subset
    for GlowQ-S, none for plain round-to-nearest); a unit is a fused name such as
    `model.layers.0.self_attn.qkv_proj` when `share == "group"`, else a module name.
    `modules_to_not_convert` lists modules kept in full precision (their in-features do not
    fit the group size or the int4 packing).
    """

    bits: int = 4
    group_size: int = 128
    sym: bool = False
    rank: int = 64
    share: str = SHARE_GROUP
    lowrank_units: list[str] = field(default_factory=list)
    modules_to_not_convert: list[str] = field(default_factory=list)
    producer: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            raise GlowQFormatError(
                f"GlowQ format_version {self.format_version!r} is not supported by this "
                f"version of vllm-glowq (supported: {list(SUPPORTED_FORMAT_VERSIONS)}); "
                "upgrade vllm-glowq or re-calibrate the checkpoint."
            )
        if self.bits not in SUPPORTED_BITS:
            raise GlowQFormatError(f"GlowQ bits={self.bits!r} is not supported (supported: {list(SUPPORTED_BITS)}).")
        if not isinstance(self.group_size, int) or (self.group_size <= 0 and self.group_size != -1):
            raise GlowQFormatError(
                f"GlowQ group_size={self.group_size!r} is invalid: use a positive integer or -1 (one group per row)."
            )
        if not isinstance(self.rank, int) or self.rank < 0:
            raise GlowQFormatError(f"GlowQ rank={self.rank!r} is invalid: use an integer >= 0.")
        if self.share not in SHARE_MODES:
            raise GlowQFormatError(f"GlowQ share={self.share!r} is invalid: use one of {list(SHARE_MODES)}.")
        if self.rank == 0 and self.lowrank_units:
            raise GlowQFormatError("GlowQ config lists lowrank_units but rank is 0.")

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def unit_of(self, module_name: str) -> str:
        return unit_name(module_name, self.share)

    def has_factors(self, unit: str) -> bool:
        return unit in self._lowrank_set

    def is_quantized(self, module_name: str) -> bool:
        return module_name not in self._skip_set

    @property
    def _lowrank_set(self) -> frozenset[str]:
        return frozenset(self.lowrank_units)

    @property
    def _skip_set(self) -> frozenset[str]:
        return frozenset(self.modules_to_not_convert)

    def to_dict(self) -> dict[str, Any]:
        return {
            "quant_method": QUANT_METHOD,
            "format_version": self.format_version,
            "bits": self.bits,
            "group_size": self.group_size,
            "sym": self.sym,
            "rank": self.rank,
            "share": self.share,
            "lowrank_units": list(self.lowrank_units),
            "modules_to_not_convert": list(self.modules_to_not_convert),
            "producer": dict(self.producer),
        }

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> GlowQConfig:
        """Parse and validate a quantization_config dict; raises GlowQFormatError."""
        if not isinstance(raw, dict):
            raise GlowQFormatError(f"quantization_config must be a JSON object, got {type(raw).__name__}.")
        method = str(raw.get("quant_method", "")).lower()
        if method != QUANT_METHOD:
            raise GlowQFormatError(
                f"quantization_config.quant_method is {raw.get('quant_method')!r}, not {QUANT_METHOD!r}: "
                "this is not a GlowQ checkpoint (make one with glowq-calibrate)."
            )
        missing = [k for k in ("format_version", "bits", "group_size", "sym", "rank", "share") if k not in raw]
        if missing:
            raise GlowQFormatError(f"GlowQ quantization_config is missing keys: {missing}.")
        return cls(
            bits=raw["bits"],
            group_size=raw["group_size"],
            sym=bool(raw["sym"]),
            rank=raw["rank"],
            share=raw["share"],
            lowrank_units=list(raw.get("lowrank_units", [])),
            modules_to_not_convert=list(raw.get("modules_to_not_convert", [])),
            producer=dict(raw.get("producer", {})),
            format_version=raw["format_version"],
        )


def packable(in_features: int, group_size: int) -> str | None:
    """Why a module with this many in-features cannot be stored as int4, or None if it can.

    The GPTQ layout packs eight codes along the input dimension and vLLM's kernels need whole
    groups, so K must be a multiple of 8 and of the group size.
    """
    if in_features % PACK_FACTOR:
        return f"in_features={in_features} is not a multiple of {PACK_FACTOR} (int4 packing)"
    if group_size != -1 and in_features % group_size:
        return f"in_features={in_features} is not a multiple of group_size={group_size}"
    return None
