"""Helpers for the plugin tests: run the real vLLM engine in a fresh subprocess, compare with
the PyTorch reference, and locate shared data.

Each engine runs in its own Python process (`python tests/vllm_helpers.py JOB.json OUT.json`)
so a test never inherits another engine's process group, threads or compile state, and one
engine start can answer everything a test module asks of a checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
ENGINE_TIMEOUT_S = 420

PROMPTS = [
    "Once upon a time, there was a",
    "The little dog ran to the",
    "Tom and Lily went to the park. They",
]


def engine_env(
    tensor_parallel_size: int = 1, allow_pickled_functions: bool = False, in_process_engine: bool = True,
    cpu_int4_w4a8: bool = False,
) -> dict[str, str]:
    """Environment for vLLM on this CPU-only, 2-core machine.

    `allow_pickled_functions` lets `LLM.apply_model` ship a function to worker processes;
    `in_process_engine` (TP=1 only) runs the engine core inside the caller, so a load error
    reaches the caller as the original exception.

    `cpu_int4_w4a8` is vLLM's VLLM_CPU_INT4_W4A8 (vLLM defaults it to on). On CPUs with AMX it
    makes the CPU int4 kernel quantize bf16 activations to int8 (W4A8); elsewhere it does
    nothing. The bf16 tolerances here are bf16 arithmetic's, so engines run W4A16 on every host
    unless a test asks for W4A8: on the AMX CI host, W4A8 moved the compiled bf16 Qwen2-MoE
    checkpoint to mean |dlogprob| 0.203 against the fp32 reference (0.101 with W4A16; the
    reference's own bf16 noise is 0.17), and the random Llama to 0.124 (0.084).
    """
    env = dict(os.environ)
    if allow_pickled_functions:
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    env.update(
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_DISABLE_COMPILE_CACHE="1",  # the cache keys on source files, not on checkpoints
        VLLM_CPU_INT4_W4A8="1" if cpu_int4_w4a8 else "0",
        TOKENIZERS_PARALLELISM="false",
        PYTHONUNBUFFERED="1",
    )
    if tensor_parallel_size == 2:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "0|1"
    elif in_process_engine:
        env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    return env


def run_engine(job: dict[str, Any], timeout: float = ENGINE_TIMEOUT_S) -> dict[str, Any]:
    """Run one engine job in a subprocess and return its JSON result.

    job keys: model, prompts (list of str or of token-id lists), max_tokens, dtype,
    tensor_parallel_size, enforce_eager, quantization, inspect_layers (report each linear
    layer's parameter names), cpu_int4_w4a8 (see engine_env). A load failure comes back as
    result["error"] = {type, message}.
    """
    tp = int(job.get("tensor_parallel_size", 1))
    env = engine_env(tp, allow_pickled_functions=bool(job.get("inspect_layers")),
                     cpu_int4_w4a8=bool(job.get("cpu_int4_w4a8")))
    return run_job_script(Path(__file__).resolve(), job, env, timeout)


def run_job_script(script: Path, job: dict[str, Any], env: dict[str, str], timeout: float) -> dict[str, Any]:
    """Run `python SCRIPT JOB.json OUT.json` in its own process group; return OUT.json plus
    the tail of its log."""
    with tempfile.TemporaryDirectory(prefix="glowq-engine-") as tmp:
        job_path, out_path = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job_path.write_text(json.dumps(job))
        command = [sys.executable, str(script), str(job_path), str(out_path)]
        stdout, stderr, returncode = _run_in_own_group(command, env, tmp, timeout)
        if not out_path.exists():
            raise RuntimeError(f"engine job failed (rc={returncode}); output tail:\n{stderr[-6000:]}")
        result = json.loads(out_path.read_text())
    result["log"] = stdout[-20000:] + stderr[-20000:]
    return result


def _run_in_own_group(command: list[str], env: dict[str, str], cwd: str, timeout: float) -> tuple[str, str, int]:
    """Run a job in a new process group and end that group afterwards, so engine workers
    can never outlive the job (also on timeout)."""
    proc = subprocess.Popen(command, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    return stdout, stderr, proc.returncode


def run_load_attempts(attempts: list[dict[str, Any]], timeout: float = ENGINE_TIMEOUT_S) -> list[dict[str, Any]]:
    """Try to start an engine for each attempt (model, quantization, dtype) in one subprocess.

    Each entry of the result is {"ok": true} or {"error": {type, message}}: the exception the
    user's `LLM(...)` call raised (the engine core runs in-process, see engine_env).
    """
    result = run_engine({"attempts": attempts}, timeout)
    if "attempts" not in result:
        raise RuntimeError(f"load attempts did not run: {result.get('error')}\n{result['log'][-4000:]}")
    return result["attempts"]


def copy_checkpoint(
    source: Path,
    target: Path,
    edit_tensors: Callable[[dict[str, torch.Tensor]], None] | None = None,
    edit_config: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Copy a checkpoint folder, optionally editing its tensors or its quantization_config."""
    shutil.copytree(source, target)
    if edit_tensors is not None:
        files = sorted(target.glob("*.safetensors"))
        if len(files) != 1:
            raise ValueError(f"{source} has {len(files)} safetensors files; tests expect one")
        tensors = load_file(str(files[0]))
        edit_tensors(tensors)
        save_file(tensors, str(files[0]), metadata={"format": "pt"})
    if edit_config is not None:
        config_path = target / "config.json"
        config = json.loads(config_path.read_text())
        edit_config(config["quantization_config"])
        config_path.write_text(json.dumps(config, indent=2))
    return target


# ----- checkpoints and the PyTorch reference ------------------------------------------------

CALIBRATION = dict(group_size=32, rank=8, samples=4, seq_len=64, dataset="random", seed=0)
# name -> (source model: a tiny architecture or a shared-data folder, extra calibration options)
RECIPES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("tiny:llama", {}),
    "qwen2": ("tiny:qwen2", {}),
    # Symmetric codes (uint4b8) here, asymmetric ones (uint4 + zero points) in the tiny models.
    "stories": ("shared:stories260k-vllm", {"sym": True}),
    "llama-module": ("tiny:llama", {"share": "module"}),
    "llama-partial": ("tiny:llama", {"restore": "0.5"}),  # GlowQ-S: half the units keep factors
    "qwen3_moe": ("tiny:qwen3_moe", {}),
    "qwen2_moe": ("tiny:qwen2_moe", {}),  # with a shared expert
    "mixtral": ("tiny:mixtral", {}),
    "qwen3_moe-module": ("tiny:qwen3_moe", {"share": "module"}),  # one B per expert projection
    "mixtral-partial": ("tiny:mixtral", {"restore": "0.5"}),  # GlowQ-S over expert units too
    "qwen3_moe-rtn": ("tiny:qwen3_moe", {"rank": 0}),  # plain int4 experts, no factors
}


# A tiny Llama-family shape the GPU int4 kernels take (K, N multiples of 128 where it matters):
# hidden 512, 8 heads x 64, 4 KV heads; tests/test_plugin_gpu.py and, with experts added,
# tests/test_plugin_moe_gpu.py.
GPU_SHAPE = dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=64, vocab_size=384, max_position_embeddings=1024)


class CheckpointFactory:
    """Builds each GlowQ test checkpoint once per session, on first use, with glowq's own
    calibrator; `base(arch)` is the unquantized tiny model it started from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._built: dict[str, Path] = {}

    def base(self, arch: str) -> Path:
        from offline_calibrate.tiny import make_random_model

        path = self.root / f"base-{arch}"
        if not path.exists():
            make_random_model(path, arch)
        return path

    def get(self, name: str) -> Path:
        if name not in self._built:
            from offline_calibrate import CalibrationOptions, calibrate

            source, extra = RECIPES[name]
            kind, _, what = source.partition(":")
            model = self.base(what) if kind == "tiny" else SHARED_DATA / what
            if kind == "shared" and not model.is_dir():
                import pytest

                pytest.skip(f"{model} is absent (../shared/data is not part of this clone)")
            self._built[name] = calibrate(model, self.root / name, CalibrationOptions(**{**CALIBRATION, **extra}))
        return self._built[name]


def standard_job(checkpoint: Path, dtype: str = "float32", **overrides: Any) -> dict[str, Any]:
    """The engine job the offline and TP tests share (so a session runs it once)."""
    job = {"model": str(checkpoint), "prompts": PROMPTS, "dtype": dtype, "max_tokens": 12,
           "inspect_layers": True, "enforce_eager": True, "tensor_parallel_size": 1}
    job.update(overrides)
    return job


def zero_factor_a(tensors: dict[str, torch.Tensor]) -> None:
    """Negative control: keep every tensor but switch the correction off (A = 0)."""
    for name in tensors:
        if name.endswith(".glowq_A"):
            tensors[name] = torch.zeros_like(tensors[name])


def zero_expert_factor_a(tensors: dict[str, torch.Tensor]) -> None:
    """Negative control for MoE: every expert's (and a shared expert's) A = 0; attention keeps its own."""
    for name in tensors:
        if name.endswith("glowq_A") and (".experts." in name or ".shared_expert." in name):
            tensors[name] = torch.zeros_like(tensors[name])


def compare_with_reference(checkpoint: Path, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """vLLM's logprobs and greedy tokens against offline_calibrate's fp32 reference forward
    (compare_outputs)."""
    from offline_calibrate.reference import load_reference_model

    return compare_outputs(load_reference_model(checkpoint, dtype=torch.float32), outputs)


def compare_outputs(model, outputs: list[dict[str, Any]]) -> dict[str, Any]:
    """vLLM's logprobs and greedy tokens against a loaded fp32 model (a reference forward, or
    HF's model of an unquantized checkpoint).

    Returns max/mean |delta logprob| over every prompt and generated token, and per prompt the
    reference's greedy tokens and the top-2 logprob gap at each generated position.
    """
    diffs, per_prompt = [], []
    for out in outputs:
        ids = out["prompt_ids"] + out["token_ids"]
        reference = token_logprobs(model, ids)
        diffs.append((reference - torch.tensor(out["prompt_logprobs"] + out["logprobs"])).abs())
        with torch.no_grad():
            greedy = model.generate(torch.tensor([out["prompt_ids"]]), max_new_tokens=len(out["token_ids"]),
                                    do_sample=False, pad_token_id=0)[0, len(out["prompt_ids"]):].tolist()
        per_prompt.append({"reference_tokens": greedy, "vllm_tokens": out["token_ids"],
                           "top2_gap": _top2_gaps(model, out["prompt_ids"], greedy)})
    flat = torch.cat(diffs)
    return {"max_abs_diff": flat.max().item(), "mean_abs_diff": flat.mean().item(), "prompts": per_prompt}


def cached_runs(run: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """`run(*key)` (an engine job) once per key; a result holding an error fails the test that
    asked for it, with the engine log's tail."""
    cache: dict[tuple, dict[str, Any]] = {}

    def get(*key: str) -> dict[str, Any]:
        if key not in cache:
            cache[key] = run(*key)
        result = cache[key]
        if "error" in result:
            import pytest

            pytest.fail(f"engine failed on {'/'.join(key)}: {result['error']}\n{result['log'][-4000:]}")
        return result

    return get


def reference_models(paths: dict[str, Path]) -> Callable[[str], Any]:
    """name -> fp32 model on the CPU, loaded once: HF's for the unquantized "base", the
    reference forward (offline_calibrate) for GlowQ checkpoints."""
    cache: dict[str, Any] = {}

    def get(name: str):
        if name not in cache:
            from offline_calibrate.reference import load_reference_model

            if name == "base":
                from transformers import AutoModelForCausalLM

                cache[name] = AutoModelForCausalLM.from_pretrained(paths[name], dtype=torch.float32).eval()
            else:
                cache[name] = load_reference_model(paths[name], dtype=torch.float32)
        return cache[name]

    return get


def bf16_noise(model, outputs: list[dict[str, Any]]) -> dict[str, float]:
    """mean/max |delta logprob| of an unquantized model's bf16 engine against its fp32 model."""
    comparison = compare_outputs(model, outputs)
    return {"mean": comparison["mean_abs_diff"], "max": comparison["max_abs_diff"]}


def report_summary(summary: dict[str, Any], title: str) -> None:
    """Print a GPU test module's summary (pytest -s) and write it to $GLOWQ_GPU_REPORT."""
    if not summary:
        return
    text = json.dumps(summary, indent=2)
    print(f"\n===== {title} =====\n" + text)
    if os.environ.get("GLOWQ_GPU_REPORT"):
        Path(os.environ["GLOWQ_GPU_REPORT"]).write_text(text)


def noise_tolerance(noise: dict[str, float], factor: float = 2.5, mean_floor: float = 0.01,
                    max_floor: float = 0.05) -> dict[str, float]:
    """What a quantized checkpoint may deviate from its fp32 reference in a bf16 engine: `factor`
    times the unquantized model's own bf16 noise (vLLM-bf16 against HF-fp32), plus floors (nats)
    for the extra bf16 roundings of scales and correction (tests/test_plugin_gpu.py)."""
    return {"mean": factor * noise["mean"] + mean_floor, "max": factor * noise["max"] + max_floor}


def agreeing_tokens(comparison: dict[str, Any]) -> tuple[int, int]:
    """Generated tokens identical to the reference's greedy ones before the first divergence."""
    same = total = 0
    for p in comparison["prompts"]:
        total += len(p["reference_tokens"])
        for ref, got in zip(p["reference_tokens"], p["vllm_tokens"]):
            if ref != got:
                break
            same += 1
    return same, total


def token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """The model's logprob of every token of `ids` after the first."""
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return logprobs[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]


def reference_bf16_noise(checkpoint: Path, outputs: list[dict[str, Any]]) -> dict[str, float]:
    """How far bf16 arithmetic alone moves the reference's logprobs on these token sequences:
    max/mean |reference in bf16 - reference in fp32|, the scale of a bf16 engine's tolerance."""
    from offline_calibrate.reference import load_reference_model

    models = [load_reference_model(checkpoint, dtype=dtype) for dtype in (torch.float32, torch.bfloat16)]
    diffs = []
    for out in outputs:
        ids = out["prompt_ids"] + out["token_ids"]
        diffs.append((token_logprobs(models[0], ids) - token_logprobs(models[1], ids)).abs())
    flat = torch.cat(diffs)
    return {"max": flat.max().item(), "mean": flat.mean().item()}


def _top2_gaps(model, prompt_ids: list[int], greedy: list[int]) -> list[float]:
    ids = torch.tensor([prompt_ids + greedy])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0, len(prompt_ids) - 1 : -1].float(), dim=-1)
    top2 = logprobs.topk(2, dim=-1).values
    return (top2[:, 0] - top2[:, 1]).tolist()


def greedy_mismatches(comparison: dict[str, Any], near_tie: float = 0.0) -> list[str]:
    """Prompts whose vLLM greedy tokens differ from the reference's, except a divergence at a
    position where the reference's top two tokens are within `near_tie` nats (bf16 rounding
    may legitimately pick either); after a divergence the contexts differ, so it stops there."""
    problems = []
    for i, p in enumerate(comparison["prompts"]):
        for pos, (ref, got) in enumerate(zip(p["reference_tokens"], p["vllm_tokens"])):
            if ref != got:
                if p["top2_gap"][pos] >= near_tie:
                    problems.append(f"prompt {i}: token {pos} is {got}, reference {ref} "
                                    f"(reference top-2 gap {p['top2_gap'][pos]:.4f} nats)")
                break
    return problems


# ----- inside the engine subprocess -----------------------------------------------------------


def _engine_main(job_path: str, out_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    try:
        result = _run_job(job)
    except Exception as exc:  # reported to the test, which asserts on the message
        result = {"error": {"type": type(exc).__name__, "message": str(exc)}}
    Path(out_path).write_text(json.dumps(result))


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    if "attempts" in job:
        return {"attempts": [_attempt_load(attempt) for attempt in job["attempts"]]}
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    llm = _make_llm(job)
    prompts = [p if isinstance(p, str) else TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = SamplingParams(temperature=0.0, max_tokens=int(job.get("max_tokens", 8)), logprobs=0,
                            prompt_logprobs=0, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    result: dict[str, Any] = {"outputs": [_summarize(o) for o in outputs]}
    if job.get("inspect_layers"):
        import vllm_helpers  # by module name, so worker processes can unpickle the function

        result["layers"] = llm.apply_model(vllm_helpers.linear_parameter_names)[0]
    return result


def _make_llm(job: dict[str, Any]):
    from vllm import LLM

    return LLM(
        model=job["model"],
        dtype=job.get("dtype", "bfloat16"),
        quantization=job.get("quantization"),
        tensor_parallel_size=int(job.get("tensor_parallel_size", 1)),
        enforce_eager=bool(job.get("enforce_eager", True)),
        max_model_len=256,
        gpu_memory_utilization=0.3,
        seed=0,
    )


def _attempt_load(job: dict[str, Any]) -> dict[str, Any]:
    import gc

    try:
        llm = _make_llm(job)
    except Exception as exc:
        return {"error": {"type": type(exc).__name__, "message": str(exc)}}
    del llm
    gc.collect()
    return {"ok": True}


def _summarize(output) -> dict[str, Any]:
    """Token ids, the logprob vLLM gave each actual token (prompt tokens after the first) and
    the completion's text (what a server must return for the same request)."""
    prompt_ids = list(output.prompt_token_ids)
    prompt_lp = [entry[tok].logprob for tok, entry in zip(prompt_ids[1:], output.prompt_logprobs[1:])]
    completion = output.outputs[0]
    gen_ids = list(completion.token_ids)
    gen_lp = [entry[tok].logprob for tok, entry in zip(gen_ids, completion.logprobs)]
    return {"prompt_ids": prompt_ids, "prompt_logprobs": prompt_lp, "token_ids": gen_ids, "logprobs": gen_lp,
            "text": completion.text}


def linear_parameter_names(model) -> dict[str, list[str]]:
    """Parameter names of every linear and expert layer (vLLM names the latter `...experts`,
    holding the `RoutedExperts` as `routed_experts`)."""
    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.linear import LinearBase

    return {
        name: sorted(n for n, _ in module.named_parameters(recurse=False))
        for name, module in model.named_modules()
        if isinstance(module, (LinearBase, RoutedExperts))
    }


if __name__ == "__main__":
    _engine_main(sys.argv[1], sys.argv[2])
