"""Lightning integration: :class:`ConsolidationCallback` (needs ``lightning`` >= 2.4; extra ``lightning``).

What the callback does at each Lightning hook (``lightning.pytorch``):

* ``on_train_start``: hooks WVA and SI to the optimizer. SI reads its gradients manually
  (``SynapticIntelligence.attach(..., gradients="manual")``): with automatic optimization Lightning runs
  the backward inside ``optimizer.step(closure)``, after the optimizer's step pre-hooks.
* ``on_before_optimizer_step`` -- **once per optimizer step**, after ``accumulate_grad_batches``
  micro-batches and, under ``16-mixed``, after the gradients are unscaled: adds the EWC gradient
  ``lam * W * (theta - mu)`` (:meth:`EWC.apply_ <ewc_fast.EWC.apply_>`), then captures SI's task
  gradient. Lightning clips (``gradient_clip_val``) *after* this hook, so the penalty gradient **is
  clipped** together with the task gradient -- unlike the Hugging Face Trainer, whose
  ``on_pre_optimizer_step`` comes after its clipping (:mod:`.hf`, which offers both orders).
* ``state_dict`` / ``load_state_dict``: the EWC / SI / WVA state travels in every Lightning checkpoint
  (``trainer.save_checkpoint``, ``ModelCheckpoint``) and is restored by ``trainer.fit(ckpt_path=...)``.
* ``on_train_end``: ends the task when ``importance_data`` is set (importance on that data, or SI's,
  merged into EWC / WVA) and unhooks SI / WVA.

Mixed precision: ``bf16-mixed`` keeps fp32 parameters and gradients (no scaler); ``16-mixed`` unscales
before the hook. Parameters kept in bf16/fp16 (``bf16-true``) work as well: the kernels compute in fp32
and store the gradient in the parameter dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from lightning.pytorch.callbacks import Callback

from .common import Consolidator, ConsolidatorAccess

__all__ = ["ConsolidationCallback"]


class ConsolidationCallback(ConsolidatorAccess, Callback):
    """EWC / SI / WVA inside ``lightning.pytorch.Trainer`` (see the module doc for what runs when).

    Args:
        ewc, si, wva, importance, importance_kwargs, importance_scale, batch_transform: as
            :class:`~ewc_fast.integrations.common.Consolidator`.
        importance_data: the current task's data (a ``DataLoader`` or any iterable of batches) for the
            task-end importance; ``None``: no automatic task end (call :meth:`end_task`). Set it again
            for each task.
        model: the module the EWC / SI / WVA objects were built on and that ``estimate_importance``
            runs (default: the ``LightningModule`` being trained).
    """

    def __init__(
        self,
        *,
        ewc=None,
        si=None,
        wva=None,
        importance: str = "fisher",
        importance_data: Iterable | None = None,
        importance_kwargs: Mapping[str, Any] | None = None,
        importance_scale: float = 1.0,
        batch_transform: Callable | None = None,
        model=None,
    ) -> None:
        super().__init__()
        self.consolidator = Consolidator(
            ewc=ewc,
            si=si,
            wva=wva,
            importance=importance,
            importance_kwargs=importance_kwargs,
            importance_scale=importance_scale,
            batch_transform=batch_transform,
        )
        self.importance_data = importance_data
        self.model = model
        self.penalty_steps = 0  # optimizer steps that received the penalty (this process)

    def end_task(self, pl_module=None, data: Iterable | None = None):
        """End the current task now (importance on ``data``, default ``importance_data``, merged into
        EWC / WVA). Returns the importance."""
        model = self.model if self.model is not None else pl_module
        if model is None:
            raise ValueError("end_task: pass the LightningModule (or give model= to the callback)")
        return self.consolidator.end_task(model, self.importance_data if data is None else data)

    # --------------------------------------------------------------------------------------- hooks
    def on_train_start(self, trainer, pl_module) -> None:
        if self.si is not None or self.wva is not None:
            if len(trainer.optimizers) != 1:
                raise ValueError(
                    f"ConsolidationCallback: SI / WVA follow one optimizer, the Trainer has {len(trainer.optimizers)}"
                )
            self.consolidator.attach(trainer.optimizers[0], si_gradients="manual")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        # Lightning has already unscaled 16-mixed gradients here (its optimizer carries no scaler)
        self.consolidator.before_step(optimizer)
        self.penalty_steps += 1

    def on_train_end(self, trainer, pl_module) -> None:
        self.consolidator.detach()
        if self.importance_data is not None or self.consolidator.importance == "si":
            self.end_task(pl_module)

    def state_dict(self) -> dict[str, Any]:
        return self.consolidator.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.consolidator.load_state_dict(state_dict)
