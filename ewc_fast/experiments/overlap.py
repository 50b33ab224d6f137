"""Fisher overlap vs task similarity (Kirkpatrick et al. 2017, Fig. 3C).

Task A is unpermuted MNIST; task B permutes a fraction ``f`` of the pixels
(:func:`ewc_fast.experiments.tasks.partial_permutation`, nested sets as ``f`` grows). A network is trained on
A once; for each ``f`` a copy continues on B (with EWC on A's Fisher by default, as in the paper;
``method="none"`` for plain fine-tuning). The empirical Fisher diagonals of A and B are then
computed on the last ``n_importance`` training samples of each task — both at the final
parameters (``fisher_at="final"``, default: the two tasks seen through the same network) or each
at the end of its own task (``fisher_at="own"``) — and their overlap

    overlap = Σ_i √(f̂_A,i · f̂_B,i),   f̂ = F / Σ F     (1 = identical, 0 = disjoint)

is reported per parameter tensor (each normalised over that tensor) and for the whole network
(``"all"``, normalised over all parameters).
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Mapping, Sequence

import torch
from numpy.typing import ArrayLike

from .continual import RunConfig
from .data import MNIST
from .models import build_model
from .strategies import make_strategy
from .tasks import Task, partial_permutation
from .training import estimate, evaluate, importance_subset, make_optimizer, resolve_device, train_task

__all__ = ["fisher_overlap", "overlap_table", "run_overlap"]


def fisher_overlap(fa: ArrayLike | torch.Tensor, fb: ArrayLike | torch.Tensor) -> float:
    """``Σ √(f̂a f̂b)`` of two non-negative arrays/tensors normalised to unit sum (NaN if one is 0)."""
    a = torch.as_tensor(fa).detach().to("cpu", torch.float64).reshape(-1).clamp_min(0)
    b = torch.as_tensor(fb).detach().to("cpu", torch.float64).reshape(-1).clamp_min(0)
    if a.numel() != b.numel():
        raise ValueError("fisher_overlap: sizes differ")
    sa, sb = float(a.sum()), float(b.sum())
    if sa <= 0 or sb <= 0:
        return float("nan")
    return float(torch.sqrt((a / sa) * (b / sb)).sum())


def overlap_table(fa: Mapping[str, torch.Tensor], fb: Mapping[str, torch.Tensor]) -> dict:
    """Overlap per parameter name, plus ``"all"`` (all parameters as one vector)."""
    out = {name: fisher_overlap(fa[name], fb[name]) for name in fa}
    out["all"] = fisher_overlap(
        torch.cat([fa[n].reshape(-1).double().cpu() for n in fa]),
        torch.cat([fb[n].reshape(-1).double().cpu() for n in fa]),
    )
    return out


def run_overlap(
    data: MNIST,
    cfg: RunConfig,
    *,
    fractions: Sequence[float] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0),
    seed: int = 0,
    fisher_at: str = "final",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    if fisher_at not in ("final", "own"):
        raise ValueError("fisher_at must be 'final' or 'own'")
    dev = resolve_device(cfg.device)
    torch.manual_seed(seed)
    model = build_model(cfg.model, n_in=data.n_features, n_out=data.n_classes).to(dev)
    x_tr, y_tr = torch.from_numpy(data.x_train).to(dev), torch.from_numpy(data.y_train).to(dev)
    x_te, y_te = torch.from_numpy(data.x_test).to(dev), torch.from_numpy(data.y_test).to(dev)
    task_a = Task("A-identity")
    gen = torch.Generator().manual_seed(seed)
    cfg_a = dataclasses.replace(cfg, method="none", lam=0.0)
    opt = make_optimizer(model, cfg_a)
    train_task(model, opt, x_tr, y_tr, cfg_a, generator=gen, progress=progress, desc="task A")
    xa_imp, ya_imp = importance_subset(x_tr, y_tr, cfg.n_importance)
    fisher_a_own = estimate(model, xa_imp, ya_imp, ("fisher",), cfg)["fisher"]
    acc_a = evaluate(model, x_te, y_te, task_a)[0]
    if log is not None:
        log(f"  task A trained: accuracy {acc_a:.4f}")
    rows, per_fraction = [], []
    for f in fractions:
        task_b = Task(f"B-partial{f:g}", partial_permutation(float(f), seed, n_pixels=data.n_features))
        m = copy.deepcopy(model)
        strategy = make_strategy(m, cfg)
        opt_b = make_optimizer(m, cfg)
        strategy.attach(opt_b)
        if cfg.method != "none":
            strategy.end_task(xa_imp, ya_imp, gen)  # consolidate task A (on the copy)
        xb, yb = task_b.apply(x_tr, y_tr)
        train_task(
            m,
            opt_b,
            xb,
            yb,
            cfg,
            generator=gen,
            after_backward=strategy.after_backward,
            progress=progress,
            desc=f"task B f={f:g}",
        )
        xb_imp, yb_imp = importance_subset(xb, yb, cfg.n_importance)
        fisher_b = estimate(m, xb_imp, yb_imp, ("fisher",), cfg)["fisher"]
        fisher_a = estimate(m, xa_imp, ya_imp, ("fisher",), cfg)["fisher"] if fisher_at == "final" else fisher_a_own
        table = overlap_table(fisher_a, fisher_b)
        acc_after = [evaluate(m, x_te, y_te, task_a)[0], evaluate(m, x_te, y_te, task_b)[0]]
        per_fraction.append({"fraction": float(f), "overlap": table, "acc_A": acc_after[0], "acc_B": acc_after[1]})
        for name, v in table.items():
            rows.append({"fraction": float(f), "param": name, "overlap": v})
        if log is not None:
            log(
                f"  f={f:<5g} acc A {acc_after[0]:.3f} B {acc_after[1]:.3f}  overlap all "
                f"{table['all']:.3f}  " + " ".join(f"{k}={v:.3f}" for k, v in table.items() if k.endswith("weight"))
            )
    return {
        "fractions": [float(f) for f in fractions],
        "rows": rows,
        "per_fraction": per_fraction,
        "acc_A_before": acc_a,
        "fisher_at": fisher_at,
        "config": cfg.to_dict(),
        "seed": seed,
    }


def overlap_series(out: dict, *, weights_only: bool = True) -> dict:
    """``{label: [overlap at each fraction]}`` for plotting (weight tensors and ``all``)."""
    names = [k for k in out["per_fraction"][0]["overlap"] if k == "all" or not weights_only or k.endswith("weight")]
    return {n: [pf["overlap"][n] for pf in out["per_fraction"]] for n in names}
