"""Drop-in ``torch.optim.SGD`` / ``Adam`` / ``AdamW`` with the EWC penalty, SI and WVA inside the step.

Same hyper-parameters, defaults, parameter groups and state-dict keys as ``torch.optim`` (``SGD``:
``momentum_buffer``; ``Adam``/``AdamW``: ``step``, ``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``), so
lr schedulers and checkpoints work unchanged; plus ``ewc=``, ``si=``, ``wva=``, ``stabilize=`` and
``backend=`` (see :class:`~ewc_fast.optim._base.FusedOptimizer`). Not offered: ``maximize``,
``foreach``/``fused``/``capturable``/``differentiable`` (the step is always one fused pass), tensor
``lr``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..consolidation import EWC, WVA, SynapticIntelligence
from ..ops._sharding import local, state_like
from ..ops._validate import check_finite_scalar
from ._base import FusedOptimizer

__all__ = ["SGD", "Adam", "AdamW"]


def _arith(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _state_tensor(p: Tensor) -> Tensor:
    return state_like(p, _arith(p))  # a DTensor laid out like p for FSDP2 parameters


def _fix_dtype(state: dict, key: str, p: Tensor) -> Tensor | None:
    t = state.get(key)
    if t is not None and (t.dtype != _arith(p) or t.device != p.device or not local(t).is_contiguous()):
        t = state[key] = t.to(device=p.device, dtype=_arith(p))
        if not local(t).is_contiguous():
            t = state[key] = t.contiguous()
    return t


class SGD(FusedOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, nesterov, weight decay) with the EWC penalty gradient,
    SI accumulation and WVA attenuation fused into its step. Per parameter, with
    ``g = grad + lam*W*(theta - mu) + weight_decay*theta``: ``buf = g`` at the first step, else
    ``buf = momentum*buf + (1 - dampening)*g``; ``theta -= lr*(g + momentum*buf if nesterov else buf)``."""

    _ALGO = "sgd"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
        *,
        ewc: EWC | None = None,
        si: SynapticIntelligence | None = None,
        wva: WVA | None = None,
        stabilize: bool = False,
        backend: str = "auto",
    ) -> None:
        for name, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
            check_finite_scalar("SGD", name, v, low=0.0)
        check_finite_scalar("SGD", "dampening", dampening, low=0.0, high=1.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("SGD: nesterov momentum requires a momentum and zero dampening")
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, nesterov=nesterov)
        super().__init__(params, defaults, ewc=ewc, si=si, wva=wva, stabilize=stabilize, backend=backend)

    def _group_args(self, group: dict) -> dict:
        return dict(
            lr=group["lr"],
            momentum=group["momentum"],
            dampening=group["dampening"],
            weight_decay=group["weight_decay"],
            nesterov=group["nesterov"],
        )

    def _prepare_state(self, group, p):
        if group["momentum"] == 0:
            return [[], [], []], 1, False
        state = self.state[p]
        buf = _fix_dtype(state, "momentum_buffer", p)
        init = buf is None
        if init:
            buf = state["momentum_buffer"] = _state_tensor(p)
        return [[buf], [], []], 1, init


class Adam(FusedOptimizer):
    """``torch.optim.Adam`` (amsgrad, L2 weight decay added to the gradient) with the EWC penalty
    gradient, SI accumulation and WVA attenuation fused into its step:
    ``g = grad + lam*W*(theta - mu) + weight_decay*theta``; ``m = lerp(m, g, 1 - beta1)``;
    ``v = beta2*v + (1 - beta2)*g^2``; ``theta -= lr/(1 - beta1^t) * m / (sqrt(max(v)) / sqrt(1 - beta2^t) + eps)``."""

    _ALGO = "adam"
    _DEFAULT_WD = 0.0

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float | None = None,
        amsgrad: bool = False,
        *,
        ewc: EWC | None = None,
        si: SynapticIntelligence | None = None,
        wva: WVA | None = None,
        stabilize: bool = False,
        backend: str = "auto",
    ) -> None:
        name = type(self).__name__
        weight_decay = self._DEFAULT_WD if weight_decay is None else weight_decay
        for arg, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            check_finite_scalar(name, arg, v, low=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"{name}: betas must be a pair, got {betas!r}")
        for i, b in enumerate(betas):
            check_finite_scalar(name, f"betas[{i}]", b, low=0.0)
            if not b < 1.0:
                raise ValueError(f"{name}: betas[{i}] must be in [0, 1), got {b}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, amsgrad=bool(amsgrad))
        super().__init__(params, defaults, ewc=ewc, si=si, wva=wva, stabilize=stabilize, backend=backend)

    def _group_args(self, group: dict) -> dict:
        return dict(lr=group["lr"], betas=tuple(group["betas"]), eps=group["eps"], weight_decay=group["weight_decay"])

    def _prepare_state(self, group, p):
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = _state_tensor(p)
            state["exp_avg_sq"] = _state_tensor(p)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = _state_tensor(p)
        elif group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = _state_tensor(p)
        m, v = _fix_dtype(state, "exp_avg", p), _fix_dtype(state, "exp_avg_sq", p)
        vm = [_fix_dtype(state, "max_exp_avg_sq", p)] if group["amsgrad"] else []
        state["step"] = state["step"] + 1  # not in place: a loaded state dict may share the tensor
        return [[m], [v], vm], int(state["step"].item()), False


class AdamW(Adam):
    """``torch.optim.AdamW``: :class:`Adam` with decoupled weight decay ``theta *= 1 - lr*weight_decay``
    (default 1e-2) instead of the L2 term in the gradient; same fused EWC / SI / WVA."""

    _ALGO = "adamw"
    _DEFAULT_WD = 1e-2
