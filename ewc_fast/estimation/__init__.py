"""Importance estimation: :func:`estimate_importance` and its pluggable per-layer rules.

* :mod:`.engine`      — the data pass (capture, seeds, dispatch, restore) and the public function.
* :mod:`.methods`     — method names, per-sample losses, backward seeds (formulas in its docstring).
* :mod:`.rules`       — per-layer rules (Linear, Conv, Embedding, norms, MultiheadAttention), registry ``RULES``.
* :mod:`.fallback`    — exact ``torch.func`` per-sample fallback for modules without a rule.
* :mod:`.distributed` — all-reduce of sums and counts across ranks.
"""

from .engine import estimate_importance
from .fallback import BATCH_DIMS
from .methods import METHODS
from .rules import RULES, Call, Rule, register_rule, rule_for

__all__ = ["estimate_importance", "METHODS", "RULES", "BATCH_DIMS", "Rule", "Call", "register_rule", "rule_for"]
