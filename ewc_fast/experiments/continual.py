"""Sequential (continual) training with an accuracy matrix.

One *run* trains a freshly initialised model on ``tasks[0], tasks[1], …`` in order with Adam and
cross-entropy; after each task it records the test accuracy (and loss) on every task, building

    R[i, j] = test accuracy on task j after training tasks 0..i      (Lopez-Paz & Ranzato 2017)

plus ``b[j]``, the accuracy of the untrained model on task j. Summaries:

* ``mean_acc_seen[i]  = mean_{j<=i} R[i, j]`` (average accuracy on the tasks seen so far);
* ``mean_acc_all[i]   = mean_j R[i, j]`` (over all tasks; after the last task it is the number
  Kutalev & Lapina 2021 report);
* ``bwt = 1/(T-1) Σ_{j<T-1} (R[T-1, j] − R[j, j])`` (backward transfer, negative = forgetting);
* ``fwt = 1/(T-1) Σ_{j>=1} (R[j-1, j] − b[j])`` (forward transfer).

Consolidation methods (``RunConfig.method``, one of :data:`METHODS`) are the strategies of
:mod:`.strategies`: none, l2, EWC fed by an importance estimator (fisher, fisher_mc, fisher_exact,
mas, sig) on the last ``n_importance`` (5000) training samples of each task, after the task (as
Kutalev & Lapina 2021, arXiv 2109.10021), SI (Zenke et al. 2017) and WVA (Kutalev 2020, arXiv
2005.07107). The penalty gradient is added by ``EWC.apply_()`` after ``loss.backward()`` and before
``optimizer.step()`` (mode ``"separate"``: one anchor per task, summed exactly). ``stabilize``
turns on Kutalev & Lapina's stabilised penalty (``stabilize_lr = lr``). The one-task building
blocks (training, evaluation, importance estimation) are in :mod:`.training`.

Options of :class:`RunConfig` beyond the method:

* ``optimizer`` ``"adam"`` (default, ``lr``) or ``"sgd"`` (``lr``, ``momentum``); ``clip_norm``
  clips the total gradient (task + penalty) to that L2 norm before each step.
* ``anchor`` (EWC methods): ``"all"`` — one penalty per previous task at its own optimum (default;
  Kirkpatrick et al. 2017's multi-task EWC); ``"previous"`` — only the latest task's penalty (its
  importance at its optimum; older tasks dropped); ``"latest"`` — the importances of all previous
  tasks summed, anchored at the latest optimum (Huszár 2018; Kutalev & Lapina's code).
* ``steps_per_task``: train each task for exactly this many optimizer steps (epochs repeat as
  needed; van de Ven et al. count iterations) instead of ``epochs`` epochs.
* ``multi_head``: task-incremental learning — each task scores only its own output columns
  (:func:`.tasks.with_heads`; split MNIST task t: classes (2t, 2t+1)), in training, evaluation
  and the importance pass.

λ convention — ``RunConfig.lam`` is always in **ewc_fast's convention**, penalty
``(λ/2) Σ_i Ω_i (θ_i − μ_i)²`` (gradient ``λ Ω (θ − μ)``). Kutalev & Lapina's code (and SI, MAS)
write ``λ' Σ Ω (θ − μ)²`` without the ½, so ``λ = 2 λ'``: their Fisher λ'=41 is our λ=82.
:func:`to_ewc_lam` converts; the CLI accepts ``--lam-convention kutalev`` and prints both.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import nn

from .data import MNIST
from .models import build_model
from .strategies import ANCHORS, IMPORTANCE_METHODS, METHODS, make_strategy
from .tasks import Task, build_tasks, head_outputs, with_heads
from .training import (
    OPTIMIZERS,
    estimate,
    evaluate,
    importance_subset,
    make_optimizer,
    resolve_device,
    train_task,
    unit_importance,
)

__all__ = [
    "ANCHORS",
    "OPTIMIZERS",
    "METHODS",
    "IMPORTANCE_METHODS",
    "RunConfig",
    "RunResult",
    "to_ewc_lam",
    "from_ewc_lam",
    "default_lam",
    "backward_transfer",
    "forward_transfer",
    "mean_accuracy_seen",
    "evaluate",
    "train_task",
    "run_sequence",
    "run_experiment",
    "summarize_runs",
    "mean_curve",
    "merge_experiments",
    "importance_subset",
    "estimate",
    "unit_importance",
    "resolve_device",
]

# METHODS, IMPORTANCE_METHODS (defined in .strategies) and the one-task helpers of .training are
# re-exported: ``continual.evaluate``, ``continual.METHODS``, … keep working.
LAM_CONVENTIONS = ("ewc", "kutalev")

# Kutalev & Lapina 2021's tuned λ' (no-½ convention), FC net on permuted MNIST.
_KUTALEV_LAM = {"fisher": 41.0, "fisher_mc": 41.0, "fisher_exact": 41.0, "mas": 4.5, "si": 0.25}
# Stabilised λs: their stabilised scripts (aakutalev/ewc-features, section3/*-stabilized.py) use
# regularizer = Ω·λ·0.5/(Ω·λ·lr + 1) in λ'·Σ reg·(θ−θ*)², i.e. the penalty already carries the ½:
# these values are in ewc_fast's convention as they stand (no doubling).
_KUTALEV_LAM_STABILIZED = {"fisher": 85.0, "fisher_mc": 85.0, "fisher_exact": 85.0, "mas": 8.5, "si": 0.64}
# Not from a paper: picked on the embedded set (3 permuted tasks, 3 epochs; ewc_fast convention).
# Starting points only — tune with --lam-grid.
_UNTUNED_LAM = {"l2": 1e-3, "sig": 10.0, "wva": 100.0, "none": 0.0}


def to_ewc_lam(lam: float, convention: str = "ewc") -> float:
    """λ in ``convention`` → λ in ewc_fast's ``(λ/2)ΣΩ(θ−μ)²`` convention."""
    if convention == "ewc":
        return float(lam)
    if convention == "kutalev":
        return 2.0 * float(lam)
    raise ValueError(f"unknown λ convention {convention!r}: {LAM_CONVENTIONS}")


def from_ewc_lam(lam: float, convention: str = "kutalev") -> float:
    """Inverse of :func:`to_ewc_lam`."""
    return float(lam) / (2.0 if convention == "kutalev" else 1.0)


def default_lam(method: str, *, stabilize: bool = False) -> tuple[float, str]:
    """Default λ (ewc_fast convention) and where it comes from."""
    if stabilize and method in _KUTALEV_LAM_STABILIZED:
        lam = _KUTALEV_LAM_STABILIZED[method]
        return lam, (
            f"Kutalev & Lapina 2021 stabilised λ={lam:g} (their stabilised code already has the ½) → λ={lam:g}"
        )
    if method in _KUTALEV_LAM:
        return to_ewc_lam(_KUTALEV_LAM[method], "kutalev"), (
            f"Kutalev & Lapina 2021 λ'={_KUTALEV_LAM[method]:g} (no-½) → λ={2 * _KUTALEV_LAM[method]:g}"
        )
    if method == "wva":
        return _UNTUNED_LAM["wva"], "untuned default (WVA attenuation strength)"
    return _UNTUNED_LAM.get(method, 1.0), "untuned default; tune with --lam-grid"


# --------------------------------------------------------------------------------------------
# metrics on the accuracy matrix
# --------------------------------------------------------------------------------------------
def mean_accuracy_seen(R: ArrayLike) -> list[float]:
    """``mean_{j<=i} R[i, j]`` for each stage ``i``."""
    R = np.asarray(R, dtype=float)
    return [float(R[i, : i + 1].mean()) for i in range(R.shape[0])]


def backward_transfer(R: ArrayLike) -> float:
    """``1/(T-1) Σ_{j<T-1} (R[T-1, j] − R[j, j])``; 0.0 for a single task."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R: ArrayLike, b: ArrayLike) -> float:
    """``1/(T-1) Σ_{j>=1} (R[j-1, j] − b[j])``; 0.0 for a single task."""
    R = np.asarray(R, dtype=float)
    b = np.asarray(b, dtype=float)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


# --------------------------------------------------------------------------------------------
# config / results
# --------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Hyper-parameters of one sequential run (λ in ewc_fast's convention, see module doc)."""

    method: str = "none"
    lam: float = 0.0
    stabilize: bool = False
    model: str = "mlp"
    lr: float = 1e-3
    batch_size: int = 100
    epochs: int = 6
    n_importance: int = 5000
    importance_batch: int = 500
    mas_output: str = "softmax"
    mc_samples: int = 1
    si_xi: float = 0.1
    si_variant: str = "zenke"
    wva_importance: str = "sig"
    backend: str = "auto"
    device: str = "cpu"
    eval_batch: int = 2000
    eval_every_epoch: bool = True
    optimizer: str = "adam"
    momentum: float = 0.0
    clip_norm: float | None = None
    anchor: str = "all"
    multi_head: bool = False
    steps_per_task: int | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose from {METHODS}")
        if self.wva_importance not in IMPORTANCE_METHODS:
            raise ValueError(f"wva_importance must be one of {IMPORTANCE_METHODS}")
        if self.mas_output not in ("logits", "softmax"):
            raise ValueError("mas_output must be 'logits' or 'softmax'")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam must be finite and >= 0, got {self.lam}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if self.optimizer == "adam" and self.momentum:
            raise ValueError(
                "momentum is an SGD setting: pass optimizer='sgd' (--optimizer sgd); Adam has its own betas"
            )
        if self.clip_norm is not None and not (self.clip_norm > 0 and math.isfinite(self.clip_norm)):
            raise ValueError(f"clip_norm (--clip-norm) must be a finite number > 0 or None, got {self.clip_norm}")
        if self.steps_per_task is not None and not (int(self.steps_per_task) == self.steps_per_task > 0):
            raise ValueError(f"steps_per_task must be a positive integer or None, got {self.steps_per_task}")
        if self.anchor not in ANCHORS:
            raise ValueError(f"anchor must be one of {ANCHORS}, got {self.anchor!r}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    method: str
    lam: float
    seed: int
    task_names: list
    R: list  # R[i][j]
    loss: list  # test loss matrix, same layout
    initial: list  # b[j]: untrained accuracy on task j
    curve: list = field(default_factory=list)  # per-epoch [{"stage", "epoch", "acc": [...]}]
    train_time_s: float = 0.0
    importance_time_s: float = 0.0
    importance_times_s: list = field(default_factory=list)  # one entry per consolidation
    # per consolidation: {"max", "max_mean"} of the task's importance (None: nothing consolidated)
    importance_stats: list = field(default_factory=list)

    @property
    def mean_acc_seen(self) -> list[float]:
        return mean_accuracy_seen(self.R)

    @property
    def mean_acc_all(self) -> list[float]:
        return [float(np.mean(r)) for r in self.R]

    @property
    def final_mean_acc(self) -> float:
        return float(np.mean(self.R[-1]))

    @property
    def bwt(self) -> float:
        return backward_transfer(self.R)

    @property
    def fwt(self) -> float:
        return forward_transfer(self.R, self.initial)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "lam": self.lam,
            "seed": self.seed,
            "task_names": self.task_names,
            "R": self.R,
            "loss": self.loss,
            "initial": self.initial,
            "mean_acc_seen": self.mean_acc_seen,
            "mean_acc_all": self.mean_acc_all,
            "final_mean_acc": self.final_mean_acc,
            "bwt": self.bwt,
            "fwt": self.fwt,
            "curve": self.curve,
            "train_time_s": self.train_time_s,
            "importance_time_s": self.importance_time_s,
            "importance_times_s": self.importance_times_s,
            "importance_stats": self.importance_stats,
        }


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------
def _to_tensors(data: MNIST):
    return (
        torch.from_numpy(data.x_train),
        torch.from_numpy(data.y_train),
        torch.from_numpy(data.x_test),
        torch.from_numpy(data.y_test),
    )


def run_sequence(
    data: MNIST,
    tasks: list[Task],
    cfg: RunConfig,
    *,
    seed: int = 0,
    progress: bool = False,
    model: nn.Module | None = None,
    on_task_end: Callable | None = None,
    log: Callable[[str], None] | None = None,
    setup: Callable | None = None,
) -> RunResult:
    """Train a fresh model (seeded ``seed``) on ``tasks`` in order; return the accuracy matrix.

    ``setup(model, optimizer)`` runs once after the method's own hooks are attached (e.g. to
    attach an extra SI tracker); ``on_task_end(stage, model, x_imp, y_imp, strategy)`` runs after
    each task's consolidation and evaluation (``x_imp, y_imp``: the task-transformed importance
    samples).
    """
    dev = resolve_device(cfg.device)
    torch.manual_seed(seed)
    if cfg.multi_head and any(t.head is None for t in tasks):
        tasks = with_heads(tasks, data.n_classes)
    if model is None:
        model = build_model(cfg.model, n_in=data.n_features, n_out=head_outputs(tasks, data.n_classes))
    model = model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    strategy = make_strategy(model, cfg)
    optimizer = make_optimizer(model, cfg)
    strategy.attach(optimizer)
    if setup is not None:
        setup(model, optimizer)

    x_tr, y_tr, x_te, y_te = _to_tensors(data)
    x_te, y_te = x_te.to(dev), y_te.to(dev)
    T = len(tasks)

    def eval_all():
        accs, losses = [], []
        for task in tasks:
            a, l = evaluate(model, x_te, y_te, task, cfg.eval_batch)
            accs.append(a)
            losses.append(l)
        return accs, losses

    initial, _ = eval_all()
    R, L, curve = [], [], []
    train_time = imp_time = 0.0
    imp_times: list[float] = []
    imp_stats: list = []
    for i, task in enumerate(tasks):
        x_task, y_task = task.apply(x_tr, y_tr)
        x_task, y_task = x_task.to(dev), y_task.to(dev)

        def on_epoch_end(epoch, _i=i):
            if cfg.eval_every_epoch and epoch < cfg.epochs - 1:
                accs, _ = eval_all()
                curve.append({"stage": _i, "epoch": epoch + 1, "acc": accs})

        t0 = time.perf_counter()
        train_task(
            model,
            optimizer,
            x_task,
            y_task,
            cfg,
            generator=gen,
            after_backward=strategy.after_backward,
            on_epoch_end=on_epoch_end,
            progress=progress,
            desc=f"{cfg.method} task {i + 1}/{T}",
            task=task,
        )
        train_time += time.perf_counter() - t0
        x_imp, y_imp = importance_subset(x_task, y_task, cfg.n_importance)
        if i < T - 1 or on_task_end is not None:  # the last task needs no consolidation
            dt = strategy.end_task(x_imp, y_imp, gen, task=task)
            imp_time += dt
            imp_times.append(dt)
            imp_stats.append(strategy.last_stats)
        accs, losses = eval_all()
        R.append(accs)
        L.append(losses)
        curve.append({"stage": i, "epoch": cfg.epochs, "acc": accs})
        if log is not None:
            log(
                f"  [{cfg.method} λ={cfg.lam:g} seed={seed}] after task {i + 1}/{T}: "
                f"mean acc (seen) {np.mean(accs[: i + 1]):.4f}  " + " ".join(f"{a:.3f}" for a in accs)
            )
        if on_task_end is not None:
            on_task_end(i, model, x_imp, y_imp, strategy)
        del x_task, y_task
    return RunResult(
        cfg.method,
        cfg.lam,
        seed,
        [t.name for t in tasks],
        R,
        L,
        initial,
        curve,
        train_time,
        imp_time,
        imp_times,
        imp_stats,
    )


# --------------------------------------------------------------------------------------------
# several methods × λs × runs
# --------------------------------------------------------------------------------------------
def summarize_runs(results: list[RunResult]) -> dict:
    finals = np.array([r.final_mean_acc for r in results])
    R = np.mean([np.asarray(r.R) for r in results], axis=0)
    return {
        "n_runs": len(results),
        "final_mean_acc": float(finals.mean()),
        "final_mean_acc_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
        "bwt": float(np.mean([r.bwt for r in results])),
        "fwt": float(np.mean([r.fwt for r in results])),
        "R_mean": R.tolist(),
        "mean_acc_seen": mean_accuracy_seen(R),
        "mean_acc_all": [float(np.mean(r)) for r in R],
        "train_time_s": float(np.sum([r.train_time_s for r in results])),
        "importance_time_s": float(np.sum([r.importance_time_s for r in results])),
    }


def mean_curve(runs: Sequence[dict]) -> list[dict]:
    """The per-epoch accuracy curve of several runs (each ``run["curve"]``: points ``{stage, epoch,
    acc}``, ``acc[j]`` = test accuracy of task j) averaged over the runs: points ``{stage, epoch, acc,
    acc_min, acc_max}`` (the runs' range per task; absent for one run). The runs must have the same
    points, else ``ValueError``."""
    curves = [r["curve"] for r in runs]
    if not curves:
        return []
    keys = [(c["stage"], c["epoch"]) for c in curves[0]]
    for k, c in enumerate(curves[1:], start=1):
        if [(p["stage"], p["epoch"]) for p in c] != keys:
            raise ValueError(f"mean_curve: run {k} was evaluated at other (stage, epoch) points than run 0")
    acc = np.asarray([[p["acc"] for p in c] for c in curves], dtype=float)  # runs × points × tasks
    out = []
    for i, (stage, epoch) in enumerate(keys):
        point = {"stage": stage, "epoch": epoch, "acc": acc[:, i].mean(axis=0).tolist()}
        if len(curves) > 1:
            point.update(acc_min=acc[:, i].min(axis=0).tolist(), acc_max=acc[:, i].max(axis=0).tolist())
        out.append(point)
    return out


def merge_experiments(parts: Sequence[dict]) -> dict:
    """One :func:`run_experiment` result from several (e.g. one ``permuted-mnist`` invocation per seed):
    the runs of each method × λ concatenated in seed order and their summary recomputed
    (:func:`summarize_runs`). The parts must agree on everything but the seeds (configuration, tasks,
    data sizes, methods and λs) and share no seed, else ``ValueError`` naming the difference.

    The merged dict has ``runs`` = the total, ``seed`` = the smallest, ``seeds`` (every seed),
    ``wall_s`` = the sum, ``meta`` = the first part's with ``wall_s`` summed, and ``parts_meta``
    (each part's ``meta``)."""
    if not parts:
        raise ValueError("merge_experiments: no results to merge")
    first = parts[0]
    same = ("config", "n_tasks", "task_kind", "first_identity", "relabel", "data", "n_train", "n_test")
    for k, p in enumerate(parts[1:], start=1):
        for key in same:
            if p.get(key) != first.get(key):
                raise ValueError(f"merge_experiments: part {k} differs from part 0 in {key!r}")
        for m, v in first["methods"].items():
            if set(p["methods"].get(m, {}).get("lams", {})) != set(v["lams"]):
                raise ValueError(f"merge_experiments: part {k} differs from part 0 in the λs of {m!r}")
        if set(p["methods"]) != set(first["methods"]):
            raise ValueError(f"merge_experiments: part {k} differs from part 0 in the methods")
    run_fields = {f.name for f in dataclasses.fields(RunResult)}
    methods = {}
    seeds: list[int] = []
    for m, v in first["methods"].items():
        per_lam = {}
        for key, entry in v["lams"].items():
            runs = sorted((r for p in parts for r in p["methods"][m]["lams"][key]["runs"]), key=lambda r: r["seed"])
            rseeds = [r["seed"] for r in runs]
            twice = sorted({x for x in rseeds if rseeds.count(x) > 1})
            if twice:
                raise ValueError(f"merge_experiments: seed(s) {twice} in more than one part")
            seeds = rseeds
            summary = summarize_runs([RunResult(**{f: r[f] for f in run_fields if f in r}) for r in runs])
            per_lam[key] = {"lam": entry["lam"], "summary": summary, "runs": runs}
        best = max(per_lam.values(), key=lambda x: x["summary"]["final_mean_acc"])
        methods[m] = {
            "lams": per_lam,
            "best_lam": best["lam"],
            "best_final_mean_acc": best["summary"]["final_mean_acc"],
        }
    out = {k: v for k, v in first.items() if k not in ("methods", "meta", "parts_meta")}
    wall = sum(p.get("wall_s") or 0.0 for p in parts)
    out.update(methods=methods, runs=len(seeds), seed=min(seeds), seeds=seeds, wall_s=wall)
    metas = [p.get("meta") for p in parts]
    if metas[0] is not None:
        out["meta"] = {**metas[0], "wall_s": sum((m or {}).get("wall_s") or 0.0 for m in metas)}
    out["parts_meta"] = metas
    return out


def run_experiment(
    data: MNIST,
    base: RunConfig,
    methods: Sequence[str],
    *,
    lams: dict | None = None,
    n_tasks: int = 10,
    task_kind: str = "permuted",
    first_identity: bool = True,
    runs: int = 1,
    seed: int = 0,
    progress: bool = False,
    relabel: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Every method in ``methods`` × every λ in ``lams[method]`` × ``runs`` seeds.

    Run ``k`` uses seed ``seed + k`` for the initial weights, the task permutations and the
    shuffling, shared by all methods (paired comparison). Returns a JSON-ready dict:
    ``{"methods": {m: {"lams": {λ: {"summary", "runs"}}, "best_lam"}}}``.
    """
    out = {
        "config": base.to_dict(),
        "n_tasks": n_tasks,
        "task_kind": task_kind,
        "first_identity": first_identity,
        "relabel": relabel,
        "runs": runs,
        "seed": seed,
        "data": data.source,
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "methods": {},
    }
    for method in methods:
        grid = (lams or {}).get(method) or [default_lam(method, stabilize=base.stabilize)[0]]
        if method == "none":
            grid = [0.0]
        per_lam = {}
        for lam in grid:
            cfg = dataclasses.replace(base, method=method, lam=float(lam))
            results = []
            for k in range(runs):
                s = seed + k
                tasks = build_tasks(
                    task_kind, n_tasks, s, first_identity=first_identity, n_pixels=data.n_features, relabel=relabel
                )
                results.append(run_sequence(data, tasks, cfg, seed=s, progress=progress, log=log))
            summary = summarize_runs(results)
            per_lam[f"{lam:g}"] = {"lam": float(lam), "summary": summary, "runs": [r.to_dict() for r in results]}
            if log is not None:
                log(
                    f"{method:>12s} λ={lam:<8g} final mean acc {summary['final_mean_acc']:.4f}"
                    f" ± {summary['final_mean_acc_std']:.4f}  BWT {summary['bwt']:+.4f}"
                )
        best = max(per_lam.values(), key=lambda v: v["summary"]["final_mean_acc"])
        out["methods"][method] = {
            "lams": per_lam,
            "best_lam": best["lam"],
            "best_final_mean_acc": best["summary"]["final_mean_acc"],
        }
    return out
