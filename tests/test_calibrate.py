"""glowq-calibrate end to end on tiny random models: the checkpoint's contents, the in-memory
quantized model against the checkpoint read back, determinism, and modules whose in-features
do not fit the group size."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.calibrate import load_report
from offline_calibrate.data import calibration_windows
from offline_calibrate.evaluate import mean_nll
from offline_calibrate.loading import load_tokenizer
from offline_calibrate.reference import load_reference_model
from offline_calibrate.source import resolve_source
from offline_calibrate.tiny import make_random_model
from vllm_glowq.format import GlowQConfig

SMALL = dict(group_size=32, rank=8, samples=4, seq_len=64)


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("m") / "llama", "llama")


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("m") / "qwen2", "qwen2")


def tensor_shapes(checkpoint: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return {k: (tuple(f.get_slice(k).get_shape()), f.get_tensor(k).dtype) for k in f.keys()}


def test_checkpoint_is_a_complete_model_folder(tiny_llama, tmp_path):
    out = calibrate(tiny_llama, tmp_path / "ckpt", CalibrationOptions(**SMALL))
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "glowq_report.json", "tokenizer.json"} <= files
    quant = GlowQConfig.from_dict(json.loads((out / "config.json").read_text())["quantization_config"])
    assert (quant.group_size, quant.rank, quant.share, quant.sym) == (32, 8, "group", False)
    assert len(quant.lowrank_units) == 2 * 4  # qkv, o, gate_up, down per layer
    shapes = tensor_shapes(out)
    prefix = "model.layers.0"
    # hidden 128, 4 heads x 32 (q 128), 2 kv heads (k, v 64), intermediate 256
    assert shapes[f"{prefix}.self_attn.q_proj.qweight"] == ((16, 128), torch.int32)
    assert shapes[f"{prefix}.self_attn.k_proj.scales"] == ((4, 64), torch.float16)
    assert shapes[f"{prefix}.self_attn.v_proj.qzeros"] == ((4, 8), torch.int32)
    assert shapes[f"{prefix}.self_attn.qkv_proj.glowq_B"] == ((8, 128), torch.float16)
    assert shapes[f"{prefix}.self_attn.k_proj.glowq_A"] == ((64, 8), torch.float16)
    assert shapes[f"{prefix}.mlp.gate_up_proj.glowq_B"] == ((8, 128), torch.float16)
    assert shapes[f"{prefix}.mlp.down_proj.glowq_B"] == ((8, 256), torch.float16)
    assert f"{prefix}.self_attn.q_proj.weight" not in shapes
    report = json.loads((out / "glowq_report.json").read_text())
    for unit in report["units"]:
        assert unit["whitened_error_after"] < unit["whitened_error_before"]
    assert {"load", "forward_statistics", "quantize_factorize", "write"} <= set(report["timings_s"])
    assert report["peak_memory_bytes"]["cpu_rss"] > 0


def heldout_windows(source: Path, options: CalibrationOptions) -> torch.Tensor:
    """The held-out windows `--restore auto` measured on (the same seed draws the same)."""
    vocab = json.loads((source / "config.json").read_text())["vocab_size"]
    return calibration_windows(options.dataset, load_tokenizer(resolve_source(source)), vocab, options.samples,
                               options.seq_len, options.seed, options.heldout_samples)[1]


def assert_curve_ends_match_the_checkpoints(source: Path, tmp_path: Path, rel: float) -> dict:
    """`--restore auto` measures its curve on the quantized model in memory, one layer at a time
    (offline_calibrate/heldout.py); at k = 0 and k = all units it must give the perplexity of the
    checkpoints restoring none and all units, read back by the reference forward."""
    options = CalibrationOptions(**SMALL, restore="auto", heldout_samples=2)
    curve = load_report(calibrate(source, tmp_path / "auto", options))["selection"]["curve"]
    windows = heldout_windows(source, options)
    models = {}
    for point, restore in ((curve[0], "0"), (curve[-1], "all")):
        models[restore] = load_reference_model(calibrate(source, tmp_path / restore,
                                                         CalibrationOptions(**SMALL, restore=restore)))
        assert math.exp(mean_nll(models[restore], windows)) == pytest.approx(point["perplexity"], rel=rel), restore
    assert curve[0]["perplexity"] != curve[-1]["perplexity"]
    return models


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_in_memory_quantized_model_is_the_checkpoint(arch, tiny_llama, tiny_qwen2, tmp_path):
    source = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    models = assert_curve_ends_match_the_checkpoints(source, tmp_path, rel=1e-6)
    if arch == "qwen2":
        assert models["all"].model.layers[0].self_attn.q_proj.bias is not None


def test_correction_reduces_the_output_error(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 259, (2, 64), generator=torch.Generator().manual_seed(1))
    logits = {}
    for restore in ("all", "0"):
        out = calibrate(tiny_llama, tmp_path / restore, CalibrationOptions(**SMALL, restore=restore))
        with torch.no_grad():
            logits[restore] = load_reference_model(out)(ids).logits
            reference = AutoModelForCausalLM.from_pretrained(tiny_llama)(ids).logits
    assert (logits["all"] - reference).norm() < (logits["0"] - reference).norm()
    assert not torch.allclose(logits["all"], reference, atol=1e-3)  # the quantization did happen


def test_same_seed_gives_the_same_bytes(tiny_llama, tmp_path):
    def digest(out: Path) -> str:
        return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()

    options = CalibrationOptions(**SMALL, seed=7)
    first = digest(calibrate(tiny_llama, tmp_path / "a", options))
    second = digest(calibrate(tiny_llama, tmp_path / "b", options))
    other = digest(calibrate(tiny_llama, tmp_path / "c", CalibrationOptions(**SMALL, seed=8)))
    assert first == second != other


@pytest.mark.parametrize(
    ("overrides", "factor_tensors"),
    [(dict(share="module"), {"q_proj.glowq_B", "k_proj.glowq_B", "v_proj.glowq_B", "o_proj.glowq_B"}),
     (dict(rank=0), set())],
)
def test_baselines_use_the_same_format(tiny_llama, tmp_path, overrides, factor_tensors):
    out = calibrate(tiny_llama, tmp_path / "ckpt", CalibrationOptions(**{**SMALL, **overrides}))
    names = set(tensor_shapes(out))
    attn = "model.layers.0.self_attn."
    assert {n[len(attn):] for n in names if n.startswith(attn) and n.endswith("glowq_B")} == factor_tensors
    assert f"{attn}q_proj.qweight" in names
    load_reference_model(out)  # reads back


@pytest.mark.parametrize(
    ("intermediate", "reason"),
    [(200, "in_features=200 is not a multiple of group_size=32"),
     (212, "in_features=212 is not a multiple of 8 (int4 packing)")],
)
def test_in_features_that_do_not_fit_stay_full_precision(tmp_path, intermediate, reason):
    """down_proj reads `intermediate` features: it stays full precision, is listed in
    modules_to_not_convert with the reason in the report, and carries no factors; the other
    modules are quantized as usual (gate/up with 212 outputs use padded qzeros)."""
    from offline_calibrate.tiny import SHAPES

    source = make_random_model(tmp_path / "src", shape={**SHAPES["tiny"], "intermediate_size": intermediate})
    out = calibrate(source, tmp_path / "ckpt", CalibrationOptions(**SMALL))
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    report = json.loads((out / "glowq_report.json").read_text())
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert quant["modules_to_not_convert"] == down
    assert all(report["skipped_modules"][m] == reason for m in down)
    names = tensor_shapes(out)
    for module in down:
        assert f"{module}.weight" in names and f"{module}.qweight" not in names
        assert module not in quant["lowrank_units"]
    assert names["model.layers.0.mlp.up_proj.qzeros"][0] == (4, -(-intermediate // 8))
    assert len(quant["lowrank_units"]) == 2 * 3
    load_reference_model(out)
