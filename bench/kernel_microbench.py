"""The project's W4A16 kernel against vLLM's int4 kernels and cuBLAS, per Llama-3-8B layer shape.

For every layer (qkv_proj, o_proj, gate_up_proj, down_proj; int4 g128 symmetric, rank 64) and
token count it times, in microseconds per call:

* `glowq`: the project's tensor-core kernel with the correction (vllm_glowq/kernels/w4a16_mma.py,
  codes in MMA fragment order; above GEMM_MAX_TOKENS: dequantize with the correction folded in +
  cuBLAS);
* `int4`: the same kernel without a correction (plain int4 checkpoints);
* `glowq_triton`, `int4_triton`: the Triton kernel (w4a16_triton.py, nibble planes), which
  runs where Gluon does not;
* `glowq_mainloop`: the GEMM kernel itself where forward() dequantizes instead (GEMM_MAX_TOKENS
  < tokens <= WORKSPACE_TOKENS, not Hopper), to place that threshold;
* `glowq_dense`, `int4_dense`: dequantize + cuBLAS where forward() runs the warpgroup MMA
  instead (Hopper, above GEMM_MAX_TOKENS);
* `machete`, `marlin`: vLLM's int4 kernels on the same codes (when vLLM is installed);
* `machete+corr`: the plugin's previous path, Machete with the correction on a side stream
  (torch.ops.glowq.linear, `overlap` / `split`);
* `bf16`: cuBLAS on the dense bf16 weight.

Achieved bandwidth is the bytes a kernel must move (int4 codes and scales, factors, x, out; bf16:
the dense weight) over its time, as a fraction of the measured device-to-device copy bandwidth.
Correctness: each kernel's output against a float64 reference on fresh inputs.

Timing: gpu_timing.py (one CUDA graph per case that calls the kernel once per weight copy, with
enough copies to overflow L2, median of several replays).
`--sweep` also times launch configurations around the tensor-core kernel's default one and
reports the fastest (`--sweep-triton`: the Triton kernel's; `--sweep-wgmma`: the warpgroup-MMA
launches from 8 tokens on Hopper).

    python bench/kernel_microbench.py --out kernel_micro.json [--tokens 1,16,64,256,2048] [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_timing import copy_bandwidth, seconds_per_call
from vllm_glowq.kernels import w4a16
from vllm_glowq.packing import repack_fragments, repack_planes

RANK = 64
GROUP = 128
LAYERS = {  # Llama-3-8B: name -> (K, N)
    "qkv_proj": (4096, 6144),
    "o_proj": (4096, 4096),
    "gate_up_proj": (4096, 28672),
    "down_proj": (14336, 4096),
}
ROTATE_BYTES = 400 * 1024**2  # weights cycled through per graph: several times the 60 MB L2


@dataclasses.dataclass
class LayerCopy:
    qweight: torch.Tensor  # the checkpoint's GPTQ layout (vLLM's kernels repack it themselves)
    kernel_qweight: torch.Tensor  # the same codes in the Triton kernel's layout
    fragment_qweight: torch.Tensor  # and in the tensor-core kernel's
    scales: torch.Tensor
    factor_b: torch.Tensor
    factor_a: torch.Tensor


def make_copies(k: int, n: int, count: int) -> list[LayerCopy]:
    copies = []
    for _ in range(count):
        qweight = torch.randint(-2**31, 2**31 - 1, (k // 8, n), dtype=torch.int32, device="cuda")
        scales = (torch.rand(k // GROUP, n, device="cuda") * 0.004 + 0.001).to(torch.bfloat16)
        factor_b = (torch.randn(RANK, k, device="cuda") * 0.02).to(torch.bfloat16)
        factor_a = (torch.randn(n, RANK, device="cuda") * 0.02).to(torch.bfloat16)
        kernel_qweight = repack_planes(qweight, w4a16.block_k_for(k, GROUP))
        fragment_qweight = repack_fragments(qweight, w4a16.fragments_block_k(k, GROUP))
        copies.append(LayerCopy(qweight, kernel_qweight, fragment_qweight, scales, factor_b, factor_a))
    return copies


def dense_weight(copy: LayerCopy) -> torch.Tensor:
    """deq(Wq) [N, K] in float32 (the reference's weight)."""
    from vllm_glowq.packing import dequantize

    return dequantize(copy.qweight, copy.scales, None)


def reference(x: torch.Tensor, copy: LayerCopy, correct: bool) -> torch.Tensor:
    out = x.double() @ dense_weight(copy).double().t()
    if correct:
        out += (x.double() @ copy.factor_b.double().t()) @ copy.factor_a.double().t()
    return out


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    if not torch.isfinite(out).all():
        return float("nan")
    return ((out.double() - ref).norm() / ref.norm()).item()


def time_per_call(calls: list[Callable[[], torch.Tensor]], replays: int = 7) -> float:
    """Microseconds per call (gpu_timing.seconds_per_call)."""
    return seconds_per_call(calls, replays) * 1e6


# ----- vLLM's kernels --------------------------------------------------------------------------


def init_vllm() -> str | None:
    """A one-GPU vLLM process group (vLLM parameters ask for their tensor-parallel rank); None or why not."""
    try:
        from vllm.config import VllmConfig, set_current_vllm_config
        from vllm.distributed import init_distributed_environment, initialize_model_parallel

        with set_current_vllm_config(VllmConfig()):
            init_distributed_environment(world_size=1, rank=0, distributed_init_method="tcp://127.0.0.1:29517",
                                         local_rank=0, backend="nccl")
            initialize_model_parallel(1)
    except Exception as exc:  # the benchmark runs without vLLM too
        return f"{type(exc).__name__}: {exc}"
    return None


def vllm_kernel(name: str, copy: LayerCopy, k: int, n: int):
    """(layer, kernel) of vLLM's MPLinearKernel `name` holding this copy's codes and scales."""
    import vllm.model_executor.kernels.linear as linear_kernels
    from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter

    from vllm_glowq import compat

    classes = {cls.__name__: cls for kinds in getattr(linear_kernels, "_POSSIBLE_KERNELS", {}).values() for cls in kinds}
    config = compat.mp_linear_layer_config(full_weight_shape=(k, n), partition_weight_shape=(k, n),
                                           weight_type=compat.int4_weight_type(True), act_type=torch.bfloat16,
                                           group_size=GROUP, zero_points=False)
    layer = torch.nn.Module()
    noop = lambda *a, **kw: None  # noqa: E731
    layer.register_parameter("qweight", PackedvLLMParameter(data=copy.qweight.clone(), input_dim=0, output_dim=1,
                                                            packed_dim=0, packed_factor=8, weight_loader=noop))
    layer.register_parameter("scales", GroupQuantScaleParameter(data=copy.scales.clone(), input_dim=0, output_dim=1,
                                                                weight_loader=noop))
    kernel = classes[name](config, w_q_param_name="qweight", w_s_param_name="scales", w_zp_param_name=None)
    kernel.process_weights_after_loading(layer)
    return layer, kernel


# ----- one layer -------------------------------------------------------------------------------


def bytes_moved(kind: str, tokens: int, k: int, n: int) -> int:
    act = 2 * tokens * (k + n)
    if kind == "bf16":
        return 2 * k * n + act
    int4 = k * n // 2 + 2 * (k // GROUP) * n
    factors = 2 * RANK * (k + n) if kind in CORRECTED else 0
    return int4 + factors + act


CORRECTED = ("glowq", "glowq_triton", "glowq_mainloop", "glowq_dense", "glowq_smem", "glowq_wgmma", "machete+corr")


def layer_shape(layer: str) -> tuple[int, int]:
    """(K, N) of a Llama-3-8B layer by name, or of any layer written as the launch tables key it,
    "NxK" (outputs x inputs), e.g. 1536x2048 for a model of your own."""
    if layer in LAYERS:
        return LAYERS[layer]
    n, k = (int(v) for v in layer.split("x"))
    return k, n


def bench_layer(layer: str, tokens_list: list[int], bandwidth: float, with_vllm: bool, sweep: str | None) -> list[dict]:
    k, n = layer_shape(layer)
    count = max(2, math.ceil(ROTATE_BYTES / (k * n // 2)))
    copies = make_copies(k, n, count)
    dense = [dense_weight(c).to(torch.bfloat16) for c in copies[: max(2, math.ceil(ROTATE_BYTES / (2 * k * n)))]]
    for c in copies:
        w4a16.workspace(c.qweight.device).reserve(n, k, RANK, torch.bfloat16)
    vllm_layers = {}
    if with_vllm:
        for name in ("MacheteLinearKernel", "MarlinLinearKernel"):
            try:
                vllm_layers[name] = [vllm_kernel(name, c, k, n) for c in copies]
            except Exception as exc:
                print(f"  {name}: not available ({type(exc).__name__}: {exc})", flush=True)
    rows = []
    for tokens in tokens_list:
        xs = [torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16) for _ in copies]
        kernels: dict[str, list[Callable[[], torch.Tensor]]] = {
            "glowq": [lambda c=c, x=x: w4a16.forward(x, c.fragment_qweight, c.scales, None, None, c.factor_b,
                                                     c.factor_a, GROUP) for c, x in zip(copies, xs)],
            "int4": [lambda c=c, x=x: w4a16.forward(x, c.fragment_qweight, c.scales, None, None, None, None, GROUP)
                     for c, x in zip(copies, xs)],
            "glowq_triton": [lambda c=c, x=x: w4a16.forward(x, c.kernel_qweight, c.scales, None, None, c.factor_b,
                                                            c.factor_a, GROUP) for c, x in zip(copies, xs)],
            "int4_triton": [lambda c=c, x=x: w4a16.forward(x, c.kernel_qweight, c.scales, None, None, None, None,
                                                           GROUP) for c, x in zip(copies, xs)],
            "bf16": [lambda w=w, x=x: F.linear(x, w) for w, x in zip(dense, xs)],
        }
        space = w4a16.workspace(copies[0].qweight.device)
        if tokens > w4a16.GEMM_MAX_TOKENS and space.hopper:
            # forward()'s two paths on Hopper: the warpgroup MMA against dequantize + cuBLAS
            kernels["glowq_dense"] = [lambda c=c, x=x: w4a16.dense_forward(x, c.fragment_qweight, c.scales, None, None,
                                                                           c.factor_b, c.factor_a, GROUP)
                                      for c, x in zip(copies, xs)]
            kernels["int4_dense"] = [lambda c=c, x=x: w4a16.dense_forward(x, c.fragment_qweight, c.scales, None, None,
                                                                          None, None, GROUP) for c, x in zip(copies, xs)]
        if space.hopper and tokens >= w4a16.WGMMA_MIN_TOKENS:
            # the warpgroup MMA's default launch with the codes through shared memory, and above
            # WGMMA_MAX_TOKENS (where forward() dequantizes) with its own codes in registers too
            for suffix, smem in (("smem", True), ("wgmma", False)):
                if smem or tokens > w4a16.WGMMA_MAX_TOKENS:
                    kernels[f"glowq_{suffix}"] = wgmma_calls(copies, xs, True, smem)
                    kernels[f"int4_{suffix}"] = wgmma_calls(copies, xs, False, smem)
        if not space.hopper and w4a16.GEMM_MAX_TOKENS < tokens <= w4a16.WORKSPACE_TOKENS:
            # where forward() dequantizes instead
            kernels["glowq_mainloop"] = [
                lambda c=c, x=x: w4a16.mma_gemm(x, c.fragment_qweight, c.scales, None, None, c.factor_b, c.factor_a,
                                                GROUP) for c, x in zip(copies, xs)]
        for name, short in (("MacheteLinearKernel", "machete"), ("MarlinLinearKernel", "marlin")):
            if name in vllm_layers:
                kernels[short] = [lambda lk=lk, x=x: lk[1].apply_weights(lk[0], x, None)
                                  for lk, x in zip(vllm_layers[name], xs)]
        if "MacheteLinearKernel" in vllm_layers:
            kernels["machete+corr"] = corrected_vllm_calls(vllm_layers["MacheteLinearKernel"], copies, xs, layer)
        row = {"layer": layer, "tokens": tokens, "k": k, "n": n, "us": {}, "error": {}, "bandwidth_fraction": {}}
        for name, calls in kernels.items():
            correct = name in CORRECTED
            x0 = torch.randn(tokens, k, device="cuda", dtype=torch.bfloat16)
            xs[0].copy_(x0)
            got = calls[0]().clone()
            if name == "bf16":
                ref = x0.double() @ dense[0].double().t()
            else:
                ref = reference(x0, copies[0], correct)
            row["error"][name] = relative_error(got, ref)
            row["us"][name] = time_per_call(calls)
            row["bandwidth_fraction"][name] = bytes_moved(name, tokens, k, n) / (row["us"][name] * 1e-6) / bandwidth
        if sweep == "wgmma" and space.hopper:
            row["sweep"] = sweep_wgmma_configs(copies, xs, tokens, k, n)
        elif sweep in ("mma", "triton") and tokens <= w4a16.GEMM_MAX_TOKENS:
            row["sweep"] = (sweep_mma_configs if sweep == "mma" else sweep_configs)(copies, xs, tokens, k, n)
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


def wgmma_calls(copies, xs, correct: bool, codes_in_smem: bool) -> list[Callable[[], torch.Tensor]]:
    """One warpgroup-MMA launch per copy, on the default tiles, codes in registers or shared memory."""
    space = w4a16.workspace(copies[0].qweight.device)
    tokens, k = xs[0].shape
    n = copies[0].scales.shape[1]
    config = dataclasses.replace(w4a16.choose_mma_config(tokens, n, k, GROUP, space.sm_count, hopper=True),
                                 codes_in_smem=codes_in_smem)
    return [lambda c=c, x=x: w4a16.mma_gemm(x, c.fragment_qweight, c.scales, None, None,
                                            c.factor_b if correct else None, c.factor_a if correct else None,
                                            GROUP, config) for c, x in zip(copies, xs)]


def corrected_vllm_calls(machete, copies, xs, layer: str) -> list[Callable[[], torch.Tensor]]:
    """The plugin's previous path: torch.ops.glowq.linear around Machete (side-stream correction)."""
    from vllm_glowq import correction

    calls = []
    for i, ((mlayer, kernel), c, x) in enumerate(zip(machete, copies, xs)):
        mlayer.glowq_B, mlayer.glowq_A = c.factor_b, c.factor_a
        name = f"bench.{layer}.{i}"
        correction.register_layer(name, mlayer, lambda lay, inp, bias, kernel=kernel: kernel.apply_weights(lay, inp, bias))
        calls.append(lambda name=name, x=x, n=c.factor_a.shape[0]: torch.ops.glowq.linear(x, None, name, n))
    return calls


SWEEP_MAX_ERROR = 4e-3  # bf16 output rounding with headroom, as tests/test_kernels.py


def config_timer(copies, xs, kernel: Callable, layout: str) -> Callable:
    """Microseconds per call of the corrected `kernel` launched with a given configuration. A configuration
    whose output misses the float64 reference by more than the bf16 bar counts as never finishing,
    so a wrong but fast launch cannot become a default."""
    ref = reference(xs[0], copies[0], True)

    def timed(config) -> float:
        calls = [lambda c=c, x=x: kernel(x, getattr(c, layout), c.scales, None, None, c.factor_b, c.factor_a, GROUP,
                                         config)
                 for c, x in zip(copies, xs)]
        try:
            error = relative_error(calls[0](), ref)
            if not error <= SWEEP_MAX_ERROR:  # NaN too
                print(f"    {config}: wrong output (relative error {error:.1e})", flush=True)
                return float("inf")
            return time_per_call(calls, replays=5)
        except Exception as exc:  # e.g. out of shared memory for a large tile
            print(f"    {config}: {type(exc).__name__}", flush=True)
            return float("inf")

    return timed


def sweep_report(default, results: dict) -> dict:
    best = min(results, key=results.get)
    return {"default": dataclasses.asdict(default), "default_us": results[default],
            "best": dataclasses.asdict(best), "best_us": results[best],
            "all": [[dataclasses.asdict(c), t] for c, t in sorted(results.items(), key=lambda kv: kv[1])]}


def sweep_mma_configs(copies, xs, tokens: int, k: int, n: int) -> dict:
    """Fastest tensor-core launch near the default: row tile, token tile, K split, then the shrink's
    chunk and where the expand runs, each with and without x loaded a block ahead, then 2 and 8 warps."""
    space = w4a16.workspace(copies[0].qweight.device)
    default = w4a16.choose_mma_config(tokens, n, k, GROUP, space.sm_count)
    timed = config_timer(copies, xs, w4a16.mma_gemm, "fragment_qweight")
    results = {default: timed(default)}
    k_blocks = k // w4a16.fragments_block_k(k, GROUP)
    tokens_pow2 = max(16, 1 << (tokens - 1).bit_length())
    for block_n in (64, 128):
        for block_t in sorted({8 if tokens <= 8 else 16, min(32, tokens_pow2), min(64, tokens_pow2)}):
            for factor in (0.5, 1, 2):
                split = max(1, min(k_blocks, round(default.split_k * factor)))
                config = dataclasses.replace(default, block_n=block_n, block_t=block_t, split_k=split)
                if config not in results:
                    results[config] = timed(config)
    best = min(results, key=results.get)
    for shrink_blocks in (1, 2, 4):  # the shrink's chain of K blocks: it must end before the first expand
        for expand_items in (False, True):  # who expands: the tile's last contributor, or a program of its own
            config = dataclasses.replace(best, shrink_blocks=shrink_blocks, expand_items=expand_items)
            if config not in results:
                results[config] = timed(config)
    for config in list(results):  # x loaded a block ahead or not, on every launch tried
        other = dataclasses.replace(config, prefetch_x=not config.prefetch_x)
        if other not in results:
            results[other] = timed(other)
    best = min(results, key=results.get)
    # 2 warps: fewer instructions per weight (2.1 against 2.9 at 8 x 64); 8 warps of 16 rows: no
    # spill at 64 x 128 (193 registers against 255); sm_90 compiles
    for num_warps in (2, 8):
        for prefetch_x in (False, True):
            config = dataclasses.replace(best, num_warps=num_warps, prefetch_x=prefetch_x)
            if best.block_n >= 16 * num_warps and config not in results:
                results[config] = timed(config)
    return sweep_report(default, results)


SWEEP_SPLITS = (1, 2, 4, 8)  # K splits the warpgroup-MMA sweep tries (--sweep-splits)
SWEEP_CODES_IN_SMEM = (False, True)  # and where its codes go (--sweep-codes)
# (tokens, rows, warps): the accumulator at most 128 registers a thread, 16 rows per warp
WGMMA_TILES = [(8, 64, 4), (8, 128, 4), (16, 64, 4), (16, 128, 4), (16, 128, 8), (32, 64, 4), (32, 128, 4),
               (32, 128, 8), (64, 64, 4), (64, 128, 4), (64, 128, 8), (64, 256, 8), (128, 64, 4), (128, 128, 4), (128, 128, 8), (128, 256, 8),
               (256, 64, 4), (256, 128, 8)]


def sweep_wgmma_configs(copies, xs, tokens: int, k: int, n: int) -> dict:
    """Fastest warpgroup-MMA launch: token x row tile and warps, K split (within the partials
    workspace), codes from registers or through shared memory, the shrink's chunk; up to 64
    tokens also the mma.sync kernel's default."""
    space = w4a16.workspace(copies[0].qweight.device)
    default = w4a16.choose_mma_config(tokens, n, k, GROUP, space.sm_count, hopper=True)
    timed = config_timer(copies, xs, w4a16.mma_gemm, "fragment_qweight")
    results = {default: timed(default)}
    k_blocks = k // w4a16.fragments_block_k(k, GROUP)
    base = w4a16.choose_mma_config(max(tokens, w4a16.WGMMA_MIN_TOKENS), n, k, GROUP, space.sm_count, hopper=True)
    for block_t, block_n, warps in WGMMA_TILES:
        if block_t > max(16, 1 << (tokens - 1).bit_length()) or (tokens > 64 and block_t < 64):
            continue
        for split in SWEEP_SPLITS:
            fits = split == 1 or (tokens <= w4a16.WORKSPACE_TOKENS
                                  and split * tokens * n * 4 <= w4a16.PARTIAL_SUM_BYTES)
            if split <= k_blocks and fits:
                for codes_in_smem in SWEEP_CODES_IN_SMEM:
                    config = dataclasses.replace(base, block_t=block_t, block_n=block_n, split_k=split,
                                                 num_warps=warps, codes_in_smem=codes_in_smem)
                    if config not in results:
                        results[config] = timed(config)
    best = min(results, key=results.get)
    for shrink_blocks in (1, 2, 4, 8):
        config = dataclasses.replace(best, shrink_blocks=shrink_blocks)
        if config not in results:
            results[config] = timed(config)
    if tokens <= w4a16.GEMM_MAX_TOKENS:
        mma_sync = w4a16.choose_mma_config(tokens, n, k, GROUP, space.sm_count, hopper=False)
        results[mma_sync] = timed(mma_sync)
    return sweep_report(default, results)


def sweep_configs(copies, xs, tokens: int, k: int, n: int) -> dict:
    """Fastest launch configuration of the Triton kernel near its default."""
    space = w4a16.workspace(copies[0].qweight.device)
    default = w4a16.choose_gemm_config(tokens, n, k, GROUP, space.sm_count)
    timed = config_timer(copies, xs, w4a16.gemm, "kernel_qweight")
    results = {}
    gemv = default.block_m == 1
    for block_n in (64, 128, 256) if gemv else (32, 64, 128):
        for factor in (0.5, 1, 2):
            split = max(1, min(k // default.block_k, round(default.split_k * factor)))
            config = dataclasses.replace(default, block_n=block_n, split_k=split)
            results[config] = timed(config)
    best = min(results, key=results.get)
    for warps in (1, 2, 4) if gemv else (4, 8):
        for stages in (2, 3, 4):
            config = dataclasses.replace(best, num_warps=warps, num_stages=stages)
            if config not in results:
                results[config] = timed(config)
    best = min(results, key=results.get)
    if best.split_k > 1:  # the split-K sum one partial per load (its previous form), for comparison
        config = dataclasses.replace(best, partial_rows=1)
        results[config] = timed(config)
    if gemv:  # the hand-written prefetch against Triton's own schedule, and the tensor-core tile
        best = min(results, key=results.get)
        config = dataclasses.replace(best, prefetch=not best.prefetch)
        results[config] = timed(config)
        tensor_core = w4a16.choose_gemm_config(16, n, k, GROUP, space.sm_count)
        for block_n in (64, 128):
            for factor in (1, 2):
                config = dataclasses.replace(tensor_core, block_n=block_n,
                                             split_k=max(1, min(k // tensor_core.block_k, tensor_core.split_k * factor)))
                results[config] = timed(config)
    best = min(results, key=results.get)
    for expand_at in (0.25, 0.5, 0.75, 1.0):  # where the expand items sit in the grid
        config = dataclasses.replace(best, expand_at=expand_at)
        if config not in results:
            results[config] = timed(config)
    return sweep_report(default, results)


def launch_table(result: dict, args: dict) -> dict:
    """The sweep's fastest launch per layer and token count, or `dense` where dequantize + cuBLAS
    beat it, in the form kernels/tuned.py reads."""
    from vllm_glowq.kernels import tuned

    layers: dict[str, dict] = {}
    for row in result["rows"]:
        if "sweep" not in row:
            continue
        dense_us = row["us"].get("glowq_dense", float("inf"))
        best = tuned.DENSE if dense_us < row["sweep"]["best_us"] else row["sweep"]["best"]
        layers.setdefault(f"{row['n']}x{row['k']}", {})[str(row["tokens"])] = best
    command = "python bench/kernel_microbench.py --sweep-wgmma " + " ".join(
        f"--{key.replace('_', '-')} {value}" for key, value in args.items()
        if key in ("tokens", "layers", "sweep_splits", "sweep_codes"))
    return {"device": result["device"], "triton": result["triton"], "command": command, "layers": layers}


def write_launch_table(path: Path, table: dict) -> None:
    """Write `table`, keeping the layers of a table already at `path` that this run did not sweep
    (one call's time limit sweeps some layers, the next call the others)."""
    if path.is_file():
        earlier = json.loads(path.read_text())
        commands = earlier["command"].split("; ")
        command = "; ".join(commands + [table["command"]] if table["command"] not in commands else commands)
        table = {**table, "command": command, "layers": {**earlier["layers"], **table["layers"]}}
    path.write_text(json.dumps(table, indent=1) + "\n")


def format_row(row: dict) -> str:
    parts = [f"{row['layer']:>12} T={row['tokens']:<5}"]
    for name, us in row["us"].items():
        parts.append(f"{name} {us:7.2f}us ({100 * row['bandwidth_fraction'][name]:3.0f}%, err {row['error'][name]:.1e})")
    if "sweep" in row:
        best = row["sweep"]["best"]
        parts.append(f"sweep: default {row['sweep']['default_us']:.2f}us, best {row['sweep']['best_us']:.2f}us "
                     f"({' '.join(f'{key} {value}' for key, value in best.items())})")
    return " | ".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="1,16,64,256,2048")
    parser.add_argument("--layers", default=",".join(LAYERS),
                        help="Llama-3-8B layer names, or shapes as NxK (outputs x inputs)")
    parser.add_argument("--sweep", action="store_const", const="mma", help="the tensor-core kernel's launches")
    parser.add_argument("--sweep-triton", dest="sweep", action="store_const", const="triton",
                        help="the Triton kernel's launches instead")
    parser.add_argument("--sweep-wgmma", dest="sweep", action="store_const", const="wgmma",
                        help="the tensor-core kernel's warpgroup-MMA launches (Hopper, from 8 tokens)")
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--max-block-k", type=int, choices=(16, 32, 64, 128), default=w4a16.MAX_BLOCK_K,
                        help="largest K block, which is also the repacked layout's (w4a16.MAX_BLOCK_K)")
    parser.add_argument("--tuned-out", help="with --sweep-wgmma: write the fastest launch of each layer and token "
                        "count (or dense, where dequantize + cuBLAS was faster) as a launch table (kernels/tuned.py)")
    parser.add_argument("--sweep-splits", default="1,2,4,8", help="K splits the warpgroup-MMA sweep tries")
    parser.add_argument("--sweep-codes", choices=("both", "registers", "smem"), default="both",
                        help="the warpgroup-MMA sweep's codes: from registers, through shared memory, or both")
    args = parser.parse_args()
    global SWEEP_SPLITS, SWEEP_CODES_IN_SMEM
    SWEEP_SPLITS = tuple(int(s) for s in args.sweep_splits.split(","))
    SWEEP_CODES_IN_SMEM = {"both": (False, True), "registers": (False,), "smem": (True,)}[args.sweep_codes]
    w4a16.MAX_BLOCK_K = args.max_block_k  # before any layer is repacked or configured
    start = time.perf_counter()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()
    why_not = "disabled" if args.no_vllm else init_vllm()
    print(f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; {torch.cuda.get_device_name()}; vLLM kernels: "
          f"{'yes' if why_not is None else 'no (' + why_not + ')'}", flush=True)
    import triton

    result = {"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth, "triton": triton.__version__,
              "torch": torch.__version__, "rank": RANK, "group_size": GROUP, "max_block_k": w4a16.MAX_BLOCK_K,
              "rows": []}
    for layer in args.layers.split(","):
        result["rows"] += bench_layer(layer, [int(t) for t in args.tokens.split(",")], bandwidth, why_not is None,
                                      args.sweep)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        if args.tuned_out:
            write_launch_table(Path(args.tuned_out), launch_table(result, vars(args)))
        torch.cuda.empty_cache()
    print(f"done in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
