"""Combining importance statistics across ``torch.distributed`` ranks.

Every data-driven method is a sum over samples divided by a count, so ranks holding disjoint shards
all-reduce (SUM) their unnormalised sums and their sample counts in float64 and then divide: the
result is the single-process estimate on the union of the shards (up to fp32 summation order
inside each rank). ``fisher_batched`` sums its per-batch squares and batch counts the same way (it
stays batch-size dependent: it equals a single process only with the same batches). ``random`` is
broadcast from the group's first rank so every rank holds the same tensors.
"""

from __future__ import annotations

import torch
from torch import Tensor


def resolve_group(process_group):
    """The process group to reduce over, or None for a single process.

    ``process_group`` given -> it; else the default group if ``torch.distributed`` is initialised."""
    if process_group is not None:
        return process_group
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.group.WORLD
    return None


def all_reduce_sums(tensors: list[Tensor], counts: list[float], group) -> tuple[list[Tensor], list[float]]:
    """SUM-all-reduce ``tensors`` and ``counts`` over ``group`` in float64 (one collective call).

    Returns float64 tensors (same shapes/devices as given) and the reduced counts. With
    ``group=None`` nothing is communicated and ``tensors`` are returned as they are."""
    if group is None:
        return list(tensors), list(counts)
    device = tensors[0].device if tensors else torch.device("cpu")
    flat = torch.cat(
        [t.detach().reshape(-1).to(device=device, dtype=torch.float64) for t in tensors]
        + [torch.tensor(counts, dtype=torch.float64, device=device)]
    )
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM, group=group)
    out, off = [], 0
    for t in tensors:
        out.append(flat[off : off + t.numel()].view(t.shape).to(t.device))
        off += t.numel()
    return out, flat[off:].tolist()


def broadcast_first(tensors: list[Tensor], group) -> None:
    """Overwrite ``tensors`` in place with the values of the group's first rank."""
    if group is None or not tensors:
        return
    src = torch.distributed.get_global_rank(group, 0) if group is not torch.distributed.group.WORLD else 0
    for t in tensors:
        torch.distributed.broadcast(t, src=src, group=group)
