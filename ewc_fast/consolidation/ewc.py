"""``EWC``: the consolidated elastic-weight-consolidation penalty of any number of tasks."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..ops._registry import op_device, resolve_backend
from ..ops._validate import check_finite_scalar
from ..ops.consolidation import check_penalty_apply_args
from . import _shard
from ._checks import check_backend, check_importance, check_state_dtype, check_sum_fits
from ._shard import copy_like, local, same_layout, state_like
from ._state import (
    check_count,
    check_entries,
    check_header,
    check_names,
    check_state_tensor,
    clone_named,
    dtype_from_name,
    dtype_name,
    params_by_name,
    require_keys,
    state_header,
)
from .exclusion import ZENKE_REGISTRY, ExclusionEndpoint

__all__ = ["EWC"]

_MODES = ("separate", "online")
_FORMAT = "ewc_fast.EWC"
_VERSION = 1
_KEYS = ("names", "omega", "mu", "c", "lam", "gamma", "mode", "stabilize_lr", "n_tasks", "state_dtype")


def _check_stabilize_lr(value):
    if value is None:
        return None
    return check_finite_scalar("EWC", "stabilize_lr", value, low=0.0)


_NOT_TWICE = (
    "EWC.penalty() is differentiable only once: its gradient lam*W*(theta - mu) comes from the "
    "penalty_apply_ kernel, outside autograd, so a gradient taken with create_graph=True cannot be "
    "differentiated again (Hessian-vector products, gradient penalties, meta-learning). For second "
    "order, write the penalty with torch ops from EWC.omega / EWC.mu, e.g. "
    "(lam/2) * sum(W * (p - mu)**2), or keep it out of the create_graph=True gradient."
)


class _GradientOnce(torch.autograd.Function):
    """``grad_out * g`` for the penalty gradients ``g`` computed in the forward, as a node whose
    backward raises :data:`_NOT_TWICE`; used when the penalty's backward runs with ``create_graph=True``.

    This is ``torch.autograd.function.once_differentiable``, made to hold here. The decorator marks
    the returned gradients only when ``grad_out`` requires grad, and links them to ``grad_out`` alone.
    But the gradient depends on theta, through state autograd does not see: in the common case
    ``autograd.grad(task_loss + penalty, params, create_graph=True)`` (``grad_out`` a plain 1) a
    second derivative would silently miss the penalty's ``lam*W``. So the node takes ``grad_out`` and
    the parameters as inputs: every path of a second derivative to them passes through it.
    """

    @staticmethod
    def forward(ctx, grads, grad_out, *params):
        return tuple((g * grad_out).to(g.dtype) for g in grads)

    @staticmethod
    def backward(ctx, *grad_outs):
        raise RuntimeError(_NOT_TWICE)


class _PenaltyFunction(torch.autograd.Function):
    """value = (lam/2)(sum W (theta-mu)^2 + c); d value / d theta = lam W (theta - mu).

    The forward runs ``penalty_apply_`` into zero buffers, which then hold the gradient; the
    backward scales them by ``grad_out`` and records them with the linked Zenke SI trackers'
    :class:`~.exclusion.ExclusionEndpoint` (``links``: ``(endpoint, idx, tidx)`` triples). It is
    differentiable once: under ``create_graph=True`` the gradients it returns raise
    :data:`_NOT_TWICE` when differentiated (see :class:`_GradientOnce`). The gradient buffers are
    saved with ``save_for_backward``: a second backward without ``retain_graph=True`` raises
    autograd's own "backward through the graph a second time" error, as a penalty written with
    torch ops would, instead of adding the gradient twice; the buffers are freed after the backward.
    """

    @staticmethod
    def forward(ctx, ewc: EWC, links, out_dtype, *params):
        grads = [state_like(p, p.dtype) for p in params]
        value = _shard.penalty_apply_(
            grads,
            list(params),
            ewc._omega,
            ewc._mu,
            ewc._lam,
            alpha=ewc._stabilize_lr,
            c=ewc._c,
            grad_scale=1.0,
            backend=ewc._backend,
        )
        ctx.links = links
        ctx.n = len(params)
        # params: read only under create_graph=True (_GradientOnce's inputs)
        ctx.save_for_backward(*grads, *params)
        return value.to(out_dtype)

    @staticmethod
    def backward(ctx, grad_out):
        tensors = ctx.saved_tensors  # raises on a second backward after the graph was freed
        grads_all, params = tensors[: ctx.n], tensors[ctx.n :]
        needs = ctx.needs_input_grad[3:]
        live = [i for i, need in enumerate(needs) if need]
        saved = [grads_all[i] for i in live]
        if saved and torch.is_grad_enabled():  # autograd enables grad mode in backward iff create_graph=True
            out = _GradientOnce.apply(saved, grad_out, *params)
        else:
            out = [(g * grad_out).to(g.dtype) for g in saved]
        grads = [None] * len(needs)
        for i, g in zip(live, out):
            grads[i] = g
        for endpoint, idx, tidx in ctx.links:
            pairs = [(j, grads[i]) for i, j in zip(idx, tidx) if grads[i] is not None]
            if pairs:  # detached: the trackers' buffers must not join a create_graph graph
                endpoint.record([j for j, _ in pairs], [local(g.detach()) for _, g in pairs])
        return (None, None, None, *grads)


class EWC:
    r"""Elastic weight consolidation over any number of tasks, stored as one quadratic per parameter.

    **Penalty convention.** ``penalty = (lam/2) * sum_i Omega_i (theta_i - mu_i)^2 + (lam/2) * c``,
    gradient ``lam * Omega * (theta - mu)``. With one task, ``Omega = F`` (the importance) and
    ``mu = theta*``: Kirkpatrick et al. 2017's ``sum_i (lam/2) F_i (theta_i - theta*_i)^2``, same
    ``lam``. Papers that write the penalty *without* the 1/2 -- SI (Zenke 2017: ``c * sum Omega (theta
    - theta~)^2``), MAS (Aljundi 2018), Kutalev's code -- need ``lam_ours = 2 * lam_theirs`` (e.g.
    Kutalev's Fisher ``lam = 41`` is ``EWC(model, 82)``). Schwarz et al. 2018 (online EWC) and Huszár
    2018 use the 1/2 like we do.

    **Modes.** Importances are merged in by :meth:`consolidate`, each anchored at the model's
    parameters at that moment (``theta*_K``):

    * ``"separate"`` -- the exact sum of per-task penalties ``sum_K gamma^(n-K) (lam/2) sum_i F_K,i
      (theta_i - theta*_K,i)^2`` (``gamma = 1``: Kirkpatrick's multi-task EWC; ``gamma < 1`` decays older
      tasks). Kept in completed-square form: ``Omega = sum gamma^(n-K) F_K``, ``mu`` the
      ``Omega``-weighted mean of the anchors and the constant ``c``; merged with
      :func:`ewc_fast.ops.consolidate_`, ``c <- gamma*c + increment``. Memory does not grow with tasks.
    * ``"online"`` -- online EWC (Schwarz et al. 2018): ``Omega <- gamma*Omega + F``, ``mu <- theta*``
      (the latest anchor), ``c <- 0``. With ``gamma = 1`` this is Huszár's (PNAS 2018) corrected
      penalty: one quadratic at the latest optimum with the summed Fishers.

    **Stabilised EWC.** ``stabilize_lr = alpha`` (the SGD step size) replaces ``Omega`` by
    ``Omega / (1 + alpha*lam*Omega)`` in :meth:`penalty` and :meth:`apply_` (Kutalev & Lapina 2021): a
    plain SGD step on the penalty contracts ``theta - mu`` by ``1 - alpha*lam*Omega``, which diverges
    when ``alpha*lam*Omega > 2``; the stabilised weight keeps the contraction in (0, 1]. ``c`` is not
    reweighted (it does not affect gradients).

    **State and memory.** Per parameter that was trainable (``requires_grad``) at some consolidation:
    ``Omega`` in ``state_dtype`` (fp32 by default, 4 B/param) and ``mu`` always in **float64**
    (8 B/param) -- 12 B/param, against 8 B/param for an fp32 (Omega, mu) pair. The fp64 anchor is
    required for accuracy, not a luxury: the gradient is ``lam*Omega*(theta - mu)`` and after a
    consolidation ``theta`` sits exactly at (or very near) the anchor; ``mu`` is a weighted mean of
    fp32 anchors that is generally not representable in fp32, so an fp32 ``mu`` would be off by up to
    ``ulp(theta)/2`` and the gradient off by a relative ``~ulp(theta)/|theta - mu|`` -- 100 % at the
    anchor. The kernels form ``theta - mu`` as one fp64 subtraction (``theta`` converted to fp64
    exactly): the difference is correctly rounded, not exact, and is then rounded once more to fp32
    for fp32/bf16/fp16 parameters (fp64 parameters use it as is), so it keeps the arithmetic's
    relative accuracy however close ``theta`` is to ``mu``. The alternative of keeping the latest
    fp32 anchor plus an fp32 offset ``mu - anchor`` needs two fp32 tensors besides ``Omega`` -- the
    same 12 B/param -- and is exact only while the offset fits fp32, so it buys nothing. ``c`` is a
    Python float (fp64).

    **Parameters.** Only parameters with ``requires_grad`` at :meth:`consolidate` time are consolidated;
    importance entries for frozen parameters are accepted and ignored, and an already-penalised
    parameter that is frozen when a later task is consolidated keeps its state unchanged (no ``gamma``
    decay, no new anchor; the global constant ``c`` does decay, which only shifts the reported value).
    Such a parameter still contributes its constant term to the penalty value; :meth:`apply_` never
    writes a ``.grad`` for it. Parameters that appear (or become trainable) after the last
    consolidation are unpenalised until the next :meth:`consolidate`; :meth:`penalty` / :meth:`apply_`
    warn once per such parameter. Parameters are looked up by name on every call, so a parameter
    object may be replaced by one of the same shape, and the state follows the model to another device
    (it is moved on the next call).

    Args:
        model: the module whose ``named_parameters()`` are penalised.
        lam: penalty strength ``>= 0`` (see the convention above).
        mode: ``"separate"`` or ``"online"``.
        gamma: decay of older tasks, in ``(0, 1]``.
        stabilize_lr: ``alpha`` of stabilised EWC, or ``None``.
        state_dtype: dtype of ``Omega`` (``torch.float32`` or ``torch.float64``); ``mu`` is always fp64.
        backend: op backend (``"auto"``, ``"triton"``, ``"cpp"``, ``"torch"``), passed to every op.
    """

    def __init__(
        self,
        model: nn.Module,
        lam: float,
        mode: str = "separate",
        gamma: float = 1.0,
        stabilize_lr: float | None = None,
        state_dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"EWC: model must be a torch.nn.Module, got {type(model).__name__}")
        if mode not in _MODES:
            raise ValueError(f"EWC: mode must be one of {_MODES}, got {mode!r}")
        self._model = model
        self._mode = mode
        self.lam = lam
        self.gamma = gamma
        self.stabilize_lr = stabilize_lr
        self._state_dtype = check_state_dtype("EWC", state_dtype)
        self._backend = check_backend("EWC", backend)
        self._names: list[str] = []
        self._pos: dict[str, int] = {}
        self._omega: list[Tensor] = []
        self._mu: list[Tensor] = []
        self._c = 0.0
        self._n_tasks = 0
        self._warned: set[str] = set()
        self._links_key = None
        self._links_val: list[tuple[ExclusionEndpoint, list[int], list[int]]] = []

    # ---------------------------------------------------------------------------------- settings
    @property
    def lam(self) -> float:
        """Penalty strength (``>= 0``); the penalty is ``(lam/2) * sum Omega (theta - mu)^2``."""
        return self._lam

    @lam.setter
    def lam(self, value: float) -> None:
        self._lam = check_finite_scalar("EWC", "lam", value, low=0.0)

    @property
    def gamma(self) -> float:
        """Decay applied to the existing state at each :meth:`consolidate`, in ``(0, 1]``."""
        return self._gamma

    @gamma.setter
    def gamma(self, value: float) -> None:
        self._gamma = check_finite_scalar("EWC", "gamma", value, low=0.0, low_open=True, high=1.0)

    @property
    def stabilize_lr(self) -> float | None:
        """``alpha`` of stabilised EWC (``Omega -> Omega/(1 + alpha*lam*Omega)``) or ``None``."""
        return self._stabilize_lr

    @stabilize_lr.setter
    def stabilize_lr(self, value: float | None) -> None:
        self._stabilize_lr = _check_stabilize_lr(value)

    @property
    def mode(self) -> str:
        """``"separate"`` or ``"online"`` (fixed at construction)."""
        return self._mode

    @property
    def state_dtype(self) -> torch.dtype:
        """dtype of ``Omega`` (``mu`` is always float64)."""
        return self._state_dtype

    @property
    def backend(self) -> str:
        """Op backend passed to every op (``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``)."""
        return self._backend

    @property
    def n_tasks(self) -> int:
        """Number of successful :meth:`consolidate` calls."""
        return self._n_tasks

    @property
    def c(self) -> float:
        """The constant of the completed square (0 in online mode)."""
        return self._c

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the parameters that have EWC state, in the order they were first consolidated."""
        return tuple(self._names)

    @property
    def omega(self) -> dict[str, Tensor]:
        """``name -> Omega`` (the live state tensors; do not modify them)."""
        return dict(zip(self._names, self._omega))

    @property
    def mu(self) -> dict[str, Tensor]:
        """``name -> mu`` (float64; the live state tensors; do not modify them)."""
        return dict(zip(self._names, self._mu))

    def __repr__(self) -> str:
        numel = sum(o.numel() for o in self._omega)
        return (
            f"EWC(lam={self._lam}, mode={self._mode!r}, gamma={self._gamma}, stabilize_lr={self._stabilize_lr}, "
            f"n_tasks={self._n_tasks}, params={len(self._names)} ({numel:,} values), "
            f"state_dtype={self._state_dtype}, backend={self._backend!r})"
        )

    # ----------------------------------------------------------------------------------- helpers
    def _resolve(self) -> list[nn.Parameter]:
        """The model's current parameters for the state names (moving state to their devices) and
        the once-per-name warning for trainable parameters without state."""
        named = dict(self._model.named_parameters())
        params = []
        for i, name in enumerate(self._names):
            p = named.get(name)
            if p is None:
                raise RuntimeError(f"EWC: parameter {name!r} has EWC state but is no longer in the model")
            if p.shape != self._omega[i].shape:
                raise RuntimeError(
                    f"EWC: parameter {name!r} now has shape {tuple(p.shape)}, its EWC state "
                    f"{tuple(self._omega[i].shape)}"
                )
            if p.device != self._omega[i].device or not same_layout(p, self._omega[i]):
                self._omega[i] = copy_like("EWC", f"omega[{name!r}]", self._omega[i], p)
                self._mu[i] = copy_like("EWC", f"mu[{name!r}]", self._mu[i], p)
            params.append(p)
        if len(named) > len(self._names):
            new = [n for n, p in named.items() if p.requires_grad and n not in self._pos and n not in self._warned]
            if new:
                self._warned.update(new)
                warnings.warn(
                    f"EWC: parameter(s) {new} have no EWC state (added or made trainable after the last "
                    "consolidate()); they are not penalised until the next consolidate()",
                    RuntimeWarning,
                    stacklevel=3,
                )
        return params

    def _links(self, params: list[Tensor]) -> list[tuple[ExclusionEndpoint, list[int], list[int]]]:
        """:meth:`ZENKE_REGISTRY.links <.exclusion.ExclusionRegistry.links>`, cached per registry version
        and parameter list."""
        key = (ZENKE_REGISTRY.version, tuple(map(id, params)))
        if key != self._links_key:
            self._links_val = ZENKE_REGISTRY.links(params)
            self._links_key = key
        return self._links_val

    def _empty_value(self, dtype: torch.dtype | None = None) -> Tensor:
        p = next(iter(self._model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
        if dtype is None:
            dtype = p.dtype if p is not None else torch.get_default_dtype()
        return torch.zeros((), dtype=dtype, device=device)

    # ---------------------------------------------------------------------------------- the API
    @torch.no_grad()
    def consolidate(self, importance: Mapping[str, Tensor]) -> EWC:
        """Merge one task's importance, anchored at the model's current parameters.

        ``importance`` (an :class:`ewc_fast.Importance` or any mapping name -> tensor) must cover every
        trainable parameter with a tensor of its shape, device, a dtype in {fp32, fp64, bf16, fp16},
        finite non-negative values; names that are not parameters of the model are refused; entries
        for frozen parameters are ignored. Everything is validated before any state changes: on
        ``ValueError`` / ``TypeError`` the state (``Omega``, ``mu``, ``c``, ``n_tasks``) is exactly as before.
        Returns ``self``.
        """
        names, params, tensors = check_importance("EWC.consolidate", self._model, importance)
        omega, mu, new = [], [], []
        for name, p in zip(names, params):
            i = self._pos.get(name)
            if i is None:
                o, m = state_like(p, self._state_dtype), state_like(p, torch.float64)
                new.append((name, o, m))
            else:
                o, m = self._omega[i], self._mu[i]
                if o.shape != p.shape:
                    raise ValueError(
                        f"EWC.consolidate: parameter {name!r} has shape {tuple(p.shape)}, its EWC "
                        f"state {tuple(o.shape)}"
                    )
                if o.device != p.device or not same_layout(p, o):
                    o = copy_like("EWC.consolidate", f"omega[{name!r}]", o, p)
                    m = copy_like("EWC.consolidate", f"mu[{name!r}]", m, p)
            omega.append(o)
            mu.append(m)
        online = self._mode == "online"
        check_sum_fits("EWC.consolidate", names, omega, tensors, params, self._gamma)
        inc = _shard.consolidate_(
            omega, mu, tensors, [p.detach() for p in params], self._gamma, online=online, backend=self._backend
        )
        # Commit (the op has run: nothing below can fail).
        for name, o, m in zip(names, omega, mu):
            i = self._pos.get(name)
            if i is not None:
                self._omega[i], self._mu[i] = o, m
        for name, o, m in new:
            self._pos[name] = len(self._names)
            self._names.append(name)
            self._omega.append(o)
            self._mu.append(m)
            self._warned.discard(name)
        self._c = 0.0 if online else self._gamma * self._c + float(inc)
        self._n_tasks += 1
        return self

    def penalty(self) -> Tensor:
        """The penalty ``(lam/2)(sum W (theta - mu)^2 + c)`` as a differentiable 0-dim tensor.

        ``W = Omega`` or the stabilised weight. The dtype is the parameters' promoted dtype, at least
        float32 (an fp16/bf16 model gets an fp32 value: the penalty easily exceeds fp16's 65504). Its
        backward yields ``grad_out * lam * W * (theta - mu)`` for every penalised trainable parameter
        (computed by ``penalty_apply_`` in the forward and kept until backward: one parameter-sized
        buffer). The penalty is differentiable once: a gradient taken with ``create_graph=True``
        raises ``RuntimeError`` when differentiated again, instead of silently treating
        ``lam * W * (theta - mu)`` as a constant (for second-order methods write the penalty with torch
        ops from :attr:`omega` / :attr:`mu`). Returns a zero (not requiring grad) before the first
        consolidation. Zenke-variant
        :class:`ewc_fast.SynapticIntelligence` trackers attached to the same parameters are told, in
        the backward, which gradient came from this penalty.
        """
        if self._n_tasks == 0:
            return self._empty_value()
        params = self._resolve()
        if not params:
            return self._empty_value(torch.float32).fill_(0.5 * self._lam * self._c)
        dtype = torch.float32
        for p in params:
            dtype = torch.promote_types(dtype, p.dtype)
        links = self._links(params) if ZENKE_REGISTRY else []
        return _PenaltyFunction.apply(self, links, dtype, *params)

    @torch.no_grad()
    def apply_(self, *, grad_scale: float = 1.0) -> Tensor:
        """Add the penalty gradient to every penalised parameter's ``.grad`` in place; return the value.

        Call after ``loss.backward()`` and before ``optimizer.step()``. One ``penalty_apply_`` call:
        ``.grad += grad_scale * lam * W * (theta - mu)``; returns ``(lam/2)(sum W (theta - mu)^2 + c)`` as a
        0-dim float64 tensor (no autograd graph). A trainable parameter whose ``.grad`` is ``None``
        gets ``.grad = 0`` first, so the penalty alone still moves it; frozen penalised parameters
        contribute to the value only. ``grad_scale`` multiplies the added gradient (e.g. the loss scale
        of mixed-precision training when gradients are still scaled). Before the first consolidation
        this is a no-op returning 0.

        Zenke-variant SI trackers attached to these parameters receive a snapshot of ``.grad`` taken
        just before the addition (the task-loss gradient); call ``apply_`` once per optimizer step.
        """
        if self._n_tasks == 0:
            return self._empty_value(torch.float64)
        params = self._resolve()
        grads, fresh = [], []
        for name, p in zip(self._names, params):
            if not p.requires_grad:
                grads.append(state_like(p, p.dtype))
                continue
            g = p.grad
            if g is None:
                g = state_like(p, p.dtype)
                fresh.append((p, g))
            elif g.layout != torch.strided:
                raise TypeError(
                    f"EWC.apply_: parameter {name!r} has a {g.layout} .grad; the penalty gradient is dense. "
                    "Use EWC.penalty() (autograd adds it) or dense gradients (e.g. nn.Embedding(sparse=False))"
                )
            grads.append(g)
        # Validate everything (as the op would, on the local shards) before the first change: the .grad
        # assignments and the SI snapshots below, then the op's writes.
        check_penalty_apply_args(
            [local(g) for g in grads],
            [local(p) for p in params],
            [local(o) for o in self._omega],
            [local(m) for m in self._mu],
            self._lam,
            self._stabilize_lr,
            self._c,
            grad_scale,
        )
        resolve_backend(self._backend, op_device(params))
        for p, g in fresh:
            p.grad = g
        links = []
        if ZENKE_REGISTRY:
            for endpoint, idx, tidx in self._links(params):
                keep = [k for k, i in enumerate(idx) if params[i].requires_grad]
                links.append((endpoint, [tidx[k] for k in keep], [local(grads[idx[k]]) for k in keep]))
                endpoint.snapshot(*links[-1][1:])
        value = _shard.penalty_apply_(
            grads,
            params,
            self._omega,
            self._mu,
            self._lam,
            alpha=self._stabilize_lr,
            c=self._c,
            grad_scale=grad_scale,
            backend=self._backend,
        )
        for endpoint, tidx, g in links:  # lets the trackers tell a skipped step's snapshot from this one
            endpoint.seal(tidx, g)
        return value

    # ----------------------------------------------------------------------------- persistence
    def state_dict(self) -> dict:
        """All state and settings as plain values and (cloned) tensors; safe for ``torch.save`` and
        ``torch.load(..., weights_only=True)``. :meth:`load_state_dict` restores it bit-exactly."""
        return {
            **state_header(_FORMAT, _VERSION),
            "names": list(self._names),
            "omega": clone_named(self._names, self._omega),
            "mu": clone_named(self._names, self._mu),
            "c": float(self._c),
            "lam": float(self._lam),
            "gamma": float(self._gamma),
            "mode": self._mode,
            "stabilize_lr": self._stabilize_lr,
            "n_tasks": int(self._n_tasks),
            "state_dtype": dtype_name(self._state_dtype),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Restore :meth:`state_dict` output (state, ``lam``, ``gamma``, ``mode``, ``stabilize_lr``,
        ``n_tasks``, ``state_dtype``). Every name must be a parameter of the model with the stored shape;
        the tensors are copied to the parameters' devices. Validated completely before anything changes,
        consistency included: ``Omega`` finite and ``>= 0`` in ``state_dtype``, ``mu`` finite float64,
        ``c >= 0`` (0 in online mode), and an empty state (no names, ``c = 0``) when ``n_tasks`` is 0."""
        owner = "EWC.load_state_dict"
        check_header(owner, state, _FORMAT, _VERSION)
        require_keys(owner, state, _KEYS)
        mode = state["mode"]
        if mode not in _MODES:
            raise ValueError(f"{owner}: mode must be one of {_MODES}, got {mode!r}")
        lam = check_finite_scalar(owner, "lam", state["lam"], low=0.0)
        gamma = check_finite_scalar(owner, "gamma", state["gamma"], low=0.0, low_open=True, high=1.0)
        stabilize_lr = _check_stabilize_lr(state["stabilize_lr"])
        c = check_finite_scalar(owner, "c", state["c"], low=0.0)  # a sum of F*(anchor - mu)^2 terms
        n_tasks = check_count(owner, "n_tasks", state["n_tasks"])
        if mode == "online" and c != 0.0:
            raise ValueError(f"{owner}: c must be 0 in online mode, got {c}")
        dtype = dtype_from_name(owner, state["state_dtype"])
        names = check_names(owner, state["names"])
        if n_tasks == 0 and (names or c != 0.0):
            raise ValueError(
                f"{owner}: n_tasks is 0 but the state has {len(names)} penalised parameter(s) and c = {c}; "
                "an EWC state before its first consolidate() is empty (save it with EWC.state_dict())"
            )
        omega_sd = check_entries(owner, "omega", state["omega"], names)
        mu_sd = check_entries(owner, "mu", state["mu"], names)
        omega, mu = [], []
        for name, p in zip(names, params_by_name(owner, self._model, names)):
            o, m = omega_sd[name], mu_sd[name]
            if not isinstance(o, Tensor) or not isinstance(m, Tensor):
                raise TypeError(f"{owner}: omega/mu of {name!r} must be tensors")
            check_state_tensor(owner, f"omega[{name!r}]", o, p.shape, dtype=dtype, nonnegative=True)
            check_state_tensor(owner, f"mu[{name!r}]", m, p.shape, dtype=torch.float64, finite=True)
            omega.append(copy_like(owner, f"omega[{name!r}]", o, p))
            mu.append(copy_like(owner, f"mu[{name!r}]", m, p))
        self._mode, self._lam, self._gamma, self._stabilize_lr = mode, lam, gamma, stabilize_lr
        self._state_dtype, self._c, self._n_tasks = dtype, c, n_tasks
        self._names = names
        self._pos = {n: i for i, n in enumerate(names)}
        self._omega, self._mu = omega, mu
        self._warned = set()
        self._links_key = None
