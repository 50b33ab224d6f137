"""C++ backend of the fused optimizer step: tensor lists -> pointer lists for ``ewc_fast._C.fused_step``.

Same signature and semantics as :mod:`ewc_fast.ops.fused_step._torch`; inputs arrive validated and
contiguous. Tensors are grouped by (parameter dtype, SI omega dtype); each group is one call into the
extension (fixed-size chunks on ``torch.get_num_threads()`` OpenMP threads). Zero-element tensors are
skipped. Read-only Omega and WVA's A are handed over in the arithmetic dtype and mu in float64,
converted when stored otherwise: the torch twin converts them to exactly those values before any
arithmetic, so results are unchanged (the defaults -- fp32 Omega and A, fp64 mu -- need no copy).
"""

from __future__ import annotations

import torch

from .._cpp_ext import dtype_code, ext, num_threads, ptrs


def _arith(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _as(tensors, dtype):
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


def fused_step(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, omega, mu, si_omega, wva_accum, h):
    """One optimizer step over every tensor; returns sum W*(theta-mu)^2 (0-dim fp64)."""
    C, nt = ext(), num_threads()
    device = params[0].device if params else torch.device("cpu")
    live = [i for i, p in enumerate(params) if p.numel() > 0]
    groups: dict = {}
    for i in live:
        groups.setdefault((params[i].dtype, si_omega[i].dtype if si_omega else None), []).append(i)
    hd = dict(h)
    hd["al"] = 0.0 if h["alpha"] is None else h["alpha"] * h["lam"]
    hd["stab"] = h["alpha"] is not None
    hd["momentum"] = bool(exp_avg) and h["algo"] == 0
    hd["amsgrad"] = bool(max_exp_avg_sq)
    hd["wva"] = bool(wva_accum)
    total = 0.0
    for (_, sd), idx in groups.items():
        ct = _arith(params[idx[0]])

        def pick(lst, idx=idx):
            return ptrs([lst[i] for i in idx]) if lst else []

        # keep converted read-only tensors alive for the call
        om = _as([omega[i] for i in idx], ct) if omega else []
        mu64 = _as([mu[i] for i in idx], torch.float64) if mu else []
        acc = _as([wva_accum[i] for i in idx], ct) if wva_accum else []
        total += C.fused_step(
            pick(params),
            pick(grads),
            pick(exp_avg),
            pick(exp_avg_sq),
            pick(max_exp_avg_sq),
            ptrs(om),
            ptrs(mu64),
            pick(si_omega),
            ptrs(acc),
            [params[i].numel() for i in idx],
            dtype_code(params[idx[0]]),
            0 if sd is None else dtype_code(si_omega[idx[0]]),
            hd,
            nt,
        )
    return torch.tensor(total, dtype=torch.float64, device=device)
