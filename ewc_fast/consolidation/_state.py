"""State-dict scaffolding shared by :class:`ewc_fast.EWC`, :class:`ewc_fast.SynapticIntelligence` and
:class:`ewc_fast.WVA`.

A consolidation state dict is a plain dict, safe for ``torch.save`` and ``torch.load(...,
weights_only=True)``: ``{"format": <class name>, "version": <int>, ...settings and counters...,
"names": [...], <group>: {name: tensor}, ...}``. Loading validates everything before any state
changes; the helpers below raise ``ValueError`` for wrong values, missing entries and wrong shapes, and
``TypeError`` for wrong dtypes (each message starts with ``owner``, the method that was called).
Nothing here is public API.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ..ops._validate import STATE_DTYPES
from ._shard import local, reduce_flags

__all__ = [
    "state_header",
    "check_header",
    "require_keys",
    "check_count",
    "check_names",
    "check_entries",
    "params_by_name",
    "check_state_tensor",
    "clone_named",
    "dtype_name",
    "dtype_from_name",
]


def state_header(fmt: str, version: int) -> dict:
    """``{"format": fmt, "version": version}``, the first two entries of every state dict."""
    return {"format": fmt, "version": version}


def check_header(owner: str, state, fmt: str, version: int, *, non_mapping: type[Exception] = TypeError) -> Mapping:
    """``state`` if it is a mapping with ``format == fmt`` and ``version == version``.

    Not a mapping: ``non_mapping`` (``TypeError``; the hook-driven trackers raise ``ValueError``, as
    they always have); another format or version: ``ValueError``."""
    if not isinstance(state, Mapping):
        raise non_mapping(f"{owner}: expected a {fmt} state dict, got {type(state).__name__}")
    if state.get("format") != fmt or state.get("version") != version:
        raise ValueError(
            f"{owner}: not a {fmt} state dict of version {version} "
            f"(format={state.get('format')!r}, version={state.get('version')!r})"
        )
    return state


def require_keys(owner: str, state: Mapping, keys: Iterable[str]) -> None:
    """``ValueError`` listing the ``keys`` absent from ``state``."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise ValueError(f"{owner}: missing keys {missing}")


def check_count(owner: str, key: str, value) -> int:
    """``value`` if it is an ``int >= 0`` (not a bool), else ``ValueError``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}: {key} must be an int >= 0, got {value!r}")
    return value


def check_names(owner: str, names) -> list[str]:
    """``list(names)`` if its entries are unique strings, else ``ValueError``."""
    names = list(names)
    if len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"{owner}: names must be unique strings")
    return names


def check_entries(owner: str, key: str, entries, names: Sequence[str]) -> Mapping:
    """``entries`` if it is a mapping whose keys are exactly ``names``, else ``ValueError``."""
    if not isinstance(entries, Mapping) or set(entries) != set(names):
        raise ValueError(f"{owner}: {key} entries do not match names")
    return entries


def params_by_name(owner: str, model: nn.Module, names: Sequence[str]) -> list[nn.Parameter]:
    """``model``'s parameter of each name, ``ValueError`` for a name that is not one."""
    named = dict(model.named_parameters())
    params = []
    for name in names:
        p = named.get(name)
        if p is None:
            raise ValueError(f"{owner}: {name!r} is not a parameter of the model")
        params.append(p)
    return params


def check_state_tensor(
    owner: str,
    label: str,
    t,
    shape: Sequence[int],
    *,
    dtype: torch.dtype | None = None,
    finite: bool = False,
    nonnegative: bool = False,
) -> Tensor:
    """``t`` if it is a tensor of ``shape`` (``ValueError`` otherwise, also for a missing entry), of
    ``dtype`` if given (``TypeError``), finite if ``finite`` and ``>= 0`` if ``nonnegative``
    (``ValueError``; one host synchronisation; a ``DTensor`` is checked shard by shard and the flag
    OR-ed over the ranks)."""
    if not isinstance(t, Tensor):
        raise ValueError(f"{owner}: {label} is missing or not a tensor (got {type(t).__name__})")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{owner}: {label} has shape {tuple(t.shape)}, parameter has {tuple(shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{owner}: {label} has dtype {t.dtype}, expected {dtype}")
    if finite or nonnegative:
        loc = local(t)
        bad = ~torch.isfinite(loc)
        if nonnegative:
            bad = bad | (loc < 0)
        if reduce_flags([bool(bad.any())], [t])[0]:
            raise ValueError(f"{owner}: {label} holds NaN/Inf{' or negative values' if nonnegative else ''}")
    return t


def clone_named(names: Sequence[str], tensors: Sequence[Tensor]) -> dict[str, Tensor]:
    """``{name: detached clone}``, the tensor groups of :meth:`state_dict`."""
    return {n: t.detach().clone() for n, t in zip(names, tensors)}


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` for ``torch.float32``: how a state dtype is stored."""
    return str(dtype).replace("torch.", "")


def dtype_from_name(owner: str, name) -> torch.dtype:
    """The state dtype stored as ``name`` (``"float32"`` / ``"float64"``), else ``TypeError``."""
    dtype = getattr(torch, str(name), None)
    if dtype not in STATE_DTYPES:
        raise TypeError(f"{owner}: state_dtype must be float32 or float64, got {name!r}")
    return dtype
