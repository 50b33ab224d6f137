"""Sample dimensions through indexing: ``x[idx]`` (:func:`getitem`: basic items map dimensions,
an advanced index on the sample dimension keeps it only when its values are the identity
``arange(N)``) and ``x[idx] = v`` (:func:`setitem`). See :mod:`.provenance`."""

from __future__ import annotations

import torch
from torch import Tensor

from .dims import BDim, IdMap, Unknown

__all__ = ["getitem", "index_items", "setitem"]


class _Scratch:
    """An empty provenance map (for parsing an index against a layout only)."""

    def __init__(self, n: int):
        self.n = n
        self.prov = IdMap()


def index_items(idx, ndim):
    """Normalise an index to a list of (kind, item) over input dims: 'basic' items consume one
    input dim (int / slice), None inserts, tensors are advanced (a bool mask consumes its ndim)."""
    items = list(idx) if isinstance(idx, tuple) else [idx]
    consumed = 0
    for it in items:
        if it is None or it is Ellipsis:
            continue
        if isinstance(it, Tensor) and it.dtype == torch.bool:
            consumed += it.dim()
        else:
            consumed += 1
    out = []
    for it in items:
        if it is Ellipsis:
            out.extend([slice(None)] * (ndim - consumed))
        else:
            out.append(it)
    while (
        sum(1 for it in out if it is not None and not (isinstance(it, Tensor) and it.dtype == torch.bool))
        + sum(it.dim() for it in out if isinstance(it, Tensor) and it.dtype == torch.bool)
        < ndim
    ):
        out.append(slice(None))
    return out


def getitem(tr, x, bx, idx, out):
    if isinstance(idx, list):
        idx = torch.tensor(idx) if all(isinstance(i, int) for i in idx) else tuple(idx)
    items = index_items(idx, x.dim())
    adv = [(k, it) for k, it in enumerate(items) if isinstance(it, (Tensor, list)) and not isinstance(it, bool)]
    if any(isinstance(it, Tensor) and it.dtype == torch.bool for _, it in adv):
        return _bool_mask(tr, x, bx, items, out)
    in_dim = 0
    out_pos = 0
    basic_map = {}  # input dim -> output dim (basic items), advanced input dims -> None
    adv_in_dims = []
    first_adv_out = None
    for it in items:
        if it is None:
            out_pos += 1
            continue
        if isinstance(it, (Tensor, list)):
            adv_in_dims.append(in_dim)
            if first_adv_out is None:
                first_adv_out = out_pos
            in_dim += 1
            continue
        if isinstance(it, int):
            basic_map[in_dim] = None
            in_dim += 1
            continue
        basic_map[in_dim] = out_pos
        in_dim += 1
        out_pos += 1
    if not adv:
        if bx is None:
            return None
        o = basic_map.get(bx.dim)
        if o is None:
            return Unknown("an integer index on the sample dimension")
        if out.shape[o] != x.shape[bx.dim]:
            return Unknown("a slice of the sample dimension")
        return bx._replace(dim=o)
    # advanced indexing: broadcast index shape B placed at first_adv_out if adjacent, else at 0
    idx_ts = [torch.as_tensor(it) for _, it in adv]
    B = tuple(torch.broadcast_shapes(*[tuple(t.shape) for t in idx_ts]))
    adjacent = adv_in_dims == list(range(adv_in_dims[0], adv_in_dims[0] + len(adv_in_dims)))
    start = first_adv_out if adjacent else 0
    shift = 0 if adjacent else len(B)

    def basic_out(d):
        o = basic_map.get(d)
        if o is None:
            return None
        return o + (len(B) if (adjacent and o >= start) else 0) if adjacent else o + shift

    res = None
    if bx is not None and bx.dim not in adv_in_dims:
        o = basic_out(bx.dim)
        if o is None or out.shape[o] != x.shape[bx.dim]:
            return Unknown("an index on the sample dimension")
        res = bx._replace(dim=o)
    for (_, it), t, d in zip(adv, idx_ts, adv_in_dims):
        bt = tr.prov.get(it) if isinstance(it, Tensor) else None
        if isinstance(bt, Unknown):
            return bt
        if bt is not None:
            if bt.outer != 1 or bt.inner != 1:
                return Unknown("advanced index with flattened samples")
            cand = BDim(start + len(B) - t.dim() + bt.dim)
            if res is not None and res != cand:
                return Unknown("advanced indexing mixes the samples")
            res = cand
        if bx is not None and d == bx.dim:
            if bx.outer != 1 or bx.inner != 1:
                return Unknown("advanced index on flattened samples")
            j = _identity_dim(tr, t, len(B))
            if j is None:
                return Unknown("an advanced index on the sample dimension that is not the identity arange(N)")
            cand = BDim(start + j)
            if res is not None and res != cand:
                return Unknown("advanced indexing mixes the samples")
            res = cand
    return res


def _identity_dim(tr, t: Tensor, nb: int):
    """j if ``t`` (broadcast to ``nb`` dims) is ``arange(N)`` along dim j and constant elsewhere."""
    if t.dtype == torch.bool or t.is_floating_point():
        return None
    shape = (1,) * (nb - t.dim()) + tuple(t.shape)
    big = [j for j, s in enumerate(shape) if s != 1]
    if tr.n == 1 and not big and t.numel() == 1 and t.dim() > 0:
        # one sample: the index [0] is the identity whichever of its size-1 dims stands for the batch
        # (e.g. transformers' batch_arange[:, None, None, None]); take its own first dim, whose choice
        # cannot change any sample's values (there is one)
        return (nb - t.dim()) if int(t.reshape(-1)[0]) == 0 else None
    if len(big) != 1 or shape[big[0]] != tr.n:
        return None
    vals = t.reshape(-1)
    if not torch.equal(vals.cpu(), torch.arange(tr.n)):
        return None
    return big[0]


def _bool_mask(tr, x, bx, items, out):
    """``x[mask]`` (``x[mask, :]``, ...) with a boolean mask over x's leading dims, the first of which
    holds the samples: the selected positions come out sample by sample (row-major), so when every
    sample selects the same number c of them the output holds the samples along dim 0 in blocks of c
    (``BDim(0, 1, c)``), e.g. Hugging Face's ``hidden[eos_mask, :]`` pooling. Checked on the values."""
    mask = items[0]
    rest = items[1:]
    if not (
        isinstance(mask, Tensor)
        and mask.dtype == torch.bool
        and all(isinstance(it, slice) and it == slice(None) for it in rest)
    ):
        return Unknown("boolean-mask indexing of a per-sample tensor (other than x[mask, ...] over its leading dims)")
    bm = tr.prov.get(mask)
    if isinstance(bm, Unknown):
        return bm
    if bx is None:
        return None if bm is None else Unknown("a per-sample boolean mask on a shared tensor")
    if bx != BDim(0) or (bm is not None and bm != BDim(0)) or mask.dim() < 1 or mask.shape[0] != tr.n:
        return Unknown("boolean-mask indexing of a per-sample tensor whose samples are not along dim 0 of both")
    counts = mask.reshape(tr.n, -1).sum(1)
    c = int(counts[0]) if counts.numel() else 0
    if c == 0 or not bool((counts == c).all()):
        return Unknown("a boolean mask selecting a different number of positions in each sample")
    return BDim(0, 1, c)


def setitem(tr, x, bx, idx, v):
    bv = tr.prov.get(v) if isinstance(v, Tensor) else None
    if isinstance(bv, Unknown):
        return bv
    if bv is None:
        return bx  # shared values written into some elements: the samples stay where they were
    view = x[idx] if not isinstance(idx, list) else x[tuple(idx)]
    if bx is not None:  # parse the index against x's layout (raises on what it cannot follow)
        getitem(_Scratch(tr.n), x, bx, idx, view)
    # where v's samples land inside the view (aligned from the right)
    vd = view.dim() - v.dim() + bv.dim
    if vd < 0 or view.shape[vd] != v.shape[bv.dim]:
        return Unknown("__setitem__ broadcasts per-sample values")
    # map the view dim back to x's dim: basic slices only
    items = index_items(idx if not isinstance(idx, list) else tuple(idx), x.dim())
    if any(isinstance(it, (Tensor, list)) for it in items):
        return Unknown("__setitem__ of per-sample values through an advanced index")
    in_dim = out_pos = 0
    for it in items:
        if it is None:
            out_pos += 1
            continue
        if isinstance(it, int):
            in_dim += 1
            continue
        if out_pos == vd:
            if x.shape[in_dim] != view.shape[vd]:
                return Unknown("__setitem__ of per-sample values into a slice of the sample dimension")
            cand = bv._replace(dim=in_dim)
            if bx is not None and bx != cand:
                return Unknown("__setitem__ mixes the samples")
            return cand
        in_dim += 1
        out_pos += 1
    return Unknown("__setitem__ of per-sample values")
