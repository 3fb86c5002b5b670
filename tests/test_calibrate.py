"""glowq-calibrate end to end on tiny random models: the checkpoint's contents, read-back
logits, determinism, and modules whose in-features do not fit the group size."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.calibrate import run_calibration
from offline_calibrate.pipeline import build_quantized_model
from offline_calibrate.reference import load_reference_model
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


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_read_back_checkpoint_gives_the_in_memory_logits(arch, tiny_llama, tiny_qwen2, tmp_path):
    source = {"llama": tiny_llama, "qwen2": tiny_qwen2}[arch]
    model, _, result, config, _ = run_calibration(str(source), CalibrationOptions(**SMALL), keep_dequantized=True)
    in_memory = build_quantized_model(model, result, config.lowrank_units)
    out = calibrate(source, tmp_path / "ckpt", CalibrationOptions(**SMALL))
    read_back = load_reference_model(out)
    ids = torch.randint(3, 259, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected, got = in_memory(ids).logits, read_back(ids).logits
        unquantized = model(ids).logits
    assert torch.equal(got, expected)
    assert not torch.allclose(got, unquantized, atol=1e-3)  # the quantization did happen
    if arch == "qwen2":
        assert read_back.model.layers[0].self_attn.q_proj.bias is not None


def test_correction_reduces_the_output_error(tiny_llama):
    model, _, result, config, _ = run_calibration(str(tiny_llama), CalibrationOptions(**SMALL), keep_dequantized=True)
    ids = torch.randint(3, 259, (2, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        reference = model(ids).logits
        corrected = build_quantized_model(model, result, config.lowrank_units)(ids).logits
        plain = build_quantized_model(model, result, [])(ids).logits
    assert (corrected - reference).norm() < (plain - reference).norm()


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
