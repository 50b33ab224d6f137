"""Multi-tensor consolidation ops, registered with ``torch.library`` under the ``ewc_fast`` namespace.

One call covers every parameter of a model (lists of tensors). Each op dispatches to one backend
(``"triton"``, ``"cpp"``, ``"torch"``; see :mod:`ewc_fast.ops.backends`) and has a fake (meta)
implementation, so it traces under ``torch.compile``. Formulas (``../shared/NOTES.md`` §3):

* ``penalty_apply_``: grad += s*lam*W*(theta-mu); value = (lam/2)*(sum W*(theta-mu)^2 + c),
  W = Omega or, stabilised with SGD step alpha, Omega/(1 + alpha*lam*Omega).
* ``consolidate_``: Omega' = gamma*Omega + F; mu' = (gamma*Omega*mu + F*theta*)/Omega' (theta* where
  Omega' = 0); c' = gamma*c + sum(gamma*Omega*(mu-mu')^2 + F*(theta*-mu')^2). Online: mu' = theta*, c' = 0.
* ``si_accumulate_``: omega -= g*(theta - theta_prev); theta_prev <- theta.
* ``si_consolidate_``: out += omega/((theta - theta_start)^2 + xi) (then max(.,0) if clip); omega <- 0;
  theta_start <- theta.
* ``wva_attenuate_``: theta <- theta_old + (theta - theta_old)/(1 + lam*A).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._registry import impl_module, resolve_backend, run_op
from .._validate import (
    PARAM_DTYPES,
    STATE_DTYPES,
    check_group,
    check_lists,
    common_device,
    contiguous_in,
    contiguous_inout,
)

_P = PARAM_DTYPES
_S = STATE_DTYPES


def _finite_scalar(op: str, name: str, value: float, *, min_value: float | None = None) -> float:
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{op}: {name} must be finite, got {value}")
    if min_value is not None and value < min_value:
        raise ValueError(f"{op}: {name} must be >= {min_value}, got {value}")
    return value


# ----------------------------------------------------------------------------------- penalty_apply_
def _penalty_apply_eager(
    grads: list[Tensor],
    params: list[Tensor],
    omega: list[Tensor],
    mu: list[Tensor],
    lam: float,
    alpha: float | None,
    c: float,
    grad_scale: float,
    backend: str,
) -> Tensor:
    device = common_device("penalty_apply_", params)
    impl = impl_module(resolve_backend(backend, device))
    with contiguous_inout(grads) as g:
        s = impl.penalty_apply(
            g, contiguous_in(params), contiguous_in(omega), contiguous_in(mu), lam, alpha, grad_scale
        )
    return (0.5 * lam) * (s.to(device=device, dtype=torch.float64) + c)


_penalty_apply_op = torch.library.custom_op("ewc_fast::penalty_apply_", mutates_args=("grads",))(_penalty_apply_eager)


@_penalty_apply_op.register_fake
def _(grads, params, omega, mu, lam, alpha, c, grad_scale, backend):
    device = params[0].device if params else torch.device("cpu")
    resolve_backend(backend, device)  # meta tensors dispatch here: still reject unknown/unavailable backends
    return torch.empty((), dtype=torch.float64, device=device)


def penalty_apply_(
    grads: list[Tensor],
    params: list[Tensor],
    omega: list[Tensor],
    mu: list[Tensor],
    lam: float,
    *,
    alpha: float | None = None,
    c: float = 0.0,
    grad_scale: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """Add the EWC penalty gradient to ``grads`` in place and return the penalty value.

    For each parameter: ``grad += grad_scale * lam * W * (theta - mu)`` with ``W = omega`` or, when
    ``alpha`` (the SGD step size of stabilised EWC) is given, ``W = omega / (1 + alpha*lam*omega)``.
    Returns ``(lam/2) * (sum W*(theta-mu)^2 + c)`` as a 0-dim float64 tensor on the params' device.
    Arithmetic (and the per-block partial sums, added in fp64 across blocks) in fp64 for fp64
    params, in fp32 otherwise; ``theta - mu`` is formed in the promoted dtype of params and mu.
    """
    op = "penalty_apply_"
    n = check_lists(op, grads=grads, params=params, omega=omega, mu=mu)
    lam = _finite_scalar(op, "lam", lam, min_value=0.0)
    if alpha is not None:
        alpha = _finite_scalar(op, "alpha", alpha, min_value=0.0)
    c = _finite_scalar(op, "c", c)
    grad_scale = _finite_scalar(op, "grad_scale", grad_scale)
    for i in range(n):
        check_group(
            op,
            i,
            {"grads": _P, "params": _P, "omega": _S, "mu": _S},
            grads=grads[i],
            params=params[i],
            omega=omega[i],
            mu=mu[i],
        )
        if grads[i].dtype != params[i].dtype:
            raise TypeError(f"{op}: grads[{i}] dtype {grads[i].dtype} != params dtype {params[i].dtype}")
    common_device(op, params)
    return run_op(
        _penalty_apply_op,
        _penalty_apply_eager,
        list(grads),
        list(params),
        list(omega),
        list(mu),
        lam,
        alpha,
        c,
        grad_scale,
        backend,
    )


# ------------------------------------------------------------------------------------- consolidate_
def _consolidate_eager(
    omega: list[Tensor],
    mu: list[Tensor],
    fisher: list[Tensor],
    anchor: list[Tensor],
    gamma: float,
    online: bool,
    backend: str,
) -> Tensor:
    device = common_device("consolidate_", omega)
    impl = impl_module(resolve_backend(backend, device))
    with contiguous_inout(omega) as o, contiguous_inout(mu) as m:
        s = impl.consolidate(o, m, contiguous_in(fisher), contiguous_in(anchor), gamma, online)
    return s.to(device=device, dtype=torch.float64)


_consolidate_op = torch.library.custom_op("ewc_fast::consolidate_", mutates_args=("omega", "mu"))(_consolidate_eager)


@_consolidate_op.register_fake
def _(omega, mu, fisher, anchor, gamma, online, backend):
    device = omega[0].device if omega else torch.device("cpu")
    resolve_backend(backend, device)
    return torch.empty((), dtype=torch.float64, device=device)


def consolidate_(
    omega: list[Tensor],
    mu: list[Tensor],
    fisher: list[Tensor],
    anchor: list[Tensor],
    gamma: float = 1.0,
    *,
    online: bool = False,
    backend: str = "auto",
) -> Tensor:
    """Merge a task's importance ``fisher`` anchored at ``anchor`` into ``(omega, mu)`` in place.

    ``omega' = gamma*omega + F``; separate mode: ``mu' = (gamma*omega*mu + F*anchor)/omega'``
    (``anchor`` where ``omega' == 0``) and the return value is the increment
    ``sum(gamma*omega*(mu-mu')^2 + F*(anchor-mu')^2)`` so that ``c' = gamma*c + increment``;
    online mode: ``mu' = anchor`` and the return value is 0 (``c' = 0``). Arithmetic in fp64.
    """
    op = "consolidate_"
    n = check_lists(op, omega=omega, mu=mu, fisher=fisher, anchor=anchor)
    gamma = _finite_scalar(op, "gamma", gamma)
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"{op}: gamma must be in (0, 1], got {gamma}")
    for i in range(n):
        check_group(
            op,
            i,
            {"omega": _S, "mu": _S, "fisher": _P, "anchor": _P},
            omega=omega[i],
            mu=mu[i],
            fisher=fisher[i],
            anchor=anchor[i],
        )
    common_device(op, omega)
    return run_op(
        _consolidate_op,
        _consolidate_eager,
        list(omega),
        list(mu),
        list(fisher),
        list(anchor),
        gamma,
        bool(online),
        backend,
    )


# ----------------------------------------------------------------------------------- si_accumulate_
def _si_accumulate_eager(
    omega_path: list[Tensor], grads: list[Tensor], params: list[Tensor], prev_params: list[Tensor], backend: str
) -> None:
    device = common_device("si_accumulate_", params)
    impl = impl_module(resolve_backend(backend, device))
    with contiguous_inout(omega_path) as w, contiguous_inout(prev_params) as q:
        impl.si_accumulate(w, contiguous_in(grads), contiguous_in(params), q)


_si_accumulate_op = torch.library.custom_op("ewc_fast::si_accumulate_", mutates_args=("omega_path", "prev_params"))(
    _si_accumulate_eager
)


@_si_accumulate_op.register_fake
def _(omega_path, grads, params, prev_params, backend):
    resolve_backend(backend, params[0].device if params else torch.device("cpu"))
    return None


def si_accumulate_(
    omega_path: list[Tensor],
    grads: list[Tensor],
    params: list[Tensor],
    prev_params: list[Tensor],
    *,
    backend: str = "auto",
) -> None:
    """SI path integral step: ``omega_path -= g*(theta - theta_prev)``; then ``theta_prev <- theta``.

    The product is computed in fp64 for fp64 params, in fp32 otherwise."""
    op = "si_accumulate_"
    n = check_lists(op, omega_path=omega_path, grads=grads, params=params, prev_params=prev_params)
    for i in range(n):
        check_group(
            op,
            i,
            {"omega_path": _S, "grads": _P, "params": _P, "prev_params": _P},
            omega_path=omega_path[i],
            grads=grads[i],
            params=params[i],
            prev_params=prev_params[i],
        )
    common_device(op, params)
    run_op(
        _si_accumulate_op, _si_accumulate_eager, list(omega_path), list(grads), list(params), list(prev_params), backend
    )


# ---------------------------------------------------------------------------------- si_consolidate_
def _si_consolidate_eager(
    omega_path: list[Tensor],
    params: list[Tensor],
    start_params: list[Tensor],
    out: list[Tensor],
    xi: float,
    clip: bool,
    backend: str,
) -> None:
    device = common_device("si_consolidate_", params)
    impl = impl_module(resolve_backend(backend, device))
    with contiguous_inout(omega_path) as w, contiguous_inout(start_params) as s, contiguous_inout(out) as o:
        impl.si_consolidate(w, contiguous_in(params), s, o, xi, clip)


_si_consolidate_op = torch.library.custom_op(
    "ewc_fast::si_consolidate_", mutates_args=("omega_path", "start_params", "out")
)(_si_consolidate_eager)


@_si_consolidate_op.register_fake
def _(omega_path, params, start_params, out, xi, clip, backend):
    resolve_backend(backend, params[0].device if params else torch.device("cpu"))
    return None


def si_consolidate_(
    omega_path: list[Tensor],
    params: list[Tensor],
    start_params: list[Tensor],
    out: list[Tensor],
    xi: float,
    *,
    clip: bool = True,
    backend: str = "auto",
) -> None:
    """SI end of task: ``out += omega_path/((theta-theta_start)^2 + xi)``, then ``out = max(out, 0)`` if
    ``clip``; finally ``omega_path <- 0`` and ``theta_start <- theta`` (the next task starts here).
    Arithmetic in fp64 for fp64 params, in fp32 otherwise."""
    op = "si_consolidate_"
    n = check_lists(op, omega_path=omega_path, params=params, start_params=start_params, out=out)
    xi = _finite_scalar(op, "xi", xi)
    if xi <= 0:
        raise ValueError(f"{op}: xi must be > 0, got {xi}")
    for i in range(n):
        check_group(
            op,
            i,
            {"omega_path": _S, "params": _P, "start_params": _P, "out": _S},
            omega_path=omega_path[i],
            params=params[i],
            start_params=start_params[i],
            out=out[i],
        )
    common_device(op, params)
    run_op(
        _si_consolidate_op,
        _si_consolidate_eager,
        list(omega_path),
        list(params),
        list(start_params),
        list(out),
        xi,
        bool(clip),
        backend,
    )


# ----------------------------------------------------------------------------------- wva_attenuate_
def _wva_attenuate_eager(
    params: list[Tensor], old_params: list[Tensor], accum: list[Tensor], lam: float, backend: str
) -> None:
    device = common_device("wva_attenuate_", params)
    impl = impl_module(resolve_backend(backend, device))
    with contiguous_inout(params) as p:
        impl.wva_attenuate(p, contiguous_in(old_params), contiguous_in(accum), lam)


_wva_attenuate_op = torch.library.custom_op("ewc_fast::wva_attenuate_", mutates_args=("params",))(_wva_attenuate_eager)


@_wva_attenuate_op.register_fake
def _(params, old_params, accum, lam, backend):
    resolve_backend(backend, params[0].device if params else torch.device("cpu"))
    return None


def wva_attenuate_(
    params: list[Tensor], old_params: list[Tensor], accum: list[Tensor], lam: float, *, backend: str = "auto"
) -> None:
    """Weight-velocity attenuation after an optimizer step: ``theta <- theta_old + (theta-theta_old)/(1+lam*A)``.

    Arithmetic in fp64 for fp64 params (which are therefore not rounded through fp32), in fp32
    otherwise; the result is stored in the params' dtype."""
    op = "wva_attenuate_"
    n = check_lists(op, params=params, old_params=old_params, accum=accum)
    lam = _finite_scalar(op, "lam", lam, min_value=0.0)
    for i in range(n):
        check_group(
            op,
            i,
            {"params": _P, "old_params": _P, "accum": _S},
            params=params[i],
            old_params=old_params[i],
            accum=accum[i],
        )
    common_device(op, params)
    run_op(_wva_attenuate_op, _wva_attenuate_eager, list(params), list(old_params), list(accum), lam, backend)
