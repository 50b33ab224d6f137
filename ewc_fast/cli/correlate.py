"""``ewc-fast correlate``: per-layer Pearson / Spearman correlations of the FIS, MAS, SI and SIG
importances over a sequence of permuted tasks trained with the MAS penalty (Kutalev's correlation
study; :func:`ewc_fast.experiments.correlate.run_correlate`).

Writes ``OUT/correlations.csv`` / ``.json``, ``correlation_surfaces_{pearson,spearman}.png`` and
``correlation_heatmap_{pearson,spearman}.png``; prints the final correlations per weight layer.
``--runs K``: K seeds, the files hold the mean with min and max (``per_seed`` keeps every run).
"""

from __future__ import annotations

import argparse
import time

from ..experiments import plots
from ..experiments.continual import ANCHORS
from ..experiments.correlate import run_correlate, summarize_seeds, surfaces
from ..experiments.records import write_csv, write_json
from .common import (
    add_common_args,
    add_lam_args,
    add_training_args,
    base_run_config,
    command_meta,
    load_data,
    log,
    out_dir,
    positive_int,
    report_written,
    single_lam,
)

NAME = "correlate"
HELP = "correlations of FIS, MAS, SI, SIG per layer (Kutalev's correlation study)"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``correlate`` and its options on the sub-command parsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP)
    add_common_args(p, out_default="ewc_fast_correlate")
    add_training_args(p)
    add_lam_args(p, grid=False)
    p.add_argument("--tasks", type=positive_int, default=10)
    p.add_argument("--si-variant", choices=("zenke", "kutalev"), default="kutalev")
    p.add_argument(
        "--anchor",
        choices=ANCHORS,
        default="all",
        help="the MAS penalty: one per task (all), only the previous, or summed at the latest optimum "
        "(latest: the authors' EWC code)",
    )
    p.add_argument("--runs", type=positive_int, default=1, help="seeds seed..seed+K-1; mean, min, max reported")
    p.add_argument(
        "--batched-fisher",
        action="store_true",
        help="also FISB, the square of the batch-mean gradient (batches of --importance-batch), vs MAS and MAS²",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run the correlation sequence, write CSV / JSON / plots; 0 on success."""
    data = load_data(args)
    out = out_dir(args)
    lam = single_lam(args, "mas")
    log(f"MAS-EWC penalty λ = {lam:g} (ewc_fast convention; Kutalev λ' = {lam / 2:g})")
    cfg = base_run_config(
        args, method="mas", lam=lam, si_variant=args.si_variant, eval_every_epoch=False, anchor=args.anchor
    )
    t0 = time.perf_counter()
    per_seed = []
    for k in range(args.runs):
        if args.runs > 1:
            log(f"seed {args.seed + k}:")
        per_seed.append(
            run_correlate(
                data,
                cfg,
                n_tasks=args.tasks,
                seed=args.seed + k,
                progress=not args.no_progress,
                log=log,
                batched_fisher=args.batched_fisher,
            )
        )
    res = per_seed[0] if args.runs == 1 else summarize_seeds(per_seed)
    if args.runs > 1:
        res["per_seed"] = per_seed
        res["config"] = cfg.to_dict()
    res["meta"] = command_meta(args, data, time.perf_counter() - t0)
    paths = [write_csv(out / "correlations.csv", res["rows"])]
    for kind in ("pearson", "spearman"):
        vals, layers = surfaces(res, kind)
        paths.append(
            plots.correlation_surfaces(vals, layers, args.tasks, out / f"correlation_surfaces_{kind}.png", kind=kind)
        )
        paths.append(plots.correlation_heatmaps(vals, layers, out / f"correlation_heatmap_{kind}.png", kind=kind))
    log("\nfinal correlations (Pearson / Spearman) per weight layer:")
    last = [r for r in res["rows"] if r["stage"] == args.tasks - 1 and r["param"].endswith("weight")]
    for r in last:
        spread = f"  [{r['pearson_min']:+.3f}, {r['pearson_max']:+.3f}]" if "pearson_min" in r else ""
        log(f"  {r['param']:>12s} {r['pair']:>10s}  {r['pearson']:+.3f} / {r['spearman']:+.3f}{spread}")
    paths.append(write_json(out / "correlations.json", res))
    report_written(paths)
    return 0
