"""ewc_fast: fused kernels for continual-learning importances and the EWC penalty."""
from ._backend import BackendUnavailable, available_backends
from . import ops
from .importance import Importance
from .estimation import estimate_importance
from .ewc import EWC
from .si import SynapticIntelligence
from .wva import WVA

__version__ = "0.1.0"
__all__ = ["ops", "available_backends", "BackendUnavailable", "__version__",
           "Importance", "estimate_importance", "EWC", "SynapticIntelligence", "WVA"]
