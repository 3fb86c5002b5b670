"""Where the source model is: a Hugging Face folder, a hub id, or a GGUF file.

GGUF is how many people hold their models. transformers reads a GGUF file (with the `gguf` and
`accelerate` packages) and dequantizes its weights into the matching transformers model, so a
GGUF source calibrates like any other once it is loaded; everything here is about finding the
file and refusing a bad one, in one sentence with the fix, before anything slow happens.
"""

from __future__ import annotations

import importlib.util
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vllm_glowq.format import GlowQFormatError
from vllm_glowq.validate import read_json

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_PACKAGES = ("gguf", "accelerate")  # transformers needs both to load a GGUF model
GGUF_INSTALL_HINT = "pip install 'vllm-glowq[gguf]' (or: pip install gguf accelerate)"
# Files transformers reads from a GGUF file's folder in preference to what the GGUF file holds
# (config.json is not among them: the model config comes from the GGUF metadata alone).
HF_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


class ModelLoadError(ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    """A model as transformers' `from_pretrained` takes it: a folder or hub id, plus the name of
    a GGUF file inside it when the weights come from one."""

    location: str
    gguf_file: str | None = None

    @property
    def pretrained_kwargs(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}

    def __str__(self) -> str:
        return str(Path(self.location) / self.gguf_file) if self.gguf_file else self.location


def resolve_source(model: str | Path | ModelSource, gguf_file: str | None = None) -> ModelSource:
    """Check the source as far as it can be checked without reading weights.

    Accepted: a folder with config.json; a `.gguf` file; a folder with `gguf_file` in it (or
    with exactly one .gguf file and no config.json); a hub id (`org/name`, optionally with
    `gguf_file`), which transformers fetches when the hub is reachable.
    """
    if isinstance(model, ModelSource):
        model, gguf_file = model.location, model.gguf_file
    model = str(model)
    path = Path(model).expanduser()
    if path.is_file():
        return _gguf_file_source(path, gguf_file)
    if path.is_dir():
        return _folder_source(path, gguf_file)
    if model.startswith((".", "/", "~")) or model.count("/") != 1 or model.endswith(GGUF_SUFFIX):
        raise ModelLoadError(f"model path {model} does not exist")
    if gguf_file:
        require_gguf_packages(f"--gguf-file {gguf_file}")
    return ModelSource(model, gguf_file)  # a hub id


def _gguf_file_source(path: Path, gguf_file: str | None) -> ModelSource:
    if gguf_file:
        raise ModelLoadError(
            f"the model {path} is a file, so --gguf-file {gguf_file} has nothing to choose from; pass either "
            "the .gguf file alone or its folder with --gguf-file"
        )
    check_gguf_file(path)
    return ModelSource(str(path.parent), path.name)


def _folder_source(path: Path, gguf_file: str | None) -> ModelSource:
    if gguf_file:
        candidate = path / gguf_file
        if not candidate.is_file():
            raise ModelLoadError(
                f"--gguf-file {gguf_file}: there is no such file in {path}{_listing(_gguf_files(path))}"
            )
        check_gguf_file(candidate)
        return ModelSource(str(path), gguf_file)
    if (path / "config.json").is_file():
        try:
            read_json(path / "config.json")  # a broken config is blamed here, not on the tokenizer
        except GlowQFormatError as exc:
            raise ModelLoadError(str(exc)) from None
        return ModelSource(str(path))
    found = _gguf_files(path)
    if len(found) == 1:
        check_gguf_file(path / found[0])
        return ModelSource(str(path), found[0])
    if found:
        raise ModelLoadError(
            f"model folder {path} holds {len(found)} GGUF files and no config.json: choose one with "
            f"--gguf-file NAME{_listing(found)}"
        )
    raise ModelLoadError(
        f"model folder {path} has no config.json and no .gguf file: pass a Hugging Face model folder or a GGUF file"
    )


def _gguf_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(f"*{GGUF_SUFFIX}") if p.is_file())


def _listing(names: list[str]) -> str:
    return f" (it has: {', '.join(names)})" if names else " (it has no .gguf files)"


def require_gguf_packages(what: str) -> None:
    """transformers reports a missing `gguf` only after reading the config's metadata, and a
    missing `accelerate` only when it loads the weights; both are known before either."""
    missing = [name for name in GGUF_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ModelLoadError(
            f"{what} is a GGUF model, and reading it needs the {' and '.join(missing)} "
            f"package{'s' if len(missing) > 1 else ''}: {GGUF_INSTALL_HINT}"
        )


def check_gguf_file(path: Path) -> str:
    """The file's `general.architecture`, read from its header (the full metadata, tokenizer
    included, takes transformers seconds to parse; this takes microseconds), after checking that
    no Hugging Face files beside it would be read in its place."""
    _check_alone(path)
    try:
        with path.open("rb") as handle:
            architecture = _header_architecture(handle, path)
    except (EOFError, struct.error, UnicodeDecodeError):
        raise ModelLoadError(
            f"{path} ends inside its GGUF header: the file is truncated or damaged; get it again"
        ) from None
    require_gguf_packages(str(path))
    return architecture


def _header_architecture(handle: BinaryIO, path: Path) -> str:
    """Scan the header's key-value pairs for general.architecture (conventionally the first)."""
    if handle.read(len(GGUF_MAGIC)) != GGUF_MAGIC:
        raise ModelLoadError(f"{path} is not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    version, _tensors, pairs = struct.unpack("<IQQ", _read(handle, 20))
    if version not in GGUF_VERSIONS:
        raise ModelLoadError(f"{path} is GGUF version {version}; transformers' gguf reader takes versions 2 and 3")
    for _ in range(pairs):
        key = _read_string(handle)
        (value_type,) = struct.unpack("<I", _read(handle, 4))
        if key == "general.architecture" and value_type == _GGUF_STRING:
            return _read_string(handle)
        _skip_value(handle, value_type)
    raise ModelLoadError(f"{path} has no general.architecture in its metadata, so no model can be built from it")


_GGUF_STRING, _GGUF_ARRAY = 8, 9
_GGUF_SCALAR_BYTES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _read(handle: BinaryIO, size: int) -> bytes:
    data = handle.read(size)
    if len(data) < size:
        raise EOFError
    return data


def _read_string(handle: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read(handle, 8))
    return _read(handle, length).decode("utf-8")


def _skip_value(handle: BinaryIO, value_type: int) -> None:
    if value_type == _GGUF_STRING:
        (length,) = struct.unpack("<Q", _read(handle, 8))
        handle.seek(length, 1)
    elif value_type == _GGUF_ARRAY:
        item_type, count = struct.unpack("<IQ", _read(handle, 12))
        if item_type in _GGUF_SCALAR_BYTES:
            handle.seek(count * _GGUF_SCALAR_BYTES[item_type], 1)
        else:
            for _ in range(count):
                _skip_value(handle, item_type)
    elif value_type in _GGUF_SCALAR_BYTES:
        handle.seek(_GGUF_SCALAR_BYTES[value_type], 1)
    else:
        raise struct.error(f"unknown GGUF value type {value_type}")


def _check_alone(gguf_path: Path) -> None:
    """transformers, given a GGUF file, still reads tokenizer and generation files that sit
    beside it, and a model built half from each is silently wrong (it loses its BOS token)."""
    side_files = [name for name in HF_SIDE_FILES if (gguf_path.parent / name).is_file()]
    if side_files:
        raise ModelLoadError(
            f"{gguf_path.parent} holds Hugging Face files ({', '.join(side_files)}) beside {gguf_path.name}, and "
            "transformers would read them in place of the GGUF file's own tokenizer and settings: move the .gguf "
            "file into a folder of its own (or calibrate the Hugging Face model in that folder, if it is the same)"
        )


def gguf_architecture(source: ModelSource) -> str | None:
    """`general.architecture` of a local GGUF source (None for other sources)."""
    if not source.gguf_file:
        return None
    path = Path(source.location).expanduser() / source.gguf_file
    return check_gguf_file(path) if path.is_file() else None
