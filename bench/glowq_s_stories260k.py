"""GlowQ-S on stories260K: perplexity against restored units for every importance metric, and
the automatic choice.

    python bench/glowq_s_stories260k.py [--out-dir docs/glowq_s]

Calibrates GlowQ (group size 32, rank 8) on the first half of the TinyStories validation text,
sweeps every metric on the held-out second half (docs/glowq_s/sweep.{csv,png,json}), then
calibrates again with `--restore auto` (elbow on held-out calibration windows) and measures the
chosen checkpoint (docs/glowq_s/auto.json).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from accuracy_stories260k import DATA, split_text

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.calibrate import load_report
from offline_calibrate.evaluate import evaluate
from offline_calibrate.sweep import sweep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=DATA / "stories260k")
    parser.add_argument("--out-dir", type=Path, default=Path("docs/glowq_s"))
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=20000)
    args = parser.parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        calib, heldout = split_text(DATA / "tinystories_val.txt", Path(tmp))
        base = dict(group_size=32, rank=8, samples=32, seq_len=args.seq_len, dataset=str(calib))
        full = calibrate(args.model, Path(tmp) / "full", CalibrationOptions(**base))
        curves = sweep(str(full), str(heldout), str(args.out_dir / "sweep"), args.seq_len, args.max_tokens)
        print(json.dumps(curves, indent=2), flush=True)
        auto_options = CalibrationOptions(**base, restore="auto", metric=curves["best_metric"])
        auto = calibrate(args.model, Path(tmp) / "auto", auto_options)
        report = load_report(auto)
        measured = evaluate(str(auto), str(heldout), args.seq_len, args.max_tokens)
        summary = {
            "metric": curves["best_metric"],
            "restored_units": report["selection"]["restored"],
            "units": curves["units"],
            "extra_bytes": sum(u["extra_params"] * 2 for u in report["units"] if u["restored"]),
            "full_extra_bytes": sum(u["extra_params"] * 2 for u in report["units"]),
            "heldout_perplexity": measured["perplexity"],
            "plain_int4_perplexity": curves["plain_int4_perplexity"],
            "full_perplexity": curves["full_perplexity"],
            "selection_curve_on_calibration_heldout": report["selection"]["curve"],
        }
        (args.out_dir / "auto.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
