"""``WVA``: weight-velocity attenuation (Kutalev 2020/2022), applied through optimizer hooks."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import ops
from ..ops._validate import check_finite_scalar
from ._checks import check_backend, check_importance, check_state_dtype, check_sum_fits
from ._shard import clone_state, copy_like, local, locals_, same_layout, state_like
from ._state import (
    check_count,
    check_entries,
    check_header,
    check_names,
    check_state_tensor,
    clone_named,
    params_by_name,
    require_keys,
    state_header,
)

__all__ = ["WVA"]

_FORMAT = "ewc_fast.WVA"
_VERSION = 1


class WVA:
    r"""Weight-velocity attenuation: no penalty; every optimizer step is shrunk per weight.

    After each step (``Optimizer.register_step_post_hook``), every consolidated parameter is moved back
    towards where the step started: ``theta <- theta_old + (theta - theta_old) / (1 + lam * A)``
    (:func:`ewc_fast.ops.wva_attenuate_`), with ``A`` the sum of all importances passed to
    :meth:`consolidate` and ``theta_old`` snapshotted by a pre-step hook (one multi-tensor copy). For plain
    SGD this is the step ``-lr * g / (1 + lam*A)``. ``lam`` is Kutalev's (no factor 1/2 involved:
    the denominator is ``1 + lam*A``); he prefers this hyperbolic form over ``exp(-lam*A)``.

    Until the first :meth:`consolidate`, the hooks do nothing. Parameters consolidated are those
    with ``requires_grad`` at that time (held by identity; the accumulator follows them to another
    device on the next step). Importance validation is the same as :meth:`EWC.consolidate
    <ewc_fast.EWC.consolidate>` (every trainable parameter covered, no unknown names, matching
    shape/device, finite non-negative values; frozen parameters' entries ignored) and happens before
    any state changes. Parameters added later are not attenuated until consolidated. Attach WVA before
    a :class:`ewc_fast.SynapticIntelligence` tracker on the same optimizer so that SI sees the
    attenuated step.

    A parameter converted to another dtype or device after :meth:`consolidate` (``model.double()``,
    ``model.to(...)``) is followed: ``A`` moves with it and the ``theta_old`` snapshot is re-made in the
    parameter's new dtype, so fp64 weights never move through fp32. A changed shape is refused by the
    step pre-hook (``RuntimeError``, before the optimizer moves anything). :meth:`consolidate` refuses
    an accumulated ``A`` that overflows its dtype or the kernels' arithmetic (fp32 for non-fp64
    parameters), so ``A`` stays finite and the attenuated step ``(theta - theta_old)/(1 + lam*A)``
    never turns a weight NaN.

    State: ``A`` (``state_dtype``, fp32 default) and the ``theta_old`` snapshot (parameter dtype).
    """

    def __init__(
        self, model: nn.Module, lam: float, backend: str = "auto", state_dtype: torch.dtype = torch.float32
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"WVA: model must be a torch.nn.Module, got {type(model).__name__}")
        self._model = model
        self.lam = lam
        self._backend = check_backend("WVA", backend)
        self._state_dtype = check_state_dtype("WVA", state_dtype)
        self._names: list[str] = []
        self._pos: dict[str, int] = {}
        self._params: list[nn.Parameter] = []
        self._accum: list[Tensor] = []
        self._old: list[Tensor] = []
        self._n_tasks = 0
        self._handles: list = []
        self._armed = False

    @property
    def lam(self) -> float:
        """Attenuation strength ``>= 0``: steps are divided by ``1 + lam * A``."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_finite_scalar("WVA", "lam", value, low=0.0)

    @property
    def n_tasks(self) -> int:
        """Number of :meth:`consolidate` calls."""
        return self._n_tasks

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the consolidated parameters, in the order they were first consolidated."""
        return tuple(self._names)

    @property
    def accum(self) -> dict[str, Tensor]:
        """``name -> A`` (live state tensors; do not modify them)."""
        return dict(zip(self._names, self._accum))

    @property
    def attached(self) -> bool:
        """Whether optimizer hooks are installed (:meth:`attach` without :meth:`detach`)."""
        return bool(self._handles)

    def __repr__(self) -> str:
        return (
            f"WVA(lam={self._lam}, n_tasks={self._n_tasks}, params={len(self._names)}, "
            f"attached={self.attached}, backend={self._backend!r})"
        )

    @torch.no_grad()
    def consolidate(self, importance: Mapping[str, Tensor]) -> WVA:
        """``A += importance`` for every trainable parameter (validated first; see the class doc)."""
        names, params, tensors = check_importance("WVA.consolidate", self._model, importance)
        new_bufs = {}
        for name, p in zip(names, params):
            i = self._pos.get(name)
            if i is None:
                new_bufs[name] = state_like(p, self._state_dtype)
            elif self._accum[i].shape != p.shape:
                raise ValueError(
                    f"WVA.consolidate: parameter {name!r} has shape {tuple(p.shape)}, its WVA state "
                    f"{tuple(self._accum[i].shape)}"
                )
        check_sum_fits(
            "WVA.consolidate",
            names,
            [new_bufs[n] if n in new_bufs else self._accum[self._pos[n]] for n in names],
            tensors,
            params,
        )
        for name, p, t in zip(names, params, tensors):
            i = self._pos.get(name)
            if i is None:
                self._pos[name] = len(self._names)
                self._names.append(name)
                self._params.append(p)
                local(new_bufs[name]).add_(local(t))
                self._accum.append(new_bufs[name])
                self._old.append(clone_state(p))
            else:
                self._params[i] = p
                if self._accum[i].device != p.device or not same_layout(p, self._accum[i]):
                    self._accum[i] = copy_like("WVA.consolidate", f"A[{name!r}]", self._accum[i], p)
                    self._old[i] = clone_state(p)
                local(self._accum[i]).add_(local(t))
        self._n_tasks += 1
        return self

    # ---------------------------------------------------------------------------------- hooks
    def attach(self, optimizer: torch.optim.Optimizer) -> WVA:
        """Attenuate every step of ``optimizer`` (pre- and post-step hooks). Returns ``self``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"WVA.attach: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if self._handles:
            raise RuntimeError("WVA.attach: already attached; call detach() first")
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        return self

    def detach(self) -> None:
        """Remove the optimizer hooks (the accumulator is kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._armed = False

    def _pre_step(self, optimizer, args, kwargs) -> None:
        self._armed = False
        if not self._params:
            return None
        with torch.no_grad():
            for i, p in enumerate(self._params):
                if self._accum[i].shape != p.shape:
                    raise RuntimeError(
                        f"WVA (optimizer step): parameter {self._names[i]!r} now has shape {tuple(p.shape)}, its "
                        f"WVA state {tuple(self._accum[i].shape)}; consolidate a new WVA for the changed model"
                    )
            for i, p in enumerate(self._params):
                if self._accum[i].device != p.device or not same_layout(p, self._accum[i]):
                    self._accum[i] = copy_like("WVA", f"A[{self._names[i]!r}]", self._accum[i], p)
                    self._old[i] = clone_state(p)
                elif self._old[i].dtype != p.dtype:  # model.double() / .half(): snapshot in the new dtype
                    self._old[i] = clone_state(p)
            torch._foreach_copy_(locals_(self._old), [local(p.detach()) for p in self._params])
        self._armed = True
        return None

    def _post_step(self, optimizer, args, kwargs) -> None:
        if not self._armed:
            return
        self._armed = False
        with torch.no_grad():
            ops.wva_attenuate_(
                [local(p.detach()) for p in self._params],
                locals_(self._old),
                locals_(self._accum),
                self._lam,
                backend=self._backend,
            )

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """``lam``, names, ``A`` (cloned) and the task count."""
        return {
            **state_header(_FORMAT, _VERSION),
            "lam": self._lam,
            "n_tasks": self._n_tasks,
            "names": list(self._names),
            "accum": clone_named(self._names, self._accum),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output (names must be parameters of the model with those shapes).

        Everything is validated before anything changes (``A`` finite, ``>= 0``, of the state dtype and
        the parameter's shape; no names when ``n_tasks`` is 0): on ``ValueError`` / ``TypeError`` the
        state (``lam``, ``A``, names, task count) is exactly as before."""
        owner = "WVA.load_state_dict"
        check_header(owner, state, _FORMAT, _VERSION, non_mapping=ValueError)
        require_keys(owner, state, ("lam", "n_tasks", "names", "accum"))
        lam = check_finite_scalar(owner, "lam", state["lam"], low=0.0)
        n_tasks = check_count(owner, "n_tasks", state["n_tasks"])
        names = check_names(owner, state["names"])
        if n_tasks == 0 and names:
            raise ValueError(
                f"{owner}: n_tasks is 0 but the state has {len(names)} consolidated parameter(s); a WVA state "
                "before its first consolidate() is empty (save it with WVA.state_dict())"
            )
        accum_sd = check_entries(owner, "accum", state["accum"], names)
        params = params_by_name(owner, self._model, names)
        accum = [
            copy_like(
                owner,
                f"A[{n!r}]",
                check_state_tensor(owner, f"A[{n!r}]", accum_sd[n], p.shape, dtype=self._state_dtype, nonnegative=True),
                p,
            )
            for n, p in zip(names, params)
        ]
        # Commit (everything is validated: nothing below can fail).
        self._lam, self._n_tasks = lam, n_tasks
        self._names, self._params, self._accum = names, params, accum
        self._pos = {n: i for i, n in enumerate(names)}
        self._old = [clone_state(p) for p in params]
        self._armed = False
