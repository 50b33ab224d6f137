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


def _world(group) -> tuple[int, int]:
    return torch.distributed.get_rank(group), torch.distributed.get_world_size(group)


def check_config(config: dict, error: BaseException | None, group) -> None:
    """Collective argument check before any other collective: every rank sends its call's configuration
    and its own argument error (if any); every rank then raises the same clear error when a rank's
    arguments were invalid or the ranks disagree (instead of one rank raising while the others wait
    in a collective, or collectives of different sizes aborting the process group)."""
    if group is None:
        if error is not None:
            raise error
        return
    rank, world = _world(group)
    got: list = [None] * world
    mine = (config, None if error is None else f"{type(error).__name__}: {error}")
    torch.distributed.all_gather_object(got, mine, group=group)
    bad = [r for r, (_, e) in enumerate(got) if e is not None]
    if bad:
        if error is not None:
            raise error
        raise ValueError(f"estimate_importance: invalid arguments on rank(s) {bad}: {got[bad[0]][1]}")
    first = got[0][0]
    for r, (cfg, _) in enumerate(got):
        if cfg != first:
            diff = sorted(k for k in set(cfg) | set(first) if cfg.get(k) != first.get(k))
            raise ValueError(
                "estimate_importance: the ranks were called with different configurations "
                + "; ".join(f"{k}: rank 0 {first.get(k)!r}, rank {r} {cfg.get(k)!r}" for k in diff)
                + " (every rank must pass the same methods, options and model; n_samples applies per rank)"
            )


def failure_slots(failed: bool, group) -> list[float]:
    """One count per rank, 1.0 at this rank if its pass failed (summed with the other counts)."""
    if group is None:
        return []
    rank, world = _world(group)
    return [1.0 if (failed and r == rank) else 0.0 for r in range(world)]


def raise_if_failed(slots: list[float], error: BaseException | None, group) -> None:
    """After the closing all-reduce: if any rank's pass failed, every rank raises, naming the failed
    rank(s) (the failed ranks raise their own exception)."""
    failed = [r for r, v in enumerate(slots) if v > 0]
    if not failed:
        return
    msgs: list = [None] * len(slots)
    mine = None if error is None else f"{type(error).__name__}: {error}"
    torch.distributed.all_gather_object(msgs, mine, group=group)
    if error is not None:
        raise error
    raise RuntimeError(
        f"estimate_importance failed on rank(s) {failed} ({msgs[failed[0]]}); every rank stops, none returns "
        "a partial result"
    )


def broadcast_first(tensors: list[Tensor], group) -> None:
    """Overwrite ``tensors`` in place with the values of the group's first rank."""
    if group is None or not tensors:
        return
    src = torch.distributed.get_global_rank(group, 0) if group is not torch.distributed.group.WORLD else 0
    for t in tensors:
        torch.distributed.broadcast(t, src=src, group=group)
