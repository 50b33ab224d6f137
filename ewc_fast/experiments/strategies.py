"""Consolidation strategies: what each method of :data:`METHODS` does around training.

A strategy is attached once (``attach(optimizer)``), adds its penalty gradient after every
``backward`` (``after_backward``, ``None`` when it has none) and consolidates after each task
(``end_task(x_imp, y_imp, generator)``, which returns the seconds spent estimating importances):
``end_task`` times the subclass's ``importance`` (the task's importance) and then hands it to its
``consolidate``. :func:`make_strategy` builds the one for ``cfg.method``;
:func:`ewc_fast.experiments.continual.run_sequence` and :func:`ewc_fast.experiments.overlap.run_overlap`
drive them. A new method is one subclass here (``importance`` + ``consolidate``), its name in
:data:`METHODS` and its factory in ``_FACTORIES``.

=============  ==================================================================================
none           :class:`Strategy`: plain sequential training
l2             :class:`EWCStrategy` with Ω = 1 (:func:`.training.unit_importance`)
fisher …       :class:`EWCStrategy`: :class:`ewc_fast.EWC` (``mode="separate"``, one anchor per task)
(fisher,       fed by :func:`.training.estimate` with that method after each task
fisher_mc,     (``fisher_batched``: the approximate square of the batch-mean gradient,
fisher_exact,  ``importance_batch`` samples per batch — van de Ven 2025's BATCHED)
fisher_batched,
mas, sig)
si             :class:`SIStrategy`: Zenke et al. 2017's synaptic intelligence
wva            :class:`WVAStrategy`: weight-velocity attenuation (Kutalev 2020, arXiv 2005.07107)
=============  ==================================================================================

``cfg.stabilize`` gives the EWC penalties Kutalev & Lapina 2021's stabilisation
(``stabilize_lr = cfg.lr``; arXiv 2109.10021).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..consolidation import EWC, WVA, SynapticIntelligence
from ..importance import Importance
from .training import estimate, unit_importance

if TYPE_CHECKING:  # the run configuration; imported for annotations only (continual imports this module)
    from .continual import RunConfig
    from .tasks import Task

__all__ = [
    "METHODS",
    "IMPORTANCE_METHODS",
    "Strategy",
    "EWCStrategy",
    "SIStrategy",
    "WVAStrategy",
    "make_strategy",
    "ANCHORS",
]

#: EWC anchoring (``RunConfig.anchor``): a penalty per previous task / only the previous task /
#: summed importances at the latest optimum
ANCHORS = ("all", "previous", "latest")

#: every consolidation method :func:`make_strategy` knows
METHODS = ("none", "l2", "fisher", "fisher_mc", "fisher_exact", "fisher_batched", "mas", "si", "sig", "wva")
#: the methods that are an importance estimator of :func:`ewc_fast.estimate_importance` feeding EWC
IMPORTANCE_METHODS = ("fisher", "fisher_mc", "fisher_exact", "fisher_batched", "mas", "sig")


def _ewc(model: nn.Module, cfg: RunConfig, mode: str) -> EWC:
    """An empty :class:`ewc_fast.EWC` of strength ``cfg.lam`` (stabilised when ``cfg.stabilize``, with
    ``stabilize_lr = cfg.lr``)."""
    return EWC(model, cfg.lam, mode=mode, **({"stabilize_lr": cfg.lr} if cfg.stabilize else {}))


class Strategy:
    """No consolidation; the base class. ``attach`` once, ``after_backward`` each step (``None``:
    nothing to add), ``end_task`` after each task (returns seconds spent estimating importances).

    A subclass says what it does after a task in two steps, which :meth:`end_task` runs and times:
    :meth:`importance` (the task's importance, the timed part) and :meth:`consolidate` (merge it)."""

    after_backward = None

    def __init__(self, model: nn.Module, cfg: RunConfig):
        self.model, self.cfg = model, cfg
        self.last_stats: dict | None = None  # importance_stats of the latest end_task

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        pass

    def importance(
        self, x_imp: torch.Tensor, y_imp: torch.Tensor, generator: torch.Generator | None, task: Task | None
    ) -> Importance | None:
        """The importance of the task just trained (``None``: nothing to consolidate)."""
        return None

    def consolidate(self, imp: Importance | None) -> None:
        """Merge ``imp`` (from :meth:`importance`) into the consolidation state."""

    def end_task(
        self,
        x_imp: torch.Tensor,
        y_imp: torch.Tensor,
        generator: torch.Generator | None,
        task: Task | None = None,
    ) -> float:
        """Consolidate after a task (``task``: its head for a multi-head model); seconds spent estimating."""
        t0 = time.perf_counter()
        imp = self.importance(x_imp, y_imp, generator, task)
        dt = time.perf_counter() - t0
        self.last_stats = importance_stats(imp)
        self.consolidate(imp)
        return dt

    def _estimate(
        self,
        method: str,
        x_imp: torch.Tensor,
        y_imp: torch.Tensor,
        generator: torch.Generator | None,
        task: Task | None,
    ) -> Importance:
        return estimate(self.model, x_imp, y_imp, (method,), self.cfg, generator=generator, task=task)[method]


def importance_stats(imp: Importance | None) -> dict | None:
    """The two numbers Kutalev & Lapina's scripts log after each task, for the importance
    :meth:`Strategy.importance` returned (SI: the running sum): the largest entry over every tensor,
    ``max = max_t max_i Ω_t,i``, and the largest per-tensor mean, ``max_mean = max_t mean_i Ω_t,i``
    (``None`` when there is no importance or every tensor is empty)."""
    tensors = [t.detach() for t in imp.values() if t.numel()] if imp is not None else []
    if not tensors:
        return None
    return {
        "max": max(float(t.max()) for t in tensors),
        "max_mean": max(float(t.double().mean()) for t in tensors),
    }


class EWCStrategy(Strategy):
    """EWC (Kirkpatrick et al. 2017), Ω_k from ``importance_method`` (``None``: Ω = 1, ``l2``).

    ``cfg.anchor``: ``"all"`` — after task k the penalty gains ``(λ/2) Σ_i Ω_k,i (θ_i − θ*_k,i)²``
    (one anchor per task, summed exactly); ``"previous"`` — the penalty is only the latest task's
    term; ``"latest"`` — ``(λ/2) Σ_i (Σ_k Ω_k,i)(θ_i − θ*_latest,i)²`` (online EWC with γ = 1)."""

    def __init__(self, model: nn.Module, cfg: RunConfig, importance_method: str | None):
        super().__init__(model, cfg)
        self.ewc = self._fresh()
        self.importance_method = importance_method

    def _fresh(self) -> EWC:
        return _ewc(self.model, self.cfg, "online" if self.cfg.anchor == "latest" else "separate")

    def after_backward(self) -> None:
        self.ewc.apply_()

    def importance(self, x_imp, y_imp, generator, task) -> Importance:
        if self.importance_method is None:
            return unit_importance(self.model)
        return self._estimate(self.importance_method, x_imp, y_imp, generator, task)

    def consolidate(self, imp: Importance) -> None:
        if self.cfg.anchor == "previous":
            self.ewc = self._fresh()
        self.ewc.consolidate(imp)


class SIStrategy(Strategy):
    """Zenke et al. 2017's SI: path integral per optimizer step; after each task the penalty is
    rebuilt as one quadratic at the latest parameters with the running importance ``si.cumulative``
    (a fresh online :class:`ewc_fast.EWC`, λ = 2c). Kutalev's unclipped variant
    (``cfg.si_variant="kutalev"``) can produce negative entries: they are clamped at 0 for the
    penalty (EWC needs Ω ≥ 0)."""

    def __init__(self, model: nn.Module, cfg: RunConfig):
        super().__init__(model, cfg)
        self.si = SynapticIntelligence(model, xi=cfg.si_xi, variant=cfg.si_variant)
        self.ewc = None

    def after_backward(self) -> None:
        if self.ewc is not None:
            self.ewc.apply_()

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.si.attach(optimizer)

    def importance(self, x_imp, y_imp, generator, task) -> Importance:
        self.si.consolidate()
        return self.si.cumulative

    def consolidate(self, imp: Importance) -> None:
        if any(bool((t < 0).any()) for t in imp.values()):
            imp = type(imp)(
                {k: t.clamp_min(0) for k, t in imp.items()}, method=imp.method, n_samples=imp.n_samples, meta=imp.meta
            )
        self.ewc = _ewc(self.model, self.cfg, "online").consolidate(imp)


class WVAStrategy(Strategy):
    """Weight-velocity attenuation (Kutalev 2020): no penalty, each optimizer step is attenuated by
    ``1/(1 + λA)``; A accumulates ``cfg.wva_importance`` (SIG by default) after each task."""

    def __init__(self, model: nn.Module, cfg: RunConfig):
        super().__init__(model, cfg)
        self.wva = WVA(model, cfg.lam)

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        self.wva.attach(optimizer)

    def importance(self, x_imp, y_imp, generator, task) -> Importance:
        return self._estimate(self.cfg.wva_importance, x_imp, y_imp, generator, task)

    def consolidate(self, imp: Importance) -> None:
        self.wva.consolidate(imp)


#: method → strategy factory ``(model, cfg) -> Strategy``
_FACTORIES = {
    "none": Strategy,
    "l2": lambda model, cfg: EWCStrategy(model, cfg, None),
    **{m: (lambda model, cfg, m=m: EWCStrategy(model, cfg, m)) for m in IMPORTANCE_METHODS},
    "si": SIStrategy,
    "wva": WVAStrategy,
}


def make_strategy(model: nn.Module, cfg: RunConfig) -> Strategy:
    """The strategy of ``cfg.method`` (one of :data:`METHODS`) for ``model``."""
    try:
        factory = _FACTORIES[cfg.method]
    except KeyError:
        raise ValueError(f"method: unknown {cfg.method!r}; choose from {', '.join(METHODS)}") from None
    return factory(model, cfg)
