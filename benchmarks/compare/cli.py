"""Command line of the comparison benchmark: ``python -m benchmarks.compare [options]``
(also ``ewc-fast bench compare [options]``).

Measures (:func:`~benchmarks.compare.suite.run_suite`) or merges earlier runs' JSON reports
(``--merge``, :func:`~benchmarks.compare.merge.merge_reports`), then writes the JSON report first
(atomically: a crash never loses the data) and the Markdown report second. A long run writes its
JSON after every workload (marked ``partial``), so that a run stopped midway keeps what finished.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ewc_fast.experiments.records import write_json

from ..contenders import all_contenders
from ..workloads import ALL_WORKLOADS, HF_WORKLOADS, SIZES
from .consolidation import PARTS
from .isolation import REPO_ROOT, child_main
from .measure import TASKS
from .merge import merge_reports
from .report import format_markdown
from .suite import run_suite

DEFAULT_OUT = "benchmarks/results/RESULTS.md"
DESCRIPTION = "Side-by-side benchmark: ewc_fast vs the reference implementations and the peer libraries."


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m benchmarks.compare`` argument parser."""
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=DESCRIPTION)
    ap.add_argument("--size", choices=SIZES, default="full")
    ap.add_argument(
        "--workloads",
        nargs="+",
        choices=ALL_WORKLOADS + ("hf",),
        default=None,
        help="default: the non-Hugging-Face workloads; 'hf': every Hugging Face workload ("
        + ", ".join(HF_WORKLOADS)
        + ")",
    )
    ap.add_argument(
        "--contenders",
        nargs="+",
        default=None,
        help="contender names (default: all): " + ", ".join(c.name for c in all_contenders("cpu")),
    )
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per row (0: correctness run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each measuring process")
    ap.add_argument("--out", default=None, help=f"markdown report (default: <repo>/{DEFAULT_OUT})")
    ap.add_argument("--json", default=None, help="JSON results (default: --out with .json)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per row (subprocess)")
    ap.add_argument("--max-time", type=float, default=None, help="cap on the timed repeats of one row (s)")
    ap.add_argument("--in-process", action="store_true", help="no subprocess per row (memory not measured)")
    ap.add_argument("--no-consolidation", action="store_true", help="skip the penalty / SI section")
    ap.add_argument(
        "--consolidation-parts",
        nargs="+",
        choices=PARTS,
        default=None,
        help="only these parts of the penalty / SI section (default: all)",
    )
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="measure nothing: combine the JSON reports of earlier runs (a later file's workloads "
        "replace an earlier one's; consolidation from the last that has it), re-check targets "
        "and write --out / --json",
    )
    ap.add_argument(
        "--merge-rows",
        action="store_true",
        help="with --merge: a later report's rows replace only the same (contender, task) rows and are "
        "added otherwise (for a run of a few contenders in another environment, e.g. the real Avalanche)",
    )
    ap.add_argument(
        "--notes",
        default=None,
        metavar="MD",
        help="markdown file appended to the report as its 'Analysis' section (why a target is or is not met)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    args = build_parser().parse_args(argv)
    if args.child:
        return child_main(args.child)
    out = Path(args.out) if args.out else REPO_ROOT / DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    jpath = Path(args.json) if args.json else out.with_suffix(".json")
    command = "python -m benchmarks.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        reports = [json.loads(Path(p).read_text()) for p in args.merge]
        for p, r in zip(args.merge, reports):
            if r.get("partial"):
                print(f"[bench] note: {p} is a partial run (stopped midway); its finished workloads are merged")
        report = merge_reports(reports, list(args.merge), by_row=args.merge_rows)
    else:

        def checkpoint(rep):
            write_json(jpath, dict(rep, meta=dict(rep["meta"], command=command)))

        workloads = args.workloads
        if workloads and "hf" in workloads:
            workloads = [w for w in workloads if w != "hf"] + [w for w in HF_WORKLOADS if w not in workloads]
        report = run_suite(
            args.size,
            workloads,
            args.contenders,
            tuple(args.tasks),
            repeats=args.repeats,
            device=args.device,
            isolate=not args.in_process,
            timeout=args.timeout,
            max_time=args.max_time,
            threads=args.threads,
            consolidation=not args.no_consolidation,
            consolidation_parts=args.consolidation_parts,
            checkpoint=checkpoint,
        )
        report["meta"]["command"] = command
    if args.notes:
        report["notes_md"] = Path(args.notes).read_text()
    write_json(jpath, report)  # first: never lose the data
    out.write_text(format_markdown(report))
    print(f"[bench] wrote {out} and {jpath}")
    for t in report["targets"]:
        print(f"[bench] target {t['workload']}: {t['target']}: {t['status']} ({t['value'] or t['detail']})")
    return 0
