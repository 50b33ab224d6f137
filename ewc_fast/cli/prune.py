"""``ewc-fast prune``: importance-ordered pruning curves without fine-tuning (as in Kutalev &
Lapina 2021's pruning experiment; :func:`ewc_fast.experiments.prune.run_prune`).

For every scope × aggregation × reduce setting: accuracy and loss against the fraction pruned for
each importance, and the ordering of the importances by area under the accuracy curve. Writes
``OUT/prune.json``, ``prune_curves.csv``, ``prune_ordering.csv`` and one
``prune_{scope}_{aggregation}_{reduce}.png`` per setting.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ..experiments import plots
from ..experiments.prune import AGGREGATIONS, IMPORTANCE_CHOICES, REDUCES, SCOPES, run_prune, value_at
from ..experiments.records import write_csv, write_json
from .common import (
    add_common_args,
    add_training_args,
    base_run_config,
    choice_list,
    command_meta,
    load_data,
    log,
    out_dir,
    positive_int,
    report_written,
)

NAME = "prune"
HELP = "importance-ordered pruning curves (Kutalev & Lapina 2021)"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``prune`` and its options on the sub-command parsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP)
    add_common_args(p, out_default="ewc_fast_prune")
    add_training_args(p)
    p.add_argument(
        "--importances",
        type=choice_list(IMPORTANCE_CHOICES),
        default=["fisher", "mas", "si", "sig", "magnitude", "random"],
    )
    p.add_argument("--scope", type=choice_list(SCOPES), default=["global"], help="global and/or layer (comma list)")
    p.add_argument(
        "--aggregation", type=choice_list(AGGREGATIONS), default=["weight"], help="weight, unit, filter (comma list)"
    )
    p.add_argument(
        "--reduce", type=choice_list(REDUCES), default=["mean"], help="group score: mean, min, max (comma list)"
    )
    p.add_argument(
        "--replace",
        choices=("zero", "noise"),
        default="zero",
        help="pruned weights → 0, or N(0, std/10) per tensor",
    )
    p.add_argument(
        "--fractions", type=positive_int, default=21, help="number of fractions in [0, 1] (default: %(default)s)"
    )
    p.add_argument(
        "--weights-only",
        action="store_true",
        help="prune weight tensors only, keep biases (Kutalev's pruning script); default: every entry",
    )
    p.add_argument("--runs", type=positive_int, default=1, help="trained networks; curves give mean and min–max")
    p.add_argument("--si-variant", choices=("zenke", "kutalev"), default="zenke")
    return p


def run(args: argparse.Namespace) -> int:
    """Train, prune by every importance and setting, print the orderings, write CSV / JSON / plots."""
    t0 = time.perf_counter()
    data = load_data(args)
    out = out_dir(args)
    cfg = base_run_config(args, method="none", lam=0.0, si_variant=args.si_variant, eval_every_epoch=False)
    fractions = np.linspace(0.0, 1.0, max(args.fractions, 2))
    res = run_prune(
        data,
        cfg,
        importances=args.importances,
        fractions=fractions,
        scopes=args.scope,
        aggregations=args.aggregation,
        reduces=args.reduce,
        replace=args.replace,
        runs=args.runs,
        seed=args.seed,
        progress=not args.no_progress,
        log=log,
        weights_only=args.weights_only,
    )
    res["meta"] = command_meta(args, data, time.perf_counter() - t0)
    rows, table_rows, paths = [], [], []
    for key, r in res["results"].items():
        scope, agg, red = key.split("/")
        for label, c in r["curves"].items():
            for f, a, l, lo, hi in zip(res["fractions"], c["acc"], c["loss"], c["acc_min"], c["acc_max"]):
                rows.append(
                    {
                        "scope": scope,
                        "aggregation": agg,
                        "reduce": red,
                        "importance": label,
                        "fraction": f,
                        "acc": a,
                        "acc_min": lo,
                        "acc_max": hi,
                        "loss": l,
                    }
                )
        log(
            f"\nordering by area under the accuracy curve — scope={scope} aggregation={agg} "
            f"reduce={red} replace={args.replace}"
        )
        log(
            f"  {'rank':>4s} {'importance':>16s} {'acc AUC':>8s} {'loss AUC':>9s} {'acc@50%':>8s} "
            f"{'acc@90%':>8s} {'min–max@90%':>14s}"
        )
        for o in r["ordering"]:
            c = r["curves"][o["importance"]]
            lo = value_at(res["fractions"], c["acc_min"], 0.9)
            hi = value_at(res["fractions"], c["acc_max"], 0.9)
            log(
                f"  {o['rank']:>4d} {o['importance']:>16s} {o['acc_auc']:8.4f} "
                f"{o['loss_auc']:9.4f} {o['acc_at_0.5']:8.4f} {o['acc_at_0.9']:8.4f} {lo:6.4f}–{hi:6.4f}"
            )
            table_rows.append({"scope": scope, "aggregation": agg, "reduce": red, **o})
        paths.append(
            plots.prune_curves(
                r["curves"],
                res["fractions"],
                out / f"prune_{scope}_{agg}_{red}.png",
                title=f"pruning: {scope}, {agg}, {red}, {args.replace}",
            )
        )
    paths.append(write_csv(out / "prune_curves.csv", rows))
    paths.append(write_csv(out / "prune_ordering.csv", table_rows))
    paths.append(write_json(out / "prune.json", res))
    report_written(paths)
    return 0
