"""Validation and layout helpers shared by the op layer (not by kernels)."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from . import backends as _backend

PARAM_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
STATE_DTYPES = (torch.float32, torch.float64)


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


def common_device(op: str, tensors) -> torch.device:
    devs = {t.device for t in tensors}
    if len(devs) > 1:
        raise ValueError(f"{op}: tensors on several devices {sorted(map(str, devs))}; one call serves one device")
    return next(iter(devs)) if devs else torch.device("cpu")


def resolve_backend(backend: str, device: torch.device) -> str:
    return _backend.resolve(backend, device)


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


def impl_module(backend: str, family: str = "consolidation"):
    """The module holding a backend's implementations of an op family: ``ewc_fast/ops/<family>/_<backend>.py``
    (same function names and signatures in each backend)."""
    import importlib

    if backend not in _backend.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    return importlib.import_module(f"ewc_fast.ops.{family}._{backend}")


def run_op(op, eager_fn, *args):
    """Call a registered op, or its Python body directly on the plain eager path.

    The ``torch.library`` op is what ``torch.compile``, FakeTensor and other dispatch modes see; in
    plain eager mode, going through the dispatcher only adds ~70 us per call (and imports
    ``torch._dynamo`` on first use), so the body runs directly. Both run the same code.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return op(*args)
    return eager_fn(*args)
