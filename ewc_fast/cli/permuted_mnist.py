"""``ewc-fast permuted-mnist``: sequential training on permuted / block-permuted / split MNIST,
every method × every λ × ``--runs`` seeds (:func:`ewc_fast.experiments.continual.run_experiment`).

Prints each method's mean accuracy matrix R[i, j] at its best λ, final mean accuracy ± std, BWT and
FWT; writes ``OUT/permuted_mnist.json`` and ``accuracy_matrices.png``, ``task_curves.png``
(and ``lam_grid.png`` with ``--lam-grid``).
"""

from __future__ import annotations

import argparse
import time

from ..experiments import plots
from ..experiments.continual import ANCHORS, IMPORTANCE_METHODS, METHODS, mean_curve, run_experiment
from ..experiments.demo import format_matrix
from ..experiments.records import write_json
from .common import (
    add_common_args,
    add_lam_args,
    add_training_args,
    base_run_config,
    choice_list,
    command_meta,
    load_data,
    log,
    out_dir,
    positive_int,
    report_written,
    resolve_lams,
)

NAME = "permuted-mnist"
HELP = "sequential training, accuracy matrix, BWT"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``permuted-mnist`` and its options on the sub-command parsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP)
    add_common_args(p, out_default="ewc_fast_permuted")
    add_training_args(p)
    add_lam_args(p)
    p.add_argument(
        "--methods",
        type=choice_list(METHODS),
        default=["none", "fisher"],
        help=f"comma list of {', '.join(METHODS)} (default: none,fisher)",
    )
    p.add_argument("--tasks", type=positive_int, default=10, help="(default: %(default)s)")
    p.add_argument(
        "--task-kind",
        choices=("permuted", "blocks", "split"),
        default="permuted",
        help="pixel permutations, 7×7-block permutations, or split MNIST",
    )
    p.add_argument(
        "--split-relabel",
        action="store_true",
        help="split tasks: labels 0/1 with a 2-way head (domain-incremental) instead "
        "of the original labels on a 10-way head (class-incremental)",
    )
    p.add_argument(
        "--no-identity-first", action="store_true", help="permute task 0 too (default: task 0 is the unpermuted data)"
    )
    p.add_argument(
        "--multi-head",
        action="store_true",
        help="task-incremental: each task scores only its own output columns (split: its two "
        "classes; permuted: its own block of 10 outputs)",
    )
    p.add_argument(
        "--anchor",
        choices=ANCHORS,
        default="all",
        help="EWC anchoring: all = one penalty per previous task (default); previous = only the "
        "previous task's penalty; latest = importances summed, anchored at the latest optimum",
    )
    p.add_argument("--runs", type=positive_int, default=1, help="seeds seed..seed+K-1")
    p.add_argument("--si-variant", choices=("zenke", "kutalev"), default="zenke")
    p.add_argument("--wva-importance", choices=IMPORTANCE_METHODS, default="sig")
    p.add_argument(
        "--no-epoch-eval", action="store_true", help="evaluate only after each task (no per-epoch curve points)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run the sequences, print the summaries, write JSON and plots; 0 on success."""
    data = load_data(args)
    out = out_dir(args)
    lams = resolve_lams(args, args.methods)
    base = base_run_config(
        args,
        si_variant=args.si_variant,
        wva_importance=args.wva_importance,
        eval_every_epoch=not args.no_epoch_eval,
        anchor=args.anchor,
        multi_head=args.multi_head,
    )
    t0 = time.perf_counter()
    res = run_experiment(
        data,
        base,
        args.methods,
        lams=lams,
        n_tasks=args.tasks,
        task_kind=args.task_kind,
        first_identity=not args.no_identity_first,
        runs=args.runs,
        seed=args.seed,
        progress=not args.no_progress,
        relabel=args.split_relabel,
        log=log,
    )
    res["wall_s"] = time.perf_counter() - t0
    res["meta"] = command_meta(args, data, res["wall_s"])
    res["lam_convention"] = "ewc_fast: (λ/2)·ΣΩ(θ−μ)²; Kutalev λ' = λ/2"

    mats, curves, grid = {}, {}, {}
    log("")
    for m, r in res["methods"].items():
        best = r["lams"][f"{r['best_lam']:g}"]
        s = best["summary"]
        label = m if m == "none" else f"{m} λ={r['best_lam']:g}"
        log(f"{label}: mean accuracy matrix over {s['n_runs']} run(s)")
        log(format_matrix(s["R_mean"]))
        log(
            f"final mean accuracy {s['final_mean_acc']:.4f} ± {s['final_mean_acc_std']:.4f}  "
            f"BWT {s['bwt']:+.4f}  FWT {s['fwt']:+.4f}\n"
        )
        mats[label] = s["R_mean"]
        curves[label] = mean_curve(best["runs"])  # mean over the runs, their range as a band
        grid[m] = {
            v["lam"]: (v["summary"]["final_mean_acc"], v["summary"]["final_mean_acc_std"]) for v in r["lams"].values()
        }
    paths = [
        plots.accuracy_heatmaps(mats, out / "accuracy_matrices.png"),
        plots.task_curves(curves, args.tasks, args.epochs, out / "task_curves.png"),
    ]
    if args.lam_grid:
        paths.append(plots.lam_grid({m: g for m, g in grid.items() if m != "none"}, out / "lam_grid.png"))
    paths.append(write_json(out / "permuted_mnist.json", res))
    report_written(paths)
    return 0
