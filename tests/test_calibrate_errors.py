"""Every bad input to glowq-calibrate / glowq-eval gives one clear error line and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from offline_calibrate import shards
from offline_calibrate.cli import calibrate_main, eval_main
from offline_calibrate.tiny import make_random_model

FAST = ["--group-size", "32", "--rank", "4", "--samples", "2", "--seq-len", "32"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("m") / "llama")


def run_cli(main, argv: list[str], capsys) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code, capsys.readouterr().err


def assert_one_error(main, argv, capsys, expected: str, prog: str = "glowq-calibrate") -> None:
    code, err = run_cli(main, argv, capsys)
    lines = [line for line in err.splitlines() if line.startswith(f"{prog}: error:")]
    assert code == 2, err
    assert len(lines) == 1 and expected in lines[0], err
    assert "Traceback" not in err


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def test_missing_model_path(tmp_path, capsys):
    assert_one_error(calibrate_main, [str(tmp_path / "nope"), "-o", str(tmp_path / "out")], capsys,
                     f"model path {tmp_path / 'nope'} does not exist")
    assert not (tmp_path / "out").exists()


def test_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert_one_error(calibrate_main, [str(tmp_path / "empty"), "-o", str(tmp_path / "out")], capsys,
                     "has no config.json")


def test_unsupported_architecture(tmp_path, capsys):
    model = tmp_path / "bert"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert_one_error(calibrate_main, [str(model), "-o", str(tmp_path / "out")], capsys,
                     "model_type 'bert' is not supported by glowq-calibrate; supported: llama, mistral, mixtral, qwen2, "
                     "qwen2_moe, qwen3, qwen3_moe")


def test_glowq_checkpoint_as_source(tiny, tmp_path, capsys):
    calibrate_main([str(tiny), "-o", str(tmp_path / "ck"), *FAST])
    capsys.readouterr()
    assert_one_error(calibrate_main, [str(tmp_path / "ck"), "-o", str(tmp_path / "out")], capsys,
                     "is a GlowQ checkpoint; calibrate from the full-precision model")


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--rank", "500"], "--rank 500 is larger than the error matrix of model.layers.0.self_attn.qkv_proj"),
        (["--group-size", "0"], "--group-size must be a positive integer or -1 (per row), got 0"),
        (["--group-size", "-8"], "--group-size must be a positive integer or -1 (per row), got -8"),
        (["--seq-len", "5000"], "--seq-len 5000 exceeds the model's max_position_embeddings (1024)"),
        (["--bits", "3"], "--bits 3 is not supported"),
        (["--restore", "1.5"], "--restore fraction 1.5 is outside (0, 1]"),
        (["--restore", "99"], "--restore 99 asks for more units than the model has (8)"),
        (["--metric", "magic"], "--metric 'magic' is unknown"),
        (["--max-extra-bytes", "10"], "--max-extra-bytes 10 is too small for any unit"),
    ],
)
def test_bad_options(tiny, tmp_path, capsys, args, expected):
    assert_one_error(calibrate_main, [str(tiny), "-o", str(tmp_path / "out"), *FAST, *args], capsys, expected)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_empty_dataset(tiny, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert_one_error(calibrate_main, [str(tiny), "-o", str(tmp_path / "out"), *FAST, "--dataset", str(empty)],
                     capsys, f"dataset {str(empty)!r} is empty")


def test_dataset_too_short(tiny, tmp_path, capsys):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    assert_one_error(calibrate_main, [str(tiny), "-o", str(tmp_path / "out"), *FAST, "--dataset", str(short)],
                     capsys, "gives 0 windows of 32 tokens, but 2 calibration samples are needed")


def test_nan_weights(tiny, tmp_path, capsys):
    broken = tmp_path / "nan-model"
    broken.mkdir()
    for f in tiny.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    assert_one_error(calibrate_main, [str(broken), "-o", str(tmp_path / "out"), *FAST], capsys,
                     "weight model.layers.1.mlp.up_proj.weight contains NaN or Inf values")


def test_corrupt_weights_file(tiny, tmp_path, capsys):
    broken = tmp_path / "corrupt"
    broken.mkdir()
    for f in tiny.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    assert_one_error(calibrate_main, [str(broken), "-o", str(tmp_path / "out"), *FAST], capsys,
                     "cannot load the weights of")


def test_existing_output_is_refused_unless_overwrite(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert_one_error(calibrate_main, [str(tiny), "-o", str(out), *FAST], capsys,
                     f"output folder {out} already exists; pass --overwrite to replace it")
    assert (out / "keep.txt").read_text() == "mine"
    calibrate_main([str(tiny), "-o", str(out), *FAST, "--overwrite"])
    assert (out / "config.json").exists() and not (out / "keep.txt").exists()
    assert not leftovers(tmp_path)


def test_interrupted_write_leaves_no_checkpoint(tiny, tmp_path, monkeypatch):
    """Ctrl-C while the weights are being written: no output folder, no temporary folder."""
    real_add = shards._Shard.add

    def add_then_interrupt(*args, **kwargs):
        real_add(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(shards._Shard, "add", add_then_interrupt)
    with pytest.raises(SystemExit) as exit_info:
        calibrate_main([str(tiny), "-o", str(tmp_path / "out"), *FAST])
    assert exit_info.value.code == 130
    assert not (tmp_path / "out").exists()
    assert leftovers(tmp_path) == []


def test_interrupted_overwrite_keeps_the_old_checkpoint(tiny, tmp_path, monkeypatch):
    out = tmp_path / "out"
    calibrate_main([str(tiny), "-o", str(out), *FAST])
    before = (out / "model.safetensors").read_bytes()
    monkeypatch.setattr(shards._Shard, "close", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SystemExit):
        calibrate_main([str(tiny), "-o", str(out), *FAST, "--rank", "2", "--overwrite"])
    assert (out / "model.safetensors").read_bytes() == before
    assert leftovers(tmp_path) == []


def test_argparse_rejects_a_non_integer(tiny, tmp_path, capsys):
    code, err = run_cli(calibrate_main, [str(tiny), "-o", str(tmp_path / "o"), "--rank", "many"], capsys)
    assert code == 2 and "argument --rank: invalid int value: 'many'" in err


def test_eval_errors(tiny, tmp_path, capsys):
    assert_one_error(eval_main, [str(tmp_path / "nope"), "--dataset", "x.txt"], capsys,
                     "does not exist", prog="glowq-eval")
    text = tmp_path / "t.txt"
    text.write_text("hello world " * 50)
    assert_one_error(eval_main, [str(tiny), "--dataset", str(text), "--seq-len", "4096"], capsys,
                     "--seq-len 4096 exceeds the model's max_position_embeddings (1024)", prog="glowq-eval")
    assert_one_error(eval_main, [str(tiny), "--dataset", str(tmp_path / "missing.txt")], capsys,
                     "missing.txt", prog="glowq-eval")


def test_eval_reports_perplexity_for_both_kinds(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 40)
    calibrate_main([str(tiny), "-o", str(tmp_path / "ck"), *FAST])
    capsys.readouterr()
    results = {}
    for model in (tiny, tmp_path / "ck"):
        eval_main([str(model), "--dataset", str(text), "--seq-len", "64"])
        results[model.name] = json.loads(capsys.readouterr().out)
    assert results["llama"]["kind"] == "hf" and results["ck"]["kind"] == "glowq"
    for r in results.values():
        assert r["perplexity"] == pytest.approx(torch.tensor(r["nll"]).exp().item())
        assert r["windows"] > 0
    assert results["ck"]["perplexity"] != results["llama"]["perplexity"]
