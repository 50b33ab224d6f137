"""What one element of ``data`` holds, and how the model is called on it.

A batch is ``(inputs, targets)``, ``(inputs,)`` or ``inputs`` alone; ``inputs`` is passed as
``model(inputs)``, a tuple/list as ``model(*inputs)``, a mapping (a dict, a Hugging Face
``BatchEncoding``) as ``model(**inputs)``. A mapping without separate targets that holds ``labels``
(a Hugging Face batch) uses them as the targets (they stay in the model's inputs too, so
sequence-to-sequence models still build their decoder inputs from them).

The batch contract: every tensor of a batch with at least one dimension holds one row per sample
along dim 0, so all of them share the leading size N (checked: a shared tensor, e.g. one mask for
every sample, belongs in the model or a closure, not in the batch). These tensors are the roots of
the sample provenance (:mod:`.provenance`); truncation to ``n_samples`` cuts them to their first k
rows. Inputs and targets must be on the device of the model's parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
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
    if isinstance(batch, Mapping):
        inputs = dict(batch)
        return inputs, inputs.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return _plain(batch[0]), batch[1]
        if len(batch) == 1:
            return _plain(batch[0]), None
        raise ValueError(
            f"batch {idx} is a {type(batch).__name__} of length {len(batch)}; expected "
            "(inputs, targets) or inputs alone"
        )
    return batch, None


def _plain(inputs):
    """A mapping (e.g. a ``BatchEncoding``) as a plain dict, so that pytree sees its tensors."""
    return dict(inputs) if isinstance(inputs, Mapping) and not isinstance(inputs, dict) else inputs


def _named_leaves(obj, prefix: str):
    """(path, tensor) of every tensor in a nested structure of dicts / tuples / lists."""
    if isinstance(obj, Tensor):
        return [(prefix, obj)]
    if isinstance(obj, Mapping):
        return [x for k, v in obj.items() for x in _named_leaves(v, f"{prefix}[{k!r}]")]
    if isinstance(obj, (tuple, list)):
        return [x for i, v in enumerate(obj) for x in _named_leaves(v, f"{prefix}[{i}]")]
    return []


def _batch_size(inputs, targets, idx: int) -> int:
    """N: the leading size every tensor of the batch shares (the batch contract, module doc)."""
    named = [(p, t) for p, t in _named_leaves(inputs, "inputs") + _named_leaves(targets, "targets") if t.dim() > 0]
    if not named:
        raise ValueError(
            f"batch {idx}: inputs hold no tensor with a sample dimension (got {type(inputs).__name__}); "
            "the first dimension of every tensor of a batch must be the sample"
        )
    sizes = {int(t.shape[0]) for _, t in named}
    if len(sizes) > 1:
        desc = ", ".join(f"{p} {tuple(t.shape)}" for p, t in named[:6])
        raise ValueError(
            f"batch {idx}: its tensors disagree on the leading (sample) dimension ({desc}); every tensor of a "
            "batch must hold one row per sample along dim 0. A tensor shared by all samples (e.g. one mask "
            "for every sample) belongs in the model (a buffer) or a closure, not in the batch"
        )
    return sizes.pop()


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
    n = _batch_size(inputs, targets, idx)
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
            "batches or a mapping with 'labels' (use 'fisher_mc'/'fisher_exact'/'mas' for unlabelled data)"
        )
    return Batch(idx, inputs, targets, n)


def forward(model: nn.Module, inputs):
    """``model`` called on ``inputs`` (a mapping as keywords, a tuple/list as positional arguments).

    ``torch.compile``'d models and functions run eagerly here (``torch.compiler.set_stance("force_eager")``):
    the engine's hooks and its provenance tracker need the eager forward; the parameters and their
    names are those of the module passed (``_orig_mod.`` prefixes included)."""
    with torch.compiler.set_stance("force_eager"):
        if isinstance(inputs, Mapping):
            return model(**inputs)
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)
