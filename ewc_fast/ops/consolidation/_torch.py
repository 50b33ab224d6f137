"""Pure-PyTorch implementations of the consolidation ops (any device; the readable reference path).

Every function here has the exact signature and semantics of its C++ (:mod:`._cpp` ->
``csrc/consolidation.cpp``) and Triton (:mod:`._triton` -> ``kernels/consolidation.py``) twins; inputs
arrive validated and contiguous from the op layer.
Arithmetic: fp32 for fp32/bf16/fp16 parameters and fp64 for fp64 parameters (:func:`_arith_dtype`),
except ``theta - mu``, taken in the promoted dtype of the parameter and mu (fp64 mu keeps the anchor
exact), and ``consolidate``, which works in fp64 throughout.
"""

from __future__ import annotations

import torch


def _arith_dtype(param: torch.Tensor) -> torch.dtype:
    """Arithmetic dtype of the elementwise ops on ``param``: fp64 for fp64 parameters (rounding them
    through fp32 would lose their precision at every call), else fp32."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def _weight(omega: torch.Tensor, lam: float, alpha: float | None, dtype: torch.dtype) -> torch.Tensor:
    w = omega.to(dtype)
    if alpha is not None:
        w = w / (1.0 + (alpha * lam) * w)
    return w


def penalty_apply(grads, params, omega, mu, lam, alpha, grad_scale):
    """grad += grad_scale*lam*W*(theta-mu); returns sum(W*(theta-mu)^2) as a 0-dim fp64 tensor.

    W = omega, or omega/(1+alpha*lam*omega) when stabilised (alpha is not None). Arithmetic and the
    per-tensor partial sum in the parameter's arithmetic dtype; ``theta - mu`` in the promoted dtype of
    theta and mu, then converted to it.
    """
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for g, p, o, m in zip(grads, params, omega, mu):
        ct = _arith_dtype(p)
        dt = torch.promote_types(p.dtype, m.dtype)
        d = (p.to(dt) - m.to(dt)).to(ct)
        w = _weight(o, lam, alpha, ct)
        wd = w * d
        g.add_((grad_scale * lam) * wd)
        total += (wd * d).sum(dtype=ct).double()
    return total


def consolidate(omega, mu, fisher, anchor, gamma, online):
    """Merge a task (F, theta*) into (Omega, mu) in place, fp64 arithmetic; returns the c increment.

    Omega' = gamma*Omega + F. Separate: mu' = (gamma*Omega*mu + F*theta*)/Omega' (theta* where
    Omega' = 0), increment = sum(gamma*Omega*(mu-mu')^2 + F*(theta*-mu')^2). Online: mu' = theta*,
    increment 0 (the caller resets c).
    """
    device = omega[0].device if omega else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    for o, m, f, a in zip(omega, mu, fisher, anchor):
        o64, m64, f64, a64 = o.double(), m.double(), f.double(), a.double()
        go = gamma * o64
        o_new = go + f64
        if online:
            m_new = a64
        else:
            # anchor only where Omega' == 0 (contract): with signed importances (e.g. unclipped SI)
            # a negative Omega' still merges exactly, while mu' = anchor there would change the penalty
            nz = o_new != 0
            safe = torch.where(nz, o_new, torch.ones_like(o_new))
            m_new = torch.where(nz, (go * m64 + f64 * a64) / safe, a64)
            total += (go * (m64 - m_new) ** 2 + f64 * (a64 - m_new) ** 2).sum()
        o.copy_(o_new)
        m.copy_(m_new)
    return total


def si_accumulate(omega_path, grads, params, prev_params):
    """omega_path -= g*(theta - theta_prev); theta_prev <- theta (product in the parameter's arithmetic dtype)."""
    for w, g, p, q in zip(omega_path, grads, params, prev_params):
        ct = _arith_dtype(p)
        # an fp64 product into an fp32 omega_path is subtracted in fp64 and rounded once (torch's
        # in-place type promotion), as the C++ and Triton kernels do
        w.sub_(g.to(ct) * (p.to(ct) - q.to(ct)))
        q.copy_(p)


def si_consolidate(omega_path, params, start_params, out, xi, clip):
    """out += omega_path/((theta-theta_start)^2 + xi), clipped at 0 if ``clip``; omega_path <- 0; theta_start <- theta.

    Arithmetic in the parameter's arithmetic dtype (fp64 for fp64 parameters, else fp32)."""
    for w, p, s, o in zip(omega_path, params, start_params, out):
        ct = _arith_dtype(p)
        delta = p.to(ct) - s.to(ct)
        val = o.to(ct) + w.to(ct) / (delta * delta + xi)
        if clip:
            val = val.clamp_min(0.0)
        o.copy_(val)
        w.zero_()
        s.copy_(p)


def wva_attenuate(params, old_params, accum, lam):
    """theta <- theta_old + (theta - theta_old)/(1 + lam*A) (fp64 arithmetic for fp64 parameters, else fp32)."""
    for p, q, a in zip(params, old_params, accum):
        ct = _arith_dtype(p)
        qc = q.to(ct)
        p.copy_(qc + (p.to(ct) - qc) / (1.0 + lam * a.to(ct)))
