"""Memory budget of the contenders that materialise per-sample gradients, and batch splitting.

Opacus, torch.func and BackPACK's ``BatchGrad`` hold ``m * P`` per-sample gradient values for a
micro-batch of ``m`` samples and ``P`` parameters. They split the workload's batches so that
``m * copies * P * bytes`` stays under a budget: ``EWC_FAST_BENCH_MEM_BUDGET`` bytes, by default a
quarter of the device's memory (host RAM on CPU). The split is reported in the row's notes.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch
from torch import Tensor


def physical_memory_bytes() -> int | None:
    """Physical memory of this machine (bytes), or None where POSIX ``sysconf`` cannot tell."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return None


def mem_budget_bytes(device="cpu") -> int:
    """Bytes a contender may spend on materialised per-sample gradients (see the module docstring):
    a quarter of the device's memory unless ``EWC_FAST_BENCH_MEM_BUDGET`` says otherwise."""
    env = os.environ.get("EWC_FAST_BENCH_MEM_BUDGET")
    if env:
        return int(float(env))
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory // 4
    return (physical_memory_bytes() or 8 << 30) // 4


def micro_batch(
    batch_size: int, n_params: int, copies: float = 1.0, bytes_per: int = 4, budget: int | None = None, device="cpu"
) -> int:
    """Largest micro-batch ``1 <= m <= batch_size`` with ``m * copies * n_params * bytes_per <= budget``."""
    budget = mem_budget_bytes(device) if budget is None else budget
    per_sample = max(1.0, copies * n_params * bytes_per)
    return int(max(1, min(batch_size, budget // per_sample)))


def split_batches(batches: Iterable[tuple[Tensor, Tensor]], m: int) -> Iterator[tuple[Tensor, Tensor]]:
    """The ``(x, y)`` batches cut into consecutive pieces of at most ``m`` samples."""
    for x, y in batches:
        for i in range(0, x.shape[0], m):
            yield x[i : i + m], y[i : i + m]


def n_samples_of(batches: Iterable[tuple[Tensor, Tensor]]) -> int:
    """Number of samples N over all ``(x, y)`` batches."""
    return sum(int(y.shape[0]) for _, y in batches)
