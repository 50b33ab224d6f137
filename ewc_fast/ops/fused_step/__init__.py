"""The fused optimizer step: one pass over memory per training step, registered as ``ewc_fast::fused_step_``.

Per element, one read of ``theta``, ``grad``, the optimizer state and the consolidation state and one
write of ``theta``, the state and SI's ``omega``:

1. ``g = grad * inv_scale`` (gradients of a ``GradScaler``, unscaled in the step);
2. EWC penalty gradient (Kirkpatrick et al. 2017): ``g_tot = g + pen_scale*lam*W*(theta - mu)`` with
   ``W = Omega`` or the stabilised ``Omega/(1 + alpha*lam*Omega)`` (Kutalev & Lapina 2021);
3. the update of ``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay), ``Adam`` or
   ``AdamW`` (amsgrad), with ``torch.optim``'s single-tensor formulas, on ``g_tot``;
4. WVA (Kutalev 2020): ``theta <- theta_old + (theta_opt - theta_old)/(1 + wva_lam*A)``;
5. SI (Zenke et al. 2017): ``omega_si -= g_si * (theta_new - theta_old)``, ``g_si = g`` (Zenke: task
   gradient) or ``g_tot`` (Kutalev: total gradient), with the step actually stored -- no
   ``theta_prev`` copy;
6. returns the penalty ``(lam/2)(sum W (theta_old - mu)^2 + c)`` (partial sums per block in the
   arithmetic dtype, added in fp64), 0 without EWC.

Arithmetic in fp64 for fp64 parameters, fp32 otherwise; the optimizer state is kept in that dtype
(fp32 state for fp32/bf16/fp16 parameters). The lists of the optional features are empty when the
feature is off, or hold one tensor per parameter. Backends: ``_torch.py`` (the readable twin),
``_cpp.py`` (``csrc/fused_step.cpp``), ``_triton.py`` (``kernels/fused_step.py``). The optimizers
built on it are in :mod:`ewc_fast.optim`; docs/OPTIM.md.
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

__all__ = ["fused_step_", "ALGOS", "step_scalars"]

_FAMILY = "fused_step"
#: algorithm name -> code passed to the backends
ALGOS = {"sgd": 0, "adam": 1, "adamw": 2}


def step_scalars(
    algo: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    dampening: float,
    nesterov: bool,
    step: int,
    momentum_init: bool,
    lam: float,
    alpha: float | None,
    pen_scale: float,
    si_total: bool,
    wva_lam: float,
    inv_scale: float,
) -> dict:
    """The scalars every backend reads (``h``), derived once in fp64 as ``torch.optim`` derives them:
    ``step_size = lr/(1 - beta1^step)``, ``bc2_sqrt = (1 - beta2^step)^0.5``, ``decay = 1 - lr*weight_decay``."""
    h = {
        "algo": algo,
        "lr": lr,
        "beta1": beta1,
        "beta2": beta2,
        "eps": eps,
        "weight_decay": weight_decay,
        "dampening": dampening,
        "nesterov": nesterov,
        "momentum_init": momentum_init,
        "lam": lam,
        "alpha": alpha,
        "pen_scale": pen_scale,
        "si_total": si_total,
        "wva_lam": wva_lam,
        "inv_scale": inv_scale,
        "step_size": 0.0,
        "bc2_sqrt": 1.0,
        "decay": 1.0 - lr * weight_decay,
    }
    if algo != ALGOS["sgd"]:
        h["step_size"] = lr / (1 - beta1**step)
        h["bc2_sqrt"] = (1 - beta2**step) ** 0.5
    return h


@define_op(
    "fused_step_",
    mutates=("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "si_omega"),
    result="scalar",
    device_arg="params",
)
def _fused_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor],
    exp_avg_sq: list[Tensor],
    max_exp_avg_sq: list[Tensor],
    omega: list[Tensor],
    mu: list[Tensor],
    si_omega: list[Tensor],
    wva_accum: list[Tensor],
    algo: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    dampening: float,
    nesterov: bool,
    step: int,
    momentum_init: bool,
    lam: float,
    alpha: float | None,
    c: float,
    pen_scale: float,
    si_total: bool,
    wva_lam: float,
    inv_scale: float,
    backend: str,
) -> Tensor:
    device = op_device(params)
    impl = resolve_impl(backend, _FAMILY, device)
    h = step_scalars(
        algo, lr, beta1, beta2, eps, weight_decay, dampening, nesterov, step, momentum_init, lam, alpha,
        pen_scale, si_total, wva_lam, inv_scale,
    )  # fmt: skip
    with (
        contiguous_inout(params) as p,
        contiguous_inout(exp_avg) as m,
        contiguous_inout(exp_avg_sq) as v,
        contiguous_inout(max_exp_avg_sq) as vm,
        contiguous_inout(si_omega) as w,
    ):
        s = impl.fused_step(
            p, contiguous_in(grads), m, v, vm, contiguous_in(omega), contiguous_in(mu), w, contiguous_in(wva_accum), h
        )
    bump_versions(params, exp_avg, exp_avg_sq, max_exp_avg_sq, si_omega)  # raw-pointer writes: tell autograd
    if not omega:
        return torch.zeros((), dtype=torch.float64, device=device)
    return (0.5 * lam) * (s.to(device=device, dtype=torch.float64) + c)


def _arith(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def fused_step_(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avg: list[Tensor] = (),
    exp_avg_sq: list[Tensor] = (),
    max_exp_avg_sq: list[Tensor] = (),
    *,
    algo: str,
    lr: float,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step: int = 1,
    momentum_init: bool = False,
    omega: list[Tensor] = (),
    mu: list[Tensor] = (),
    lam: float = 0.0,
    alpha: float | None = None,
    c: float = 0.0,
    pen_scale: float = 1.0,
    si_omega: list[Tensor] = (),
    si_variant: str = "zenke",
    wva_accum: list[Tensor] = (),
    wva_lam: float = 0.0,
    inv_scale: float = 1.0,
    backend: str = "auto",
) -> Tensor:
    """One fused optimizer step over ``params`` in place (see the module doc for the formula).

    ``algo``: ``"sgd"`` (``exp_avg`` = momentum buffers, empty iff ``momentum == 0``;
    ``momentum_init=True`` on the buffers' first step, where ``torch.optim.SGD`` sets ``buf = g``),
    ``"adam"`` or ``"adamw"`` (``exp_avg``, ``exp_avg_sq``, and ``max_exp_avg_sq`` non-empty iff
    amsgrad; ``step`` is the 1-based step count of the bias corrections). Optimizer state tensors
    have the parameter's arithmetic dtype (fp64 for fp64 parameters, else fp32). EWC: ``omega``
    (fp32/fp64), ``mu`` (fp32/fp64), ``lam``, ``alpha`` (stabilised EWC), ``c``, ``pen_scale``
    (multiplies the penalty gradient, e.g. a clipping coefficient). SI: ``si_omega`` (fp32/fp64,
    ``si_variant`` ``"zenke"`` or ``"kutalev"``). WVA: ``wva_accum`` (fp32/fp64) and ``wva_lam``.
    ``grads`` have the parameters' dtype and are read only. Everything is validated before the
    first write (mutated tensors may not overlap any other operand). Returns the penalty value as a
    0-dim float64 tensor on the parameters' device (0 without EWC).
    """
    op = _fused_step.name
    if algo not in ALGOS:
        raise ValueError(f"{op}: algo must be one of {sorted(ALGOS)}, got {algo!r}")
    if si_variant not in ("zenke", "kutalev"):
        raise ValueError(f"{op}: si_variant must be 'zenke' or 'kutalev', got {si_variant!r}")
    params, grads = list(params), list(grads)
    n = check_tensor_lists(op, {"params": PARAM_DTYPES, "grads": PARAM_DTYPES}, params=params, grads=grads)
    for i in range(n):
        if grads[i].dtype != params[i].dtype:
            raise TypeError(f"{op}: grads[{i}] dtype {grads[i].dtype} != params dtype {params[i].dtype}")
    lr = check_finite_scalar(op, "lr", lr, low=0.0)
    weight_decay = check_finite_scalar(op, "weight_decay", weight_decay, low=0.0)
    inv_scale = check_finite_scalar(op, "inv_scale", inv_scale, low=0.0, low_open=True)
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"{op}: step must be an int >= 1, got {step!r}")
    code = ALGOS[algo]
    sgd = algo == "sgd"
    if sgd:
        beta1 = check_finite_scalar(op, "momentum", momentum, low=0.0)
        beta2 = 0.0
        dampening = check_finite_scalar(op, "dampening", dampening, low=0.0, high=1.0)
        if nesterov and (beta1 <= 0 or dampening != 0):
            raise ValueError(f"{op}: nesterov needs momentum > 0 and dampening == 0 (as torch.optim.SGD)")
        eps = 0.0
        want = {"exp_avg": beta1 != 0, "exp_avg_sq": False, "max_exp_avg_sq": False}
    else:
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{op}: betas must be a pair, got {betas!r}")
        beta1 = check_finite_scalar(op, "betas[0]", betas[0], low=0.0)
        beta2 = check_finite_scalar(op, "betas[1]", betas[1], low=0.0)
        if beta1 >= 1 or beta2 >= 1:
            raise ValueError(f"{op}: betas must be in [0, 1), got {tuple(betas)}")
        eps = check_finite_scalar(op, "eps", eps, low=0.0)
        dampening = 0.0
        nesterov = False
        want = {"exp_avg": True, "exp_avg_sq": True, "max_exp_avg_sq": None}
    state = {"exp_avg": list(exp_avg), "exp_avg_sq": list(exp_avg_sq), "max_exp_avg_sq": list(max_exp_avg_sq)}
    for name, lst in state.items():
        need = want[name]
        if need is None:
            need = bool(lst)
        if (need and len(lst) != n) or (not need and lst):
            what = f"{n} tensors (one per parameter)" if need else "empty"
            raise ValueError(f"{op}: {name} must be {what} for algo={algo!r}, got {len(lst)}")
        for i, t in enumerate(lst):
            if t.dtype != _arith(params[i]):
                raise TypeError(
                    f"{op}: {name}[{i}] has dtype {t.dtype}; optimizer state of a {params[i].dtype} parameter "
                    f"is {_arith(params[i])}"
                )
    opt = {"omega": list(omega), "mu": list(mu), "si_omega": list(si_omega), "wva_accum": list(wva_accum)}
    for name, lst in opt.items():
        if lst and len(lst) != n:
            raise ValueError(f"{op}: {name} must be empty or hold {n} tensors (one per parameter), got {len(lst)}")
    if bool(opt["omega"]) != bool(opt["mu"]):
        raise ValueError(f"{op}: omega and mu go together (both empty or both one per parameter)")
    full = {"params": params, "grads": grads, **{k: v for k, v in {**state, **opt}.items() if v}}
    dtypes = {"params": PARAM_DTYPES, "grads": PARAM_DTYPES, "omega": STATE_DTYPES, "mu": STATE_DTYPES}
    dtypes.update({k: STATE_DTYPES for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "si_omega", "wva_accum")})
    check_tensor_lists(op, {k: dtypes[k] for k in full}, **full)
    lam = check_finite_scalar(op, "lam", lam, low=0.0)
    if alpha is not None:
        alpha = check_finite_scalar(op, "alpha", alpha, low=0.0)
    c = check_finite_scalar(op, "c", c)
    pen_scale = check_finite_scalar(op, "pen_scale", pen_scale)
    wva_lam = check_finite_scalar(op, "wva_lam", wva_lam, low=0.0)
    common_device(op, params)
    mutated = ("params", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "si_omega")
    written = {k: v for k, v in full.items() if k in mutated}
    check_no_overlap(op, written, {k: v for k, v in full.items() if k not in mutated})
    check_writable(op, **written)
    return _fused_step(
        params, grads, state["exp_avg"], state["exp_avg_sq"], state["max_exp_avg_sq"],
        opt["omega"], opt["mu"], opt["si_omega"], opt["wva_accum"],
        code, lr, beta1, beta2, eps, weight_decay, dampening, bool(nesterov), step, bool(momentum_init),
        lam, alpha, c, pen_scale, si_variant == "kutalev", wva_lam, inv_scale, backend,
    )  # fmt: skip
