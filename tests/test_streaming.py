"""Calibration reads one decoder layer at a time from the safetensors shards (issue 14): the same
checkpoint however the weights are stored, host memory that does not grow with the depth, rank 0
without a forward pass, missing files named before any layer is calibrated, and hub ids served
from the cache when the hub cannot be reached."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_calibrate_errors import FAST, assert_one_error, leftovers

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.calibrate import load_report
from offline_calibrate.cli import calibrate_main
from offline_calibrate.tiny import SHAPES, make_random_model
from offline_calibrate.writer import save_tensors

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(group_size=32, rank=8, samples=4, seq_len=64)
LAYER_STARTED = "calibrating layers"  # the per-layer progress bar


def copy_without_weights(source: Path, target: Path) -> Path:
    target.mkdir()
    for file in source.iterdir():
        if file.suffix != ".safetensors":
            shutil.copy(file, target / file.name)
    return target


def sharded_copy(source: Path, target: Path, max_bytes: int = 200_000) -> Path:
    """The model with its weights in several shards and an index, as large checkpoints come."""
    save_tensors(copy_without_weights(source, target), load_file(source / "model.safetensors"), max_bytes)
    return target


def checkpoint_tensors(checkpoint: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as handle:
        return {name: handle.get_tensor(name) for name in handle.keys()}


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    return {arch: make_random_model(root / arch, arch) for arch in ("llama", "qwen2_moe")}


@pytest.mark.parametrize("arch", ["llama", "qwen2_moe"])
def test_every_way_of_storing_the_weights_gives_the_same_checkpoint(arch, sources, tmp_path, caplog):
    """One safetensors file, shards with an index (both streamed layer by layer), and a
    pytorch_model.bin that transformers loads whole: bit for bit the same checkpoint."""
    source = sources[arch]
    sharded = sharded_copy(source, tmp_path / "sharded")
    assert len(list(sharded.glob("model-*-of-*.safetensors"))) > 2
    pickled = copy_without_weights(source, tmp_path / "pickled")
    torch.save(load_file(source / "model.safetensors"), pickled / "pytorch_model.bin")
    options = CalibrationOptions(**SMALL, restore="0.5")
    outputs = {name: calibrate(folder, tmp_path / f"out-{name}", options)
               for name, folder in (("single", source), ("sharded", sharded), ("pickled", pickled))}
    assert "it is loaded whole, so host memory holds the entire model" in caplog.text
    reference = checkpoint_tensors(outputs["single"])
    assert any(name.endswith("glowq_B") for name in reference)
    for name in ("sharded", "pickled"):
        tensors = checkpoint_tensors(outputs[name])
        assert tensors.keys() == reference.keys()
        assert all(torch.equal(tensors[k].view(torch.uint8), reference[k].view(torch.uint8)) for k in reference)
        assert (outputs[name] / "model.safetensors").read_bytes() == (outputs["single"] / "model.safetensors").read_bytes()
        assert load_report(outputs[name])["selection"] == load_report(outputs["single"])["selection"]


def peak_rss_of_calibrating(source: Path, output: Path, restore: str) -> int:
    """Max RSS (bytes) of a fresh glowq-calibrate process, measured by its parent."""
    measure = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")
    command = [sys.executable, "-c", measure, sys.executable, "-m", "offline_calibrate", str(source), "-o",
               str(output), *FAST, "--svd", "randomized", "--restore", restore, "--heldout-samples", "2"]
    # One thread: two processes of OpenMP spinning on two shared cores slow each other tenfold.
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return int(done.stdout.split()[-1]) * 1024


def test_peak_host_memory_does_not_grow_with_depth(tmp_path):
    """Random Llamas of 4 and 24 layers of one width (10.5 MB of fp32 weights a layer): the
    deeper one, calibrated with every unit restored and with --restore auto (its held-out pass
    re-reads every layer), peaks within less than 4 layers' weights of the shallow one."""
    dims = dict(SHAPES["tiny"], hidden_size=512, intermediate_size=1024, num_attention_heads=8,
                num_key_value_heads=8, head_dim=64)
    shallow, deep = (make_random_model(tmp_path / f"llama{n}", shape={**dims, "num_hidden_layers": n})
                     for n in (4, 24))
    four_layers = sum(t.numel() * t.element_size() for name, t in load_file(shallow / "model.safetensors").items()
                      if name.startswith("model.layers."))
    assert 40e6 < four_layers < 45e6
    baseline = peak_rss_of_calibrating(shallow, tmp_path / "ck4", "all")
    peaks = {restore: peak_rss_of_calibrating(deep, tmp_path / f"ck24-{restore}", restore) for restore in ("all", "auto")}
    print(f"peak RSS: 4 layers {baseline / 2**20:.1f} MiB, 24 layers {peaks['all'] / 2**20:.1f} MiB, "
          f"24 layers --restore auto {peaks['auto'] / 2**20:.1f} MiB; 4 layers of weights {four_layers / 2**20:.1f} MiB")
    assert peaks["all"] - baseline < four_layers
    assert peaks["auto"] - baseline < four_layers
    assert load_report(tmp_path / "ck24-auto")["selection"]["curve"]


def test_rank_zero_runs_no_forward_pass(sources, tmp_path):
    report = load_report(calibrate(sources["qwen2_moe"], tmp_path / "rtn", CalibrationOptions(**{**SMALL, "rank": 0})))
    assert "capture_inputs" not in report["timings_s"] and "forward_statistics" not in report["timings_s"]
    assert report["timings_s"]["quantize_factorize"] > 0
    full = load_report(calibrate(sources["qwen2_moe"], tmp_path / "full", CalibrationOptions(**SMALL)))
    assert full["timings_s"]["forward_statistics"] > 0


# ----- missing or broken files: one error before any layer is calibrated -------------------------


def test_missing_shards_are_named(sources, tmp_path, capsys):
    model = sharded_copy(sources["llama"], tmp_path / "model")
    gone = sorted(p.name for p in model.glob("model-*.safetensors"))[1:3]
    for name in gone:
        (model / name).unlink()
    assert_one_error(calibrate_main, [str(model), "-o", str(tmp_path / "out"), *FAST], capsys,
                     f"model folder {model} lacks {gone[0]}, {gone[1]} listed in model.safetensors.index.json")
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize("damage", ["tensor", "truncated", "index", "shape"])
def test_broken_weights_are_named_before_any_layer(damage, sources, tmp_path, capsys):
    model = sharded_copy(sources["llama"], tmp_path / "model")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.mlp.down_proj.weight"
    file = model / index["weight_map"][victim]
    if damage == "tensor":  # a shard rewritten without one of its tensors (and the index to match)
        tensors = load_file(file)
        del tensors[victim], index["weight_map"][victim]
        save_file(tensors, file, metadata={"format": "pt"})
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        expected = f"lack 1 tensor(s) the model needs: {victim}; the checkpoint does not match its config.json"
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:-100])
        expected = f"{file.name} is not a complete safetensors file"
    elif damage == "index":
        (model / "model.safetensors.index.json").unlink()
        expected = "but no model.safetensors.index.json saying which tensor is where; fetch the index too"
    else:  # a config that does not describe these weights
        config = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps({**config, "intermediate_size": 320}))
        expected = "model.layers.0.mlp.gate_proj.weight (in model-"
    assert_one_error(calibrate_main, [str(model), "-o", str(tmp_path / "out"), *FAST], capsys, expected)
    assert LAYER_STARTED not in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_nan_in_the_last_layer_is_found_before_the_first_is_calibrated(sources, tmp_path, capsys):
    model = sharded_copy(sources["llama"], tmp_path / "model")
    index = json.loads((model / "model.safetensors.index.json").read_text())
    victim = "model.layers.1.self_attn.o_proj.weight"
    tensors = load_file(model / index["weight_map"][victim])
    tensors[victim][0, 0] = float("inf")
    save_file(tensors, model / index["weight_map"][victim], metadata={"format": "pt"})
    code, err = _run(calibrate_main, [str(model), "-o", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2 and f"weight {victim} contains NaN or Inf values" in err, err
    assert LAYER_STARTED not in err


def _run(main, argv, capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


# ----- hub ids without the hub ----------------------------------------------------------------------


def run_offline(repo: str, cache: Path, output: Path) -> subprocess.CompletedProcess:
    """glowq-calibrate REPO in a process that cannot reach the hub (huggingface_hub reads
    HF_HUB_OFFLINE and HF_HUB_CACHE when it is imported)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache),
           "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "offline_calibrate", repo, "-o", str(output), *FAST]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)


def cached_snapshot(cache: Path, repo: str, source: Path) -> Path:
    """The hub cache's layout for `repo` at one commit, holding `source`'s files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = cache / f"models--{repo.replace('/', '--')}"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    shutil.copytree(source, storage / "snapshots" / commit)
    return storage / "snapshots" / commit


def test_offline_hub_id_names_the_files_missing_from_the_cache(sources, tmp_path):
    repo = "glowq-tests/tiny-llama"
    nothing = run_offline(repo, tmp_path / "empty-cache", tmp_path / "out")
    assert nothing.returncode == 2, nothing.stderr[-2000:]
    assert f"glowq-calibrate: error: {repo} is not a local folder, and config.json of it could not be fetched" \
        in nothing.stderr
    snapshot = cached_snapshot(tmp_path / "cache", repo, sharded_copy(sources["llama"], tmp_path / "sharded"))
    shards = sorted(p.name for p in snapshot.glob("model-*.safetensors"))
    (snapshot / shards[-1]).unlink()
    partial = run_offline(repo, tmp_path / "cache", tmp_path / "out")
    errors = [line for line in partial.stderr.splitlines() if line.startswith("glowq-calibrate: error:")]
    assert partial.returncode == 2 and len(errors) == 1, partial.stderr[-2000:]
    assert f"{shards[-1]} of it could not be fetched from the Hugging Face hub nor found in the cache " \
           f"({tmp_path / 'cache'})" in errors[0]
    assert f"hf download {repo} {shards[-1]}" in errors[0]
    assert LAYER_STARTED not in partial.stderr and not (tmp_path / "out").exists()


def test_offline_hub_id_calibrates_from_a_complete_cache(sources, tmp_path):
    repo = "glowq-tests/tiny-llama"
    cached_snapshot(tmp_path / "cache", repo, sources["llama"])
    done = run_offline(repo, tmp_path / "cache", tmp_path / "out")
    assert done.returncode == 0, done.stderr[-2000:]
    assert load_report(tmp_path / "out")["format"]["producer"]["source_model"] == repo
    reference = calibrate(sources["llama"], tmp_path / "local", CalibrationOptions(
        group_size=32, rank=4, samples=2, seq_len=32))
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == (reference / "model.safetensors").read_bytes()
