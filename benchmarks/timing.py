"""Timing shared by the benchmarks: the median of repeated calls, with the device synchronised
around each so that a GPU's queued work is counted."""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a no-op on a CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(fn: Callable[[], object], steps: int, device: torch.device = torch.device("cpu")) -> float:
    """The median wall time of ``steps`` calls of ``fn`` after one warm-up call."""
    fn()
    sync(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)
