"""Which Fisher estimator for EWC: van de Ven 2025 (arXiv 2502.11756) on Split MNIST.

Setting (theirs, Table 1): Split MNIST, 5 tasks of two digits each, **task-incremental** (a head per
task: task t scores only output units (2t, 2t+1); :func:`.tasks.with_heads`), MLP 784-400-400-10
ReLU, Adam lr 1e-3, batch 128, ``iterations`` optimizer steps per task (theirs: 2000), EWC in its
online form with γ = 1 (importances summed, one quadratic at the latest optimum: ``anchor="latest"``),
the Fisher computed on every training sample of the task, λ searched per estimator. The four
estimators of the diagonal Fisher F_i (their names → ours):

* EXACT     ``fisher_exact``   F = mean_n Σ_y p_θ(y|x_n) (∂ log p_θ(y|x_n)/∂θ)²
* SAMPLE    ``fisher_mc``      one label y ~ p_θ(·|x_n) per sample, then the square
* EMPIRICAL ``fisher``         the true label y_n, then the square
* BATCHED   ``fisher_batched`` mean over batches of b = ``importance_batch`` samples of the square
  of the batch-mean gradient (what Avalanche computes; biased, batch-size dependent)

:func:`run_estimators` first runs the λ grid (``grid_runs`` seeds per λ, chosen by final mean
accuracy), then ``runs`` seeds at each estimator's best λ (the grid's seeds reused), and records
accuracy (mean over the 5 tasks after the last one), the estimator's time for every consolidation,
and training time. :data:`REFERENCE` holds their numbers (30 seeds, one RTX 2000 Ada GPU).
λ is in ewc_fast's convention (penalty (λ/2)·ΣF(θ−θ*)², as theirs).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .continual import RunConfig, run_sequence
from .data import MNIST
from .tasks import split_tasks, with_heads

__all__ = ["ESTIMATORS", "REFERENCE", "EstimatorConfig", "run_estimators"]

#: van de Ven's names → ewc_fast methods
ESTIMATORS = {"EXACT": "fisher_exact", "SAMPLE": "fisher_mc", "EMPIRICAL": "fisher", "BATCHED": "fisher_batched"}

#: van de Ven 2025, Table 1 (Split MNIST, task-incremental): accuracy (%) and extra training time
#: over no EWC (s) on their GPU
REFERENCE = {
    "EXACT": {"acc": 99.12, "extra_s": 68.0},
    "SAMPLE": {"acc": 99.12, "extra_s": 47.0},
    "EMPIRICAL": {"acc": 99.12, "extra_s": 47.0},
    "BATCHED": {"acc": 99.11, "extra_s": 5.0},
    "none": {"acc": 85.41, "extra_s": 0.0},
}


@dataclass
class EstimatorConfig:
    """Sizes of :func:`run_estimators` (defaults: their protocol)."""

    iterations: int = 2000
    batch_size: int = 128
    lr: float = 1e-3
    model: str = "mlp400"
    n_tasks: int = 5
    n_importance: int = 1_000_000  # every training sample of the task
    importance_batch: int = 128  # BATCHED's b; the exact estimators do not depend on it
    lams: Sequence[float] = (1e2, 1e4, 1e6, 1e8)
    estimators: Sequence[str] = ("EXACT", "SAMPLE", "EMPIRICAL", "BATCHED")
    grid_runs: int = 1
    runs: int = 5
    seed: int = 0
    backend: str = "auto"

    def __post_init__(self):
        bad = [e for e in self.estimators if e not in ESTIMATORS]
        if bad:
            raise ValueError(f"estimators: unknown {bad}; choose from {list(ESTIMATORS)}")
        if not self.lams or any(not (v > 0) for v in self.lams):
            raise ValueError(f"lams must be a non-empty list of positive numbers, got {list(self.lams)}")
        if self.runs < self.grid_runs:
            raise ValueError(f"runs ({self.runs}) must be >= grid_runs ({self.grid_runs}): the grid's seeds are reused")


def _run_config(ec: EstimatorConfig, method: str, lam: float) -> RunConfig:
    return RunConfig(
        method=method,
        lam=float(lam),
        model=ec.model,
        lr=ec.lr,
        batch_size=ec.batch_size,
        steps_per_task=ec.iterations,
        n_importance=ec.n_importance,
        importance_batch=ec.importance_batch,
        anchor="latest",
        multi_head=True,
        eval_every_epoch=False,
        backend=ec.backend,
    )


def _summary(runs: list[dict]) -> dict:
    acc = np.array([r["final_mean_acc"] for r in runs])
    per = [t for r in runs for t in r["importance_times_s"]]
    return {
        "n_runs": len(runs),
        "acc_mean": float(acc.mean()),
        "acc_std": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        "acc_min": float(acc.min()),
        "acc_max": float(acc.max()),
        "train_time_s": float(np.mean([r["train_time_s"] for r in runs])),
        "importance_time_s": float(np.mean([r["importance_time_s"] for r in runs])),
        "importance_time_median_s": float(np.median(per)) if per else 0.0,
        "n_consolidations": len(per),
    }


def run_estimators(
    data: MNIST, ec: EstimatorConfig, *, log: Callable[[str], None] | None = None, progress: bool = False
) -> dict:
    """The λ grid, then ``ec.runs`` seeds at each estimator's best λ, and no EWC (see module doc)."""
    tasks = with_heads(split_tasks(ec.n_tasks))
    t_all = time.perf_counter()

    def one(method: str, lam: float, seed: int) -> dict:
        r = run_sequence(data, tasks, _run_config(ec, method, lam), seed=seed, progress=progress).to_dict()
        if log is not None:
            log(
                f"  {method:>14s} λ={lam:<8g} seed {seed}: acc {r['final_mean_acc']:.4f}  train "
                f"{r['train_time_s']:.1f} s  estimator {r['importance_time_s']:.2f} s"
            )
        return r

    out: dict = {"config": dataclasses.asdict(ec), "reference": REFERENCE, "estimators": {}}
    seeds = [ec.seed + k for k in range(ec.runs)]
    none_runs = [one("none", 0.0, s) for s in seeds]
    out["none"] = {"runs": none_runs, "summary": _summary(none_runs)}
    for name in ec.estimators:
        method = ESTIMATORS[name]
        grid = {}
        for lam in ec.lams:
            runs = [one(method, lam, s) for s in seeds[: ec.grid_runs]]
            grid[f"{lam:g}"] = {"lam": float(lam), "runs": runs, "summary": _summary(runs)}
        best = max(grid.values(), key=lambda v: v["summary"]["acc_mean"])
        runs = best["runs"] + [one(method, best["lam"], s) for s in seeds[ec.grid_runs :]]
        s = _summary(runs)
        s["extra_time_s"] = s["train_time_s"] + s["importance_time_s"] - out["none"]["summary"]["train_time_s"]
        out["estimators"][name] = {
            "method": method,
            "grid": {k: {"lam": v["lam"], "summary": v["summary"]} for k, v in grid.items()},
            "best_lam": best["lam"],
            "runs": runs,
            "summary": s,
        }
        if log is not None:
            log(
                f"{name:>10s} best λ={best['lam']:g}: {s['acc_mean']:.4f} ± {s['acc_std']:.4f} over {s['n_runs']} "
                f"runs; estimator median {s['importance_time_median_s']:.2f} s per task"
            )
    b = out["estimators"].get("BATCHED")
    tb = b["summary"]["importance_time_median_s"] if b is not None else 0.0
    if tb > 0:
        for v in out["estimators"].values():
            v["summary"]["time_vs_batched"] = v["summary"]["importance_time_median_s"] / tb
    out["wall_s"] = time.perf_counter() - t_all
    return out
