"""``FusedOptimizer``: the ``torch.optim.Optimizer`` base of :mod:`ewc_fast.optim`, whose step is one
:func:`ewc_fast.ops.fused_step_` pass per parameter group (and per distinct step count / feature set),
with the EWC penalty gradient, SI's accumulation and WVA's attenuation inside it."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .. import ops
from ..consolidation import EWC, WVA, SynapticIntelligence
from ..consolidation._shard import penalty_apply_ as sharded_penalty_apply_
from ..ops._sharding import any_sharded, local, reduce_scalars, value_groups
from ..ops._validate import check_finite_scalar

__all__ = ["FusedOptimizer"]


def _arith(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


class FusedOptimizer(torch.optim.Optimizer):
    r"""Base of the fused optimizers (:class:`~ewc_fast.optim.SGD`, :class:`~ewc_fast.optim.Adam`,
    :class:`~ewc_fast.optim.AdamW`).

    ``ewc`` (:class:`ewc_fast.EWC`), ``si`` (:class:`ewc_fast.SynapticIntelligence`) and ``wva``
    (:class:`ewc_fast.WVA`) are optional and exposed as :attr:`ewc`, :attr:`si`, :attr:`wva`. Each
    :meth:`step` takes, per element and in one pass (docs/OPTIM.md):
    ``g_tot = g + lam*W*(theta - mu)`` (EWC; ``W`` stabilised with the group's ``lr`` when
    ``stabilize=True``, else with ``ewc.stabilize_lr`` if set), the update of ``torch.optim`` on
    ``g_tot``, WVA's ``theta_old + dtheta/(1 + lam*A)``, and SI's ``omega -= g_si*dtheta`` with the step
    actually stored (``g_si`` = task gradient for Zenke's variant, ``g_tot`` for Kutalev's). The
    penalty at the parameters before the step is kept in :attr:`last_penalty`.

    Parameters whose ``.grad`` is ``None`` are skipped (as ``torch.optim`` does; the penalty does not
    move them then). Optimizer state is kept in fp32 for fp32/bf16/fp16 parameters and fp64 for fp64
    ones. ``GradScaler``: ``scaler.step(opt)`` hands over the scale and ``found_inf``; gradients are
    unscaled inside the step and a step with ``found_inf`` changes nothing (parameters, state, SI).
    The SI tracker and WVA object must not also be attached to an optimizer through their hooks.

    FSDP2 (``DTensor`` parameters): every update is elementwise, so each rank steps its local shards
    (state laid out like the parameters); only the penalty value combines ranks (one scalar all-reduce
    per group of identically sharded parameters). :meth:`clip_grad_norm_` does not support them yet.
    """

    _ALGO = ""

    def __init__(
        self,
        params,
        defaults: dict,
        *,
        ewc: EWC | None = None,
        si: SynapticIntelligence | None = None,
        wva: WVA | None = None,
        stabilize: bool = False,
        backend: str = "auto",
    ) -> None:
        name = type(self).__name__
        for arg, obj, cls in (("ewc", ewc, EWC), ("si", si, SynapticIntelligence), ("wva", wva, WVA)):
            if obj is not None and not isinstance(obj, cls):
                raise TypeError(f"{name}: {arg} must be an ewc_fast.{cls.__name__} or None, got {type(obj).__name__}")
            if obj is not None and getattr(obj, "attached", False):
                raise ValueError(
                    f"{name}: the {arg} object is attached to an optimizer through hooks; detach() it first "
                    "(the fused optimizer applies it inside its step, the hooks would apply it twice)"
                )
        if not isinstance(stabilize, bool):
            raise TypeError(f"{name}: stabilize must be a bool, got {type(stabilize).__name__}")
        if stabilize and ewc is None:
            raise ValueError(f"{name}: stabilize=True needs ewc=")
        super().__init__(params, defaults)
        self.ewc, self.si, self.wva = ewc, si, wva
        self.stabilize = stabilize
        self.backend = backend
        self.last_penalty: float | None = None
        self._pen_scale = 1.0
        # GradScaler.step hands the scale and found_inf over (grad_scale / found_inf attributes)
        self._step_supports_amp_scaling = True

    # ------------------------------------------------------------------------------- subclasses
    def _group_args(self, group: dict) -> dict:
        """Keyword arguments of :func:`ewc_fast.ops.fused_step_` for one group (hyper-parameters)."""
        raise NotImplementedError

    def _state_keys(self, group: dict) -> tuple[str, ...]:
        """State tensors of a parameter, in the op's (exp_avg, exp_avg_sq, max_exp_avg_sq) order."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------- consolidation
    def _ewc_map(self) -> dict:
        """id(param) -> (Omega, mu) of the EWC object, plus the penalised parameters themselves."""
        e = self.ewc
        if e is None or e.n_tasks == 0:
            return {}
        params = e._resolve()
        return {id(p): (p, o, m) for p, o, m in zip(params, e._omega, e._mu)}

    def _si_map(self) -> dict:
        s = self.si
        return {} if s is None else {id(p): w for p, w in zip(s._params, s._omega)}

    def _wva_map(self) -> dict:
        w = self.wva
        if w is None or not w._params:
            return {}
        for i, p in enumerate(w._params):
            if w._accum[i].device != p.device:
                w._accum[i] = w._accum[i].to(p.device)
        return {id(p): a for p, a in zip(w._params, w._accum)}

    def _alpha(self, group: dict) -> float | None:
        if self.stabilize:
            return float(group["lr"])
        return None if self.ewc is None else self.ewc.stabilize_lr

    # ---------------------------------------------------------------------------------- clipping
    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0, error_if_nonfinite: bool = False) -> Tensor:
        """Clip the gradient the coming :meth:`step` follows -- task gradient plus EWC penalty gradient --
        to total norm ``max_norm``, as ``torch.nn.utils.clip_grad_norm_`` would clip ``.grad`` after
        ``EWC.apply_``: ``coef = min(1, max_norm/(norm + 1e-6))``; ``.grad`` is multiplied by ``coef``
        now and the penalty gradient of the next step by the same ``coef``. Returns the total norm.
        Call it after ``backward`` (and after ``scaler.unscale_(opt)`` with a GradScaler). Costs one
        read of the gradients and the EWC state and one gradient-sized temporary per parameter."""
        max_norm = check_finite_scalar(f"{type(self).__name__}.clip_grad_norm_", "max_norm", max_norm, low=0.0)
        if any_sharded(p for g in self.param_groups for p in g["params"]):
            raise NotImplementedError(
                f"{type(self).__name__}.clip_grad_norm_: DTensor (FSDP2) parameters are not supported yet; "
                "clip the task gradients with torch.nn.utils.clip_grad_norm_ (the penalty gradient is then unclipped)"
            )
        norm_type = float(norm_type)
        emap = self._ewc_map()
        lam = 0.0 if self.ewc is None else self.ewc.lam
        totals = []
        grads = []
        for group in self.param_groups:
            alpha = self._alpha(group)
            for p in group["params"]:
                if p.grad is None:
                    continue
                grads.append(p.grad)
                hit = emap.get(id(p))
                if hit is None:
                    totals.append(p.grad)
                    continue
                t = p.grad.detach().clone()
                ops.penalty_apply_([t], [p.detach()], [hit[1]], [hit[2]], lam, alpha=alpha, backend=self.backend)
                totals.append(t)
        if not totals:
            return torch.zeros(())
        norms = [torch.linalg.vector_norm(t, norm_type, dtype=torch.float32 if t.dtype != torch.float64 else None)
                 for t in totals]  # fmt: skip
        total = torch.linalg.vector_norm(torch.stack([n.to(totals[0].device) for n in norms]), norm_type)
        if error_if_nonfinite and not torch.isfinite(total):
            raise RuntimeError(
                f"{type(self).__name__}.clip_grad_norm_: the total norm of order {norm_type} is non-finite"
            )
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.device, g.dtype))
        self._pen_scale = float(coef)
        return total

    # -------------------------------------------------------------------------------------- step
    def _prepare_state(self, group: dict, p: Tensor) -> tuple[list[Tensor], int, bool]:
        """The parameter's state tensors (created on first use), its 1-based step and whether the
        momentum buffer starts at this step."""
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One fused step over every parameter with a gradient (see the class doc); returns the
        closure's loss if a closure is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        found_inf = getattr(self, "found_inf", None)
        grad_scale = getattr(self, "grad_scale", None)
        pen_scale, self._pen_scale = self._pen_scale, 1.0
        if found_inf is not None and float(found_inf) != 0.0:
            return loss  # skipped: parameters, optimizer state and SI unchanged (as GradScaler skips step())
        inv_scale = 1.0
        if grad_scale is not None:
            inv_scale = float(grad_scale.double().reciprocal().float())  # as GradScaler.unscale_
        emap, smap, wmap = self._ewc_map(), self._si_map(), self._wva_map()
        lam = 0.0 if self.ewc is None else self.ewc.lam
        si_variant = "zenke" if self.si is None else self.si.variant
        wva_lam = 0.0 if self.wva is None else self.wva.lam
        stepped = set()
        value = 0.0
        for group in self.param_groups:
            calls: dict = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                state, step, init = self._prepare_state(group, p)
                key = (step, init, id(p) in emap, id(p) in smap, id(p) in wmap)
                calls.setdefault(key, []).append((p, state))
            alpha = self._alpha(group)
            hyper = self._group_args(group)
            for (step, init, has_e, has_s, has_w), items in calls.items():
                # DTensor (FSDP2) parameters: one call per group of identically sharded parameters, on
                # the local shards; the penalty sums of a group are summed over its shard dimensions
                parts = value_groups([p for p, _ in items]) if has_e else [(None, list(range(len(items))))]
                for key, idx in parts:
                    sub = [items[i] for i in idx]
                    ps = [p for p, _ in sub]
                    out = ops.fused_step_(
                        [local(p) for p in ps],
                        [local(p.grad) for p in ps],
                        *[[local(t) for _, s in sub for t in s[j]] for j in range(3)],
                        algo=self._ALGO,
                        step=step,
                        momentum_init=init,
                        omega=[local(emap[id(p)][1]) for p in ps] if has_e else [],
                        mu=[local(emap[id(p)][2]) for p in ps] if has_e else [],
                        lam=lam,
                        alpha=alpha,
                        pen_scale=pen_scale,
                        si_omega=[local(smap[id(p)]) for p in ps] if has_s else [],
                        si_variant=si_variant,
                        wva_accum=[local(wmap[id(p)]) for p in ps] if has_w else [],
                        wva_lam=wva_lam,
                        inv_scale=inv_scale,
                        backend=self.backend,
                        **hyper,
                    )
                    if has_e:
                        value += float(reduce_scalars(out.reshape(1).clone(), key).reshape(()))
                        stepped.update(id(p) for p in ps)
        if emap:
            rest = [v for k, v in emap.items() if k not in stepped]
            if rest:  # penalised parameters not stepped (frozen, no grad) still count in the value
                scratch = [torch.zeros_like(p) for p, _, _ in rest]
                value += float(
                    sharded_penalty_apply_(
                        scratch, [p.detach() for p, _, _ in rest], [o for _, o, _ in rest], [m for _, _, m in rest],
                        lam, alpha=self.ewc.stabilize_lr, c=0.0, grad_scale=1.0, backend=self.backend,
                    )
                )  # fmt: skip
            self.last_penalty = value + 0.5 * lam * self.ewc.c
        else:
            self.last_penalty = None if self.ewc is None else 0.5 * lam * self.ewc.c
        if self.si is not None:
            self.si._steps += 1
        return loss

    # ------------------------------------------------------------------------------ persistence
    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, keeping the state in the arithmetic dtype (fp32
        for fp32/bf16/fp16 parameters, fp64 for fp64) instead of casting it to the parameter's dtype."""
        super().load_state_dict(state_dict)
        ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, p in zip(ids, params):
            src = state_dict["state"].get(i)
            if not src:
                continue
            st = self.state[p]
            for k, v in src.items():
                if k == "step" and isinstance(v, Tensor):
                    st[k] = v.detach().clone()  # not shared with the source
                elif isinstance(v, Tensor) and v.is_floating_point():
                    st[k] = v.to(device=p.device, dtype=_arith(p), copy=True)
