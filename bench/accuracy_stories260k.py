"""Accuracy of GlowQ against its baselines on the one real pretrained model here, stories260K.

Calibrates four checkpoints from ../shared/data/stories260k (round-to-nearest int4, per-module
correction, GlowQ; all int4 with the same group size) on the first half of the TinyStories
validation text and measures perplexity on its second half and on WikiText-2:

    python bench/accuracy_stories260k.py [--out docs/accuracy_stories260k.json]

Prints a markdown table; the README quotes it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.evaluate import evaluate

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VARIANTS = {
    "round-to-nearest int4": dict(rank=0),
    "GlowQ (shared B)": dict(share="group"),
    "per-module B (QERA-exact/EoRA)": dict(share="module"),
}


def split_text(source: Path, folder: Path) -> tuple[Path, Path]:
    """First half of the stories for calibration, second half held out for evaluation."""
    text = source.read_text()
    cut = text.index("\n", len(text) // 2)
    calib, heldout = folder / "calib.txt", folder / "heldout.txt"
    calib.write_text(text[:cut])
    heldout.write_text(text[cut:])
    return calib, heldout


def run(model: Path, group_size: int, rank: int, samples: int, seq_len: int, max_tokens: int) -> dict:
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        calib, heldout = split_text(DATA / "tinystories_val.txt", Path(tmp))
        evals = {"TinyStories (held out)": str(heldout), "WikiText-2": str(DATA / "wikitext2_test.raw")}

        def measure(name: str, path: str) -> None:
            rows[name] = {k: evaluate(path, v, seq_len, max_tokens)["perplexity"] for k, v in evals.items()}
            print(name, rows[name], flush=True)

        measure("FP32", str(model))
        for name, overrides in VARIANTS.items():
            settings = dict(group_size=group_size, rank=rank, samples=samples, seq_len=seq_len, dataset=str(calib))
            options = CalibrationOptions(**{**settings, **overrides})
            measure(name, str(calibrate(model, Path(tmp) / name.split()[0], options)))
    return {"model": str(model.name), "group_size": group_size, "rank": rank, "samples": samples,
            "seq_len": seq_len, "max_eval_tokens": max_tokens, "perplexity": rows}


def markdown(result: dict) -> str:
    datasets = list(next(iter(result["perplexity"].values())))
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---|" * len(datasets)]
    for name, row in result["perplexity"].items():
        lines.append(f"| {name} | " + " | ".join(f"{row[d]:.4f}" for d in datasets) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DATA / "stories260k")
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=40000)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args()
    result = run(args.model, args.group_size, args.rank, args.samples, args.seq_len, args.max_tokens)
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
