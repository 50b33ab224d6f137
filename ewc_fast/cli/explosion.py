"""``ewc-fast explosion``: the EWC step explosion under plain SGD at α·λ·max Ω > 2, with gradient
clipping and with stabilised EWC (Kutalev & Lapina 2021, arXiv 2109.10021;
:func:`ewc_fast.experiments.explosion.run_explosion`) on a conv net and a self-attention model.

Writes ``OUT/explosion.json`` (every step's loss, penalty and gradient norm), ``explosion.csv`` (one
row per model × variant × α·λ·max Ω) and ``explosion.png``.
"""

from __future__ import annotations

import argparse
import time

from ..experiments import plots
from ..experiments.explosion import VARIANTS, ExplosionConfig, run_explosion
from ..experiments.models import MODEL_NAMES
from ..experiments.records import write_csv, write_json
from .common import (
    add_common_args,
    choice_list,
    command_meta,
    float_list,
    load_data,
    log,
    out_dir,
    positive_int,
    report_written,
)

NAME = "explosion"
HELP = "EWC under plain SGD: explosion at α·λ·max Ω > 2, clipping, stabilisation (Kutalev & Lapina 2021)"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``explosion`` and its options on the sub-command parsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP)
    add_common_args(p, out_default="ewc_fast_explosion")
    p.add_argument("--models", type=choice_list(MODEL_NAMES), default=["kutalev-cnn", "attention"], help="comma list")
    p.add_argument(
        "--values",
        type=float_list,
        default=[0.5, 1.5, 1.9, 2.1, 3.0, 10.0, 100.0],
        help="α·λ·max Ω grid; λ = value / (α·max Ω) (default: %(default)s)",
    )
    p.add_argument("--variants", type=choice_list(VARIANTS), default=list(VARIANTS), help="comma list")
    p.add_argument("--importance", choices=("fisher", "fisher_exact", "mas"), default="fisher")
    p.add_argument("--lr", type=float, default=0.05, help="plain SGD step α (default: %(default)s)")
    p.add_argument("--clip-norm", type=float, default=1.0, help="for the clip variant (default: %(default)s)")
    p.add_argument("--epochs-a", type=positive_int, default=1, help="epochs on task A (default: %(default)s)")
    p.add_argument("--steps", type=positive_int, default=200, help="SGD steps on task B (default: %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=100)
    p.add_argument("--n-importance", type=positive_int, default=1000)
    p.add_argument("--eval-every", type=positive_int, default=20)
    p.add_argument("--n-eval", type=positive_int, default=1000, help="test images per accuracy point")
    p.add_argument("--blowup", type=float, default=1e6, help="penalty value counted as diverged")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the grid, print the thresholds, write JSON / CSV / plot."""
    try:
        ec = ExplosionConfig(
            models=args.models,
            values=args.values,
            variants=args.variants,
            importance=args.importance,
            lr=args.lr,
            clip_norm=args.clip_norm,
            epochs_a=args.epochs_a,
            steps=args.steps,
            batch_size=args.batch_size,
            n_importance=args.n_importance,
            eval_every=args.eval_every,
            n_eval=args.n_eval,
            blowup=args.blowup,
            seed=args.seed,
        )
    except ValueError as e:
        raise SystemExit(f"ewc-fast explosion: error: {e}") from e
    t0 = time.perf_counter()
    data = load_data(args)
    out = out_dir(args)
    res = run_explosion(data, ec, log=log)
    res["data"] = data.source
    res["meta"] = command_meta(args, data, time.perf_counter() - t0)
    rows = []
    for name, m in res["models"].items():
        log(f"\n{name}: max Ω = {m['max_omega']:.4g}")
        for variant, t in m["thresholds"].items():
            log(f"  {variant:>10s}: diverges from α·λ·max Ω = {t['first_diverged']}  (stable up to {t['last_stable']})")
        for r in m["runs"]:
            rows.append(
                {
                    "model": name,
                    "variant": r["variant"],
                    "value": r["value"],
                    "lam": r["lam"],
                    "diverged": r["diverged"],
                    "diverged_at": r["diverged_at"],
                    "final_acc_A": r["final_acc_A"],
                    "final_acc_B": r["final_acc_B"],
                    "max_grad_norm": max((g for g in r["grad_norm"] if g is not None), default=None),
                }
            )
    paths = [
        write_csv(out / "explosion.csv", rows),
        plots.explosion_curves(res, out / "explosion.png"),
        write_json(out / "explosion.json", res),
    ]
    report_written(paths)
    return 0
