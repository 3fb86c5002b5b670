"""The low-rank correction alone, per Llama-3-8B layer shape and token count, on the GPU.

Times exactly what the plugin's `apply` adds to the base int4 GEMM,

    R = F.linear(x, B); out = torch.addmm(y, R, A.t())

for GlowQ (one B per layer) and for per-module correction as the plugin lays it out (one B per
member stacked into [U r, K], each A_i in its own column block of [N, U r]), plus an optional
Triton path (split-K shrink into an fp32 R, then A R added in place into y: see
`triton_correction`). For each case it reports the bytes the two-GEMM path must move, the
achieved bandwidth against the measured device-to-device copy bandwidth, and the ideal time of
the layer's int4 weights at that bandwidth (what the correction is paid against).

Timing: CUDA-graph replays over enough rotating weight/activation sets to overflow L2, median
of several replays (METHOD.md).

    python bench/correction_microbench.py --out micro.json [--tokens 1,16,64,256,2048]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

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


def copy_bandwidth(device: torch.device, nbytes: int = 2 * 1024**3, reps: int = 10) -> float:
    """Device-to-device copy, bytes read + written per second."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=device).normal_()
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


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


def plugin_correction(x, y, b, a):
    reduced = F.linear(x, b)
    return torch.addmm(y, reduced, a.t())


def two_gemm_bytes(t: int, k: int, n: int, b_rows: int, elem: int = 2) -> int:
    """x, B, R (written and read back), A, y read, out written."""
    return elem * (t * k + b_rows * k + 2 * t * b_rows + n * b_rows + 2 * t * n)


def int4_weight_bytes(k: int, n: int) -> int:
    return k * n // 2 + (k // GROUP) * n * 2  # codes + bf16 scales


def time_graph(fn, sets: list[tuple], replays: int = 10) -> float:
    """Seconds per call of fn(*set), from CUDA-graph replays over all sets."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for s in sets[:2]:
            fn(*s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            fn(*s)
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times) / len(sets)


def check_triton(device) -> float:
    """Relative error of the Triton path against a float64 reference on fresh random inputs."""
    from triton_correction import correction_inplace

    worst = 0.0
    for t, k, n in ((1, 4096, 6144), (37, 14336, 4096), (300, 4096, 1000)):
        x = torch.randn(t, k, device=device, dtype=torch.bfloat16)
        b = torch.randn(RANK, k, device=device, dtype=torch.bfloat16) * 0.02
        a = torch.randn(n, RANK, device=device, dtype=torch.bfloat16) * 0.02
        y = torch.randn(t, n, device=device, dtype=torch.bfloat16)
        ref = y.double() + (x.double() @ b.double().t()) @ a.double().t()
        out = y.clone()
        correction_inplace(x, b, a, out)
        worst = max(worst, float((out.double() - ref).norm() / ref.norm()))
    return worst


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokens", default="1,16,64,256,2048")
    parser.add_argument("--no-triton", action="store_true")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    torch.manual_seed(0)
    bw = copy_bandwidth(device)
    print(f"device {torch.cuda.get_device_name()}, copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rank": RANK,
              "copy_bandwidth_Bps": bw, "rows": []}
    triton_fn = None
    if not args.no_triton:
        try:
            import triton

            from triton_correction import correction_inplace

            result["triton"] = triton.__version__
            result["triton_check_rel_err"] = check_triton(device)
            print(f"triton correction rel err vs float64: {result['triton_check_rel_err']:.2e}", flush=True)
            triton_fn = correction_inplace
        except Exception as exc:  # report, keep timing the plugin's path
            result["triton_error"] = f"{type(exc).__name__}: {exc}"
            print("triton path unavailable:", result["triton_error"], flush=True)
    print(f"{'layer':13} {'mode':9} {'T':>5} {'us':>8} {'MB':>7} {'TB/s':>6} {'%copy':>6} "
          f"{'int4 us@copy':>12} {'ratio':>6} {'triton us':>9}", flush=True)
    for layer, (k, sizes) in LAYERS.items():
        n = sum(sizes)
        for mode in ("glowq", "permodule") if len(sizes) > 1 else ("glowq",):
            for t in [int(v) for v in args.tokens.split(",")]:
                b0, a0 = factors(k, sizes, mode, device)
                per_set = 2 * (t * k + b0.numel() + a0.numel() + 2 * t * n)
                count = max(4, min(64, ROTATE_BYTES // per_set))
                sets = []
                for _ in range(count):
                    b, a = factors(k, sizes, mode, device)
                    x = torch.randn(t, k, device=device, dtype=torch.bfloat16)
                    y = torch.randn(t, n, device=device, dtype=torch.bfloat16)
                    sets.append((x, y, b, a))
                seconds = time_graph(plugin_correction, sets)
                moved = two_gemm_bytes(t, k, n, b0.shape[0])
                base = int4_weight_bytes(k, n) / bw
                row = {"layer": layer, "mode": mode, "tokens": t, "K": k, "N": n, "B_rows": b0.shape[0],
                       "us": seconds * 1e6, "bytes": moved, "achieved_Bps": moved / seconds,
                       "fraction_of_copy_bw": moved / seconds / bw, "int4_weight_bytes": int4_weight_bytes(k, n),
                       "int4_ideal_us": base * 1e6, "correction_over_int4_ideal": seconds / base}
                if triton_fn is not None and mode == "glowq":
                    row["triton_us"] = time_graph(lambda x, y, b, a: triton_fn(x, b, a, y), sets) * 1e6
                result["rows"].append(row)
                print(f"{layer:13} {mode:9} {t:5d} {row['us']:8.2f} {moved / 1e6:7.2f} "
                      f"{row['achieved_Bps'] / 1e12:6.2f} {100 * row['fraction_of_copy_bw']:5.1f}% "
                      f"{row['int4_ideal_us']:12.2f} {row['correction_over_int4_ideal']:6.2f} "
                      f"{row.get('triton_us', float('nan')):9.2f}", flush=True)
                del sets
                torch.cuda.empty_cache()
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
