"""glowq-calibrate on tiny random Mixture-of-Experts models (transformers 5 fused experts):
the checkpoint's names and units, the read-back reference, the baselines in the same format,
experts without calibration tokens, and the errors. No vLLM engine here (test_plugin_moe.py)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.cli import calibrate_main
from offline_calibrate.loading import load_config
from offline_calibrate.moe import correction_parameters
from offline_calibrate.preflight import estimated_checkpoint_bytes, model_linears
from offline_calibrate.reference import load_reference_model
from offline_calibrate.source import resolve_source
from offline_calibrate.tiny import make_random_model

SMALL = dict(group_size=32, rank=8, samples=4, seq_len=64)
ARCHS = ("qwen3_moe", "qwen2_moe", "mixtral")
# per architecture: the block's checkpoint name and an expert's gate, up, down names
NAMES = {"qwen3_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "qwen2_moe": ("mlp", "gate_proj", "up_proj", "down_proj"),
         "mixtral": ("block_sparse_moe", "w1", "w3", "w2")}
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-src")
    return {arch: make_random_model(root / arch, arch) for arch in ARCHS}


@pytest.fixture(scope="module")
def checkpoints(sources, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe-ckpt")
    return {arch: calibrate(src, root / arch, CalibrationOptions(**SMALL)) for arch, src in sources.items()}


def shapes(checkpoint: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def quantization_config(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "config.json").read_text())["quantization_config"]


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoint_holds_one_gate_up_B_per_moe_layer(arch, checkpoints):
    block, gate, up, down = NAMES[arch]
    names = shapes(checkpoints[arch])
    quant = quantization_config(checkpoints[arch])
    assert quant["format_version"] == 2
    for layer in range(2):
        prefix = f"model.layers.{layer}.{block}"
        gate_up_bs = [n for n in names if n.startswith(prefix) and n.endswith("glowq_B") and f".{down}." not in n]
        assert gate_up_bs == [f"{prefix}.experts.0.{gate}.glowq_B"]  # one B for all experts' gate/up
        assert names[gate_up_bs[0]] == (8, 128)
        unit = f"{prefix}.experts.{'w13' if gate == 'w1' else 'gate_up_proj'}"
        assert unit in quant["lowrank_units"]
        for e in range(4):  # names vLLM's expert loader routes: experts.{e}.{projection}.*
            assert names[f"{prefix}.experts.{e}.{gate}.qweight"] == (16, 64)
            assert names[f"{prefix}.experts.{e}.{up}.glowq_A"] == (64, 8)
            assert names[f"{prefix}.experts.{e}.{down}.qweight"] == (8, 128)
            assert names[f"{prefix}.experts.{e}.{down}.glowq_B"] == (8, 64)
            assert f"{prefix}.experts.{e}.{down}" in quant["lowrank_units"]
        assert names[f"{prefix}.gate.weight"] == (4, 128)  # the router stays full precision
        assert f"{prefix}.gate" in quant["modules_to_not_convert"]
    assert not any(n.endswith(("experts.gate_up_proj", "experts.down_proj")) for n in names)


def test_shared_expert_joins_the_experts_unit(checkpoints):
    names = shapes(checkpoints["qwen2_moe"])
    prefix = "model.layers.0.mlp.shared_expert"
    assert names[f"{prefix}.gate_proj.glowq_A"] == (128, 8)
    assert f"{prefix}.gate_up_proj.glowq_B" not in names and f"{prefix}.gate_proj.glowq_B" not in names
    assert names[f"{prefix}.down_proj.glowq_B"] == (8, 128)  # reads its own input: its own unit
    report = json.loads((checkpoints["qwen2_moe"] / "glowq_report.json").read_text())
    unit = next(u for u in report["units"] if u["unit"] == "model.layers.0.mlp.experts.gate_up_proj")
    assert unit["members"][-2:] == [f"{prefix}.gate_proj", f"{prefix}.up_proj"] and len(unit["members"]) == 10
    assert unit["whitened_error_after"] < unit["whitened_error_before"]


@pytest.mark.parametrize("arch", ARCHS)
def test_in_memory_quantized_model_is_the_checkpoint(arch, sources, tmp_path):
    """The experts of the in-memory quantized layers (heldout.py) against those read back."""
    from test_calibrate import assert_curve_ends_match_the_checkpoints

    assert_curve_ends_match_the_checkpoints(sources[arch], tmp_path, rel=1e-5)


def test_correction_helps_the_experts(sources, checkpoints, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = calibrate(sources["qwen2_moe"], tmp_path / "plain", CalibrationOptions(**SMALL, restore="0"))
    ids = torch.randint(3, 259, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unquantized = AutoModelForCausalLM.from_pretrained(sources["qwen2_moe"])(ids).logits
        got = load_reference_model(checkpoints["qwen2_moe"])(ids).logits
        without = load_reference_model(plain)(ids).logits
    assert (got - unquantized).norm() < (without - unquantized).norm()


def test_per_module_baseline_gives_every_expert_projection_its_own_B(sources, tmp_path):
    out = calibrate(sources["qwen3_moe"], tmp_path / "ck", CalibrationOptions(**SMALL, share="module"))
    names = shapes(out)
    prefix = "model.layers.0.mlp.experts"
    for e in range(4):
        for leaf in ("gate_proj", "up_proj", "down_proj"):
            assert f"{prefix}.{e}.{leaf}.glowq_B" in names
            assert f"{prefix}.{e}.{leaf}" in quantization_config(out)["lowrank_units"]
    load_reference_model(out)


@pytest.mark.parametrize(("share", "b_key"), [("group", "B_glowq"), ("module", "B_per_module")])
def test_correction_parameters_count_the_checkpoint(sources, tmp_path, share, b_key):
    """The formula behind the Qwen3-30B-A3B table, checked against a real checkpoint."""
    out = calibrate(sources["qwen2_moe"], tmp_path / share, CalibrationOptions(**SMALL, share=share))
    factors = {n: s for n, s in shapes(out).items() if n.startswith("model.layers.0.mlp.") and "glowq_" in n}
    expected = correction_parameters(128, 64, 4, 8, shared_intermediate=128)
    assert sum(torch.Size(s).numel() for s in factors.values()) == (
        expected["A_gate_up"] + expected["down"] + expected[b_key])


def test_qwen3_30b_a3b_table_matches_the_formula():
    sizes = correction_parameters(hidden=2048, intermediate=768, num_experts=128, rank=64)
    docs = (REPO / "docs" / "format.md").read_text()
    for key in ("B_glowq", "B_per_expert", "B_per_module"):
        gate_up = (sizes["A_gate_up"] + sizes[key]) * 2 / 2**20
        total = (sizes["A_gate_up"] + sizes[key] + sizes["down"]) * 2 / 2**20
        assert f"| {gate_up:.2f} |" in docs and f"| {total:.2f} |" in docs, key


@pytest.mark.parametrize("arch", ARCHS)
def test_free_space_check_sizes_every_expert(arch, sources, checkpoints):
    """Before loading weights the calibrator sizes the checkpoint from the config alone, with
    the validator's expected tensors: every expert's codes and factors and the routers."""
    hf_config = load_config(resolve_source(sources[arch]))
    estimate = estimated_checkpoint_bytes(hf_config, model_linears(hf_config), CalibrationOptions(**SMALL))
    file = checkpoints[arch] / "model.safetensors"
    header_bytes = 8 + int.from_bytes(file.read_bytes()[:8], "little")
    assert estimate == file.stat().st_size - header_bytes


def test_rank_zero_and_partial_restoration(sources, tmp_path):
    plain = calibrate(sources["mixtral"], tmp_path / "rtn", CalibrationOptions(**{**SMALL, "rank": 0}))
    assert not any(n.endswith(("glowq_A", "glowq_B")) for n in shapes(plain))
    assert quantization_config(plain)["format_version"] == 2
    partial = calibrate(sources["mixtral"], tmp_path / "half", CalibrationOptions(**SMALL, restore="0.5"))
    units = quantization_config(partial)["lowrank_units"]
    assert len(units) == 7  # half of 2 x (qkv, o, gate/up, 4 downs)
    names = shapes(partial)
    for layer in range(2):
        for e in range(4):
            down = f"model.layers.{layer}.block_sparse_moe.experts.{e}.w2"
            assert (f"{down}.glowq_A" in names) == (down in units)
    load_reference_model(partial)
    load_reference_model(plain)


def test_auto_restoration_switches_expert_units(sources, tmp_path):
    """--restore auto measures perplexity while switching units on in the in-memory reference,
    whose Mixtral experts live under `mlp` although checkpoints call the block `block_sparse_moe`."""
    out = calibrate(sources["mixtral"], tmp_path / "auto", CalibrationOptions(**SMALL, restore="auto",
                                                                              heldout_samples=2))
    report = json.loads((out / "glowq_report.json").read_text())
    assert len(report["selection"]["curve"]) == 15  # k = 0..14 units
    assert any(".experts." in name for name in report["selection"]["ranking"])


def test_dense_checkpoints_stay_format_version_1(tmp_path):
    dense = make_random_model(tmp_path / "llama", "llama")
    assert quantization_config(calibrate(dense, tmp_path / "ck", CalibrationOptions(**SMALL)))["format_version"] == 1


def _route_around_expert(source: Path, target: Path) -> Path:
    """A copy whose routers can never pick expert `unused`: the MoE input keeps only feature 0
    (the post-attention norm's other weights are 0), and the router sends positive values to
    experts 0/1, negative ones to 2/3, leaving expert 4 a logit of 0 (never in the top 2)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.post_attention_layernorm.weight[1:] = 0
            layer.mlp.gate.weight.zero_()
            layer.mlp.gate.weight[:, 0] = torch.tensor([1.0, 1.0, -1.0, -1.0, 0.0])
    model.save_pretrained(target)
    for file in source.iterdir():
        if not (target / file.name).exists():
            (target / file.name).write_bytes(file.read_bytes())
    return target


def test_expert_without_calibration_tokens_keeps_no_correction(tmp_path, caplog):
    from offline_calibrate.tiny import SHAPES

    shape = {**SHAPES["tiny"], "num_experts": 5, "num_experts_per_tok": 2, "moe_intermediate_size": 64}
    source = _route_around_expert(make_random_model(tmp_path / "src", "qwen3_moe", shape=shape), tmp_path / "routed")
    with caplog.at_level(logging.WARNING, logger="offline_calibrate.moe"):
        out = calibrate(source, tmp_path / "ck", CalibrationOptions(**SMALL))
    report = json.loads((out / "glowq_report.json").read_text())
    routing = report["experts"]["model.layers.0.mlp"]
    assert routing["tokens"][4] == 0 and min(routing["tokens"][:4]) > 0 and routing["without_tokens"] == [4]
    units = quantization_config(out)["lowrank_units"]
    assert "model.layers.0.mlp.experts.4.down_proj" not in units
    assert "model.layers.0.mlp.experts.3.down_proj" in units
    assert "model.layers.0.mlp.experts.4.down_proj.qweight" in shapes(out)  # still int4
    assert "experts [4] received no calibration tokens" in caplog.text
    few = calibrate(source, tmp_path / "few", CalibrationOptions(**{**SMALL, "samples": 1, "seq_len": 16}))
    assert json.loads((few / "glowq_report.json").read_text())["experts"]["model.layers.0.mlp"]["few_tokens"]
    assert "fewer calibration tokens than their down_proj has inputs (64)" in caplog.text
    load_reference_model(out)


# ----- errors ---------------------------------------------------------------------------------


def run_cli(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        calibrate_main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("glowq-calibrate: error:")]
    assert len(lines) == 1, err
    return lines[0]


def test_group_size_that_does_not_fit_the_experts_is_refused(sources, tmp_path, capsys):
    line = run_cli([str(sources["qwen3_moe"]), "-o", str(tmp_path / "out"), "--group-size", "128",
                    "--samples", "2", "--seq-len", "32"], capsys)
    assert ("the experts of model.layers.0.mlp cannot be quantized: in_features=64 is not a multiple of "
            "group_size=128; choose a --group-size that divides both the hidden size (128) and the expert "
            "intermediate size (64)") in line
    assert not (tmp_path / "out").exists()


def test_rank_too_large_for_an_expert_is_refused(sources, tmp_path, capsys):
    line = run_cli([str(sources["mixtral"]), "-o", str(tmp_path / "out"), "--group-size", "32", "--rank", "100",
                    "--samples", "2", "--seq-len", "32"], capsys)
    assert "--rank 100 is larger than the error matrix of model.layers.0.block_sparse_moe.experts.*.w2" in line


def test_unsupported_moe_architecture_lists_the_supported_ones(tmp_path, capsys):
    model = tmp_path / "olmoe"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"]}))
    line = run_cli([str(model), "-o", str(tmp_path / "out")], capsys)
    assert "model_type 'olmoe' is not supported by glowq-calibrate; supported: llama, mistral, mixtral" in line
    assert "Qwen2-MoE, Qwen3-MoE, Mixtral" in line


# ----- the format's MoE names, and the plugin's view of them (no engine) ------------------------


@pytest.mark.parametrize(("module", "unit", "b_tensor"), [
    ("model.layers.0.mlp.experts.3.up_proj", "model.layers.0.mlp.experts.gate_up_proj",
     "model.layers.0.mlp.experts.0.gate_proj.glowq_B"),
    ("model.layers.0.block_sparse_moe.experts.1.w3", "model.layers.0.block_sparse_moe.experts.w13",
     "model.layers.0.block_sparse_moe.experts.0.w1.glowq_B"),
    ("model.layers.0.mlp.shared_expert.gate_proj", "model.layers.0.mlp.experts.gate_up_proj",
     "model.layers.0.mlp.experts.0.gate_proj.glowq_B"),
    ("model.layers.0.mlp.experts.3.down_proj", "model.layers.0.mlp.experts.3.down_proj",
     "model.layers.0.mlp.experts.3.down_proj.glowq_B"),
    ("model.layers.0.mlp.gate_proj", "model.layers.0.mlp.gate_up_proj", "model.layers.0.mlp.gate_up_proj.glowq_B"),
])
def test_units_and_where_their_B_is_stored(module, unit, b_tensor):
    from vllm_glowq.format import factor_b_name, unit_name

    assert unit_name(module, "group") == unit and factor_b_name(unit) == b_tensor
    assert unit_name(module, "module") == module


def test_dense_mlp_of_an_moe_model_maps_to_gate_and_up():
    """Qwen3-MoE's vLLM class leaves gate_up_proj out of packed_modules_mapping, although its
    dense MLP layers (mlp_only_layers) and shared experts have one."""
    from vllm_glowq.config import GlowQQuantConfig
    from vllm_glowq.format import GlowQConfig

    config = GlowQQuantConfig(GlowQConfig(group_size=32, rank=8, format_version=2))
    config.packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"]}
    assert config.member_names("model.layers.0.mlp.gate_up_proj") == (
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj")


def test_version_1_config_with_expert_units_is_refused():
    from vllm_glowq.format import GlowQConfig, GlowQFormatError

    with pytest.raises(GlowQFormatError, match="format_version 1 has no Mixture-of-Experts units"):
        GlowQConfig(rank=8, lowrank_units=["model.layers.0.mlp.experts.gate_up_proj"], format_version=1)
