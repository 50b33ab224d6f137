"""The op layer: every kernel of ewc_fast behind one dispatch (triton / cpp / torch).

Ops are registered with ``torch.library`` (namespace ``ewc_fast``) and take lists of tensors, one
entry per parameter, so one call serves a whole model.
"""

from .consolidation import consolidate_, penalty_apply_, si_accumulate_, si_consolidate_, wva_attenuate_
from .persample import persample_sq_

__all__ = ["penalty_apply_", "consolidate_", "si_accumulate_", "si_consolidate_", "wva_attenuate_", "persample_sq_"]
