"""Triton backend of the consolidation ops (multi-tensor, one launch per dtype group).

Same function names, signatures and semantics as :mod:`ewc_fast.ops.consolidation._torch` (the readable
twin; see ``docs/ARCHITECTURE.md``, "Op contracts"). Inputs arrive validated and contiguous, all on
one device (CUDA, or CPU under ``TRITON_INTERPRET=1``).

Design
------
*Multi-tensor launch.* One call covers every parameter of a model. Tensors are grouped by the tuple
of their operand dtypes (and by 16-byte alignment of their addresses); each group is one launch
over a flat list of BLOCK-sized chunks of all its tensors. The program of a chunk reads its
tensor's operand addresses (int64, cast in-kernel with ``.to(tl.pointer_type(dtype))``) and size
from a device table (``kernels/multi_tensor.py``, cached per set of tensors, so steady-state calls do no
host-to-device copy). Full chunks take an unmasked path whose addresses the compiler can prove
16-byte aligned and contiguous (``tl.multiple_of`` on the cast pointer, chunk start =
chunk number * BLOCK), giving 128-bit vector loads/stores; only a tensor's last partial chunk
takes the masked path. Tensors whose addresses are not 16-byte aligned (e.g. odd slices of a flat
buffer) go to a separate launch compiled without the alignment hint.

*Compilation.* Variants are keyed only by the operand dtypes, the alignment flag and the op's
flags (``alpha is None``, ``online``, ``clip`` are ``tl.constexpr``: no runtime branch). Sizes,
addresses and scalars are runtime values (``part_base`` is exempt from integer specialisation), so
models of any size reuse the same binaries.

*Reductions.* ``penalty_apply`` and ``consolidate`` write one partial sum per chunk (in the
arithmetic type, stored as fp64) into a buffer and sum it with ``torch.sum(dtype=float64)``:
deterministic (no atomics).

*Numerics.* The arithmetic follows the torch twin operation by operation. ``consolidate`` works in
fp64. The four other ops compute in the *arithmetic type* of the group's parameter dtype
(``C_TY``, a constexpr derived from it, so no extra compiled variants): fp64 for fp64 parameters,
fp32 for fp32/bf16/fp16 parameters. Python scalars reach a kernel as fp32 arguments, which is what
the torch twin does with them in fp32 arithmetic; where an exact fp64 scalar is needed (``gamma``,
and the scalars of fp64 groups) it is read from a small fp64 tensor, exact both compiled and
interpreted. ``theta - mu`` is formed in the promoted dtype of theta and mu. Results are rounded
once to the destination dtype (fp32 -> bf16 by an integer round-to-nearest-even, because the
interpreter's own cast truncates). fp32 divisions use ``tl.div_rn`` (Triton's ``/`` on fp32 is the
approximate ``div.full.f32`` on NVIDIA GPUs; fp64 ``/`` is already ``div.rn.f64``), and CUDA launches use
``enable_fp_fusion=False`` so no FMA contraction changes the rounding: the kernels reproduce the torch
twin bit for bit (verified under the interpreter), except the order of the partial sums.

*Configuration.* ``BLOCK`` / ``num_warps`` are fixed per op (``CUDA_CONFIG``), not autotuned:
autotuning would re-run in-place kernels (``grad +=``, ``omega -=``) whose destinations are
reached through the pointer table, where ``restore_value`` cannot protect them, and the chunk
table itself depends on BLOCK. Under the interpreter, ``INTERPRETER_BLOCK`` is used.

Memory traffic per element
--------------------------
P = bytes of a parameter-like element (param / grad / fisher / anchor / prev / start / old; 4 for
fp32, 2 for bf16/fp16, 8 for fp64), S = bytes of a state element (omega, mu, omega_path, out, accum;
4 or 8). Copy bandwidth moves 1 read + 1 write per element (8 B for fp32).

====================  =====================================  ==============================  ==============
op                    reads                                  writes                          fp32: R + W
====================  =====================================  ==============================  ==============
penalty_apply         g, theta (P); omega, mu (S)            g (P)                           16 + 4 = 20 B
consolidate           omega, mu (S); F, anchor (P)           omega, mu (S)                   16 + 8 = 24 B
consolidate (online)  omega (S); F, anchor (P)               omega, mu (S)                   12 + 8 = 20 B
si_accumulate         omega_path (S); g, theta, prev (P)     omega_path (S); prev (P)        16 + 8 = 24 B
si_consolidate        omega_path, out (S); theta, start (P)  out, omega_path (S); start (P)  16 + 12 = 28 B
wva_attenuate         theta, old (P); accum (S)              theta (P)                       12 + 4 = 16 B
====================  =====================================  ==============================  ==============

In general: penalty 3P + 2S, consolidate 2P + 4S (online 2P + 3S), si_accumulate 4P + 2S,
si_consolidate 3P + 4S, wva 3P + S bytes per element. The per-chunk table (16 B per BLOCK elements,
plus (k+1)*8 B per tensor) and partials (4 or 8 B per BLOCK elements) are negligible.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

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

# (BLOCK, num_warps) per op on CUDA. 2048 elements per program = 8 per thread with 8 warps: two
# 128-bit accesses per fp32 stream per thread, moderate register pressure with fp64 state.
CUDA_CONFIG = {
    "penalty_apply": (2048, 8),
    "consolidate": (1024, 8),  # fp64 math (div.rn.f64 is a long sequence): fewer per thread
    "si_accumulate": (2048, 8),
    "si_consolidate": (2048, 8),
    "wva_attenuate": (2048, 8),
}
# Under the CPU interpreter each program costs Python overhead, so use large blocks.
INTERPRETER_BLOCK = 512


def _config(op: str) -> tuple[int, int]:
    if triton_interpreter():
        return INTERPRETER_BLOCK, 1
    return CUDA_CONFIG[op]


def _f32(x: float) -> float:
    """``x`` rounded to the nearest fp32, as torch does when it multiplies a Python scalar into an fp32 tensor."""
    return float(torch.tensor(float(x), dtype=torch.float32))


def _arith(p_ty):
    """Arithmetic type (``C_TY``) of a group whose parameter operand has triton dtype ``p_ty``: fp64
    for fp64 parameters (rounding them through fp32 would lose their precision at every call), else fp32."""
    return tl.float64 if p_ty == tl.float64 else tl.float32


def _scalars64(plan, p_index: int, values, device):
    """The op's scalars as an exact fp64 device tensor when some group has fp64 parameters (operand
    ``p_index``), else None. Only fp64 groups read it, so fp32-only calls pay no host-to-device copy."""
    if not any(grp.tl_dtypes[p_index] == tl.float64 for grp in plan.groups):
        return None
    return torch.tensor([float(v) for v in values], dtype=torch.float64).to(device)


def _scal_arg(scal, grp, p_index: int):
    """Pointer argument for a group's fp64 scalars: ``scal`` for fp64 groups; for the others (which
    never load it: the branch is compiled out) any pointer of a fixed type, the group's own table."""
    return scal if grp.tl_dtypes[p_index] == tl.float64 else grp.meta


# --------------------------------------------------------------------------------- jit helpers
@triton.jit
def _f32_to_bf16(x):
    """fp32 -> bf16 rounded to nearest even (NaN -> 0x7FC0), exactly like torch's conversion.

    Written with integer ops so that the CPU interpreter (whose own fp32 -> bf16 cast truncates)
    and the GPU produce the same bits from the same code.
    """
    u = x.to(tl.uint32, bitcast=True)
    r = u + (0x7FFF + ((u >> 16) & 1))
    r = tl.where(x != x, 0x7FC00000, r)
    return (r >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _to(x, TY: tl.constexpr):
    """Convert ``x`` to ``TY`` the way torch's ``Tensor.to`` does.

    16-bit types always pass through fp32 (torch converts fp64 -> fp16/bf16 via float too; fp16/bf16
    -> fp64 is exact either way); fp32 -> bf16 uses :func:`_f32_to_bf16`.
    """
    if TY == tl.bfloat16:
        y = _f32_to_bf16(x.to(tl.float32))
    elif TY == tl.float16:
        y = x.to(tl.float32).to(tl.float16)
    elif x.dtype == tl.bfloat16 or x.dtype == tl.float16:
        y = x.to(tl.float32).to(TY)
    else:
        y = x.to(TY)
    return y


@triton.jit
def _div(x, y, C_TY: tl.constexpr):
    """x / y correctly rounded in C_TY: ``tl.div_rn`` for fp32 (``/`` is approximate there on NVIDIA
    GPUs), ``/`` (``div.rn.f64``) for fp64."""
    if C_TY == tl.float64:
        r = x / y
    else:
        r = tl.div_rn(x, y)
    return r


# ------------------------------------------------------------------------------- penalty_apply
@triton.jit
def _penalty_block(
    g_ptr,
    p_ptr,
    o_ptr,
    m_ptr,
    offs,
    rem,
    c,
    al,
    G_TY: tl.constexpr,
    P_TY: tl.constexpr,
    M_TY: tl.constexpr,
    C_TY: tl.constexpr,
    STAB: tl.constexpr,
    MASKED: tl.constexpr,
):
    g = load_chunk(g_ptr, offs, rem, MASKED)
    p = load_chunk(p_ptr, offs, rem, MASKED)
    o = load_chunk(o_ptr, offs, rem, MASKED)
    m = load_chunk(m_ptr, offs, rem, MASKED)
    if P_TY == tl.float64 or M_TY == tl.float64:  # theta - mu in promote(param, mu)
        d = (_to(p, tl.float64) - m.to(tl.float64)).to(C_TY)
    else:
        d = _to(p, tl.float32) - m
    w = o.to(C_TY)
    if STAB:
        w = _div(w, 1.0 + al * w, C_TY)
    wd = w * d
    inc = c * wd
    gn = _to(g, C_TY) + inc
    store_chunk(g_ptr, offs, rem, _to(gn, G_TY), MASKED)
    return tl.sum(wd * d, axis=0)


@triton.jit(do_not_specialize=["part_base"])
def _penalty_kernel(
    meta,
    partials,
    part_base,
    c,
    al,
    scal,
    G_TY: tl.constexpr,
    P_TY: tl.constexpr,
    O_TY: tl.constexpr,
    M_TY: tl.constexpr,
    C_TY: tl.constexpr,
    STAB: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rec, start, rem = chunk_of(meta, 4, BLOCK)
    g_ptr = operand_ptr(meta, rec, 0, G_TY, ALIGNED, start)
    p_ptr = operand_ptr(meta, rec, 1, P_TY, ALIGNED, start)
    o_ptr = operand_ptr(meta, rec, 2, O_TY, ALIGNED, start)
    m_ptr = operand_ptr(meta, rec, 3, M_TY, ALIGNED, start)
    if C_TY == tl.float64:  # exact fp64 scalars (c, al) from the device tensor
        c = tl.load(scal)
        al = tl.load(scal + 1)
    else:
        c = tl.cast(c, tl.float32)
        al = tl.cast(al, tl.float32)
    offs = tl.arange(0, BLOCK)
    if rem >= BLOCK:
        s = _penalty_block(g_ptr, p_ptr, o_ptr, m_ptr, offs, rem, c, al, G_TY, P_TY, M_TY, C_TY, STAB, False)
    else:
        s = _penalty_block(g_ptr, p_ptr, o_ptr, m_ptr, offs, rem, c, al, G_TY, P_TY, M_TY, C_TY, STAB, True)
    tl.store(partials + part_base + tl.program_id(0), s.to(tl.float64))


def penalty_apply(grads, params, omega, mu, lam, alpha, grad_scale):
    """grad += grad_scale*lam*W*(theta-mu); returns sum(W*(theta-mu)^2) as a 0-dim fp64 tensor.

    W = omega, or omega/(1+alpha*lam*omega) when stabilised (alpha is not None). The sum is taken
    in the arithmetic type (fp64 for fp64 params, else fp32) within each chunk of BLOCK elements and
    in fp64 across chunks.
    """
    device = params[0].device if params else torch.device("cpu")
    if not params:
        return torch.zeros((), dtype=torch.float64, device=device)
    block, warps = _config("penalty_apply")
    plan = build_plan([grads, params, omega, mu], block, device, tag="penalty_apply")
    if plan.n_chunks == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    partials = torch.empty(plan.n_chunks, dtype=torch.float64, device=device)
    c64 = grad_scale * lam
    al64 = alpha * lam if alpha is not None else 0.0
    c, al = _f32(c64), _f32(al64)
    scal = _scalars64(plan, 1, (c64, al64), device)
    with device_guard(device):
        for grp in plan.groups:
            g_ty, p_ty, o_ty, m_ty = grp.tl_dtypes
            _penalty_kernel[(grp.n_chunks,)](
                grp.meta,
                partials,
                grp.chunk_base,
                c,
                al,
                _scal_arg(scal, grp, 1),
                G_TY=g_ty,
                P_TY=p_ty,
                O_TY=o_ty,
                M_TY=m_ty,
                C_TY=_arith(p_ty),
                STAB=alpha is not None,
                ALIGNED=grp.aligned,
                BLOCK=block,
                **launch_options(warps),
            )
    return partials.sum(dtype=torch.float64)


# --------------------------------------------------------------------------------- consolidate
@triton.jit
def _consolidate_block(
    o_ptr,
    m_ptr,
    f_ptr,
    a_ptr,
    offs,
    rem,
    gamma,
    O_TY: tl.constexpr,
    M_TY: tl.constexpr,
    ONLINE: tl.constexpr,
    MASKED: tl.constexpr,
):
    o = _to(load_chunk(o_ptr, offs, rem, MASKED), tl.float64)
    f = _to(load_chunk(f_ptr, offs, rem, MASKED), tl.float64)
    a = _to(load_chunk(a_ptr, offs, rem, MASKED), tl.float64)
    go = gamma * o
    on = go + f
    if ONLINE:
        mn = a
        s = 0.0
    else:
        m = _to(load_chunk(m_ptr, offs, rem, MASKED), tl.float64)
        nz = on != 0  # anchor only where Omega' == 0 exactly (signed importances still merge)
        mn = tl.where(nz, (go * m + f * a) / tl.where(nz, on, 1.0), a)
        dm = m - mn
        da = a - mn
        s = tl.sum(go * (dm * dm) + f * (da * da), axis=0)
    store_chunk(o_ptr, offs, rem, on.to(O_TY), MASKED)
    store_chunk(m_ptr, offs, rem, mn.to(M_TY), MASKED)
    return s


@triton.jit(do_not_specialize=["part_base"])
def _consolidate_kernel(
    meta,
    partials,
    part_base,
    scal,
    O_TY: tl.constexpr,
    M_TY: tl.constexpr,
    F_TY: tl.constexpr,
    A_TY: tl.constexpr,
    ONLINE: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rec, start, rem = chunk_of(meta, 4, BLOCK)
    o_ptr = operand_ptr(meta, rec, 0, O_TY, ALIGNED, start)
    m_ptr = operand_ptr(meta, rec, 1, M_TY, ALIGNED, start)
    f_ptr = operand_ptr(meta, rec, 2, F_TY, ALIGNED, start)
    a_ptr = operand_ptr(meta, rec, 3, A_TY, ALIGNED, start)
    gamma = tl.load(scal)
    offs = tl.arange(0, BLOCK)
    if rem >= BLOCK:
        s = _consolidate_block(o_ptr, m_ptr, f_ptr, a_ptr, offs, rem, gamma, O_TY, M_TY, ONLINE, False)
    else:
        s = _consolidate_block(o_ptr, m_ptr, f_ptr, a_ptr, offs, rem, gamma, O_TY, M_TY, ONLINE, True)
    if not ONLINE:
        tl.store(partials + part_base + tl.program_id(0), s)


def consolidate(omega, mu, fisher, anchor, gamma, online):
    """Merge a task (F, theta*) into (Omega, mu) in place, fp64 arithmetic; returns the c increment.

    Omega' = gamma*Omega + F. Separate: mu' = (gamma*Omega*mu + F*theta*)/Omega' (theta* where
    Omega' = 0), increment = sum(gamma*Omega*(mu-mu')^2 + F*(theta*-mu')^2) (fp64 per chunk and
    across chunks). Online: mu' = theta*, increment 0.
    """
    device = omega[0].device if omega else torch.device("cpu")
    if not omega:
        return torch.zeros((), dtype=torch.float64, device=device)
    block, warps = _config("consolidate")
    plan = build_plan([omega, mu, fisher, anchor], block, device, tag="consolidate")
    if plan.n_chunks == 0:
        return torch.zeros((), dtype=torch.float64, device=device)
    scal = torch.tensor([float(gamma)], dtype=torch.float64).to(device)
    # online: no increment to sum; the (untouched) partials argument just needs to be a valid fp64 pointer
    partials = scal if online else torch.empty(plan.n_chunks, dtype=torch.float64, device=device)
    with device_guard(device):
        for grp in plan.groups:
            o_ty, m_ty, f_ty, a_ty = grp.tl_dtypes
            _consolidate_kernel[(grp.n_chunks,)](
                grp.meta,
                partials,
                grp.chunk_base,
                scal,
                O_TY=o_ty,
                M_TY=m_ty,
                F_TY=f_ty,
                A_TY=a_ty,
                ONLINE=bool(online),
                ALIGNED=grp.aligned,
                BLOCK=block,
                **launch_options(warps),
            )
    if online:
        return torch.zeros((), dtype=torch.float64, device=device)
    return partials.sum(dtype=torch.float64)


# ------------------------------------------------------------------------------- si_accumulate
@triton.jit
def _si_accumulate_block(
    w_ptr,
    g_ptr,
    p_ptr,
    q_ptr,
    offs,
    rem,
    W_TY: tl.constexpr,
    Q_TY: tl.constexpr,
    C_TY: tl.constexpr,
    MASKED: tl.constexpr,
):
    w = load_chunk(w_ptr, offs, rem, MASKED)
    g = load_chunk(g_ptr, offs, rem, MASKED)
    p = load_chunk(p_ptr, offs, rem, MASKED)
    q = load_chunk(q_ptr, offs, rem, MASKED)
    prod = _to(g, C_TY) * (_to(p, C_TY) - _to(q, C_TY))
    if C_TY == tl.float64:  # subtract in promote(state, fp64) = fp64, round once to the state dtype
        wn = (w.to(tl.float64) - prod).to(W_TY)
    else:
        wn = (w - prod.to(W_TY)).to(W_TY)
    store_chunk(w_ptr, offs, rem, wn, MASKED)
    store_chunk(q_ptr, offs, rem, _to(p, Q_TY), MASKED)


@triton.jit
def _si_accumulate_kernel(
    meta,
    W_TY: tl.constexpr,
    G_TY: tl.constexpr,
    P_TY: tl.constexpr,
    Q_TY: tl.constexpr,
    C_TY: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rec, start, rem = chunk_of(meta, 4, BLOCK)
    w_ptr = operand_ptr(meta, rec, 0, W_TY, ALIGNED, start)
    g_ptr = operand_ptr(meta, rec, 1, G_TY, ALIGNED, start)
    p_ptr = operand_ptr(meta, rec, 2, P_TY, ALIGNED, start)
    q_ptr = operand_ptr(meta, rec, 3, Q_TY, ALIGNED, start)
    offs = tl.arange(0, BLOCK)
    if rem >= BLOCK:
        _si_accumulate_block(w_ptr, g_ptr, p_ptr, q_ptr, offs, rem, W_TY, Q_TY, C_TY, False)
    else:
        _si_accumulate_block(w_ptr, g_ptr, p_ptr, q_ptr, offs, rem, W_TY, Q_TY, C_TY, True)


def si_accumulate(omega_path, grads, params, prev_params):
    """omega_path -= g*(theta - theta_prev); theta_prev <- theta (fp64 arithmetic for fp64 params, else fp32)."""
    if not params:
        return None
    device = params[0].device
    block, warps = _config("si_accumulate")
    plan = build_plan([omega_path, grads, params, prev_params], block, device, tag="si_accumulate")
    with device_guard(device):
        for grp in plan.groups:
            w_ty, g_ty, p_ty, q_ty = grp.tl_dtypes
            _si_accumulate_kernel[(grp.n_chunks,)](
                grp.meta,
                W_TY=w_ty,
                G_TY=g_ty,
                P_TY=p_ty,
                Q_TY=q_ty,
                C_TY=_arith(p_ty),
                ALIGNED=grp.aligned,
                BLOCK=block,
                **launch_options(warps),
            )
    return None


# ------------------------------------------------------------------------------ si_consolidate
@triton.jit
def _si_consolidate_block(
    w_ptr,
    p_ptr,
    s_ptr,
    o_ptr,
    offs,
    rem,
    xi,
    W_TY: tl.constexpr,
    S_TY: tl.constexpr,
    O_TY: tl.constexpr,
    C_TY: tl.constexpr,
    CLIP: tl.constexpr,
    MASKED: tl.constexpr,
):
    w = load_chunk(w_ptr, offs, rem, MASKED)
    p = load_chunk(p_ptr, offs, rem, MASKED)
    s = load_chunk(s_ptr, offs, rem, MASKED)
    o = load_chunk(o_ptr, offs, rem, MASKED)
    delta = _to(p, C_TY) - _to(s, C_TY)
    val = o.to(C_TY) + _div(w.to(C_TY), delta * delta + xi, C_TY)
    if CLIP:
        val = tl.where(val < 0.0, 0.0, val)  # keeps NaN like torch.clamp_min
    store_chunk(o_ptr, offs, rem, val.to(O_TY), MASKED)
    store_chunk(w_ptr, offs, rem, tl.zeros_like(w), MASKED)
    store_chunk(s_ptr, offs, rem, _to(p, S_TY), MASKED)


@triton.jit
def _si_consolidate_kernel(
    meta,
    xi,
    scal,
    W_TY: tl.constexpr,
    P_TY: tl.constexpr,
    S_TY: tl.constexpr,
    O_TY: tl.constexpr,
    C_TY: tl.constexpr,
    CLIP: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rec, start, rem = chunk_of(meta, 4, BLOCK)
    w_ptr = operand_ptr(meta, rec, 0, W_TY, ALIGNED, start)
    p_ptr = operand_ptr(meta, rec, 1, P_TY, ALIGNED, start)
    s_ptr = operand_ptr(meta, rec, 2, S_TY, ALIGNED, start)
    o_ptr = operand_ptr(meta, rec, 3, O_TY, ALIGNED, start)
    if C_TY == tl.float64:  # exact fp64 xi from the device tensor
        xi = tl.load(scal)
    else:
        xi = tl.cast(xi, tl.float32)
    offs = tl.arange(0, BLOCK)
    if rem >= BLOCK:
        _si_consolidate_block(w_ptr, p_ptr, s_ptr, o_ptr, offs, rem, xi, W_TY, S_TY, O_TY, C_TY, CLIP, False)
    else:
        _si_consolidate_block(w_ptr, p_ptr, s_ptr, o_ptr, offs, rem, xi, W_TY, S_TY, O_TY, C_TY, CLIP, True)


def si_consolidate(omega_path, params, start_params, out, xi, clip):
    """out += omega_path/((theta-theta_start)^2 + xi), clipped at 0 if ``clip``; omega_path <- 0; theta_start <- theta.

    Arithmetic: fp64 for fp64 params, else fp32."""
    if not params:
        return None
    device = params[0].device
    block, warps = _config("si_consolidate")
    plan = build_plan([omega_path, params, start_params, out], block, device, tag="si_consolidate")
    xi32 = _f32(xi)
    scal = _scalars64(plan, 1, (xi,), device)
    with device_guard(device):
        for grp in plan.groups:
            w_ty, p_ty, s_ty, o_ty = grp.tl_dtypes
            _si_consolidate_kernel[(grp.n_chunks,)](
                grp.meta,
                xi32,
                _scal_arg(scal, grp, 1),
                W_TY=w_ty,
                P_TY=p_ty,
                S_TY=s_ty,
                O_TY=o_ty,
                C_TY=_arith(p_ty),
                CLIP=bool(clip),
                ALIGNED=grp.aligned,
                BLOCK=block,
                **launch_options(warps),
            )
    return None


# ------------------------------------------------------------------------------- wva_attenuate
@triton.jit
def _wva_block(p_ptr, q_ptr, a_ptr, offs, rem, lam, P_TY: tl.constexpr, C_TY: tl.constexpr, MASKED: tl.constexpr):
    p = load_chunk(p_ptr, offs, rem, MASKED)
    q = _to(load_chunk(q_ptr, offs, rem, MASKED), C_TY)
    a = load_chunk(a_ptr, offs, rem, MASKED)
    pn = q + _div(_to(p, C_TY) - q, 1.0 + lam * a.to(C_TY), C_TY)
    store_chunk(p_ptr, offs, rem, _to(pn, P_TY), MASKED)


@triton.jit
def _wva_kernel(
    meta,
    lam,
    scal,
    P_TY: tl.constexpr,
    Q_TY: tl.constexpr,
    A_TY: tl.constexpr,
    C_TY: tl.constexpr,
    ALIGNED: tl.constexpr,
    BLOCK: tl.constexpr,
):
    rec, start, rem = chunk_of(meta, 3, BLOCK)
    p_ptr = operand_ptr(meta, rec, 0, P_TY, ALIGNED, start)
    q_ptr = operand_ptr(meta, rec, 1, Q_TY, ALIGNED, start)
    a_ptr = operand_ptr(meta, rec, 2, A_TY, ALIGNED, start)
    if C_TY == tl.float64:  # exact fp64 lam from the device tensor
        lam = tl.load(scal)
    else:
        lam = tl.cast(lam, tl.float32)
    offs = tl.arange(0, BLOCK)
    if rem >= BLOCK:
        _wva_block(p_ptr, q_ptr, a_ptr, offs, rem, lam, P_TY, C_TY, False)
    else:
        _wva_block(p_ptr, q_ptr, a_ptr, offs, rem, lam, P_TY, C_TY, True)


def wva_attenuate(params, old_params, accum, lam):
    """theta <- theta_old + (theta - theta_old)/(1 + lam*A) (fp64 arithmetic for fp64 params, else fp32)."""
    if not params:
        return None
    device = params[0].device
    block, warps = _config("wva_attenuate")
    plan = build_plan([params, old_params, accum], block, device, tag="wva_attenuate")
    lam32 = _f32(lam)
    scal = _scalars64(plan, 0, (lam,), device)
    with device_guard(device):
        for grp in plan.groups:
            p_ty, q_ty, a_ty = grp.tl_dtypes
            _wva_kernel[(grp.n_chunks,)](
                grp.meta,
                lam32,
                _scal_arg(scal, grp, 0),
                P_TY=p_ty,
                Q_TY=q_ty,
                A_TY=a_ty,
                C_TY=_arith(p_ty),
                ALIGNED=grp.aligned,
                BLOCK=block,
                **launch_options(warps),
            )
    return None
