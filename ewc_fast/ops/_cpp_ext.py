"""Glue between torch tensors and the pointer-based C++ extension ``ewc_fast._C``.

The extension is compiled without torch headers; it receives raw data pointers, element counts and
dtype codes. Everything is validated here (device, contiguity, dtype) before a pointer is handed over.
"""

from __future__ import annotations

import torch

# keep in sync with csrc/common.h
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}


def ext():
    """The loaded extension module (raises ImportError if it was not built)."""
    from .. import _C  # deliberately lazy: the extension may not be built

    return _C


def dtype_code(t: torch.Tensor) -> int:
    try:
        return DTYPE_CODES[t.dtype]
    except KeyError:
        raise TypeError(
            f"C++ backend: unsupported dtype {t.dtype}; supported: float32, float64, bfloat16, float16"
        ) from None


def ptrs(tensors) -> list[int]:
    """Data pointers of CPU, contiguous tensors (checked)."""
    out = []
    for t in tensors:
        if t.device.type != "cpu":
            raise ValueError(f"C++ backend got a tensor on {t.device}")
        if not t.is_contiguous():
            raise ValueError("C++ backend needs contiguous tensors (the op layer should have made them so)")
        out.append(t.data_ptr())
    return out


def num_threads() -> int:
    """OpenMP threads used by the C++ kernels: follows ``torch.get_num_threads()``."""
    return max(1, int(torch.get_num_threads()))
