"""The multi-tensor consolidation ops on ``DTensor`` (FSDP2) state: kernels on the local shards, one
scalar all-reduce per sum over all elements (helpers in :mod:`ewc_fast.ops._sharding`, whose module
doc describes the layout). Nothing here is public API."""

from __future__ import annotations

import torch
from torch import Tensor

from .. import ops
from ..ops._sharding import (
    any_sharded,
    check_layout,
    clone_state,
    copy_like,
    is_sharded,
    like_param,
    local,
    locals_,
    reduce_flags,
    reduce_scalars,
    same_layout,
    state_like,
    value_groups,
)

__all__ = [
    "any_sharded",
    "check_layout",
    "clone_state",
    "copy_like",
    "is_sharded",
    "like_param",
    "local",
    "locals_",
    "reduce_flags",
    "same_layout",
    "state_like",
    "penalty_apply_",
    "consolidate_",
]


def penalty_apply_(grads, params, omega, mu, lam: float, *, alpha, c: float, grad_scale: float, backend: str) -> Tensor:
    """:func:`ewc_fast.ops.penalty_apply_` on the local shards: the gradients are written shard by
    shard (no communication); the value ``(lam/2)(sum W (theta - mu)^2 + c)`` sums the local sums of
    each :func:`value_groups` group over its shard dimensions (one scalar all-reduce for an FSDP
    model) and adds ``c`` once. Without a ``DTensor`` this is the op itself."""
    if not any_sharded(params):
        return ops.penalty_apply_(
            grads, params, omega, mu, lam, alpha=alpha, c=c, grad_scale=grad_scale, backend=backend
        )
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for key, idx in value_groups(params):
        v = ops.penalty_apply_(
            [local(grads[i]) for i in idx],
            [local(params[i]) for i in idx],
            [local(omega[i]) for i in idx],
            [local(mu[i]) for i in idx],
            lam,
            alpha=alpha,
            c=0.0,
            grad_scale=grad_scale,
            backend=backend,
        )
        total += reduce_scalars(v.reshape(1).clone(), key).reshape(())
    return total + 0.5 * lam * c


def consolidate_(omega, mu, fisher, anchor, gamma: float, *, online: bool, backend: str) -> Tensor:
    """:func:`ewc_fast.ops.consolidate_` on the local shards; its increment (a sum over all elements)
    is summed over the shard dimensions as in :func:`penalty_apply_`."""
    if not any_sharded(anchor):
        return ops.consolidate_(omega, mu, fisher, anchor, gamma, online=online, backend=backend)
    total = torch.zeros((), dtype=torch.float64, device=anchor[0].device)
    for key, idx in value_groups(anchor):
        v = ops.consolidate_(
            [local(omega[i]) for i in idx],
            [local(mu[i]) for i in idx],
            [local(fisher[i]) for i in idx],
            [local(anchor[i]) for i in idx],
            gamma,
            online=online,
            backend=backend,
        )
        total += reduce_scalars(torch.as_tensor(v, dtype=torch.float64).reshape(1).clone(), key).reshape(())
    return total
