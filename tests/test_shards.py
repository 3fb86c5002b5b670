"""ShardWriter: streamed safetensors files are the files safetensors itself writes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline_calibrate.shards import SAFETENSORS_INDEX, ShardWriter


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype safetensors and torch share, some names sorting before others of a wider dtype."""
    gen = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate([torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.int32,
                               torch.int16, torch.int8, torch.uint8, torch.bool, torch.float8_e4m3fn,
                               torch.float8_e5m2]):
        values = torch.randn(3, 5, generator=gen) * 4
        out[f"t{11 - i:02d}.{str(dtype)[6:]}"] = values.to(dtype)
    out["scalar"] = torch.tensor(1.5)
    out["empty"] = torch.zeros(0, 4, dtype=torch.float16)
    return out


def test_one_shard_is_byte_identical_to_save_file(tmp_path):
    tensors = mixed_tensors()
    save_file(tensors, tmp_path / "reference.safetensors", metadata={"format": "pt"})
    (tmp_path / "streamed").mkdir()
    writer = ShardWriter(tmp_path / "streamed")
    names = list(tensors)
    writer.add({n: tensors[n] for n in names[:5]})  # tensors arrive in several calls
    writer.add({n: tensors[n] for n in names[5:]})
    assert writer.finish() == ["model.safetensors"]
    assert (tmp_path / "streamed" / "model.safetensors").read_bytes() == (
        tmp_path / "reference.safetensors").read_bytes()
    assert sorted(p.name for p in (tmp_path / "streamed").iterdir()) == ["model.safetensors"]


def test_shards_split_where_the_next_tensor_would_overflow(tmp_path):
    tensors = {f"w{i}": torch.full((256,), float(i)) for i in range(5)}  # 1 KiB each
    writer = ShardWriter(tmp_path, max_shard_bytes=2048 + 512)
    writer.add(tensors)
    files = writer.finish()
    assert files == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / SAFETENSORS_INDEX).read_text())
    assert index["metadata"]["total_size"] == 5 * 1024
    assert index["weight_map"] == {"w0": files[0], "w1": files[0], "w2": files[1], "w3": files[1], "w4": files[2]}
    for name, file in index["weight_map"].items():
        assert torch.equal(load_file(tmp_path / file)[name], tensors[name])
    assert not list(tmp_path.glob(".shard-*"))


def test_a_name_written_twice_is_refused(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="checkpoint tensor a was written twice"):
        writer.add({"a": torch.ones(2)})
