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
