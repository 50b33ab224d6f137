"""The sample dimension of a tensor (:class:`BDim`), or why it is unknown (:class:`Unknown`), and the
arithmetic every propagation rule shares: a row-major view's map of the sample dimension
(:func:`view_map`) and broadcasting from the right (:func:`broadcast_out`). :func:`batch_first`
turns a tensor and its entry into a samples-first tensor for the rules (see :mod:`.provenance`)."""

from __future__ import annotations

import math
import weakref
from typing import NamedTuple

from torch import Tensor

__all__ = ["BDim", "Unknown", "IdMap", "batch_first", "broadcast_out", "lookup", "norm_dim", "view_map"]


class IdMap:
    """A map keyed by tensor identity that does not keep its keys alive, like
    :class:`torch.utils.weak.WeakIdKeyDictionary` but 30x cheaper per lookup (the tracker does a few
    per torch call): ``id(key) -> (weakref to key, value)``, an entry counting only while its weakref
    still points to the key asked about (a dead key's id may be reused by a new tensor)."""

    __slots__ = ("_d",)

    def __init__(self):
        self._d: dict = {}

    def get(self, key, default=None):
        e = self._d.get(id(key))
        return e[1] if e is not None and e[0]() is key else default

    def __contains__(self, key) -> bool:
        e = self._d.get(id(key))
        return e is not None and e[0]() is key

    def __getitem__(self, key):
        e = self._d.get(id(key))
        if e is None or e[0]() is not key:
            raise KeyError(key)
        return e[1]

    def __setitem__(self, key, value) -> None:
        self._d[id(key)] = (weakref.ref(key), value)

    def pop(self, key, default=None):
        e = self._d.get(id(key))
        if e is None or e[0]() is not key:
            return default
        del self._d[id(key)]
        return e[1]

    def __bool__(self) -> bool:  # may count dead keys: a fast "maybe non-empty" test
        return bool(self._d)


class BDim(NamedTuple):
    """The samples of a tensor: dimension ``dim`` of size ``outer * N * inner`` (module doc)."""

    dim: int
    outer: int = 1
    inner: int = 1


class Unknown(NamedTuple):
    """A tensor derived from the batch whose sample dimension could not be followed, and why."""

    reason: str


def batch_first(t: Tensor, bd, n: int, what: str = "tensor") -> Tensor:
    """``t`` with its samples as a leading dimension of size ``n`` (``bd`` from :class:`Tracker`).

    A plain batch dimension is moved to the front; a flattened one is unflattened first (the
    outer/inner factors stay as dimensions). A shared tensor is broadcast to every sample (an
    ``expand``, no copy). :class:`Unknown` raises ValueError with its reason."""
    if isinstance(bd, Unknown):
        raise ValueError(f"cannot tell which dimension of the {what} {tuple(t.shape)} holds the samples: {bd.reason}")
    if bd is None:
        return t.unsqueeze(0).expand((n,) + tuple(t.shape))
    d = bd.dim
    if bd.outer == 1 and bd.inner == 1:
        return t.movedim(d, 0) if d else t
    return t.unflatten(d, (bd.outer, n, bd.inner)).movedim(d + 1, 0)


def lookup(prov: IdMap, t) -> BDim | Unknown | None:
    return prov.get(t) if isinstance(t, Tensor) else None


# ------------------------------------------------------------------------------- arithmetic
def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _prod(xs) -> int:
    return math.prod(int(x) for x in xs)


def view_map(in_shape, bd: BDim, out_shape, n: int):
    """The batch dimension of a row-major view of ``in_shape`` as ``out_shape`` (stride arithmetic)."""
    below = bd.inner * _prod(in_shape[bd.dim + 1 :])  # elements per step of the sample index
    # for N > 1 at most one dimension qualifies; for N == 1 every split is right: take a plain one
    # (outer == inner == 1, e.g. the size-1 dimension of a (T, 1, E) view) so that functions that
    # need the samples on a dimension of their own (convolutions, norms, ...) accept it, else the
    # outermost (a (T * 1, E) view: positions outer, so that the features stay per position)
    cands = []
    for e in range(len(out_shape)):
        size, p = int(out_shape[e]), _prod(out_shape[e + 1 :])
        if p > 0 and below % p == 0:
            inner = below // p
            if size % (inner * n) == 0 and size >= inner * n:
                cands.append(BDim(e, size // (inner * n), inner))
    if cands:
        return next((b for b in cands if b.outer == b.inner == 1), cands[0])
    return Unknown(f"a view {tuple(in_shape)} -> {tuple(out_shape)} splits the sample dimension")


def broadcast_out(bds, shapes, out_ndim: int):
    """Pointwise functions: every tracked argument's batch dimension aligned from the right; all agree."""
    res = None
    for bd, shape in zip(bds, shapes):
        if bd is None:
            continue
        if isinstance(bd, Unknown):
            return bd
        cand = BDim(out_ndim - len(shape) + bd.dim, bd.outer, bd.inner)
        if res is not None and res != cand:
            return Unknown("two arguments hold their samples along different dimensions")
        res = cand
    return res
