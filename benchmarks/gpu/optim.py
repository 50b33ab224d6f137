"""Fused optimizer step table: ``ewc_fast.ops.fused_step_`` (AdamW + EWC penalty + SI in one pass,
Triton backend) against torch's ``AdamW(fused=True)`` step and against today's three passes.

Same parameters as the consolidation table (``cons_params`` fp32 in ``cons_tensors`` ragged tensors),
EWC state as EWC keeps it (Omega fp32, mu fp64), SI's omega fp32. Bytes per parameter:

* torch ``AdamW(fused=True).step()``: read p, g, m, v; write p, m, v = 28 B;
* fused AdamW+EWC+SI: read p, g, m, v, Omega, omega (fp32), mu (fp64); write p, m, v, omega = 48 B;
* today's path, three passes: ``penalty_apply_`` (24 B) + torch fused AdamW (28 B) +
  ``si_accumulate_`` with its theta_prev copy (24 B) = 76 B.

Target: fused step <= 1.8 x torch's fused AdamW step (the extra state traffic only: 48 / 28 = 1.71).
"""

from __future__ import annotations

import torch

from ewc_fast import ops

from ..bench_consolidation import ragged_sizes
from .sizes import Sizes
from .timing import Rotor, rotation, time_sized

TARGET = 1.8
BYTES = {
    "torch AdamW(fused=True).step()": (28, "read p, g, m, v; write p, m, v"),
    "fused_step_ AdamW+EWC+SI": (48, "read p, g, m, v, Omega, omega, mu (fp64); write p, m, v, omega"),
    "today: penalty_apply_ + AdamW(fused) + si_accumulate_": (76, "24 + 28 + 24 B in three passes"),
}


def _sets(device, sizes: Sizes, n: int) -> list[dict]:
    shapes = ragged_sizes(sizes.cons_params, sizes.cons_tensors)
    g = torch.Generator(device=device).manual_seed(1)
    out = []
    for _ in range(n):

        def f32(pos=False, scale=1.0):
            return [
                (torch.rand(s, device=device, generator=g) if pos else torch.randn(s, device=device, generator=g))
                * scale
                for s in shapes
            ]

        theta = f32()
        s = {
            "theta": theta,
            "g": f32(scale=0.01),
            "m": f32(scale=0.01),
            "v": f32(pos=True, scale=1e-4),
            "omega": f32(pos=True),
            "mu": [t.double() for t in f32()],
            "si": f32(scale=0.0),
            "prev": [t.clone() for t in theta],
        }
        params = [torch.nn.Parameter(t) for t in theta]
        for p, gr in zip(params, s["g"]):
            p.grad = gr
        s["adamw"] = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, fused=True)
        out.append(s)
    return out


def _fused(s):
    return ops.fused_step_(
        s["theta"], s["g"], s["m"], s["v"], algo="adamw", lr=1e-4, weight_decay=0.01, step=1,
        omega=s["omega"], mu=s["mu"], lam=0.5, si_omega=s["si"], backend="triton",
    )  # fmt: skip


def _today(s):
    ops.penalty_apply_(s["g"], s["theta"], s["omega"], s["mu"], 0.5, backend="triton")
    s["adamw"].step()
    ops.si_accumulate_(s["si"], s["g"], s["theta"], s["prev"], backend="triton")


def rows(device, sizes: Sizes, budget, copy_gb_s: float | None) -> tuple[list[dict], list[str]]:
    per_set = sizes.cons_params * (4 * 8 + 8)
    sets = _sets(device, sizes, rotation(per_set, device))
    fns = {
        "torch AdamW(fused=True).step()": lambda s: s["adamw"].step(),
        "fused_step_ AdamW+EWC+SI": _fused,
        "today: penalty_apply_ + AdamW(fused) + si_accumulate_": _today,
    }
    times, cut = {}, []
    for name, fn in fns.items():
        if budget.expired():
            cut.append(name)
            continue
        times[name] = time_sized(Rotor(fn, sets), device, sizes)
    adam = times.get("torch AdamW(fused=True).step()")
    out = []
    for name, t in times.items():
        bpp, what = BYTES[name]
        gbs = bpp * sizes.cons_params / t / 1e9
        row = {
            "key": name,
            "params": sizes.cons_params,
            "bytes_per_param": bpp,
            "bytes_model": what,
            "seconds": t,
            "gb_s": gbs,
            "copy_share": gbs / copy_gb_s if copy_gb_s else None,
            "vs_adamw": t / adam if adam else None,
        }
        if name == "fused_step_ AdamW+EWC+SI":
            row["target"] = TARGET
            row["met"] = None if row["vs_adamw"] is None else row["vs_adamw"] <= TARGET
        out.append(row)
    return out, cut
