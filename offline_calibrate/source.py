"""The source model's weights, read when the calibration needs them.

A model folder's safetensors shards are read through their index with `safe_open`, a group of
tensors at a time (the embeddings, then one decoder layer when its turn comes), so host memory
never holds more than that group. The tensors `safe_open` returns are views of the file's
memory map: nothing is copied, and the pages go back to the page cache when the group is
dropped. Checkpoints store Mixture-of-Experts experts one tensor per expert projection (what
Hugging Face checkpoints, `save_pretrained` and vLLM use); transformers 5 keeps them as fused
3-D parameters, so a fused parameter is stacked from its experts' tensors here, the inverse of
the calibrator's own split (vllm_glowq.moe_layout).

A folder without safetensors but with `pytorch_model.bin` files (a pickle, which cannot be read
a tensor at a time) is loaded whole by transformers instead and served from memory.

Everything that can be checked without reading tensor data is checked when a source is opened
or `require`d, before any layer is calibrated: the index's shards exist and are complete files,
and every tensor the model needs is there with its shape.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from vllm_glowq.format import EXPERTS, GlowQFormatError
from vllm_glowq.moe_layout import ExpertsSpec, expert_tensor_names, fuse_experts
from vllm_glowq.validate import TensorHeader, read_json

from .loading import ModelLoadError, load_model
from .shards import SAFETENSORS_INDEX, SINGLE_FILE

_LOG = logging.getLogger(__name__)
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_FINITE_CHUNK = 1 << 24  # elements checked at once
_LISTED = 5  # names quoted in one error message


class WeightSource(Protocol):
    """Real tensors for the meta tensors of an empty model, under the model's state-dict names."""

    dtype: torch.dtype

    def require(self, wanted: dict[str, torch.Tensor]) -> None:
        """Refuse, naming them, tensors the model needs that the source lacks or mis-shapes."""

    def check_finite(self, groups: Iterable[dict[str, torch.Tensor]]) -> None:
        """Refuse a source with a NaN or Inf weight, reading one group at a time."""

    def read(self, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The tensors for `wanted` (name -> its meta tensor), in the meta tensor's dtype."""


@dataclass(frozen=True)
class _Stored:
    """How a model tensor is stored: as one tensor, or (fused) as one tuple per expert."""

    parts: list[tuple[str, ...]]
    fused: bool

    def names(self) -> list[str]:
        return [name for group in self.parts for name in group]


class SafetensorsSource:
    """A folder's `model.safetensors`, or the shards its index lists."""

    def __init__(self, folder: Path, headers: dict[str, TensorHeader], experts: ExpertsSpec | None) -> None:
        self.folder = folder
        self.headers = headers
        self.experts = experts
        self.dtype = torch.float32

    @classmethod
    def open(cls, folder: Path, experts: ExpertsSpec | None) -> SafetensorsSource | None:
        """The folder's safetensors weights after checking every listed file; None without any."""
        weight_map = safetensors_index(folder)
        files = sorted(set(weight_map.values())) if weight_map is not None else safetensors_files(folder)
        if files is None:
            return None
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise ModelLoadError(
                f"model folder {folder} lacks {_listing(missing)} listed in {SAFETENSORS_INDEX}: the download or "
                "copy is incomplete; fetch the missing files again"
            )
        headers: dict[str, TensorHeader] = {}
        for name in files:
            headers.update(_read_header(folder / name))
        if weight_map is not None:
            _check_index(folder, weight_map, headers)
        return cls(folder, headers, experts)

    def _stored(self, name: str, meta: torch.Tensor) -> _Stored:
        stored = name if self.experts is None else self.experts.checkpoint_name(name)
        parent, _, leaf = stored.rpartition(".")
        is_experts = self.experts is not None and parent.endswith(f".{self.experts.checkpoint_block}.{EXPERTS}")
        if stored in self.headers or not is_experts:
            return _Stored([(stored,)], fused=False)
        return _Stored(expert_tensor_names(parent, leaf, meta.shape[0], self.experts), fused=True)

    def require(self, wanted: dict[str, torch.Tensor]) -> None:
        missing, wrong = [], []
        for name, meta in wanted.items():
            stored = self._stored(name, meta)
            shape = tuple(meta.shape[1:]) if stored.fused else tuple(meta.shape)
            for group in stored.parts:
                expected = shape if len(group) == 1 else (shape[0] // len(group), *shape[1:])
                for part in group:
                    header = self.headers.get(part)
                    if header is None:
                        missing.append(part)
                    elif header.shape != expected:
                        wrong.append(f"{part} (in {header.file}) has shape {list(header.shape)}, "
                                     f"but config.json implies {list(expected)}")
        if missing:
            raise ModelLoadError(
                f"the weights in {self.folder} lack {len(missing)} tensor(s) the model needs: {_listing(missing)}; "
                "the checkpoint does not match its config.json or is incomplete"
            )
        if wrong:
            raise ModelLoadError(f"cannot load the weights of {self.folder}: {wrong[0]}; the checkpoint does not "
                                 "match its config.json")

    def check_finite(self, groups: Iterable[dict[str, torch.Tensor]]) -> None:
        for wanted in tqdm(groups, desc="checking weights", unit="part"):
            names = [part for name, meta in wanted.items() for part in self._stored(name, meta).names()]
            for part, tensor in self._read_stored(names).items():
                if not is_finite(tensor):
                    raise ModelLoadError(f"weight {part} contains NaN or Inf values (in "
                                         f"{self.headers[part].file}); the model is corrupt")

    def read(self, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        plans = {name: self._stored(name, meta) for name, meta in wanted.items()}
        raw = self._read_stored([part for plan in plans.values() for part in plan.names()])
        out = {}
        for name, plan in plans.items():
            if plan.fused:
                tensor = fuse_experts([tuple(raw[part] for part in group) for group in plan.parts])
            else:
                tensor = raw[plan.parts[0][0]]
            out[name] = tensor.to(wanted[name].dtype)
        return out

    def _read_stored(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Tensors by checkpoint name, each shard opened once and closed again (its memory map
        lives on only in the tensors returned)."""
        by_file: dict[str, list[str]] = {}
        for name in names:
            by_file.setdefault(self.headers[name].file, []).append(name)
        out = {}
        for file, group in by_file.items():
            try:
                with safe_open(str(self.folder / file), framework="pt") as handle:
                    out.update({name: handle.get_tensor(name) for name in group})
            except SafetensorError as exc:
                raise ModelLoadError(f"cannot load the weights of {self.folder}: reading {file} failed ({exc}); "
                                     "download or copy it again") from None
        return out

    def first_float_dtype(self) -> torch.dtype | None:
        """The dtype transformers' dtype='auto' falls back to when config.json names none."""
        return next((_FLOAT_DTYPES[h.dtype] for h in self.headers.values() if h.dtype in _FLOAT_DTYPES), None)


class LoadedModelSource:
    """The weights of a model transformers loaded whole, served from memory."""

    def __init__(self, model: torch.nn.Module, missing: list[str]) -> None:
        self.model = model
        self.missing = missing
        self.dtype = model.dtype
        self._state = model.state_dict()

    def require(self, wanted: dict[str, torch.Tensor]) -> None:
        missing = [name for name in self.missing if name in wanted]
        if missing:
            raise ModelLoadError(f"the weights of {self.model.name_or_path} lack {len(missing)} tensor(s) the model "
                                 f"needs: {_listing(missing)}; the checkpoint is incomplete")

    def check_finite(self, groups: Iterable[dict[str, torch.Tensor]]) -> None:
        """Nothing left to do: load_model checked every weight of the loaded model."""

    def read(self, wanted: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {name: self._state[name].to(meta.dtype) for name, meta in wanted.items()}


def is_finite(tensor: torch.Tensor) -> bool:
    """No NaN or Inf in `tensor`, checked a chunk at a time (the largest absolute value is NaN
    or Inf exactly when one is there, and is four times faster to find than a mask on CPUs)."""
    return all(bool(chunk.abs().amax().isfinite()) for chunk in tensor.reshape(-1).split(_FINITE_CHUNK)
               if chunk.numel())


def safetensors_index(folder: Path) -> dict[str, str] | None:
    """The index's tensor -> file map; None when the folder has no index."""
    if not (folder / SAFETENSORS_INDEX).is_file():
        return None
    try:
        weight_map = read_json(folder / SAFETENSORS_INDEX)["weight_map"]
        if not all(isinstance(file, str) for file in weight_map.values()):
            raise TypeError("a file name is not a string")
    except (GlowQFormatError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{folder / SAFETENSORS_INDEX} is not a safetensors index ({exc}); fetch it "
                             "again") from None
    return weight_map


def safetensors_files(folder: Path) -> list[str] | None:
    """`model.safetensors` of a folder without an index; None when it has no safetensors."""
    if (folder / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    if shards:
        raise ModelLoadError(f"model folder {folder} holds {_listing(shards)} but no {SAFETENSORS_INDEX} saying "
                             "which tensor is where; fetch the index too")
    return None


def _read_header(path: Path) -> dict[str, TensorHeader]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            return {name: TensorHeader(handle.get_slice(name).get_dtype(), tuple(handle.get_slice(name).get_shape()),
                                       path.name) for name in handle.keys()}
    except SafetensorError as exc:
        raise ModelLoadError(f"cannot load the weights of {path.parent}: {path.name} is not a complete safetensors "
                             f"file ({exc}); download or copy it again") from None


def _check_index(folder: Path, weight_map: dict[str, str], headers: dict[str, TensorHeader]) -> None:
    for name, file in weight_map.items():
        if name not in headers or headers[name].file != file:
            where = "no file" if name not in headers else headers[name].file
            raise ModelLoadError(f"{folder / SAFETENSORS_INDEX} places tensor {name} in {file}, but {where} holds "
                                 "it; fetch the index and its shards again")


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown} and {len(names) - _LISTED} more"


def open_source(folder: Path, hf_config, experts: ExpertsSpec | None, seq_len: int) -> WeightSource:
    """Safetensors weights streamed from the folder; a pytorch_model.bin checkpoint loaded whole."""
    source = SafetensorsSource.open(folder, experts)
    if source is not None:
        dtype = getattr(hf_config, "dtype", None)
        source.dtype = (getattr(torch, dtype) if isinstance(dtype, str) else dtype) or source.first_float_dtype() \
            or torch.float32
        return source
    if (folder / BIN_FILE).is_file() or (folder / BIN_INDEX).is_file():
        _LOG.warning("%s has no safetensors weights, only %s: it is loaded whole, so host memory holds the entire "
                     "model; convert it to safetensors to calibrate one layer at a time", folder, BIN_FILE)
        model, missing = load_model(str(folder), hf_config, seq_len, with_missing=True)
        return LoadedModelSource(model, missing)
    raise ModelLoadError(f"model folder {folder} has no weights: no {SINGLE_FILE}, {SAFETENSORS_INDEX} or {BIN_FILE}")
