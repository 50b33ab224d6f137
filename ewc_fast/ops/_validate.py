"""Validation and layout helpers of the op layer: dtype sets, list/shape/device checks, finite
scalars, contiguous stand-ins. Used by every op family and by the consolidation classes."""

from __future__ import annotations

import math
import numbers
from contextlib import contextmanager

import torch

PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.float64)


def check_finite_scalar(
    owner: str, name: str, value, *, low: float | None = None, low_open: bool = False, high: float | None = None
) -> float:
    """``float(value)``, refusing non-numbers, NaN/Inf and values outside ``[low, high]``
    (``(low, high]`` if ``low_open``). Raises ``TypeError`` / ``ValueError``."""
    if isinstance(value, bool) or not (
        isinstance(value, numbers.Real) or (isinstance(value, torch.Tensor) and value.numel() == 1)
    ):
        raise TypeError(f"{owner}: {name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{owner}: {name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{owner}: {name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{owner}: {name} must be <= {high}, got {value}")
    return value


def check_lists(op: str, **lists) -> int:
    """All lists have one length; return it."""
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"{op}: tensor lists differ in length: {lengths}")
    return next(iter(lengths.values())) if lengths else 0


def check_group(op: str, idx: int, dtypes: dict, **tensors) -> None:
    """Tensors of one parameter: same shape and device, dtypes from the allowed sets."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{op}: tensor #{idx} shapes differ: {shapes}")
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"{op}: tensor #{idx} devices differ: {devices}")
    for name, t in tensors.items():
        allowed = dtypes.get(name)
        if allowed is not None and t.dtype not in allowed:
            raise TypeError(f"{op}: {name}[{idx}] has dtype {t.dtype}; allowed: {[str(d) for d in allowed]}")


def check_tensor_lists(op: str, dtypes: dict, **lists) -> int:
    """Lists of per-parameter tensors (one entry per parameter in each list): one length, and for every
    parameter index the checks of :func:`check_group`. Returns the number of parameters."""
    n = check_lists(op, **lists)
    for i in range(n):
        check_group(op, i, dtypes, **{name: tensors[i] for name, tensors in lists.items()})
    return n


def common_device(op: str, tensors) -> torch.device:
    devs = {t.device for t in tensors}
    if len(devs) > 1:
        raise ValueError(f"{op}: tensors on several devices {sorted(map(str, devs))}; one call serves one device")
    return next(iter(devs)) if devs else torch.device("cpu")


@contextmanager
def contiguous_inout(tensors: list[torch.Tensor]):
    """Yield contiguous stand-ins for ``tensors``; copy results back into non-contiguous originals."""
    work = [t if t.is_contiguous() else t.contiguous() for t in tensors]
    yield work
    for orig, w in zip(tensors, work):
        if w is not orig:
            orig.copy_(w)


def contiguous_in(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t if t.is_contiguous() else t.contiguous() for t in tensors]


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """``[first, last)`` byte addresses a tensor's elements may occupy (its strided extent)."""
    if t.numel() == 0:
        return (0, 0)
    start = t.data_ptr()
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return (start, start + extent * t.element_size())


def check_no_overlap(op: str, written: dict, operands: dict) -> None:
    """No tensor in ``written`` (name -> list, written in place) overlaps in memory any other tensor of
    ``operands`` (name -> list; may include the written lists), so that every element is read before
    any write can change it and each written element has one writer. Raises ``ValueError`` naming both
    tensors. One sort and sweep over the byte ranges (tensors on other devices than CPU/CUDA memory are
    compared by address as well: ``data_ptr`` is unique per device allocation)."""
    spans = []
    for name, tensors in operands.items():
        w = name in written
        for i, t in enumerate(tensors):
            lo, hi = _byte_range(t)
            if hi > lo:
                spans.append((str(t.device), lo, hi, w, f"{name}[{i}]"))
    spans.sort()
    active: list = []
    for dev, lo, hi, w, label in spans:
        active = [a for a in active if a[0] == dev and a[2] > lo]
        for _, _, _, aw, alabel in active:
            if w or aw:
                raise ValueError(
                    f"{op}: {alabel} and {label} overlap in memory; a tensor written in place must not share "
                    "memory with another operand (pass separate tensors, e.g. .clone())"
                )
        active.append((dev, lo, hi, w, label))
