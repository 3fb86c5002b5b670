"""Helpers for the plugin tests: run the real vLLM engine in a fresh subprocess, compare with
the PyTorch reference, and locate shared data.

Each engine runs in its own Python process (`python tests/vllm_helpers.py JOB.json OUT.json`)
so a test never inherits another engine's process group, threads or compile state, and one
engine start can answer everything a test module asks of a checkpoint.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
STORIES_VLLM = SHARED_DATA / "stories260k-vllm"
ENGINE_TIMEOUT_S = 420

PROMPTS = [
    "Once upon a time, there was a",
    "The little dog ran to the",
    "Tom and Lily went to the park. They",
]


def engine_env(tensor_parallel_size: int = 1, allow_pickled_functions: bool = False) -> dict[str, str]:
    """Environment for vLLM on this CPU-only, 2-core machine.

    `allow_pickled_functions` lets `LLM.apply_model` ship a function to worker processes.
    """
    env = dict(os.environ)
    if allow_pickled_functions:
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_DISABLE_COMPILE_CACHE="1",  # the cache keys on source files, not on checkpoints
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if tensor_parallel_size == 2:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    else:
        # The engine core runs in this process, so a load error reaches the job as an exception.
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def run_engine(job: dict[str, Any], timeout: float = ENGINE_TIMEOUT_S) -> dict[str, Any]:
    """Run one engine job in a subprocess and return its JSON result.

    job keys: model, prompts (list of str or of token-id lists), max_tokens, dtype,
    tensor_parallel_size, enforce_eager, quantization, inspect_layers (report each linear
    layer's parameter names). A load failure comes back as result["error"] = {type, message}.
    """
    tp = int(job.get("tensor_parallel_size", 1))
    with tempfile.TemporaryDirectory(prefix="glowq-engine-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        proc = subprocess.run(
            [sys.executable, str(Path(__file__).resolve()), str(job_path), str(out_path)],
            env=engine_env(tp, allow_pickled_functions=bool(job.get("inspect_layers"))),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=tmp,
        )
        if not out_path.exists():
            raise RuntimeError(f"engine job failed (rc={proc.returncode}); output tail:\n{proc.stderr[-6000:]}")
        result = json.loads(out_path.read_text())
    result["log"] = proc.stdout[-20000:] + proc.stderr[-20000:]
    return result


# ----- inside the engine subprocess -----------------------------------------------------------


def _engine_main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    try:
        result = _run_job(job)
    except Exception as exc:  # reported to the test, which asserts on the message
        result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    Path(out_path).write_text(json.dumps(result))


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=job["model"],
        dtype=job.get("dtype", "bfloat16"),
        quantization=job.get("quantization"),
        tensor_parallel_size=int(job.get("tensor_parallel_size", 1)),
        enforce_eager=bool(job.get("enforce_eager", True)),
        max_model_len=256,
        gpu_memory_utilization=0.3,
        seed=0,
    )
    prompts = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=int(job.get("max_tokens", 8)), logprobs=0,
                            prompt_logprobs=0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result: dict[str, Any] = {"outputs": [_summarize(o) for o in outputs]}
    if job.get("inspect_layers"):
        import vllm_helpers  # by module name, so worker processes can unpickle the function

        result["layers"] = llm.apply_model(vllm_helpers.linear_parameter_names)[0]
    return result


def _summarize(output) -> dict[str, Any]:
    """Token ids and the logprob vLLM gave each actual token (prompt tokens after the first)."""
    prompt_ids = list(output.prompt_token_ids)
    prompt_lp = [entry[tok].logprob for tok, entry in zip(prompt_ids[1:], output.prompt_logprobs[1:])]
    completion = output.outputs[0]
    gen_ids = list(completion.token_ids)
    gen_lp = [entry[tok].logprob for tok, entry in zip(gen_ids, completion.logprobs)]
    return {"prompt_ids": prompt_ids, "prompt_logprobs": prompt_lp, "token_ids": gen_ids, "logprobs": gen_lp}


def linear_parameter_names(model) -> dict[str, list[str]]:
    from vllm.model_executor.layers.linear import LinearBase

    return {
        name: sorted(n for n, _ in module.named_parameters(recurse=False))
        for name, module in model.named_modules()
        if isinstance(module, LinearBase)
    }


if __name__ == "__main__":
    _engine_main(sys.argv[1], sys.argv[2])
