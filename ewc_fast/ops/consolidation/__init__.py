"""Multi-tensor consolidation ops, registered with ``torch.library`` under the ``ewc_fast`` namespace.

One call covers every parameter of a model (lists of tensors). Each op dispatches to one backend
(``"triton"``, ``"cpp"``, ``"torch"``; see :mod:`ewc_fast.ops.backends`) whose implementations live in
``ewc_fast/ops/consolidation/_<backend>.py``, and has a fake (meta) implementation, so it traces under
``torch.compile``. Formulas (EWC: Kirkpatrick et al. 2017; online EWC: Schwarz et al. 2018; SI:
Zenke et al. 2017; stabilised weight W and WVA: docs/CONSOLIDATION.md):

* ``penalty_apply_``: grad += s*lam*W*(theta-mu); value = (lam/2)*(sum W*(theta-mu)^2 + c),
  W = Omega or, stabilised with SGD step alpha, Omega/(1 + alpha*lam*Omega).
* ``consolidate_``: Omega' = gamma*Omega + F; mu' = (gamma*Omega*mu + F*theta*)/Omega' (theta* where
  Omega' = 0); c' = gamma*c + sum(gamma*Omega*(mu-mu')^2 + F*(theta*-mu')^2). Online: mu' = theta*, c' = 0.
* ``si_accumulate_``: omega -= g*(theta - theta_prev); theta_prev <- theta.
* ``si_consolidate_``: out += omega/((theta - theta_start)^2 + xi) (then max(.,0) if clip); omega <- 0;
  theta_start <- theta.
* ``wva_attenuate_``: theta <- theta_old + (theta - theta_old)/(1 + lam*A).

Each op is an eager body defined with :func:`ewc_fast.ops._registry.define_op` plus a public function
that validates its arguments and calls the defined op once. Validation covers every argument
before the first write (dtypes, shapes, devices, dense layout, written tensors without internal
overlap and sharing no memory with any other argument, no in-place write to a tensor autograd tracks
outside ``torch.no_grad()``; ``consolidate_`` also refuses a merged ``Omega`` that overflows its
dtype); the eager bodies bump the version counters of what they wrote, on every backend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .._registry import define_op, op_device, resolve_impl
from .._validate import (
    PARAM_DTYPES,
    STATE_DTYPES,
    bump_versions,
    check_finite_scalar,
    check_no_overlap,
    check_tensor_lists,
    check_writable,
    common_device,
    contiguous_in,
    contiguous_inout,
)

_P = PARAM_DTYPES
_S = STATE_DTYPES
_FAMILY = "consolidation"


# ----------------------------------------------------------------------------------- penalty_apply_
@define_op("penalty_apply_", mutates=("grads",), result="scalar", device_arg="params")
def _penalty_apply(
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
    device = op_device(params)
    impl = resolve_impl(backend, _FAMILY, device)
    with contiguous_inout(grads) as g:
        s = impl.penalty_apply(
            g, contiguous_in(params), contiguous_in(omega), contiguous_in(mu), lam, alpha, grad_scale
        )
    bump_versions(grads)
    return (0.5 * lam) * (s.to(device=device, dtype=torch.float64) + c)


def check_penalty_apply_args(
    grads: list[Tensor],
    params: list[Tensor],
    omega: list[Tensor],
    mu: list[Tensor],
    lam: float,
    alpha: float | None,
    c: float,
    grad_scale: float,
) -> tuple[float, float | None, float, float]:
    """Every check of :func:`penalty_apply_` (raising as it would), without running it: for callers
    that must validate before changing state of their own (``EWC.apply_``). Returns the validated
    scalars ``(lam, alpha, c, grad_scale)``."""
    op = _penalty_apply.name
    n = check_tensor_lists(
        op, {"grads": _P, "params": _P, "omega": _S, "mu": _S}, grads=grads, params=params, omega=omega, mu=mu
    )
    for i in range(n):
        if grads[i].dtype != params[i].dtype:
            raise TypeError(f"{op}: grads[{i}] dtype {grads[i].dtype} != params dtype {params[i].dtype}")
    lam = check_finite_scalar(op, "lam", lam, low=0.0)
    if alpha is not None:
        alpha = check_finite_scalar(op, "alpha", alpha, low=0.0)
    c = check_finite_scalar(op, "c", c)
    grad_scale = check_finite_scalar(op, "grad_scale", grad_scale)
    common_device(op, params)
    check_no_overlap(op, {"grads": grads}, {"params": params, "omega": omega, "mu": mu})
    check_writable(op, grads=grads)
    return lam, alpha, c, grad_scale


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
    lam, alpha, c, grad_scale = check_penalty_apply_args(grads, params, omega, mu, lam, alpha, c, grad_scale)
    return _penalty_apply(list(grads), list(params), list(omega), list(mu), lam, alpha, c, grad_scale, backend)


# ------------------------------------------------------------------------------------- consolidate_
@define_op("consolidate_", mutates=("omega", "mu"), result="scalar", device_arg="omega")
def _consolidate(
    omega: list[Tensor],
    mu: list[Tensor],
    fisher: list[Tensor],
    anchor: list[Tensor],
    gamma: float,
    online: bool,
    backend: str,
) -> Tensor:
    device = op_device(omega)
    impl = resolve_impl(backend, _FAMILY, device)
    with contiguous_inout(omega) as o, contiguous_inout(mu) as m:
        s = impl.consolidate(o, m, contiguous_in(fisher), contiguous_in(anchor), gamma, online)
    bump_versions(omega, mu)
    return s.to(device=device, dtype=torch.float64)


def _check_merged_finite(op: str, omega: list[Tensor], fisher: list[Tensor], gamma: float) -> None:
    """Refuse a merge whose ``gamma*Omega + F`` (formed in fp64) does not fit ``Omega``'s dtype: two
    finite fp32 importances of 2e38 would store ``Omega = inf`` and make the penalty NaN at the anchor.
    One fp64 pass over the state and one host synchronisation per call (consolidations are rare)."""
    if not omega or torch.compiler.is_compiling():
        return
    peaks = []
    for o, f in zip(omega, fisher):
        if o.numel() == 0 or o.device.type == "meta":
            continue
        peaks.append((gamma * o.to(torch.float64) + f.to(torch.float64)).abs().amax() / torch.finfo(o.dtype).max)
    if not peaks:
        return
    ratios = torch.stack([p.to(peaks[0].device) for p in peaks]).tolist()
    for i, r in enumerate(ratios):
        if not r <= 1.0:  # also NaN
            raise ValueError(
                f"{op}: the merged importance gamma*omega + fisher of tensor #{i} overflows its dtype "
                f"({omega[i].dtype}, largest finite {torch.finfo(omega[i].dtype).max:.3e}); nothing was changed. "
                "Rescale the importances (e.g. normalise them, and scale lam up accordingly) or keep the state "
                "in float64 (state_dtype=torch.float64)"
            )


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
    online mode: ``mu' = anchor`` and the return value is 0 (``c' = 0``). ``gamma`` in (0, 1].
    Arithmetic in fp64.
    """
    op = _consolidate.name
    check_tensor_lists(
        op, {"omega": _S, "mu": _S, "fisher": _P, "anchor": _P}, omega=omega, mu=mu, fisher=fisher, anchor=anchor
    )
    gamma = check_finite_scalar(op, "gamma", gamma, low=0.0, low_open=True, high=1.0)
    common_device(op, omega)
    check_no_overlap(op, {"omega": omega, "mu": mu}, {"fisher": fisher, "anchor": anchor})
    check_writable(op, omega=omega, mu=mu)
    _check_merged_finite(op, omega, fisher, gamma)
    return _consolidate(list(omega), list(mu), list(fisher), list(anchor), gamma, bool(online), backend)


# ----------------------------------------------------------------------------------- si_accumulate_
@define_op("si_accumulate_", mutates=("omega_path", "prev_params"), device_arg="params")
def _si_accumulate(
    omega_path: list[Tensor], grads: list[Tensor], params: list[Tensor], prev_params: list[Tensor], backend: str
) -> None:
    impl = resolve_impl(backend, _FAMILY, op_device(params))
    with contiguous_inout(omega_path) as w, contiguous_inout(prev_params) as q:
        impl.si_accumulate(w, contiguous_in(grads), contiguous_in(params), q)
    bump_versions(omega_path, prev_params)


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
    op = _si_accumulate.name
    check_tensor_lists(
        op,
        {"omega_path": _S, "grads": _P, "params": _P, "prev_params": _P},
        omega_path=omega_path,
        grads=grads,
        params=params,
        prev_params=prev_params,
    )
    common_device(op, params)
    check_no_overlap(op, {"omega_path": omega_path, "prev_params": prev_params}, {"grads": grads, "params": params})
    check_writable(op, omega_path=omega_path, prev_params=prev_params)
    _si_accumulate(list(omega_path), list(grads), list(params), list(prev_params), backend)


# ---------------------------------------------------------------------------------- si_consolidate_
@define_op("si_consolidate_", mutates=("omega_path", "start_params", "out"), device_arg="params")
def _si_consolidate(
    omega_path: list[Tensor],
    params: list[Tensor],
    start_params: list[Tensor],
    out: list[Tensor],
    xi: float,
    clip: bool,
    backend: str,
) -> None:
    impl = resolve_impl(backend, _FAMILY, op_device(params))
    with contiguous_inout(omega_path) as w, contiguous_inout(start_params) as s, contiguous_inout(out) as o:
        impl.si_consolidate(w, contiguous_in(params), s, o, xi, clip)
    bump_versions(omega_path, start_params, out)


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
    ``xi > 0``. Arithmetic in fp64 for fp64 params, in fp32 otherwise."""
    op = _si_consolidate.name
    check_tensor_lists(
        op,
        {"omega_path": _S, "params": _P, "start_params": _P, "out": _S},
        omega_path=omega_path,
        params=params,
        start_params=start_params,
        out=out,
    )
    xi = check_finite_scalar(op, "xi", xi, low=0.0, low_open=True)
    common_device(op, params)
    check_no_overlap(op, {"omega_path": omega_path, "start_params": start_params, "out": out}, {"params": params})
    check_writable(op, omega_path=omega_path, start_params=start_params, out=out)
    _si_consolidate(list(omega_path), list(params), list(start_params), list(out), xi, bool(clip), backend)


# ----------------------------------------------------------------------------------- wva_attenuate_
@define_op("wva_attenuate_", mutates=("params",), device_arg="params")
def _wva_attenuate(
    params: list[Tensor], old_params: list[Tensor], accum: list[Tensor], lam: float, backend: str
) -> None:
    impl = resolve_impl(backend, _FAMILY, op_device(params))
    with contiguous_inout(params) as p:
        impl.wva_attenuate(p, contiguous_in(old_params), contiguous_in(accum), lam)
    bump_versions(params)


def wva_attenuate_(
    params: list[Tensor], old_params: list[Tensor], accum: list[Tensor], lam: float, *, backend: str = "auto"
) -> None:
    """Weight-velocity attenuation after an optimizer step: ``theta <- theta_old + (theta-theta_old)/(1+lam*A)``.

    Arithmetic in fp64 for fp64 params (which are therefore not rounded through fp32), in fp32
    otherwise; the result is stored in the params' dtype."""
    op = _wva_attenuate.name
    check_tensor_lists(
        op, {"params": _P, "old_params": _P, "accum": _S}, params=params, old_params=old_params, accum=accum
    )
    lam = check_finite_scalar(op, "lam", lam, low=0.0)
    common_device(op, params)
    check_no_overlap(op, {"params": params}, {"old_params": old_params, "accum": accum})
    check_writable(op, params=params)
    _wva_attenuate(list(params), list(old_params), list(accum), lam, backend)
