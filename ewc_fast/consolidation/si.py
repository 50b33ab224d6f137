"""``SynapticIntelligence``: the SI path-integral importance (Zenke et al. 2017), tracked through
optimizer hooks so that the training loop stays unchanged."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .. import ops
from ..importance import Importance
from ..ops._validate import check_finite_scalar
from ._checks import check_backend, check_state_dtype, trainable_params
from ._shard import check_layout, clone_state, copy_like, local, locals_, state_like
from ._state import check_count, check_header, check_state_tensor, clone_named, require_keys, state_header
from .exclusion import ZENKE_REGISTRY, ExclusionEndpoint

__all__ = ["SynapticIntelligence"]

_VARIANTS = ("zenke", "kutalev")
_FORMAT = "ewc_fast.SynapticIntelligence"
_VERSION = 1
_COUNTERS = ("steps", "cum_steps", "n_tasks")
_GROUPS = ("omega", "start", "prev", "cumulative")
_KEYS = ("names", "variant", "xi", "clip", *_GROUPS, *_COUNTERS)


class SynapticIntelligence:
    r"""Synaptic Intelligence importance, accumulated along the optimisation path.

    At every optimizer step (through ``Optimizer.register_step_pre_hook`` / ``register_step_post_hook``
    installed by :meth:`attach`): ``omega_i <- omega_i - g_i * (theta_i^after - theta_i^before)``
    (:func:`ewc_fast.ops.si_accumulate_`). At the end of a task :meth:`consolidate` returns the task's
    importance ``Omega_task = omega / ((theta - theta_start)^2 + xi)`` (:func:`ewc_fast.ops.si_consolidate_`),
    clipped at 0 if ``clip``, and restarts ``omega`` and ``theta_start`` for the next task.

    Variants:

    * ``"zenke"`` (Zenke, Poole & Ganguli 2017, official code ganguli-lab/pathint): ``g`` is the
      gradient of the *task loss only*. Penalty gradients added by :class:`ewc_fast.EWC` are excluded
      through this tracker's :class:`~.exclusion.ExclusionEndpoint`, registered in
      :data:`~.exclusion.ZENKE_REGISTRY` while attached: :meth:`EWC.apply_ <ewc_fast.EWC.apply_>`
      hands it a snapshot of ``.grad`` taken just before it adds the penalty (exact), and the backward
      of :meth:`EWC.penalty <ewc_fast.EWC.penalty>` records its contribution, which is subtracted from
      ``.grad`` at the step (exact up to one rounding in the gradient's dtype, the rounding of the
      ``.grad`` accumulation). Penalties that do not come from ``ewc_fast.EWC`` cannot be excluded.
      Default ``clip=True``.
    * ``"kutalev"`` (Kutalev's code, aakutalev/wva): ``g`` is the total ``.grad`` (penalty included),
      no clipping by default (``clip=False``).

    ``xi`` is the damping ``xi`` of the denominator (0.1 for permuted MNIST, 1e-3 for split MNIST/CIFAR
    in Zenke's paper; Kutalev uses 0.1).

    **Per-task vs cumulative.** :meth:`consolidate` returns the importance of the finished task
    alone, ``max(0, omega/((theta_end - theta_start)^2 + xi))`` with clipping -- the form to feed into
    :meth:`EWC.consolidate <ewc_fast.EWC.consolidate>` in ``"separate"`` mode (a penalty per task, each
    at its own anchor). Zenke's own algorithm instead keeps one running importance, updated at each
    task end as ``Omega <- max(0, Omega + omega/(Delta^2 + xi))``, used with the latest anchor only;
    :attr:`cumulative` holds exactly that (without ``clip``: the plain running sum). The two differ
    in two ways: a negative task term can lower Zenke's running ``Omega`` (the sum of clipped
    per-task importances never decreases), and Zenke penalises around the latest parameters only.
    To reproduce Zenke's penalty, build it after each task from the cumulative importance alone:
    ``EWC(model, lam=2*c, mode="online").consolidate(si.cumulative)`` (a fresh EWC object per task;
    Zenke's ``c`` has no 1/2, hence ``2*c``).
    Unclipped importances (the ``"kutalev"`` default) can be negative; :class:`ewc_fast.EWC` and
    :class:`ewc_fast.WVA` refuse negative values, so clamp them (or use ``clip=True``) before
    consolidating them there.

    **Parameters and steps.** Tracked parameters are those with ``requires_grad`` at construction
    (by identity: replace a parameter object and it is no longer tracked). A parameter whose ``.grad``
    is ``None`` at a step is skipped for that step (its ``omega`` is unchanged). ``omega`` integrates
    the attached optimizer's steps only: movement between steps by anything else (a second optimizer,
    a manual ``p.data`` edit, a hook attached after this tracker) is detected at the next step (``theta``
    differs from where the last step left it), is *not* attributed to any step, and raises a
    ``RuntimeWarning`` once per tracker (one comparison pass and one host synchronisation per step).
    Attach other hooks that move parameters after the step, such as :class:`ewc_fast.WVA`, *before*
    this tracker so that it sees the final position. Gradients are read when the step is taken, after
    any clipping; sparse gradients (``nn.Embedding(sparse=True)``) are read densely. A step that never
    runs (``GradScaler`` skipping ``step()`` on inf, a user skipping it) contributes nothing, and the
    penalty-exclusion reports of its iteration are recognised as stale (:mod:`.exclusion`).
    Refused before the optimizer moves anything (``RuntimeError`` from the step pre-hook, tracker
    unchanged): a step called with a closure while attached with ``gradients="pre_step"`` (the
    closure recomputes the gradients after the hook read them: attach with ``gradients="manual"``),
    and tracked parameters whose dtype, device or shape changed since construction (``model.double()``,
    ``model.to(...)``: build the tracker after converting the model). :meth:`attach` refuses
    :class:`torch.optim.LBFGS`, whose single step evaluates several iterates. Penalty exclusion assumes
    unscaled gradients (use ``EWC.apply_(grad_scale=1)`` after ``GradScaler.unscale_``).

    State: ``omega`` (``state_dtype``, fp32 default), ``theta_start`` and ``theta_prev`` (parameter
    dtype), :attr:`cumulative` (``state_dtype``), and, for the Zenke variant when an EWC penalty is
    linked, one gradient-sized buffer per parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        xi: float = 0.1,
        variant: str = "zenke",
        clip: bool | None = None,
        backend: str = "auto",
        state_dtype: torch.dtype = torch.float32,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"SynapticIntelligence: model must be a torch.nn.Module, got {type(model).__name__}")
        if variant not in _VARIANTS:
            raise ValueError(f"SynapticIntelligence: variant must be one of {_VARIANTS}, got {variant!r}")
        self._xi = check_finite_scalar("SynapticIntelligence", "xi", xi, low=0.0, low_open=True)
        self._variant = variant
        self._clip = (variant == "zenke") if clip is None else bool(clip)
        self._backend = check_backend("SynapticIntelligence", backend)
        self._state_dtype = check_state_dtype("SynapticIntelligence", state_dtype)
        named = trainable_params(model)
        self._names = [n for n, _ in named]
        self._params = [p for _, p in named]
        for n, p in named:
            check_layout("SynapticIntelligence", n, p)
        with torch.no_grad():
            self._omega = [state_like(p, state_dtype) for p in self._params]
            self._start = [clone_state(p) for p in self._params]
            self._prev = [clone_state(p) for p in self._params]
        self._cum: list[Tensor] | None = None
        self._steps = 0
        self._cum_steps = 0
        self._n_tasks = 0
        self._handles: list = []
        self._pending = None
        self._manual = False
        self._warned_moves = False
        self._layout = [(p.dtype, p.device, p.shape) for p in self._params]
        self._exclusion = ExclusionEndpoint(self._params)

    # -------------------------------------------------------------------------------- properties
    @property
    def xi(self) -> float:
        """Damping of the denominator ``(theta - theta_start)^2 + xi``."""
        return self._xi

    @property
    def variant(self) -> str:
        """``"zenke"`` (task-loss gradient) or ``"kutalev"`` (total ``.grad``)."""
        return self._variant

    @property
    def clip(self) -> bool:
        """Whether importances are clipped at 0."""
        return self._clip

    @property
    def steps(self) -> int:
        """Optimizer steps accumulated in the current task."""
        return self._steps

    @property
    def n_tasks(self) -> int:
        """Number of :meth:`consolidate` calls."""
        return self._n_tasks

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the tracked parameters (trainable at construction), in module order."""
        return tuple(self._names)

    @property
    def omega(self) -> dict[str, Tensor]:
        """``name -> omega``, the running path integral of the current task (live tensors)."""
        return dict(zip(self._names, self._omega))

    @property
    def attached(self) -> bool:
        """Whether optimizer hooks are installed (:meth:`attach` without :meth:`detach`)."""
        return bool(self._handles)

    @property
    def cumulative(self) -> Importance:
        """Zenke's running importance ``Omega <- max(0, Omega + omega/(Delta^2 + xi))`` over all
        consolidated tasks (no ``max`` without ``clip``); zeros before the first :meth:`consolidate`.
        The returned tensors are copies."""
        if self._cum is None:
            tensors = {n: state_like(w, w.dtype) for n, w in zip(self._names, self._omega)}
        else:
            tensors = {n: t.clone() for n, t in zip(self._names, self._cum)}
        return Importance(tensors, method="si", n_samples=self._cum_steps, meta=self._meta(cumulative=True))

    def __repr__(self) -> str:
        return (
            f"SynapticIntelligence(variant={self._variant!r}, xi={self._xi}, clip={self._clip}, "
            f"params={len(self._params)}, steps={self._steps}, n_tasks={self._n_tasks}, "
            f"attached={self.attached}, backend={self._backend!r})"
        )

    def _meta(self, **extra) -> dict:
        return {"variant": self._variant, "xi": self._xi, "clip": self._clip, **extra}

    # ------------------------------------------------------------------------------ attach/detach
    def attach(self, optimizer: torch.optim.Optimizer, *, gradients: str = "pre_step") -> SynapticIntelligence:
        """Track ``optimizer``'s steps (pre- and post-step hooks); the path integral restarts from the
        current parameters (``theta_prev <- theta``). Returns ``self``.

        ``gradients="pre_step"`` (default) reads ``.grad`` in the step pre-hook. ``gradients="manual"``
        installs only the post-step hook: call :meth:`capture_gradients` after the backward (and after
        any :meth:`EWC.apply_ <ewc_fast.EWC.apply_>`) before every step. That is for frameworks whose
        step runs the backward inside ``optimizer.step(closure)`` (Lightning's automatic optimization),
        where the pre-hook would read the previous step's gradients; a step taken without a capture
        raises ``RuntimeError``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"SynapticIntelligence.attach: expected a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        if gradients not in ("pre_step", "manual"):
            raise ValueError(
                f"SynapticIntelligence.attach: gradients must be 'pre_step' or 'manual', got {gradients!r}"
            )
        if self._handles:
            raise RuntimeError("SynapticIntelligence.attach: already attached; call detach() first")
        if isinstance(optimizer, torch.optim.LBFGS):
            raise TypeError(
                "SynapticIntelligence.attach: LBFGS evaluates several iterates inside one step(closure), so the "
                "path integral sum(-g * dtheta) cannot be formed from one gradient per step; use a first-order "
                "optimizer (SGD, Adam, ...)"
            )
        self._check_layout("SynapticIntelligence.attach")
        with torch.no_grad():
            torch._foreach_copy_(locals_(self._prev), [local(p.detach()) for p in self._params])
        self._manual = gradients == "manual"
        self._handles = [optimizer.register_step_post_hook(self._post_step)]
        if not self._manual:
            self._handles.insert(0, optimizer.register_step_pre_hook(self._pre_step))
        if self._variant == "zenke":
            ZENKE_REGISTRY.add(self, self._exclusion)
        return self

    def capture_gradients(self) -> None:
        """Read the task gradients of the coming optimizer step now (``attach(..., gradients="manual")``):
        what the step pre-hook does otherwise. Call it once the gradients are final."""
        if not self._handles or not self._manual:
            raise RuntimeError("SynapticIntelligence.capture_gradients: needs attach(optimizer, gradients='manual')")
        self._pre_step(None, (), {})

    def detach(self) -> None:
        """Remove the optimizer hooks (the accumulated ``omega`` is kept)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._pending = None
        ZENKE_REGISTRY.remove(self)
        self.clear_exclusions()

    def clear_exclusions(self) -> None:
        """Forget penalty gradients reported by EWC since the last step (done at every step)."""
        self._exclusion.clear()

    # ---------------------------------------------------------------------------- step hooks
    def _pre_step(self, optimizer, args, kwargs) -> None:
        # the hook's args include the optimizer itself: step(closure) has a second positional argument
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if optimizer is not None and not self._manual and closure is not None:
            raise RuntimeError(
                "SynapticIntelligence: optimizer.step(closure) recomputes the gradients after the step pre-hook "
                "read them; attach with gradients='manual' and call capture_gradients() inside the closure, "
                "after the backward"
            )
        self._check_layout("SynapticIntelligence (optimizer step)")
        idx, grads = [], []
        for j, p in enumerate(self._params):
            g = p.grad
            if g is not None:
                idx.append(j)
                grads.append(g.to_dense() if g.layout != torch.strided else local(g))
        self._forget_external_moves()
        self._pending = (idx, self._exclusion.task_grads(idx, grads))
        return None

    # ----------------------------------------------------------------------------- step guards
    def _check_layout(self, owner: str) -> None:
        """Refuse tracked parameters whose dtype, device or shape changed since construction (the
        buffers theta_start / theta_prev / omega were made for the old ones)."""
        for name, p, (dtype, device, shape) in zip(self._names, self._params, self._layout):
            if p.dtype != dtype or p.device != device or p.shape != shape:
                raise RuntimeError(
                    f"{owner}: parameter {name!r} is now {p.dtype} on {p.device} with shape {tuple(p.shape)}; "
                    f"the tracker was built for {dtype} on {device} with shape {tuple(shape)}. Build the "
                    "SynapticIntelligence after converting or moving the model (model.double(), model.to(...))"
                )

    @torch.no_grad()
    def _forget_external_moves(self) -> None:
        """``theta_prev <- theta`` where something other than the attached optimizer moved a tracked
        parameter since the last step (that movement belongs to no step); warn once."""
        if not self._params:
            return
        moved = [(local(p.detach()) != local(q)).any() for p, q in zip(self._params, self._prev)]
        flags = torch.stack([m.to(moved[0].device) for m in moved]).tolist()
        if not any(flags):
            return
        names = [n for n, f in zip(self._names, flags) if f]
        for j, f in enumerate(flags):
            if f:
                local(self._prev[j]).copy_(local(self._params[j].detach()))
        if not self._warned_moves:
            self._warned_moves = True
            warnings.warn(
                f"SynapticIntelligence: parameter(s) {names[:5]} moved between optimizer steps by something other "
                "than the attached optimizer (another optimizer, a manual edit, a hook attached after this "
                "tracker); that movement is not attributed to any step (warned once)",
                RuntimeWarning,
                stacklevel=4,
            )

    def _post_step(self, optimizer, args, kwargs) -> None:
        pending, self._pending = self._pending, None
        self.clear_exclusions()
        if pending is None:
            if self._manual:
                raise RuntimeError(
                    "SynapticIntelligence: an optimizer step was taken without capture_gradients() "
                    "(attached with gradients='manual')"
                )
            return
        idx, grads = pending
        if idx:
            if len(idx) == len(self._params):
                omega, params, prev = self._omega, self._params, self._prev
            else:
                omega = [self._omega[j] for j in idx]
                params = [self._params[j] for j in idx]
                prev = [self._prev[j] for j in idx]
            with torch.no_grad():
                ops.si_accumulate_(
                    locals_(omega), grads, [local(p.detach()) for p in params], locals_(prev), backend=self._backend
                )
        self._steps += 1

    # ----------------------------------------------------------------------------- consolidate
    @torch.no_grad()
    def consolidate(self) -> Importance:
        """End the current task: return its importance and restart ``omega`` and ``theta_start``.

        ``Omega_task = omega / ((theta - theta_start)^2 + xi)``, clipped at 0 if ``clip``; ``n_samples``
        is the number of optimizer steps of the task. Also updates :attr:`cumulative`
        (``max(0, Omega + omega/(Delta^2 + xi))``, no ``max`` without ``clip``).
        """
        self._check_layout("SynapticIntelligence.consolidate")
        params = [local(p.detach()) for p in self._params]
        out = [state_like(w, w.dtype) for w in self._omega]
        # Unclipped into zeros, so that the same fp32 terms also feed the cumulative update; clipping
        # 0 + t afterwards is identical to the op's own clip. DTensor state: all on the local shards.
        lout = locals_(out)
        ops.si_consolidate_(
            locals_(self._omega), params, locals_(self._start), lout, self._xi, clip=False, backend=self._backend
        )
        if self._cum is None:
            self._cum = [state_like(t, t.dtype) for t in out]
        if out:
            lcum = locals_(self._cum)
            torch._foreach_add_(lcum, lout)
            if self._clip:
                torch._foreach_clamp_min_(lcum, 0.0)
                torch._foreach_clamp_min_(lout, 0.0)
            torch._foreach_copy_(locals_(self._prev), params)
        imp = Importance(
            dict(zip(self._names, out)), method="si", n_samples=self._steps, meta=self._meta(task=self._n_tasks)
        )
        self._cum_steps += self._steps
        self._steps = 0
        self._n_tasks += 1
        return imp

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """Settings, ``omega``, ``theta_start``, ``theta_prev``, cumulative and counters (cloned tensors)."""

        names = self._names
        return {
            **state_header(_FORMAT, _VERSION),
            "variant": self._variant,
            "xi": self._xi,
            "clip": self._clip,
            "names": list(names),
            "omega": clone_named(names, self._omega),
            "start": clone_named(names, self._start),
            "prev": clone_named(names, self._prev),
            "cumulative": None if self._cum is None else clone_named(names, self._cum),
            "steps": self._steps,
            "cum_steps": self._cum_steps,
            "n_tasks": self._n_tasks,
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output; the tracked parameter names and shapes must match.

        Everything is validated before anything changes: every tensor finite, of its shape and of the
        dtype this tracker keeps it in (``TypeError`` otherwise: no silent rounding), the clipped
        cumulative importance ``>= 0``, counters consistent (``cumulative`` present iff ``n_tasks > 0``);
        on ``ValueError`` / ``TypeError`` the tracker (settings, tensors and counters) is exactly as before."""
        owner = "SynapticIntelligence.load_state_dict"
        check_header(owner, state, _FORMAT, _VERSION, non_mapping=ValueError)
        require_keys(owner, state, _KEYS)
        if list(state["names"]) != self._names:
            raise ValueError(f"{owner}: tracked parameter names differ from the state dict's")
        if state["variant"] != self._variant:
            raise ValueError(f"{owner}: state is for variant {state['variant']!r}, this tracker is {self._variant!r}")
        xi = check_finite_scalar(owner, "xi", state["xi"], low=0.0, low_open=True)
        clip = state["clip"]
        if not isinstance(clip, bool):
            raise TypeError(f"{owner}: clip must be a bool, got {clip!r}")
        counters = [check_count(owner, key, state[key]) for key in _COUNTERS]
        steps, cum_steps, n_tasks = counters
        if (state["cumulative"] is None) != (n_tasks == 0) or (n_tasks == 0 and cum_steps != 0):
            raise ValueError(
                f"{owner}: inconsistent state: n_tasks={n_tasks}, cum_steps={cum_steps}, cumulative "
                f"{'absent' if state['cumulative'] is None else 'present'} (cumulative exists, and cum_steps "
                "counts steps, only after a consolidate())"
            )
        groups = {}
        for key in _GROUPS:
            sd = state[key]
            if sd is None and key == "cumulative":
                groups[key] = None
                continue
            if not isinstance(sd, Mapping):
                raise ValueError(f"{owner}: {key} must be a dict name -> tensor")
            ref = self._omega if key in ("omega", "cumulative") else self._start
            groups[key] = [
                copy_like(
                    owner,
                    f"{key}[{n!r}]",
                    check_state_tensor(
                        owner,
                        f"{key}[{n!r}]",
                        sd.get(n),
                        p.shape,
                        dtype=r.dtype,
                        finite=True,
                        nonnegative=key == "cumulative" and clip,
                    ),
                    p,
                    r.dtype,
                )
                for n, p, r in zip(self._names, self._params, ref)
            ]
        # Commit (everything is validated: nothing below can fail).
        self._xi, self._clip = xi, clip
        self._omega, self._start, self._prev, self._cum = (
            groups["omega"],
            groups["start"],
            groups["prev"],
            groups["cumulative"],
        )
        self._steps, self._cum_steps, self._n_tasks = counters
        self.clear_exclusions()
