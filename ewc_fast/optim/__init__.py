"""Fused optimizers: ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` whose step also adds the EWC penalty
gradient, accumulates Synaptic Intelligence and applies WVA attenuation, in one pass over memory
(:func:`ewc_fast.ops.fused_step_`). Usage and trade-offs: docs/OPTIM.md.

    opt = ewc_fast.optim.AdamW(model.parameters(), lr=1e-3, ewc=ewc, si=si)
    loss.backward(); opt.step()          # no ewc.apply_(), no si.attach(opt)
"""

from ._base import FusedOptimizer
from .optimizers import SGD, Adam, AdamW

__all__ = ["FusedOptimizer", "SGD", "Adam", "AdamW"]
