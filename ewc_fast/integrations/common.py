"""What every framework integration does, framework-free: :class:`Consolidator`.

A :class:`Consolidator` bundles the consolidation objects of one model -- an :class:`~ewc_fast.EWC`
penalty, a :class:`~ewc_fast.WVA` attenuation, a :class:`~ewc_fast.SynapticIntelligence` tracker --
with what the frameworks' hooks must do with them:

* :meth:`Consolidator.attach` / :meth:`~Consolidator.detach` -- hook SI and WVA to the optimizer
  (unwrapping the frameworks' optimizer wrappers: accelerate's ``AcceleratedOptimizer``, Lightning's
  ``LightningOptimizer``).
* :meth:`Consolidator.before_step` -- once per optimizer step, after the gradients are final: unscale
  them if a ``GradScaler`` still holds them scaled, add the EWC penalty gradient
  ``lam * W * (theta - mu)`` (:meth:`EWC.apply_ <ewc_fast.EWC.apply_>`, fused, no graph), and
  capture SI's task gradient where SI reads gradients manually.
* :meth:`Consolidator.end_task` -- the task's importance (:func:`~ewc_fast.estimate_importance` on the
  named data, or SI's path integral), times ``importance_scale``, merged into EWC and/or WVA.
* :meth:`Consolidator.state_dict` / :meth:`~Consolidator.load_state_dict` (in-memory checkpoints) and
  :meth:`~Consolidator.save` / :meth:`~Consolidator.load` (one safetensors state file per object in a
  folder, :mod:`.files`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from ..consolidation import EWC, WVA, SynapticIntelligence
from ..estimation import estimate_importance
from ..importance import Importance

__all__ = ["Consolidator", "ConsolidatorAccess", "unwrap_optimizer", "unscale_gradients", "DATA_METHODS"]

#: importances :meth:`Consolidator.end_task` can compute from data (``estimate_importance`` methods)
DATA_METHODS = ("fisher", "fisher_exact", "fisher_mc", "mas", "sig", "fisher_batched", "magnitude", "random")
_FORMAT = "ewc_fast.integrations.Consolidator"
_FILES = {"ewc": "ewc.safetensors", "si": "si.safetensors", "wva": "wva.safetensors"}


def unwrap_optimizer(optimizer) -> tuple[torch.optim.Optimizer, Any]:
    """``(the innermost torch optimizer, the GradScaler of a wrapper or None)``.

    Follows ``.optimizer`` (accelerate's ``AcceleratedOptimizer``, which also carries ``.scaler``) and
    ``._optimizer`` (Lightning's ``LightningOptimizer``) down to a plain ``torch.optim.Optimizer``."""
    scaler = None
    seen = 0
    while seen < 8:
        seen += 1
        if getattr(optimizer, "scaler", None) is not None:
            scaler = optimizer.scaler
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            inner = getattr(optimizer, "_optimizer", None)
        if inner is None or inner is optimizer or not hasattr(inner, "step"):
            break
        optimizer = inner
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"expected a torch.optim.Optimizer (or a wrapper of one), got {type(optimizer).__name__}")
    return optimizer, scaler


def unscale_gradients(optimizer: torch.optim.Optimizer, scaler) -> None:
    """``scaler.unscale_(optimizer)`` unless the gradients of this step are already unscaled.

    A ``torch.amp.GradScaler`` multiplies the loss by its scale; the gradients stay scaled until
    ``unscale_`` (done by a framework's clipping) or the step. The EWC gradient is in unscaled units,
    so it must be added after unscaling. Reads the scaler's per-optimizer stage (``OptState``), the
    state ``GradScaler.unscale_`` itself checks."""
    if scaler is None or not scaler.is_enabled():
        return
    from torch.amp.grad_scaler import OptState

    if scaler._per_optimizer_states[id(optimizer)]["stage"] is OptState.READY:
        scaler.unscale_(optimizer)


def to_device(batch, device: torch.device):
    """``batch`` with every tensor moved to ``device`` (non-blocking where possible)."""
    return tree_map(lambda t: t.to(device, non_blocking=True) if isinstance(t, Tensor) else t, batch)


class _OnDevice:
    """Re-iterable view of ``data`` with each batch passed through ``transform`` and moved to ``device``."""

    def __init__(self, data: Iterable, device: torch.device, transform: Callable | None):
        self.data, self.device, self.transform = data, device, transform

    def __iter__(self):
        for batch in self.data:
            if self.transform is not None:
                batch = self.transform(batch)
            yield to_device(batch, self.device)


class Consolidator:
    """EWC / SI / WVA of one model, driven by a training framework's hooks (see the module doc).

    Args:
        ewc: the penalty (its ``lam``, ``mode``, ``gamma`` and ``stabilize_lr`` are used as set).
        si: a Synaptic Intelligence tracker; required when ``importance="si"``.
        wva: weight-velocity attenuation.
        importance: what :meth:`end_task` merges into ``ewc`` / ``wva``: an ``estimate_importance``
            method (:data:`DATA_METHODS`; ``"fisher"`` = the exact per-sample empirical Fisher) or
            ``"si"`` (the task's SI importance).
        importance_kwargs: extra keyword arguments of :func:`~ewc_fast.estimate_importance`
            (``loss_fn``, ``n_samples``, ``mas_output``, ...).
        importance_scale: the importance is multiplied by this before merging (e.g. ``1 - alpha`` for
            MAS's running average).
        batch_transform: applied to every batch of the task-end data before it reaches
            ``estimate_importance`` (e.g. to split a dict batch into ``(inputs, labels)``).

    At least one of ``ewc`` / ``wva`` must be given (they consume the importance).
    """

    def __init__(
        self,
        *,
        ewc: EWC | None = None,
        si: SynapticIntelligence | None = None,
        wva: WVA | None = None,
        importance: str = "fisher",
        importance_kwargs: Mapping[str, Any] | None = None,
        importance_scale: float = 1.0,
        batch_transform: Callable | None = None,
    ) -> None:
        for name, obj, cls in (("ewc", ewc, EWC), ("si", si, SynapticIntelligence), ("wva", wva, WVA)):
            if obj is not None and not isinstance(obj, cls):
                raise TypeError(f"{name} must be an ewc_fast.{cls.__name__} or None, got {type(obj).__name__}")
        if ewc is None and wva is None:
            raise ValueError("give ewc= and/or wva=: they apply the importance computed at the end of each task")
        if importance not in DATA_METHODS and importance != "si":
            raise ValueError(f"importance must be 'si' or one of {DATA_METHODS}, got {importance!r}")
        if (importance == "si") != (si is not None):
            raise ValueError(
                "importance='si' needs si=SynapticIntelligence(model), and si= is used only with importance='si'"
            )
        if importance_kwargs is not None and not isinstance(importance_kwargs, Mapping):
            raise TypeError(f"importance_kwargs must be a dict or None, got {type(importance_kwargs).__name__}")
        bad = {"methods", "model", "data"} & set(importance_kwargs or {})
        if bad:
            raise ValueError(f"importance_kwargs must not set {sorted(bad)} (the consolidator sets them)")
        if isinstance(importance_scale, bool) or not isinstance(importance_scale, (int, float)):
            raise TypeError(f"importance_scale must be a number, got {type(importance_scale).__name__}")
        if not (importance_scale > 0 and importance_scale < float("inf")):
            raise ValueError(f"importance_scale must be finite and > 0, got {importance_scale!r}")
        if batch_transform is not None and not callable(batch_transform):
            raise TypeError("batch_transform must be callable batch -> batch")
        self.ewc, self.si, self.wva = ewc, si, wva
        self.importance = importance
        self.importance_kwargs = dict(importance_kwargs or {})
        self.importance_scale = float(importance_scale)
        self.batch_transform = batch_transform
        self.last_penalty: float | None = None
        self.last_importance: Importance | None = None
        self._manual_si = False
        self._attached_to = None

    # ------------------------------------------------------------------------------ optimizer hooks
    def fused_by(self, optimizer) -> frozenset[str]:
        """Which of ``"ewc"``, ``"si"``, ``"wva"`` the (unwrapped) ``optimizer`` applies inside its own
        step: a fused optimizer (``ewc_fast.optim``) exposes the objects it was given as ``.ewc`` /
        ``.si`` / ``.wva``; those are then left to it (no ``apply_``, no hooks)."""
        inner, _ = unwrap_optimizer(optimizer)
        return frozenset(
            k
            for k, obj in (("ewc", self.ewc), ("si", self.si), ("wva", self.wva))
            if obj is not None and getattr(inner, k, None) is obj
        )

    def attach(self, optimizer, *, si_gradients: str = "pre_step") -> None:
        """Hook WVA, then SI (so that SI sees the attenuated step) to ``optimizer`` (unwrapped first),
        except what a fused optimizer applies itself (:meth:`fused_by`). Re-attaching to the same
        optimizer is a no-op; another optimizer replaces the old hooks."""
        inner, _ = unwrap_optimizer(optimizer)
        if self._attached_to is inner:
            return
        self.detach()
        fused = self.fused_by(inner)
        if self.wva is not None and "wva" not in fused:
            self.wva.attach(inner)
        if self.si is not None and "si" not in fused:
            self.si.attach(inner, gradients=si_gradients)
            self._manual_si = si_gradients == "manual"
        self._attached_to = inner

    def detach(self) -> None:
        """Remove the optimizer hooks (state is kept)."""
        if self.si is not None and self.si.attached:
            self.si.detach()
        if self.wva is not None and self.wva.attached:
            self.wva.detach()
        self._attached_to = None
        self._manual_si = False

    @property
    def attached(self) -> bool:
        """Whether SI / WVA are hooked to an optimizer."""
        return self._attached_to is not None

    def before_step(self, optimizer=None, *, clip_grad_norm: float | None = None, parameters=None) -> float | None:
        """Once per optimizer step, with the gradients final: unscale them if ``optimizer`` carries a
        ``GradScaler`` that has not unscaled them yet, add the EWC gradient (``EWC.apply_``), optionally
        clip ``parameters``' gradients to ``clip_grad_norm`` (task + penalty gradient together), and
        capture SI's gradients when it reads them manually. Returns the penalty value (or None).

        With a fused optimizer that applies the EWC penalty itself (:meth:`fused_by`), nothing is added
        here; clipping then goes through the optimizer's ``clip_grad_norm_`` (which clips the task
        gradient and the penalty gradient of its coming step together), and the value returned is the
        optimizer's ``last_penalty``, the penalty at its previous step."""
        fused = frozenset()
        if optimizer is not None:
            inner, scaler = unwrap_optimizer(optimizer)
            fused = self.fused_by(inner)
            needs_unscaled = (self.ewc is not None and "ewc" not in fused) or clip_grad_norm is not None
            if needs_unscaled or self._manual_si:
                unscale_gradients(inner, scaler)
        value = None
        if self.ewc is not None and "ewc" in fused:
            last = getattr(inner, "last_penalty", None)
            value = None if last is None else float(last)
        elif self.ewc is not None:
            value = float(self.ewc.apply_())
        if clip_grad_norm is not None:
            if "ewc" in fused:
                inner.clip_grad_norm_(clip_grad_norm)
            else:
                if parameters is None:
                    raise ValueError("before_step: clip_grad_norm needs parameters=")
                torch.nn.utils.clip_grad_norm_(parameters, clip_grad_norm)
        if self._manual_si:
            self.si.capture_gradients()
        self.last_penalty = value
        return value

    # ------------------------------------------------------------------------------------- task end
    def end_task(self, model: nn.Module, data: Iterable | None = None) -> Importance:
        """Compute this task's importance and merge it (EWC ``consolidate`` anchors at the current
        parameters; WVA adds it to its accumulator). ``data`` (an iterable of batches, re-iterable if
        several methods need it) is required unless ``importance="si"``. Returns the importance
        (before ``importance_scale``)."""
        if self.importance == "si":
            imp = self.si.consolidate()
        else:
            if data is None:
                raise ValueError(
                    f"end_task: importance={self.importance!r} is estimated from data: name the task's data "
                    "(a DataLoader or an iterable of batches)"
                )
            device = next((p.device for p in model.parameters() if p.requires_grad), torch.device("cpu"))
            kwargs = dict(self.importance_kwargs)
            kwargs.setdefault("progress", False)
            batches = _OnDevice(data, device, self.batch_transform)
            imp = estimate_importance(model, batches, methods=(self.importance,), **kwargs)[self.importance]
        merged = imp if self.importance_scale == 1.0 else imp.scale(self.importance_scale)
        if self.ewc is not None:
            self.ewc.consolidate(merged)
        if self.wva is not None:
            self.wva.consolidate(merged)
        self.last_importance = imp
        return imp

    # ---------------------------------------------------------------------------------- persistence
    def _objects(self) -> dict[str, Any]:
        return {k: v for k, v in (("ewc", self.ewc), ("si", self.si), ("wva", self.wva)) if v is not None}

    def state_dict(self) -> dict:
        """``{"format", "version", "ewc"?, "si"?, "wva"?}`` with each object's ``state_dict()``."""
        return {"format": _FORMAT, "version": 1, **{k: v.state_dict() for k, v in self._objects().items()}}

    def _restore_all(self, loaders: dict[str, Callable[[Any], None]]) -> None:
        """Run ``loaders[k](obj)`` for every object; if one fails, the objects already restored get
        their previous state back, so a failed restore leaves the consolidator exactly as it was."""
        objects = self._objects()
        done: list[tuple[Any, dict]] = []
        try:
            for k, obj in objects.items():
                before = obj.state_dict()
                loaders[k](obj)
                done.append((obj, before))
        except BaseException:
            for obj, before in reversed(done):
                obj.load_state_dict(before)
            raise

    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output: the same objects must be present; each object's
        ``load_state_dict`` validates its part, and on any failure nothing changes."""
        if not isinstance(state, Mapping) or state.get("format") != _FORMAT or state.get("version") != 1:
            raise ValueError("Consolidator.load_state_dict: not a Consolidator state dict of version 1")
        objects = self._objects()
        have = {k for k in ("ewc", "si", "wva") if k in state}
        if have != set(objects):
            raise ValueError(
                f"Consolidator.load_state_dict: the state holds {sorted(have)}, this consolidator has {sorted(objects)}"
            )
        self._restore_all({k: (lambda obj, k=k: obj.load_state_dict(state[k])) for k in objects})

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """One safetensors state file per object (``ewc.safetensors``, ``si.safetensors``,
        ``wva.safetensors``) in ``folder`` (created), each written atomically (:func:`.files.save_state`)."""
        from .files import save_state

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        return [save_state(obj, folder / _FILES[k]) for k, obj in self._objects().items()]

    def load(self, folder: str | os.PathLike) -> None:
        """Restore what :meth:`save` wrote in ``folder`` (``FileNotFoundError`` naming a missing file;
        on any failure nothing changes)."""
        from .files import load_state

        folder = Path(folder)
        objects = self._objects()
        missing = [str(folder / _FILES[k]) for k in objects if not (folder / _FILES[k]).is_file()]
        if missing:
            raise FileNotFoundError(f"Consolidator.load: no consolidation state at {missing}")
        self._restore_all({k: (lambda obj, k=k: load_state(obj, folder / _FILES[k])) for k in objects})

    @staticmethod
    def has_state(folder: str | os.PathLike) -> bool:
        """Whether ``folder`` holds any file :meth:`save` writes."""
        return any((Path(folder) / f).is_file() for f in _FILES.values())


class ConsolidatorAccess:
    """Read-only access to ``self.consolidator``'s objects, for the framework adapters (callbacks,
    plugins) that hold a :class:`Consolidator` (``None`` before it exists)."""

    consolidator: Consolidator | None

    @property
    def ewc(self) -> EWC | None:
        """The EWC penalty (or None)."""
        return None if self.consolidator is None else self.consolidator.ewc

    @property
    def si(self) -> SynapticIntelligence | None:
        """The SI tracker (or None)."""
        return None if self.consolidator is None else self.consolidator.si

    @property
    def wva(self) -> WVA | None:
        """The WVA attenuation (or None)."""
        return None if self.consolidator is None else self.consolidator.wva

    @property
    def last_penalty(self) -> float | None:
        """The penalty value ``(lam/2)(sum W (theta - mu)^2 + c)`` of the last optimizer step."""
        return None if self.consolidator is None else self.consolidator.last_penalty
