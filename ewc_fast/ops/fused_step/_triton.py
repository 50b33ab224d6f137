"""Triton backend of the fused optimizer step: the launcher in ``ewc_fast.kernels.fused_step``.

Same function name, signature and semantics as :mod:`._torch` (the readable twin).
"""

from ewc_fast.kernels.fused_step import fused_step

__all__ = ["fused_step"]
