"""Backend selection for every ewc_fast op.

Three implementations exist for each op:

* ``"triton"`` -- fused Triton kernels (``ewc_fast.kernels``) for CUDA tensors; CPU tensors are
  accepted only when ``TRITON_INTERPRET=1`` was set before Triton was imported (slow; for tests).
* ``"cpp"`` -- the OpenMP C++ extension ``ewc_fast._C`` for CPU tensors.
* ``"torch"`` -- the pure-PyTorch implementation, any device (the readable one).

``backend="auto"`` resolves as: the ``EWC_FAST_BACKEND`` environment variable if set, else Triton
for CUDA tensors when Triton is importable, else C++ for CPU tensors when the extension is built,
else torch. Asking for a backend that cannot run on the given device raises ``BackendUnavailable``
with the reason.
"""

from __future__ import annotations

import functools
import importlib
import os

import torch

BACKENDS = ("triton", "cpp", "torch")
ENV_VAR = "EWC_FAST_BACKEND"


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here (not installed, not built, or wrong device)."""


@functools.cache
def _triton_import_error() -> str | None:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # pragma: no cover - depends on the environment
        return f"Triton is not importable ({type(exc).__name__}: {exc}); install the [triton] extra"
    return None


@functools.cache
def _cpp_import_error() -> str | None:
    try:
        importlib.import_module("ewc_fast._C")
    except Exception as exc:  # pragma: no cover - depends on the build
        return (
            f"the C++ extension ewc_fast._C is not built ({type(exc).__name__}: {exc}); reinstall with `pip install .`"
        )
    return None


def triton_interpreter() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def why_unavailable(backend: str, device: torch.device) -> str | None:
    """Return ``None`` if ``backend`` can run on ``device``, else a human-readable reason."""
    device = torch.device(device)
    if backend == "torch":
        return None
    if backend == "cpp":
        if device.type != "cpu":
            return f"the C++ backend runs on CPU tensors only, got device {device}"
        return _cpp_import_error()
    if backend == "triton":
        err = _triton_import_error()
        if err:
            return err
        if device.type == "cuda":
            return None
        if device.type == "cpu" and triton_interpreter():
            return None
        return (
            f"the Triton backend needs CUDA tensors (got device {device}); CPU tensors work only "
            "with TRITON_INTERPRET=1 set before Triton is imported"
        )
    return f"unknown backend {backend!r}; valid: 'auto', " + ", ".join(repr(b) for b in BACKENDS)


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process, fastest first."""
    return [b for b in BACKENDS if why_unavailable(b, torch.device(device)) is None]


def resolve(backend: str | None, device: torch.device | str) -> str:
    """Resolve ``backend`` (``"auto"``, ``None`` or a name) to a concrete backend for ``device``.

    Raises ``ValueError`` for an unknown name and ``BackendUnavailable`` for one that cannot run.
    """
    device = torch.device(device)
    if backend is None or backend == "auto":
        env = os.environ.get(ENV_VAR, "").strip().lower()
        if env and env != "auto":
            if env not in BACKENDS:
                raise ValueError(f"{ENV_VAR}={env!r} is not a backend; valid: " + ", ".join(BACKENDS))
            backend = env
        else:
            if device.type == "cuda" and why_unavailable("triton", device) is None:
                return "triton"
            if device.type == "cpu" and why_unavailable("cpp", device) is None:
                return "cpp"
            return "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid: 'auto', " + ", ".join(repr(b) for b in BACKENDS))
    reason = why_unavailable(backend, device)
    if reason is not None:
        raise BackendUnavailable(f"backend {backend!r} is unavailable: {reason}")
    return backend
