"""Timing helpers shared by the benchmarks: median of repeats after warm-up, with spread."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch


@dataclass
class Timing:
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    def __str__(self) -> str:
        return f"{self.median_s * 1e3:.2f} ms [{self.min_s * 1e3:.2f}-{self.max_s * 1e3:.2f}]"


def summarize(times: list[float]) -> Timing:
    """Median, min and max of ``times`` (seconds) and their count."""
    return Timing(statistics.median(times), min(times), max(times), len(times))


def _sync(device) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(fn, *, repeats: int = 5, warmup: int = 1, device=None, setup=None) -> Timing:
    """Median wall time of ``fn()`` over ``repeats`` runs after ``warmup`` runs.

    ``setup()`` (untimed) runs before every call, e.g. to reset gradients.
    """
    for _ in range(warmup):
        if setup is not None:
            setup()
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return summarize(times)


def measure_interleaved(fns: dict, *, repeats: int = 5, warmup: int = 1, device=None, setup=None) -> dict:
    """Median times of several contenders measured round-robin (one run of each per round).

    Interleaving makes ratios robust to load that changes during the run: every contender sees the
    same machine state on average. ``setup(name)`` (untimed) runs before each call.
    """
    times = {name: [] for name in fns}
    for r in range(warmup + repeats):
        for name, fn in fns.items():
            if setup is not None:
                setup(name)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: summarize(t) for name, t in times.items()}
