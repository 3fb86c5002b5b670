"""The real pretrained model: perplexities order as FP32 < per-module <= GlowQ < round-to-nearest,
and GlowQ-S at half the units lies between plain int4 and full GlowQ.

Calibration on the first half of the TinyStories validation text, perplexity on the second
half and on WikiText-2 (bench/accuracy_stories260k.py makes the README's table the same way,
with more samples and tokens).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.evaluate import eval_windows, mean_nll
from offline_calibrate.reference import load_reference_model
from offline_calibrate.selection import set_restored
from offline_calibrate.sweep import report_units

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
MODEL = DATA / "stories260k"
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not MODEL.is_dir(), reason=f"{MODEL} is absent (the shared data sits beside the repo in CI)"),
]
SEQ_LEN = 256
SETTINGS = dict(group_size=32, rank=8, samples=16, seq_len=SEQ_LEN)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("text")
    text = (DATA / "tinystories_val.txt").read_text()
    cut = text.index("\n", len(text) // 2)
    (folder / "calib.txt").write_text(text[:cut])
    (folder / "heldout.txt").write_text(text[cut:])
    return {"calib": folder / "calib.txt", "heldout": folder / "heldout.txt", "wikitext": DATA / "wikitext2_test.raw"}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, texts) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("ckpt")
    variants = {"rtn": dict(rank=0), "glowq": dict(share="group"), "per_module": dict(share="module")}
    return {
        name: calibrate(MODEL, folder / name, CalibrationOptions(**{**SETTINGS, **v, "dataset": str(texts["calib"])}))
        for name, v in variants.items()
    }


def perplexity(model, windows: torch.Tensor) -> float:
    return math.exp(mean_nll(model, windows))


@pytest.mark.parametrize("dataset", ["heldout", "wikitext"])
def test_perplexities_order_fp32_per_module_glowq_rtn(checkpoints, texts, dataset):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(MODEL)
    windows = eval_windows(str(texts[dataset]), tokenizer, SEQ_LEN, max_tokens=12000)
    ppl = {"fp32": perplexity(AutoModelForCausalLM.from_pretrained(MODEL).eval(), windows)}
    ppl.update({name: perplexity(load_reference_model(path), windows) for name, path in checkpoints.items()})
    assert ppl["fp32"] < ppl["per_module"] <= ppl["glowq"] < ppl["rtn"], ppl


def test_half_the_units_lie_between_plain_int4_and_full_glowq(checkpoints, texts):
    from transformers import AutoTokenizer

    windows = eval_windows(str(texts["heldout"]), AutoTokenizer.from_pretrained(MODEL), SEQ_LEN, max_tokens=12000)
    model = load_reference_model(checkpoints["glowq"])
    units = report_units(checkpoints["glowq"])
    ranked = sorted(units, key=lambda u: -u.metrics["singular_sum"])

    def at(k: int) -> float:
        set_restored(model, ranked, {u.name for u in ranked[:k]})
        return perplexity(model, windows)

    plain, half, full = at(0), at(len(ranked) // 2), at(len(ranked))
    assert full < half < plain, (full, half, plain)
