"""``ewc-fast correlate``: per-layer Pearson / Spearman correlations of the FIS, MAS, SI and SIG
importances over a sequence of permuted tasks trained with the MAS penalty (Kutalev's correlation
study; :func:`ewc_fast.experiments.correlate.run_correlate`).

Writes ``OUT/correlations.csv`` / ``.json`` and ``correlation_surfaces_{pearson,spearman}.png``;
prints the final correlations per weight layer.
"""

from __future__ import annotations

import argparse

from ..experiments import plots
from ..experiments.correlate import run_correlate, surfaces
from ..experiments.records import write_csv, write_json
from .common import (
    add_common_args,
    add_lam_args,
    add_training_args,
    base_run_config,
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
    return p


def run(args: argparse.Namespace) -> int:
    """Run the correlation sequence, write CSV / JSON / plots; 0 on success."""
    data = load_data(args)
    out = out_dir(args)
    lam = single_lam(args, "mas")
    log(f"MAS-EWC penalty λ = {lam:g} (ewc_fast convention; Kutalev λ' = {lam / 2:g})")
    cfg = base_run_config(args, method="mas", lam=lam, si_variant=args.si_variant, eval_every_epoch=False)
    res = run_correlate(data, cfg, n_tasks=args.tasks, seed=args.seed, progress=not args.no_progress, log=log)
    paths = [write_csv(out / "correlations.csv", res["rows"])]
    for kind in ("pearson", "spearman"):
        vals, layers = surfaces(res, kind)
        paths.append(
            plots.correlation_surfaces(vals, layers, args.tasks, out / f"correlation_surfaces_{kind}.png", kind=kind)
        )
    log("\nfinal correlations (Pearson / Spearman) per weight layer:")
    last = [r for r in res["rows"] if r["stage"] == args.tasks - 1 and r["param"].endswith("weight")]
    for r in last:
        log(f"  {r['param']:>12s} {r['pair']:>8s}  {r['pearson']:+.3f} / {r['spearman']:+.3f}")
    paths.append(write_json(out / "correlations.json", res))
    report_written(paths)
    return 0
