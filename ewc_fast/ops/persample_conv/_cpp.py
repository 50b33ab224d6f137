"""C++ backend of ``persample_conv_sq_``: hands pointers, sizes, element strides and dtype codes to
``ewc_fast._C``.

The kernel (``csrc/persample_conv.cpp``) reads X and G through their strides (any layout) and adds
into contiguous (O, Cg, *K) outputs, which the op layer guarantees. Its packed and in-place paths read
runs of consecutive channels: channels-last X and G are read where they lie; otherwise the kernel
copies a few samples at a time channels-last into one reused buffer of its own (no full-size copy
here). 1-D and 2-D convolutions are passed as 3-D ones with leading size-1 spatial dims.
"""

from __future__ import annotations

import torch

from .._cpp_ext import dtype_code, ext, num_threads


def _pad3(vals, fill):
    vals = list(vals)
    return [fill] * (3 - len(vals)) + vals


def persample_conv_sq(sq_out, abs_out, G, X, stride, padding, dilation, groups):
    """sq_out += sum_n dW_n**2; abs_out += sum_n |dW_n| (either output may be None)."""
    ref = sq_out if sq_out is not None else abs_out
    N, O = G.shape[:2]
    C = X.shape[1]
    if N == 0 or G.numel() == 0 or O == 0 or C == 0:
        return
    for name, t in (("grad_out", G), ("inputs", X), ("sq_out", sq_out), ("abs_out", abs_out)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"C++ backend: {name} is on {t.device}; it runs on CPU tensors only")
    for name, t in (("sq_out", sq_out), ("abs_out", abs_out)):
        if t is not None and (not t.is_contiguous() or t.dtype not in (torch.float32, torch.float64)):
            raise ValueError(f"C++ backend: {name} must be a contiguous float32/float64 tensor")
    if G.dtype != X.dtype:
        raise TypeError(f"C++ backend: grad_out dtype {G.dtype} != inputs dtype {X.dtype}")
    sx, sg = X.stride(), G.stride()
    ext().persample_conv_sq(
        sq_out.data_ptr() if sq_out is not None else 0,
        dtype_code(sq_out) if sq_out is not None else -1,
        abs_out.data_ptr() if abs_out is not None else 0,
        dtype_code(abs_out) if abs_out is not None else -1,
        X.data_ptr(),
        G.data_ptr(),
        dtype_code(G),
        N,
        groups,
        C // groups,
        O // groups,
        _pad3(X.shape[2:], 1),
        _pad3(G.shape[2:], 1),
        _pad3(ref.shape[2:], 1),
        _pad3(stride, 1),
        _pad3(padding, 0),
        _pad3(dilation, 1),
        [sx[0], sx[1]] + _pad3(sx[2:], 0),
        [sg[0], sg[1]] + _pad3(sg[2:], 0),
        num_threads(),
    )
