"""The low-rank correction alone, per Llama-3-8B layer shape and token count, on the GPU.

Times `out = y + A (B x)` alone, as the plugin computed it before the custom op and on the
op's serial paths (vllm_glowq/correction.py):

* `two_gemm`: `R = F.linear(x, B); out = torch.addmm(y, R, A.t())` (cuBLAS, the old path);
* `fused`: one Triton launch (split-K shrink, grid barrier, expand + add), `split` above
  FUSED_MAX_TOKENS: the op's serial path;
* `split`: cuBLAS shrink, then the Triton expand + add.

The op's default decode path overlaps the int4 GEMM, so it is measured in vLLM instead.

for GlowQ (one B per layer) and for per-module correction as the plugin lays it out (one B per
member stacked into [U r, K], each A_i in its own column block of [N, U r]). For each case it
reports the bytes the op must move (x, B, A, y read, out written), the achieved bandwidth
against the measured device-to-device copy bandwidth, and the ideal time of the layer's int4
weights at that bandwidth (what the correction is paid against). `--sweep` also times a few
fused-kernel launch configurations around the default one.

Timing: CUDA-graph replays over enough rotating weight/activation sets to overflow L2, median
of several replays.

    python bench/correction_microbench.py --out micro.json [--tokens 1,16,64,256,2048] [--sweep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from gpu_timing import copy_bandwidth, seconds_per_call
from vllm_glowq import correction
from vllm_glowq.kernels import lowrank_triton

RANK = 64
GROUP = 128
# Llama-3-8B: layer -> (K, output sizes of its members)
LAYERS = {
    "qkv_proj": (4096, (4096, 1024, 1024)),
    "o_proj": (4096, (4096,)),
    "gate_up_proj": (4096, (14336, 14336)),
    "down_proj": (14336, (4096,)),
}
ROTATE_BYTES = 512 * 1024**2  # > 8x the H200's 60 MB L2


def factors(k: int, sizes: tuple[int, ...], mode: str, device, dtype=torch.bfloat16):
    """(B, A) as the plugin holds them for this layer."""
    n = sum(sizes)
    if mode == "glowq" or len(sizes) == 1:
        return (torch.randn(RANK, k, device=device, dtype=dtype) * 0.02,
                torch.randn(n, RANK, device=device, dtype=dtype) * 0.02)
    units = len(sizes)
    b = torch.randn(units * RANK, k, device=device, dtype=dtype) * 0.02
    a = torch.zeros(n, units * RANK, device=device, dtype=dtype)
    row = 0
    for i, size in enumerate(sizes):
        a[row : row + size, i * RANK : (i + 1) * RANK] = torch.randn(size, RANK, device=device, dtype=dtype) * 0.02
        row += size
    return b, a


def two_gemm(x, y, b, a):
    return torch.addmm(y, F.linear(x, b), a.t())


def serial(path: str):
    """The correction on one of the op's serial paths (`fused` falls back to `split` above
    FUSED_MAX_TOKENS, as the op does; the overlap needs the int4 GEMM beside it)."""
    def run(x, y, b, a):
        return correction.correct(x, y, b, a, path)
    return run


def op_bytes(t: int, k: int, n: int, b_rows: int, elem: int = 2) -> int:
    """x, B, A, y read, out written (R stays on chip / in L2)."""
    return elem * (t * k + b_rows * k + n * b_rows + 2 * t * n)


def int4_weight_bytes(k: int, n: int) -> int:
    return k * n // 2 + (k // GROUP) * n * 2  # codes + bf16 scales


def time_graph(fn, sets: list[tuple], replays: int = 10) -> float:
    """Seconds per call of fn over the rotating sets (gpu_timing.seconds_per_call)."""
    return seconds_per_call([lambda s=s: fn(*s) for s in sets], replays)


def with_config(config, fused: bool):
    """The Triton kernel with an explicit launch configuration (for --sweep)."""
    def run(x, y, b, a):
        if fused:
            state = correction._device_state(x.device, b.shape[0])
            reduced, sync = state.reduced, state.sync
        else:
            reduced, sync = F.linear(x, b), None
        out = torch.empty_like(y)
        lowrank_triton.launch(x, b, a, y, out, reduced, sync, config)
        return out
    return run


def sweep_configs(default, sm_count: int, fused: bool) -> dict[str, object]:
    """A few launch configurations around the default one (fused: never more programs than SMs)."""
    other_n = 64 if default.block_n == 128 else 128
    variants = {"default": default, f"block_n={other_n}": dataclasses.replace(default, block_n=other_n),
                "num_warps=8": dataclasses.replace(default, num_warps=8)}
    if fused:
        variants["k_split*2"] = dataclasses.replace(default, k_split=default.k_split * 2)
        variants["k_split/2"] = dataclasses.replace(default, k_split=max(default.block_k, default.k_split // 2))
        variants["programs/2"] = dataclasses.replace(default, programs=max(1, default.programs // 2))
    else:
        variants["block_m=128"] = dataclasses.replace(default, block_m=128)
    return variants


def make_sets(t: int, k: int, sizes: tuple[int, ...], mode: str, device) -> list[tuple]:
    n = sum(sizes)
    b0, a0 = factors(k, sizes, mode, device)
    per_set = 2 * (t * k + b0.numel() + a0.numel() + 2 * t * n)
    sets = []
    for _ in range(max(4, min(64, ROTATE_BYTES // per_set))):
        b, a = factors(k, sizes, mode, device)
        sets.append((torch.randn(t, k, device=device, dtype=torch.bfloat16), torch.randn(t, n, device=device,
                     dtype=torch.bfloat16), b, a))
    return sets


PATHS = {"two_gemm": two_gemm, "fused": serial("fused"), "split": serial("split")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="1,16,64,256,2048")
    parser.add_argument("--sweep", action="store_true", help="time fused-kernel configurations too")
    args = parser.parse_args(argv)
    import triton

    device = torch.device("cuda")
    torch.manual_seed(0)
    sm_count = torch.cuda.get_device_properties(device).multi_processor_count
    correction._device_state(device, 3 * RANK)
    bw = copy_bandwidth()
    print(f"device {torch.cuda.get_device_name()}, {sm_count} SMs, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "rank": RANK, "sm_count": sm_count, "copy_bandwidth_Bps": bw,
              "fused_max_tokens": correction.FUSED_MAX_TOKENS, "rows": [], "sweep": []}
    print(f"{'layer':13} {'mode':9} {'T':>5} " + " ".join(f"{p + ' us':>11}" for p in PATHS)
          + f" {'MB':>7} {'fused TB/s':>10} {'%copy':>6} {'int4 us':>8}", flush=True)
    for layer, (k, sizes) in LAYERS.items():
        n = sum(sizes)
        for mode in ("glowq", "permodule") if len(sizes) > 1 else ("glowq",):
            for t in [int(v) for v in args.tokens.split(",")]:
                sets = make_sets(t, k, sizes, mode, device)
                b_rows = sets[0][2].shape[0]
                times = {name: time_graph(fn, sets) * 1e6 for name, fn in PATHS.items()}
                moved = op_bytes(t, k, n, b_rows)
                base_us = int4_weight_bytes(k, n) / bw * 1e6
                row = {"layer": layer, "mode": mode, "tokens": t, "K": k, "N": n, "B_rows": b_rows,
                       "us": times, "bytes": moved,
                       "int4_weight_bytes": int4_weight_bytes(k, n), "int4_ideal_us": base_us}
                result["rows"].append(row)
                print(f"{layer:13} {mode:9} {t:5d} " + " ".join(f"{times[p]:11.2f}" for p in PATHS)
                      + f" {moved / 1e6:7.2f} {moved / times['fused'] / 1e6:10.2f} "
                      f"{100 * moved / times['fused'] * 1e6 / bw:5.1f}% {base_us:8.2f}", flush=True)
                if args.sweep and mode == "glowq":
                    fused = t <= correction.FUSED_MAX_TOKENS
                    default = lowrank_triton.choose_config(t, k, n, b_rows, sm_count, fused)
                    for name, config in sweep_configs(default, sm_count, fused).items():
                        us = time_graph(with_config(config, fused), sets) * 1e6
                        result["sweep"].append({"layer": layer, "tokens": t, "config": name,
                                                "launch": dataclasses.asdict(config), "us": us})
                        print(f"    sweep {name:14} {us:8.2f} us  {config}", flush=True)
                del sets
                torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
