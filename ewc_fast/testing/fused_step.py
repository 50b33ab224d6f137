"""Float64 oracle of the fused optimizer step (:func:`ewc_fast.ops.fused_step_`).

Written from the formulas of ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` (their documentation's
algorithm boxes), the EWC penalty gradient ``lam*W*(theta - mu)``, WVA's
``theta_old + (theta_opt - theta_old)/(1 + lam*A)`` and SI's ``omega -= g*(theta_new - theta_old)``:
inputs copied to float64, every operation in float64, the new parameter rounded to the parameter's
dtype where the step stores it (after the update, and after WVA) -- the step SI sees is the stored one.
Nothing passed in is modified; returns new tensors. Shares no code with what it checks.
"""

from __future__ import annotations

import torch

__all__ = ["fused_step"]

_F64 = torch.float64


def fused_step(
    params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, *, algo, lr, momentum=0.0, dampening=0.0, nesterov=False,
    betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, step=1, momentum_init=False, omega=(), mu=(), lam=0.0,
    alpha=None, c=0.0, pen_scale=1.0, si_omega=(), si_variant="zenke", wva_accum=(), wva_lam=0.0, inv_scale=1.0,
):  # fmt: skip
    """Returns ``(params, exp_avg, exp_avg_sq, max_exp_avg_sq, si_omega, penalty)`` after one step
    (new float64 tensors, params rounded through their dtype; penalty a Python float)."""
    out_p, out_m, out_v, out_vm, out_si = [], [], [], [], []
    total = 0.0
    b1, b2 = betas
    for i, p in enumerate(params):
        th = p.to(_F64)
        g = grads[i].to(_F64) * inv_scale
        gt = g
        if omega:
            w = omega[i].to(_F64)
            if alpha is not None:
                w = w / (1 + alpha * lam * w)
            d = th - mu[i].to(_F64)
            total += float((w * d * d).sum())
            gt = g + pen_scale * lam * w * d
        if algo == "sgd":
            gg = gt + weight_decay * th
            if momentum != 0:
                buf = gg.clone() if momentum_init else momentum * exp_avg[i].to(_F64) + (1 - dampening) * gg
                out_m.append(buf)
                gg = gg + momentum * buf if nesterov else buf
            new = th - lr * gg
        else:
            base = th * (1 - lr * weight_decay) if algo == "adamw" else th
            gg = gt if algo == "adamw" else gt + weight_decay * th
            m = b1 * exp_avg[i].to(_F64) + (1 - b1) * gg
            v = b2 * exp_avg_sq[i].to(_F64) + (1 - b2) * gg * gg
            out_m.append(m)
            out_v.append(v)
            vx = v
            if max_exp_avg_sq:
                vx = torch.maximum(max_exp_avg_sq[i].to(_F64), v)
                out_vm.append(vx)
            mhat = m / (1 - b1**step)
            denom = vx.sqrt() / (1 - b2**step) ** 0.5 + eps
            new = base - lr * mhat / denom
        new = new.to(p.dtype).to(_F64)
        if wva_accum:
            new = (th + (new - th) / (1 + wva_lam * wva_accum[i].to(_F64))).to(p.dtype).to(_F64)
        if si_omega:
            gsi = gt if si_variant == "kutalev" else g
            out_si.append(si_omega[i].to(_F64) - gsi * (new - th))
        out_p.append(new)
    penalty = 0.5 * lam * (total + c) if omega else 0.0
    return out_p, out_m, out_v, out_vm, out_si, penalty
