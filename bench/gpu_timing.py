"""Timing on the GPU, shared by the microbenchmarks: the copy-bandwidth ceiling and CUDA-graph replays.

A graph runs every call once (one per weight copy, enough copies to overflow L2, so weights come
from HBM as in a model) and is replayed several times; the median replay over the number of
calls is the time per call. Warm-up happens on a side stream first, so compilation and handle
creation stay out of the graph.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch


def copy_bandwidth(nbytes: int = 2 * 1024**3, reps: int = 10) -> float:
    """Device-to-device copy, bytes read + written per second (median after three warm-ups)."""
    src = torch.empty(nbytes // 2, dtype=torch.bfloat16, device="cuda").normal_()
    dst = torch.empty_like(src)
    times = []
    for rep in range(3 + reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        if rep >= 3:
            times.append(start.elapsed_time(end) / 1e3)
    return 2 * nbytes / statistics.median(times)


def capture(step: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Run `step` once on a side stream (warm-up), then capture it; returns the graph and its outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = step()
    return graph, outputs


def seconds_per_call(calls: list[Callable[[], object]], replays: int = 7) -> float:
    """Median graph replay over len(calls): one graph that makes every call once."""
    graph, _ = capture(lambda: [call() for call in calls])
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3 / len(calls))
    return statistics.median(times)


def kernel_breakdown(calls: list[Callable[[], object]], replays: int = 5) -> dict[str, float]:
    """Device microseconds per call of each kernel in one graph of `calls` (the graph of
    `seconds_per_call`), from the profiler's CUDA events over `replays` replays, largest first;
    key "gaps" is the replay's wall time not covered by any kernel (launch latency between
    dependent kernels, which is what small kernels in a row cost)."""
    from torch.profiler import ProfilerActivity, profile

    graph, _ = capture(lambda: [call() for call in calls])
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    per_call = replays * len(calls)
    kernels = summed_device_times(prof.key_averages(), per_call)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    graph.replay()
    end.record()
    end.synchronize()
    kernels["gaps"] = max(0.0, 1e3 * start.elapsed_time(end) / len(calls) - sum(kernels.values()))
    return kernels


def summed_device_times(averages, per_call: int, name_chars: int = 60) -> dict[str, float]:
    """{kernel name (cut to name_chars): device us per call} from the profiler's averages,
    largest first (kernels whose cut names agree are summed)."""
    totals: dict[str, float] = {}
    for avg in averages:
        if avg.device_time_total > 0:
            name = avg.key[:name_chars]
            totals[name] = totals.get(name, 0.0) + avg.device_time_total / per_call
    return dict(sorted(totals.items(), key=lambda item: -item[1]))
