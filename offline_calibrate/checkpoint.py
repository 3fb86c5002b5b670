"""The checkpoint's tensors, written while the layers are calibrated.

A layer's packed weights and full-precision tensors go into the shards as soon as the layer is
done. Its factors cannot: which units keep them (GlowQ-S) is decided only once every unit's
importance is known. Until then they wait on disk, one small file per layer in the staging
folder, so host memory holds no layer's factors after the layer is done however deep the model;
`finish` adds those of the restored units to the shards and removes the rest.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .shards import MAX_SHARD_BYTES, ShardWriter

FACTORS_FOLDER = ".factors"


class StreamingCheckpoint:
    """Shards in `staging` (the temporary folder that becomes the checkpoint) plus the factors
    waiting for GlowQ-S."""

    def __init__(self, staging: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.shards = ShardWriter(staging, max_shard_bytes)
        self.waiting = staging / FACTORS_FOLDER
        self.waiting.mkdir()

    def write(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors that are final (embeddings, norms, the head)."""
        self.shards.add(tensors)

    def write_layer(self, index: int, tensors: dict[str, torch.Tensor], factors: dict[str, torch.Tensor]) -> None:
        self.shards.add(tensors)
        if factors:
            save_file(factors, self._factors_file(index))

    def layer_factors(self, index: int) -> dict[str, torch.Tensor]:
        """Layer `index`'s factors (for GlowQ-S's held-out measurement)."""
        path = self._factors_file(index)
        return load_file(path) if path.exists() else {}

    def finish(self, kept: set[str]) -> list[str]:
        """Add the factors named in `kept`, drop the others, and close the shards; returns the
        weight files."""
        for path in sorted(self.waiting.glob("layer-*.safetensors")):
            with safe_open(str(path), framework="pt") as handle:
                self.shards.add({name: handle.get_tensor(name) for name in handle.keys() if name in kept})
        shutil.rmtree(self.waiting)
        return self.shards.finish()

    def _factors_file(self, index: int) -> Path:
        return self.waiting / f"layer-{index:05d}.safetensors"
