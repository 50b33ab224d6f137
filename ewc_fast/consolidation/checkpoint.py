"""Sharded checkpoints of the consolidation state with ``torch.distributed.checkpoint`` (DCP).

:func:`save` writes ``model.state_dict()`` and the ``state_dict()`` of any number of
:class:`~ewc_fast.EWC` / :class:`~ewc_fast.SynapticIntelligence` / :class:`~ewc_fast.WVA` objects
into one DCP checkpoint: on an FSDP2 model their tensors are ``DTensor`` shards laid out like the
parameters (:mod:`._shard`), so every rank writes only its shards. :func:`load` reads it back onto
any number of ranks and any layout of the same model -- FSDP2 on another world size, or a plain model
in one process (DCP reshards). DCP needs a template of what to load; the objects to load into may be
fresh (no state yet), so the template is built from the checkpoint's metadata: each stored state
tensor becomes a tensor of its dtype laid out like the model parameter of the same name (a
``DTensor`` shard for a sharded parameter), each stored setting a placeholder that DCP replaces.
Then ``obj.load_state_dict`` validates and adopts it as usual (everything checked before anything
changes). ``extra`` carries further DCP state (e.g. the optimizer's, from
``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict``) with DCP's own semantics.

Call both functions on every rank of the group (they are collective when ``torch.distributed`` is
initialised); a single process without a process group works too.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Mapping

import torch
from torch import nn

from ._shard import state_like

__all__ = ["save", "load"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


@contextlib.contextmanager
def _quiet():
    """One process without a group: DCP warns that it assumes so, although ``no_dist`` says it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _check(owner: str, model, objects: Mapping) -> None:
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"{owner}: model must be a torch.nn.Module or None, got {type(model).__name__}")
    for key, obj in objects.items():
        if not (callable(getattr(obj, "state_dict", None)) and callable(getattr(obj, "load_state_dict", None))):
            raise TypeError(f"{owner}: {key!r} has no state_dict()/load_state_dict() (got {type(obj).__name__})")


def save(checkpoint_id, model: nn.Module | None = None, *, extra: Mapping | None = None, **objects) -> None:
    """Write ``model.state_dict()`` (key ``"model"``), ``obj.state_dict()`` of every keyword
    argument (under its keyword) and ``extra`` into the DCP checkpoint ``checkpoint_id`` (a directory)."""
    import torch.distributed.checkpoint as dcp

    _check("checkpoint.save", model, objects)
    state = dict(extra or {})
    if model is not None:
        state["model"] = model.state_dict()
    state.update({k: obj.state_dict() for k, obj in objects.items()})
    with _quiet():
        dcp.save(state, checkpoint_id=checkpoint_id, no_dist=not _distributed())


def _template(md, key: str, params: dict) -> dict:
    """The nested state dict stored under ``key``, with tensors of the stored dtypes laid out like the
    parameters of the same name and ``None`` for the non-tensor entries (DCP replaces both)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    paths = md.planner_data if isinstance(md.planner_data, dict) else {}
    out: dict = {}
    for flat, meta in md.state_dict_metadata.items():
        path = paths.get(flat) or tuple(flat.split(".", 2))
        if not path or path[0] != key:
            continue
        if isinstance(meta, TensorStorageMetadata):
            p = params.get(path[-1])
            dtype = meta.properties.dtype
            if p is not None and tuple(p.shape) == tuple(meta.size):
                value = state_like(p, dtype)
            else:
                value = torch.zeros(tuple(meta.size), dtype=dtype)
        else:
            value = None
        node = out
        for part in path[1:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    if not out:
        raise ValueError(f"checkpoint.load: the checkpoint holds no state under {key!r}")
    return out


def load(checkpoint_id, model: nn.Module | None = None, *, extra: Mapping | None = None, **objects) -> None:
    """Read the checkpoint of :func:`save` into ``model`` and the keyword objects (resharding to the
    current layout), and ``extra`` in place with DCP's semantics. A key missing from the checkpoint
    raises ``ValueError`` before anything is loaded; each object validates its state as in its
    ``load_state_dict``."""
    import torch.distributed.checkpoint as dcp

    _check("checkpoint.load", model, objects)
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        raise TypeError(f"checkpoint.load: checkpoint_id must be a directory path, got {type(checkpoint_id).__name__}")
    md = dcp.FileSystemReader(checkpoint_id).read_metadata()
    params = dict(model.named_parameters()) if model is not None else {}
    state = dict(extra or {})
    if model is not None:
        state["model"] = model.state_dict()
    templates = {k: _template(md, k, params) for k in objects}
    state.update(templates)
    with _quiet():
        dcp.load(state, checkpoint_id=checkpoint_id, no_dist=not _distributed())
    if model is not None:
        model.load_state_dict(state["model"])
    for k, obj in objects.items():
        obj.load_state_dict(state[k])
    if extra is not None and isinstance(extra, dict):
        extra.update({k: state[k] for k in extra})
