"""C++ backend of ``persample_sq_``: hands pointers, element strides and dtype codes to ``ewc_fast._C``.

The kernel (``csrc/persample.cpp``) reads ``G`` / ``A`` through their strides (any layout, no copies)
and adds into contiguous (O, I) outputs; the op layer guarantees contiguous outputs.
"""

from __future__ import annotations

import torch

from .._cpp_ext import dtype_code, ext, num_threads


def persample_sq(sq_out, abs_out, G, A):
    """sq_out += sum_n (G_n^T A_n)**2; abs_out += sum_n |G_n^T A_n| (either output may be None)."""
    N, T, O = G.shape
    I = A.shape[2]
    if N == 0 or T == 0 or O == 0 or I == 0:
        return
    for name, t in (("grad_out", G), ("inputs", A), ("sq_out", sq_out), ("abs_out", abs_out)):
        if t is not None and t.device.type != "cpu":
            raise ValueError(f"C++ backend: {name} is on {t.device}; it runs on CPU tensors only")
    for name, t in (("sq_out", sq_out), ("abs_out", abs_out)):
        if t is not None and (not t.is_contiguous() or t.dtype not in (torch.float32, torch.float64)):
            raise ValueError(f"C++ backend: {name} must be a contiguous float32/float64 tensor")
    if G.dtype != A.dtype:
        raise TypeError(f"C++ backend: grad_out dtype {G.dtype} != inputs dtype {A.dtype}")
    code = dtype_code(G)
    sq_ptr = sq_out.data_ptr() if sq_out is not None else 0
    ab_ptr = abs_out.data_ptr() if abs_out is not None else 0
    sq_code = dtype_code(sq_out) if sq_out is not None else -1
    ab_code = dtype_code(abs_out) if abs_out is not None else -1
    sg, sa = G.stride(), A.stride()
    ext().persample_sq(
        sq_ptr,
        sq_code,
        ab_ptr,
        ab_code,
        G.data_ptr(),
        A.data_ptr(),
        code,
        N,
        T,
        O,
        I,
        sg[0],
        sg[1],
        sg[2],
        sa[0],
        sa[1],
        sa[2],
        num_threads(),
    )
