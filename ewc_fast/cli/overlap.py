"""``ewc-fast overlap``: Fisher overlap of task A (MNIST) and task B (a fraction of the pixels
permuted) per layer, against that fraction (Kirkpatrick et al. 2017, Fig. 3C;
:func:`ewc_fast.experiments.overlap.run_overlap`).

Writes ``OUT/overlap.csv``, ``overlap.json`` and ``overlap.png``.
"""

from __future__ import annotations

import argparse
import time

from ..experiments import plots
from ..experiments.continual import IMPORTANCE_METHODS
from ..experiments.overlap import overlap_series, run_overlap
from ..experiments.records import write_csv, write_json
from .common import (
    add_common_args,
    add_lam_args,
    add_training_args,
    base_run_config,
    command_meta,
    float_list,
    load_data,
    log,
    out_dir,
    report_written,
    single_lam,
)

NAME = "overlap"
HELP = "Fisher overlap vs fraction of pixels permuted (Kirkpatrick et al. 2017)"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``overlap`` and its options on the sub-command parsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP)
    add_common_args(p, out_default="ewc_fast_overlap")
    add_training_args(p)
    add_lam_args(p, grid=False)
    p.add_argument("--fractions", type=float_list, default=[0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument(
        "--method",
        choices=("none", "l2") + IMPORTANCE_METHODS,
        default="fisher",
        help="how task B is trained after A (default: EWC with Fisher)",
    )
    p.add_argument(
        "--fisher-at",
        choices=("final", "own"),
        default="final",
        help="both Fishers at the final parameters, or each at the end of its task",
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Train A, then B at each fraction; write CSV / JSON / plot; 0 on success."""
    for f in args.fractions:
        if not 0.0 <= f <= 1.0:
            raise SystemExit(f"ewc-fast overlap: fractions must be in [0, 1], got {f}")
    t0 = time.perf_counter()
    data = load_data(args)
    out = out_dir(args)
    lam = single_lam(args, args.method)
    log(f"task B trained with {args.method} λ = {lam:g} (ewc_fast convention)")
    cfg = base_run_config(args, method=args.method, lam=lam, eval_every_epoch=False)
    res = run_overlap(
        data,
        cfg,
        fractions=args.fractions,
        seed=args.seed,
        fisher_at=args.fisher_at,
        progress=not args.no_progress,
        log=log,
    )
    res["meta"] = command_meta(args, data, time.perf_counter() - t0)
    paths = [
        write_csv(out / "overlap.csv", res["rows"]),
        plots.overlap_curves(res["fractions"], overlap_series(res), out / "overlap.png"),
        write_json(out / "overlap.json", res),
    ]
    report_written(paths)
    return 0
