"""Triton backend of ``persample_conv_sq_``: a fused implicit-GEMM per-sample conv-gradient kernel.

Same function name, signature and semantics as :mod:`ewc_fast.ops.persample_conv._torch` (the
readable twin): ``persample_conv_sq(sq_out, abs_out, G, X, stride, padding, dilation, groups)`` adds
``sum_n dW_n**2`` to ``sq_out`` and ``sum_n |dW_n|`` to ``abs_out``, with

    dW_n[g*Og + o, c, k] = sum_l G[n, g*Og + o, l] * X[n, g*Cg + c, l*stride + k*dilation - padding]

(X zero outside its extent). X (N, C, *S) and G (N, O, *L) may have any strides; the outputs are
contiguous (O, Cg, *K) fp32/fp64 (or None). Inputs arrive validated from the op layer.

Design: the program of (group g, O tile, column tile) loops over its samples; per sample it runs
``tl.dot`` over blocks of output positions, ``P += G_n[o-tile, l-block] @ Xcol_n[l-block, j-tile]``,
where the im2col block Xcol is gathered straight from X (column j = c*Kp + tap decoded to a channel
and a tap; position l decoded to its spatial index; masked where the tap falls into the padding),
so the unfolded input never exists. At the sample's last block P*P and |P| are added to register
accumulators, which are flushed at the end (read-add-write with one split; ``tl.atomic_add`` when
samples are split across programs to fill the GPU). 1-D and 2-D convolutions run as 3-D ones with
leading size-1 dims. Numerics as in ``kernels/persample.py``: fp32 inputs use
``input_precision="ieee"``; 16-bit inputs are multiplied natively with fp32 accumulation (upcast to
fp32 under the interpreter for bf16, exact); fp64 accumulates in fp64. One fixed configuration (no
autotuning: the flush is in place).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import device_guard, triton_interpreter
from .persample_common import clamp_splits, default_splits, flush, numerics, outputs

#: (BLOCK_O, BLOCK_J, BLOCK_L, num_warps) on CUDA and under the CPU interpreter
CUDA_CONFIG = (64, 64, 32, 4)
INTERPRETER_CONFIG = (32, 32, 32, 1)


@triton.jit
def _persample_conv_kernel(
    X,
    G,
    SQ,
    AB,
    N,
    Og,
    Cg,
    J,
    Lp,
    S0,
    S1,
    S2,
    L1,
    L2,
    K1,
    K2,
    st0,
    st1,
    st2,
    pd0,
    pd1,
    pd2,
    dl0,
    dl1,
    dl2,
    sXn,
    sXc,
    sX0,
    sX1,
    sX2,
    sGn,
    sGo,
    sG0,
    sG1,
    sG2,
    n_o_tiles,
    n_j_tiles,
    DO_SQ: tl.constexpr,
    DO_ABS: tl.constexpr,
    ACC_F64: tl.constexpr,
    PREC: tl.constexpr,
    WIDE_SQ: tl.constexpr,
    WIDE_AB: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_J: tl.constexpr,
    BLOCK_L: tl.constexpr,
):
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    pid = tl.program_id(0)
    per_group = n_o_tiles * n_j_tiles
    g = pid // per_group
    rest = pid % per_group
    pid_o = rest // n_j_tiles
    pid_j = rest % n_j_tiles
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    per = tl.cdiv(N, n_splits)
    n0 = split * per
    n1 = tl.minimum(n0 + per, N)

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_j = pid_j * BLOCK_J + tl.arange(0, BLOCK_J)
    offs_l = tl.arange(0, BLOCK_L)
    mask_o = offs_o < Og
    mask_j = offs_j < J
    rows = (g * Og + offs_o).to(tl.int64)
    # column j = c*Kp + tap, tap = (k0*K1 + k1)*K2 + k2
    Kp = J // Cg
    c = offs_j // Kp
    tap = offs_j % Kp
    k2 = tap % K2
    k1 = (tap // K2) % K1
    k0 = tap // (K2 * K1)
    kd0 = k0 * dl0 - pd0
    kd1 = k1 * dl1 - pd1
    kd2 = k2 * dl2 - pd2
    chan = (g * Cg + c).to(tl.int64) * sXc
    g_rows = rows * sGo

    acc_sq = tl.zeros((BLOCK_O, BLOCK_J), dtype=acc_ty)
    acc_ab = tl.zeros((BLOCK_O, BLOCK_J), dtype=acc_ty)
    n_lb = tl.cdiv(Lp, BLOCK_L)
    p = tl.zeros((BLOCK_O, BLOCK_J), dtype=acc_ty)
    for it in range(0, (n1 - n0) * n_lb):
        n = (n0 + it // n_lb).to(tl.int64)
        pos = (it % n_lb) * BLOCK_L + offs_l
        mask_l = pos < Lp
        l2 = pos % L2
        l1 = (pos // L2) % L1
        l0 = pos // (L2 * L1)
        goff = l0.to(tl.int64) * sG0 + l1.to(tl.int64) * sG1 + l2.to(tl.int64) * sG2
        gt = tl.load(G + n * sGn + g_rows[:, None] + goff[None, :], mask=mask_o[:, None] & mask_l[None, :], other=0.0)
        i0 = l0[:, None] * st0 + kd0[None, :]
        i1 = l1[:, None] * st1 + kd1[None, :]
        i2 = l2[:, None] * st2 + kd2[None, :]
        inside = (i0 >= 0) & (i0 < S0) & (i1 >= 0) & (i1 < S1) & (i2 >= 0) & (i2 < S2)
        xoff = chan[None, :] + i0.to(tl.int64) * sX0 + i1.to(tl.int64) * sX1 + i2.to(tl.int64) * sX2
        xt = tl.load(X + n * sXn + xoff, mask=inside & mask_l[:, None] & mask_j[None, :], other=0.0)
        if UPCAST:  # interpreter only: its dot cannot multiply bf16 (exact upcast, same result)
            gt = gt.to(tl.float32)
            xt = xt.to(tl.float32)
        if ACC_F64:
            gt = gt.to(tl.float64)
            xt = xt.to(tl.float64)
        p = tl.dot(gt, xt, acc=p, input_precision=PREC, out_dtype=acc_ty)
        if (it % n_lb) == n_lb - 1:  # last block of this sample: dW_n tile complete
            if DO_SQ:
                acc_sq += p * p
            if DO_ABS:
                acc_ab += tl.abs(p)
            p = tl.zeros((BLOCK_O, BLOCK_J), dtype=acc_ty)

    mask = mask_o[:, None] & mask_j[None, :]
    out_off = rows[:, None] * J + offs_j[None, :]
    if DO_SQ:
        flush(SQ + out_off, acc_sq, mask, n_splits, WIDE_SQ)
    if DO_ABS:
        flush(AB + out_off, acc_ab, mask, n_splits, WIDE_AB)


def _pad3(vals, fill):
    vals = list(vals)
    return [fill] * (3 - len(vals)) + vals


def launch(sq_out, abs_out, G, X, stride, padding, dilation, groups, *, splits: int | None = None) -> None:
    """Launch the kernel; ``splits`` (sample splits) defaults to a heuristic filling the GPU."""
    ref = sq_out if sq_out is not None else abs_out
    N, O = G.shape[:2]
    C = X.shape[1]
    Lp = 1
    for v in G.shape[2:]:
        Lp *= v
    if N == 0 or Lp == 0 or O == 0 or C == 0:
        return
    Og, Cg = O // groups, C // groups
    Kp = 1
    for v in ref.shape[2:]:
        Kp *= v
    J = Cg * Kp
    sq, ab, do_sq, do_abs = outputs(sq_out, abs_out)
    flags = numerics(G, sq, ab)
    prec = "ieee" if G.dtype == torch.float32 or flags["UPCAST"] else None
    bo, bj, bl, warps = INTERPRETER_CONFIG if triton_interpreter() else CUDA_CONFIG
    n_o, n_j = triton.cdiv(Og, bo), triton.cdiv(J, bj)
    tiles = groups * n_o * n_j
    splits = clamp_splits(default_splits(tiles, G.device) if splits is None else splits, N)
    S = _pad3(X.shape[2:], 1)
    L = _pad3(G.shape[2:], 1)
    K = _pad3(ref.shape[2:], 1)
    st, pd, dl = _pad3(stride, 1), _pad3(padding, 0), _pad3(dilation, 1)
    sx, sg = X.stride(), G.stride()
    sxs, sgs = _pad3(sx[2:], 0), _pad3(sg[2:], 0)
    with device_guard(G.device):
        _persample_conv_kernel[(tiles, splits)](
            X,
            G,
            sq,
            ab,
            N,
            Og,
            Cg,
            J,
            Lp,
            S[0],
            S[1],
            S[2],
            L[1],
            L[2],
            K[1],
            K[2],
            st[0],
            st[1],
            st[2],
            pd[0],
            pd[1],
            pd[2],
            dl[0],
            dl[1],
            dl[2],
            sx[0],
            sx[1],
            sxs[0],
            sxs[1],
            sxs[2],
            sg[0],
            sg[1],
            sgs[0],
            sgs[1],
            sgs[2],
            n_o,
            n_j,
            DO_SQ=do_sq,
            DO_ABS=do_abs,
            PREC=prec,
            **flags,
            BLOCK_O=bo,
            BLOCK_J=bj,
            BLOCK_L=bl,
            num_warps=warps,
        )


def persample_conv_sq(sq_out, abs_out, G, X, stride, padding, dilation, groups):
    """sq_out += sum_n dW_n**2; abs_out += sum_n |dW_n| (either output may be None)."""
    launch(sq_out, abs_out, G, X, stride, padding, dilation, groups)
