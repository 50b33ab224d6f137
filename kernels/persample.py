"""Triton backend of ``persample_sq_``: a fused, GEMM-tiled per-sample squared-gradient kernel.

Same function name, signature and semantics as :mod:`ewc_fast.ops.persample._torch` (the readable
twin): ``persample_sq(sq_out, abs_out, G, A)`` adds ``sum_n (G_n^T A_n)**2`` to ``sq_out`` and
``sum_n |G_n^T A_n|`` to ``abs_out``; ``G`` (N, T, O) and ``A`` (N, T, I) may have any strides,
the outputs are (O, I) fp32/fp64 (or None). Inputs arrive validated from the op layer.

Design (tile like a GEMM, never materialise N x O x I)
-----------------------------------------------------
The lesson of FlashNorm (a Triton per-sample-norm kernel): a naive per-sample loop runs many times
slower than a GEMM; tile the output like a GEMM and keep each per-sample gradient tile in registers.
Grid = (O tiles x I tiles, sample splits). The program of output tile (o, i) and split s loops
over its samples n; for each sample it runs ``tl.dot`` over blocks of T,
``P += G_n[t, o-tile]^T @ A_n[t, i-tile]``, into an fp32 register tile (fp64 for fp64 inputs), then
adds ``P*P`` and ``|P|`` to two register accumulators. At the end the accumulators are added to the
outputs: a plain read-add-write when there is one split (each output element has exactly one
writer, deterministic), ``tl.atomic_add`` when samples are split across programs (chosen when the
(O, I) tile grid alone is too small to fill the GPU; the order of the few atomic adds per element
then varies from run to run at the last-bit level). FLOPs are those of one weight-gradient GEMM,
memory is O(O*I) (plus the inputs), and every operand is loaded once per (tile, sample).

T == 1 (a plain Linear layer on 2-D inputs) needs no per-sample loop: sum_n P_n**2 = (G**2)^T (A**2)
and sum_n |P_n| = |G|^T |A| exactly, so the same kernel (``GEMM=True``) runs those two GEMMs with
the samples as the reduction dimension, squaring / taking |.| of the tiles in registers (fp32).

Numerics: fp32 inputs use ``input_precision="ieee"`` (full fp32 FMA; the default would be tf32 on
NVIDIA GPUs, ~3e-4 relative error, whereas this op promises fp32 accuracy). ``launch(...,
precision="tf32")`` opts into tf32 tensor cores for fp32 inputs (10-bit mantissa inputs, fp32
accumulation: ~1e-3 relative per entry); the public op never does, the GPU benchmark compares it
with a tf32 cuBLAS GEMM. Under the interpreter, ``tl.dot`` multiplies in fp32 whatever the precision.
bf16 / fp16 inputs are loaded natively and multiplied on the tensor cores with fp32 accumulation (products of 16-bit
floats are exact in fp32). In GEMM mode the squared / absolute 16-bit inputs are formed in fp32 and
multiplied with ``ieee`` precision (a square has twice the mantissa bits of its input, so rounding
it back to 16 bits would not be exact). fp64 inputs accumulate in fp64. Under the interpreter only,
bf16 tiles are upcast to fp32 before ``tl.dot`` (numpy has no bf16 matmul); the upcast is exact, so
the result equals the tensor-core one up to the fp32 summation order.

Configuration: autotuned on CUDA over block shapes / warps / stages (``restore_value`` protects the
in-place outputs while the autotuner benchmarks); under ``TRITON_INTERPRET=1`` one fixed config
with large blocks (``INTERPRETER_CONFIG``), since the interpreter cannot autotune several configs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import device_guard, triton_interpreter
from .persample_common import clamp_splits, default_splits, flush, numerics, outputs

#: fixed (BLOCK_O, BLOCK_I, BLOCK_T) under the CPU interpreter: large blocks, few programs
INTERPRETER_CONFIG = {"BLOCK_O": 64, "BLOCK_I": 64, "BLOCK_T": 32}


@triton.jit
def _persample_kernel(
    G,
    A,
    SQ,
    AB,
    N,
    T,
    O,
    I,
    sGn,
    sGt,
    sGo,
    sAn,
    sAt,
    sAi,
    s_sq_o,
    s_sq_i,
    s_ab_o,
    s_ab_i,
    key_n,
    key_t,
    DO_SQ: tl.constexpr,
    DO_ABS: tl.constexpr,
    GEMM: tl.constexpr,
    ACC_F64: tl.constexpr,
    PREC: tl.constexpr,
    WIDE_SQ: tl.constexpr,
    WIDE_AB: tl.constexpr,
    UPCAST: tl.constexpr,
    IDX64: tl.constexpr,
    BLOCK_O: tl.constexpr,
    BLOCK_I: tl.constexpr,
    BLOCK_T: tl.constexpr,
):
    # key_n / key_t only feed the autotuner's cache key (bucketed N and T)
    acc_ty = tl.float64 if ACC_F64 else tl.float32
    pid = tl.program_id(0)
    n_i_tiles = tl.cdiv(I, BLOCK_I)
    pid_o = pid // n_i_tiles
    pid_i = pid % n_i_tiles
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    per = tl.cdiv(N, n_splits)
    n0 = split * per
    n1 = tl.minimum(n0 + per, N)

    offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    offs_i = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    offs_k = tl.arange(0, BLOCK_T)
    mask_o = offs_o < O
    mask_i = offs_i < I
    # element offsets in int64 only when some operand spans >= 2^31 elements (IDX64)
    if IDX64:
        o_idx = offs_o.to(tl.int64)
        i_idx = offs_i.to(tl.int64)
        k_idx = offs_k.to(tl.int64)
    else:
        o_idx = offs_o
        i_idx = offs_i
        k_idx = offs_k

    acc_sq = tl.zeros((BLOCK_O, BLOCK_I), dtype=acc_ty)
    acc_ab = tl.zeros((BLOCK_O, BLOCK_I), dtype=acc_ty)
    if GEMM:
        # T == 1: the samples are the reduction dimension. Tiles: G^T (BLOCK_O, BLOCK_T samples) and
        # A (BLOCK_T samples, BLOCK_I); the pointer tiles are loop invariant, advanced by a scalar.
        g_tile = G + o_idx[:, None] * sGo + k_idx[None, :] * sGn
        a_tile = A + k_idx[:, None] * sAn + i_idx[None, :] * sAi
        for k0 in range(n0, n1, BLOCK_T):
            if IDX64:
                k0 = tl.cast(k0, tl.int64)
            left = n1 - k0
            g = tl.load(g_tile + k0 * sGn, mask=mask_o[:, None] & (offs_k[None, :] < left), other=0.0)
            a = tl.load(a_tile + k0 * sAn, mask=(offs_k[:, None] < left) & mask_i[None, :], other=0.0)
            g = g.to(acc_ty)
            a = a.to(acc_ty)
            if DO_SQ:
                acc_sq = tl.dot(g * g, a * a, acc=acc_sq, input_precision=PREC, out_dtype=acc_ty)
            if DO_ABS:
                acc_ab = tl.dot(tl.abs(g), tl.abs(a), acc=acc_ab, input_precision=PREC, out_dtype=acc_ty)
    else:
        # One flat loop over (sample, T block) pairs, so the software pipeliner overlaps the loads of
        # the next sample with the current one (persistent-matmul pattern); the per-sample epilogue
        # runs on the last T block of each sample. G_n^T is loaded directly as a (BLOCK_O, BLOCK_T)
        # tile in its native dtype (16-bit inputs -> tensor cores).
        g_tile = G + o_idx[:, None] * sGo + k_idx[None, :] * sGt
        a_tile = A + k_idx[:, None] * sAt + i_idx[None, :] * sAi
        n_tb = tl.cdiv(T, BLOCK_T)
        p = tl.zeros((BLOCK_O, BLOCK_I), dtype=acc_ty)
        for it in range(0, (n1 - n0) * n_tb):
            n = n0 + it // n_tb
            t0 = (it % n_tb) * BLOCK_T
            if IDX64:
                n = tl.cast(n, tl.int64)
                t0 = tl.cast(t0, tl.int64)
            left = T - t0
            g = tl.load(g_tile + (n * sGn + t0 * sGt), mask=mask_o[:, None] & (offs_k[None, :] < left), other=0.0)
            a = tl.load(a_tile + (n * sAn + t0 * sAt), mask=(offs_k[:, None] < left) & mask_i[None, :], other=0.0)
            if UPCAST:  # interpreter only: its dot cannot multiply bf16 (exact upcast, same result)
                g = g.to(tl.float32)
                a = a.to(tl.float32)
            p = tl.dot(g, a, acc=p, input_precision=PREC, out_dtype=acc_ty)
            if left <= BLOCK_T:  # last T block: P_n is complete; accumulate P_n^2 / |P_n|, next sample
                if DO_SQ:
                    acc_sq += p * p
                if DO_ABS:
                    acc_ab += tl.abs(p)
                p = tl.zeros((BLOCK_O, BLOCK_I), dtype=acc_ty)

    mask = mask_o[:, None] & mask_i[None, :]
    rows = o_idx[:, None]
    cols = i_idx[None, :]
    if DO_SQ:
        flush(SQ + rows * s_sq_o + cols * s_sq_i, acc_sq, mask, n_splits, WIDE_SQ)
    if DO_ABS:
        flush(AB + rows * s_ab_o + cols * s_ab_i, acc_ab, mask, n_splits, WIDE_AB)


# CUDA configs (BLOCK_O, BLOCK_I, BLOCK_T, num_warps, num_stages) per kind of launch. Chosen from
# ptxas register reports for sm_90 (AOT-compiled, no spills with both outputs): the kernel keeps
# three BLOCK_O x BLOCK_I fp32 tiles in registers (P, sum P^2, sum |P|), so 128 x 128 tiles fit only
# with a single output; fp64 tiles take twice the registers.
CUDA_CONFIGS = {
    "fused16": [
        (64, 128, 32, 8, 3),
        (128, 64, 32, 8, 3),
        (64, 128, 64, 8, 3),
        (64, 64, 32, 4, 4),
        (64, 64, 64, 4, 3),
        (128, 128, 32, 8, 3),
    ],
    "fused32": [(64, 64, 16, 4, 3), (64, 64, 32, 8, 3), (64, 128, 16, 8, 3), (128, 64, 16, 8, 3), (64, 128, 32, 8, 3)],
    "fused64": [(64, 64, 16, 8, 3), (32, 64, 16, 4, 3)],
    "gemm": [(64, 64, 32, 4, 3), (64, 64, 16, 8, 3), (32, 64, 32, 4, 3)],
    "gemm64": [(64, 64, 16, 8, 3), (32, 64, 16, 4, 3)],
}


def _cuda_configs():
    seen = sorted({c for cfgs in CUDA_CONFIGS.values() for c in cfgs})
    return [
        triton.Config({"BLOCK_O": bo, "BLOCK_I": bi, "BLOCK_T": bt}, num_warps=w, num_stages=st)
        for bo, bi, bt, w, st in seen
    ]


def _prune(configs, named_args, **kwargs):
    """Keep the configs of this launch's kind whose tiles are not much larger than the problem."""
    G = named_args["G"]
    O, I = named_args["O"], named_args["I"]
    acc64 = G.dtype == torch.float64
    if kwargs.get("GEMM", False):
        kind = "gemm64" if acc64 else "gemm"
    else:
        kind = "fused64" if acc64 else ("fused32" if G.dtype == torch.float32 else "fused16")
    allowed = set(CUDA_CONFIGS[kind])
    two_outputs = bool(kwargs.get("DO_SQ", True)) and bool(kwargs.get("DO_ABS", True))
    keep = []
    for c in configs:
        bo, bi, bt = c.kwargs["BLOCK_O"], c.kwargs["BLOCK_I"], c.kwargs["BLOCK_T"]
        if (bo, bi, bt, c.num_warps, c.num_stages) not in allowed:
            continue
        if two_outputs and bo * bi > 64 * 128:
            continue
        if bo > max(32, triton.next_power_of_2(O)) or bi > max(64, triton.next_power_of_2(I)):
            continue
        keep.append(c)
    if not keep:  # tiny O / I: the smallest config of the kind
        small = min(CUDA_CONFIGS[kind], key=lambda c: c[0] * c[1])
        keep = [
            c
            for c in configs
            if (c.kwargs["BLOCK_O"], c.kwargs["BLOCK_I"], c.kwargs["BLOCK_T"], c.num_warps, c.num_stages) == small
        ]
    return keep


if triton_interpreter():
    _kernel = _persample_kernel
else:  # pragma: no cover - needs a CUDA device
    _kernel = triton.autotune(
        configs=_cuda_configs(),
        key=["O", "I", "key_n", "key_t", "DO_SQ", "DO_ABS", "GEMM", "PREC"],
        prune_configs_by={"early_config_prune": _prune},
        restore_value=["SQ", "AB"],
    )(_persample_kernel)


def _span(t: torch.Tensor) -> int:
    """Largest element offset reachable from the tensor's data pointer (+1)."""
    return 1 + sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()) if size > 0)


def _needs_idx64(*tensors) -> bool:
    # margin: masked lanes of the last T block may form offsets up to BLOCK_T rows past the end
    return any(_span(t) >= 2**30 for t in tensors)


PRECISIONS = ("ieee", "tf32")


def launch(
    sq_out, abs_out, G, A, *, splits: int | None = None, precision: str = "ieee", config: tuple | None = None
) -> None:
    """Launch the kernel; ``splits`` (sample splits) defaults to a heuristic filling the GPU.

    ``precision``: ``"ieee"`` (default: full fp32 products) or ``"tf32"`` (fp32 inputs rounded to
    tf32 on the tensor cores); it only changes fp32 inputs (16-bit inputs always use the tensor
    cores exactly, fp64 inputs fp64). ``config``: ``(BLOCK_O, BLOCK_I, BLOCK_T, num_warps,
    num_stages)`` to launch exactly that configuration instead of the autotuned / interpreter one
    (tests run every CUDA configuration on the edges of its tiles; warps and stages are ignored by
    the interpreter).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; valid: {', '.join(PRECISIONS)}")
    N, T, O = G.shape
    I = A.shape[2]
    if N == 0 or T == 0 or O == 0 or I == 0:
        return
    sq, ab, do_sq, do_abs = outputs(sq_out, abs_out)
    # bf16 under the interpreter: numpy has no bf16 matmul, so the fused path upcasts tiles to fp32
    flags = numerics(G, sq, ab, upcast_ok=T > 1)
    acc64 = flags["ACC_F64"]
    prec = "ieee" if G.dtype == torch.float32 or (T == 1 and not acc64) or flags["UPCAST"] else None
    if precision == "tf32" and G.dtype == torch.float32 and not triton_interpreter():
        prec = "tf32"
    gemm = T == 1
    device = G.device
    key_n = triton.next_power_of_2(N)
    key_t = triton.next_power_of_2(T)

    def grid(meta):
        tiles = triton.cdiv(O, meta["BLOCK_O"]) * triton.cdiv(I, meta["BLOCK_I"])
        if splits is not None:
            s = splits
        else:
            s = default_splits(tiles, device)
            if gemm:  # keep at least a few blocks of samples per split
                s = min(s, triton.cdiv(N, 64))
        return (tiles, clamp_splits(s, N))

    kwargs = dict(
        DO_SQ=do_sq,
        DO_ABS=do_abs,
        GEMM=gemm,
        PREC=prec,
        **flags,
        IDX64=_needs_idx64(G, A, sq, ab),
    )
    kernel = _kernel
    if config is not None:
        kernel = _persample_kernel
        bo, bi, bt, warps, stages = config
        kwargs.update(BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=bt)
        if not triton_interpreter():
            kwargs.update(num_warps=warps, num_stages=stages)
    elif triton_interpreter():
        kwargs.update(INTERPRETER_CONFIG)
    with device_guard(device):
        kernel[grid](
            G,
            A,
            sq,
            ab,
            N,
            T,
            O,
            I,
            G.stride(0),
            G.stride(1),
            G.stride(2),
            A.stride(0),
            A.stride(1),
            A.stride(2),
            sq.stride(0),
            sq.stride(1),
            ab.stride(0),
            ab.stride(1),
            key_n,
            key_t,
            **kwargs,
        )


def persample_sq(sq_out, abs_out, G, A):
    """sq_out += sum_n (G_n^T A_n)**2; abs_out += sum_n |G_n^T A_n| (either output may be None)."""
    launch(sq_out, abs_out, G, A)
