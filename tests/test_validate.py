"""The checkpoint validator on real (edited) safetensors checkpoints, without an engine.

The same broken checkpoints go through `vllm serve` in test_serve_errors.py; here each one
is checked against the exact message, and the validator's picture of a checkpoint is checked
against what the calibrator writes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from vllm_helpers import copy_checkpoint

from offline_calibrate.reference import linear_names
from offline_calibrate.tiny import ARCHITECTURES, build_config
from vllm_glowq.format import GlowQFormatError
from vllm_glowq.validate import check_checkpoint, expected_tensors, meta_model, quantizable_linears

MISSING = "model.layers.0.mlp.up_proj.glowq_A"
RESHAPED = "model.layers.1.self_attn.o_proj.glowq_B"


def drop_factor(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[MISSING]


def wrong_rank_factor(tensors: dict[str, torch.Tensor]) -> None:
    rank, k = tensors[RESHAPED].shape
    tensors[RESHAPED] = torch.zeros(rank + 1, k, dtype=tensors[RESHAPED].dtype)


def bfloat16_factor(tensors: dict[str, torch.Tensor]) -> None:
    tensors[RESHAPED] = tensors[RESHAPED].to(torch.bfloat16)


def extra_tensor(tensors: dict[str, torch.Tensor]) -> None:
    tensors["model.layers.0.mlp.extra"] = torch.zeros(2)


def undeclare_first_unit(config: dict) -> None:
    config["lowrank_units"] = config["lowrank_units"][1:]


def setter(**values):
    return lambda config: config.update(values)


def truncate(folder: Path) -> None:
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


def garble(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")


# case -> (edit of a copy of the tiny Llama checkpoint, the start of the error message)
BROKEN: dict[str, tuple[dict, str]] = {
    "missing factor": (dict(edit_tensors=drop_factor), f"GlowQ checkpoint is missing tensor {MISSING!r}"),
    "mis-shaped factor": (dict(edit_tensors=wrong_rank_factor),
                          f"GlowQ checkpoint tensor {RESHAPED!r} (in model.safetensors) has shape [9, 128], "
                          "but the model and quantization_config (bits=4, group_size=32, rank=8) imply [8, 128]"),
    "factor dtype": (dict(edit_tensors=bfloat16_factor),
                     f"GlowQ checkpoint tensor {RESHAPED!r} (in model.safetensors) has dtype BF16; the format "
                     "stores it as F16"),
    "unexpected tensor": (dict(edit_tensors=extra_tensor),
                          "GlowQ checkpoint has an unexpected tensor 'model.layers.0.mlp.extra'"),
    "config rank": (dict(edit_config=setter(rank=16)),
                    "GlowQ checkpoint tensor 'model.layers.0.self_attn.q_proj.glowq_A' (in model.safetensors) "
                    "has shape [128, 8], but the model and quantization_config (bits=4, group_size=32, rank=16) "
                    "imply [128, 16]"),
    "config group size": (dict(edit_config=setter(group_size=64)),
                          "GlowQ checkpoint tensor 'model.layers.0.self_attn.q_proj.scales' (in model.safetensors) "
                          "has shape [4, 128], but the model and quantization_config (bits=4, group_size=64, "
                          "rank=8) imply [2, 128]"),
    "group size that fits no layer": (dict(edit_config=setter(group_size=48)),
                                      "GlowQ group_size=48 cannot be used for layer "
                                      "'model.layers.0.self_attn.q_proj': in_features=128 is not a multiple of "
                                      "group_size=48"),
    "undeclared factors": (dict(edit_config=undeclare_first_unit),
                           "GlowQ checkpoint (in model.safetensors) has low-rank factors for unit "
                           "'model.layers.0.self_attn.qkv_proj', which quantization_config.lowrank_units does "
                           "not list"),
    "unknown unit": (dict(edit_config=lambda c: c["lowrank_units"].append("model.layers.9.mlp.down_proj")),
                     "GlowQ quantization_config.lowrank_units lists 'model.layers.9.mlp.down_proj', which is not "
                     "a quantized unit of this model"),
    "format version": (dict(edit_config=setter(format_version=99)),
                       "GlowQ format_version 99 is not supported by this version of vllm-glowq"),
    "bits": (dict(edit_config=setter(bits=8)), "GlowQ bits=8 is not supported"),
    "missing config key": (dict(edit_config=lambda c: c.pop("rank")),
                           "GlowQ quantization_config is missing keys: ['rank']"),
    "truncated file": (dict(edit_folder=truncate), "model.safetensors is truncated: its header describes"),
    "not safetensors": (dict(edit_folder=garble), "model.safetensors is not a readable safetensors file: its header "
                                                   "is cut off"),
}


def make_broken(source: Path, target: Path, edit_tensors=None, edit_config=None, edit_folder=None) -> Path:
    copy_checkpoint(source, target, edit_tensors=edit_tensors, edit_config=edit_config)
    if edit_folder is not None:
        edit_folder(target)
    return target


@pytest.fixture(scope="module")
def checkpoint(glowq_checkpoints) -> Path:
    return glowq_checkpoints.get("llama")


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoint_is_refused_with_one_message(checkpoint, tmp_path, case):
    edit, expected = BROKEN[case]
    broken = make_broken(checkpoint, tmp_path / "broken", **edit)
    with pytest.raises(GlowQFormatError) as error:
        check_checkpoint(broken)
    assert expected in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-module", "llama-partial"])
def test_intact_checkpoints_pass_and_match_the_written_tensors(glowq_checkpoints, name):
    """The validator's expectation equals exactly what the calibrator wrote, for biases (qwen2),
    per-module factors and GlowQ-S subsets too."""
    folder = glowq_checkpoints.get(name)
    model_config, glowq = check_checkpoint(folder)
    with safe_open(str(folder / "model.safetensors"), framework="pt") as handle:
        written = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    expected = {key: spec.shape for key, spec in expected_tensors(model_config, glowq).items()}
    assert expected == written


def test_sharded_checkpoint_with_a_wrong_index_is_refused(checkpoint, tmp_path):
    broken = copy_checkpoint(checkpoint, tmp_path / "sharded")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"}}
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(GlowQFormatError, match="places tensor 'model.embed_tokens.weight' in "
                                                "model-00002-of-00002.safetensors, but model.safetensors holds it"):
        check_checkpoint(broken)


def test_validation_reads_headers_only(checkpoint, tmp_path):
    """A checkpoint whose tensor bytes are all zero (valid headers) passes: no data is read."""
    zeroed = copy_checkpoint(checkpoint, tmp_path / "zeroed")
    file = zeroed / "model.safetensors"
    data = bytearray(file.read_bytes())
    header_end = 8 + int.from_bytes(data[:8], "little")
    data[header_end:] = bytes(len(data) - header_end)
    file.write_bytes(bytes(data))
    check_checkpoint(zeroed)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_validator_quantizes_the_linears_the_calibrator_does(arch):
    model = meta_model(build_config(arch, "tiny", torch.float32).to_dict())
    assert sorted(quantizable_linears(model)) == sorted(linear_names(model))


def test_validating_a_llama_3_8b_shaped_config_takes_under_a_few_seconds():
    """The front end runs this before every engine start; the model is built on the meta device."""
    config = build_config("llama", "llama3-8b", torch.bfloat16).to_dict()
    start = time.perf_counter()
    linears = quantizable_linears(meta_model(config))
    assert len(linears) == 32 * 7 and time.perf_counter() - start < 5
