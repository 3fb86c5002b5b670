"""Check a whole GlowQ checkpoint folder before anything loads it.

One validator for every reader: the vLLM plugin runs it in the front-end process before an
engine starts (`GlowQQuantConfig.maybe_update_config`), and `glowq-eval` and the PyTorch
reference forward run it before reading a tensor. It reads config.json and the safetensors
headers only (no tensor data), derives every tensor the format requires from the model's
shapes and the quantization_config (docs/format.md), and raises one `GlowQFormatError` that
names the file or tensor and the fix. Without it, vLLM finds a missing or mis-shaped factor
only while loading weights, minutes later and deep inside an engine process, and the
reference forward would accept scales whose group size disagrees with the config.

Mixture-of-Experts models are checked expert by expert: transformers keeps their experts as
fused 3-D parameters, which the validator cuts into the per-expert names checkpoints use with
the calibrator's own mapping (moe_layout.py), so the experts' shared B, every expert's A and
each down projection's unit are expected exactly where the calibrator writes them.

Importable without vLLM (the calibrator and the reference use it); transformers is imported
only to build the model's skeleton on the meta device.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .format import (
    EXPERTS,
    FACTOR_A,
    FACTOR_B,
    MOE_FORMAT_VERSION,
    PACK_FACTOR,
    QWEIGHT,
    QZEROS,
    SCALES,
    GlowQConfig,
    GlowQFormatError,
    factor_b_name,
    packable,
    tensor_name,
)
from .moe_layout import EXPERTS_BY_MODEL_TYPE, FUSED_GATE_UP, ExpertsSpec, checkpoint_state_dict, is_fused_experts

CONFIG_FILE = "config.json"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PACKED_DTYPE = "I32"  # qweight and qzeros: eight 4-bit codes per int32
CHECKPOINT_FLOAT = "F16"  # scales and low-rank factors
MODEL_FLOATS = ("F16", "BF16", "F32", "F64")  # everything kept in the model's own dtype
_HEADER_LENGTH_BYTES = 8  # a safetensors file starts with its header's length (u64, little-endian)
_RECALIBRATE = "re-run glowq-calibrate to write a complete checkpoint"


@dataclass(frozen=True)
class TensorHeader:
    """What a safetensors header says about one tensor, and which file holds it."""

    dtype: str
    shape: tuple[int, ...]
    file: str


@dataclass(frozen=True)
class TensorSpec:
    """A tensor the format requires: its shape and the dtypes it may have."""

    shape: tuple[int, ...]
    dtypes: tuple[str, ...]


def check_checkpoint(folder: str | Path) -> tuple[dict[str, Any], GlowQConfig]:
    """Validate a GlowQ checkpoint folder; returns (config.json without quantization_config,
    the parsed GlowQ config). Raises GlowQFormatError naming the first problem and its fix."""
    folder = Path(folder)
    model_config, glowq = read_checkpoint_config(folder)
    expected = expected_tensors(model_config, glowq)
    compare_tensors(folder, expected, read_headers(folder), glowq)
    return model_config, glowq


def read_checkpoint_config(folder: Path) -> tuple[dict[str, Any], GlowQConfig]:
    """config.json as a dict without its quantization_config, and the parsed GlowQ config."""
    raw = read_json(folder / CONFIG_FILE)
    if not isinstance(raw, dict):
        raise GlowQFormatError(f"{folder / CONFIG_FILE} holds {type(raw).__name__}, not a JSON object.")
    if "quantization_config" not in raw:
        raise GlowQFormatError(
            f"{folder / CONFIG_FILE} has no quantization_config: {folder} is not a GlowQ checkpoint "
            "(make one with glowq-calibrate)."
        )
    return raw, GlowQConfig.from_dict(raw.pop("quantization_config"))


def read_json(path: Path) -> Any:
    """A JSON file, or one GlowQFormatError saying why it cannot be read."""
    if not path.is_file():
        raise GlowQFormatError(f"{path} is missing: {path.parent} is not a complete model folder.")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GlowQFormatError(f"{path} is not valid JSON ({exc}); restore it from the original checkpoint.") from None


# ----- what the checkpoint must hold -------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointLinears:
    """A model's linears under their checkpoint names, as the format sees them."""

    quantizable: dict[str, tuple[int, int]]  # name -> (in, out) of every linear GlowQ may quantize
    routers: dict[str, tuple[int, int]]  # MoE routers: always full precision (modules_to_not_convert)
    experts: dict[str, tuple[str, ...]]  # MoE block -> its experts' projections (all in `quantizable`)


def expected_tensors(model_config: dict[str, Any], glowq: GlowQConfig) -> dict[str, TensorSpec]:
    """Every tensor name the format requires for this model and quantization_config."""
    model = meta_model(model_config)
    linears = checkpoint_linears(model)
    _check_experts(glowq, linears)
    _check_listed_names(glowq, linears)
    state = checkpoint_state_dict(model, experts_spec(model))
    every_linear = {**linears.quantizable, **linears.routers}
    expected: dict[str, TensorSpec] = {}
    for name, tensor in state.items():
        module = name.rpartition(".")[0]
        if module not in every_linear:
            expected[name] = TensorSpec(tuple(tensor.shape), MODEL_FLOATS)
    if model.config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)  # the head shares the embedding; it is not stored
    for module, (in_features, out_features) in every_linear.items():
        has_bias = tensor_name(module, "bias") in state
        expected.update(_linear_tensors(module, in_features, out_features, has_bias, glowq))
    return expected


def meta_model(model_config: dict[str, Any]) -> torch.nn.Module:
    """The transformers model of this config, built on the meta device (shapes, no memory)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        hf_config = AutoConfig.for_model(**model_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise GlowQFormatError(f"config.json does not describe a model transformers knows ({exc}).") from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def experts_spec(model: torch.nn.Module) -> ExpertsSpec | None:
    """How checkpoints name this model's experts; None for a dense model. A model whose
    experts the format has no names for is refused (vLLM would not find its tensors)."""
    spec = EXPERTS_BY_MODEL_TYPE.get(model.config.model_type)
    if spec is None:
        fused = next((name for name, module in model.named_modules() if is_fused_experts(module)), None)
        if fused is not None:
            raise GlowQFormatError(
                f"model_type {model.config.model_type!r} has Mixture-of-Experts layers ({fused}) that the GlowQ "
                f"format has no checkpoint names for (MoE model types: {sorted(EXPERTS_BY_MODEL_TYPE)}); "
                "glowq-calibrate does not write such checkpoints."
            )
    return spec


def checkpoint_linears(model: torch.nn.Module) -> CheckpointLinears:
    """Every linear GlowQ quantizes (all but the output head, which vLLM keeps in its own
    embedding class, as the plugin does), each expert's gate, up and down projections cut out
    of transformers' fused 3-D parameters, and the MoE routers, all under checkpoint names."""
    spec, head = experts_spec(model), model.get_output_embeddings()
    quantizable: dict[str, tuple[int, int]] = {}
    routers: dict[str, tuple[int, int]] = {}
    experts: dict[str, tuple[str, ...]] = {}
    for path, module in model.named_modules():
        if spec is not None and is_fused_experts(module):
            block_path = path.rpartition(".")[0]
            block = spec.checkpoint_name(path).rpartition(".")[0]
            projections = _expert_projections(block, module, spec)
            quantizable.update(projections)
            experts[block] = tuple(projections)
            for router in spec.full_precision:
                out_features, in_features = model.get_submodule(f"{block_path}.{router}").weight.shape
                routers[f"{block}.{router}"] = (in_features, out_features)
        elif isinstance(module, torch.nn.Linear) and module is not head:
            name = path if spec is None else spec.checkpoint_name(path)
            quantizable[name] = (module.in_features, module.out_features)
    for router in routers:
        quantizable.pop(router, None)  # a router may be an nn.Linear (Qwen2-MoE's shared_expert_gate)
    return CheckpointLinears(quantizable, routers, experts)


def _expert_projections(block: str, module: torch.nn.Module, spec: ExpertsSpec) -> dict[str, tuple[int, int]]:
    """(in, out) of every expert's projections: gate_up_proj is [E, 2I, H], down_proj [E, H, I]."""
    num_experts, two_i, hidden = getattr(module, FUSED_GATE_UP).shape
    gate, up, down = spec.projections
    shapes = {gate: (hidden, two_i // 2), up: (hidden, two_i // 2), down: (two_i // 2, hidden)}
    return {f"{block}.{EXPERTS}.{e}.{leaf}": shape for e in range(num_experts) for leaf, shape in shapes.items()}


def _check_listed_names(glowq: GlowQConfig, linears: CheckpointLinears) -> None:
    """lowrank_units and modules_to_not_convert may only name this model's units and linears."""
    units = {glowq.unit_of(name) for name in linears.quantizable if glowq.is_quantized(name)}
    unknown_units = sorted(set(glowq.lowrank_units) - units)
    if unknown_units:
        raise GlowQFormatError(
            f"GlowQ quantization_config.lowrank_units lists {unknown_units[0]!r}, which is not a quantized "
            f"unit of this model (share={glowq.share!r}); remove it or re-run glowq-calibrate."
        )
    unknown_modules = sorted(set(glowq.modules_to_not_convert) - set(linears.quantizable) - set(linears.routers))
    if unknown_modules:
        raise GlowQFormatError(
            f"GlowQ quantization_config.modules_to_not_convert lists {unknown_modules[0]!r}, which is not a "
            "linear layer of this model; remove it or re-run glowq-calibrate."
        )


def _check_experts(glowq: GlowQConfig, linears: CheckpointLinears) -> None:
    """What the tensors alone would not show about an MoE model: its format version, that
    routers stay in full precision, and that vLLM's one layer per block of experts is either
    quantized or not."""
    if not linears.experts:
        return
    if glowq.format_version < MOE_FORMAT_VERSION:
        raise GlowQFormatError(
            f"GlowQ format_version {glowq.format_version} has no Mixture-of-Experts layers, but this model has "
            f"experts ({next(iter(linears.experts))}.{EXPERTS}); MoE checkpoints are format_version "
            f"{MOE_FORMAT_VERSION}: re-calibrate with this glowq-calibrate."
        )
    quantized_routers = [router for router in linears.routers if glowq.is_quantized(router)]
    if quantized_routers:
        raise GlowQFormatError(
            f"GlowQ quantization_config.modules_to_not_convert does not list the router {quantized_routers[0]!r}; "
            "routers stay in full precision: add it (glowq-calibrate lists every router)."
        )
    for block, projections in linears.experts.items():
        kept = [name for name in projections if not glowq.is_quantized(name)]
        if 0 < len(kept) < len(projections):
            raise GlowQFormatError(
                f"GlowQ quantization_config.modules_to_not_convert keeps {kept[0]!r} in full precision but "
                f"quantizes other experts of {block!r}; vLLM runs a block's experts as one layer: list all of "
                "their projections or none."
            )


def _linear_tensors(module: str, k: int, n: int, has_bias: bool, glowq: GlowQConfig) -> dict[str, TensorSpec]:
    """The tensors of one linear with k in-features and n out-features (docs/format.md, Tensors)."""
    out = {tensor_name(module, "bias"): TensorSpec((n,), MODEL_FLOATS)} if has_bias else {}
    if not glowq.is_quantized(module):
        out[tensor_name(module, "weight")] = TensorSpec((n, k), MODEL_FLOATS)
        return out
    reason = packable(k, glowq.group_size)
    if reason:
        raise GlowQFormatError(
            f"GlowQ group_size={glowq.group_size} cannot be used for layer {module!r}: {reason}; such "
            "modules belong in modules_to_not_convert (glowq-calibrate puts them there)."
        )
    groups = k // glowq.group_size_for(k)
    out[tensor_name(module, QWEIGHT)] = TensorSpec((k // PACK_FACTOR, n), (PACKED_DTYPE,))
    out[tensor_name(module, SCALES)] = TensorSpec((groups, n), (CHECKPOINT_FLOAT,))
    if not glowq.sym:
        out[tensor_name(module, QZEROS)] = TensorSpec((groups, -(-n // PACK_FACTOR)), (PACKED_DTYPE,))
    unit = glowq.unit_of(module)
    if glowq.has_factors(unit):
        out[tensor_name(module, FACTOR_A)] = TensorSpec((n, glowq.rank), (CHECKPOINT_FLOAT,))
        out[factor_b_name(unit)] = TensorSpec((glowq.rank, k), (CHECKPOINT_FLOAT,))
    return out


# ----- what the checkpoint holds ---------------------------------------------------------------


def read_headers(folder: Path) -> dict[str, TensorHeader]:
    """Every tensor's header entry across the folder's safetensors files (no tensor data)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GlowQFormatError(f"GlowQ checkpoint {folder} holds no .safetensors files; {_RECALIBRATE}.")
    headers: dict[str, TensorHeader] = {}
    for file in files:
        for name, header in read_safetensors_header(file).items():
            if name in headers:
                raise GlowQFormatError(
                    f"GlowQ checkpoint tensor {name!r} is stored twice, in {headers[name].file} and "
                    f"{file.name}; remove the stale file."
                )
            headers[name] = header
    _check_index(folder, headers)
    return headers


def read_safetensors_header(path: Path) -> dict[str, TensorHeader]:
    """Parse one file's header, and check that the file holds every byte the header describes."""
    size = path.stat().st_size
    broken = f"{path} is not a readable safetensors file"
    with path.open("rb") as handle:
        prefix = handle.read(_HEADER_LENGTH_BYTES)
        if len(prefix) < _HEADER_LENGTH_BYTES:
            raise GlowQFormatError(f"{broken}: it is only {size} bytes long; {_RECALIBRATE} or copy it again.")
        (length,) = struct.unpack("<Q", prefix)
        if length > size - _HEADER_LENGTH_BYTES:
            raise GlowQFormatError(f"{broken}: its header is cut off; {_RECALIBRATE} or copy it again.")
        try:
            header = json.loads(handle.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise GlowQFormatError(f"{broken}: its header is not JSON; {_RECALIBRATE} or copy it again.") from None
    if not isinstance(header, dict):
        raise GlowQFormatError(f"{broken}: its header is not a JSON object; {_RECALIBRATE}.")
    header.pop("__metadata__", None)
    tensors, data_end = {}, 0
    for name, entry in header.items():
        try:
            dtype, shape, (_, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise GlowQFormatError(f"{broken}: the header entry of {name!r} is malformed; {_RECALIBRATE}.") from None
        tensors[name] = TensorHeader(str(dtype), shape, path.name)
        data_end = max(data_end, int(end))
    needed = _HEADER_LENGTH_BYTES + length + data_end
    if size < needed:
        raise GlowQFormatError(
            f"{path} is truncated: its header describes {needed} bytes but the file has {size}; "
            f"copy it again or {_RECALIBRATE}."
        )
    return tensors


def _check_index(folder: Path, headers: dict[str, TensorHeader]) -> None:
    """A sharded checkpoint's index must name, for every tensor, the file that holds it."""
    index_path = folder / SAFETENSORS_INDEX
    if not index_path.exists():
        return
    weight_map = read_json(index_path).get("weight_map", {})
    for name, file in weight_map.items():
        if name not in headers or headers[name].file != file:
            where = "no file" if name not in headers else headers[name].file
            raise GlowQFormatError(
                f"{index_path} places tensor {name!r} in {file}, but {where} holds it; {_RECALIBRATE}."
            )


# ----- comparing the two -------------------------------------------------------------------------


def compare_tensors(
    folder: Path, expected: dict[str, TensorSpec], found: dict[str, TensorHeader], glowq: GlowQConfig
) -> None:
    """Refuse the first unexpected, missing, mis-shaped or mis-typed tensor."""
    unexpected = sorted(set(found) - set(expected))
    if unexpected:
        raise _unexpected_tensor_error(unexpected, found, glowq)
    missing = sorted(set(expected) - set(found))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise GlowQFormatError(
            f"GlowQ checkpoint is missing tensor {missing[0]!r}{more}, which its quantization_config "
            f"requires ({folder}); {_RECALIBRATE}, or fix lowrank_units / modules_to_not_convert."
        )
    for name, spec in expected.items():
        header = found[name]
        if header.shape != spec.shape:
            raise GlowQFormatError(
                f"GlowQ checkpoint tensor {name!r} (in {header.file}) has shape {list(header.shape)}, but the "
                f"model and quantization_config (bits={glowq.bits}, group_size={glowq.group_size}, "
                f"rank={glowq.rank}) imply {list(spec.shape)}; the config does not belong to these tensors: "
                f"{_RECALIBRATE}."
            )
        if header.dtype not in spec.dtypes:
            raise GlowQFormatError(
                f"GlowQ checkpoint tensor {name!r} (in {header.file}) has dtype {header.dtype}; the format "
                f"stores it as {' or '.join(spec.dtypes)}: {_RECALIBRATE}."
            )


def _unexpected_tensor_error(unexpected: list[str], found: dict[str, TensorHeader], glowq: GlowQConfig):
    """Factors of an undeclared unit, and a unit's B stored under another name, get their own
    message: the usual causes are a hand-edited lowrank_units and a B moved to another member
    (an MoE layer's shared B belongs under expert 0's gate projection); anything else is a
    tensor the format does not know."""
    more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
    for name in unexpected:
        module, _, suffix = name.rpartition(".")
        if suffix not in (FACTOR_A, FACTOR_B):
            continue
        unit, file = glowq.unit_of(module), found[name].file
        if not glowq.has_factors(unit):
            return GlowQFormatError(
                f"GlowQ checkpoint (in {file}) has low-rank factors for unit {unit!r}, which "
                "quantization_config.lowrank_units does not list; add the unit there or drop its tensors."
            )
        if suffix == FACTOR_B:
            return GlowQFormatError(
                f"GlowQ checkpoint has an unexpected tensor {name!r} (in {file}): unit {unit!r} stores its one B "
                f"as {factor_b_name(unit)!r}; rename the tensor or {_RECALIBRATE}."
            )
    return GlowQFormatError(
        f"GlowQ checkpoint has an unexpected tensor {unexpected[0]!r}{more} (in {found[unexpected[0]].file}): "
        "its quantization_config does not describe it (check lowrank_units, share and "
        "modules_to_not_convert), or the file belongs to another model."
    )
