"""Timing and budgets of the GPU benchmark tables.

* :func:`time_kernel` -- a short GPU operation: ``triton.testing.do_bench`` (CUDA events, warm-up,
  the L2 cache flushed before every repeat, median). The caller also rotates its inputs over
  :func:`rotation` copies whose total exceeds twice the L2 cache, so no repeat finds its operands
  cached. On CPU (the dry run) ``time.perf_counter`` around the call, median of a few repeats.
* :func:`time_call` -- a whole computation (a Fisher pass over several batches, with host work in
  it): CUDA events around each call after a warm-up, synchronised, median of ``repeats``.
* :class:`Budget` -- a phase's deadline: a table checks it before each row and reports the rows it
  had no time for as cut, instead of being killed halfway.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import torch


def is_cuda(device) -> bool:
    return torch.device(device).type == "cuda"


def sync(device) -> None:
    if is_cuda(device):
        torch.cuda.synchronize(device)


def l2_bytes(device) -> int:
    """L2 cache size of the card (torch reports it); 32 MiB as a nominal cache on CPU."""
    if is_cuda(device):
        props = torch.cuda.get_device_properties(device)
        return int(getattr(props, "L2_cache_size", 0) or 64 << 20)
    return 32 << 20


def rotation(set_bytes: int, device, *, factor: float = 2.0, cap: int = 8) -> int:
    """How many copies of an input set of ``set_bytes`` to rotate through so that together they exceed
    ``factor`` x L2 (at least 1, at most ``cap``: a set bigger than L2 needs no copies)."""
    if set_bytes <= 0:
        return 1
    return max(1, min(cap, math.ceil(factor * l2_bytes(device) / set_bytes)))


class Rotor:
    """Calls ``fn(inputs[i])`` with ``i`` cycling over the input sets (one set per call)."""

    def __init__(self, fn, inputs: list):
        self.fn, self.inputs, self.i = fn, inputs, 0

    def __call__(self):
        x = self.inputs[self.i]
        self.i = (self.i + 1) % len(self.inputs)
        return self.fn(x)


def time_kernel(fn, device, *, warmup_ms: float = 25, rep_ms: float = 100, cpu_repeats: int = 3) -> float:
    """Median seconds of one ``fn()`` (see the module docstring)."""
    if is_cuda(device):
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")) * 1e-3
    fn()  # warm-up (first-call compilation, allocations)
    times = []
    for _ in range(cpu_repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def time_sized(fn, device, sizes) -> float:
    """:func:`time_kernel` with the warm-up / repeat settings of a :class:`~benchmarks.gpu.sizes.Sizes`."""
    return time_kernel(fn, device, warmup_ms=sizes.warmup_ms, rep_ms=sizes.rep_ms, cpu_repeats=sizes.repeats)


def time_call(fn, device, *, repeats: int = 3, warmup: int = 1) -> tuple[float, list[float]]:
    """(median seconds, all repeats) of ``fn()`` (see the module docstring)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if is_cuda(device):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


@dataclass
class Budget:
    """A deadline ``seconds`` from now (``time.monotonic``)."""

    seconds: float

    def __post_init__(self):
        self.start = time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def used(self) -> float:
        return time.monotonic() - self.start

    def expired(self) -> bool:
        return self.left() <= 0
