"""Broken or foreign checkpoints fail to load with one clear GlowQ message.

Every case is a real `vllm.LLM(...)` call on a real (edited) checkpoint; all of them run in
one engine subprocess, each attempt reporting the exception the caller received. Config and
tensor problems alike surface while vLLM builds its config, before an engine starts (the
plugin's front-end hook runs the checkpoint validator; vLLM wraps the error in its pydantic
ValidationError, whose text is ours). The same checkpoints through `vllm serve`:
test_serve_errors.py. The last tests check registration and config parsing without an engine
(the fast tier).
"""

from __future__ import annotations

import pytest
import torch
from vllm_helpers import copy_checkpoint, run_load_attempts

MISSING = "model.layers.0.mlp.up_proj.glowq_A"
RESHAPED = "model.layers.1.self_attn.o_proj.glowq_B"


def _drop_factor(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[MISSING]


def _wrong_rank(tensors: dict[str, torch.Tensor]) -> None:
    rank, k = tensors[RESHAPED].shape
    tensors[RESHAPED] = torch.zeros(rank + 1, k, dtype=tensors[RESHAPED].dtype)


def _undeclare_first_unit(config: dict) -> None:
    config["lowrank_units"] = config["lowrank_units"][1:]


def _set(key: str, value):
    def edit(config: dict) -> None:
        config[key] = value

    return edit


# case name -> (how to break a copy of the tiny Llama checkpoint, phrases the error must contain)
CASES = {
    "missing factor": (dict(edit_tensors=_drop_factor), ["GlowQ checkpoint is missing tensor", repr(MISSING)]),
    "wrong shape": (dict(edit_tensors=_wrong_rank), [repr(RESHAPED), "has shape [9, 128]", "imply [8, 128]"]),
    "format version": (dict(edit_config=_set("format_version", 99)), ["format_version 99 is not supported"]),
    "bits": (dict(edit_config=_set("bits", 8)), ["bits=8 is not supported"]),
    "group size": (dict(edit_config=_set("group_size", 48)), ["group_size=48 cannot be used", "in_features=128"]),
    "undeclared factors": (dict(edit_config=_undeclare_first_unit), ["has low-rank factors for unit",
                                                                     "lowrank_units does not list"]),
}


@pytest.fixture(scope="module")
def attempts(glowq_checkpoints, tmp_path_factory) -> dict[str, dict]:
    source = glowq_checkpoints.get("llama")
    root = tmp_path_factory.mktemp("broken")
    models = {name: str(copy_checkpoint(source, root / name.replace(" ", "-"), **edit))
              for name, (edit, _) in CASES.items()}
    jobs = {name: {"model": path, "dtype": "float32"} for name, path in models.items()}
    jobs["not glowq"] = {"model": str(glowq_checkpoints.base("llama")), "dtype": "float32", "quantization": "glowq"}
    jobs["intact"] = {"model": str(source), "dtype": "float32", "quantization": "glowq"}
    results = run_load_attempts(list(jobs.values()))
    return dict(zip(jobs, results))


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_checkpoint_fails_with_clear_error(attempts, case):
    outcome = attempts[case]
    assert "error" in outcome, f"{case}: the checkpoint loaded"
    message = outcome["error"]["message"]
    for phrase in CASES[case][1]:
        assert phrase in message, message
    assert "Traceback" not in message and "AssertionError" not in outcome["error"]["type"]


@pytest.mark.slow
def test_quantization_flag_on_plain_checkpoint_is_refused(attempts):
    message = attempts["not glowq"]["error"]["message"]
    assert "--quantization glowq was given" in message and "not a GlowQ checkpoint" in message, message


@pytest.mark.slow
def test_intact_checkpoint_loads_with_the_flag(attempts):
    """The control: the same loader accepts the unbroken checkpoint (flag given explicitly)."""
    assert attempts["intact"] == {"ok": True}


# ----- without an engine: registration and config parsing (fast tier) ----------------------


def test_register_is_idempotent_and_cheap():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    import vllm_glowq
    from vllm_glowq.config import GlowQQuantConfig

    vllm_glowq.register()
    vllm_glowq.register()
    assert QUANTIZATION_METHODS.count("glowq") == 1
    assert get_quantization_config("glowq") is GlowQQuantConfig


def test_installed_vllm_is_in_the_supported_range():
    from vllm_glowq import compat

    assert compat.unsupported_vllm_message() is None, compat.SUPPORTED_VLLM


@pytest.mark.parametrize(
    ("edit", "phrase"),
    [({"format_version": 3}, "format_version 3 is not supported"), ({"quant_method": "gptq"}, "not a GlowQ checkpoint"),
     ({"rank": -1}, "rank=-1 is invalid")],
)
def test_from_config_raises_the_format_message(edit, phrase):
    from vllm_glowq.config import GlowQQuantConfig
    from vllm_glowq.format import GlowQConfig, GlowQFormatError

    raw = {**GlowQConfig(group_size=32, rank=8).to_dict(), **edit}
    with pytest.raises(GlowQFormatError, match=phrase):
        GlowQQuantConfig.from_config(raw)
