"""Definition and dispatch of the op layer: :func:`define_op` registers an op with ``torch.library``,
:func:`impl_module` finds a backend's implementations of an op family, :func:`run_op` is the eager
fast path around a registered op.

An op is one eager body (plain Python over lists of tensors) turned by :func:`define_op` into

* the registered op ``ewc_fast::<name>`` (:func:`torch.library.custom_op`), which is what
  ``torch.compile``, FakeTensor and other dispatch modes see, with a fake implementation derived from
  the declared result kind (``None``, or a 0-dim float64 tensor on the op's device) that, like the
  body, rejects unknown or unavailable backends;
* a :class:`DefinedOp` callable that runs the body directly in plain eager mode (see :func:`run_op`).

The public function of each op validates its arguments and calls its :class:`DefinedOp` once.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Sequence
from types import ModuleType

import torch

from . import backends as _backend

#: ``torch.library`` namespace of every op: ``torch.ops.ewc_fast.<name>``
NAMESPACE = "ewc_fast"
#: declared result kinds of :func:`define_op`: nothing, or a 0-dim float64 tensor on the op's device
RESULT_KINDS = (None, "scalar")


def resolve_backend(backend: str, device: torch.device) -> str:
    """The concrete backend for ``backend`` (``"auto"`` or a name) on ``device``; see :mod:`.backends`."""
    return _backend.resolve(backend, device)


def impl_module(backend: str, family: str) -> ModuleType:
    """The module holding a backend's implementations of an op family: ``ewc_fast.ops.<family>._<backend>``
    (same function names and signatures in each backend)."""
    if backend not in _backend.BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    return importlib.import_module(f"ewc_fast.ops.{family}._{backend}")


def op_device(tensors: torch.Tensor | Sequence[torch.Tensor] | None) -> torch.device:
    """Device an op runs on: that of a tensor or of the first tensor of a list (CPU when empty)."""
    if isinstance(tensors, torch.Tensor):
        return tensors.device
    return tensors[0].device if tensors else torch.device("cpu")


def resolve_impl(backend: str, family: str, device: torch.device) -> ModuleType:
    """The implementations of ``family`` in the backend that ``backend`` resolves to on ``device``."""
    return impl_module(resolve_backend(backend, device), family)


def run_op(op: Callable, eager_fn: Callable, *args):
    """Call a registered op, or its Python body directly on the plain eager path.

    The ``torch.library`` op is what ``torch.compile``, FakeTensor and other dispatch modes see; in
    plain eager mode, going through the dispatcher only adds ~70 us per call (and imports
    ``torch._dynamo`` on first use), so the body runs directly. Both run the same code.
    """
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0:
        return op(*args)
    return eager_fn(*args)


class DefinedOp:
    """An op made by :func:`define_op`. Calling it (positional arguments in the body's order) runs
    :func:`run_op`: the eager body directly, or the registered op while tracing / under a dispatch mode.

    Attributes: ``name`` (``"penalty_apply_"``), ``qualname`` (``"ewc_fast::penalty_apply_"``),
    ``eager`` (the body) and ``op`` (the :class:`torch.library.CustomOpDef`, also reachable as
    ``torch.ops.ewc_fast.<name>``).
    """

    __slots__ = ("name", "qualname", "eager", "op")

    def __init__(self, name: str, eager: Callable, op) -> None:
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        self.eager = eager
        self.op = op

    def __call__(self, *args):
        return run_op(self.op, self.eager, *args)

    def __repr__(self) -> str:
        return f"<ewc_fast op {self.qualname}>"


def define_op(
    name: str, *, mutates: Sequence[str] = (), result: str | None = None, device_arg: str
) -> Callable[[Callable], DefinedOp]:
    """Decorator: register the eager body it decorates as the op ``ewc_fast::<name>``.

    ``mutates``: names of the arguments written in place (the ``mutates_args`` of
    :func:`torch.library.custom_op`). ``result``: ``None`` for an op returning nothing, ``"scalar"``
    for one returning a 0-dim float64 tensor on the op's device; the body's return annotation must
    agree (``None`` / ``Tensor``). ``device_arg``: the argument (a tensor, a list of tensors, or an
    optional tensor) whose device the op runs on (:func:`op_device`). The body must take a ``backend``
    argument (a string) and have type annotations on every argument, from which ``torch.library``
    infers the schema.

    The fake implementation is derived: resolve ``backend`` on the op's device (raising
    ``ValueError`` / ``BackendUnavailable`` as the body would), then return ``None`` or
    ``torch.empty((), dtype=float64, device=device)``. Returns a :class:`DefinedOp`.
    """
    if result not in RESULT_KINDS:
        raise ValueError(f"define_op({name!r}): result must be one of {RESULT_KINDS}, got {result!r}")
    mutates = tuple(mutates)

    def decorate(body: Callable) -> DefinedOp:
        sig = inspect.signature(body)
        for arg in (*mutates, device_arg, "backend"):
            if arg not in sig.parameters:
                raise TypeError(f"define_op({name!r}): {body.__qualname__} has no argument {arg!r}")
        returns = typing.get_type_hints(body).get("return", inspect.Signature.empty)
        expected = type(None) if result is None else torch.Tensor
        if returns is not expected:
            raise TypeError(
                f"define_op({name!r}): result={result!r} needs the return annotation {expected.__name__}, "
                f"got {returns!r}"
            )
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates)(body)

        def fake(*args, **kwargs):
            bound = sig.bind(*args, **kwargs).arguments
            device = op_device(bound[device_arg])
            resolve_backend(bound["backend"], device)  # meta tensors dispatch here too: refuse bad backends
            return None if result is None else torch.empty((), dtype=torch.float64, device=device)

        op.register_fake(fake)
        return DefinedOp(name, body, op)

    return decorate
