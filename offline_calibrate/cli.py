"""Command lines: `glowq-calibrate` and `glowq-eval` (also `python -m offline_calibrate`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable

from .options import CalibrationOptions

# Errors a user can cause (bad paths, configs, options, data): printed as one line, exit 2.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError)
MODEL_HELP = "a Hugging Face model folder, a .gguf file, or a hub id (from the hub, or its cache offline)"
GGUF_FILE_HELP = "the GGUF file inside the MODEL folder or hub repository (needs the gguf and accelerate packages)"


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _window_length(text: str) -> int:
    value = int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 (a token and the next one to predict), got {text}")
    return value


def calibrate_parser() -> argparse.ArgumentParser:
    d = CalibrationOptions()
    p = argparse.ArgumentParser(
        prog="glowq-calibrate",
        description="Quantize a Hugging Face causal LM to int4 with GlowQ's group-shared low-rank correction.",
    )
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--gguf-file", default=None, help=GGUF_FILE_HELP)
    p.add_argument("--output", "-o", required=True, help="checkpoint folder to create")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    q = p.add_argument_group("quantization")
    q.add_argument("--bits", type=int, default=d.bits, help="weight bits (only 4)")
    q.add_argument("--group-size", type=int, default=d.group_size, help="inputs per scale group, -1 = per row")
    q.add_argument("--sym", action=argparse.BooleanOptionalAction, default=d.sym, help="symmetric int4")
    q.add_argument("--rank", type=int, default=d.rank, help="correction rank (0 = plain round-to-nearest int4)")
    q.add_argument("--share", choices=["group", "module"], default=d.share,
                   help="group: one B per input-sharing group (GlowQ); module: one B per module (baseline)")
    c = p.add_argument_group("calibration data")
    c.add_argument("--dataset", default=d.dataset,
                   help="a UTF-8 .txt/.jsonl/.json file, a `datasets` name (NAME[:CONFIG[:SPLIT]]), or 'random' tokens")
    c.add_argument("--samples", type=int, default=d.samples, help="calibration sequences")
    c.add_argument("--seq-len", type=int, default=d.seq_len,
                   help="tokens per sequence (default: 2048, or the model's max_position_embeddings when smaller)")
    c.add_argument("--seed", type=int, default=d.seed)
    c.add_argument("--shrinkage", type=float, default=d.shrinkage, help="covariance shrinkage toward identity")
    s = p.add_argument_group("factorization")
    s.add_argument("--svd", choices=["auto", "exact", "randomized"], default=d.svd)
    s.add_argument("--oversample", type=int, default=d.oversample)
    s.add_argument("--power-iters", type=int, default=d.power_iters)
    s.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:1 ...")
    r = p.add_argument_group("GlowQ-S selective restoration")
    r.add_argument("--restore", default=d.restore,
                   help="all | auto | FRACTION (e.g. 0.5) | COUNT (e.g. 12): units that keep their correction")
    r.add_argument("--metric", default=d.metric, help="importance metric ranking the units")
    r.add_argument("--max-extra-bytes", type=int, default=None, help="cap on the factors' bytes")
    r.add_argument("--heldout-samples", type=_positive_int, default=d.heldout_samples,
                   help="held-out sequences for --restore auto")
    return p


def _run(fn: Callable[[], None], prog: str) -> None:
    try:
        fn()
    except USER_ERRORS as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted; nothing was written", file=sys.stderr)
        sys.exit(130)


def calibrate_main(argv: list[str] | None = None) -> None:
    args = calibrate_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    def run() -> None:
        from .calibrate import calibrate

        fields = CalibrationOptions.__dataclass_fields__
        options = CalibrationOptions(**{k: v for k, v in vars(args).items() if k in fields})
        out = calibrate(args.model, args.output, options, overwrite=args.overwrite, gguf_file=args.gguf_file)
        print(out)

    _run(run, "glowq-calibrate")


def eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="glowq-eval", description="Perplexity of a GlowQ checkpoint or of a plain model (HF folder or GGUF file)."
    )
    p.add_argument("model", help=f"a GlowQ checkpoint folder, or {MODEL_HELP}")
    p.add_argument("--gguf-file", default=None, help=GGUF_FILE_HELP)
    p.add_argument("--dataset", required=True, help="a UTF-8 .txt, .jsonl or .json file")
    p.add_argument("--seq-len", type=_window_length, default=512, help="tokens per window (BOS included)")
    p.add_argument("--max-tokens", type=_positive_int, default=None, help="evaluate at most this many tokens")
    p.add_argument("--sweep", metavar="OUT_PREFIX", default=None,
                   help="GlowQ-S sweep: perplexity vs restored units per metric -> OUT_PREFIX.csv and .png")
    p.add_argument("--metrics", default=None, help="comma-separated metrics for --sweep (default: all)")
    return p


def eval_main(argv: list[str] | None = None) -> None:
    parser = eval_parser()
    args = parser.parse_args(argv)
    if args.sweep and args.gguf_file:
        parser.error("--sweep takes a GlowQ checkpoint calibrated with --restore all, not a GGUF file; "
                     "drop --gguf-file")

    def run() -> None:
        if args.sweep:
            from .sweep import sweep

            metrics = args.metrics.split(",") if args.metrics else None
            result = sweep(args.model, args.dataset, args.sweep, args.seq_len, args.max_tokens, metrics)
        else:
            from .evaluate import evaluate

            result = evaluate(args.model, args.dataset, args.seq_len, args.max_tokens, args.gguf_file)
        print(json.dumps(result, indent=2))

    _run(run, "glowq-eval")
