"""Where the source model's weights come from, and reading them when the calibration needs them.

A model is named as a Hugging Face folder, a GGUF file (or a folder and the GGUF file in it), or
a hub id (`org/name`, optionally with a GGUF file in that repository). `resolve_source` turns
that into a `ModelSource`: a folder on this machine (a hub id's snapshot in the Hugging Face
cache, hub.py) and the GGUF file in it, if any, checked as far as it can be without reading
weights. `open_source` then gives the calibration its weights.

A model folder's safetensors shards are read through their index with `safe_open`, a group of
tensors at a time (the embeddings, then one decoder layer when its turn comes), so host memory
never holds more than that group. The tensors `safe_open` returns are views of the file's
memory map: nothing is copied, and the pages go back to the page cache when the group is
dropped. Checkpoints store Mixture-of-Experts experts one tensor per expert projection (what
Hugging Face checkpoints, `save_pretrained` and vLLM use); transformers 5 keeps them as fused
3-D parameters, so a fused parameter is stacked from its experts' tensors here, the inverse of
the calibrator's own split (vllm_glowq.moe_layout).

Two kinds of weights are loaded whole by transformers instead and served from memory: a folder
without safetensors but with `pytorch_model.bin` files (a pickle, which cannot be read a tensor
at a time), and a GGUF file. A GGUF file holds llama.cpp's quantized blocks under llama.cpp's
tensor names, with q/k rows in llama.cpp's rotary order; transformers undoes all of that only
while loading a whole model (its per-tensor steps are private), and dequantizing once into a
safetensors copy would cost 8 times the file's size on disk for a 4-bit GGUF. So host memory
holds the dequantized model in float32 (4 bytes per weight: 0.54 GB for SmolLM2-135M); the
checkpoint's tensors are bit for bit those of calibrating the Hugging Face folder the GGUF file
was made from (tests/test_gguf_sources.py).

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

from .gguf_file import GGUF_SUFFIX, check_gguf_file, require_gguf_packages
from .loading import ModelLoadError, load_model
from .shards import SAFETENSORS_INDEX, SINGLE_FILE

_LOG = logging.getLogger(__name__)
BIN_FILE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"
_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
_FINITE_CHUNK = 1 << 24  # elements checked at once
_LISTED = 5  # names quoted in one error message


@dataclass(frozen=True)
class ModelSource:
    """A model found on this machine: the folder holding its files and, when its weights come
    from one, the GGUF file in it. `name` is the model as the user named it (for messages and
    the checkpoint's provenance); `hub_id` is set for a model fetched from the hub."""

    name: str
    folder: Path
    gguf_file: str | None = None
    hub_id: str | None = None

    @property
    def pretrained_kwargs(self) -> dict[str, str]:
        """What transformers' `from_pretrained(folder, ...)` needs besides the folder."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return self.name


def resolve_source(model: str | Path | ModelSource, gguf_file: str | None = None) -> ModelSource:
    """Check the model as far as it can be checked without reading weights.

    Accepted: a folder with config.json; a `.gguf` file; a folder with `gguf_file` in it (or with
    exactly one .gguf file and no config.json); a hub id (`org/name`), whose config and tokenizer
    files (or, with `gguf_file`, that GGUF file) are fetched into the hub cache.
    """
    if isinstance(model, ModelSource):
        return model
    model = str(model)
    path = Path(model).expanduser()
    if path.is_file():
        if gguf_file:
            raise ModelLoadError(
                f"the model {path} is a file, so --gguf-file {gguf_file} has nothing to choose from; pass either "
                "the .gguf file alone or its folder with --gguf-file"
            )
        check_gguf_file(path)
        return ModelSource(str(path), path.parent, path.name)
    if path.is_dir():
        return _folder_source(path, gguf_file)
    from . import hub

    if not hub.is_hub_id(model) or model.endswith(GGUF_SUFFIX):
        raise ModelLoadError(f"model path {model} does not exist")
    if gguf_file:
        require_gguf_packages(f"--gguf-file {gguf_file}")  # before a download of hundreds of MB
        folder = hub.fetch_files(model, [gguf_file])
        check_gguf_file(folder / gguf_file)
        return ModelSource(f"{model}/{gguf_file}", folder, gguf_file, hub_id=model)
    return ModelSource(model, hub.fetch_metadata(model), hub_id=model)  # weights later: fetch_weights


def _folder_source(path: Path, gguf_file: str | None) -> ModelSource:
    found = sorted(p.name for p in path.glob(f"*{GGUF_SUFFIX}") if p.is_file())
    has = f" (it has: {', '.join(found)})" if found else " (it has no .gguf files)"
    if gguf_file:
        if not (path / gguf_file).is_file():
            raise ModelLoadError(f"--gguf-file {gguf_file}: there is no such file in {path}{has}")
        check_gguf_file(path / gguf_file)
        return ModelSource(str(path / gguf_file), path, gguf_file)
    if (path / "config.json").is_file():
        try:
            read_json(path / "config.json")  # a broken config is blamed here, not on the tokenizer
        except GlowQFormatError as exc:
            raise ModelLoadError(str(exc)) from None
        return ModelSource(str(path), path)
    if len(found) == 1:
        check_gguf_file(path / found[0])
        return ModelSource(str(path / found[0]), path, found[0])
    if found:
        raise ModelLoadError(
            f"model folder {path} holds {len(found)} GGUF files and no config.json: choose one with "
            f"--gguf-file NAME{has}"
        )
    raise ModelLoadError(
        f"model folder {path} has no config.json and no .gguf file: pass a Hugging Face model folder or a GGUF file"
    )


def fetch_weights(source: ModelSource) -> None:
    """Bring a hub model's weight files into its snapshot folder, once its config has passed every
    check; nothing for a local model, nor for a GGUF file (fetched whole: its config is inside)."""
    if source.hub_id and not source.gguf_file:
        from .hub import fetch_weights as fetch_hub_weights

        fetch_hub_weights(source.hub_id, source.folder)


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


def open_source(source: ModelSource, hf_config, experts: ExpertsSpec | None, seq_len: int) -> WeightSource:
    """Safetensors weights streamed from the folder; a pytorch_model.bin checkpoint or a GGUF
    file loaded whole (the module docstring says why)."""
    if source.gguf_file:
        model, missing = load_model(source, hf_config, seq_len, with_missing=True)
        return LoadedModelSource(model, missing)
    fetch_weights(source)
    folder = source.folder
    weights = SafetensorsSource.open(folder, experts)
    if weights is not None:
        dtype = getattr(hf_config, "dtype", None)
        weights.dtype = (getattr(torch, dtype) if isinstance(dtype, str) else dtype) or weights.first_float_dtype() \
            or torch.float32
        return weights
    if (folder / BIN_FILE).is_file() or (folder / BIN_INDEX).is_file():
        _LOG.warning("%s has no safetensors weights, only %s: it is loaded whole, so host memory holds the entire "
                     "model; convert it to safetensors to calibrate one layer at a time", folder, BIN_FILE)
        model, missing = load_model(source, hf_config, seq_len, with_missing=True)
        return LoadedModelSource(model, missing)
    raise ModelLoadError(f"model folder {folder} has no weights: no {SINGLE_FILE}, {SAFETENSORS_INDEX} or {BIN_FILE}")
