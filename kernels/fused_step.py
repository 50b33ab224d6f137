"""Triton kernel of the fused optimizer step (SGD / Adam / AdamW + EWC penalty + SI + WVA), multi-tensor.

Same signature and semantics as :mod:`ewc_fast.ops.fused_step._torch` (the readable twin). One launch
per dtype group (``kernels/multi_tensor.py``: device pointer table, cached per set of tensors); the
operands present (parameters, gradients, then the optimizer state, Omega/mu, SI's omega, WVA's A as
the call has them) are indexed by ``tl.constexpr`` positions, and every feature flag is a
``tl.constexpr``, so each combination compiles to a straight-line kernel. Scalars come from one small
fp64 device tensor (exact for fp64 groups, rounded once to fp32 for the others, as torch rounds Python
scalars in fp32 kernels). fp32 divisions and square roots are correctly rounded (``tl.div_rn``,
``tl.sqrt_rn``); launches use ``enable_fp_fusion=False``. The penalty sum is one partial per chunk
(in the arithmetic type, stored fp64) summed in fp64.

Memory traffic per element (fp32 parameters, fp32 state, fp32 Omega, fp64 mu, fp32 SI omega):
AdamW + EWC + SI reads theta, g, m, v, Omega (4 B each), mu (8 B), omega (4 B) = 32 B and writes
theta, m, v, omega = 16 B: 48 B, against 28 B for a bare Adam step and 28 + 20 (penalty_apply) +
24 (si_accumulate) = 72 B for the three separate passes. SGD with momentum + EWC + SI: 28 + 12 = 40 B
(bare: 12 + 8 = 20 B).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .consolidation import _div, _to
from .multi_tensor import (
    build_plan,
    chunk_of,
    device_guard,
    launch_options,
    load_chunk,
    operand_ptr,
    store_chunk,
    triton_interpreter,
)

CUDA_CONFIG = (1024, 4)
INTERPRETER_BLOCK = 256

# scalar slots of the fp64 scalar tensor
_SLOTS = (
    "lr", "beta1", "beta2", "eps", "weight_decay", "damp1", "step_size", "bc2_sqrt", "decay", "lerp_w",
    "addcmul_w", "pen", "al", "wva_lam", "inv_scale",
)  # fmt: skip


@triton.jit
def _sqrt(x, C_TY: tl.constexpr):
    if C_TY == tl.float64:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _step_block(
    meta, rec, start, offs, rem, scal,
    P_TY: tl.constexpr, C_TY: tl.constexpr, S_TY: tl.constexpr,
    J_M: tl.constexpr, J_V: tl.constexpr, J_VM: tl.constexpr, J_OM: tl.constexpr, J_MU: tl.constexpr,
    J_SI: tl.constexpr, J_ACC: tl.constexpr,
    ADAM: tl.constexpr, ADAMW: tl.constexpr, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, MOM_INIT: tl.constexpr,
    NESTEROV: tl.constexpr, STAB: tl.constexpr, SI_TOTAL: tl.constexpr, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    lr = tl.load(scal + 0).to(C_TY)
    beta1 = tl.load(scal + 1).to(C_TY)
    beta2 = tl.load(scal + 2).to(C_TY)
    eps = tl.load(scal + 3).to(C_TY)
    wd = tl.load(scal + 4).to(C_TY)
    damp1 = tl.load(scal + 5).to(C_TY)
    step_size = tl.load(scal + 6).to(C_TY)
    bc2s = tl.load(scal + 7).to(C_TY)
    decay = tl.load(scal + 8).to(C_TY)
    lerp_w = tl.load(scal + 9).to(C_TY)
    acm = tl.load(scal + 10).to(C_TY)
    pen = tl.load(scal + 11).to(C_TY)
    al = tl.load(scal + 12).to(C_TY)
    wlam = tl.load(scal + 13).to(C_TY)
    inv = tl.load(scal + 14).to(C_TY)

    p_ptr = operand_ptr(meta, rec, 0, P_TY, ALIGNED, start)
    g_ptr = operand_ptr(meta, rec, 1, P_TY, ALIGNED, start)
    pv = load_chunk(p_ptr, offs, rem, MASKED)
    th = _to(pv, C_TY)
    g = _to(load_chunk(g_ptr, offs, rem, MASKED), C_TY) * inv
    gt = g
    s = 0.0
    if J_OM >= 0:
        om_ptr = operand_ptr(meta, rec, J_OM, C_TY, ALIGNED, start)
        mu_ptr = operand_ptr(meta, rec, J_MU, tl.float64, ALIGNED, start)
        d = (_to(pv, tl.float64) - load_chunk(mu_ptr, offs, rem, MASKED)).to(C_TY)
        w = load_chunk(om_ptr, offs, rem, MASKED)
        if STAB:
            w = _div(w, 1.0 + al * w, C_TY)
        wdd = w * d
        s = tl.sum(wdd * d, axis=0)
        gt = g + pen * wdd
    gg = gt
    if ADAM:
        base = th
        if HAS_WD:
            if ADAMW:
                base = th * decay
            else:
                gg = gg + wd * th
        m_ptr = operand_ptr(meta, rec, J_M, C_TY, ALIGNED, start)
        v_ptr = operand_ptr(meta, rec, J_V, C_TY, ALIGNED, start)
        mo = load_chunk(m_ptr, offs, rem, MASKED)
        diff = gg - mo
        mn = tl.where(lerp_w < 0.5, mo + lerp_w * diff, gg - diff * (1.0 - lerp_w))  # torch's lerp
        store_chunk(m_ptr, offs, rem, mn, MASKED)
        vn = load_chunk(v_ptr, offs, rem, MASKED) * beta2 + acm * gg * gg
        store_chunk(v_ptr, offs, rem, vn, MASKED)
        vx = vn
        if J_VM >= 0:
            vm_ptr = operand_ptr(meta, rec, J_VM, C_TY, ALIGNED, start)
            vo = load_chunk(vm_ptr, offs, rem, MASKED)
            vx = tl.where((vo != vo) | (vn != vn), vo + vn, tl.where(vo > vn, vo, vn))
            store_chunk(vm_ptr, offs, rem, vx, MASKED)
        denom = _div(_sqrt(vx, C_TY), bc2s, C_TY) + eps
        nw = base + _div((-step_size) * mn, denom, C_TY)
    else:
        if HAS_WD:
            gg = gg + wd * th
        if MOMENTUM:
            m_ptr = operand_ptr(meta, rec, J_M, C_TY, ALIGNED, start)
            if MOM_INIT:
                buf = gg
            else:
                buf = load_chunk(m_ptr, offs, rem, MASKED) * beta1 + damp1 * gg
            store_chunk(m_ptr, offs, rem, buf, MASKED)
            if NESTEROV:
                gg = gg + beta1 * buf
            else:
                gg = buf
        nw = th + (-lr) * gg
    stored = _to(nw, P_TY)
    if J_ACC >= 0:
        acc_ptr = operand_ptr(meta, rec, J_ACC, C_TY, ALIGNED, start)
        nc = _to(stored, C_TY)
        stored = _to(th + _div(nc - th, 1.0 + wlam * load_chunk(acc_ptr, offs, rem, MASKED), C_TY), P_TY)
    if J_SI >= 0:
        si_ptr = operand_ptr(meta, rec, J_SI, S_TY, ALIGNED, start)
        if SI_TOTAL:
            gsi = gt
        else:
            gsi = g
        prod = gsi * (_to(stored, C_TY) - th)
        so = load_chunk(si_ptr, offs, rem, MASKED)
        if S_TY == tl.float64 or C_TY == tl.float64:  # subtract in promote(S, C), rounded once to S
            so = (so.to(tl.float64) - prod.to(tl.float64)).to(S_TY)
        else:
            so = so - prod
        store_chunk(si_ptr, offs, rem, so, MASKED)
    store_chunk(p_ptr, offs, rem, stored, MASKED)
    return s


@triton.jit(do_not_specialize=["part_base"])
def _step_kernel(
    meta, partials, part_base, scal,
    K: tl.constexpr, P_TY: tl.constexpr, C_TY: tl.constexpr, S_TY: tl.constexpr,
    J_M: tl.constexpr, J_V: tl.constexpr, J_VM: tl.constexpr, J_OM: tl.constexpr, J_MU: tl.constexpr,
    J_SI: tl.constexpr, J_ACC: tl.constexpr,
    ADAM: tl.constexpr, ADAMW: tl.constexpr, HAS_WD: tl.constexpr, MOMENTUM: tl.constexpr, MOM_INIT: tl.constexpr,
    NESTEROV: tl.constexpr, STAB: tl.constexpr, SI_TOTAL: tl.constexpr, ALIGNED: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    rec, start, rem = chunk_of(meta, K, BLOCK)
    offs = tl.arange(0, BLOCK)
    if rem >= BLOCK:
        s = _step_block(
            meta, rec, start, offs, rem, scal, P_TY, C_TY, S_TY, J_M, J_V, J_VM, J_OM, J_MU, J_SI, J_ACC,
            ADAM, ADAMW, HAS_WD, MOMENTUM, MOM_INIT, NESTEROV, STAB, SI_TOTAL, ALIGNED, False,
        )  # fmt: skip
    else:
        s = _step_block(
            meta, rec, start, offs, rem, scal, P_TY, C_TY, S_TY, J_M, J_V, J_VM, J_OM, J_MU, J_SI, J_ACC,
            ADAM, ADAMW, HAS_WD, MOMENTUM, MOM_INIT, NESTEROV, STAB, SI_TOTAL, ALIGNED, True,
        )  # fmt: skip
    tl.store(partials + part_base + tl.program_id(0), s.to(tl.float64))


def _arith(p: torch.Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def fused_step(params, grads, exp_avg, exp_avg_sq, max_exp_avg_sq, omega, mu, si_omega, wva_accum, h):
    """One optimizer step over every tensor; returns sum W*(theta-mu)^2 (0-dim fp64)."""
    device = params[0].device if params else torch.device("cpu")
    if not params:
        return torch.zeros((), dtype=torch.float64, device=device)
    # read-only Omega / A in the arithmetic dtype, mu in fp64 (exact; what the torch twin computes with)
    if omega:
        omega = [o if o.dtype == _arith(p) else o.to(_arith(p)) for o, p in zip(omega, params)]
        mu = [m if m.dtype == torch.float64 else m.to(torch.float64) for m in mu]
    if wva_accum:
        wva_accum = [a if a.dtype == _arith(p) else a.to(_arith(p)) for a, p in zip(wva_accum, params)]
    operands = [params, grads]
    idx = {}
    for name, lst in (
        ("m", exp_avg), ("v", exp_avg_sq), ("vm", max_exp_avg_sq), ("om", omega), ("mu", mu), ("si", si_omega),
        ("acc", wva_accum),
    ):  # fmt: skip
        if lst:
            idx[name] = len(operands)
            operands.append(lst)
    block, warps = (INTERPRETER_BLOCK, 1) if triton_interpreter() else CUDA_CONFIG
    plan = build_plan(operands, block, device, tag="fused_step")
    if plan.n_chunks == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    hd = dict(h)
    hd["damp1"] = 1.0 - h["dampening"]
    hd["lerp_w"] = 1.0 - h["beta1"]
    hd["addcmul_w"] = 1.0 - h["beta2"]
    hd["pen"] = h["pen_scale"] * h["lam"]
    hd["al"] = 0.0 if h["alpha"] is None else h["alpha"] * h["lam"]
    scal = torch.tensor([float(hd[k]) for k in _SLOTS], dtype=torch.float64).to(device)
    partials = torch.empty(plan.n_chunks, dtype=torch.float64, device=device)
    algo = h["algo"]
    with device_guard(device):
        for grp in plan.groups:
            p_ty = grp.tl_dtypes[0]
            c_ty = tl.float64 if p_ty == tl.float64 else tl.float32
            s_ty = grp.tl_dtypes[idx["si"]] if "si" in idx else c_ty
            _step_kernel[(grp.n_chunks,)](
                grp.meta,
                partials,
                grp.chunk_base,
                scal,
                K=len(operands),
                P_TY=p_ty,
                C_TY=c_ty,
                S_TY=s_ty,
                J_M=idx.get("m", -1),
                J_V=idx.get("v", -1),
                J_VM=idx.get("vm", -1),
                J_OM=idx.get("om", -1),
                J_MU=idx.get("mu", -1),
                J_SI=idx.get("si", -1),
                J_ACC=idx.get("acc", -1),
                ADAM=algo != 0,
                ADAMW=algo == 2,
                HAS_WD=h["weight_decay"] != 0.0,
                MOMENTUM=algo == 0 and bool(exp_avg),
                MOM_INIT=bool(h["momentum_init"]),
                NESTEROV=bool(h["nesterov"]),
                STAB=h["alpha"] is not None,
                SI_TOTAL=bool(h["si_total"]),
                ALIGNED=grp.aligned,
                BLOCK=block,
                **launch_options(warps),
            )
    return partials.sum(dtype=torch.float64)
