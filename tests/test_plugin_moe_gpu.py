"""GlowQ Mixture-of-Experts checkpoints through vLLM on a CUDA GPU, against the fp32 reference: the
experts on vLLM's Marlin MoE kernels with the correction beside them (vllm_glowq/moe_marlin.py,
the default) and on the project's own MoE kernels (vllm_glowq/moe_triton.py, VLLM_GLOWQ_KERNEL=glowq).

A tiny random Qwen3-MoE whose expert shapes the Marlin MoE kernels take (hidden 512, 8 experts
of intermediate size 128, top-2, 2 layers; group size 128, rank 16), in bf16, eager and with
torch.compile + CUDA graphs (vLLM's default), symmetric codes (asymmetric ones are covered by
tests/test_moe_marlin.py's layer tests). Tolerances as in tests/test_plugin_gpu.py: the
unquantized model's own bf16 noise (vLLM-bf16 against HF-fp32) times 2.5 plus floors;
a checkpoint whose experts' A are zeroed must miss that bar clearly (the correction is what
makes the difference); a rank-0 checkpoint (plain int4 experts, Marlin alone) is held to the
same bar against its own reference. Every engine must hold the experts as repacked int4 codes
(no dense fallback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import vllm_helpers
from vllm_glowq import moe_marlin
from vllm_helpers import (
    ENGINE_TIMEOUT_S,
    GPU_SHAPE,
    PROMPTS,
    agreeing_tokens,
    bf16_noise,
    cached_runs,
    compare_outputs,
    copy_checkpoint,
    greedy_mismatches,
    noise_tolerance,
    reference_models,
    engine_env,
    report_summary,
    run_job_script,
    zero_expert_factor_a,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (vLLM's Marlin MoE kernels)"),
]

SHAPE = dict(GPU_SHAPE, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=128)
INIT_STD = 0.1  # as tests/test_plugin_gpu.py: bf16 noise small enough for a tight bar
CALIBRATION = dict(group_size=128, rank=16, samples=4, seq_len=64, dataset="random", seed=0)
# name -> (enforce_eager, VLLM_GLOWQ_KERNEL, VLLM_GLOWQ_MOE_FACTORS): Marlin MoE (auto) with the
# shipped factors or int8 ones, or the project's MoE kernels (glowq)
MODES = {"eager": (True, "auto", "auto"), "compiled": (False, "auto", "auto"),
         "compiled-int8": (False, "auto", "int8"), "compiled-own": (False, "glowq", "auto")}
# with the unquantized model and the two zeroed controls nine engines, about a minute each
# (asymmetric codes: the layer tests of tests/test_moe_marlin.py and tests/test_moe_triton.py)
ENGINES = [("sym", "eager"), ("sym", "compiled"), ("rtn", "compiled"), ("sym", "compiled-int8"),
           ("sym", "compiled-own"), ("rtn", "compiled-own")]
INT8_FACTORS_LOG = "factors A13, B2 and A2 are held as int8 codes"
OWN_KERNELS_LOG = "MoE experts run the project's own int4 MoE kernels"
FALLBACK_WARNING = "the experts use dense dequantized weights"
SUMMARY: dict[str, Any] = {}  # printed at the end (pytest -s) and written to $GLOWQ_GPU_REPORT


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    from offline_calibrate import CalibrationOptions, calibrate
    from offline_calibrate.tiny import make_random_model

    root = tmp_path_factory.mktemp("glowq-moe-gpu")
    paths = {"base": make_random_model(root / "base", "qwen3_moe", SHAPE, init_std=INIT_STD)}
    for name, extra in (("sym", dict(sym=True)), ("rtn", dict(sym=True, rank=0))):
        paths[name] = calibrate(paths["base"], root / name, CalibrationOptions(**{**CALIBRATION, **extra}))
    paths["sym-zeroed"] = copy_checkpoint(paths["sym"], root / "sym-zeroed", edit_tensors=zero_expert_factor_a)
    return paths


@pytest.fixture(scope="module")
def engine(checkpoints):
    def run(name: str, mode: str) -> dict[str, Any]:
        eager, kernel, factors = MODES[mode]
        env = engine_env(allow_pickled_functions=True)
        env["VLLM_GLOWQ_KERNEL"], env["VLLM_GLOWQ_MOE_FACTORS"] = kernel, factors
        job = {"model": str(checkpoints[name]), "prompts": PROMPTS, "dtype": "bfloat16", "max_tokens": 12,
               "enforce_eager": eager, "inspect_layers": True}
        return run_job_script(Path(vllm_helpers.__file__).resolve(), job, env, ENGINE_TIMEOUT_S)

    return cached_runs(run)


@pytest.fixture(scope="module")
def reference(checkpoints):
    """fp32 models on the CPU (the zeroed control is compared with its source's)."""
    return reference_models(checkpoints)


@pytest.fixture(scope="module")
def noise(engine, reference) -> dict[str, float]:
    SUMMARY["bf16 noise (unquantized MoE, eager)"] = stats = bf16_noise(reference("base"),
                                                                        engine("base", "eager")["outputs"])
    return stats


@pytest.fixture(scope="module", autouse=True)
def _report_summary():
    yield
    report_summary(SUMMARY, "GlowQ MoE GPU check summary")


def _experts(layers: dict[str, list[str]]) -> dict[str, list[str]]:
    return {name: params for name, params in layers.items() if name.endswith("routed_experts")}


@pytest.mark.parametrize("name, mode", ENGINES)
def test_moe_checkpoint_matches_reference(name, mode, engine, reference, noise):
    result = engine(name, mode)
    comparison = compare_outputs(reference(name), result["outputs"])
    tolerance = noise_tolerance(noise)
    same, total = agreeing_tokens(comparison)
    SUMMARY[f"{name}/{mode}"] = {"mean_abs_diff": comparison["mean_abs_diff"], "max_abs_diff": comparison["max_abs_diff"],
                                 "tolerance": tolerance, "greedy_agreeing_before_first_divergence": f"{same}/{total}"}
    assert comparison["mean_abs_diff"] < tolerance["mean"], SUMMARY[f"{name}/{mode}"]
    assert comparison["max_abs_diff"] < tolerance["max"], SUMMARY[f"{name}/{mode}"]
    assert greedy_mismatches(comparison, near_tie=2 * noise["max"]) == []


@pytest.mark.parametrize("name, mode", ENGINES)
def test_experts_run_on_int4_codes(name, mode, engine):
    result = engine(name, mode)
    assert FALLBACK_WARNING not in result["log"], "the experts fell back to dense weights"
    assert (OWN_KERNELS_LOG in result["log"]) == (mode == "compiled-own"), "not the MoE kernels asked for"
    if mode == "compiled-int8":
        assert INT8_FACTORS_LOG in result["log"], "the factors were not held in int8"
    experts = _experts(result["layers"])
    assert len(experts) == SHAPE["num_hidden_layers"]
    for layer, params in experts.items():
        assert {"w13_qweight", "w2_qweight", "w13_scales", "w2_scales"} <= set(params), (layer, params)
        assert not {"w13_dense", "w2_dense"} & set(params), (layer, params)
        # with moe_marlin.FOLD_INTO_CODES the A factors live in Marlin's codes: only B stays
        folded = mode != "compiled-own" and moe_marlin.FOLD_INTO_CODES
        factors = {"w13_glowq_B", "w2_glowq_B"} | (set() if folded else {"w13_glowq_A", "w2_glowq_A"})
        assert (factors <= set(params)) == (name != "rtn"), (layer, params)
        if folded:
            assert not {"w13_glowq_A", "w2_glowq_A"} & set(params), (layer, params)


@pytest.mark.parametrize("mode", ["compiled", "compiled-own"])
def test_zeroed_expert_factors_are_caught(mode, engine, reference, noise):
    """Negative control: the experts without their correction clearly miss the bar."""
    comparison = compare_outputs(reference("sym"), engine("sym-zeroed", mode)["outputs"])
    SUMMARY[f"sym-zeroed/{mode} (negative control)"] = {"mean_abs_diff": comparison["mean_abs_diff"],
                                                         "max_abs_diff": comparison["max_abs_diff"]}
    assert comparison["mean_abs_diff"] > 2 * noise_tolerance(noise)["mean"], comparison["mean_abs_diff"]
