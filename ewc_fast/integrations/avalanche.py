"""Avalanche plugins (needs ``avalanche-lib`` 0.6; extra ``avalanche``): drop-in replacements of its
``EWCPlugin``, ``MASPlugin`` and ``SynapticIntelligencePlugin`` with exact per-sample importances and the
fused penalty.

Avalanche (Lomonaco et al. 2021, arXiv 2104.00405) squares (EWC) or takes the absolute value of (MAS)
the *mini-batch mean* gradient (``(1/B) sum_b (mean_{n in b} g_n)^2``: batch-size dependent, van de
Ven 2025, arXiv 2502.11756), keeps one ``(F, theta*)`` per experience in separate mode, and adds the
penalty to ``strategy.loss`` through a Python loop over parameters (and experiences). The plugins here
follow Avalanche's ``SupervisedPlugin`` protocol with the same constructor arguments and penalty
strengths, and instead:

* estimate the importance at ``after_training_exp`` with :func:`~ewc_fast.estimate_importance` on the
  experience's dataset (batched with ``train_mb_size`` and the dataset's ``collate_fn``; the model in
  eval mode): the exact per-sample empirical Fisher ``(1/N) sum_n g_n^2`` (EWC) or MAS
  ``(1/N) sum_n |d ||f(x_n)||^2 / d theta|`` -- with ``train_mb_size=1`` Avalanche computes the same
  numbers;
* keep every experience as one quadratic per parameter (:class:`~ewc_fast.EWC`, completed square) and
  add its gradient once per iteration at ``before_update`` with one fused kernel
  (:meth:`EWC.apply_ <ewc_fast.EWC.apply_>`); ``strategy.loss`` is left as the task loss (the penalty
  value is :attr:`ConsolidationPlugin.last_penalty`).

Penalty strengths: Avalanche writes EWC and MAS without the 1/2 (``lambda * sum F (theta - theta*)^2``),
so ``lam = 2 * ewc_lambda`` / ``2 * lambda_reg`` here; its SI writes ``(si_lambda / 2) sum ...``, so
``lam = si_lambda``. Differences that remain, by design: MAS importances are computed in eval mode
(Avalanche: train mode, so dropout changes them); SI integrates the task gradient without the penalty
and clips the per-experience importance at 0 (Zenke et al. 2017; Avalanche integrates the total
gradient and clamps its running importance from *above* at 0.001, after Maltoni & Lomonaco 2019) and
does not exclude BatchNorm parameters; parameters added after an experience (growing heads) are not
penalised until consolidated.
"""

from __future__ import annotations

from collections.abc import Callable

from avalanche.core import SupervisedPlugin
from torch import nn
from torch.utils.data import DataLoader

from ..consolidation import EWC, SynapticIntelligence
from .common import Consolidator, ConsolidatorAccess

__all__ = ["ConsolidationPlugin", "EWCPlugin", "MASPlugin", "SynapticIntelligencePlugin"]


def _is_multitask(model: nn.Module) -> bool:
    try:
        from avalanche.models import MultiTaskModule
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, MultiTaskModule)


class ConsolidationPlugin(ConsolidatorAccess, SupervisedPlugin):
    """Base class: builds a :class:`~ewc_fast.integrations.common.Consolidator` on the strategy's model
    at the first ``before_training_exp`` (``build(model)``), applies the penalty at every
    ``before_update`` and ends the task at ``after_training_exp``."""

    def __init__(self, build: Callable[[nn.Module], Consolidator]):
        super().__init__()
        self._build = build
        self.consolidator: Consolidator | None = None
        self._model: nn.Module | None = None

    def _first_task_done(self, consolidator: Consolidator) -> None:
        """Hook for plugins whose importance scaling changes after the first experience."""

    def before_training_exp(self, strategy, **kwargs):
        if self.consolidator is None:
            self._model = strategy.model
            self.consolidator = self._build(strategy.model)
        elif strategy.model is not self._model:
            raise RuntimeError(
                f"{type(self).__name__}: the strategy's model object changed; the plugin's state belongs "
                "to the model it was built on"
            )
        if self.consolidator.si is not None or self.consolidator.wva is not None:
            self.consolidator.attach(strategy.optimizer)

    def before_update(self, strategy, **kwargs):
        self.consolidator.before_step(strategy.optimizer)

    def after_training_exp(self, strategy, **kwargs):
        self.consolidator.detach()
        dataset = strategy.experience.dataset
        loader = DataLoader(
            dataset,
            batch_size=strategy.train_mb_size,
            collate_fn=getattr(dataset, "collate_fn", None),
            num_workers=kwargs.get("num_workers", 0),
        )
        multitask = _is_multitask(strategy.model)
        # Avalanche batches are [x, y, task_labels]; multi-task models are called as model(x, task_labels)
        self.consolidator.batch_transform = (lambda b: ((b[0], b[-1]), b[1])) if multitask else (lambda b: (b[0], b[1]))
        n_before = self.consolidator.ewc.n_tasks if self.consolidator.ewc is not None else 0
        self.consolidator.end_task(strategy.model, loader)
        if n_before == 0:
            self._first_task_done(self.consolidator)

    def state_dict(self) -> dict:
        """The consolidation state (for checkpointing alongside the strategy)."""
        if self.consolidator is None:
            raise RuntimeError(f"{type(self).__name__}.state_dict: nothing to save before the first experience")
        return self.consolidator.state_dict()


class EWCPlugin(ConsolidationPlugin):
    """Avalanche's ``EWCPlugin(ewc_lambda, mode, decay_factor)`` with the exact per-sample Fisher.

    ``importance``: ``"fisher"`` (empirical, default), ``"fisher_exact"`` or ``"fisher_mc"`` (any
    :func:`~ewc_fast.estimate_importance` method); ``importance_kwargs`` go to it (e.g. ``loss_fn``).
    ``keep_importance_data`` is accepted for compatibility: the state is one quadratic per parameter
    whatever the number of experiences."""

    def __init__(
        self,
        ewc_lambda: float,
        mode: str = "separate",
        decay_factor: float | None = None,
        keep_importance_data: bool = False,
        *,
        importance: str = "fisher",
        importance_kwargs: dict | None = None,
    ):
        if mode not in ("separate", "online"):
            raise ValueError(f"EWCPlugin: mode must be 'separate' or 'online', got {mode!r}")
        if (decay_factor is None) == (mode == "online"):
            raise ValueError("EWCPlugin: decay_factor is required in 'online' mode and only there (as in Avalanche)")
        gamma = 1.0 if decay_factor is None else decay_factor
        self.ewc_lambda, self.mode, self.decay_factor = ewc_lambda, mode, decay_factor
        super().__init__(
            lambda model: Consolidator(
                ewc=EWC(model, lam=2.0 * ewc_lambda, mode=mode, gamma=gamma),
                importance=importance,
                importance_kwargs=importance_kwargs,
            )
        )


class MASPlugin(ConsolidationPlugin):
    """Avalanche's ``MASPlugin(lambda_reg, alpha)`` with exact per-sample MAS (Aljundi et al. 2018).

    Importance after the first experience ``Omega = F_0``, then ``Omega <- alpha * Omega + (1 - alpha) F``;
    anchor at the latest parameters; penalty ``lambda_reg * sum Omega (theta - theta*)^2``
    (online :class:`~ewc_fast.EWC` with ``gamma = alpha``, ``lam = 2 * lambda_reg``).
    ``mas_output="softmax"`` uses Kutalev's softmax outputs instead of the logits."""

    def __init__(self, lambda_reg: float = 1.0, alpha: float = 0.5, verbose: bool = False, *, mas_output="logits"):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"MASPlugin: alpha must be in (0, 1), got {alpha!r}")
        self.lambda_reg, self.alpha = lambda_reg, alpha
        super().__init__(
            lambda model: Consolidator(
                ewc=EWC(model, lam=2.0 * lambda_reg, mode="online", gamma=alpha),
                importance="mas",
                importance_kwargs={"mas_output": mas_output, "progress": bool(verbose)},
            )
        )

    def _first_task_done(self, consolidator: Consolidator) -> None:
        consolidator.importance_scale = 1.0 - self.alpha


class SynapticIntelligencePlugin(ConsolidationPlugin):
    """Avalanche's ``SynapticIntelligencePlugin(si_lambda, eps)`` on :class:`~ewc_fast.SynapticIntelligence`.

    Path integral through the optimizer's step hooks (fused ``si_accumulate_``, state on the model's
    device: no copies to the CPU each iteration), ``xi = eps``; at each experience end the clipped
    per-experience importance is added to an online EWC anchored at the latest parameters with
    ``lam = si_lambda`` (Avalanche's SI penalty has the 1/2). ``variant="kutalev"`` integrates the total
    gradient like Avalanche (no clipping). A list of lambdas per experience is not supported."""

    def __init__(
        self,
        si_lambda: float,
        eps: float = 1e-7,
        excluded_parameters=None,
        device="as_strategy",
        *,
        variant: str = "zenke",
    ):
        if isinstance(si_lambda, (list, tuple)):
            raise ValueError("SynapticIntelligencePlugin: one si_lambda for all experiences (a list is not supported)")
        if excluded_parameters:
            raise ValueError(
                "SynapticIntelligencePlugin: excluded_parameters is not supported; set requires_grad=False "
                "on parameters that should not be tracked"
            )
        if device != "as_strategy":
            raise ValueError("SynapticIntelligencePlugin: the state lives on the model's device (device='as_strategy')")
        self.si_lambda, self.eps = si_lambda, eps
        super().__init__(
            lambda model: Consolidator(
                ewc=EWC(model, lam=float(si_lambda), mode="online", gamma=1.0),
                si=SynapticIntelligence(model, xi=eps, variant=variant, clip=True),
                importance="si",
            )
        )
