"""docs/benchmarks.md from the H200 run's JSON files (bench/results/).

    python bench/report.py [--results bench/results] [--out docs/benchmarks.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

NAMES = {
    "bf16": "bf16 (unquantized)",
    "gptq": "plain int4, vLLM in-tree GPTQ",
    "int4": "plain int4, GlowQ plugin (no factors)",
    "glowq": "GlowQ, rank 64 (shared B)",
    "permodule": "per-module correction, rank 64",
    "glowq_s": "GlowQ-S, half of the units",
    "lora": "per-module correction as a LoRA adapter (GPTQ + --enable-lora)",
    "marlin": "plain int4, vLLM GPTQ with Marlin forced",
    "fp8": "FP8 on the bf16 model",
    "glowq_own": "GlowQ through the project's kernel",
    "int4_own": "plain int4 through the project's kernel",
    "glowq_vllm": "GlowQ on vLLM's kernel, the correction on a side stream",
    "glowq_int8": "GlowQ, the experts' factors in int8",
    "glowq_full": "GlowQ, the experts' factors in the model's dtype",
}
COMMANDS = {
    "prepare": "bash bench/run_h200.sh prepare",
    "calibrate": "bash bench/run_h200.sh calibrate",
    "vllm-main": "bash bench/run_h200.sh vllm-main",
    "vllm-rest": "bash bench/run_h200.sh vllm-rest",
    "path-fused": "VLLM_GLOWQ_CORRECTION=fused bash bench/run_h200.sh vllm glowq glowq_s",
    "path-split": "VLLM_GLOWQ_CORRECTION=split bash bench/run_h200.sh vllm gptq glowq",
    "gpu-tests": "bash bench/run_h200.sh gpu-tests",
    "kernel": "GLOWQ_BENCH_SWEEP=1 bash bench/run_h200.sh kernel",
    "issue10": "GLOWQ_BENCH_BUDGET_S=560 bash bench/run_h200.sh vllm gptq glowq lora int4_own",
    "issue10-own": "GLOWQ_BENCH_BUDGET_S=560 bash bench/run_h200.sh vllm gptq glowq_own int4_own  # vllm_own_2026-12-04",
    "kernel-tests": "GLOWQ_GPU_TESTS_WORKERS=12 GLOWQ_GPU_TESTS_SELECT=fragments bash bench/run_h200.sh gpu-tests "
                    "tests/test_kernels.py",
    "kernel-alone": "cd bench && python3 kernel_microbench.py --no-vllm --sweep --out micro_own.json",
    "wgmma-tests": "GLOWQ_GPU_TESTS_WORKERS=8 GLOWQ_GPU_TESTS_SELECT=warpgroup bash bench/run_h200.sh gpu-tests "
                   "tests/test_kernels.py",
    "wgmma-sweep": "GLOWQ_BENCH_NO_VLLM=1 GLOWQ_BENCH_SWEEP=wgmma GLOWQ_BENCH_TOKENS=8,16,32,64,128,256,512 "
                   "bash bench/run_h200.sh kernel  # kernel/micro_wgmma_sweep2_2026-12-04.json",
    "kernel-tests-wgmma": "GLOWQ_GPU_TESTS_WORKERS=12 GLOWQ_GPU_TESTS_SELECT='fragments or warpgroup' bash "
                          "bench/run_h200.sh gpu-tests tests/test_kernels.py",
    "kernel-vs-vllm": "GLOWQ_BENCH_TOKENS=1,16,64,128,256,512,2048 bash bench/run_h200.sh kernel  "
                      "# kernel/micro_vs_vllm_wgmma_2026-12-04.json",
    "issue10-wgmma": "GLOWQ_BENCH_BUDGET_S=540 bash bench/run_h200.sh vllm gptq glowq_own int4_own  # vllm_wgmma_2026-12-04",
    "issue10-anchors": "GLOWQ_BENCH_BUDGET_S=360 bash bench/run_h200.sh vllm glowq_own marlin fp8  "
                       "# vllm_wgmma_anchors_2026-12-04",
    "plugin-tests": "bash bench/run_h200.sh gpu-tests tests/test_plugin_gpu.py",
    **{stage: f"bash bench/run_h200.sh {stage}" for stage in ("moe-prepare", "moe-calibrate", "moe-vllm", "moe-vllm-rest", "moe-micro")},
    "moe-micro-paths": "GLOWQ_BENCH_BREAKDOWN=1 GLOWQ_BENCH_MOE_TOKENS=1,16,64,256 "
                       "GLOWQ_BENCH_MOE_PATHS=plain,folded,grouped,grouped_in_callbacks bash bench/run_h200.sh moe-micro  "
                       "# moe_micro_h100_2026-12-07_run3",
}
# Runs in report order; the targets come from the first run that measured them. Runs named
# *before_op* are the previous session's (correction as two cuBLAS GEMMs in series).
RUN_ORDER = ("vllm_wgmma_2026-12-04", "vllm_wgmma_anchors_2026-12-04", "vllm_own_2026-12-04", "vllm_main", "vllm_overlap_first", "vllm_path_split", "vllm_path_fused",
             "vllm_before_op_main", "vllm_before_op_rest", "vllm_issue10")


def _run_rank(path: Path) -> tuple[int, str]:
    return (RUN_ORDER.index(path.stem) if path.stem in RUN_ORDER else len(RUN_ORDER), path.stem)


def load(path: Path) -> Any:
    return json.loads(path.read_text()) if path.exists() else None


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def verdict(value: float | None, limit: float, higher_is_better: bool) -> str:
    if value is None:
        return "not measured"
    ok = value >= limit if higher_is_better else value <= limit
    return "met" if ok else "**missed**"


def vllm_section(vllm: dict) -> tuple[list[str], dict[str, float | None]]:
    variants = vllm.get("variants", {})
    lines = [
        "| checkpoint | throughput, output tok/s | TTFT 2048-token prompt (ms) | decode ms/step b=1 "
        "| b=16 | b=64 | decode tok/s b=64 | engine start (s) | int4 kernel |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, v in variants.items():
        label = NAMES.get(name, name)
        if "error" in v and "decode" not in v:
            lines.append(f"| {label} | error: {v['error'][:120]} | | | | | | | |")
            continue
        d = v.get("decode", {})
        cell = lambda b, key: fmt(d.get(b, {}).get(key), 3 if key == "latency_ms" else 0)  # noqa: E731
        lines.append(
            f"| {label} | {fmt(v.get('throughput', {}).get('output_tok_s'), 0)} | {fmt(v.get('ttft', {}).get('median_ms'))} "
            f"| {cell('1', 'latency_ms')} | {cell('16', 'latency_ms')} | {cell('64', 'latency_ms')} "
            f"| {cell('64', 'tok_s')} | {fmt(v.get('engine_start_s'), 0)} | {', '.join(v.get('kernels', [])) or 'not logged'} |"
        )
    get = lambda name, *keys: _dig(variants.get(name), keys)  # noqa: E731
    figures = {
        "glowq_vs_int4_b64": ratio(get("glowq", "decode", "64", "tok_s"), get("gptq", "decode", "64", "tok_s")),
        "glowq_vs_permodule_b64": ratio(get("glowq", "decode", "64", "tok_s"), get("permodule", "decode", "64", "tok_s")),
        "glowq_s_vs_int4_b64": ratio(get("glowq_s", "decode", "64", "tok_s"), get("gptq", "decode", "64", "tok_s")),
        "ttft_glowq_vs_int4": ratio(get("glowq", "ttft", "median_ms"), get("gptq", "ttft", "median_ms")),
        "tput_glowq_vs_int4": ratio(get("glowq", "throughput", "output_tok_s"), get("gptq", "throughput", "output_tok_s")),
        "tput_glowq_vs_permodule": ratio(get("glowq", "throughput", "output_tok_s"),
                                         get("permodule", "throughput", "output_tok_s")),
        "tput_glowq_s_vs_int4": ratio(get("glowq_s", "throughput", "output_tok_s"),
                                      get("gptq", "throughput", "output_tok_s")),
        "plugin_int4_vs_gptq_b64": ratio(get("int4", "decode", "64", "tok_s"), get("gptq", "decode", "64", "tok_s")),
    }
    return lines, figures


def _dig(d: Any, keys: tuple) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def micro_section(micro: dict) -> list[str]:
    bw = micro["copy_bandwidth_Bps"]
    lines = [
        f"Measured device-to-device copy bandwidth: **{bw / 1e12:.2f} TB/s** (bytes read + written); "
        f"{micro.get('sm_count', '?')} SMs; Triton {micro.get('triton', '?')}. Rank {micro['rank']}, bf16. "
        "Microseconds per call from CUDA-graph replays over rotating buffers larger than L2: `two_gemm` is the "
        "plugin's old path (`F.linear(x, B)` then `torch.addmm(y, R, A.t())`), `fused` the single-launch Triton "
        f"kernel (up to {micro.get('fused_max_tokens', '?')} tokens; above that the op runs `split`), `split` cuBLAS "
        "shrink + Triton expand. These are the op's serial paths; its default decode path overlaps the int4 GEMM "
        "and is measured in vLLM above. `MB` is what the op must move (x, B, A, y, out); "
        "`int4 ideal` is the layer's int4 codes + scales moved at the copy bandwidth, the floor of the base GEMM "
        "the correction is added to.",
        "",
        "| layer | mode | tokens | two_gemm us | fused us | split us | fused / two_gemm | MB | fused % of copy bw "
        "| int4 ideal us | fused / int4 ideal |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in micro["rows"]:
        us = r["us"]
        lines.append(
            f"| {r['layer']} | {r['mode']} | {r['tokens']} | {us['two_gemm']:.2f} | {us['fused']:.2f} | {us['split']:.2f} "
            f"| {us['fused'] / us['two_gemm']:.2f} | {r['bytes'] / 1e6:.2f} "
            f"| {100 * r['bytes'] / (us['fused'] * 1e-6) / bw:.1f} | {r['int4_ideal_us']:.2f} "
            f"| {us['fused'] / r['int4_ideal_us']:.2f} |"
        )
    if micro.get("sweep"):
        lines += ["", f"Triton launch configurations (`--sweep`; fused up to 256 tokens, split above), us per call, "
                      f"{micro.get('sweep_note', '')}:", "",
                  "| layer | tokens | " + " | ".join(_sweep_names(micro)) + " |",
                  "| --- | ---: |" + " ---: |" * len(_sweep_names(micro))]
        cells: dict[tuple, dict] = {}
        for s in micro["sweep"]:
            cells.setdefault((s["layer"], s["tokens"]), {})[s["config"]] = s["us"]
        for (layer, tokens), by_name in cells.items():
            lines.append(f"| {layer} | {tokens} | " + " | ".join(fmt(by_name.get(n)) for n in _sweep_names(micro)) + " |")
    return lines


def _sweep_names(micro: dict) -> list[str]:
    return list(dict.fromkeys(s["config"] for s in micro["sweep"]))


# The kernel microbenchmark beside vLLM's kernels in one call (the targets' figures), and the
# latest one of the project's kernel alone.
KERNEL_RUN = "micro_vs_vllm_wgmma_2026-12-04.json"
KERNEL_RUN_LATEST: str | None = None  # a later call of the project's kernel alone, if there is one
KERNEL_RUN_LATEST_TITLE = ""
KERNEL_COLUMNS = ("glowq", "int4", "machete", "marlin", "machete+corr", "glowq_dense", "int4_dense", "glowq_triton",
                  "int4_triton", "bf16")
LAYER_ORDER = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


KERNEL_CAPTION = (
    "`glowq` / `int4`: the project's tensor-core kernel (kernels/w4a16_mma.py, Gluon) with / without the correction, "
    "as forward() runs it: one launch up to WGMMA_MAX_TOKENS (512; mma.sync up to 16 tokens, Hopper's warpgroup MMA "
    "above), dequantize + cuBLAS beyond; `glowq_dense` / `int4_dense`: dequantize + cuBLAS where forward() runs the "
    "warpgroup MMA instead; `machete`, `marlin`: vLLM "
    "0.26's int4 kernels on the same codes; `machete+corr`: the plugin's default path (Machete with the correction "
    "on a side stream, torch.ops.glowq.linear); `glowq_triton` / `int4_triton`: the project's earlier Triton kernel "
    "(kernels/w4a16_triton.py); `bf16`: cuBLAS on the dense weight.")
TENSOR_CORE_COLUMNS = ("glowq", "int4", "glowq_triton", "int4_triton", "bf16")
TENSOR_CORE_CAPTION = (
    "`glowq` / `int4`: the tensor-core kernel (kernels/w4a16_mma.py, Gluon) with / without the correction; "
    "`glowq_triton` / `int4_triton`: the Triton kernel (kernels/w4a16_triton.py), which the table above measured; "
    "`bf16`: cuBLAS on the dense weight. vLLM was not installed in this call (a second machine the same day): its "
    "kernels are in the table above.")


def kernel_section(micro: dict, columns: tuple[str, ...] = KERNEL_COLUMNS,
                   caption: str = KERNEL_CAPTION) -> tuple[list[str], dict[str, float | None]]:
    """The project's W4A16 kernel beside vLLM's, per layer and per decoder layer (issue 10)."""
    bw = micro["copy_bandwidth"]
    lines = [
        f"`python bench/kernel_microbench.py` on {micro['device']} (Triton {micro['triton']}, torch {micro['torch']}), "
        f"Llama-3-8B layer shapes, int4 g{micro['group_size']} symmetric, rank {micro['rank']}, bf16; copy bandwidth "
        f"{bw / 1e12:.2f} TB/s. Microseconds per call, each from one CUDA graph that calls the kernel once per weight "
        "copy (enough copies to overflow L2), median of 7 replays; in brackets the bytes the kernel must move over its "
        f"time, as a percentage of the copy bandwidth. {caption}",
        "",
        "| layer | tokens | " + " | ".join(columns) + " |",
        "| --- | ---: |" + " ---: |" * len(columns),
    ]
    totals: dict[int, dict[str, float]] = {}
    for r in micro["rows"]:
        cells = []
        for name in columns:
            us = r["us"].get(name)
            cells.append("n/a" if us is None else f"{us:.1f} ({100 * r['bandwidth_fraction'][name]:.0f}%)")
            if us is not None:
                totals.setdefault(r["tokens"], {}).setdefault(name, 0.0)
                totals[r["tokens"]][name] += us
        lines.append(f"| {r['layer']} | {r['tokens']} | " + " | ".join(cells) + " |")
    beside_vllm = "machete" in columns or "marlin" in columns
    ratios = " | int4: ours / best vLLM | glowq / machete+corr |" if beside_vllm else " |"
    lines += ["", "Per decoder layer (the four layers' sum)" + (", and the project's kernel against vLLM's best:"
                                                              if beside_vllm else ":"), "",
              "| tokens | " + " | ".join(columns) + ratios,
              "| ---: |" + " ---: |" * (len(columns) + 2 * beside_vllm)]
    figures: dict[str, float | None] = {}
    for tokens, t in sorted(totals.items()):
        best = min(t.get("machete", float("inf")), t.get("marlin", float("inf")))
        own = ratio(best, t.get("int4"))  # speed ratio: > 1 means the project's kernel is faster
        corr = ratio(t.get("machete+corr"), t.get("glowq"))
        figures[f"kernel_int4_vs_best_vllm_t{tokens}"] = own
        figures[f"kernel_glowq_vs_machete_corr_t{tokens}"] = corr
        lines.append(f"| {tokens} | " + " | ".join(fmt(t.get(n), 1) for n in columns)
                     + (f" | {fmt(own)} x | {fmt(corr)} x |" if beside_vllm else " |"))
    return lines, figures


def calibration_section(cal: dict) -> list[str]:
    t = cal["timings_s"]
    o = cal["options"]
    return [
        "| wall time | peak GPU memory (allocated) | peak GPU reserved | peak CPU RSS | units |",
        "| ---: | ---: | ---: | ---: | ---: |",
        f"| {cal['wall_s']:.1f} s | {cal['peak_gpu_allocated_gib']:.2f} GiB | {cal['peak_gpu_reserved_gib']:.2f} GiB "
        f"| {cal['peak_cpu_rss_gib']:.1f} GiB | {cal['units']} |",
        "",
        "Phases (s): " + ", ".join(f"{k} {v:.1f}" for k, v in t.items()),
        "",
        f"Options: rank {o['rank']}, group {o['group_size']}, sym {o['sym']}, share {o['share']}, "
        f"{o['samples']} x {o['seq_len']} random tokens, svd {o['svd']}, device {cal['device']}, torch {cal['torch']}.",
    ]


# Issue 10's targets: (name, what, target, higher is better). Engine ratios come from one vLLM
# run (ENGINE_RATIOS), kernel ratios from the microbenchmark (kernel_section).
ISSUE10_TARGETS = [
    ("glowq_decode_vs_int4_default_b1", "GlowQ decode b=1 / plain int4 (vLLM default kernel)", 1.00, True),
    ("glowq_decode_vs_int4_default_b16", "GlowQ decode b=16 / plain int4 (vLLM default kernel)", 1.00, True),
    ("glowq_decode_vs_int4_default_b64", "GlowQ decode b=64 / plain int4 (vLLM default kernel)", 1.00, True),
    ("glowq_decode_vs_int4_marlin_b1", "GlowQ decode b=1 / plain int4 on Marlin", 1.00, True),
    ("glowq_decode_vs_int4_marlin_b16", "GlowQ decode b=16 / plain int4 on Marlin", 1.00, True),
    ("glowq_decode_vs_fp8_b1", "GlowQ decode b=1 / FP8", 1.00, True),
    ("glowq_decode_vs_fp8_b16", "GlowQ decode b=16 / FP8", 1.00, True),
    ("glowq_throughput_vs_int4_default", "GlowQ output throughput / plain int4 (default kernel)", 0.95, True),
    ("glowq_ttft_vs_int4_default", "GlowQ TTFT / plain int4 (default kernel)", 1.05, False),
    ("glowq_decode_vs_lora_b16", "GlowQ decode b=16 / per-module correction as a LoRA adapter", 1.30, True),
    ("glowq_decode_vs_lora_b64", "GlowQ decode b=64 / per-module correction as a LoRA adapter", 1.30, True),
    ("own_int4_vs_best_vllm_b1", "plain int4 decode b=1, project's kernel / vLLM's best int4", 1.10, True),
    ("own_int4_vs_best_vllm_b16", "plain int4 decode b=16, project's kernel / vLLM's best int4", 1.10, True),
    ("kernel_int4_vs_best_vllm_t1", "kernel only, per decoder layer, 1 token: plain int4, ours / best vLLM (speed)",
     1.10, True),
    ("kernel_int4_vs_best_vllm_t16", "kernel only, per decoder layer, 16 tokens: plain int4, ours / best vLLM (speed)",
     1.10, True),
    ("kernel_glowq_vs_machete_corr_t1", "kernel only, per decoder layer, 1 token: GlowQ, ours / Machete + side-stream "
     "correction (speed)", 1.00, True),
    ("kernel_glowq_vs_machete_corr_t16", "kernel only, per decoder layer, 16 tokens: GlowQ, ours / Machete + "
     "side-stream correction (speed)", 1.00, True),
    ("kernel_glowq_vs_machete_corr_t64", "kernel only, per decoder layer, 64 tokens: GlowQ, ours / Machete + "
     "side-stream correction (speed)", 1.00, True),
]
# Engine targets: (measure, variants, anchors, batch), variants in order of preference: GlowQ
# through the project's kernel (VLLM_GLOWQ_KERNEL=glowq), else as the plugin's auto serves it.
# Decode and throughput are speed ratios (variant over anchor, > 1 is faster), TTFT a time
# ratio; with several anchors the best counts.
GLOWQ = ("glowq_own", "glowq")
ENGINE_RATIOS = {
    **{f"glowq_decode_vs_int4_default_b{b}": ("decode", GLOWQ, ("gptq",), b) for b in ("1", "16", "64")},
    **{f"glowq_decode_vs_int4_marlin_b{b}": ("decode", GLOWQ, ("marlin",), b) for b in ("1", "16")},
    **{f"glowq_decode_vs_fp8_b{b}": ("decode", GLOWQ, ("fp8",), b) for b in ("1", "16")},
    **{f"glowq_decode_vs_lora_b{b}": ("decode", GLOWQ, ("lora",), b) for b in ("16", "64")},
    **{f"own_int4_vs_best_vllm_b{b}": ("decode", ("int4_own",), ("gptq", "marlin"), b) for b in ("1", "16")},
    "glowq_throughput_vs_int4_default": ("throughput", GLOWQ, ("gptq",), None),
    "glowq_ttft_vs_int4_default": ("ttft", GLOWQ, ("gptq",), None),
}


def _engine_value(variant: dict | None, measure: str, batch: str | None) -> float | None:
    """Speed (tokens/s) for decode and throughput, milliseconds for TTFT."""
    if measure == "decode":
        return _dig(variant, ("decode", batch, "tok_s"))
    if measure == "throughput":
        return _dig(variant, ("throughput", "output_tok_s"))
    return _dig(variant, ("ttft", "median_ms"))


def _side_by_side_ratio(runs: dict[str, dict], measure: str, candidates: tuple[str, ...], anchors: tuple[str, ...],
                        batch: str | None) -> tuple[float, str] | None:
    """The first (variant, run) pair, preferred variant first and runs in RUN_ORDER, whose run
    measured the variant and all the anchors: the ratio over the best anchor, and its source."""
    for variant in candidates:
        for run_name, run in runs.items():
            variants = run.get("variants", {})
            value = _engine_value(variants.get(variant), measure, batch)
            anchor_values = [_engine_value(variants.get(a), measure, batch) for a in anchors]
            if value is not None and None not in anchor_values:
                best = min(anchor_values) if measure == "ttft" else max(anchor_values)
                return ratio(value, best), f"`{run_name}` (`{variant}`)"
    return None


def issue10_engine_figures(runs: dict[str, dict]) -> tuple[dict[str, float | None], dict[str, str]]:
    """Each engine ratio measured side by side in one run; also where each came from."""
    figures, sources = {}, {}
    for name, (measure, candidates, anchors, batch) in ENGINE_RATIOS.items():
        found = _side_by_side_ratio(runs, measure, candidates, anchors, batch)
        if found:
            figures[name], sources[name] = found
    return figures, sources


def issue10_targets(figures: dict[str, float | None], sources: dict[str, str], meta: dict,
                    results: Path) -> list[str]:
    """The target table, also written as results/targets.json ({name: {measured, target, met, note}})."""
    notes = meta.get("issue10_notes", {})
    table, lines = {}, ["### Targets (issue 10)", "", "| target | measured | target | verdict |",
                        "| --- | ---: | ---: | --- |"]
    for name, what, target, higher in ISSUE10_TARGETS:
        measured = figures.get(name)
        met = measured is not None and (measured >= target if higher else measured <= target)
        note = "; ".join(filter(None, [f"run {sources[name]}" if name in sources else "", notes.get(name, "")]))
        if measured is None and not note:
            note = notes.get("engine_runs", "not run")
        table[name] = {"measured": None if measured is None else round(measured, 3), "target": target, "met": met,
                       "note": note}
        if measured is None:
            shown, verdict_text = "not run", note
        else:
            shown, verdict_text = f"{measured:.2f}", ("met" if met else "**missed**") + (f"; {note}" if note else "")
        lines.append(f"| {what} | {shown} | {'>=' if higher else '<='} {target:.2f} | {verdict_text} |")
    (results / "targets.json").write_text(json.dumps(table, indent=1) + "\n")
    return lines + [""]


def build(results: Path) -> str:
    runs = {f.stem: load(f) for f in sorted(results.glob("vllm*.json"), key=_run_rank)
            if not f.stem.startswith(MOE_RUN_PREFIX)}
    micro, cal = load(results / "micro.json"), load(results / "calibration.json")
    meta = load(results / "meta.json") or {}
    gpu = (results / "gpu.txt").read_text().strip() if (results / "gpu.txt").exists() else "unknown"
    versions = {}
    for run in runs.values():
        for v in run.get("variants", {}).values():
            versions = v.get("versions") or versions
    out = ["# GPU benchmarks", ""]
    out += [f"Machine: `{gpu.splitlines()[-1] if gpu else gpu}`; vLLM {versions.get('vllm', '?')}, "
            f"torch {versions.get('torch', '?')}. Model: Llama-3-8B shapes (hidden 4096, intermediate 14336, 32 layers, "
            "32 heads / 8 KV heads, vocab 128256), random bf16 weights (`bench/make_model.py`), int4 g128 symmetric "
            "codes shared by every int4 checkpoint. Raw results: `bench/results/`.", ""]
    kernel = load(results / "kernel" / KERNEL_RUN)
    if kernel:
        lines, kernel_figures = kernel_section(kernel)
        engine_figures, sources = issue10_engine_figures(runs)
        out += ["## The project's W4A16 kernel (issue 10)", ""] + [f"- {n}" for n in meta.get("kernel_notes", [])]
        out += [""] + lines + [""]
        tensor_core = KERNEL_RUN_LATEST and load(results / "kernel" / KERNEL_RUN_LATEST)
        if tensor_core:
            out += [f"### {KERNEL_RUN_LATEST_TITLE}", ""]
            out += kernel_section(tensor_core, TENSOR_CORE_COLUMNS, TENSOR_CORE_CAPTION)[0] + [""]
        out += meta.get("kernel_analysis", []) + [""]
        out += issue10_targets({**kernel_figures, **engine_figures}, sources, meta, results)
    out += ["## The correction beside vLLM's kernels (issue 5)", ""]
    if meta.get("notes"):
        out += [f"- {note}" for note in meta["notes"]] + [""]
    out += ["## Commands", "", "On the H200 machine, after installing vLLM 0.26 into /tmp/site "
            "(../shared/gpu/README.md; `scripts/slim-wheelhouse.sh` repacks its wheelhouse into three parts, "
            "so three install calls carrying `.gpu3/` instead of four) and carrying `.whl/loguru-*.whl` (`pip download --no-deps loguru`; "
            "`run_h200.sh` installs it), each stage one device call (10-minute limit per call); "
            "`bash bench/run_h200.sh all` runs them in one go:", "", "```"]
    out += list(COMMANDS.values()) + ["python bench/report.py   # here: this file", "```", ""]
    figures: dict[str, float | None] = {}
    for run_name, vllm in runs.items():
        lines, run_figures = vllm_section(vllm)
        for key, value in run_figures.items():
            if figures.get(key) is None:
                figures[key] = value
        p = vllm.get("profile", {})
        out += [f"## vLLM serving speed: run `{run_name}` (engines one after another in one device call)", "",
                f"torch.compile + CUDA graphs (capture sizes {p.get('cudagraph_capture_sizes')}), "
                f"max_model_len {p.get('max_model_len')}, gpu_memory_utilization {p.get('gpu_memory_utilization')}, "
                "prefix caching off, greedy, ignore_eos, random prompt tokens. Decode latency = (time for 1 + "
                f"{p.get('decode_steps')} tokens - time for 1 token) / {p.get('decode_steps')}, "
                f"{p.get('decode_prompt')}-token prompts, median of {p.get('decode_reps')}; TTFT = wall time of a "
                f"1-token generation, median of {p.get('ttft_reps')}; throughput: {p.get('throughput_prompts')} prompts x "
                f"{p.get('throughput_in')} tokens in, {p.get('throughput_out')} out.", ""] + lines + [""]
        if vllm.get("note"):  # how a run departed from one call, written when its JSON was assembled
            out += [f"Note: {vllm['note']}.", ""]
        if vllm.get("skipped"):
            out += [f"Skipped in this call (time limit): {', '.join(vllm['skipped'])}.", ""]
        checks = vllm.get("token_checks", [])
        for c in checks:
            out.append(f"- Greedy tokens {c['pair'][0]} vs {c['pair'][1]}: {c['identical_sequences']}/{c['sequences']} "
                       f"sequences identical, {c['matching_tokens']}/{c['tokens']} tokens.")
        out.append("")
    out += ["## Targets", "", "| target | measured | verdict |", "| --- | ---: | --- |"]
    rows = [
        ("GlowQ decode throughput at batch 64 >= 0.90 x plain int4 (GPTQ)", "glowq_vs_int4_b64", 0.90, True),
        ("GlowQ decode throughput at batch 64 >= 1.05 x per-module", "glowq_vs_permodule_b64", 1.05, True),
        ("GlowQ-S (half) decode throughput at batch 64 >= 0.95 x plain int4", "glowq_s_vs_int4_b64", 0.95, True),
        ("TTFT GlowQ <= 1.10 x plain int4", "ttft_glowq_vs_int4", 1.10, False),
    ]
    for label, key, limit, higher in rows:
        caveat = meta.get("verdict_notes", {}).get(key)
        out.append(f"| {label} | {fmt(figures.get(key), 3)} | {verdict(figures.get(key), limit, higher)}"
                   f"{'; ' + caveat if caveat else ''} |")
    if cal:
        out.append(f"| calibration <= 5 min on one H200 | {cal['wall_s'] / 60:.2f} min | "
                   f"{verdict(cal['wall_s'] / 60, 5.0, False)} |")
        out.append(f"| calibration peak GPU memory <= 24 GiB | {cal['peak_gpu_allocated_gib']:.2f} GiB | "
                   f"{verdict(cal['peak_gpu_allocated_gib'], 24.0, False)} |")
        out.append(f"| calibration peak host RSS <= 6 GiB (issue 14) | {cal['peak_cpu_rss_gib']:.2f} GiB | "
                   f"{verdict(cal['peak_cpu_rss_gib'], 6.0, False)} |")
        if "issue14" in cal:
            out.append(f"| calibration time <= 1.10 x the in-memory 87 s (issue 14) | "
                       f"{cal['issue14']['wall_vs_reference']:.3f} x | {verdict(cal['issue14']['wall_vs_reference'], 1.10, False)} |")
    out.append(f"| tensor-parallel 2 gives the same greedy tokens as 1 | {meta.get('tp2', 'not run')} | "
               f"{meta.get('tp2_verdict', 'not run')} |")
    out += ["", "Ratios are taken within one run (each run has its own GPTQ anchor). Other ratios: " + ", ".join(
        f"{k} {fmt(v, 3)}" for k, v in figures.items() if k not in {r[1] for r in rows}), ""]
    if meta.get("analysis"):
        out += ["## Why", ""] + meta["analysis"] + [""]
    out += moe_section(results, meta)
    if cal:
        out += ["## Calibration on the H200", "", "`bench/calibrate_timed.py` (called by the `calibrate` stage).", ""]
        out += calibration_section(cal) + [""]
    if micro:
        out += ["## Correction microbenchmark", "", "`python bench/correction_microbench.py` (the `prepare` stage).", ""]
        out += micro_section(micro) + [""]
    return "\n".join(out)


# ----- Mixture-of-Experts (issue 11) ------------------------------------------------------------

MOE_RUN_PREFIX = "vllm_moe"  # vllm_moe.json (gptq, glowq, bf16), vllm_moe_rest.json (gptq, int4, bf16)
MOE_TARGET = 0.90  # GlowQ >= 0.90 x plain int4 MoE (vLLM's GPTQ-Marlin MoE) at decode and in throughput
MOE_TARGETS = [(f"decode b={b}", "decode", b) for b in ("1", "16", "64")] + [("throughput", "throughput", None)]


def moe_targets(run: dict | None) -> list[tuple[str, float | None]]:
    """Issue 11's ratios from one run: GlowQ's speed over the plain int4 MoE engine's."""
    variants = (run or {}).get("variants", {})
    return [(label, ratio(_engine_value(variants.get("glowq"), measure, batch),
                          _engine_value(variants.get("gptq"), measure, batch))) for label, measure, batch in MOE_TARGETS]


def moe_section(results: Path, meta: dict) -> list[str]:
    """The MoE benchmark when its files are there, otherwise what would run and "not run"."""
    runs = {f.stem: load(f) for f in sorted(results.glob(f"{MOE_RUN_PREFIX}*.json"))}
    cal, model = load(results / "calibration_moe.json"), load(results / "moe_model_config.json")
    options = (cal or {}).get("options", {})
    out = ["## Mixture-of-Experts: Qwen3-30B-A3B shapes (issue 11)", ""]
    if model:
        out += [f"Model: `qwen3_moe` with random bf16 weights (`bench/make_model.py --arch qwen3_moe --shape "
                f"qwen3-30b-a3b --layers auto`): hidden {model.get('hidden_size')}, "
                f"{model.get('num_experts', model.get('num_local_experts'))} experts, "
                f"top-{model.get('num_experts_per_tok')}, expert intermediate {model.get('moe_intermediate_size')}, "
                f"{model.get('num_attention_heads')}/{model.get('num_key_value_heads')} heads of "
                f"{model.get('head_dim')}, vocab {model.get('vocab_size')}; **{model.get('num_hidden_layers')} of the "
                "48 decoder layers** (as many as the disk held with the GlowQ checkpoint and the int4 codes: "
                f"`moe_disk.txt`). int4 g{options.get('group_size', 128)} symmetric codes shared by GlowQ (rank "
                f"{options.get('rank', 64)}, one B per layer for the experts' gate/up), the plugin's plain int4 and the "
                "GPTQ copy that vLLM's in-tree GPTQ-Marlin MoE method runs.", ""]
    out += [f"- {note}" for note in meta.get("moe_notes", [])] + [""]
    out += ["Commands (each one device call): " + ", ".join(f"`{c}`" for k, c in COMMANDS.items() if k.startswith("moe"))
            + ".", ""]
    if cal:
        out += ["Calibration (`bench/calibrate_timed.py`, the `moe-calibrate` stage):", ""] + calibration_section(cal) + [""]
    else:
        out += ["Calibration: not run.", ""]
    for run_name, run in runs.items():
        lines, _ = vllm_section(run)
        out += [f"### vLLM serving speed: run `{run_name}`", ""] + lines + [""]
        if run.get("skipped"):
            out += [f"Skipped in this call (time limit): {', '.join(run['skipped'])}.", ""]
        for c in run.get("token_checks", []):
            out.append(f"- Greedy tokens {c['pair'][0]} vs {c['pair'][1]}: {c['identical_sequences']}/{c['sequences']} "
                       f"sequences identical, {c['matching_tokens']}/{c['tokens']} tokens.")
        out.append("")
    if not runs:
        out += ["vLLM serving speed: not run.", ""]
    micro = load(results / "moe_micro.json")
    out += moe_micro_section(micro)
    for earlier in sorted(results.glob("moe_micro_*.json"), reverse=True):  # other runs: dates and cards in the names
        out += [f"Run `{earlier.stem}`:", ""] + moe_micro_section(load(earlier))
    dense_micro = load(results / "kernel" / "micro_vs_vllm_2026-12-04.json") or {}
    out += moe_floor_section(model, micro, dense_micro.get("copy_bandwidth"))
    table = {}
    out += ["### Targets (issue 11)", "", "| target | measured | verdict |", "| --- | ---: | --- |"]
    for label, value in moe_targets(runs.get(MOE_RUN_PREFIX)):
        table[label] = {"measured": None if value is None else round(value, 3), "target": MOE_TARGET,
                        "met": value is not None and value >= MOE_TARGET}
        shown = "not run" if value is None else f"{value:.3f}"
        verdict_text = "not run" if value is None else verdict(value, MOE_TARGET, True)
        out.append(f"| GlowQ {label} >= {MOE_TARGET:.2f} x plain int4 MoE (GPTQ-Marlin) | {shown} | {verdict_text} |")
    (results / "targets_moe.json").write_text(json.dumps(table, indent=1) + "\n")
    return out + ["", f"Ratios are speeds within run `{MOE_RUN_PREFIX}` (GlowQ and its GPTQ anchor measured minutes "
                      "apart on one machine)."] + [""]


MICRO_PATHS = {  # moe_microbench's paths, as the table heads them
    "folded": "GlowQ folded into Marlin's codes", "grouped": "GlowQ grouped", "grouped_int8": "GlowQ grouped, int8 factors",
    "grouped_r_after_sort": "GlowQ grouped, R forked after the sort",
    "grouped_in_callbacks": "GlowQ grouped, in Marlin's callbacks",
    "grouped_two_sorts": "GlowQ grouped, two sorts", "grouped_serial_r": "GlowQ grouped, R in series",
    "grouped_shrink_in_activation": "GlowQ grouped, w2 shrink in the activation", "fused": "GlowQ fused", "gemv": "GlowQ decode GEMVs on Marlin codes",
    "gemv_plain": "int4 decode GEMVs on Marlin codes", "own": "GlowQ own kernels", "own_plain": "int4 own kernels",
    "own_pairs": "GlowQ own, pairs path", "own_rows": "GlowQ own, rows path", "own_blocks": "GlowQ own, blocks path"}
MICRO_BASELINES = {"plain": "plain int4, Marlin MoE", "own_plain_pairs": "int4 own, pairs path"}


def moe_micro_section(micro: dict | None) -> list[str]:
    """One expert layer per token count: plain Marlin MoE against GlowQ's correction paths and
    the project's own MoE kernels (the paths the run timed)."""
    if not micro:
        return ["Expert-layer microbenchmark (`bench/moe_microbench.py`): not run.", ""]
    paths = [p for p in MICRO_PATHS if any(p in row["us"] for row in micro["rows"])]
    baseline = micro["rows"][0].get("baseline", "plain") if micro["rows"] else "plain"
    paths = [p for p in paths if p != baseline]
    against = "plain int4 Marlin MoE's" if baseline == "plain" else "the same kernels' without factors"
    # runs before 2026-12-08 did not record their command (their notes and the Commands section do)
    title = micro.get("command", "bench/run_h200.sh moe-micro")
    out = [f"### One expert layer (`{title}`)", "",
           f"{micro['device']}, vLLM {micro['vllm'] or 'not installed'}, shapes {micro['shape']}, CUDA graphs over "
           f"{micro['copies']} weight copies; FUSED_MAX_PAIRS was {micro['fused_max_pairs']} in this run (* = the "
           f"Marlin path it chose). Microseconds per layer, and {against} time over each path's (above 1: faster).", "",
           f"| tokens | pairs | {MICRO_BASELINES[baseline]} (us) | " + " | ".join(MICRO_PATHS[p] for p in paths) + " |",
           "| ---: | ---: | ---: | " + " | ".join("---:" for _ in paths) + " |"]
    for row in micro["rows"]:
        us, ratio, mark = row["us"], row["ratio"], {row["default_path"]: "*"}
        cells = [f"{us[p]:.1f}{mark.get(p, '')} ({fmt(ratio.get(p), 2)}x)" if p in us else "-" for p in paths]
        out.append(f"| {row['tokens']} | {row['pairs']} | {us[baseline]:.1f} | " + " | ".join(cells) + " |")
    breakdown = []  # `--breakdown`: where each path's microseconds go
    for row in micro["rows"]:
        for path, times in row.get("kernels", {}).items():
            top = ", ".join(f"`{name}` {us:.1f}" for name, us in list(times.items())[:5] if name != "gaps")
            breakdown.append(f"- {row['tokens']} tokens, {path}: {top}; gaps between kernels {times.get('gaps', 0):.1f} us")
    return (out + ([""] + breakdown if breakdown else []) + [""] + launch_sweep_lines(micro.get("launch_sweep", []))
            + expand_tiles_lines(micro.get("expand_tiles", []))
            + grouped_sweep_lines(micro.get("grouped_sweep", []), micro.get("grouped_constants", {})))


def grouped_sweep_lines(rows: list[dict], shipped: dict) -> list[str]:
    """`--grouped-sweep`: the grouped path's two correction launches alone, as shipped and with
    one launch constant changed at a time."""
    if not rows:
        return []
    base = {r["tokens"]: r["us"] for r in rows if r["constant"] == "shipped"}
    out = ["The grouped path's two correction launches alone (kernels/moe_lowrank_triton.activate and the w2 "
           "expand, on inputs as Marlin's GEMMs leave them), one launch constant changed at a time (shipped: "
           + ", ".join(f"{k} {v}" for k, v in shipped.items()) + "), microseconds per layer:", "",
           "| tokens | constant | value | us | shipped / this | output change |",
           "| ---: | --- | ---: | ---: | ---: | ---: |"]
    out += [f"| {r['tokens']} | {r['constant']} | {'' if r['value'] is None else r['value']} | {r['us']:.1f} | "
            f"{base[r['tokens']] / r['us']:.2f}x | {r['max_change']:.1e} |" for r in rows]
    return out + [""]


def expand_tiles_lines(rows: list[dict]) -> list[str]:
    """The grouped path's w2 expand alone: column tiles per program as shipped against one."""
    if not rows:
        return []
    out = ["The grouped path's w2 expand alone (kernels/moe_lowrank_triton.launch on `activate`'s partials), "
           "microseconds per layer, with the column tiles per program it picks and with one:", "",
           "| tokens | pairs | tiles per program | as shipped (us) | one tile (us) | one tile / shipped | same output |",
           "| ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    out += [f"| {r['tokens']} | {r['pairs']} | {r['tiles']} | {r['us']:.1f} | {r['us_one_tile']:.1f} | "
            f"{r['us_one_tile'] / r['us']:.2f}x | {'yes' if r['identical'] else '**no**'} |" for r in rows]
    return out + [""]


def launch_sweep_lines(sweep: list[dict]) -> list[str]:
    """`--launch-sweep`: the own pairs path's time with each launch constant varied in turn."""
    if not sweep:
        return []
    out = ["GlowQ's decode GEMVs on Marlin's codes (the own pairs path) with one launch constant changed at a "
           "time (kernels/moe_w4a16_triton.py; the others as shipped), microseconds per layer:", "",
           "| tokens | constant | value | GlowQ decode GEMVs (us) | max error |", "| ---: | --- | ---: | ---: | ---: |"]
    out += [f"| {r['tokens']} | {r['constant']} | {r['value']} | {r['us']:.1f} | {r['max_error']:.1e} |" for r in sweep]
    return out + [""]


def expected_experts(experts: int, top_k: int, tokens: int) -> float:
    """Distinct experts a batch routes to when each token picks top_k of them uniformly."""
    return experts * (1 - (1 - top_k / experts) ** tokens)


def moe_floor_section(model: dict | None, micro: dict | None, bandwidth: float | None) -> list[str]:
    """What one expert layer must read, int4 with and without GlowQ's factors, and the time that
    takes at the copy bandwidth: the floor both Marlin MoE and the project's kernels are held to."""
    if not model or not micro:
        return []
    hidden, inter = model["hidden_size"], model["moe_intermediate_size"]
    experts, top_k = model.get("num_experts", model.get("num_local_experts")), model["num_experts_per_tok"]
    rank, group = micro["shape"]["rank"], micro["shape"]["group"]
    codes = 3 * hidden * inter // 2 + 2 * 3 * hidden * inter // group  # int4 codes + bf16 scales, one expert
    factors = 2 * rank * (2 * inter + inter + hidden)  # A13_e, B2_e, A2_e in bf16
    shared = 2 * (rank * hidden + experts * hidden)  # B13 once a layer, the router (both engines read it)
    out = ["### What one expert layer must read", "",
           f"int4 codes and scales {codes / 1e6:.2f} MB per expert; GlowQ adds {factors / 1e6:.3f} MB per expert "
           f"(A13_e, B2_e, A2_e at rank {rank}) and {2 * rank * hidden / 1e6:.3f} MB once (B13). Distinct experts "
           f"are the expectation under uniform top-{top_k} routing. The floor is those bytes at the copy bandwidth "
           f"the dense kernel microbenchmark measured ({bandwidth / 1e12:.2f} TB/s).", "",
           "| tokens | experts read | plain int4 (MB) | GlowQ (MB) | bytes ratio | plain floor (us) | GlowQ floor (us) "
           "| Marlin MoE, measured (us) |", "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    above = []  # Marlin MoE's time over its floor
    for row in micro["rows"]:
        active = expected_experts(experts, top_k, row["tokens"])
        plain = active * codes + 2 * experts * hidden
        glowq = plain + active * factors + 2 * rank * hidden
        above.append(row["us"]["plain"] * 1e-6 * bandwidth / plain)
        out.append(f"| {row['tokens']} | {active:.1f} | {plain / 1e6:.1f} | {glowq / 1e6:.1f} | {plain / glowq:.2f} | "
                   f"{plain / bandwidth * 1e6:.1f} | {glowq / bandwidth * 1e6:.1f} | {row['us']['plain']:.1f} |")
    return out + ["", "At full activation the factors are about a fifth more bytes than the codes, so a GlowQ "
                  "kernel that ran as far from its floor as Marlin MoE runs from its own would reach about "
                  f"{codes / (codes + factors):.2f}x per expert layer; 0.90x in the engine needs a kernel closer to "
                  f"the floor than Marlin MoE (Marlin MoE runs {min(above):.1f}-{max(above):.1f}x above its own).", ""]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", default="bench/results")
    parser.add_argument("--out", default="docs/benchmarks.md")
    args = parser.parse_args(argv)
    text = build(Path(args.results))
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
