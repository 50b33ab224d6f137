"""One report from several runs' JSON reports (``python -m benchmarks.compare --merge A.json B.json``).

Workloads and their rows come in first-seen order, a later report's rows replacing an earlier one's
for the same workload; the consolidation section comes from the last report that has one; the
targets are re-evaluated on the merged rows. ``runs`` lists where each part came from (source, date,
command, workloads, partial); a report that is itself a merge contributes its own ``runs``, so that
merging a merged report again (e.g. to re-render it) keeps the original runs.
"""

from __future__ import annotations

import datetime as _dt

from .targets import evaluate_targets


def _runs_of(report: dict, source: str) -> list[dict]:
    if report.get("runs"):
        return [dict(run) for run in report["runs"]]
    return [
        {
            "source": source,
            "date": report["meta"].get("date"),
            "command": report["meta"].get("command"),
            "workloads": list(report["workloads"]),
            "consolidation": bool(report.get("consolidation")),
            "partial": bool(report.get("partial")),
            "torch": report["meta"].get("torch"),
            "versions": dict(report["meta"].get("versions", {})),
        }
    ]


def merge_reports(reports: list[dict], sources: list[str] | None = None, *, by_row: bool = False) -> dict:
    """One report from several runs' JSON reports: workloads and their rows in first-seen order, a later
    report's rows replacing an earlier one's for the same workload; targets re-evaluated. Refuses
    reports of different sizes or devices (``ValueError``).

    ``by_row=True`` (``--merge-rows``): a later report's rows replace only the earlier rows of the same
    (contender, task) and are appended otherwise, so that a run of a few contenders (e.g. the real
    Avalanche in its own environment) adds its rows to a workload measured elsewhere; the consolidation
    section keeps the first report's entries and takes only the keys it lacks from later reports."""
    if not reports:
        raise ValueError("merge_reports: no reports")
    sizes = {r["size"] for r in reports}
    if len(sizes) > 1:
        raise ValueError(f"merge_reports: reports of different sizes {sorted(sizes)}")
    devices = {r["meta"]["device"] for r in reports}
    if len(devices) > 1:
        raise ValueError(f"merge_reports: reports from different devices {sorted(devices)}")
    # keys in the order a merge of fresh runs writes them, also when re-merging a merged report
    later = ("rows", "workloads", "targets", "consolidation", "runs", "notes_md")
    out = {k: v for k, v in reports[0].items() if k not in later}
    out["meta"] = {k: v for k, v in reports[0]["meta"].items() if k != "command"}  # each run's is in "runs"
    out["meta"]["date"] = "merged " + _dt.datetime.now().isoformat(timespec="seconds")
    out["workloads"], out["rows"] = {}, []
    rows_by_wl: dict[str, list] = {}
    for r in reports:
        for wname, w in r["workloads"].items():
            new = [row for row in r["rows"] if row["workload"] == wname]
            if by_row and wname in rows_by_wl:
                # the first run's plain row stays the workload's unit (every row's ratio is its own)
                new = [row for row in new if row["contender"] != "plain"]
                keys = {(row["contender"], row["task"]) for row in new}
                kept = [row for row in rows_by_wl[wname] if (row["contender"], row["task"]) not in keys]
                rows_by_wl[wname] = kept + new
                continue
            out["workloads"][wname] = w
            rows_by_wl[wname] = new
        if r.get("consolidation"):
            if by_row and out.get("consolidation"):
                extra = {k: v for k, v in r["consolidation"].items() if k not in out["consolidation"]}
                out["consolidation"] = {**out["consolidation"], **extra}
            else:
                out["consolidation"] = r["consolidation"]
    for wname in out["workloads"]:
        out["rows"] += rows_by_wl[wname]
    out["repeats"] = min(r["repeats"] for r in reports)
    out["isolate"] = all(r["isolate"] for r in reports)
    out["runs"] = [run for i, r in enumerate(reports) for run in _runs_of(r, sources[i] if sources else f"report {i}")]
    out["targets"] = evaluate_targets(out)
    if "notes_md" in reports[0]:
        out["notes_md"] = reports[0]["notes_md"]
    return out
