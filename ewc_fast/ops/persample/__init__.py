"""Per-sample squared / absolute weight-gradient statistics of a Linear layer, ``persample_sq_``.

For a Linear layer applied to a sequence, ``grad_out`` G (N, T, O) holds dLoss/d(output) and
``inputs`` A (N, T, I) the layer inputs; the per-sample weight gradient is P_n = G_n^T A_n (O x I,
summed over the T positions). ``persample_sq_`` adds ``sum_n P_n**2`` (the empirical-Fisher
diagonal, unnormalised) to ``sq_out`` and ``sum_n |P_n|`` (MAS) to ``abs_out`` without ever
materialising the N x O x I per-sample gradients (which is what Opacus or torch.func do). For T == 1,
P_n is an outer product and both sums are exact GEMMs: (G*G)^T (A*A) and |G|^T |A|. For T > 1 the
squares do not factor; the fused kernels tile (O, I) like a GEMM, loop over the samples inside the
program, contract over T into a register tile and accumulate tile**2 and |tile|: O(O*I) memory and
the FLOPs of one weight-gradient GEMM. (The lesson of FlashNorm, a Triton per-sample-norm kernel: a
naive per-sample loop is many times slower than a GEMM; tile like a GEMM.)

Backends (resolved by :mod:`ewc_fast.ops.backends`), same function ``persample_sq(sq_out, abs_out, G, A)``
in each of ``ewc_fast/ops/persample/_<backend>.py``: torch (``_torch.py``: GEMMs for T == 1, chunked
bmm otherwise), C++ (``_cpp.py`` -> ``csrc/persample.cpp``: fused OpenMP tile kernel) and Triton
(``_triton.py`` -> ``kernels/persample.py``: fused tile kernel, ``tl.dot`` over T into a register tile).
"""

from __future__ import annotations

from torch import Tensor

from .._registry import define_op, resolve_impl
from .._validate import PARAM_DTYPES, STATE_DTYPES, bump_versions, check_no_overlap, check_writable, contiguous_inout


@define_op("persample_sq_", mutates=("sq_out", "abs_out"), device_arg="grad_out")
def _persample_sq(
    sq_out: Tensor | None, abs_out: Tensor | None, grad_out: Tensor, inputs: Tensor, backend: str
) -> None:
    N, T, _ = grad_out.shape
    if N == 0 or T == 0 or grad_out.shape[2] == 0 or inputs.shape[2] == 0:
        return
    impl = resolve_impl(backend, "persample", grad_out.device)
    outs = [t for t in (sq_out, abs_out) if t is not None]
    with contiguous_inout(outs) as work:
        it = iter(work)
        sq = next(it) if sq_out is not None else None
        ab = next(it) if abs_out is not None else None
        impl.persample_sq(sq, ab, grad_out, inputs)
    bump_versions(outs)


def persample_sq_(
    sq_out: Tensor | None, abs_out: Tensor | None, grad_out: Tensor, inputs: Tensor, *, backend: str = "auto"
) -> None:
    """Accumulate per-sample squared and absolute Linear weight gradients in place.

    ``grad_out`` (N, T, O) and ``inputs`` (N, T, I): same float dtype (fp32, fp64, bf16, fp16), any
    strides. ``sq_out`` / ``abs_out``: (O, I) float32/float64 tensors on the same device, or None (at
    least one must be given). With P_n = grad_out[n]^T @ inputs[n]:
    ``sq_out += sum_n P_n**2`` and ``abs_out += sum_n |P_n|``, computed in fp32 (fp64 for fp64
    inputs). Memory stays bounded: the N x O x I per-sample gradients are never formed.
    ``backend``: ``"auto"`` (default), ``"triton"``, ``"cpp"`` or ``"torch"``.
    """
    op = _persample_sq.name
    if sq_out is None and abs_out is None:
        raise ValueError(f"{op}: sq_out and abs_out are both None; give at least one output")
    for name, t in (("grad_out", grad_out), ("inputs", inputs)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{op}: {name} must be 3-D (N, T, features), got shape {tuple(t.shape)}")
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed: {[str(d) for d in PARAM_DTYPES]}")
    if grad_out.dtype != inputs.dtype:
        raise TypeError(f"{op}: grad_out dtype {grad_out.dtype} != inputs dtype {inputs.dtype}")
    if grad_out.shape[:2] != inputs.shape[:2]:
        raise ValueError(
            f"{op}: grad_out (N, T, O) = {tuple(grad_out.shape)} and inputs (N, T, I) = "
            f"{tuple(inputs.shape)} differ in N or T"
        )
    if grad_out.device != inputs.device:
        raise ValueError(f"{op}: grad_out on {grad_out.device} but inputs on {inputs.device}")
    expected = (grad_out.shape[2], inputs.shape[2])
    for name, t in (("sq_out", sq_out), ("abs_out", abs_out)):
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: {name} must be a Tensor or None, got {type(t).__name__}")
        if tuple(t.shape) != expected:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}; expected (O, I) = {expected}")
        if t.dtype not in STATE_DTYPES:
            raise TypeError(f"{op}: {name} has dtype {t.dtype}; allowed: {[str(d) for d in STATE_DTYPES]}")
        if t.device != grad_out.device:
            raise ValueError(f"{op}: {name} on {t.device} but grad_out on {grad_out.device}")
    check_no_overlap(op, {"sq_out": sq_out, "abs_out": abs_out}, {"grad_out": grad_out, "inputs": inputs})
    check_writable(op, sq_out=sq_out, abs_out=abs_out)
    _persample_sq(sq_out, abs_out, grad_out, inputs, backend)
