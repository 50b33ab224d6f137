"""Training-trajectory importance measures (the weight-importance baselines of McAlister's
"Neural-Network-Weight-Importance-Measures" study) and inverse magnitude.

A :class:`TrajectoryTracker` hooks an optimizer (``register_step_pre_hook`` /
``register_step_post_hook``) and, for every trainable parameter entry θ_i, counts over the optimizer
steps s = 1…S with Δθ_i^(s) = θ_i^(s) − θ_i^(s−1):

* ``sign_flips``      = #{s : θ_i^(s−1) · θ_i^(s) < 0}            (the weight changed sign)
* ``dw_sign_changes`` = #{s ≥ 2 : Δθ_i^(s−1) · Δθ_i^(s) < 0}      (the update reversed direction)
* ``abs_change``      = Σ_s |Δθ_i^(s)|                              (total absolute change, path length)

A larger value counts as *more important* (the pruning tool removes the smallest first), the
convention of every importance in this package; the study treats these as heuristics to be
ranked, not as established importances. :func:`inverse_magnitude` is ``1/|θ|`` (``+inf`` at 0): a
control that ranks large weights as unimportant, the opposite of ``|w|``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..importance import Importance

__all__ = ["TRACKER_MEASURES", "TrajectoryTracker", "inverse_magnitude"]

#: the measures a :class:`TrajectoryTracker` returns
TRACKER_MEASURES = ("sign_flips", "dw_sign_changes", "abs_change")


class TrajectoryTracker:
    """Counts sign flips of θ, sign changes of Δθ and Σ|Δθ| over optimizer steps (module doc)."""

    def __init__(self, model: nn.Module):
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self._before: dict[str, torch.Tensor] = {}
        self._last_dw: dict[str, torch.Tensor | None] = dict.fromkeys(self.params)
        self.counts = {
            m: {n: torch.zeros_like(p, dtype=torch.float32) for n, p in self.params.items()} for m in TRACKER_MEASURES
        }
        self.steps = 0
        self._handles: list = []

    def attach(self, optimizer: torch.optim.Optimizer) -> TrajectoryTracker:
        """Record every ``optimizer.step()`` from now on; returns ``self``."""
        self._handles.append(optimizer.register_step_pre_hook(self._pre))
        self._handles.append(optimizer.register_step_post_hook(self._post))
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    @torch.no_grad()
    def _pre(self, optimizer, args, kwargs) -> None:
        self._before = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def _post(self, optimizer, args, kwargs) -> None:
        for n, p in self.params.items():
            old = self._before[n]
            new = p.detach()
            dw = new - old
            self.counts["sign_flips"][n] += ((old * new) < 0).float()
            prev = self._last_dw[n]
            if prev is not None:
                self.counts["dw_sign_changes"][n] += ((prev * dw) < 0).float()
            self.counts["abs_change"][n] += dw.abs().float()
            self._last_dw[n] = dw
        self._before = {}
        self.steps += 1

    def importances(self) -> dict[str, Importance]:
        """``{measure: Importance}`` of the counts so far (copies)."""
        return {
            m: Importance(
                {n: t.clone() for n, t in self.counts[m].items()}, method=m, n_samples=0, meta={"steps": self.steps}
            )
            for m in TRACKER_MEASURES
        }


@torch.no_grad()
def inverse_magnitude(model: nn.Module) -> Importance:
    """``1/|θ|`` per trainable entry (``+inf`` where θ = 0): large weights rank as unimportant."""
    return Importance(
        {n: 1.0 / p.detach().abs().float() for n, p in model.named_parameters() if p.requires_grad},
        method="inverse_magnitude",
        n_samples=0,
    )
