"""Consolidation state: what a continual learner keeps between tasks.

* :class:`EWC` (:mod:`.ewc`) -- the consolidated elastic-weight-consolidation penalty of any number
  of tasks, one quadratic per parameter.
* :class:`SynapticIntelligence` (:mod:`.si`) -- the SI path integral, tracked through optimizer hooks.
* :class:`WVA` (:mod:`.wva`) -- weight-velocity attenuation of optimizer steps.

All three sit on the multi-tensor ops of :mod:`ewc_fast.ops`. Package-internal support:
:mod:`.exclusion` (the protocol through which ``EWC`` tells Zenke SI trackers which part of ``.grad``
is its penalty, so that SI integrates the task gradient), :mod:`._state` (state-dict scaffolding) and
:mod:`._checks` (argument validation).
"""

from .ewc import EWC
from .si import SynapticIntelligence
from .wva import WVA

__all__ = ["EWC", "SynapticIntelligence", "WVA"]
