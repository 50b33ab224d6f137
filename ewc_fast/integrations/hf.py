"""Hugging Face ``Trainer`` integration: :class:`ConsolidationCallback` (needs ``transformers``; extra ``hf``).

What the callback does at each Trainer event (transformers 4.57 / 5.x):

* ``on_train_begin``: restores the consolidation state when the Trainer resumes from a checkpoint
  (``TrainerState.global_step > 0``; the folder is ``<output_dir>/checkpoint-<step>`` as
  ``resume_from_checkpoint=True`` picks it, or the folder given to :meth:`ConsolidationCallback.resume_from`)
  and hooks SI / WVA to the Trainer's optimizer.
* ``on_pre_optimizer_step`` -- **once per optimizer step**, whatever ``gradient_accumulation_steps``:
  adds the EWC gradient ``lam * W * (theta - mu)`` to ``.grad`` (:meth:`EWC.apply_ <ewc_fast.EWC.apply_>`,
  fused, no autograd graph). The Trainer calls it *after* its gradient clipping (``max_grad_norm``),
  so the penalty gradient is **not clipped**, and the logged ``grad_norm`` is the task gradient's.
  To clip task and penalty gradient together, set ``TrainingArguments(max_grad_norm=0)`` and
  ``ConsolidationCallback(..., clip_grad_norm=1.0)``: the callback then adds the penalty and clips
  all gradients itself (``torch.nn.utils.clip_grad_norm_``). Gradients still scaled by an fp16
  ``GradScaler`` are unscaled first.
* ``on_save``: writes the state into the checkpoint folder, ``<checkpoint>/ewc_fast/{ewc,si,wva}.safetensors``
  (:mod:`.files`, atomic writes; rank 0 only), so that resuming continues exactly where the
  uninterrupted run would be.
* ``on_train_end``: ends the task when ``importance_data`` is set -- the importance on that data
  (:func:`~ewc_fast.estimate_importance`; ``"si"``: SI's path integral) merged into EWC / WVA -- and
  unhooks SI / WVA.

Do not also add ``ewc.penalty()`` to the loss in ``compute_loss``: when the model accepts loss keyword
arguments the Trainer does not divide the loss by the accumulation steps, and a penalty added there is
counted once per micro-batch.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from torch.utils.data import DataLoader, Dataset
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .common import Consolidator, ConsolidatorAccess

__all__ = ["ConsolidationCallback", "STATE_FOLDER"]

#: sub-folder of a Trainer checkpoint that holds the consolidation state
STATE_FOLDER = "ewc_fast"


class ConsolidationCallback(ConsolidatorAccess, TrainerCallback):
    """EWC / SI / WVA inside ``transformers.Trainer`` (see the module doc for what runs when).

    Args:
        ewc, si, wva, importance, importance_kwargs, importance_scale, batch_transform: as
            :class:`~ewc_fast.integrations.common.Consolidator` (``ewc`` and/or ``wva`` required;
            ``si`` with ``importance="si"``).
        importance_data: the current task's data for the task-end importance: a ``DataLoader`` (or
            any iterable of batches), or a ``Dataset`` (batched with ``importance_batch_size`` and
            ``collate_fn``, default ``transformers.default_data_collator``). Trainer batches (dicts with
            ``labels``) and ``ModelOutput`` results are read natively by ``estimate_importance``
            (``labels`` as targets, ``.logits`` as outputs, causal-LM label shift). ``None``: no
            automatic task end (call :meth:`end_task` yourself). Set it again for each task.
        clip_grad_norm: clip task + penalty gradients together to this norm after adding the penalty
            (requires ``TrainingArguments(max_grad_norm=0)``); ``None``: the Trainer's own clipping
            (before the penalty) is the only one.
    """

    def __init__(
        self,
        *,
        ewc=None,
        si=None,
        wva=None,
        importance: str = "fisher",
        importance_data: Iterable | Dataset | None = None,
        importance_kwargs: Mapping[str, Any] | None = None,
        importance_scale: float = 1.0,
        batch_transform: Callable | None = None,
        importance_batch_size: int = 8,
        collate_fn: Callable | None = None,
        clip_grad_norm: float | None = None,
    ) -> None:
        self.consolidator = Consolidator(
            ewc=ewc,
            si=si,
            wva=wva,
            importance=importance,
            importance_kwargs=importance_kwargs,
            importance_scale=importance_scale,
            batch_transform=batch_transform,
        )
        if clip_grad_norm is not None and not (float(clip_grad_norm) > 0):
            raise ValueError(f"clip_grad_norm must be > 0 or None, got {clip_grad_norm!r}")
        if (
            isinstance(importance_batch_size, bool)
            or not isinstance(importance_batch_size, int)
            or importance_batch_size < 1
        ):
            raise ValueError(f"importance_batch_size must be an int >= 1, got {importance_batch_size!r}")
        self.importance_data = importance_data
        self.importance_batch_size = importance_batch_size
        self.collate_fn = collate_fn
        self.clip_grad_norm = None if clip_grad_norm is None else float(clip_grad_norm)
        self.penalty_steps = 0  # optimizer steps that received the penalty (this process)
        self._resume_folder: Path | None = None
        self._model = None

    # ------------------------------------------------------------------------------- public helpers
    def resume_from(self, checkpoint: str | os.PathLike) -> None:
        """Restore the state from this Trainer checkpoint folder at the next ``on_train_begin`` (for a
        resume from a folder outside ``args.output_dir``)."""
        self._resume_folder = Path(checkpoint)

    def end_task(self, model=None, data: Iterable | Dataset | None = None):
        """End the current task now: importance on ``data`` (default ``importance_data``) merged into
        EWC / WVA. Returns the importance."""
        model = model if model is not None else self._model
        if model is None:
            raise ValueError("end_task: pass model= (the callback has not seen the Trainer's model yet)")
        data = self.importance_data if data is None else data
        return self.consolidator.end_task(model, self._loader(data))

    def _loader(self, data):
        if data is None or isinstance(data, DataLoader) or not isinstance(data, Dataset):
            return data
        collate = self.collate_fn
        if collate is None:
            from transformers import default_data_collator

            collate = default_data_collator
        return DataLoader(data, batch_size=self.importance_batch_size, shuffle=False, collate_fn=collate)

    # ------------------------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.clip_grad_norm is not None and args.max_grad_norm and args.max_grad_norm > 0:
            raise ValueError(
                "ConsolidationCallback(clip_grad_norm=...) clips task + penalty gradients itself: set "
                f"TrainingArguments(max_grad_norm=0) (it is {args.max_grad_norm}), or drop clip_grad_norm to "
                "keep the Trainer's clipping (which runs before the penalty is added)"
            )
        self._model = model
        folder = self._resume_folder
        if folder is None and state.global_step > 0:
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder is not None:
            target = folder / STATE_FOLDER
            if not Consolidator.has_state(target):
                raise FileNotFoundError(
                    f"ConsolidationCallback: resuming at step {state.global_step}, but {target} holds no "
                    "consolidation state; call callback.resume_from(<checkpoint folder>) before "
                    "trainer.train(resume_from_checkpoint=...) when the checkpoint is not under args.output_dir"
                )
            self.consolidator.load(target)
            self._resume_folder = None
        if optimizer is not None and (self.si is not None or self.wva is not None):
            self.consolidator.attach(optimizer)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, model=None, **kwargs):
        params = None
        if self.clip_grad_norm is not None:
            params = [p for p in (model or self._model).parameters() if p.grad is not None]
        self.consolidator.before_step(optimizer, clip_grad_norm=self.clip_grad_norm, parameters=params)
        self.penalty_steps += 1

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}" / STATE_FOLDER
        self.consolidator.save(folder)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self.consolidator.last_penalty is not None and "loss" in logs:
            logs["ewc_penalty"] = self.consolidator.last_penalty

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.consolidator.detach()
        model = model if model is not None else self._model
        if self.importance_data is not None or self.consolidator.importance == "si":
            self.consolidator.end_task(model, self._loader(self.importance_data))
