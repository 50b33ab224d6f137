"""Triton backend of ``persample_sq_``: the launcher in ``ewc_fast.kernels.persample``.

Same function name, signature and semantics as :mod:`._torch` (the readable twin).
"""

from ewc_fast.kernels.persample import persample_sq

__all__ = ["persample_sq"]
