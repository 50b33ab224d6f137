"""Dispatch of the op layer: backend resolution, the backend module of an op family, and the eager
fast path around the registered ``torch.library`` ops."""

from __future__ import annotations

import torch

from . import backends as _backend


def resolve_backend(backend: str, device: torch.device) -> str:
    return _backend.resolve(backend, device)


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
