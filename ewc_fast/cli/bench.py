"""``ewc-fast bench [NAME] [ARGS…]``: ``benchmarks.NAME.main(ARGS)`` (or ``benchmarks.bench_NAME``;
default NAME ``compare``, the comparison behind ``benchmarks/results/RESULTS.md``).

The ``benchmarks`` package lives in the source checkout, not in the installed wheel, and is
imported only when this command runs: from the current directory if it holds ``benchmarks/``, else
from the checkout this package was installed from in editable mode.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from .common import log

NAME = "bench"
HELP = "benchmarks: bench [NAME] [ARGS] runs benchmarks.NAME.main(ARGS) (default compare; needs the source checkout)"


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench``: every argument after it goes to the benchmark unparsed."""
    p = sub.add_parser(NAME, add_help=False, help=HELP)
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    return p


def _checkout_roots() -> list[Path]:
    """Folders that may hold the ``benchmarks`` package: the working directory, then the checkout
    above this (editable) package."""
    roots = [Path.cwd(), Path(__file__).resolve().parents[2]]
    return [r for r in roots if (r / "benchmarks" / "__init__.py").is_file()]


def run(args: argparse.Namespace) -> int:
    """Run the benchmark's ``main(argv)``; its exit code, or 2 if there is no such benchmark."""
    rest = list(args.bench_args)
    name = rest.pop(0) if rest and not rest[0].startswith("-") else "compare"
    for root in reversed(_checkout_roots()):  # console scripts do not put the working directory on sys.path
        if str(root) not in sys.path:
            sys.path.insert(0, str(root))
    try:
        importlib.import_module("benchmarks")
    except ImportError:
        log("ewc-fast bench needs the repository's `benchmarks` package on the path (run it from the source checkout)")
        return 2
    entry = None
    for mod_name in (f"benchmarks.{name}", f"benchmarks.bench_{name}"):
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue
        entry = getattr(mod, "main", None)
        if entry is not None:
            break
    if entry is None:
        log(f"no benchmark {name!r} with a main(argv) in the benchmarks package")
        return 2
    return int(entry(rest) or 0)
