"""Launch glue shared by the per-sample Triton kernels (``kernels/persample.py`` for Linear layers,
``kernels/persample_conv.py`` for convolutions): the tile flush, the stand-in pointer of an absent
output, the sample-split heuristic and the numerics flags common to both launches.

Both kernels add ``sum_n P_n**2`` / ``sum_n |P_n|`` of an output tile into in-place outputs: with one
split per tile a read-add-write (in fp64 when the output or the accumulator is fp64, rounded once),
with several splits ``tl.atomic_add`` (the GPU is filled by splitting the samples of a small tile grid).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .multi_tensor import triton_interpreter


@triton.jit
def flush(ptrs, acc, mask, n_splits, WIDE: tl.constexpr):
    """``*ptrs += acc`` where ``mask``: in place with one split (in fp64 if ``WIDE``), atomically else."""
    out_ty = ptrs.dtype.element_ty
    if n_splits > 1:
        tl.atomic_add(ptrs, acc.to(out_ty), mask=mask, sem="relaxed")
    else:
        cur = tl.load(ptrs, mask=mask, other=0.0)
        if WIDE:  # an fp64 output or fp64 accumulator: add in fp64, round once
            new = (cur.to(tl.float64) + acc.to(tl.float64)).to(out_ty)
        else:
            new = cur + acc.to(out_ty)
        tl.store(ptrs, new, mask=mask)


def target_programs(device: torch.device) -> int:
    """Programs a launch should have to fill the device."""
    if device.type == "cuda":
        return 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a few programs (exercises the split / atomic path on small problems)


def default_splits(tiles: int, device: torch.device) -> int:
    """Sample splits per tile so that ``tiles`` tiles fill the device (1 when they already do)."""
    target = target_programs(device)
    return 1 if tiles >= target else triton.cdiv(target, tiles)


def clamp_splits(splits: int, n: int) -> int:
    """Splits between 1 and min(N, the grid's second-axis limit)."""
    return max(1, min(int(splits), n, 65535))


def outputs(sq_out, abs_out):
    """``(sq, ab, DO_SQ, DO_ABS)``: an absent output is replaced by the other one as a stand-in pointer
    (never touched: the kernel's DO_* flag is off)."""
    do_sq, do_abs = sq_out is not None, abs_out is not None
    return (sq_out if do_sq else abs_out), (abs_out if do_abs else sq_out), do_sq, do_abs


def numerics(G: torch.Tensor, sq: torch.Tensor, ab: torch.Tensor, upcast_ok: bool = True) -> dict:
    """The flags shared by both kernels: ACC_F64 (fp64 accumulation), UPCAST (bf16 tiles to fp32 under
    the interpreter: numpy has no bf16 matmul; exact), WIDE_SQ / WIDE_AB (flush in fp64)."""
    acc64 = G.dtype == torch.float64
    return dict(
        ACC_F64=acc64,
        UPCAST=upcast_ok and triton_interpreter() and G.dtype == torch.bfloat16,
        WIDE_SQ=acc64 or sq.dtype == torch.float64,
        WIDE_AB=acc64 or ab.dtype == torch.float64,
    )
