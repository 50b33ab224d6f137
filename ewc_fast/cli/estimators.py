"""``ewc-fast estimators``: EWC with the EXACT / SAMPLE / EMPIRICAL / BATCHED Fisher on task-incremental
Split MNIST, λ searched per estimator, accuracy and estimator time side by side with van de Ven 2025
(arXiv 2502.11756; :func:`ewc_fast.experiments.estimators.run_estimators`).

Writes ``OUT/estimators.json`` (every run), ``estimators.csv`` (one row per estimator × λ of the grid
and per best-λ summary) and ``estimators.png``.
"""

from __future__ import annotations

import argparse

from ..experiments import plots
from ..experiments.estimators import ESTIMATORS, REFERENCE, EstimatorConfig, run_estimators
from .common import (
    add_common_args,
    choice_list,
    config_from_args,
    float_list,
    log,
    positive_int,
    run_recorded,
    write_results,
)

NAME = "estimators"
HELP = "EWC with EXACT / SAMPLE / EMPIRICAL / BATCHED Fisher on Split MNIST (van de Ven 2025)"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``estimators`` and its options on the sub-command parsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP)
    add_common_args(p, out_default="ewc_fast_estimators")
    p.add_argument("--iterations", type=positive_int, default=2000, help="optimizer steps per task (theirs: 2000)")
    p.add_argument("--batch-size", type=positive_int, default=128, help="(default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    p.add_argument("--model", default="mlp400", help="(default: %(default)s, 784-400-400-10 ReLU)")
    p.add_argument(
        "--estimators",
        type=choice_list(tuple(ESTIMATORS)),
        default=list(ESTIMATORS),
        help=f"comma list of {', '.join(ESTIMATORS)}",
    )
    p.add_argument(
        "--lam-grid",
        type=float_list,
        default=[1e2, 1e4, 1e6, 1e8],
        help="λ searched per estimator, (λ/2)·ΣF(θ−θ*)² convention (default: 1e2,1e4,1e6,1e8)",
    )
    p.add_argument("--grid-runs", type=positive_int, default=1, help="seeds per λ of the grid (default: 1)")
    p.add_argument("--runs", type=positive_int, default=5, help="seeds at the best λ, grid seeds included")
    p.add_argument(
        "--importance-batch",
        type=positive_int,
        default=128,
        help="BATCHED's batch size b (the exact estimators do not depend on it; default: 128)",
    )
    p.add_argument(
        "--n-importance",
        type=positive_int,
        default=1_000_000,
        help="Fisher on at most N training samples of a task (default: all)",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run the grid and the best-λ seeds, print the comparison, write JSON / CSV / plot."""
    ec = config_from_args(NAME, EstimatorConfig, args, lams=args.lam_grid)
    res, data, out = run_recorded(args, lambda data: run_estimators(data, ec, log=log, progress=not args.no_progress))
    res["n_train"], res["n_test"] = int(data.x_train.shape[0]), int(data.x_test.shape[0])
    rows = []
    log(f"\n{'estimator':>10s} {'best λ':>8s} {'acc %':>8s} {'min–max':>13s} {'theirs':>7s} {'est. s/task':>11s}")
    for name, v in [*res["estimators"].items(), ("none", {"best_lam": 0.0, "summary": res["none"]["summary"]})]:
        s = v["summary"]
        log(
            f"{name:>10s} {v['best_lam']:8g} {100 * s['acc_mean']:8.2f} "
            f"{100 * s['acc_min']:6.2f}–{100 * s['acc_max']:6.2f}"
            f" {REFERENCE[name]['acc']:7.2f} {s['importance_time_median_s']:11.3f}"
        )
        rows.append({"estimator": name, "kind": "best", "lam": v["best_lam"], **s})
        for g in v.get("grid", {}).values():
            rows.append({"estimator": name, "kind": "grid", "lam": g["lam"], **g["summary"]})
    write_results(out, "estimators", res, rows, plots.estimator_comparison)
    return 0
