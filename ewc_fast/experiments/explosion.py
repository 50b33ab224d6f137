"""The EWC step explosion under plain SGD, and what clipping and stabilisation do about it
(Kutalev & Lapina 2021, arXiv 2109.10021).

With plain SGD of step α, the EWC penalty's gradient λΩ_i(θ_i − θ*_i) alone moves an entry by
``θ_i − θ*_i ← (1 − αλΩ_i)(θ_i − θ*_i)``: the distance to the anchor shrinks while αλΩ_i < 2 and
grows geometrically once αλΩ_i > 2 — the largest importance, max Ω, sets the threshold
**α·λ·max Ω = 2**. Gradient clipping bounds the step, so nothing overflows, but the clipped step is
dominated by the oscillating penalty and the new task's gradient is lost in it. The stabilised
penalty uses Ω̃ = Ω/(1 + αλΩ), for which αλΩ̃ < 1 whatever λ (:class:`ewc_fast.EWC` with
``stabilize_lr = α``).

Protocol (:func:`run_explosion`): a model is trained on task A (MNIST) with plain SGD for
``epochs_a`` epochs; the importance (``importance``, default the empirical Fisher) is computed on the
last ``n_importance`` training samples. Then, from that same state, task B (a pixel permutation) is
trained for ``steps`` SGD steps with the EWC penalty for every ``value`` v of α·λ·max Ω (λ = v/(α·max Ω))
and every variant: ``plain`` (the penalty as is), ``clip`` (total gradient clipped to ``clip_norm``)
and ``stabilized``. Each step records the task-B loss, the penalty and the gradient norm before
clipping; every ``eval_every`` steps the test accuracy on A and B (on ``n_eval`` test images). A run
**diverges** when the loss, penalty or a parameter becomes non-finite or the penalty exceeds
``blowup``; training stops there. The result lists, per model and variant, the smallest grid value
at which it diverged and the largest at which it did not.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ..consolidation import EWC
from .continual import RunConfig
from .data import MNIST
from .models import build_model
from .tasks import permuted_tasks
from .training import estimate, evaluate, importance_subset, make_optimizer, train_task

__all__ = ["VARIANTS", "ExplosionConfig", "run_explosion", "thresholds"]

#: the three ways of training task B
VARIANTS = ("plain", "clip", "stabilized")


@dataclass
class ExplosionConfig:
    """Sizes and settings of :func:`run_explosion` (see the module doc)."""

    models: Sequence[str] = ("kutalev-cnn", "attention")
    values: Sequence[float] = (0.5, 1.5, 1.9, 2.1, 3.0, 10.0, 100.0)
    variants: Sequence[str] = VARIANTS
    importance: str = "fisher"
    lr: float = 0.05
    clip_norm: float = 1.0
    epochs_a: int = 1
    steps: int = 200
    batch_size: int = 100
    n_importance: int = 1000
    eval_every: int = 20
    n_eval: int = 1000
    blowup: float = 1e6
    seed: int = 0

    def __post_init__(self):
        bad = [v for v in self.variants if v not in VARIANTS]
        if bad:
            raise ValueError(f"variants: unknown {bad}; choose from {VARIANTS}")
        if not self.values or any(not (v > 0 and math.isfinite(v)) for v in self.values):
            raise ValueError(f"values (α·λ·max Ω) must be positive and finite, got {list(self.values)}")
        for k in ("lr", "clip_norm", "blowup"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)}")


def _finite_params(model: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _train_b(
    model: torch.nn.Module,
    imp,
    lam: float,
    variant: str,
    ec: ExplosionConfig,
    x_b: torch.Tensor,
    y_b: torch.Tensor,
    evals: Callable[[torch.nn.Module], tuple[float, float]],
    gen: torch.Generator,
) -> dict:
    ewc = EWC(model, lam, stabilize_lr=ec.lr if variant == "stabilized" else None).consolidate(imp)
    cfg = RunConfig(
        optimizer="sgd",
        lr=ec.lr,
        batch_size=ec.batch_size,
        epochs=1,
        steps_per_task=ec.steps,
        clip_norm=ec.clip_norm if variant == "clip" else None,
        eval_every_epoch=False,
    )
    opt = make_optimizer(model, cfg)
    rec: dict = {"step": [], "loss": [], "penalty": [], "grad_norm": [], "eval": []}
    state = {"penalty": 0.0, "gnorm": 0.0, "diverged_at": None}

    def after_backward():
        state["penalty"] = float(ewc.apply_())
        # the norm the optimizer would see (before any clipping): task + penalty gradient
        sq = sum(float((p.grad.double() ** 2).sum()) for p in model.parameters() if p.grad is not None)
        state["gnorm"] = math.sqrt(sq) if math.isfinite(sq) else float("inf")

    def on_step(step: int, loss: float) -> bool:
        rec["step"].append(step)
        rec["loss"].append(loss if math.isfinite(loss) else None)
        pen = state["penalty"]
        rec["penalty"].append(pen if math.isfinite(pen) else None)
        rec["grad_norm"].append(state["gnorm"] if math.isfinite(state["gnorm"]) else None)
        bad = not (math.isfinite(loss) and math.isfinite(pen)) or pen > ec.blowup or not _finite_params(model)
        if bad:
            state["diverged_at"] = step
            return True
        if step % ec.eval_every == 0 or step == ec.steps:
            a, b = evals(model)
            rec["eval"].append({"step": step, "acc_A": a, "acc_B": b})
        return False

    train_task(model, opt, x_b, y_b, cfg, generator=gen, after_backward=after_backward, on_step=on_step)
    final = rec["eval"][-1] if rec["eval"] and state["diverged_at"] is None else None
    return {
        **rec,
        "diverged": state["diverged_at"] is not None,
        "diverged_at": state["diverged_at"],
        "final_acc_A": final["acc_A"] if final else None,
        "final_acc_B": final["acc_B"] if final else None,
    }


def thresholds(runs: list[dict]) -> dict:
    """``{variant: {"first_diverged": v or None, "last_stable": v or None}}`` over the value grid."""
    out = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        rs = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["value"])
        div = [r["value"] for r in rs if r["diverged"]]
        ok = [r["value"] for r in rs if not r["diverged"]]
        out[variant] = {"first_diverged": min(div) if div else None, "last_stable": max(ok) if ok else None}
    return out


def run_explosion(data: MNIST, ec: ExplosionConfig, *, log: Callable[[str], None] | None = None) -> dict:
    """Every model × variant × value of α·λ·max Ω (see the module doc); a JSON-ready dict."""
    t_all = time.perf_counter()
    task_a, task_b = permuted_tasks(2, ec.seed, first_identity=True, n_pixels=data.n_features)
    x_tr, y_tr = torch.from_numpy(data.x_train), torch.from_numpy(data.y_train)
    x_te, y_te = torch.from_numpy(data.x_test[: ec.n_eval]), torch.from_numpy(data.y_test[: ec.n_eval])
    x_b, y_b = task_b.apply(x_tr, y_tr)

    def evals(model):
        return evaluate(model, x_te, y_te, task_a)[0], evaluate(model, x_te, y_te, task_b)[0]

    out: dict = {"config": dataclasses.asdict(ec), "models": {}}
    for name in ec.models:
        t0 = time.perf_counter()
        torch.manual_seed(ec.seed)
        model = build_model(name, n_in=data.n_features, n_out=data.n_classes)
        gen = torch.Generator().manual_seed(ec.seed)
        cfg_a = RunConfig(optimizer="sgd", lr=ec.lr, batch_size=ec.batch_size, epochs=ec.epochs_a)
        train_task(model, make_optimizer(model, cfg_a), x_tr, y_tr, cfg_a, generator=gen)
        x_imp, y_imp = importance_subset(x_tr, y_tr, ec.n_importance)
        cfg_imp = dataclasses.replace(cfg_a, importance_batch=min(500, ec.n_importance))
        imp = estimate(model, x_imp, y_imp, (ec.importance,), cfg_imp, generator=gen)[ec.importance]
        max_omega = max(float(t.max()) for t in imp.values())
        acc_a, acc_b = evals(model)
        if log is not None:
            log(f"{name}: task A accuracy {acc_a:.4f} (B {acc_b:.4f}); max Ω = {max_omega:.4g}")
        runs = []
        for variant in ec.variants:
            for v in ec.values:
                lam = v / (ec.lr * max_omega)
                m = copy.deepcopy(model)
                r = _train_b(m, imp, lam, variant, ec, x_b, y_b, evals, torch.Generator().manual_seed(ec.seed + 1))
                r.update({"variant": variant, "value": float(v), "lam": lam})
                runs.append(r)
                if log is not None:
                    tail = (
                        f"DIVERGED at step {r['diverged_at']}"
                        if r["diverged"]
                        else f"acc A {r['final_acc_A']:.3f} B {r['final_acc_B']:.3f}"
                    )
                    log(f"  {variant:>10s} α·λ·max Ω = {v:<6g} (λ = {lam:.4g}): {tail}")
        out["models"][name] = {
            "max_omega": max_omega,
            "acc_A_before": acc_a,
            "acc_B_before": acc_b,
            "n_params": sum(p.numel() for p in model.parameters()),
            "runs": runs,
            "thresholds": thresholds(runs),
            "wall_s": time.perf_counter() - t0,
        }
    out["wall_s"] = time.perf_counter() - t_all
    return out
