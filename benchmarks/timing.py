"""Timing shared by the benchmarks: the median of repeated calls, with the device synchronised
around each so that a GPU's queued work is counted, or the mean of calls made back to back."""
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


def back_to_back_seconds(fn: Callable[[], object], steps: int, device: torch.device = torch.device("cpu")) -> float:
    """The mean wall time of ``steps`` calls made back to back after one warm-up call, as a training
    loop makes them: the device is synchronised once, at the end, so the host queues each call while
    the device still runs the one before (``median_seconds`` waits for each). On a CPU the two agree."""
    fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps
