"""`glowq-eval --sweep`: perplexity against the number of restored units, per importance metric.

Takes a fully restored GlowQ checkpoint (its glowq_report.json holds every unit's metrics),
restores units in each metric's order through the PyTorch reference forward, and writes
PREFIX.csv, PREFIX.png and PREFIX.json. The summary ranks the metrics by the mean perplexity
over the curve (lower = the metric puts the useful units first) and gives each metric's
automatic choice (the elbow rule of `selection.elbow`).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from .calibrate import load_report
from .evaluate import eval_windows, mean_nll
from .reference import load_reference_model
from .selection import FACTOR_BYTES, METRICS, curve_points, elbow, perplexity_curve, set_restored


class _Unit:
    """A unit as the sweep sees it: name, members, metrics, extra parameters."""

    def __init__(self, entry: dict) -> None:
        self.name = entry["unit"]
        self.members = entry["members"]
        self.metrics = entry["metrics"]
        self.extra_params = entry["extra_params"]


def report_units(checkpoint: Path) -> list[_Unit]:
    report = load_report(checkpoint)
    units = [_Unit(e) for e in report["units"] if e["restored"]]
    total = sum(1 for e in report["units"] if "singular_sum" in e["metrics"])
    if not units or len(units) != total:
        raise ValueError(f"{checkpoint} must be calibrated with every unit restored (--restore all) to sweep")
    return units


def sweep(
    checkpoint: str,
    dataset: str,
    out_prefix: str,
    seq_len: int = 512,
    max_tokens: int | None = None,
    metrics: list[str] | None = None,
) -> dict:
    checkpoint_path = Path(checkpoint)
    metrics = metrics or list(METRICS)
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metrics {unknown}; choose from {', '.join(METRICS)}")
    units = report_units(checkpoint_path)
    model = load_reference_model(checkpoint_path)
    from transformers import AutoTokenizer

    data = eval_windows(dataset, AutoTokenizer.from_pretrained(checkpoint), seq_len, max_tokens)
    ks = curve_points(len(units))
    rows, summary = [], {}
    for metric in metrics:
        ranked = sorted(units, key=lambda u: -u.metrics[metric])
        curve = perplexity_curve(model, ranked, data, ks, "cpu", f"sweep {metric}")
        choice = elbow([(p["k"], p["perplexity"]) for p in curve])
        for point in curve:
            rows.append({"metric": metric, **point, "extra_bytes": _extra_bytes(ranked, point["k"])})
        summary[metric] = {
            "mean_perplexity": sum(p["perplexity"] for p in curve) / len(curve),
            "auto_k": choice,
            "auto_perplexity": next(p["perplexity"] for p in curve if p["k"] == choice),
            "auto_extra_bytes": _extra_bytes(ranked, choice),
            "half_k": len(units) // 2,
            "half_perplexity": _at(curve, len(units) // 2),
        }
    set_restored(model, units, {u.name for u in units})
    result = {
        "checkpoint": checkpoint,
        "dataset": dataset,
        "units": len(units),
        "plain_int4_perplexity": rows[0]["perplexity"],
        "full_perplexity": math.exp(mean_nll(model, data)),
        "best_metric": min(summary, key=lambda m: summary[m]["mean_perplexity"]),
        "metrics": summary,
    }
    _write(Path(out_prefix), rows, result)
    return result


def _extra_bytes(ranked: list[_Unit], k: int) -> int:
    """Bytes of the factors of the first k units."""
    return sum(u.extra_params for u in ranked[:k]) * FACTOR_BYTES


def _at(curve: list[dict], k: int) -> float | None:
    """Perplexity at k, interpolated when the grid skipped k."""
    below = max((p for p in curve if p["k"] <= k), key=lambda p: p["k"])
    above = min((p for p in curve if p["k"] >= k), key=lambda p: p["k"])
    if above["k"] == below["k"]:
        return below["perplexity"]
    t = (k - below["k"]) / (above["k"] - below["k"])
    return below["perplexity"] + t * (above["perplexity"] - below["perplexity"])


def _write(prefix: Path, rows: list[dict], result: dict) -> None:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{prefix}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["metric", "k", "perplexity", "extra_bytes"])
        writer.writeheader()
        writer.writerows(rows)
    Path(f"{prefix}.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(rows, result, Path(f"{prefix}.png"))


def plot(rows: list[dict], result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for metric, info in result["metrics"].items():
        points = [r for r in rows if r["metric"] == metric]
        style = "-" if metric == result["best_metric"] else "--"
        ax.plot([p["k"] for p in points], [p["perplexity"] for p in points], style, marker=".", label=metric)
        ax.plot([info["auto_k"]], [info["auto_perplexity"]], "o", mfc="none", color=ax.lines[-1].get_color())
    ax.axhline(result["plain_int4_perplexity"], color="grey", lw=0.8, ls=":", label="plain int4 (k = 0)")
    ax.axhline(result["full_perplexity"], color="black", lw=0.8, ls=":", label="full GlowQ (all units)")
    ax.set_xlabel(f"restored units (of {result['units']}), in each metric's order")
    ax.set_ylabel("perplexity")
    ax.set_title("GlowQ-S: perplexity vs restored units (circles: automatic elbow choice)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)

