"""Consolidation state: what a continual learner keeps between tasks.

* :class:`EWC` (:mod:`.ewc`) -- the consolidated elastic-weight-consolidation penalty of any number
  of tasks, one quadratic per parameter.
* :class:`SynapticIntelligence` (:mod:`.si`) -- the SI path integral, tracked through optimizer hooks.
* :class:`WVA` (:mod:`.wva`) -- weight-velocity attenuation of optimizer steps.

All three sit on the multi-tensor ops of :mod:`ewc_fast.ops`.
"""

from .ewc import EWC
from .si import SynapticIntelligence
from .wva import WVA

__all__ = ["EWC", "SynapticIntelligence", "WVA"]
