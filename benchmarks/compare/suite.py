"""The comparison run: every workload x contender x task row, the error check, the targets.

For every workload (:mod:`benchmarks.workloads`) one plain forward+backward row (the unit) and one row
per contender (:mod:`benchmarks.contenders`) and task (``fisher``, ``fisher+mas``, ``fisher_exact``)
the contender supports are measured (:mod:`.measure`), each in its own subprocess by default
(:mod:`.isolation`). Each successful row's result is then compared with the float64 oracle:
``rel_error[m] = ||result_m - oracle_m|| / ||oracle_m||`` over all parameters, and
``within_tolerance`` says whether every error is at most the contender's tolerance (an exact
contender outside it gets a ``MISMATCH`` note). ``copies_over_plain`` = (peak extra memory - the
plain row's) / bytes of one copy of the parameters. Finally the targets (:mod:`.targets`) are
evaluated and the consolidation section (:mod:`.consolidation`) is appended.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings

import torch

from ewc_fast.experiments.records import machine_info

from ..contenders import (
    Contender,
    PlainFwdBwd,
    all_contenders,
    get_contender,
    mem_budget_bytes,
    oracle_importance,
    oracle_source,
    physical_memory_bytes,
    relative_error,
)
from ..workloads import WORKLOADS, get_workload
from ..workloads_cnn import largest_activation_bytes
from .consolidation import run_consolidation
from .isolation import run_row_subprocess
from .measure import TASK_METHODS, TASKS, measure_row
from .report import row_summary
from .targets import evaluate_targets

# distributions whose versions the report records (the peers' libraries)
PEER_DISTRIBUTIONS = ("opacus", "backpack-for-pytorch", "nngeometry", "asdfghjkl", "avalanche-lib")


def select_contenders(names, device) -> list[Contender]:
    """The contenders called ``names`` (all of them if none are named)."""
    if not names:
        return all_contenders(device)
    return [get_contender(n, device) for n in names]


def run_suite(
    size: str = "tiny",
    workloads=None,
    contenders=None,
    tasks=TASKS,
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    isolate: bool = True,
    timeout: float | None = None,
    max_time: float | None = None,
    threads: int | None = None,
    consolidation: bool = True,
    consolidation_parts=None,
    mem_limit_bytes: int | None = None,
    log=print,
    checkpoint=None,
) -> dict:
    """Measure every row, check errors against the oracle and the targets; returns the report dict.

    ``isolate=False`` measures in this process (faster; the memory column is then not reported).
    ``checkpoint(report)`` is called after each workload with the report so far (``partial: True``),
    so that a long run stopped midway keeps its finished workloads.
    """
    device = str(device)
    wl_names = list(workloads) if workloads else list(WORKLOADS)
    cons = select_contenders(contenders, device)
    timeout = timeout or {"tiny": 300.0, "small": 900.0}.get(size, 1800.0)
    if max_time is None:
        max_time = {"tiny": 30.0, "small": 120.0}.get(size, 300.0)
    if mem_limit_bytes is None and torch.device(device).type == "cpu" and physical_memory_bytes():
        mem_limit_bytes = int(0.8 * physical_memory_bytes())
    report = {
        "meta": machine_info(device, packages=PEER_DISTRIBUTIONS),
        "oracle": oracle_source(),
        "size": size,
        "repeats": repeats,
        "isolate": isolate,
        "mem_budget_bytes": mem_budget_bytes(device),
        "workloads": {},
        "rows": [],
        "targets": [],
    }
    if threads:
        report["meta"]["torch_threads"] = threads
    tmp = tempfile.mkdtemp(prefix="ewc_fast_bench_")
    for wname in wl_names:
        wl = get_workload(wname, size)
        report["workloads"][wname] = {
            "title": wl.title,
            "description": wl.describe(),
            "kind": wl.kind,
            "n_params": wl.n_params(),
            "n_samples": wl.n_samples,
            "batch_size": wl.batch_size,
        }
        if wl.kind == "cnn":  # the CNN memory target allows one layer's activations
            report["workloads"][wname]["act_bytes"] = largest_activation_bytes(wl)
        log(f"[bench] {wname}: {wl.describe()}")
        plan = [(PlainFwdBwd(), "plain")]
        for c in cons:
            for t in tasks:
                if all(m in c.methods for m in TASK_METHODS[t]):
                    plan.append((c, t))
        wrows = []
        for c, t in plan:
            spec = {
                "workload": wname,
                "size": size,
                "contender": c.name,
                "task": t,
                "device": device,
                "repeats": repeats,
                "warmup": warmup,
                "max_time": max_time,
                "threads": threads,
                "mem_limit_bytes": mem_limit_bytes,
                "result_path": os.path.join(tmp, f"{wname}__{c.name}__{t}.pt".replace("+", "_")),
            }
            t0 = time.perf_counter()
            if isolate:
                row = run_row_subprocess(spec, timeout, tmp)
            else:
                row = measure_row(dict(spec, measure_memory=False))
            row["label"] = c.label
            row["kind"] = c.kind
            q = {m: c.quantity(wl, m) for m in TASK_METHODS[t]}
            row["quantities"] = {m: {"oracle": v.oracle, "exact": v.exact, "note": v.note} for m, v in q.items()}
            row["exact"] = all(v.exact for v in q.values()) if q else None
            row["tolerance"] = c.tolerance_for(device)
            row["wall_s"] = time.perf_counter() - t0
            if row["status"] == "ok" and q and os.path.exists(spec["result_path"]):
                row["_result_path"] = spec["result_path"]
            wrows.append(row)
            log("[bench]   " + row_summary(row))
        check_errors(wl, wrows, device, log)
        plain_peak = next((r.get("peak_extra_bytes") for r in wrows if r["contender"] == "plain"), None)
        for r in wrows:
            if r.get("peak_extra_bytes") is not None and plain_peak is not None and r.get("param_bytes"):
                r["copies_over_plain"] = (r["peak_extra_bytes"] - plain_peak) / r["param_bytes"]
        report["rows"] += wrows
        if checkpoint is not None:
            checkpoint(
                dict(
                    report,
                    partial=True,
                    rows=[{k: v for k, v in r.items() if k != "_result_path"} for r in report["rows"]],
                )
            )
    report["targets"] = evaluate_targets(report)
    if consolidation:
        parts = tuple(consolidation_parts) if consolidation_parts else None
        report["consolidation"] = run_consolidation(size, device, repeats, log, **({"parts": parts} if parts else {}))
    for r in report["rows"]:
        r.pop("_result_path", None)
    return report


def check_errors(wl, rows: list[dict], device, log=print) -> None:
    """Compare every row that saved a result (``_result_path``) with the float64 oracle of ``wl``:
    sets ``rel_error`` and ``within_tolerance`` on the row and deletes the saved result."""
    needed = sorted({q["oracle"] for r in rows if r.get("_result_path") for q in r["quantities"].values()})
    if not needed:
        return
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            oracle = oracle_importance(wl, needed, device=device)
    except Exception as exc:  # pragma: no cover
        for r in rows:
            r.setdefault("notes", []).append(f"oracle failed: {type(exc).__name__}: {exc}")
        return
    how = "per-sample loop" if getattr(wl, "oracle", "func") == "loop" else "torch.func"
    log(f"[bench]   oracle (float64, {how}) {', '.join(needed)}: {time.perf_counter() - t0:.1f} s")
    for r in rows:
        path = r.get("_result_path")
        if not path:
            continue
        res = torch.load(path)
        r["rel_error"] = {}
        for m, q in r["quantities"].items():
            err, missing = relative_error(res.get(m, {}), oracle[q["oracle"]])
            r["rel_error"][m] = err
            if missing:
                r["notes"].append(f"{m}: {len(missing)} parameter(s) missing from the result, e.g. {missing[0]}")
        r["within_tolerance"] = all(e <= r["tolerance"] for e in r["rel_error"].values())
        if r["exact"] and not r["within_tolerance"]:
            r["notes"].append("MISMATCH: exact method outside its tolerance")
        os.remove(path)
