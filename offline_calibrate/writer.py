"""Write a checkpoint folder atomically: build it in a temporary sibling, then rename.

A crash or Ctrl-C mid-write leaves only a hidden `.NAME.tmp-*` folder (removed on the way
out when possible), never a folder at the output path that looks complete. What a killed run
could not remove, the next run for the same output removes: it holds a lock on the output
name (`.NAME.lock`) for its whole run, so any staging folder it finds then is stale.
The finished folder gets the permissions the user's umask gives (mkdtemp and safetensors
create 0700 folders and 0600 files, which a server running as another user cannot read).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .shards import MAX_SHARD_BYTES, ShardWriter

_LOG = logging.getLogger(__name__)


class OutputExistsError(FileExistsError):
    pass


class OutputBusyError(FileExistsError):
    pass


def check_output(output: Path, overwrite: bool) -> None:
    """Refuse an existing output unless overwriting; called before any work is done."""
    if output.exists() and not overwrite:
        raise OutputExistsError(f"output folder {output} already exists; pass --overwrite to replace it")
    if output.exists() and not output.is_dir():
        raise OutputExistsError(f"output path {output} exists and is not a folder")
    if not output.parent.exists():
        raise FileNotFoundError(f"the parent folder of the output, {output.parent}, does not exist")


@contextlib.contextmanager
def output_lock(output: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside the output for the whole run: a second run for the same output
    is refused, and staging folders of earlier, killed runs are removed."""
    lock_path = output.parent / f".{output.name}.lock"
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(
                f"another glowq-calibrate is writing {output} (it holds {lock_path}); wait for it to finish "
                "or choose another --output"
            ) from None
        try:
            remove_stale_staging(output)
            yield
        finally:
            lock_path.unlink(missing_ok=True)


def remove_stale_staging(output: Path) -> None:
    """Remove `.NAME.tmp-*` / `.NAME.old-*` folders left by a run that was killed (kill -9,
    power loss) before it could clean up; only called while holding the output's lock."""
    for pattern in (f".{output.name}.tmp-*", f".{output.name}.old-*"):
        for stale in output.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
            _LOG.warning("removed %s, left behind by an interrupted glowq-calibrate run", stale)


@contextlib.contextmanager
def atomic_folder(output: Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary folder; on success it replaces `output`, on failure it is deleted."""
    check_output(output, overwrite)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        yield staging
        apply_umask(staging)
        if output.exists():
            retired = Path(tempfile.mkdtemp(prefix=f".{output.name}.old-", dir=output.parent))
            os.replace(output, retired / output.name)
            os.replace(staging, output)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            os.replace(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def apply_umask(folder: Path) -> None:
    """Give the folder and its files the modes a plain mkdir / open would (0777 / 0666 minus
    the umask), as `save_pretrained` does."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.rglob("*"):
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def split_shards(tensors: dict[str, torch.Tensor], max_bytes: int = MAX_SHARD_BYTES) -> list[dict[str, torch.Tensor]]:
    """Tensors (sorted by name, contiguous, on the CPU) grouped into shards of at most max_bytes."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name in sorted(tensors):
        tensor = tensors[name].detach().contiguous().cpu()
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int = MAX_SHARD_BYTES) -> None:
    """model.safetensors, or numbered shards with an index when larger than max_bytes."""
    shards = ShardWriter(folder, max_bytes)
    shards.add(tensors)
    shards.finish()


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
