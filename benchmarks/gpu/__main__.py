"""``python -m benchmarks.gpu --out DIR [--dry-run] [--budget-s S] [--tables ...]``: the GPU tables.

Runs the tables in order (ceilings first: every other table is read against them), each under its
share of the time budget; a table that runs out of time lists the rows it cut. After every table the
results (``DIR/results.json``) and the summary (``DIR/summary.md``) are rewritten, so a run stopped
from outside keeps what it measured. ``--dry-run``: CPU, Triton interpreter (``TRITON_INTERPRET=1``
must be set by the caller before anything imports Triton: scripts/gpu_check.sh does), tiny sizes.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

from . import report, results
from .timing import Budget

#: table -> share of the benchmark budget (a table that finishes early leaves its time to the next)
SHARES = {"ceilings": 0.08, "persample": 0.27, "consolidation": 0.15, "fisher": 0.40, "optim": 0.10}
OPTIM_GAP = (
    "gap: ewc_fast.ops.fused_step_ (the fused optimizer step AdamW+EWC+SI, issue 12) is not in this tree, "
    "so the fused-step table and its target (<= 1.8 x torch AdamW(fused=True)) are not measured"
)


def _device(dry_run: bool) -> str:
    if dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run needs TRITON_INTERPRET=1 in the environment (set before Triton imports)")
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run (CPU, Triton interpreter)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 on a GPU run: the kernels would be interpreted; unset it")
    return "cuda"


def run_table(name: str, out: str, device: str, sizes, budget: Budget, state: dict) -> None:
    from . import ceilings, fisher, kernels

    table = {"status": "running", "budget_s": budget.seconds, "rows": [], "cut": []}
    results.set_table(out, name, table)
    try:
        if name == "ceilings":
            table["rows"], table["cut"] = ceilings.measure(device, sizes, budget)
            state["copy_gb_s"] = next((r["gb_s"] for r in table["rows"] if r["key"] == "copy"), None)
        elif name == "persample":
            table["rows"], table["cut"] = kernels.persample_rows(device, sizes, budget)
        elif name == "consolidation":
            table["rows"], table["cut"] = kernels.consolidation_rows(device, sizes, budget, state.get("copy_gb_s"))
        elif name == "fisher":
            table["summaries"] = []
            for w in sizes.workloads:
                rows, cut, summary = fisher.workload_rows(w, device, sizes, budget)
                table["rows"] += rows
                table["cut"] += cut
                table["summaries"].append(summary)
                table["seconds"] = budget.used()
                results.set_table(out, name, table)  # a workload at a time
        elif name == "optim":
            from ewc_fast import ops

            if not hasattr(ops, "fused_step_"):
                table["status"] = "gap"
                table["reason"] = OPTIM_GAP
            else:
                from . import optim

                table["rows"], table["cut"] = optim.rows(device, sizes, budget, state.get("copy_gb_s"))
        else:
            raise ValueError(f"unknown table {name!r}; valid: {', '.join(SHARES)}")
        if table["status"] == "running":
            table["status"] = "cut" if table["cut"] else "ok"
    except Exception as exc:  # one broken table must not cost the others
        table["status"] = "error"
        table["error"] = f"{type(exc).__name__}: {exc}"[:500]
        traceback.print_exc()
    table["seconds"] = budget.used()
    results.set_table(out, name, table)
    report.write(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, help="directory of results.json and summary.md")
    ap.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny sizes")
    ap.add_argument("--budget-s", type=float, default=200.0, help="seconds for all tables together")
    ap.add_argument("--tables", default=",".join(SHARES), help="comma-separated subset, in this order")
    a = ap.parse_args(argv)
    names = [t for t in a.tables.split(",") if t]
    for t in names:
        if t not in SHARES:
            ap.error(f"unknown table {t!r}; valid: {', '.join(SHARES)}")
    device = _device(a.dry_run)
    from . import environment
    from .sizes import DRY, GPU

    sizes = DRY if a.dry_run else GPU
    if a.dry_run:
        torch.set_num_threads(1)

    def meta(d):
        d["meta"] = environment.describe(device)
        d["dry_run"] = a.dry_run

    results.update(a.out, meta)
    total = Budget(a.budget_s)
    state: dict = {}
    for i, name in enumerate(names):
        rest = sum(SHARES[n] for n in names[i:])
        seconds = max(0.0, total.left()) * SHARES[name] / rest
        run_table(name, a.out, device, sizes, Budget(seconds), state)
        print(f"[gpu-bench] {name}: {results.load(a.out)['tables'][name]['status']}", flush=True)
    report.write(a.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
