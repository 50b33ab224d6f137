"""Validation and layout helpers of the op layer: dtype sets, list/shape/device/layout checks, finite
scalars, memory-overlap and autograd checks of written arguments, version-counter bumps, contiguous
stand-ins. Used by every op family and by the consolidation classes.

Every public op validates *all* its arguments before its first write (docs/GUARANTEES.md): a refused
call leaves every tensor exactly as it was.
"""

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
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{op}: {name}[{idx}] must be a Tensor, got {type(t).__name__}")
        if t.layout != torch.strided:
            raise TypeError(
                f"{op}: {name}[{idx}] has layout {t.layout}; the ops take dense (strided) tensors only "
                "(convert with .to_dense(), or use dense gradients, e.g. nn.Embedding(sparse=False))"
            )
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


def _storage_ptr(t: torch.Tensor) -> int | None:
    """Base pointer of ``t``'s storage, or ``None`` where there is none to compare (tracing, fake
    and meta tensors, empty tensors)."""
    if t.numel() == 0 or t.device.type == "meta":
        return None
    try:
        ptr = t.untyped_storage().data_ptr()
    except Exception:  # noqa: BLE001 - fake / functional tensors under tracing have no storage pointer
        return None
    return ptr or None


def _may_self_overlap(t: torch.Tensor) -> bool:
    """Whether two elements of ``t`` may share memory (stride 0, ``expand``, ``as_strided``)."""
    status = torch._debug_has_internal_overlap(t)
    if status != 2:  # 0: no overlap, 1: overlap (e.g. a stride-0 dimension)
        return status == 1
    # "too hard" for torch's quick test: sufficient condition for no overlap, dims by increasing stride
    extent = 0
    dims = sorted(((abs(st), sz) for sz, st in zip(t.shape, t.stride()) if sz > 1))
    for stride, size in dims:
        if stride <= extent:
            return True
        extent += stride * (size - 1)
    return False


def check_no_overlap(op: str, written: dict, read: dict | None = None) -> None:
    """Refuse written tensors that overlap themselves or any other argument.

    ``written`` / ``read``: ``name -> list of tensors`` (or one tensor, or ``None``); ``read`` may
    also hold the written lists (they are taken once, as written). Every written tensor must
    have no internal overlap (no stride-0 / expanded element shared by two indices: the result would
    depend on the write order) and share no memory with any other tensor of either dict (the same
    tensor twice in one list races between threads; an output aliasing an input reads values already
    overwritten). Read-only tensors may alias each other. The test is conservative: two views of one
    storage whose address ranges interleave (``x[::2]``, ``x[1::2]``) are refused too. Raises
    ``ValueError`` naming both arguments; skipped while tracing (the registered op's alias
    annotations apply there) and for tensors without storage (fake, meta).
    """
    if torch.compiler.is_compiling():
        return
    by_storage: dict[int, list] = {}
    entries = []
    for is_written, group in ((True, written), (False, read or {})):
        for name, tensors in group.items():
            if tensors is None or (not is_written and name in written):
                continue
            if isinstance(tensors, torch.Tensor):
                tensors = [tensors]
                label = lambda i, name=name: name  # noqa: E731
            else:
                label = lambda i, name=name: f"{name}[{i}]"  # noqa: E731
            for i, t in enumerate(tensors):
                if t is None:
                    continue
                ptr = _storage_ptr(t)
                if ptr is None:
                    continue
                if is_written and _may_self_overlap(t):
                    raise ValueError(
                        f"{op}: {label(i)} is written in place but several of its elements share memory "
                        f"(strides {tuple(t.stride())}, e.g. from expand()); pass a tensor that owns its "
                        "elements (.clone())"
                    )
                entries.append((label(i), t, is_written))
                by_storage.setdefault(ptr, []).append(len(entries) - 1)
    for members in by_storage.values():
        if len(members) < 2:
            continue
        # sweep the byte ranges [start, end) in order of start: a range that begins before the furthest
        # end seen so far overlaps the range holding that end
        spans = []
        for k in members:
            t = entries[k][1]
            last = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
            start = t.data_ptr()
            spans.append((start, start + (last + 1) * t.element_size(), k))
        spans.sort()
        end_any = end_written = -1
        holder_any = holder_written = None
        for start, end, k in spans:
            name, _, is_written = entries[k]
            other = holder_any if is_written and start < end_any else None
            if other is None and start < end_written:
                other = holder_written
            if other is not None:
                w, o = (name, other) if is_written else (other, name)
                raise ValueError(
                    f"{op}: {w} (written in place) and {o} share memory (overlap); pass separate tensors "
                    "(.clone() one of them)"
                )
            if end > end_any:
                end_any, holder_any = end, name
            if is_written and end > end_written:
                end_written, holder_written = end, name


def check_writable(op: str, **lists) -> None:
    """Refuse written tensors that autograd tracks while grad mode is on.

    The ops are not differentiable and every backend writes through raw memory, so an in-place write
    to a tensor that requires grad cannot be recorded: outside ``torch.no_grad()`` such a call is
    refused on every backend (the torch backend used to raise for leaves only and to record the
    write for non-leaves). Inside ``torch.no_grad()`` the write is allowed, as for torch's own
    in-place ops, and the version counters are bumped (:func:`bump_versions`)."""
    if not torch.is_grad_enabled():
        return
    for name, tensors in lists.items():
        if tensors is None:
            continue
        for i, t in enumerate([tensors] if isinstance(tensors, torch.Tensor) else tensors):
            if t is not None and t.requires_grad:
                kind = "a leaf Variable" if t.is_leaf else "a tensor"
                raise RuntimeError(
                    f"{op}: {name}[{i}] is {kind} that requires grad and would be modified in place outside "
                    "torch.no_grad(); the op is not differentiable: call it under torch.no_grad() or pass "
                    "a tensor that does not require grad (.detach())"
                )


def bump_versions(*lists) -> None:
    """Bump the autograd version counters of tensors written through raw pointers (C++ / Triton
    backends), as torch's in-place ops do, so that autograd refuses a backward that would read a
    saved tensor modified since it was saved. Bumping twice (torch backend) is harmless."""
    tensors = []
    for group in lists:
        if group is None:
            continue
        if isinstance(group, torch.Tensor):
            tensors.append(group)
        else:
            tensors.extend(t for t in group if t is not None)
    if tensors:
        torch.autograd.graph.increment_version(tensors)


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
