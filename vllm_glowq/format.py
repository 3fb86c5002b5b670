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
# Version 2 added Mixture-of-Experts layers (expert tensors, expert units); a dense model's
# checkpoint is identical in both, so the calibrator writes 1 for dense models and 2 only when
# the model has experts, and readers built before MoE keep reading every dense checkpoint.
DENSE_FORMAT_VERSION = 1
MOE_FORMAT_VERSION = 2
FORMAT_VERSION = MOE_FORMAT_VERSION  # the newest version this code reads and writes
SUPPORTED_FORMAT_VERSIONS = (DENSE_FORMAT_VERSION, MOE_FORMAT_VERSION)


def format_version_for(has_experts: bool) -> int:
    """The version a checkpoint is written as (see above: 2 only for models with experts)."""
    return MOE_FORMAT_VERSION if has_experts else DENSE_FORMAT_VERSION


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
# Mixture-of-Experts layers (format_version 2). Experts are stored per expert under the names
# vLLM's expert loader routes into its fused expert layer, `BLOCK.experts.{e}.{projection}.*`,
# with the gate/up projection names of the checkpoint's family. In group mode every expert's
# gate and up (and a shared expert's, which reads the same input) form one unit named after
# vLLM's fused gate/up name, `BLOCK.experts.gate_up_proj` or `BLOCK.experts.w13`; vLLM only
# routes per-expert names into the expert layer, so that unit's B is stored under its first
# member, expert 0's gate projection. Each expert's down projection is its own unit.
EXPERTS = "experts"
EXPERT_GATE_UP: dict[str, tuple[str, str]] = {"gate_up_proj": ("gate_proj", "up_proj"), "w13": ("w1", "w3")}
SHARED_EXPERT = "shared_expert"  # Qwen2-MoE's dense expert beside the routed ones
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


def expert_index(module_name: str) -> int | None:
    """`...experts.3.w1` -> 3; None for a module that is not a routed expert's projection."""
    parts = module_name.split(".")
    if len(parts) >= 3 and parts[-3] == EXPERTS and parts[-2].isdigit():
        return int(parts[-2])
    return None


def experts_unit(module_name: str) -> str | None:
    """The experts' shared gate/up unit a module joins in group mode, or None.

    `BLOCK.experts.{e}.gate_proj` -> `BLOCK.experts.gate_up_proj` (`w1`/`w3` -> `w13`), and a
    shared expert's `BLOCK.shared_expert.{gate,up}_proj` -> `BLOCK.experts.gate_up_proj`.
    """
    parts = module_name.split(".")
    leaf = parts[-1]
    if expert_index(module_name) is not None:
        for fused, members in EXPERT_GATE_UP.items():
            if leaf in members:
                return ".".join([*parts[:-2], fused])
    if len(parts) >= 2 and parts[-2] == SHARED_EXPERT and leaf in EXPERT_GATE_UP["gate_up_proj"]:
        return ".".join([*parts[:-2], EXPERTS, "gate_up_proj"])
    return None


def is_experts_unit(unit: str) -> bool:
    parent, _, leaf = unit.rpartition(".")
    return leaf in EXPERT_GATE_UP and parent.rpartition(".")[2] == EXPERTS


def unit_name(module_name: str, share: str) -> str:
    """Name of the restoration unit a module belongs to (where its B is: `factor_b_name`)."""
    if share == SHARE_GROUP:
        return experts_unit(module_name) or fused_name(module_name) or module_name
    return module_name


def factor_b_name(unit: str) -> str:
    """The checkpoint tensor holding a unit's B: `UNIT.glowq_B`, except for the experts' gate/up
    unit, whose B is stored under expert 0's gate projection (`BLOCK.experts.0.gate_proj.glowq_B`),
    the only kind of name vLLM's expert loader delivers to the expert layer."""
    if is_experts_unit(unit):
        parent, _, fused = unit.rpartition(".")
        return tensor_name(f"{parent}.0.{EXPERT_GATE_UP[fused][0]}", FACTOR_B)
    return tensor_name(unit, FACTOR_B)


def unit_members(unit: str, share: str) -> tuple[str, ...]:
    """The HF module names whose A factors are applied to this unit's R = B x (dense units:
    an experts unit's members depend on the model's number of experts)."""
    if is_experts_unit(unit):
        raise ValueError(f"{unit} is an experts unit; its members depend on the number of experts")
    parent, _, leaf = unit.rpartition(".")
    if share == SHARE_GROUP and leaf in SHARED_INPUT_GROUPS:
        return tuple(f"{parent}.{m}" if parent else m for m in SHARED_INPUT_GROUPS[leaf])
    return (unit,)


def tensor_name(module_name: str, suffix: str) -> str:
    return f"{module_name}.{suffix}"


_LISTED_NAMES = ("lowrank_units", "modules_to_not_convert")
_NAME_SETS = "_name_sets_cache"


@dataclass
class GlowQConfig:
    """The `quantization_config` block of a GlowQ checkpoint's config.json.

    `lowrank_units` lists the units that carry factors (all of them for full GlowQ, a subset
    for GlowQ-S, none for plain round-to-nearest); a unit is a fused name such as
    `model.layers.0.self_attn.qkv_proj` (or `model.layers.0.mlp.experts.gate_up_proj`) when
    `share == "group"`, else a module name.
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
    format_version: int = DENSE_FORMAT_VERSION  # the calibrator sets MOE_FORMAT_VERSION for MoE models

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
        if self.format_version < MOE_FORMAT_VERSION:
            experts = [u for u in self.lowrank_units if expert_index(u) is not None or is_experts_unit(u)]
            if experts:
                raise GlowQFormatError(
                    f"GlowQ format_version {self.format_version} has no Mixture-of-Experts units, but "
                    f"lowrank_units lists {experts[0]!r}; MoE checkpoints are format_version "
                    f"{MOE_FORMAT_VERSION} (re-calibrate with this glowq-calibrate)."
                )

    def group_size_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size

    def unit_of(self, module_name: str) -> str:
        return unit_name(module_name, self.share)

    def has_factors(self, unit: str) -> bool:
        return unit in self._name_sets()[0]

    def is_quantized(self, module_name: str) -> bool:
        return module_name not in self._name_sets()[1]

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in _LISTED_NAMES:
            self.__dict__.pop(_NAME_SETS, None)  # rebuilt at the next lookup

    def _name_sets(self) -> tuple[frozenset[str], frozenset[str]]:
        """lowrank_units and modules_to_not_convert as sets, built once per assignment: an MoE
        model asks about tens of thousands of modules against thousands of units."""
        if _NAME_SETS not in self.__dict__:
            self.__dict__[_NAME_SETS] = (frozenset(self.lowrank_units), frozenset(self.modules_to_not_convert))
        return self.__dict__[_NAME_SETS]

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
