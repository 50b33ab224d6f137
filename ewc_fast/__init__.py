"""ewc_fast: fused kernels for continual-learning importances and the EWC penalty.

Layers (``docs/ARCHITECTURE.md``): ``ewc_fast.kernels`` (Triton) and ``ewc_fast._C`` (C++) ->
:mod:`ewc_fast.ops` (one op layer, three backends) -> :mod:`ewc_fast.estimation` (importances) and
:mod:`ewc_fast.consolidation` (EWC, SI, WVA) -> :mod:`ewc_fast.experiments` -> :mod:`ewc_fast.cli`.
"""

from . import ops
from ._version import __version__
from .consolidation import EWC, WVA, SynapticIntelligence
from .estimation import estimate_importance
from .importance import Importance
from .ops.backends import BackendUnavailable, available_backends

__all__ = [
    "ops",
    "available_backends",
    "BackendUnavailable",
    "__version__",
    "Importance",
    "estimate_importance",
    "EWC",
    "SynapticIntelligence",
    "WVA",
]
