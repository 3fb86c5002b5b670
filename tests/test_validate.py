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
from transformers import AutoConfig
from vllm_helpers import copy_checkpoint

from offline_calibrate.architectures import decoder_layers, spec_for
from offline_calibrate.moe import block_names
from offline_calibrate.reference import linear_names
from offline_calibrate.tiny import ARCHITECTURES, build_config
from vllm_glowq.format import MOE_FORMAT_VERSION, GlowQConfig, GlowQFormatError
from vllm_glowq.validate import check_checkpoint, checkpoint_linears, expected_tensors, meta_model

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


# ----- Mixture-of-Experts checkpoints (tiny Qwen3-MoE unless named) ----------------------------

EXPERT_A = "model.layers.0.mlp.experts.2.up_proj.glowq_A"
SHARED_B = "model.layers.1.mlp.experts.0.gate_proj.glowq_B"  # the experts' one gate/up B
EXPERTS_UNIT = "model.layers.1.mlp.experts.gate_up_proj"


def drop_expert_a(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[EXPERT_A]


def reshape_shared_b(tensors: dict[str, torch.Tensor]) -> None:
    rank, k = tensors[SHARED_B].shape
    tensors[SHARED_B] = torch.zeros(rank + 1, k, dtype=tensors[SHARED_B].dtype)


def move_shared_b(tensors: dict[str, torch.Tensor], to: str) -> None:
    tensors[to] = tensors.pop(SHARED_B)


def drop_unit(unit: str):
    return lambda config: config["lowrank_units"].remove(unit)


def quantize_router(config: dict) -> None:
    config["modules_to_not_convert"].remove("model.layers.0.mlp.gate")


def keep_one_expert(config: dict) -> None:
    config["modules_to_not_convert"].append("model.layers.0.mlp.experts.1.down_proj")


# case -> (recipe, edit of a copy of its checkpoint, the start of the error message)
MOE_BROKEN: dict[str, tuple[str, dict, str]] = {
    "missing expert A": ("qwen3_moe", dict(edit_tensors=drop_expert_a),
                         f"GlowQ checkpoint is missing tensor {EXPERT_A!r}"),
    "shared B of the wrong shape": ("qwen3_moe", dict(edit_tensors=reshape_shared_b),
                                    f"GlowQ checkpoint tensor {SHARED_B!r} (in model.safetensors) has shape [9, 128], "
                                    "but the model and quantization_config (bits=4, group_size=32, rank=8) imply "
                                    "[8, 128]"),
    "shared B under another expert": (
        "qwen3_moe", dict(edit_tensors=lambda t: move_shared_b(t, SHARED_B.replace("experts.0.", "experts.3."))),
        f"GlowQ checkpoint has an unexpected tensor {SHARED_B.replace('experts.0.', 'experts.3.')!r} (in "
        f"model.safetensors): unit {EXPERTS_UNIT!r} stores its one B as {SHARED_B!r}"),
    "shared expert's B of its own": (
        "qwen2_moe",
        dict(edit_tensors=lambda t: move_shared_b(t, "model.layers.1.mlp.shared_expert.gate_proj.glowq_B")),
        "GlowQ checkpoint has an unexpected tensor 'model.layers.1.mlp.shared_expert.gate_proj.glowq_B' (in "
        f"model.safetensors): unit {EXPERTS_UNIT!r} stores its one B as {SHARED_B!r}"),
    "missing shared expert A": (
        "qwen2_moe", dict(edit_tensors=lambda t: t.pop("model.layers.0.mlp.shared_expert.up_proj.glowq_A")),
        "GlowQ checkpoint is missing tensor 'model.layers.0.mlp.shared_expert.up_proj.glowq_A'"),
    "mis-shaped Mixtral down B": (
        "mixtral", dict(edit_tensors=lambda t: t.update({"model.layers.0.block_sparse_moe.experts.1.w2.glowq_B":
                                                         torch.zeros(8, 128, dtype=torch.float16)})),
        "GlowQ checkpoint tensor 'model.layers.0.block_sparse_moe.experts.1.w2.glowq_B' (in model.safetensors) has "
        "shape [8, 128], but the model and quantization_config (bits=4, group_size=32, rank=8) imply [8, 64]"),
    "undeclared experts unit": ("qwen3_moe", dict(edit_config=drop_unit(EXPERTS_UNIT)),
                                f"GlowQ checkpoint (in model.safetensors) has low-rank factors for unit "
                                f"{EXPERTS_UNIT!r}, which quantization_config.lowrank_units does not list"),
    "undeclared expert down unit": ("qwen3_moe", dict(edit_config=drop_unit("model.layers.0.mlp.experts.3.down_proj")),
                                    "GlowQ checkpoint (in model.safetensors) has low-rank factors for unit "
                                    "'model.layers.0.mlp.experts.3.down_proj', which "
                                    "quantization_config.lowrank_units does not list"),
    "expert units in version 1": ("qwen3_moe", dict(edit_config=setter(format_version=1)),
                                  "GlowQ format_version 1 has no Mixture-of-Experts units, but lowrank_units lists "
                                  "'model.layers.0.mlp.experts.gate_up_proj'"),
    "experts in version 1": ("qwen3_moe-rtn", dict(edit_config=setter(format_version=1)),
                             "GlowQ format_version 1 has no Mixture-of-Experts layers, but this model has experts "
                             "(model.layers.0.mlp.experts); MoE checkpoints are format_version 2"),
    "quantized router": ("qwen3_moe", dict(edit_config=quantize_router),
                         "GlowQ quantization_config.modules_to_not_convert does not list the router "
                         "'model.layers.0.mlp.gate'; routers stay in full precision"),
    "one expert kept in full precision": ("qwen3_moe", dict(edit_config=keep_one_expert),
                                          "GlowQ quantization_config.modules_to_not_convert keeps "
                                          "'model.layers.0.mlp.experts.1.down_proj' in full precision but quantizes "
                                          "other experts of 'model.layers.0.mlp'"),
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


@pytest.mark.parametrize("case", sorted(MOE_BROKEN))
def test_broken_moe_checkpoint_is_refused_with_one_message(glowq_checkpoints, tmp_path, case):
    recipe, edit, expected = MOE_BROKEN[case]
    broken = make_broken(glowq_checkpoints.get(recipe), tmp_path / "broken", **edit)
    with pytest.raises(GlowQFormatError) as error:
        check_checkpoint(broken)
    assert expected in str(error.value), str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("name", ["llama", "qwen2", "llama-module", "llama-partial", "qwen3_moe", "qwen2_moe",
                                  "mixtral", "qwen3_moe-module", "mixtral-partial", "qwen3_moe-rtn"])
def test_intact_checkpoints_pass_and_match_the_written_tensors(glowq_checkpoints, name):
    """The validator's expectation equals exactly what the calibrator wrote, for biases (qwen2),
    per-module factors and GlowQ-S subsets too, and for MoE models: every expert's tensors,
    the shared B under expert 0's gate, the shared expert (qwen2_moe), Mixtral's block name,
    routers in full precision and plain int4 experts (rank 0)."""
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
    """The calibrator's linears (linear_names) and, in MoE layers, its per-expert projections
    and routers (offline_calibrate.moe), found by the validator on a meta-device model."""
    model = meta_model(build_config(arch, "tiny", torch.float32).to_dict())
    spec = spec_for(model.config)
    experts, routers = [], []
    for index, layer in enumerate(decoder_layers(model, spec)):
        if spec.is_moe_layer(layer):
            names = block_names(layer, f"{spec.layers_path}.{index}", spec)
            experts += [names.projection(e, which) for e in range(names.num_experts) for which in range(3)]
            routers += [f"{names.prefix}.{router}" for router in spec.experts.full_precision]
    linears = checkpoint_linears(model)
    assert sorted(linears.quantizable) == sorted(linear_names(model) + experts)
    assert sorted(linears.routers) == sorted(routers)
    assert bool(experts) == (spec.experts is not None)


def test_moe_model_without_checkpoint_names_is_refused():
    """transformers builds fused experts for more MoE families than the format names (OLMoE)."""
    config = AutoConfig.for_model("olmoe", hidden_size=64, intermediate_size=32, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
                                  vocab_size=128, eos_token_id=None, pad_token_id=None)
    with pytest.raises(GlowQFormatError, match="model_type 'olmoe' has Mixture-of-Experts layers "
                                                r"\(model.layers.0.mlp.experts\) that the GlowQ format has no "
                                                "checkpoint names for"):
        checkpoint_linears(meta_model(config.to_dict()))


def test_validating_a_llama_3_8b_shaped_config_takes_under_a_few_seconds():
    """The front end runs this before every engine start; the model is built on the meta device."""
    config = build_config("llama", "llama3-8b", torch.bfloat16).to_dict()
    start = time.perf_counter()
    linears = checkpoint_linears(meta_model(config)).quantizable
    assert len(linears) == 32 * 7 and time.perf_counter() - start < 5


def test_validating_a_qwen3_30b_a3b_shaped_config_takes_under_a_few_seconds():
    """48 layers of 128 experts: 18,432 expert projections in 6,288 units, each expected by name."""
    config = AutoConfig.for_model("qwen3_moe", hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                                  num_experts=128, num_experts_per_tok=8, num_hidden_layers=48, num_attention_heads=32,
                                  num_key_value_heads=4, head_dim=128, vocab_size=151936).to_dict()
    start = time.perf_counter()
    linears = checkpoint_linears(meta_model(config))
    glowq = GlowQConfig(group_size=128, rank=64, format_version=MOE_FORMAT_VERSION,
                        modules_to_not_convert=sorted(linears.routers))
    glowq.lowrank_units = sorted({glowq.unit_of(name) for name in linears.quantizable})
    expected = expected_tensors(config, glowq)
    assert len(linears.quantizable) == 48 * (128 * 3 + 4) and len(glowq.lowrank_units) == 48 * (2 + 1 + 128)
    assert "model.layers.47.mlp.experts.0.gate_proj.glowq_B" in expected
    assert "model.layers.47.mlp.experts.1.gate_proj.glowq_B" not in expected
    assert time.perf_counter() - start < 5
