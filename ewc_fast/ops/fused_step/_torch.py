"""Pure-PyTorch implementation of the fused optimizer step (any device; the readable reference path).

Same signature and semantics as the C++ (:mod:`._cpp` -> ``csrc/fused_step.cpp``) and Triton
(:mod:`._triton` -> ``kernels/fused_step.py``) twins; inputs arrive validated and contiguous from the
op layer, with the derived scalars of ``h`` (see :func:`ewc_fast.ops.fused_step.step_scalars`).

Per element, in the parameter's arithmetic dtype ``ct`` (fp64 for fp64 parameters, else fp32; the
optimizer state is kept in ``ct``), with ``theta`` the parameter before the step:

1. ``g = grad * inv_scale`` (the task gradient, unscaled);
2. EWC: ``d = ct(theta - mu)`` (difference in promote(param, mu)), ``W = Omega`` or
   ``Omega/(1 + alpha*lam*Omega)``, ``g_tot = g + pen_scale*lam*W*d``; the penalty sum ``sum W*d^2``
   (per tensor in ``ct``, across tensors in fp64) is returned;
3. the update of ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` on ``g_tot`` (single-tensor formulas:
   ``lerp`` for the first moment, ``mul + addcmul`` for the second, ``addcdiv`` for the step),
   rounded to the parameter's dtype: ``theta_opt``;
4. WVA: ``theta_new = theta + (theta_opt - theta)/(1 + wva_lam*A)`` (else ``theta_opt``), rounded to
   the parameter's dtype;
5. SI: ``omega_si -= g_si * (theta_new - theta)`` with ``g_si = g`` (Zenke) or ``g_tot`` (Kutalev),
   the step actually stored.
"""

from __future__ import annotations

import torch

SGD, ADAM, ADAMW = 0, 1, 2


def _arith_dtype(param: torch.Tensor) -> torch.dtype:
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def fused_step(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, omega, mu, si_omega, wva_accum, h):
    """One optimizer step over every tensor (see the module doc); returns sum W*(theta-mu)^2 (0-dim fp64)."""
    device = params[0].device if params else torch.device("cpu")
    total = torch.zeros((), dtype=torch.float64, device=device)
    algo = h["algo"]
    for i, p in enumerate(params):
        ct = _arith_dtype(p)
        th = p.to(ct)
        g = grads[i].to(ct)
        if h["inv_scale"] != 1.0:
            g = g * h["inv_scale"]
        gt = g
        if omega:
            dt = torch.promote_types(p.dtype, mu[i].dtype)
            d = (p.to(dt) - mu[i].to(dt)).to(ct)
            w = omega[i].to(ct)
            if h["alpha"] is not None:
                w = w / (1.0 + (h["alpha"] * h["lam"]) * w)
            wd = w * d
            total += (wd * d).sum(dtype=ct).double()
            gt = g + (h["pen_scale"] * h["lam"]) * wd
        if algo == SGD:
            gg = gt
            if h["weight_decay"] != 0.0:
                gg = gg.add(th, alpha=h["weight_decay"])
            if exp_avg:
                buf = exp_avg[i]
                if h["momentum_init"]:
                    buf.copy_(gg)
                else:
                    buf.mul_(h["beta1"]).add_(gg, alpha=1.0 - h["dampening"])
                gg = gg.add(buf, alpha=h["beta1"]) if h["nesterov"] else buf
            new = th.add(gg, alpha=-h["lr"])
        else:
            gg = gt
            base = th
            if h["weight_decay"] != 0.0:
                if algo == ADAMW:
                    base = th.mul(h["decay"])
                else:
                    gg = gg.add(th, alpha=h["weight_decay"])
            m, v = exp_avg[i], exp_avg_sq[i]
            m.lerp_(gg, 1.0 - h["beta1"])
            v.mul_(h["beta2"]).addcmul_(gg, gg, value=1.0 - h["beta2"])
            if max_exp_avg_sq:
                torch.maximum(max_exp_avg_sq[i], v, out=max_exp_avg_sq[i])
                denom = (max_exp_avg_sq[i].sqrt() / h["bc2_sqrt"]).add_(h["eps"])
            else:
                denom = (v.sqrt() / h["bc2_sqrt"]).add_(h["eps"])
            new = base.addcdiv(m, denom, value=-h["step_size"])
        new_p = new.to(p.dtype)
        if wva_accum:
            nc = new_p.to(ct)
            new_p = (th + (nc - th) / (1.0 + h["wva_lam"] * wva_accum[i].to(ct))).to(p.dtype)
        if si_omega:
            gsi = gt if h["si_total"] else g
            si_omega[i].sub_(gsi * (new_p.to(ct) - th))
        p.copy_(new_p)
    return total
