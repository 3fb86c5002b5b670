"""glowq-calibrate / glowq-eval refuse bad inputs before loading weights and lose nothing.

Each test is one item of the hostile-input pass (issue 12). Where a test must show that a check
runs before the weights are read, the model folder holds only config.json: reaching the
weights would fail with another message.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import stat
from pathlib import Path

import pytest
import torch
from test_calibrate_errors import FAST, assert_one_error, leftovers, run_cli
from vllm_helpers import REPO_ROOT, copy_checkpoint

from offline_calibrate.cli import calibrate_main, eval_main
from offline_calibrate.data import read_text, tokenize, windows
from offline_calibrate.tiny import build_tokenizer, make_random_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("m") / "llama")


@pytest.fixture(scope="module")
def checkpoint(tiny, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ck") / "ck"
    calibrate_main([str(tiny), "-o", str(out), *FAST])
    return out


def config_only(source: Path, target: Path, **changes) -> Path:
    """A model folder with nothing but config.json (optionally changed): no weights to load."""
    target.mkdir()
    config = json.loads((source / "config.json").read_text())
    config.update(changes)
    (target / "config.json").write_text(json.dumps(config))
    return target


# ----- options refused before loading weights -------------------------------------------------


@pytest.mark.parametrize(("group_size", "expected"), [
    ("7", "--group-size 7 is not a multiple of 8"),
    ("512", "--group-size 512 fits none of the model's linears (in-features [128, 256])"),
])
def test_group_size_that_quantizes_nothing_is_refused(tiny, tmp_path, capsys, group_size, expected):
    model = config_only(tiny, tmp_path / "model")
    args = [str(model), "-o", str(tmp_path / "out"), *FAST, "--group-size", group_size]
    assert_one_error(calibrate_main, args, capsys, expected)
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_bad_device_is_one_line(tiny, tmp_path, capsys):
    model = config_only(tiny, tmp_path / "model")
    base = [str(model), "-o", str(tmp_path / "out"), *FAST]
    assert_one_error(calibrate_main, [*base, "--device", "bogus"], capsys, "--device 'bogus' is not a device name")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    expected = "has no usable CUDA GPU; use --device cpu" if count == 0 else f"there are only {count} CUDA devices"
    assert_one_error(calibrate_main, [*base, "--device", f"cuda:{count}"], capsys, expected)


def test_default_seq_len_is_capped_by_the_model_and_said(tiny, tmp_path, capsys, caplog):
    caplog.set_level(logging.INFO, logger="offline_calibrate")
    out = tmp_path / "out"
    calibrate_main([str(tiny), "-o", str(out), "--group-size", "32", "--rank", "2", "--samples", "1"])
    report = json.loads((out / "glowq_report.json").read_text())
    assert report["options"]["seq_len"] == 1024  # the tiny model's max_position_embeddings
    assert "--seq-len 1024 (the model's max_position_embeddings; the default is 2048)" in caplog.text


# ----- the output -------------------------------------------------------------------------------


@pytest.mark.parametrize("target", ["itself", "its parent"])
def test_output_that_would_replace_the_source_is_refused(tiny, tmp_path, capsys, target):
    source = tmp_path / "models" / "llama"
    shutil.copytree(tiny, source)
    before = sorted(p.name for p in source.iterdir())
    output = source if target == "itself" else source.parent
    assert_one_error(calibrate_main, [str(source), "-o", str(output), *FAST, "--overwrite"], capsys,
                     f"--output {output} would replace the source model {source}")
    assert sorted(p.name for p in source.iterdir()) == before


def unwritable_folder(tmp_path: Path) -> Path:
    """A folder this process cannot create anything in. Root ignores file modes, so as root
    it is sysfs, which refuses new folders to everyone."""
    if os.geteuid() != 0:
        folder = tmp_path / "read-only"
        folder.mkdir(mode=0o555)
        return folder
    if not Path("/sys/kernel").is_dir():
        pytest.skip("running as root without sysfs: no folder here refuses writes")
    return Path("/sys")


def test_unwritable_output_folder_is_refused_before_loading_weights(tiny, tmp_path, capsys):
    model = config_only(tiny, tmp_path / "model")
    parent = unwritable_folder(tmp_path)
    before = sorted(parent.iterdir())
    assert_one_error(calibrate_main, [str(model), "-o", str(parent / "glowq-ck"), *FAST], capsys,
                     f"cannot write the checkpoint: creating a folder in {parent} failed (")
    assert sorted(parent.iterdir()) == before


def test_checkpoint_larger_than_the_free_space_is_refused(tiny, tmp_path, capsys):
    huge = config_only(tiny, tmp_path / "huge", hidden_size=65536, intermediate_size=262144,
                       num_hidden_layers=64, num_attention_heads=512, num_key_value_heads=512, head_dim=128)
    free = shutil.disk_usage(tmp_path).free
    code, err = run_cli(calibrate_main, [str(huge), "-o", str(tmp_path / "out"), *FAST], capsys)
    assert code == 2 and "GB are free in" in err and "free some space or choose another --output" in err, err
    needed = float(err.split("needs about ")[1].split(" GB")[0]) * 1e9
    assert needed > free
    assert not leftovers(tmp_path)


def test_stale_staging_folder_of_a_killed_run_is_removed(tiny, tmp_path, caplog):
    """What a kill -9 during the rename leaves: a complete-looking hidden staging folder."""
    stale = tmp_path / ".out.tmp-abc123"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    other = tmp_path / ".another.tmp-xyz"  # belongs to another output: kept
    other.mkdir()
    calibrate_main([str(tiny), "-o", str(tmp_path / "out"), *FAST])
    assert not stale.exists() and other.exists()
    assert f"removed {stale}, left behind by an interrupted glowq-calibrate run" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == [".another.tmp-xyz", "out"]


def test_second_writer_of_one_output_is_refused(tiny, tmp_path, capsys):
    lock = tmp_path / ".out.lock"
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert_one_error(calibrate_main, [str(tiny), "-o", str(tmp_path / "out"), *FAST], capsys,
                         f"another glowq-calibrate is writing {tmp_path / 'out'} (it holds {lock})")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_checkpoint_permissions_follow_the_umask(tiny, tmp_path, umask):
    previous = os.umask(umask)
    try:
        calibrate_main([str(tiny), "-o", str(tmp_path / "out"), *FAST])
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert modes["model.safetensors"] == 0o666 & ~umask
    assert set(modes.values()) == {0o666 & ~umask}, modes


# ----- datasets ---------------------------------------------------------------------------------


def test_binary_dataset_is_refused(tiny, tmp_path, capsys):
    binary = tmp_path / "weights.bin"
    binary.write_bytes(bytes(range(256)) * 64)
    assert_one_error(calibrate_main, [str(tiny), "-o", str(tmp_path / "out"), *FAST, "--dataset", str(binary)],
                     capsys, f"dataset {str(binary)!r} is not UTF-8 text (byte 128 is 0x80)")
    zeros = tmp_path / "zeros.txt"  # valid UTF-8, but not text
    zeros.write_bytes(b"\0" * 4096)
    assert_one_error(eval_main, [str(tiny), "--dataset", str(zeros)], capsys,
                     "does not look like text: 4096 of its first 4096 characters are control characters",
                     prog="glowq-eval")
    assert not (tmp_path / "out").exists()


def test_json_dataset_is_read_as_json(tmp_path):
    records = [{"text": "first story"}, {"text": "second story"}]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(records))
    lines = tmp_path / "lines.json"
    lines.write_text("\n".join(json.dumps(r) for r in records))
    assert read_text(str(listed)) == read_text(str(lines)) == "first story\n\nsecond story"
    mapping = tmp_path / "dict.json"
    mapping.write_text(json.dumps({"data": records}))
    with pytest.raises(ValueError, match="holds a JSON dict; it must be a list of records"):
        read_text(str(mapping))


def test_long_text_is_tokenized_without_the_length_warning():
    tokenizer = build_tokenizer()
    tokenizer.model_max_length = 16
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("transformers.tokenization_utils_base")
    logger.addHandler(handler)
    try:
        assert tokenize("a much longer text than sixteen tokens", tokenizer).numel() > 16
        assert not [r for r in records if "Token indices sequence length" in r.getMessage()]
        tokenizer("a much longer text than sixteen tokens")  # the control: the plain call warns
        assert [r for r in records if "Token indices sequence length" in r.getMessage()]
    finally:
        logger.removeHandler(handler)


# ----- glowq-eval -------------------------------------------------------------------------------


def test_eval_seq_len_one_is_refused(tiny, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("hello " * 100)
    code, err = run_cli(eval_main, [str(tiny), "--dataset", str(text), "--seq-len", "1"], capsys)
    assert code == 2 and "argument --seq-len: must be at least 2" in err and "Traceback" not in err
    with pytest.raises(ValueError, match="--seq-len must be at least 2"):
        windows(torch.arange(10), 1, None)


def test_eval_blames_a_broken_config_not_the_tokenizer(tiny, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(tiny, broken)
    (broken / "config.json").write_text('{"model_type": "llama",')
    text = tmp_path / "t.txt"
    text.write_text("hello " * 100)
    code, err = run_cli(eval_main, [str(broken), "--dataset", str(text)], capsys)
    assert code == 2 and f"{broken / 'config.json'} is not valid JSON" in err, err
    assert "tokenizer" not in err


def test_eval_refuses_a_config_that_disagrees_with_the_tensors(checkpoint, tmp_path, capsys):
    """Calibrated with group size 32; config.json now says 64: the scales have twice the groups."""
    edited = copy_checkpoint(checkpoint, tmp_path / "ck64", edit_config=lambda q: q.update(group_size=64))
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 40)
    code, err = run_cli(eval_main, [str(edited), "--dataset", str(text), "--seq-len", "64"], capsys)
    assert code == 2, err
    assert "GlowQ checkpoint tensor 'model.layers.0.self_attn.q_proj.scales' (in model.safetensors) has shape " \
           "[4, 128], but the model and quantization_config (bits=4, group_size=64, rank=4) imply [2, 128]" in err


def test_chat_template_is_carried_and_its_absence_is_said(tiny, checkpoint, tmp_path, caplog):
    from transformers import AutoTokenizer

    source_template = AutoTokenizer.from_pretrained(tiny).chat_template
    assert source_template and AutoTokenizer.from_pretrained(checkpoint).chat_template == source_template
    assert "has no chat template" not in caplog.text
    base = tmp_path / "base"
    shutil.copytree(tiny, base)
    (base / "chat_template.jinja").unlink(missing_ok=True)
    config = json.loads((base / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (base / "tokenizer_config.json").write_text(json.dumps(config))
    calibrate_main([str(base), "-o", str(tmp_path / "out"), *FAST])
    assert "tokenizer has no chat template, so vllm serve will answer chat completions with HTTP 400" in caplog.text
    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template is None


# ----- what the documents promise about the outputs -----------------------------------------------


def documented_keys(document: Path, header: str) -> set[str]:
    """The backticked names in the first column of the Markdown table under `header`."""
    lines = document.read_text().splitlines()
    table = []
    for line in lines[lines.index(header) + 2 :]:
        if not line.startswith("|"):
            break
        table.append(line)
    return {name for row in table for name in re.findall(r"`([a-z_]+)`", row.split("|")[1])}


def test_documented_eval_fields_are_what_glowq_eval_prints(checkpoint, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("Once upon a time there was a cat. " * 40)
    eval_main([str(checkpoint), "--dataset", str(text), "--seq-len", "64"])
    printed = json.loads(capsys.readouterr().out)
    assert documented_keys(REPO_ROOT / "README.md", "| field | meaning |") == set(printed)
    assert printed["tokens"] == printed["windows"] * (printed["seq_len"] - 1)


def test_documented_report_keys_are_what_the_report_holds(checkpoint):
    report = json.loads((checkpoint / "glowq_report.json").read_text())
    assert documented_keys(REPO_ROOT / "docs" / "format.md", "| key | content |") == set(report)
