"""A GGUF file as a model source, checked from its header before anything slow.

GGUF is how many people hold their models. transformers reads a GGUF file (with the `gguf` and
`accelerate` packages) and dequantizes its weights into the matching transformers model; what
is here checks one file from its header, in microseconds, so that a file that is not GGUF, a
truncated one, a missing package or Hugging Face files beside it are each one sentence with the
fix before anything slow. Which file is the model's, and how its weights are read, is source.py's.
"""

from __future__ import annotations

import importlib.util
import struct
from pathlib import Path
from typing import BinaryIO

from .loading import ModelLoadError

GGUF_SUFFIX = ".gguf"
GGUF_MAGIC = b"GGUF"
GGUF_VERSIONS = (2, 3)
GGUF_PACKAGES = ("gguf", "accelerate")  # transformers needs both to load a GGUF model
GGUF_INSTALL_HINT = "pip install 'vllm-glowq[gguf]' (or: pip install gguf accelerate)"
# Files transformers reads from a GGUF file's folder in preference to what the GGUF file holds
# (config.json is not among them: the model config comes from the GGUF metadata alone).
HF_SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "chat_template.json")


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


def unreadable_gguf_message(path: Path, exc: Exception) -> str:
    """Why transformers could not read the GGUF file at `path`: damaged, or of an architecture it
    does not build (or glowq-calibrate does not support)."""
    import transformers
    from transformers.integrations.ggml import GGUF_CONFIG_MAPPING

    from .architectures import SUPPORTED

    takes = sorted(set(SUPPORTED) & set(GGUF_CONFIG_MAPPING))
    architecture = check_gguf_file(path)
    reason = f"{type(exc).__name__}: {exc}"
    if architecture in takes:
        return f"cannot read the GGUF file {path} ({reason}): it is truncated or damaged; get it again"
    return (
        f"transformers {transformers.__version__} cannot build a model from the GGUF file {path} of "
        f"architecture {architecture!r} ({reason}); glowq-calibrate takes GGUF files of {', '.join(takes)}"
    )
