"""ewc_fast: fused kernels for continual-learning importances and the EWC penalty."""
from ._backend import BackendUnavailable, available_backends
from . import ops

__version__ = "0.1.0"
__all__ = ["ops", "available_backends", "BackendUnavailable", "__version__"]
