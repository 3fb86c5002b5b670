"""GlowQ-S: the elbow rule, the restore forms, and what a partially restored checkpoint holds."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from safetensors import safe_open

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.selection import elbow, parse_restore
from offline_calibrate.sweep import sweep
from offline_calibrate.tiny import make_random_model

SMALL = dict(group_size=32, rank=8, samples=4, seq_len=64)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_random_model(tmp_path_factory.mktemp("m") / "llama")


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        # Most of the gain comes from the first two units: the elbow is at 2.
        ([10.0, 7.0, 6.0, 5.9, 5.85, 5.8], 2),
        # Linear improvement: every unit is worth the same, no elbow, restore all.
        ([10.0, 9.0, 8.0, 7.0, 6.0], 4),
        # The gain comes late (no point above the chord): restore all.
        ([10.0, 9.9, 9.8, 9.6, 6.0], 4),
        # k = 1 and k = 2 lie equally far above the chord: the smaller k wins.
        ([10.0, 8.0, 7.0, 7.0, 6.0], 1),
        # Restoring makes things worse: restore nothing.
        ([5.0, 5.1, 5.3], 0),
    ],
)
def test_elbow_rule(curve, expected):
    assert elbow(list(enumerate(curve))) == expected


def test_elbow_on_a_sparse_grid():
    points = [(0, 10.0), (4, 6.0), (8, 5.5), (12, 5.4), (16, 5.35)]
    assert elbow(points) == 4


@pytest.mark.parametrize(
    ("value", "parsed"),
    [("all", ("all", None)), ("auto", ("auto", None)), ("0.5", ("fraction", 0.5)), ("1.0", ("fraction", 1.0)),
     ("3", ("count", 3)), ("0", ("count", 0))],
)
def test_restore_forms(value, parsed):
    assert parse_restore(value) == parsed


@pytest.mark.parametrize("value", ["0.0", "1.5", "-2", "half", ""])
def test_bad_restore_values(value):
    with pytest.raises(ValueError, match="--restore"):
        parse_restore(value)


def factor_names(checkpoint: Path) -> set[str]:
    with safe_open(str(checkpoint / "model.safetensors"), framework="pt") as f:
        return {k for k in f.keys() if ".glowq_" in k}


def test_half_restored_checkpoint_holds_factors_of_the_top_half_only(tiny, tmp_path):
    out = calibrate(tiny, tmp_path / "half", CalibrationOptions(**SMALL, restore="0.5", metric="norm_error"))
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    report = json.loads((out / "glowq_report.json").read_text())
    ranking = report["selection"]["ranking"]
    assert len(ranking) == 8 and set(quant["lowrank_units"]) == set(ranking[:4])
    scores = {u["unit"]: u["metrics"]["norm_error"] for u in report["units"]}
    assert min(scores[u] for u in ranking[:4]) >= max(scores[u] for u in ranking[4:])
    members = {u["unit"]: u["members"] for u in report["units"]}
    expected = set()
    for unit in ranking[:4]:
        expected |= {f"{unit}.glowq_B"} | {f"{m}.glowq_A" for m in members[unit]}
    assert factor_names(out) == expected


def test_byte_budget_caps_the_restored_units(tiny, tmp_path):
    full = calibrate(tiny, tmp_path / "full", CalibrationOptions(**SMALL))
    sizes = {u["unit"]: u["extra_params"] * 2 for u in json.loads((full / "glowq_report.json").read_text())["units"]}
    budget = sum(sorted(sizes.values())[-3:])  # room for about three units
    out = calibrate(tiny, tmp_path / "budget", CalibrationOptions(**SMALL, max_extra_bytes=budget))
    restored = json.loads((out / "config.json").read_text())["quantization_config"]["lowrank_units"]
    assert 0 < len(restored) < 8
    assert sum(sizes[u] for u in restored) <= budget


def test_auto_records_its_curve_and_choice(tiny, tmp_path):
    out = calibrate(tiny, tmp_path / "auto", CalibrationOptions(**SMALL, restore="auto", heldout_samples=2))
    selection = json.loads((out / "glowq_report.json").read_text())["selection"]
    curve = selection["curve"]
    assert [p["k"] for p in curve] == list(range(9))
    chosen = elbow([(p["k"], p["perplexity"]) for p in curve])
    assert selection["restored"] == chosen
    assert len(json.loads((out / "config.json").read_text())["quantization_config"]["lowrank_units"]) == chosen


def test_sweep_writes_csv_plot_and_summary(tiny, tmp_path):
    ckpt = calibrate(tiny, tmp_path / "full", CalibrationOptions(**SMALL))
    text = tmp_path / "eval.txt"
    text.write_text("The cat sat on the mat and looked at the dog. " * 30)
    result = sweep(str(ckpt), str(text), str(tmp_path / "sw"), seq_len=64, metrics=["singular_sum", "cosine"])
    rows = list(csv.DictReader(open(tmp_path / "sw.csv")))
    assert {r["metric"] for r in rows} == {"singular_sum", "cosine"}
    assert len(rows) == 2 * 9
    first = [float(r["perplexity"]) for r in rows if r["k"] == "0"]
    last = [float(r["perplexity"]) for r in rows if r["k"] == "8"]
    assert first[0] == pytest.approx(first[1]) and last[0] == pytest.approx(last[1])
    assert last[0] == pytest.approx(result["full_perplexity"])
    assert (tmp_path / "sw.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["best_metric"] in ("singular_sum", "cosine")


def test_sweep_needs_a_fully_restored_checkpoint(tiny, tmp_path):
    ckpt = calibrate(tiny, tmp_path / "half", CalibrationOptions(**SMALL, restore="0.5"))
    with pytest.raises(ValueError, match="must be calibrated with every unit restored"):
        sweep(str(ckpt), "unused.txt", str(tmp_path / "sw"))
