"""``ewc-fast demo``: three permuted tasks without and with EWC, and the importance pass timed
against a per-sample loop (:func:`ewc_fast.experiments.demo.run_demo`).

Writes ``OUT/demo.json`` (accuracy matrices, curves, timing) and ``demo_accuracy.png`` /
``demo_curves.png``. λ defaults to 82 in ewc_fast's convention (Kutalev & Lapina 2021's λ' = 41).
"""

from __future__ import annotations

import argparse
import time

from ..experiments import plots
from ..experiments.continual import to_ewc_lam
from ..experiments.demo import run_demo
from ..experiments.records import write_json
from .common import add_common_args, load_data, log, out_dir, positive_int, report_written

NAME = "demo"
HELP = "3 permuted tasks without/with EWC + importance timing"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``demo`` and its options on the sub-command parsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP)
    add_common_args(p, out_default="ewc_fast_demo")
    p.add_argument("--tasks", type=positive_int, default=3)
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--model", default="mlp")
    p.add_argument("--lam", type=float, default=None, help="EWC λ (ewc_fast convention; default 82 = Kutalev's 41)")
    p.add_argument("--lam-convention", choices=("ewc", "kutalev"), default="ewc")
    p.add_argument(
        "--n-timing", type=positive_int, default=1000, help="samples for the importance timing (default: %(default)s)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run the demo; 0 on success."""
    t_start = time.perf_counter()
    data = load_data(args)
    lam = 82.0 if args.lam is None else to_ewc_lam(args.lam, args.lam_convention)
    log(f"EWC λ = {lam:g} in ewc_fast's (λ/2)ΣF(θ−θ*)² convention (= {lam / 2:g} in Kutalev's no-½ convention)")
    out = out_dir(args)
    res = run_demo(
        data,
        n_tasks=args.tasks,
        epochs=args.epochs,
        lam=lam,
        model=args.model,
        seed=args.seed,
        n_timing=args.n_timing,
        device=args.device,
        backend=args.backend,
        progress=not args.no_progress,
        log=log,
    )
    mats = {r["label"]: r["R"] for r in res["runs"].values()}
    curves = {r["label"]: r["curve"] for r in res["runs"].values()}
    paths = [
        plots.accuracy_heatmaps(mats, out / "demo_accuracy.png"),
        plots.task_curves(curves, args.tasks, args.epochs, out / "demo_curves.png"),
    ]
    res["total_s"] = time.perf_counter() - t_start
    paths.append(write_json(out / "demo.json", res))
    report_written(paths)
    log(f"demo finished in {res['total_s']:.1f} s")
    return 0
