"""Tensors sharded as ``DTensor`` (FSDP2's ``fully_shard``, HSDP meshes): local shards, tensors laid
out like a parameter, and the reduction of sums over all elements. Shared by the estimation and
consolidation layers (the consolidation wrappers of the ops are in ``ewc_fast.consolidation._shard``).

The consolidation state of a parameter ``p`` that is a :class:`~torch.distributed.tensor.DTensor`
(``Omega``, ``mu``, SI's ``omega`` / snapshots, WVA's ``A``) is a ``DTensor`` with ``p``'s mesh and
placements: each rank stores only the local shard, so the state costs its share of the parameters
per rank, and ``state_dict()`` hands ``torch.distributed.checkpoint`` tensors it can reshard. Every
update is elementwise, so the ops of :mod:`ewc_fast.ops` run on the local shards (:func:`local`)
without communication. Only sums over all elements -- the penalty value, the constant increment of
``consolidate_``, the validity flags of an importance -- combine ranks: a sum over a parameter is the
sum of the local sums over the mesh dimensions on which it is sharded (its ``Shard`` placements;
``Replicate`` dimensions hold the same values and are not summed). :func:`reduce_scalars` does it
with one all-reduce per mesh dimension involved (one for FSDP, one for HSDP).
Estimation turns per-rank full-size sums into the local shard of their total with a reduce-scatter
(``ewc_fast.estimation.sharded``).

Supported placements: ``Shard(d)`` and ``Replicate()`` on any mesh (FSDP2: ``Shard(0)``; HSDP:
``(Replicate(), Shard(0))``). ``Partial`` parameters (pending reductions) and other placements are
refused with a ``TypeError`` naming the parameter. Plain tensors (parameters left out of FSDP,
DDP) are unchanged: their state is a plain tensor on every rank.

Nothing here is public API.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import torch
from torch import Tensor

_DT = "torch.distributed.tensor"


def _dtensor_module():
    """``torch.distributed.tensor`` if it has been imported (any DTensor implies it: FSDP2 imports it),
    else None. Not imported here: importing it costs seconds, and plain-tensor users never need it."""
    return sys.modules.get(_DT)


def _api():
    """``(DTensor, Replicate, Shard)``; called only once a DTensor was seen."""
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor, Replicate, Shard


__all__ = [
    "is_sharded",
    "any_sharded",
    "local",
    "locals_",
    "check_layout",
    "state_like",
    "clone_state",
    "like_param",
    "copy_like",
    "same_layout",
    "reduce_scalars",
    "reduce_flags",
    "value_groups",
]


def is_sharded(t) -> bool:
    """Whether ``t`` is a ``DTensor``."""
    mod = _dtensor_module()
    return mod is not None and isinstance(t, mod.DTensor)


def any_sharded(tensors) -> bool:
    """Whether one of ``tensors`` is a ``DTensor``."""
    mod = _dtensor_module()
    return mod is not None and any(isinstance(t, mod.DTensor) for t in tensors)


def local(t: Tensor) -> Tensor:
    """The local shard of a ``DTensor`` (a view: in-place updates write the ``DTensor``), else ``t``."""
    return t.to_local() if is_sharded(t) else t


def locals_(tensors: Sequence[Tensor]) -> list[Tensor]:
    """:func:`local` of each tensor."""
    return [local(t) for t in tensors]


def check_layout(owner: str, name: str, p: Tensor) -> None:
    """``TypeError`` unless ``p`` is a plain tensor or a ``DTensor`` whose placements are all
    ``Shard(d)`` / ``Replicate()``."""
    if not is_sharded(p):
        return
    _, Replicate, Shard = _api()
    for pl in p.placements:
        if type(pl) not in (Shard, Replicate):
            raise TypeError(
                f"{owner}: parameter {name!r} is a DTensor with placement {pl} (placements {tuple(p.placements)}); "
                "consolidation state supports Shard(dim) and Replicate() placements (FSDP2 fully_shard, HSDP). "
                "Redistribute the parameter (or keep it out of the sharded layout) first"
            )


def state_like(p: Tensor, dtype: torch.dtype) -> Tensor:
    """Zeros of ``dtype`` laid out like ``p``: a ``DTensor`` with ``p``'s mesh and placements holding
    only the local shard, or a plain tensor of ``p``'s shape."""
    if not is_sharded(p):
        return torch.zeros(p.shape, dtype=dtype, device=p.device)
    loc = torch.zeros(p.to_local().shape, dtype=dtype, device=p.device)
    return _api()[0].from_local(loc, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def clone_state(p: Tensor) -> Tensor:
    """A contiguous detached copy of ``p`` laid out like it (the local shard of a ``DTensor``)."""
    if not is_sharded(p):
        return p.detach().clone(memory_format=torch.contiguous_format)
    loc = p.to_local().detach().clone(memory_format=torch.contiguous_format)
    return _api()[0].from_local(loc, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride())


def like_param(owner: str, label: str, t: Tensor, p: Tensor) -> Tensor:
    """``t`` (shaped like ``p``) laid out like ``p``: a full tensor for a ``DTensor`` parameter is
    cut to this rank's shard locally (no communication; every rank must hold the same full tensor);
    a ``DTensor`` with other placements is redistributed; for a plain parameter a ``DTensor`` is
    gathered (``full_tensor()``). Values and dtype are kept."""
    if is_sharded(p):
        DTensor, Replicate, _ = _api()
        if is_sharded(t):
            if t.device_mesh != p.device_mesh:
                raise ValueError(f"{owner}: {label} is a DTensor on another device mesh than its parameter")
            if tuple(t.placements) == tuple(p.placements):
                return t
            return t.redistribute(p.device_mesh, p.placements)
        t = t.to(p.device).contiguous()
        rep = DTensor.from_local(
            t, p.device_mesh, [Replicate()] * p.device_mesh.ndim, run_check=False, shape=t.shape, stride=t.stride()
        )
        return rep.redistribute(p.device_mesh, p.placements)  # Replicate -> Shard: a local slice
    if is_sharded(t):
        return t.full_tensor()
    return t


def copy_like(owner: str, label: str, t: Tensor, p: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """A fresh copy of ``t`` (validated by the caller) laid out like ``p`` (:func:`like_param`), on
    ``p``'s device, in ``dtype`` if given."""
    t = like_param(owner, label, t.detach(), p)
    dtype = t.dtype if dtype is None else dtype
    if not is_sharded(t):
        return t.to(device=p.device, dtype=dtype, copy=True)
    loc = t.to_local().to(device=p.device, dtype=dtype, copy=True)
    return _api()[0].from_local(loc, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())


def same_layout(a: Tensor, b: Tensor) -> bool:
    """Whether ``a`` and ``b`` are both plain or both ``DTensor`` with the same mesh and placements."""
    if is_sharded(a) != is_sharded(b):
        return False
    return not is_sharded(a) or (a.device_mesh == b.device_mesh and tuple(a.placements) == tuple(b.placements))


def _shard_dims(p: Tensor) -> tuple[int, ...]:
    shard = _api()[2]
    return tuple(i for i, pl in enumerate(p.placements) if isinstance(pl, shard))


def value_groups(params: Sequence[Tensor]) -> list[tuple[object, list[int]]]:
    """Parameters grouped by how their sums combine: ``[(key, indices)]``; ``key`` is ``None`` for
    plain tensors (no reduction) or ``(mesh, shard dims)`` for ``DTensor`` parameters."""
    groups: dict = {}
    for i, p in enumerate(params):
        key = None
        if is_sharded(p):
            dims = _shard_dims(p)
            key = (p.device_mesh, dims) if dims else None
        groups.setdefault(key, []).append(i)
    return list(groups.items())


def reduce_scalars(values: Tensor, key) -> Tensor:
    """Sum ``values`` (a float64 tensor of local sums) over the shard dimensions of ``key``
    (:func:`value_groups`), in place: one all-reduce per dimension; ``key=None``: unchanged."""
    if key is None:
        return values
    mesh, dims = key
    for d in dims:
        torch.distributed.all_reduce(values, op=torch.distributed.ReduceOp.SUM, group=mesh.get_group(d))
    return values


def reduce_flags(flags: list[bool], tensors: Sequence[Tensor]) -> list[bool]:
    """``flags`` OR-ed over every rank of the default group when a ``DTensor`` is among ``tensors``
    (each rank checked its own shards; all must agree before any state changes)."""
    if not any_sharded(tensors) or not torch.distributed.is_initialized():
        return flags
    dev = next(t.device for t in tensors if is_sharded(t))
    buf = torch.tensor([float(f) for f in flags] or [0.0], dtype=torch.float32, device=dev)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in buf.tolist()[: len(flags)]]
