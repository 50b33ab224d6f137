"""The Markdown report of a comparison run (``--out``), and the one-line row summary of the log.

:func:`format_markdown` renders a report dict as written to ``--json`` -- by this version of the
driver or an older one (machine description with ``cores`` / ``versions`` instead of
``cpu_count`` / ``ewc_fast`` / ``backends`` / ``triton``): header (machine, timing and memory
method, oracle, merged runs), the targets table, one table per workload, the contenders' labels,
the consolidation tables and the appended analysis.
"""

from __future__ import annotations

from ..contenders import FISHER, FISHER_EXACT, MAS, oracle_source
from .targets import HF_TARGETS_DOC, TARGETS_DOC

ERROR_TAGS = {FISHER: "F", MAS: "MAS", FISHER_EXACT: "F_exact"}


def fmt_seconds(s: float) -> str:
    """``s`` seconds in s / ms / us."""
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def fmt_timing(t: dict | None) -> str:
    """``median [min-max]`` of a timing dict, ``-`` if none."""
    if not t:
        return "-"
    return f"{fmt_seconds(t['median_s'])} [{fmt_seconds(t['min_s'])}-{fmt_seconds(t['max_s'])}]"


def fmt_bytes(b: float | None) -> str:
    """Bytes in GiB / MiB / KiB / B, ``-`` if none."""
    if b is None:
        return "-"
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= f:
            return f"{b / f:.1f} {unit}"
    return f"{b} B"


def _fmt_error(v: float | None) -> str:
    # JSON has no inf / nan: write_json stores a non-finite error as null
    return "non-finite" if v is None else f"{v:.1e}"


def _what(r: dict) -> str:
    q = r.get("quantities") or {}
    if not q:
        return "reference unit"
    parts = []
    for m, v in q.items():
        tag = "exact" if v["exact"] else "**approximate**"
        if v["note"] and not v["exact"]:
            tag += f": {v['note']}"
        parts.append((m, tag))
    if len({t for _, t in parts}) == 1:
        return parts[0][1]
    return "; ".join(f"{m}: {t}" for m, t in parts)


def row_summary(r: dict) -> str:
    """One log line for a row: contender, task, status, then time / ratio / memory or the message."""
    s = f"{r['contender']:<18} {r['task']:<10} {r['status']:<11}"
    if r["status"] == "ok":
        s += f" {fmt_timing(r.get('time'))}"
        if r.get("ratio_to_plain") is not None:
            s += f"  {r['ratio_to_plain']:.2f}x plain"
        if r.get("peak_extra_bytes") is not None:
            s += f"  +{fmt_bytes(r['peak_extra_bytes'])}"
    else:
        s += f" {r.get('message', '')[:160]}"
    return s


def _library_versions(m: dict) -> dict[str, str]:
    """Peer library versions, then ewc_fast's version and backends and Triton's version: from
    ``versions`` alone (older reports) or ``versions`` + ``ewc_fast`` / ``backends`` / ``triton``."""
    versions = dict(m.get("versions") or {})
    if "ewc_fast" in m and "ewc_fast" not in versions:
        versions["ewc_fast"] = m["ewc_fast"]
        versions["ewc_fast backends"] = ", ".join(m.get("backends") or [])
        if m.get("triton"):
            versions["triton"] = m["triton"]
    return versions


def _header(report: dict) -> list[str]:
    m = report["meta"]
    L = [f"* date: {m['date']}; machine: {m['host']} ({m['platform']})"]
    L.append(
        f"* CPU: {m['cpu']}, {m.get('cpu_count', m.get('cores'))} cores, {m['memory_gib']} GiB; "
        f"torch threads {m['torch_threads']}" + (f"; GPU: {m['gpu']}" if m.get("gpu") else "")
    )
    L.append(f"* device: {m['device']}; Python {m['python']}, torch {m['torch']}")
    if m.get("git"):
        L.append(f"* commit: {m['git']}")
    L.append("* libraries: " + ", ".join(f"{k} {v}" for k, v in _library_versions(m).items()))
    L.append(
        f"* timing: median of {report['repeats']} repeats after 1 warm-up, [min-max]; "
        "`x plain` = time / one plain forward+backward over the same data, measured in the same process"
    )
    mem_how = sorted({r.get("memory_method") for r in report["rows"] if r.get("memory_method")})
    L.append(
        "* memory: "
        + (
            "peak extra over a baseline taken after model + data creation and one warm-up call "
            "(one-time costs such as lazy imports excluded), each row in its own subprocess ("
            + "; ".join(mem_how)
            + "); `copies` = in units of one copy of the parameters; "
            "`copies over plain` = minus the plain forward+backward row's peak"
            if report["isolate"]
            else "not measured (in-process run)"
        )
    )
    L.append(
        "* error: ||result - oracle|| / ||oracle|| over all parameters (F = empirical Fisher, MAS, "
        "F_exact = exact Fisher); oracle: " + report.get("oracle", oracle_source())
    )
    L.append(
        f"* per-sample-gradient memory budget of materialising contenders: {fmt_bytes(report['mem_budget_bytes'])}"
    )
    if m.get("command"):
        L.append(f"* command: `{m['command']}`")
    for run in report.get("runs", []):
        L.append(
            f"* merged from `{run['source']}` ({run['date']}): {', '.join(run['workloads']) or '-'}"
            + ("; consolidation" if run["consolidation"] else "")
            + ("; a partial run (stopped midway: the workloads listed finished)" if run.get("partial") else "")
            + (f"; command `{run['command']}`" if run.get("command") else "")
            + (f"; torch {run['torch']}" if run.get("torch") and run["torch"] != m.get("torch") else "")
            + (
                f"; avalanche-lib {run['versions']['avalanche-lib']}"
                if run.get("versions", {}).get("avalanche-lib") not in (None, "?")
                else ""
            )
        )
    return L


def _workload_table(report: dict, wname: str) -> list[str]:
    L = [
        "| contender | task | computes | time median [min-max] | x plain | peak extra mem | copies "
        "| copies over plain | rel. error vs oracle | status / notes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in [r for r in report["rows"] if r["workload"] == wname]:
        ratio = f"{r['ratio_to_plain']:.2f}x" if r.get("ratio_to_plain") is not None else "-"
        copies = f"{r['param_copies']:.2f}" if r.get("param_copies") is not None else "-"
        over = f"{r['copies_over_plain']:+.2f}" if r.get("copies_over_plain") is not None else "-"
        status = r["status"] if r["status"] == "ok" else f"**{r['status']}**: {r.get('message', '')}"
        notes = "; ".join(r.get("notes", []))
        if notes:
            status += f" ({notes})"
        name = "plain fwd+bwd" if r["contender"] == "plain" else r["contender"]
        task = "-" if r["task"] == "plain" else r["task"]
        err = ", ".join(f"{ERROR_TAGS[m]} {_fmt_error(v)}" for m, v in r.get("rel_error", {}).items()) or "-"
        L.append(
            f"| {name} | {task} | {_what(r)} | {fmt_timing(r.get('time'))} | {ratio} | "
            f"{fmt_bytes(r.get('peak_extra_bytes'))} | {copies} | {over} | {err} | {status} |"
        )
    return L


def _consolidation(cons: dict) -> list[str]:
    L = ["", "## Consolidation ops (benchmarks/bench_consolidation.py)", ""]
    if cons["penalty_lines"]:
        L.append("| params | tasks | contender | median [min-max] | GB/s | of copy BW | vs per-task loop |")
        L.append("|---|---|---|---|---|---|---|")
        L += cons["penalty_lines"]
    if cons.get("si_lines") or cons.get("si_avalanche_lib_line"):
        L += [
            "",
            f"SI overhead, {cons.get('si_title', '')}",
            "",
            "| measured | plain | with SI | overhead |",
            "|---|---|---|---|",
        ]
        L += cons.get("si_lines", [])
        if cons.get("si_avalanche_lib_line"):
            L.append(cons["si_avalanche_lib_line"])
    for e in cons["errors"]:
        L.append(f"\n* not measured: {e}")
    return L


def format_markdown(report: dict) -> str:
    """The Markdown report of ``report`` (a dict as :func:`~benchmarks.compare.suite.run_suite` or
    :func:`~benchmarks.compare.merge.merge_reports` returns it, or as read back from its JSON)."""
    L = [f"# ewc_fast comparison benchmark ({report['size']})", ""]
    if report["size"] == "tiny":
        L += [
            "> size `tiny`: a smoke run. Models have a few thousand parameters, so times are dominated by "
            "per-call overheads and say nothing about the targets; only the error column is meaningful.",
            "",
        ]
    L += _header(report)
    kinds = {w.get("kind") for w in report["workloads"].values()}
    docs = ([TARGETS_DOC] if kinds - {"hf"} or not kinds else []) + ([HF_TARGETS_DOC] if "hf" in kinds else [])
    L += ["", "## Targets", "", "\n".join(docs), ""]
    L.append("| workload | target | value | status | ewc_fast row / reason |")
    L.append("|---|---|---|---|---|")
    for t in report["targets"]:
        L.append(f"| {t['workload']} | {t['target']} | {t['value'] or '-'} | {t['status']} | {t['detail']} |")
    for wname, w in report["workloads"].items():
        L += ["", f"## {wname}", "", w["description"], ""]
        L += _workload_table(report, wname)
    if report["rows"]:
        L += ["", "Contenders:", ""]
        seen = {}
        for r in report["rows"]:
            seen.setdefault(r["contender"], r["label"])
        for k, v in seen.items():
            L.append(f"* `{k}`: {v}")
    if report.get("consolidation"):
        L += _consolidation(report["consolidation"])
    if report.get("notes_md"):
        L += ["", "## Analysis", "", report["notes_md"].strip()]
    return "\n".join(L) + "\n"
