"""``ewc-fast explosion``: the EWC step explosion under plain SGD at α·λ·max Ω > 2, with gradient
clipping and with stabilised EWC (Kutalev & Lapina 2021, arXiv 2109.10021;
:func:`ewc_fast.experiments.explosion.run_explosion`) on a conv net and a self-attention model.

Writes ``OUT/explosion.json`` (every step's loss, penalty and gradient norm), ``explosion.csv`` (one
row per model × variant × α·λ·max Ω) and ``explosion.png``.
"""

from __future__ import annotations

import argparse

from ..experiments import plots
from ..experiments.explosion import VARIANTS, ExplosionConfig, run_explosion
from ..experiments.models import MODEL_NAMES
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
    ec = config_from_args(NAME, ExplosionConfig, args)
    res, _, out = run_recorded(args, lambda data: run_explosion(data, ec, log=log))
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
    write_results(out, "explosion", res, rows, plots.explosion_curves)
    return 0
