"""The H200 Mixture-of-Experts benchmark's pieces that run without a GPU (bench/make_model.py,
bench/variants.py, bench/report.py, bench/moe_microbench.py): the random model has the tensors
transformers writes for Qwen3-MoE, the disk plan behind the layer count, the GPTQ copy that
vLLM's in-tree GPTQ-Marlin MoE method reads (routers left in bf16), the report's MoE section
with and without results, and the layer microbenchmark's options and its refusal without a GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from vllm_helpers import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import make_model  # noqa: E402
import moe_microbench  # noqa: E402
import report  # noqa: E402
import variants  # noqa: E402

GIB = 1024**3


def _tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    shapes = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return shapes


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, Path]:
    from offline_calibrate import CalibrationOptions, calibrate
    from offline_calibrate.tiny import make_random_model

    root = tmp_path_factory.mktemp("bench-moe")
    bench = make_model.make_model(root / "bench", "tiny", device="cpu", arch="qwen3_moe")
    return {"bench": bench, "hf": make_random_model(root / "hf", "qwen3_moe"),
            "glowq": calibrate(bench, root / "glowq", CalibrationOptions(group_size=64, rank=8, samples=2, seq_len=32,
                                                                         dataset="random", sym=True))}


def test_random_moe_model_has_the_tensors_transformers_writes(moe_models):
    assert _tensor_shapes(moe_models["bench"]) == _tensor_shapes(moe_models["hf"])
    config = json.loads((moe_models["bench"] / "config.json").read_text())
    hf_config = json.loads((moe_models["hf"] / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe" and config["architectures"] == hf_config["architectures"]
    assert config.get("num_experts", config.get("num_local_experts")) == 4  # transformers 5 renamed it


def test_disk_plan_for_qwen3_30b_a3b():
    """The numbers docs/benchmarks.md quotes: 1.83 GiB per layer, 3.48 GiB fixed, so 48 layers
    need 91 GiB; a 64 GiB disk with 56 GiB free holds 24 of them (8 GiB kept free)."""
    plan = make_model.disk_plan("qwen3-30b-a3b", "qwen3_moe")
    per_layer = {k: v / GIB for k, v in plan["per_layer"].items()}
    assert per_layer["bf16"] == pytest.approx(1.161, abs=1e-3)  # 623M parameters
    assert per_layer["glowq"] == pytest.approx(0.368, abs=1e-3)
    assert per_layer["int4_codes"] == pytest.approx(0.300, abs=1e-3)
    assert sum(plan["fixed"].values()) / GIB == pytest.approx(3.478, abs=1e-3)  # embeddings + head, three times
    assert make_model.layers_that_fit("qwen3-30b-a3b", "qwen3_moe", 56 * GIB, 8 * GIB)[0] == 24
    assert make_model.layers_that_fit("qwen3-30b-a3b", "qwen3_moe", 200 * GIB, 8 * GIB)[0] == 48  # capped


def test_gptq_copy_of_an_moe_checkpoint_keeps_routers_in_bf16(moe_models, tmp_path):
    from vllm.model_executor.layers.quantization.auto_gptq import AutoGPTQConfig
    from vllm.model_executor.layers.quantization.utils.gptq_utils import is_layer_gptq_quantized

    made = variants.derive(moe_models["glowq"], tmp_path / "v", only=("int4", "gptq"))
    quant = json.loads((made["gptq"] / "config.json").read_text())["quantization_config"]
    config = AutoGPTQConfig.from_config(quant)
    config.maybe_update_config(str(made["gptq"]))
    quantized = config.modules_in_block_to_quantize
    assert "model.layers.0.mlp.experts.3.down_proj" in quantized and "model.layers.1.self_attn.q_proj" in quantized
    assert not is_layer_gptq_quantized("model.layers.0.mlp.gate", quantized)  # the router
    shapes = _tensor_shapes(made["gptq"])
    assert shapes["model.layers.0.mlp.experts.2.gate_proj.g_idx"] == (128,)
    assert shapes["model.layers.0.mlp.gate.weight"] == (4, 128)
    assert not any(name.endswith(("glowq_A", "glowq_B")) for name in shapes)


def _engine(decode_tok_s: float, throughput: float) -> dict:
    return {"decode": {b: {"latency_ms": 1000 * int(b) / decode_tok_s, "tok_s": decode_tok_s} for b in ("1", "16", "64")},
            "throughput": {"output_tok_s": throughput}, "ttft": {"median_ms": 50.0}, "engine_start_s": 60}


def test_report_renders_the_moe_section(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    assert "| GlowQ decode b=1 >= 0.90 x plain int4 MoE (GPTQ-Marlin) | not run | not run |" in \
        "\n".join(report.moe_section(results, {}))
    run = {"variants": {"gptq": _engine(100.0, 1000.0), "glowq": _engine(95.0, 850.0)}}
    (results / "vllm_moe.json").write_text(json.dumps(run))
    text = "\n".join(report.moe_section(results, {}))
    assert "| GlowQ decode b=64 >= 0.90 x plain int4 MoE (GPTQ-Marlin) | 0.950 | met |" in text
    assert "| GlowQ throughput >= 0.90 x plain int4 MoE (GPTQ-Marlin) | 0.850 | **missed** |" in text
    targets = json.loads((results / "targets_moe.json").read_text())
    assert targets["decode b=16"] == {"measured": 0.95, "target": 0.9, "met": True}
    assert "vllm_moe" not in report.build(results).split("## Mixture-of-Experts")[0]  # not among the dense runs


def test_moe_floor_counts_the_factors_of_the_experts_a_batch_reads():
    assert report.expected_experts(128, 8, 1) == pytest.approx(8.0)
    assert 125 < report.expected_experts(128, 8, 64) < 128
    model = {"hidden_size": 2048, "moe_intermediate_size": 768, "num_local_experts": 128, "num_experts_per_tok": 8}
    micro = {"shape": {"rank": 64, "group": 128}, "rows": [{"tokens": 1, "us": {"plain": 31.0}}]}
    text = "\n".join(report.moe_floor_section(model, micro, 4e12))
    # 8 experts: 2.43 MB of codes and scales each, 0.557 MB of factors each, B13 once
    assert "| 1 | 8.0 | 20.0 | 24.7 | 0.81 | 5.0 | 6.2 | 31.0 |" in text
    assert report.moe_floor_section(model, None, 4e12) == []


def test_moe_micro_section_lists_kernels_and_launch_sweep():
    micro = {"device": "H200", "vllm": "0.26.0", "shape": {}, "copies": 8, "fused_max_pairs": 32,
             "rows": [{"tokens": 1, "pairs": 8, "default_path": "fused", "us": {"plain": 30.0, "own_pairs": 25.0},
                       "ratio": {"own_pairs": 1.2}, "kernels": {"own_pairs": {"gemv": 20.0, "gaps": 5.0}}}],
             "launch_sweep": [{"tokens": 1, "constant": "PAIRS_WARPS", "value": 4, "us": 22.5, "max_error": 4e-3}]}
    text = "\n".join(report.moe_micro_section(micro))
    assert "| 1 | 8 | 30.0 | 25.0 (1.20x) |" in text
    assert "- 1 tokens, own_pairs: `gemv` 20.0; gaps between kernels 5.0 us" in text
    assert "| 1 | PAIRS_WARPS | 4 | 22.5 | 4.0e-03 |" in text
    assert "PAIRS_WARPS" not in "\n".join(report.moe_micro_section({**micro, "launch_sweep": []}))
    expand = [{"tokens": 256, "pairs": 2048, "tiles": 8, "us": 12.0, "us_one_tile": 72.0, "identical": True}]
    assert "| 256 | 2048 | 8 | 12.0 | 72.0 | 6.00x | yes |" in "\n".join(
        report.moe_micro_section({**micro, "expand_tiles": expand}))
    sweep = [{"tokens": 64, "constant": "shipped", "value": None, "us": 40.0, "max_change": 0.0},
             {"tokens": 64, "constant": "ACTIVATE_CHUNKS", "value": 3, "us": 32.0, "max_change": 2e-3}]
    text = "\n".join(report.moe_micro_section({**micro, "grouped_sweep": sweep, "grouped_constants": {"ACTIVATE_CHUNKS": 1}}))
    assert "(shipped: ACTIVATE_CHUNKS 1)" in text and "| 64 | ACTIVATE_CHUNKS | 3 | 32.0 | 1.25x | 2.0e-03 |" in text
    own = {**micro, "vllm": None, "rows": [{"tokens": 1, "pairs": 8, "default_path": "fused", "baseline": "own_plain_pairs",
                                          "us": {"own_plain_pairs": 20.0, "own_pairs": 25.0}, "ratio": {"own_pairs": 0.8}}]}
    text = "\n".join(report.moe_micro_section(own))
    assert "| tokens | pairs | int4 own, pairs path (us) | GlowQ own, pairs path |" in text
    assert "| 1 | 8 | 20.0 | 25.0 (0.80x) |" in text and "vLLM not installed" in text


def test_moe_microbench_options():
    args = moe_microbench.parse_args(["--out", "m.json", "--tokens", "1,8", "--threshold-sweep"])
    assert args.tokens == [1, 8] and args.threshold_sweep and args.out == "m.json"
    assert moe_microbench.parse_args(["--out", "m.json"]).tokens == [1, 4, 16, 64, 256]
    for bad in ("1,a", "0,4", ""):
        with pytest.raises(SystemExit):
            moe_microbench.parse_args(["--out", "m.json", "--tokens", bad])
    with pytest.raises(SystemExit):
        moe_microbench.parse_args(["--tokens", "1"])  # --out is required


def test_moe_microbench_threshold_is_where_the_fused_path_stops_winning():
    rows = [{"pairs": p, "us": {"plain": 1.0, "grouped": 10.0, "fused": f}} for p, f in ((8, 5.0), (32, 9.0), (128, 11.0),
                                                                                         (512, 4.0))]
    assert moe_microbench.suggested_threshold(rows) == 32
    assert moe_microbench.suggested_threshold([{"pairs": 8, "us": {"grouped": 1.0, "fused": 2.0}}]) is None


def test_moe_microbench_switches_one_thing_per_grouped_variant(monkeypatch):
    """The grouped variants run moe_marlin.forward with exactly their switches off, and leave the
    module as shipped afterwards."""
    from vllm_glowq import moe_marlin

    switches = ("CORRECTION_BESIDE", "R_ON_SIDE_STREAM", "ONE_SORT", "W2_SHRINK_BESIDE")
    seen = []
    monkeypatch.setattr(moe_marlin, "forward",
                        lambda *a, **k: seen.append(tuple(getattr(moe_marlin, s) for s in switches)))
    layer = {"int4": None, "factors": moe_marlin.ExpertFactors()}
    for path in ("grouped", "grouped_in_callbacks", "grouped_serial_r", "grouped_two_sorts",
                 "grouped_shrink_in_activation"):
        moe_microbench.step(layer, None, None, None, path)()
    assert seen == [(True, True, True, True), (False, True, True, True), (False, False, True, True),
                    (True, True, False, True), (True, True, True, False)]
    assert all(getattr(moe_marlin, s) for s in switches)


def test_grouped_sweep_runs_in_the_interpreter(monkeypatch):
    """bench/moe_microbench.py's parts that need no vLLM (the grouped path's correction launches
    alone: the sweep of their constants and the w2 expand's tiles) run end to end on a tiny
    shape, on a CPU with the kernels in Triton's interpreter and a plain clock for the graphs;
    changing a launch constant changes no more than the partials' summation order."""
    pytest.importorskip("triton")
    from interpreter import load_interpreted

    from vllm_glowq import moe_marlin

    interpreted = load_interpreted(REPO_ROOT / "vllm_glowq" / "kernels" / "moe_lowrank_triton.py",
                                   "glowq_moe_lowrank_bench_interpreted")
    monkeypatch.setattr(moe_microbench, "grouped", interpreted)
    monkeypatch.setattr(moe_microbench, "DEVICE", "cpu")
    monkeypatch.setattr(moe_microbench, "SHAPE", dict(hidden=128, experts=4, top_k=2, inter=64, rank=16, group=64))
    monkeypatch.setattr(moe_microbench, "GROUPED_SWEEP", {"ACTIVATE_CHUNKS": (1, 2), "PRODUCT_BLOCK_N": (32,)})
    monkeypatch.setattr(moe_microbench, "seconds_per_call", lambda calls: [call() for call in calls] and 1e-6)
    gen = torch.Generator().manual_seed(0)
    factors = moe_marlin.ExpertFactors(*(torch.randn(*shape, generator=gen).to(torch.float16) * 0.1 for shape in
                                         ((16, 128), (4, 128, 16), (4, 16, 64), (4, 128, 16))))
    layers = [{"factors": factors}, {"factors": factors}]
    rows = moe_microbench.grouped_sweep(layers, 5)
    assert [(r["constant"], r["value"]) for r in rows] == [("shipped", None), ("ACTIVATE_CHUNKS", 1),
                                                            ("ACTIVATE_CHUNKS", 2), ("PRODUCT_BLOCK_N", 32)]
    assert all(r["max_change"] < 1e-2 for r in rows)
    assert moe_microbench.expand_tiles(layers, 5)["identical"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_moe_microbench_refuses_without_a_gpu(tmp_path):
    out = tmp_path / "moe_micro.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "moe_microbench.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode != 0 and "needs a CUDA GPU" in done.stderr, done.stderr
    assert not out.exists()


def test_marlin_layout_in_torch_is_vllms():
    """--own-only's Marlin layout (no vLLM kernels on that machine) is what vLLM's reference
    packing and scale permutation write, and the plugin's scale permutations are vLLM's."""
    from vllm.model_executor.layers.quantization.utils.marlin_utils import get_scale_perms, marlin_moe_permute_scales
    from vllm.model_executor.layers.quantization.utils.marlin_utils_test import get_weight_perm, marlin_weights

    from vllm_glowq import moe_marlin
    from vllm_glowq.packing import pack_rows

    gen = torch.Generator().manual_seed(0)
    experts, k, n, group = 2, 64, 128, 32
    codes = torch.randint(0, 16, (experts, k, n), generator=gen)
    qweight = torch.stack([pack_rows(c) for c in codes])
    scales = torch.rand(experts, k // group, n, generator=gen).to(torch.bfloat16)
    packed, permuted = moe_microbench.marlin_layout(qweight, scales)
    expected = torch.stack([marlin_weights(c.to(torch.int32), k, n, 4, get_weight_perm(4)) for c in codes])
    assert torch.equal(packed, expected)
    assert torch.equal(permuted, marlin_moe_permute_scales(scales, k, n, group))
    assert (moe_marlin.MARLIN_SCALE_PERM, moe_marlin.MARLIN_SCALE_PERM_SINGLE) == tuple(get_scale_perms())


def test_moe_microbench_paths_option_keeps_the_paths_named():
    """--paths keeps the paths named, baseline first, and refuses a name it does not know."""
    assert moe_microbench.parse_args(["--out", "x", "--paths", "plain,grouped"]).paths == ["plain", "grouped"]
    with pytest.raises(SystemExit):
        moe_microbench.parse_args(["--out", "x", "--paths", "plain,grouped_sideways"])
