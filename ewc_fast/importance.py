"""``Importance``: per-parameter weight importances (Fisher, MAS, SI, ...) as one immutable object."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .ops._validate import check_finite_scalar

__all__ = ["Importance"]

_FORMAT = "ewc_fast.Importance"
_VERSION = 1


def _same(a, b) -> bool:
    """Best-effort equality of two ``meta`` values (never raises)."""
    if a is b:
        return True
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return (
            isinstance(a, Tensor)
            and isinstance(b, Tensor)
            and a.dtype == b.dtype
            and a.shape == b.shape
            and a.device == b.device
            and bool(torch.equal(a, b))
        )
    try:
        return bool(a == b)
    except Exception:
        return False


def _common_meta(a: dict, b: dict) -> dict:
    return {k: v for k, v in a.items() if k in b and _same(v, b[k])}


def _check_factor(factor) -> float:
    """``float(factor)`` for a finite real number (a tensor is refused: ``scale`` multiplies by a number)."""
    if isinstance(factor, Tensor):
        raise TypeError(f"Importance.scale: factor must be a real number, got {type(factor).__name__}")
    return check_finite_scalar("Importance.scale", "factor", factor)


class Importance(Mapping):
    """Read-only mapping parameter name -> importance tensor shaped like the parameter.

    Parameter names are those of ``model.named_parameters()``. Besides the tensors an importance
    carries ``method`` (how it was estimated, e.g. ``"fisher"``, ``"mas"``, ``"si"``), ``n_samples``
    (how many samples -- or, for path-integral methods, optimizer steps -- it summarises) and
    ``meta`` (a dict of free-form details; keep it to plain Python values and tensors if the
    importance is to be saved with ``torch.save`` and loaded with ``weights_only=True``).

    The mapping is read-only (no item assignment); the tensors themselves are not copied on
    construction (they are detached) and in-place edits to them are visible through the mapping.
    Every operation below returns a new ``Importance`` and leaves its operands unchanged.

    Arithmetic:

    * ``a + b`` -- both must have the same names and shapes; tensors are added elementwise (usual
      dtype promotion), ``n_samples`` are added, ``method`` is ``a.method`` if both agree, else
      ``"<a.method>+<b.method>"``; ``meta`` keeps the entries on which both agree. ``0 + a`` is
      ``a`` (so the builtin ``sum`` works), :meth:`sum` is the faster n-ary form.
    * ``a.scale(f)`` / ``a * f`` / ``f * a`` / ``a / f`` -- tensors times a finite real ``f``;
      ``method``, ``n_samples`` and ``meta`` unchanged.

    Validation on construction: ``tensors`` maps ``str`` to dense floating-point tensors, ``method``
    is a non-empty string, ``n_samples`` a non-negative int, ``meta`` a dict or None. Values are not
    checked for sign or finiteness here (an unclipped SI importance may be negative); the consumers
    (:class:`ewc_fast.EWC`, :class:`ewc_fast.WVA`) check what they need.
    """

    __slots__ = ("_tensors", "_method", "_n_samples", "_meta")

    # Identity semantics: Mapping's value equality would compare tensors elementwise.
    __eq__ = object.__eq__
    __hash__ = object.__hash__

    def __init__(self, tensors: Mapping[str, Tensor], *, method: str, n_samples: int, meta: dict | None = None) -> None:
        if not isinstance(tensors, Mapping):
            raise TypeError(f"Importance: tensors must be a mapping name -> tensor, got {type(tensors).__name__}")
        checked = {}
        for name, t in tensors.items():
            if not isinstance(name, str):
                raise TypeError(f"Importance: names must be str, got {name!r} ({type(name).__name__})")
            if not isinstance(t, Tensor):
                raise TypeError(f"Importance: entry {name!r} is a {type(t).__name__}, not a torch.Tensor")
            if not t.is_floating_point():
                raise TypeError(f"Importance: entry {name!r} has non-floating dtype {t.dtype}")
            if t.layout != torch.strided:
                raise TypeError(f"Importance: entry {name!r} must be a dense tensor, got layout {t.layout}")
            checked[name] = t.detach()
        if not isinstance(method, str) or not method:
            raise TypeError(f"Importance: method must be a non-empty str, got {method!r}")
        if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral):
            raise TypeError(f"Importance: n_samples must be an int, got {type(n_samples).__name__}")
        if n_samples < 0:
            raise ValueError(f"Importance: n_samples must be >= 0, got {n_samples}")
        if meta is None:
            meta = {}
        if not isinstance(meta, dict):
            raise TypeError(f"Importance: meta must be a dict or None, got {type(meta).__name__}")
        self._tensors = checked
        self._method = method
        self._n_samples = int(n_samples)
        self._meta = dict(meta)

    # ------------------------------------------------------------------ mapping protocol / attributes
    def __getitem__(self, name: str) -> Tensor:
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def method(self) -> str:
        """How the importance was estimated (``"fisher"``, ``"mas"``, ``"si"``, ``"fisher+mas"``, ...)."""
        return self._method

    @property
    def n_samples(self) -> int:
        """Number of samples (or optimizer steps, for SI) the importance summarises."""
        return self._n_samples

    @property
    def meta(self) -> dict:
        """Free-form details of the estimate (a copy: editing it does not change the importance)."""
        return dict(self._meta)

    def numel(self) -> int:
        """Total number of importance values."""
        return sum(t.numel() for t in self._tensors.values())

    def __repr__(self) -> str:
        dtypes = sorted({str(t.dtype).replace("torch.", "") for t in self._tensors.values()})
        devices = sorted({str(t.device) for t in self._tensors.values()})
        names = list(self._tensors)
        shown = ", ".join(f"{n}: {tuple(self._tensors[n].shape)}" for n in names[:4])
        if len(names) > 4:
            shown += f", ... (+{len(names) - 4})"
        return (
            f"Importance(method={self._method!r}, n_samples={self._n_samples}, "
            f"{len(names)} tensors / {self.numel():,} values, dtype={'/'.join(dtypes) or '-'}, "
            f"device={'/'.join(devices) or '-'}, {{{shown}}})"
        )

    # -------------------------------------------------------------------------------- arithmetic
    def _check_compatible(self, other: Importance) -> None:
        if not isinstance(other, Importance):
            raise TypeError(f"cannot add Importance and {type(other).__name__}")
        if set(self._tensors) != set(other._tensors):
            only_a = sorted(set(self._tensors) - set(other._tensors))
            only_b = sorted(set(other._tensors) - set(self._tensors))
            raise ValueError(
                f"Importance +: different parameter names (only left: {only_a[:5]}, only right: {only_b[:5]})"
            )
        for name, t in self._tensors.items():
            u = other._tensors[name]
            if t.shape != u.shape:
                raise ValueError(f"Importance +: {name!r} has shape {tuple(t.shape)} vs {tuple(u.shape)}")
            if t.device != u.device:
                raise ValueError(f"Importance +: {name!r} is on {t.device} vs {u.device}")

    def __add__(self, other):
        if isinstance(other, numbers.Number) and not isinstance(other, bool) and other == 0:
            return self._replace(dict(self._tensors))
        if not isinstance(other, Importance):
            return NotImplemented
        return Importance.sum([self, other])

    def __radd__(self, other):
        if isinstance(other, numbers.Number) and not isinstance(other, bool) and other == 0:
            return self._replace(dict(self._tensors))
        return NotImplemented

    @staticmethod
    def sum(importances: Iterable[Importance]) -> Importance:
        """Sum of one or more importances, same rules as repeated ``+`` (one output buffer per name).

        The method string and meta are folded left to right exactly as ``((a + b) + c) + ...``.
        Raises ``ValueError`` for an empty iterable.
        """
        items = list(importances)
        if not items:
            raise ValueError("Importance.sum: needs at least one Importance")
        first = items[0]
        if not isinstance(first, Importance):
            raise TypeError(f"Importance.sum: got a {type(first).__name__}")
        for other in items[1:]:
            first._check_compatible(other)
        method, meta, n = first._method, dict(first._meta), first._n_samples
        tensors = {}
        for name, t in first._tensors.items():
            dtype = t.dtype
            for other in items[1:]:
                dtype = torch.promote_types(dtype, other._tensors[name].dtype)
            acc = t.to(dtype=dtype, copy=True)
            for other in items[1:]:
                acc.add_(other._tensors[name])
            tensors[name] = acc
        for other in items[1:]:
            if other._method != method:
                method = f"{method}+{other._method}"
            meta = _common_meta(meta, other._meta)
            n += other._n_samples
        return Importance(tensors, method=method, n_samples=n, meta=meta)

    def scale(self, factor: float) -> Importance:
        """Every tensor times the finite real ``factor`` (``method``, ``n_samples``, ``meta`` kept)."""
        factor = _check_factor(factor)
        return self._replace({k: t * factor for k, t in self._tensors.items()})

    def __mul__(self, factor):
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            return NotImplemented
        return self.scale(factor)

    __rmul__ = __mul__

    def __truediv__(self, factor):
        if isinstance(factor, bool) or not isinstance(factor, numbers.Real):
            return NotImplemented
        factor = _check_factor(factor)
        if factor == 0:
            raise ZeroDivisionError("Importance / 0")
        return self._replace({k: t / factor for k, t in self._tensors.items()})

    # ------------------------------------------------------------------------------- conversion
    def _replace(self, tensors: dict) -> Importance:
        return Importance(tensors, method=self._method, n_samples=self._n_samples, meta=self._meta)

    def to(self, device=None, dtype: torch.dtype | None = None) -> Importance:
        """Tensors moved to ``device`` and/or cast to floating ``dtype`` (tensors already there are shared)."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"Importance.to: dtype must be a floating torch.dtype, got {dtype}")
        return self._replace({k: t.to(device=device, dtype=dtype) for k, t in self._tensors.items()})

    def state_dict(self) -> dict:
        """A plain dict (tensors, str, int, dict) for ``torch.save``; round-trips exactly through
        :meth:`from_state_dict`, including ``torch.load(..., weights_only=True)`` when ``meta`` holds
        only plain values and tensors. Tensors are shared, not copied."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "method": self._method,
            "n_samples": self._n_samples,
            "meta": dict(self._meta),
            "tensors": dict(self._tensors),
        }

    @classmethod
    def from_state_dict(cls, state: Mapping) -> Importance:
        """Rebuild an ``Importance`` from :meth:`state_dict` output (validated like the constructor)."""
        if not isinstance(state, Mapping):
            raise TypeError(f"Importance.from_state_dict: expected a dict, got {type(state).__name__}")
        if state.get("format") != _FORMAT:
            raise ValueError(
                f"Importance.from_state_dict: not an Importance state dict (format={state.get('format')!r})"
            )
        if state.get("version") != _VERSION:
            raise ValueError(f"Importance.from_state_dict: unsupported version {state.get('version')!r}")
        missing = [k for k in ("tensors", "method", "n_samples", "meta") if k not in state]
        if missing:
            raise ValueError(f"Importance.from_state_dict: missing keys {missing}")
        return cls(state["tensors"], method=state["method"], n_samples=state["n_samples"], meta=state["meta"])

    @classmethod
    def zeros_like(
        cls, model: nn.Module, *, dtype: torch.dtype | None = None, method: str = "zeros", trainable_only: bool = True
    ) -> Importance:
        """All-zero importance for ``model``'s parameters (only those with ``requires_grad`` unless
        ``trainable_only=False``), each on its parameter's device, in ``dtype`` or the parameter's
        dtype; ``n_samples = 0``."""
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"Importance.zeros_like: dtype must be a floating torch.dtype, got {dtype}")
        tensors = {
            n: torch.zeros_like(p, dtype=dtype, memory_format=torch.contiguous_format).detach()
            for n, p in model.named_parameters()
            if p.requires_grad or not trainable_only
        }
        return cls(tensors, method=method, n_samples=0)
