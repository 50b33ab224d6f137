"""Triton backend of the consolidation ops: the launchers in ``ewc_fast.kernels.consolidation``.

Same function names, signatures and semantics as :mod:`._torch` (the readable twin).
"""

from ewc_fast.kernels.consolidation import consolidate, penalty_apply, si_accumulate, si_consolidate, wva_attenuate

__all__ = ["penalty_apply", "consolidate", "si_accumulate", "si_consolidate", "wva_attenuate"]
