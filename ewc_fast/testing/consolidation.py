"""Float64 reference implementations ("oracles") that every backend is tested against.

Each function here is written for clarity, not speed: inputs are copied to float64 (exact for every
supported dtype), the formula is applied elementwise in float64, and new tensors / Python floats are
returned; nothing passed in is modified. Tests compare the fast backends (``triton``, ``cpp``,
``torch``) with these functions.

Sections:

* Consolidation ops -- the five ops of :mod:`ewc_fast.ops.consolidation` and the naive per-task EWC
  penalty they must reproduce.
"""

from __future__ import annotations

import torch

__all__ = [
    "penalty_apply",
    "consolidate",
    "si_accumulate",
    "si_consolidate",
    "wva_attenuate",
    "naive_penalty_sum",
    "expanded_penalty_fp32",
]

_F64 = torch.float64


def _f64(tensors) -> list[torch.Tensor]:
    """Float64 copies (on CPU) of a list of tensors."""
    return [t.detach().to(device="cpu", dtype=_F64, copy=True) for t in tensors]


# =====================================================================================================
# Consolidation ops (reference for ewc_fast.ops.consolidation; formulas: docs/ARCHITECTURE.md and
# docs/CONSOLIDATION.md)
# =====================================================================================================


def penalty_apply(
    grads, params, omega, mu, lam: float, *, alpha: float | None = None, c: float = 0.0, grad_scale: float = 1.0
) -> tuple[list[torch.Tensor], float]:
    """Reference for ``ops.penalty_apply_``: returns ``(new_grads, value)`` in float64.

    ``W = omega`` (or ``omega / (1 + alpha*lam*omega)`` when ``alpha`` is given),
    ``new_grad = grad + grad_scale*lam*W*(theta - mu)``,
    ``value = (lam/2) * (sum W*(theta - mu)^2 + c)``.
    """
    new_grads = []
    s = 0.0
    for g, p, o, m in zip(_f64(grads), _f64(params), _f64(omega), _f64(mu)):
        w = o if alpha is None else o / (1.0 + alpha * lam * o)
        d = p - m
        new_grads.append(g + grad_scale * lam * w * d)
        s += float((w * d * d).sum())
    return new_grads, 0.5 * lam * (s + c)


def consolidate(
    omega, mu, fisher, anchor, gamma: float = 1.0, *, online: bool = False
) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """Reference for ``ops.consolidate_``: returns ``(new_omega, new_mu, increment)`` in float64.

    ``omega' = gamma*omega + F``. Online: ``mu' = anchor``, increment 0. Otherwise
    ``mu' = (gamma*omega*mu + F*anchor) / omega'`` (``anchor`` where ``omega' == 0``) and
    increment ``= sum(gamma*omega*(mu - mu')^2 + F*(anchor - mu')^2)``.
    """
    new_omega, new_mu = [], []
    inc = 0.0
    for o, m, f, a in zip(_f64(omega), _f64(mu), _f64(fisher), _f64(anchor)):
        go = gamma * o
        o2 = go + f
        if online:
            m2 = a.clone()
        else:
            nz = o2 != 0
            m2 = torch.where(nz, (go * m + f * a) / torch.where(nz, o2, 1.0), a)
            inc += float((go * (m - m2) ** 2 + f * (a - m2) ** 2).sum())
        new_omega.append(o2)
        new_mu.append(m2)
    return new_omega, new_mu, inc


def si_accumulate(omega_path, grads, params, prev_params) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Reference for ``ops.si_accumulate_``: returns ``(new_omega_path, new_prev_params)``.

    ``omega_path - g*(theta - prev)``; the new ``prev_params`` are the params (float64 copies).
    """
    new_w, new_prev = [], []
    for w, g, p, q in zip(_f64(omega_path), _f64(grads), _f64(params), _f64(prev_params)):
        new_w.append(w - g * (p - q))
        new_prev.append(p.clone())
    return new_w, new_prev


def si_consolidate(
    omega_path, params, start_params, out, xi: float, *, clip: bool = True
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """Reference for ``ops.si_consolidate_``: returns ``(new_omega_path, new_start_params, new_out)``.

    ``out + omega_path/((theta - start)^2 + xi)``, then ``max(., 0)`` if ``clip``; ``omega_path``
    becomes 0 and ``start_params`` the params.
    """
    new_w, new_start, new_out = [], [], []
    for w, p, s, o in zip(_f64(omega_path), _f64(params), _f64(start_params), _f64(out)):
        val = o + w / ((p - s) ** 2 + xi)
        if clip:
            val = torch.clamp(val, min=0.0)
        new_out.append(val)
        new_w.append(torch.zeros_like(w))
        new_start.append(p.clone())
    return new_w, new_start, new_out


def wva_attenuate(params, old_params, accum, lam: float) -> list[torch.Tensor]:
    """Reference for ``ops.wva_attenuate_``: returns the new params ``old + (theta - old)/(1 + lam*A)``."""
    return [q + (p - q) / (1.0 + lam * a) for p, q, a in zip(_f64(params), _f64(old_params), _f64(accum))]


def naive_penalty_sum(params, tasks, lam: float) -> tuple[float, list[torch.Tensor]]:
    """The EWC penalty in its per-task form, in float64, and its gradient.

    ``tasks`` is a sequence of ``(fisher, anchor)`` pairs, each a list of tensors shaped like
    ``params``. Returns ``(value, grads)`` with
    ``value = sum_K (lam/2) * sum_i F_K,i * (theta_i - theta*_K,i)^2`` and
    ``grads[i] = lam * sum_K F_K,i * (theta_i - theta*_K,i)``.
    (Decay ``gamma`` of older tasks is expressed by scaling their Fisher by ``gamma**age``.)
    """
    theta = _f64(params)
    value = 0.0
    grads = [torch.zeros_like(t) for t in theta]
    for fisher, anchor in tasks:
        for i, (f, a) in enumerate(zip(_f64(fisher), _f64(anchor))):
            d = theta[i] - a
            value += 0.5 * lam * float((f * d * d).sum())
            grads[i] += lam * f * d
    return value, grads


def expanded_penalty_fp32(params, tasks, lam: float) -> tuple[float, list[torch.Tensor]]:
    """NOT a reference: the expanded sigma-form of the per-task penalty evaluated in float32.

    ``(lam/2) * sum_i (theta^2 A - 2 theta B + C)`` with ``A = sum_K F_K``, ``B = sum_K F_K theta*_K``,
    ``C = sum_K F_K theta*_K^2`` (all fp32), gradient ``lam*(theta*A - B)``. This is the form of seed
    ``002_*`` (with its missing factor 2 restored, docs/CONSOLIDATION.md); it cancels
    catastrophically when theta is close to the anchors. Kept here so tests can show why
    ``(Omega, mu, c)`` is stored instead.
    """
    theta = [p.detach().float() for p in params]
    a = [torch.zeros_like(t) for t in theta]
    b = [torch.zeros_like(t) for t in theta]
    cc = [torch.zeros_like(t) for t in theta]
    for fisher, anchor in tasks:
        for i, (f, s) in enumerate(zip(fisher, anchor)):
            f, s = f.float(), s.float()
            a[i] += f
            b[i] += f * s
            cc[i] += f * s * s
    value = torch.zeros((), dtype=torch.float32)
    grads = []
    for t, ai, bi, ci in zip(theta, a, b, cc):
        value += (t * t * ai - 2.0 * t * bi + ci).sum()
        grads.append(lam * (t * ai - bi))
    return float(0.5 * lam * value), grads
