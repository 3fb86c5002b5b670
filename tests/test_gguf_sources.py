"""GGUF files as the source of glowq-calibrate and glowq-eval, and every way one can be wrong.

The files are real GGUF files written by the `gguf` package (tests/gguf_helpers.py): a tiny
random Llama stored as llama.cpp lays it out, and header-only files of other architectures.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from gguf_helpers import write_header_gguf, write_llama_gguf
from safetensors.torch import load_file
from test_calibrate_errors import FAST, assert_one_error, run_cli

from offline_calibrate.cli import calibrate_main, eval_main
from offline_calibrate.tiny import make_random_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("hf") / "llama")


@pytest.fixture(scope="module")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny, tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def text(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("Once upon a time, a small dog found a red ball in the park. " * 60)
    return path


def checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "model.safetensors"))


def test_a_gguf_file_calibrates_to_the_same_checkpoint_as_its_hf_folder(tiny, tiny_gguf, tmp_path):
    calibrate_main([str(tiny), "-o", str(tmp_path / "from-hf"), *FAST])
    calibrate_main([str(tiny_gguf), "-o", str(tmp_path / "from-gguf"), *FAST])
    from_hf, from_gguf = checkpoint_tensors(tmp_path / "from-hf"), checkpoint_tensors(tmp_path / "from-gguf")
    assert from_hf.keys() == from_gguf.keys()
    assert [name for name in from_hf if not torch.equal(from_hf[name], from_gguf[name])] == []
    config = json.loads((tmp_path / "from-gguf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]  # a GGUF names none; vLLM needs it
    assert config["quantization_config"]["producer"]["source_model"] == str(tiny_gguf)
    assert (tmp_path / "from-gguf" / "tokenizer.json").is_file()


def test_a_folder_with_one_gguf_file_and_gguf_file_in_glowq_eval(tiny, tiny_gguf, text, tmp_path, capsys):
    """A folder holding one .gguf and no config.json means that file; --gguf-file picks one of
    several; both evaluate exactly like the HF model they were written from."""
    alone, several = tmp_path / "one", tmp_path / "several"
    alone.mkdir(), several.mkdir()
    shutil.copy(tiny_gguf, alone)
    shutil.copy(tiny_gguf, several / "chosen.gguf")
    write_header_gguf(several / "other.gguf", "bert")
    results = {}
    for name, argv in {"hf": [str(tiny)], "folder": [str(alone)],
                       "named": [str(several), "--gguf-file", "chosen.gguf"]}.items():
        eval_main([*argv, "--dataset", str(text), "--seq-len", "64"])
        results[name] = json.loads(capsys.readouterr().out)
    assert [r["kind"] for r in results.values()] == ["hf", "gguf", "gguf"]
    assert results["folder"]["model"] == str(alone / tiny_gguf.name)
    assert results["hf"]["nll"] == pytest.approx(results["folder"]["nll"], rel=1e-6), results
    assert results["named"]["nll"] == results["folder"]["nll"]


def test_a_gguf_file_beside_hugging_face_files(tiny, tiny_gguf, tmp_path, capsys):
    """transformers would take the tokenizer from those files and lose the BOS token."""
    folder = shutil.copytree(tiny, tmp_path / "both")
    shutil.copy(tiny_gguf, folder / "model.gguf")
    for argv in ([str(folder / "model.gguf")], [str(folder), "--gguf-file", "model.gguf"]):
        assert_one_error(calibrate_main, [*argv, "-o", str(tmp_path / "out"), *FAST], capsys,
                         f"{folder} holds Hugging Face files (generation_config.json, tokenizer.json, "
                         "tokenizer_config.json, chat_template.jinja) beside model.gguf")


def test_several_gguf_files_need_gguf_file(tiny_gguf, tmp_path, capsys):
    for name in ("a.gguf", "b.gguf"):
        shutil.copy(tiny_gguf, tmp_path / name)
    assert_one_error(calibrate_main, [str(tmp_path), "-o", str(tmp_path.parent / "out"), *FAST], capsys,
                     f"model folder {tmp_path} holds 2 GGUF files and no config.json: choose one with --gguf-file "
                     "NAME (it has: a.gguf, b.gguf)")


def test_gguf_file_missing_from_the_folder(tiny_gguf, tmp_path, capsys):
    shutil.copy(tiny_gguf, tmp_path / "model.gguf")
    assert_one_error(calibrate_main, [str(tmp_path), "--gguf-file", "other.gguf", "-o", str(tmp_path / "out")],
                     capsys, f"--gguf-file other.gguf: there is no such file in {tmp_path} (it has: model.gguf)")


def test_gguf_file_with_a_file_as_the_model(tiny_gguf, tmp_path, capsys):
    assert_one_error(calibrate_main, [str(tiny_gguf), "--gguf-file", "x.gguf", "-o", str(tmp_path / "out")], capsys,
                     "is a file, so --gguf-file x.gguf has nothing to choose from")


def test_a_file_that_is_not_gguf(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    assert_one_error(calibrate_main, [str(fake), "-o", str(tmp_path / "out")], capsys,
                     f"{fake} is not a GGUF file (it does not start with b'GGUF')")


def test_a_truncated_gguf_file(tiny_gguf, tmp_path, capsys):
    data = tiny_gguf.read_bytes()
    for size, expected in ((40, "ends inside its GGUF header: the file is truncated or damaged"),
                           (len(data) // 2, "is truncated or damaged")):
        cut = tmp_path / f"cut-{size}.gguf"
        cut.write_bytes(data[:size])
        assert_one_error(calibrate_main, [str(cut), "-o", str(tmp_path / "out"), *FAST], capsys, expected)


def test_an_architecture_transformers_cannot_read(tmp_path, capsys):
    bert = write_header_gguf(tmp_path / "bert.gguf", "bert", {"bert.block_count": 2})
    code, err = run_cli(calibrate_main, [str(bert), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and f"cannot build a model from the GGUF file {bert} of architecture 'bert'" in err, err
    assert "; glowq-calibrate takes GGUF files of llama, mistral" in err.splitlines()[-1], err


def test_an_architecture_glowq_does_not_support(tmp_path, capsys):
    gpt2 = write_header_gguf(tmp_path / "gpt2.gguf", "gpt2", {
        "gpt2.block_count": 2, "gpt2.context_length": 128, "gpt2.embedding_length": 64,
        "gpt2.feed_forward_length": 256, "gpt2.attention.head_count": 4})
    assert_one_error(calibrate_main, [str(gpt2), "-o", str(tmp_path / "out")], capsys,
                     "model_type 'gpt2' is not supported by glowq-calibrate; supported: llama, mistral, ")


def test_gguf_without_the_gguf_package(tiny_gguf, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # what `import gguf` finds when it is not installed
    assert_one_error(calibrate_main, [str(tiny_gguf), "-o", str(tmp_path / "out")], capsys,
                     f"{tiny_gguf} is a GGUF model, and reading it needs the gguf package: "
                     "pip install 'vllm-glowq[gguf]' (or: pip install gguf accelerate)")


def test_sweep_refuses_a_gguf_file(tiny_gguf, text, capsys):
    assert_one_error(eval_main, [str(tiny_gguf.parent), "--gguf-file", tiny_gguf.name, "--dataset", str(text),
                                 "--sweep", "out"], capsys, "--sweep takes a GlowQ checkpoint", prog="glowq-eval")


def test_a_gguf_file_in_a_hub_repository_from_the_cache(tiny_gguf, tmp_path, capsys, monkeypatch):
    """glowq-calibrate REPO --gguf-file NAME fetches that one file (here: offline, from the hub
    cache) and calibrates it like the local file; a file the cache lacks is named."""
    from huggingface_hub import constants
    from test_streaming import cached_snapshot

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    repo, alone = "glowq-tests/tiny-llama-gguf", tmp_path / "repo"
    alone.mkdir()
    shutil.copy(tiny_gguf, alone / "tiny.gguf")
    cached_snapshot(tmp_path / "cache", repo, alone)
    missing = [repo, "--gguf-file", "other.gguf", "-o", str(tmp_path / "out"), *FAST]
    assert_one_error(calibrate_main, missing, capsys,
                     f"{repo} is not a local folder, and other.gguf of it could not be fetched from the Hugging Face hub")
    calibrate_main([repo, "--gguf-file", "tiny.gguf", "-o", str(tmp_path / "from-hub"), *FAST])
    calibrate_main([str(tiny_gguf), "-o", str(tmp_path / "from-file"), *FAST])
    assert (tmp_path / "from-hub" / "model.safetensors").read_bytes() == \
        (tmp_path / "from-file" / "model.safetensors").read_bytes()
    config = json.loads((tmp_path / "from-hub" / "config.json").read_text())
    assert config["quantization_config"]["producer"]["source_model"] == f"{repo}/tiny.gguf"
