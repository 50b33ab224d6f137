"""Per-sample squared / absolute convolution weight-gradient statistics, ``persample_conv_sq_``.

For a convolution with ``groups`` groups (Og = O / groups output and Cg = C / groups input channels
per group), input X (N, C, *S) and output gradient G (N, O, *L), sample n's weight gradient is the
direct correlation of its input with its output gradient,

    dW_n[g*Og + o, c, k] = sum_l G[n, g*Og + o, l] * X[n, g*Cg + c, l*stride + k*dilation - padding]

(per spatial dim; X is zero outside its extent, so ``padding`` is leading zero padding and the
trailing padding is implied by L). ``persample_conv_sq_`` adds ``sum_n dW_n**2`` (the empirical
Fisher diagonal, unnormalised) to ``sq_out`` and ``sum_n |dW_n|`` (MAS) to ``abs_out``. The fused
kernels never form the unfolded (im2col) input nor the N x O x Cg*K per-sample gradients: per sample
they run the weight-gradient GEMM tile by tile over the output positions (an implicit GEMM whose
input panel is gathered straight from X), square / take |.| of each finished register tile and
accumulate it: O(weight) memory and the FLOPs of one plain weight-gradient backward. Non-zero
padding modes (reflect, replicate, circular) are the caller's business: pad the input first and
pass ``padding=0``.

Backends (resolved by :mod:`ewc_fast.ops.backends`), same function
``persample_conv_sq(sq_out, abs_out, G, X, stride, padding, dilation, groups)`` in each of
``ewc_fast/ops/persample_conv/_<backend>.py``: torch (``_torch.py``: per kernel tap, chunked batched
GEMMs over strided views of the zero-padded input), C++ (``_cpp.py`` -> ``csrc/persample_conv.cpp``:
fused implicit-GEMM tile kernel, OpenMP) and Triton (``_triton.py`` -> ``kernels/persample_conv.py``).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

from torch import Tensor

from .._registry import define_op, resolve_impl
from .._validate import PARAM_DTYPES, STATE_DTYPES, bump_versions, check_no_overlap, check_writable, contiguous_inout


@define_op("persample_conv_sq_", mutates=("sq_out", "abs_out"), device_arg="grad_out")
def _persample_conv_sq(
    sq_out: Tensor | None,
    abs_out: Tensor | None,
    grad_out: Tensor,
    inputs: Tensor,
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    groups: int,
    backend: str,
) -> None:
    ref = sq_out if sq_out is not None else abs_out
    if grad_out.numel() == 0 or inputs.shape[1] == 0 or ref.numel() == 0:
        return
    impl = resolve_impl(backend, "persample_conv", grad_out.device)
    outs = [t for t in (sq_out, abs_out) if t is not None]
    with contiguous_inout(outs) as work:
        it = iter(work)
        sq = next(it) if sq_out is not None else None
        ab = next(it) if abs_out is not None else None
        impl.persample_conv_sq(sq, ab, grad_out, inputs, tuple(stride), tuple(padding), tuple(dilation), groups)
    bump_versions(outs)


def _storage_ptr(t: Tensor) -> int | None:
    try:
        return t.untyped_storage().data_ptr() if t.numel() > 0 else None
    except Exception:  # fake / functional tensors under tracing have no storage pointer
        return None


def _int_tuple(op: str, name: str, value, d: int, low: int) -> list[int]:
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        vals = [int(value)] * d
    elif isinstance(value, Sequence) and all(
        isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value
    ):
        vals = [int(v) for v in value]
        if len(vals) != d:
            raise ValueError(f"{op}: {name} has {len(vals)} entries; the convolution has {d} spatial dims")
    else:
        raise TypeError(f"{op}: {name} must be an int or a sequence of {d} ints, got {value!r}")
    if any(v < low for v in vals):
        raise ValueError(f"{op}: {name} = {vals}; every entry must be >= {low}")
    return vals


def persample_conv_sq_(
    sq_out: Tensor | None,
    abs_out: Tensor | None,
    grad_out: Tensor,
    inputs: Tensor,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
    dilation: int | Sequence[int] = 1,
    groups: int = 1,
    backend: str = "auto",
) -> None:
    """Accumulate per-sample squared and absolute convolution weight gradients in place.

    ``inputs`` X (N, C, *S) and ``grad_out`` G (N, O, *L), with 1 to 3 spatial dims: same float
    dtype (fp32, fp64, bf16, fp16), same device, any strides (channels-last included).
    ``sq_out`` / ``abs_out``: the weight's shape (O, C / groups, *kernel), float32/float64, or None
    (at least one). With dW_n[g*Og+o, c, k] = sum_l G[n, g*Og+o, l] X[n, g*Cg+c, l*stride +
    k*dilation - padding] (zero outside X): ``sq_out += sum_n dW_n**2``, ``abs_out += sum_n |dW_n|``,
    computed in fp32 (fp64 for fp64 inputs). ``padding`` is leading zero padding per dim (the
    trailing side follows from L); other padding modes: pad ``inputs`` first. ``backend``:
    ``"auto"`` (default), ``"triton"``, ``"cpp"`` or ``"torch"``.
    """
    op = _persample_conv_sq.name
    if sq_out is None and abs_out is None:
        raise ValueError(f"{op}: sq_out and abs_out are both None; give at least one output")
    for name, t in (("grad_out", grad_out), ("inputs", inputs)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if not 3 <= t.dim() <= 5:
            raise ValueError(
                f"{op}: {name} must be (N, channels, *spatial) with 1-3 spatial dims, got {tuple(t.shape)}"
            )
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed: {[str(d) for d in PARAM_DTYPES]}")
    if grad_out.dtype != inputs.dtype:
        raise TypeError(f"{op}: grad_out dtype {grad_out.dtype} != inputs dtype {inputs.dtype}")
    if grad_out.dim() != inputs.dim() or grad_out.shape[0] != inputs.shape[0]:
        raise ValueError(
            f"{op}: grad_out (N, O, *L) = {tuple(grad_out.shape)} and inputs (N, C, *S) = {tuple(inputs.shape)} "
            "differ in N or in the number of spatial dims"
        )
    if grad_out.device != inputs.device:
        raise ValueError(f"{op}: grad_out on {grad_out.device} but inputs on {inputs.device}")
    d = inputs.dim() - 2
    stride = _int_tuple(op, "stride", stride, d, 1)
    padding = _int_tuple(op, "padding", padding, d, 0)
    dilation = _int_tuple(op, "dilation", dilation, d, 1)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    groups = int(groups)
    O, C = grad_out.shape[1], inputs.shape[1]
    if O % groups or C % groups:
        raise ValueError(f"{op}: groups = {groups} must divide both O = {O} and C = {C}")
    ref = sq_out if sq_out is not None else abs_out
    for name, t in (("sq_out", sq_out), ("abs_out", abs_out)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if t.dim() != d + 2 or tuple(t.shape[:2]) != (O, C // groups) or any(k < 1 for k in t.shape[2:]):
            raise ValueError(
                f"{op}: {name} has shape {tuple(t.shape)}; expected the weight's (O, C/groups, *kernel) = "
                f"({O}, {C // groups}, {', '.join(['k'] * d)}) with every k >= 1"
            )
        if t.shape != ref.shape:
            raise ValueError(f"{op}: sq_out {tuple(sq_out.shape)} and abs_out {tuple(abs_out.shape)} differ in shape")
        if t.dtype not in STATE_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed: {[str(d) for d in STATE_DTYPES]}")
        if t.device != grad_out.device:
            raise ValueError(f"{op}: {name} on {t.device} but grad_out on {grad_out.device}")
    outs = {k: v for k, v in (("sq_out", sq_out), ("abs_out", abs_out)) if v is not None}
    ptrs = {k: _storage_ptr(v) for k, v in {**outs, "grad_out": grad_out, "inputs": inputs}.items()}
    for a in outs:
        for b, pb in ptrs.items():
            if b != a and ptrs[a] is not None and ptrs[a] == pb:
                raise ValueError(f"{op}: {a} shares memory with {b}; give outputs that alias nothing")
    check_no_overlap(op, outs, {"grad_out": grad_out, "inputs": inputs})  # expanded outputs, partial overlaps
    check_writable(op, **outs)
    _persample_conv_sq(sq_out, abs_out, grad_out, inputs, stride, padding, dilation, groups, backend)
