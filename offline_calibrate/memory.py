"""Host memory over a long layer-by-layer run.

glibc's malloc serves an allocation above its mmap threshold straight from the kernel and
gives it back when it is freed. The threshold starts at 128 KiB but rises (up to 32 MiB) every
time such a block is freed, and from then on blocks of a decoder layer's tensor sizes come from
the heap, where they fragment and stay resident after they are freed: on a 2-core CPU machine,
calibrating a 24-layer Llama peaked 60-80 MiB higher than a 4-layer one of the same width by
this alone, and the excess grows with the depth. Holding the threshold at its initial value
keeps the peak flat, at the cost of a system call per large allocation (a few per tensor of a
layer, negligible next to the arithmetic on it).
"""

from __future__ import annotations

import ctypes
import resource

import torch

M_MMAP_THRESHOLD = -3  # mallopt parameter (glibc malloc.h)
MMAP_THRESHOLD_BYTES = 128 * 1024  # glibc's initial threshold


def return_large_blocks_to_the_os() -> None:
    """Fix glibc's mmap threshold for this process (nothing where the C library has no mallopt)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def peak_memory_bytes() -> dict[str, int]:
    """Peak resident host memory of this process and peak CUDA memory allocated (0 without)."""
    return {
        "cpu_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "gpu_allocated": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0,
    }
