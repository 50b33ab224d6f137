"""What one element of ``data`` holds, and how the model is called on it.

A batch is ``(inputs, targets)``, ``(inputs,)`` or ``inputs`` alone; ``inputs`` is passed as
``model(inputs)``, a tuple/list as ``model(*inputs)``, a dict as ``model(**inputs)``. The first
dimension of the first tensor in ``inputs`` is the batch size N, and every tensor (of inputs or
targets) whose leading size is N is batched along it: truncation to ``n_samples`` cuts those
tensors to their first k rows. Inputs and targets must be on the device of the model's parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

__all__ = ["Batch", "read_batch", "truncate", "forward"]


@dataclass
class Batch:
    """One usable batch: its index in ``data``, inputs, targets (or None) and sample count n >= 1."""

    idx: int
    inputs: Any
    targets: Any
    n: int


def _split(batch, idx: int):
    """(inputs, targets or None) of one batch."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise ValueError(
            f"batch {idx} is a {type(batch).__name__} of length {len(batch)}; expected "
            "(inputs, targets) or inputs alone"
        )
    return batch, None


def _batch_size(inputs, idx: int) -> int:
    for t in tree_leaves(inputs):
        if isinstance(t, Tensor):
            if t.dim() == 0:
                raise ValueError(f"batch {idx}: inputs hold a 0-dim tensor; the first dimension must be the batch")
            return int(t.shape[0])
    raise ValueError(f"batch {idx}: inputs hold no tensor (got {type(inputs).__name__})")


def truncate(obj, n: int, k: int):
    """``obj`` with every tensor of leading size ``n`` cut to its first ``k`` rows."""
    return tree_map(lambda t: t[:k] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else t, obj)


def _check_device(obj, device: torch.device, what: str, idx: int) -> None:
    for t in tree_leaves(obj):
        if isinstance(t, Tensor) and t.device != device:
            raise ValueError(
                f"batch {idx}: {what} on device {t.device} but the model's parameters are on {device}; "
                "move the batches to the model's device"
            )


def read_batch(
    batch, idx: int, taken: int, n_samples: int | None, device: torch.device, needs_targets: bool
) -> Batch | None:
    """Batch ``idx`` of ``data`` checked and truncated so that at most ``n_samples`` are used in all
    (``taken`` already were); None if no sample of it is used."""
    inputs, targets = _split(batch, idx)
    n = _batch_size(inputs, idx)
    if n_samples is not None and taken + n > n_samples:
        k = n_samples - taken
        inputs, targets = truncate(inputs, n, k), truncate(targets, n, k)
        n = k
    if n == 0:
        return None
    _check_device(inputs, device, "inputs", idx)
    _check_device(targets, device, "targets", idx)
    if targets is None and needs_targets:
        raise ValueError(
            f"batch {idx} has no targets, but 'fisher'/'fisher_batched' need (inputs, targets) "
            "batches (use 'fisher_mc'/'fisher_exact'/'mas' for unlabelled data)"
        )
    return Batch(idx, inputs, targets, n)


def forward(model: nn.Module, inputs):
    """``model`` called on ``inputs`` (a dict as keywords, a tuple/list as positional arguments)."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)
