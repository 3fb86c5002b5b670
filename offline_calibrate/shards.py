"""Safetensors shards written as tensors arrive, without holding a shard in memory.

safetensors' own `save_file` needs every tensor of a file at once, so writing a checkpoint
with it means holding the whole checkpoint (or a 4 GiB shard) in host memory. `ShardWriter`
instead appends each tensor's bytes to a data file the moment it is added; when a shard is
full (or at the end) it writes the shard's header and copies the bytes behind it, in the
kernel where it can (copy_file_range). The file it writes is byte for byte what `save_file`
writes for the same tensors: the same header (compact JSON, padded with spaces to 8 bytes) and
the same order of data (by dtype in safetensors' order, then by name), so a streamed checkpoint
and an in-memory one are identical files.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

MAX_SHARD_BYTES = 4 * 1024**3
SAFETENSORS_INDEX = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
SHARD_METADATA = {"format": "pt"}
_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}
# The order safetensors lays out a file's data: dtypes from this list's start, then names.
_DTYPE_ORDER = ("U64", "I64", "F64", "F32", "U32", "I32", "BF16", "F16", "U16", "I16", "F8_E4M3", "F8_E5M2",
                "I8", "U8", "BOOL")
_COPY_CHUNK = 64 * 1024**2


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int  # in the shard's data file
    nbytes: int


class _Shard:
    """One shard being filled: bytes in `data_path` as they come, the file at `close()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data_path = path.with_name(path.name + ".data")
        self._data = open(self.data_path, "wb", buffering=0)
        self.entries: list[_Entry] = []
        self.nbytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        tensor = tensor.detach().to("cpu").contiguous()
        if tensor.dtype not in _DTYPE_NAMES:
            raise ValueError(f"tensor {name} has dtype {tensor.dtype}, which safetensors cannot store")
        nbytes = tensor.numel() * tensor.element_size()
        if nbytes:
            self._data.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        self.entries.append(_Entry(name, _DTYPE_NAMES[tensor.dtype], tuple(tensor.shape), self.nbytes, nbytes))
        self.nbytes += nbytes

    def close(self) -> None:
        """Write the shard file: header, then the data in safetensors' order."""
        self._data.close()
        order = sorted(self.entries, key=lambda e: (_DTYPE_ORDER.index(e.dtype), e.name))
        header: dict[str, object] = {"__metadata__": SHARD_METADATA}
        offset = 0
        for entry in order:
            header[entry.name] = {"dtype": entry.dtype, "shape": list(entry.shape),
                                  "data_offsets": [offset, offset + entry.nbytes]}
            offset += entry.nbytes
        blob = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        blob += b" " * (-len(blob) % 8)
        with open(self.data_path, "rb", buffering=0) as data, open(self.path, "wb", buffering=0) as out:
            out.write(struct.pack("<Q", len(blob)) + blob)
            for entry in order:
                _append_range(data.fileno(), out.fileno(), entry.offset, entry.nbytes)
        self.data_path.unlink()


def _append_range(src: int, dst: int, offset: int, count: int) -> None:
    """Append `count` bytes of file `src` starting at `offset` to file `dst`."""
    while count > 0:
        chunk = min(count, _COPY_CHUNK)
        try:
            copied = os.copy_file_range(src, dst, chunk, offset)
        except (AttributeError, OSError):  # not Linux, or a file system without it
            copied = os.write(dst, os.pread(src, chunk, offset))
        if copied <= 0:
            raise OSError(f"copying checkpoint data stopped with {count} bytes left")
        offset += copied
        count -= copied


class ShardWriter:
    """Checkpoint tensors into `model.safetensors`, or numbered shards of at most
    `max_shard_bytes` with an index, as `add` is called. A shard takes the tensors of each `add`
    in name order until the next would overflow it (so one dict added at once is sharded as a
    sorted whole); nothing is final until `finish` renames the shards into place."""

    def __init__(self, folder: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.folder = folder
        self.max_shard_bytes = max_shard_bytes
        self._closed: list[_Shard] = []
        self._open: _Shard | None = None
        self._names: set[str] = set()

    def add(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name in sorted(tensors):
            if name in self._names:
                raise ValueError(f"checkpoint tensor {name} was written twice")
            self._names.add(name)
            tensor = tensors[name]
            nbytes = tensor.numel() * tensor.element_size()
            if self._open is not None and self._open.entries and self._open.nbytes + nbytes > self.max_shard_bytes:
                self._close_open()
            if self._open is None:
                self._open = _Shard(self.folder / f".shard-{len(self._closed) + 1:05d}.safetensors")
            self._open.add(name, tensor)

    def _close_open(self) -> None:
        self._open.close()
        self._closed.append(self._open)
        self._open = None

    def finish(self) -> list[str]:
        """Close the last shard, give the shards their final names (and the index); returns them."""
        if self._open is not None:
            self._close_open()
        if len(self._closed) == 1:
            self._closed[0].path.rename(self.folder / SINGLE_FILE)
            return [SINGLE_FILE]
        weight_map, names = {}, []
        for i, shard in enumerate(self._closed, start=1):
            name = f"model-{i:05d}-of-{len(self._closed):05d}.safetensors"
            shard.path.rename(self.folder / name)
            weight_map.update({entry.name: name for entry in sorted(shard.entries, key=lambda e: e.name)})
            names.append(name)
        total = sum(shard.nbytes for shard in self._closed)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names
