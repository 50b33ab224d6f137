"""Triton backend of ``persample_conv_sq_``: the launcher in ``ewc_fast.kernels.persample_conv``.

Same function name, signature and semantics as :mod:`._torch` (the readable twin).
"""

from ewc_fast.kernels.persample_conv import persample_conv_sq

__all__ = ["persample_conv_sq"]
