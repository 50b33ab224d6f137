"""Argument validation shared by the consolidation-state classes (:mod:`.ewc`, :mod:`.si`, :mod:`.wva`):
which parameters are trainable, whether an importance fits a model, and the ``backend`` /
``state_dtype`` arguments. Scalar hyperparameters are checked by
:func:`ewc_fast.ops._validate.check_finite_scalar`, state dicts by :mod:`._state`.

Nothing here is public API.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..ops._validate import PARAM_DTYPES, STATE_DTYPES
from ..ops.backends import BACKENDS
from ._shard import check_layout, like_param, local, reduce_flags

__all__ = ["trainable_params", "check_importance", "check_state_dtype", "check_backend", "check_sum_fits"]


def trainable_params(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """``(name, param)`` for every parameter of ``model`` with ``requires_grad``, in module order."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def check_backend(owner: str, backend: str) -> str:
    """``backend`` if it names a backend or ``"auto"`` (whether it can run is decided by each op)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"{owner}: unknown backend {backend!r}; valid: 'auto', " + ", ".join(map(repr, BACKENDS)))
    return backend


def check_state_dtype(owner: str, dtype) -> torch.dtype:
    """``dtype`` if it is a state dtype (``torch.float32`` or ``torch.float64``), else ``TypeError``."""
    if dtype not in STATE_DTYPES:
        raise TypeError(f"{owner}: state_dtype must be torch.float32 or torch.float64, got {dtype}")
    return dtype


def _bad_value_flags(tensors: list[Tensor], *, nonnegative: bool) -> list[bool]:
    """Per tensor: does it hold NaN/Inf (or, if ``nonnegative``, a negative value)?

    One host synchronisation per device, however many tensors; ``DTensor`` entries are checked on
    their local shards and the flags OR-ed over the ranks (one small all-reduce)."""
    by_device: dict = {}
    for i, t in enumerate(tensors):
        t = local(t)
        bad = ~torch.isfinite(t)
        if nonnegative:
            bad = bad | (t < 0)
        by_device.setdefault(t.device, []).append((i, bad.any()))
    out = [False] * len(tensors)
    for items in by_device.values():
        for (i, _), v in zip(items, torch.stack([f for _, f in items]).tolist()):
            out[i] = bool(v)
    return reduce_flags(out, tensors)


def check_importance(owner: str, model: nn.Module, importance) -> tuple[list[str], list[nn.Parameter], list[Tensor]]:
    """Validate ``importance`` against ``model`` without touching any state.

    Every trainable parameter (``requires_grad``) must have an entry with the parameter's shape and
    device, a dtype in {fp32, fp64, bf16, fp16}, finite and non-negative values; the parameter itself
    must be finite (it becomes an anchor). For a ``DTensor`` parameter (FSDP2) the returned tensor is
    laid out like it (a full tensor is cut to the local shard; see :mod:`._shard`).
    Names that are not parameters of ``model`` are refused;
    entries for frozen parameters are accepted and ignored. Returns ``(names, params, tensors)`` of the
    trainable parameters in module order.
    """
    if not isinstance(importance, Mapping):
        raise TypeError(
            f"{owner}: importance must be an ewc_fast.Importance or a mapping name -> tensor, "
            f"got {type(importance).__name__}"
        )
    named = dict(model.named_parameters())
    unknown = [k for k in importance.keys() if k not in named]
    if unknown:
        raise ValueError(
            f"{owner}: importance has entries for names that are not parameters of the model: "
            f"{sorted(map(str, unknown))[:10]}"
        )
    names, params, tensors = [], [], []
    for name, p in named.items():
        if not p.requires_grad:
            continue
        if name not in importance:
            raise ValueError(f"{owner}: importance is missing trainable parameter {name!r}")
        t = importance[name]
        if not isinstance(t, Tensor):
            raise TypeError(f"{owner}: importance[{name!r}] is a {type(t).__name__}, not a tensor")
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(
                f"{owner}: importance[{name!r}] has dtype {t.dtype}; allowed: {[str(d) for d in PARAM_DTYPES]}"
            )
        if t.layout != torch.strided:
            raise TypeError(f"{owner}: importance[{name!r}] must be a dense tensor, got layout {t.layout}")
        if tuple(t.shape) != tuple(p.shape):
            raise ValueError(
                f"{owner}: importance[{name!r}] has shape {tuple(t.shape)}, parameter has {tuple(p.shape)}"
            )
        if t.device != p.device:
            raise ValueError(f"{owner}: importance[{name!r}] is on {t.device}, parameter is on {p.device}")
        check_layout(owner, name, p)
        names.append(name)
        params.append(p)
        tensors.append(like_param(owner, f"importance[{name!r}]", t.detach(), p))
    for name, bad in zip(names, _bad_value_flags(tensors, nonnegative=True)):
        if bad:
            raise ValueError(f"{owner}: importance[{name!r}] holds NaN/Inf or negative values")
    for name, bad in zip(names, _bad_value_flags([p.detach() for p in params], nonnegative=False)):
        if bad:
            raise ValueError(f"{owner}: parameter {name!r} holds NaN/Inf; refusing to anchor at it")
    return names, params, tensors


def check_sum_fits(
    owner: str, names: list[str], state: list[Tensor], added: list[Tensor], params: list[Tensor], gamma: float = 1.0
) -> None:
    """Refuse a merge ``gamma*state + added`` (formed in fp64) that overflows the state's dtype or the
    arithmetic dtype of its parameter (fp64 for fp64 parameters, else fp32: the penalty and WVA
    kernels compute in it, and ``inf * 0`` at the anchor would be NaN). One fp64 pass and one host
    synchronisation; ``ValueError`` naming the parameter and the fixes. Nothing is changed."""
    if not state:
        return
    peaks = [
        (gamma * local(s).to(torch.float64) + local(a).to(torch.float64)).abs().amax()
        if local(s).numel()
        else torch.zeros((), dtype=torch.float64, device=local(s).device)
        for s, a in zip(state, added)
    ]
    values = torch.stack([v.to(peaks[0].device) for v in peaks]).tolist()
    limits = [
        (torch.finfo(torch.float64 if p.dtype == torch.float64 else torch.float32).max, torch.finfo(s.dtype).max)
        for s, p in zip(state, params)
    ]
    # sharded state: each rank checked its shards; all ranks agree before any state changes
    flags = reduce_flags([not (v <= min(limit)) for v, limit in zip(values, limits)], params)
    for name, v, flag, s, p in zip(names, values, flags, state, params):
        if not flag:
            continue
        arith = torch.float64 if p.dtype == torch.float64 else torch.float32
        if not v <= torch.finfo(arith).max:
            what, why = arith, f"the kernels' arithmetic for {p.dtype} parameters"
        else:
            what, why = s.dtype, f"the state dtype {s.dtype}"
        raise ValueError(
            f"{owner}: the accumulated importance of {name!r} reaches {v:.3e}, which overflows "
            f"{str(what).replace('torch.', '')}, {why}; nothing was changed. Rescale the importances (e.g. "
            "normalise them and scale lam up accordingly), or use float64 parameters with "
            "state_dtype=torch.float64"
        )
