"""Importance estimation: :func:`estimate_importance` and its pluggable per-layer rules.

* :mod:`.api`         -- the public :func:`estimate_importance`: argument checks, defaults, results.
* :mod:`.engine`      -- the data pass: per batch one forward, one backward per seed; sums -> means.
* :mod:`.batches`     -- what a batch holds (inputs, targets, size), truncation, the model call.
* :mod:`.plan`        -- which path (rule, tied sum, fallback) serves each parameter, from its uses.
* :mod:`.capture`     -- forward hooks recording the planned calls; in-place detection; saved model state.
* :mod:`.stream`      -- the backward to the captured outputs and the consumer of their gradients.
* :mod:`.tied`        -- the sums of a tied parameter (kernel + row correction, or dense per-sample gradients).
* :mod:`.methods`     -- method names, per-sample losses, backward seeds, divisors (formulas in its docstring).
* :mod:`.sig`         -- SIG's factor sums and its collective |w| fallback.
* :mod:`.rules`       -- per-layer rules (Linear, Conv, Embedding, norms, MultiheadAttention), registry ``RULES``.
* :mod:`.fallback`    -- exact ``torch.func`` per-sample fallback for modules without a rule.
* :mod:`.distributed` -- all-reduce of sums and counts across ranks.
"""

from .api import estimate_importance
from .fallback import BATCH_DIMS
from .methods import METHODS
from .rules import RULES, Call, Rule, register_rule, rule_for

__all__ = ["estimate_importance", "METHODS", "RULES", "BATCH_DIMS", "Rule", "Call", "register_rule", "rule_for"]
