"""C++ backend of the consolidation ops: thin wrappers turning tensor lists into pointer lists.

Same function names, signatures and return values as :mod:`ewc_fast.ops.consolidation._torch`; inputs arrive
validated and contiguous from the op layer. Tensors are grouped by their dtype combination and each
group is one call into ``ewc_fast._C`` (which splits the work of all its tensors into fixed-size
chunks and runs them on ``torch.get_num_threads()`` OpenMP threads). Zero-element tensors are skipped.

Read-only inputs whose dtypes do not match the combinations compiled in C++ (e.g. a float32 fisher
with a bfloat16 anchor) are cast to float64 for the call: every supported dtype converts to float64
exactly, and the kernels' own arithmetic (fp32 or fp64) then sees the same values, so results are
unchanged. The arithmetic is chosen by the parameters' own dtype (fp64 for fp64 parameters, else
fp32); where the parameters themselves may have been cast (``si_accumulate``, ``si_consolidate``),
that choice is passed explicitly (``fp64_math``).
"""

from __future__ import annotations

import torch

from .._cpp_ext import dtype_code, ext, num_threads, ptrs


def _groups(n: int, key) -> dict:
    """Indices 0..n-1 grouped by ``key(i)`` (insertion ordered, so the reduction order is fixed)."""
    out: dict = {}
    for i in range(n):
        out.setdefault(key(i), []).append(i)
    return out


def _nonempty(tensors) -> list[int]:
    return [i for i, t in enumerate(tensors) if t.numel() > 0]


def _f64(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    return [t.to(torch.float64) for t in tensors]


def _pick(tensors, idx):
    return [tensors[i] for i in idx]


def _numels(tensors) -> list[int]:
    return [t.numel() for t in tensors]


def _device(tensors) -> torch.device:
    return tensors[0].device if tensors else torch.device("cpu")


def penalty_apply(grads, params, omega, mu, lam, alpha, grad_scale):
    """grad += grad_scale*lam*W*(theta-mu); returns sum(W*(theta-mu)^2) as a 0-dim fp64 tensor."""
    C, nt = ext(), num_threads()
    live = _nonempty(params)
    total = 0.0
    groups = _groups(len(live), lambda j: (params[live[j]].dtype, omega[live[j]].dtype, mu[live[j]].dtype))
    for js in groups.values():
        idx = [live[j] for j in js]
        g, p, o, m = (_pick(x, idx) for x in (grads, params, omega, mu))
        total += C.penalty_apply(
            ptrs(g),
            ptrs(p),
            ptrs(o),
            ptrs(m),
            _numels(p),
            dtype_code(p[0]),
            dtype_code(o[0]),
            dtype_code(m[0]),
            float(lam),
            None if alpha is None else float(alpha),
            float(grad_scale),
            nt,
        )
    return torch.tensor(total, dtype=torch.float64, device=_device(params))


def consolidate(omega, mu, fisher, anchor, gamma, online):
    """Merge a task (F, theta*) into (Omega, mu) in place, fp64 arithmetic; returns the c increment."""
    C, nt = ext(), num_threads()
    live = _nonempty(omega)
    total = 0.0
    groups = _groups(
        len(live), lambda j: (omega[live[j]].dtype, mu[live[j]].dtype, fisher[live[j]].dtype, anchor[live[j]].dtype)
    )
    for (_, _, fd, ad), js in groups.items():
        idx = [live[j] for j in js]
        o, m, f, a = (_pick(x, idx) for x in (omega, mu, fisher, anchor))
        if fd != ad:  # one compiled input dtype: float64 holds both exactly
            f, a = _f64(f), _f64(a)
        total += C.consolidate(
            ptrs(o),
            ptrs(m),
            ptrs(f),
            ptrs(a),
            _numels(o),
            dtype_code(o[0]),
            dtype_code(m[0]),
            dtype_code(f[0]),
            float(gamma),
            bool(online),
            nt,
        )
    return torch.tensor(total, dtype=torch.float64, device=_device(omega))


def si_accumulate(omega_path, grads, params, prev_params):
    """omega_path -= g*(theta - theta_prev); theta_prev <- theta (fp64 arithmetic for fp64 params, else fp32)."""
    C, nt = ext(), num_threads()
    live = _nonempty(params)
    groups = _groups(
        len(live),
        lambda j: (omega_path[live[j]].dtype, prev_params[live[j]].dtype, grads[live[j]].dtype, params[live[j]].dtype),
    )
    for (_, qd, gd, pd), js in groups.items():
        idx = [live[j] for j in js]
        w, g, p, q = (_pick(x, idx) for x in (omega_path, grads, params, prev_params))
        if not (gd == pd == qd):  # kernels take grads/params in prev's dtype or in float64
            g, p = _f64(g), _f64(p)
        C.si_accumulate(
            ptrs(w),
            ptrs(g),
            ptrs(p),
            ptrs(q),
            _numels(w),
            dtype_code(w[0]),
            dtype_code(q[0]),
            dtype_code(p[0]),
            pd == torch.float64,
            nt,
        )


def si_consolidate(omega_path, params, start_params, out, xi, clip):
    """out += omega_path/((theta-theta_start)^2 + xi), clipped at 0 if ``clip``; omega_path <- 0;
    theta_start <- theta."""
    C, nt = ext(), num_threads()
    live = _nonempty(params)
    groups = _groups(
        len(live),
        lambda j: (omega_path[live[j]].dtype, out[live[j]].dtype, start_params[live[j]].dtype, params[live[j]].dtype),
    )
    for (_, _, qd, pd), js in groups.items():
        idx = [live[j] for j in js]
        w, p, s, o = (_pick(x, idx) for x in (omega_path, params, start_params, out))
        if pd != qd:
            p = _f64(p)
        C.si_consolidate(
            ptrs(w),
            ptrs(p),
            ptrs(s),
            ptrs(o),
            _numels(w),
            dtype_code(w[0]),
            dtype_code(o[0]),
            dtype_code(s[0]),
            dtype_code(p[0]),
            float(xi),
            bool(clip),
            pd == torch.float64,
            nt,
        )


def wva_attenuate(params, old_params, accum, lam):
    """theta <- theta_old + (theta - theta_old)/(1 + lam*A) (fp64 arithmetic for fp64 params, else fp32)."""
    C, nt = ext(), num_threads()
    live = _nonempty(params)
    groups = _groups(len(live), lambda j: (params[live[j]].dtype, old_params[live[j]].dtype, accum[live[j]].dtype))
    for (pd, rd, _), js in groups.items():
        idx = [live[j] for j in js]
        p, r, a = (_pick(x, idx) for x in (params, old_params, accum))
        if rd != pd:
            r = _f64(r)
        C.wva_attenuate(
            ptrs(p), ptrs(r), ptrs(a), _numels(p), dtype_code(p[0]), dtype_code(r[0]), dtype_code(a[0]), float(lam), nt
        )
