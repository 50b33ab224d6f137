"""The Markdown summary of a GPU check (``OUT/summary.md``), rendered from ``OUT/results.json``.

Sections: what ran on what (card, driver, versions), the phases (build, tests, benchmarks: status,
seconds, budget), the CUDA tests (counts, failures), the ceilings, one table per benchmark, and the
targets, each ``met`` / ``not met`` / ``not measured`` with the number behind it.
``python -m benchmarks.gpu.report OUT`` re-renders it (the shell script does, last).
"""

from __future__ import annotations

import sys
from pathlib import Path

from . import results

TARGET_TEXT = {
    "penalty": "penalty_apply_ >= 85 % of the device copy bandwidth",
    "optim": "fused step AdamW+EWC+SI <= 1.8 x torch AdamW(fused=True)",
    "persample": "persample_sq_ (Fisher) <= 1.5 x the dW GEMM, every row",
    "fisher_plain": "Fisher <= 1.3 x plain forward+backward",
    "fisher_peer": "Fisher >= 3 x faster than the fastest exact peer",
}


def _f(x, spec=".3g", none="–"):
    if x is None:
        return none
    if isinstance(x, float):
        return format(x, spec)
    return str(x)


def _verdict(met) -> str:
    return "not measured" if met is None else ("met" if met else "not met")


def targets(data: dict) -> list[dict]:
    """One row per target: ``{"target", "value", "verdict"}``."""
    tables = data.get("tables", {})
    out = []
    cons = tables.get("consolidation", {})
    pen = next((r for r in cons.get("rows", []) if r.get("key") == "penalty_apply_"), None)
    out.append(
        {
            "target": TARGET_TEXT["penalty"],
            "value": f"{_f(pen['copy_share'] * 100, '.1f')} % of copy bw" if pen and pen.get("copy_share") else "–",
            "verdict": _verdict(pen.get("met") if pen else None),
        }
    )
    opt = tables.get("optim", {})
    orow = next((r for r in opt.get("rows", []) if "target" in r and r.get("vs_adamw") is not None), None)
    out.append(
        {
            "target": TARGET_TEXT["optim"],
            "value": f"{_f(orow['vs_adamw'])} x" if orow else (opt.get("reason") or "–"),
            "verdict": _verdict(orow.get("met") if orow else None),
        }
    )
    ps = [r for r in tables.get("persample", {}).get("rows", []) if "ratio_sq" in r]
    worst = max(ps, key=lambda r: r["ratio_sq"]) if ps else None
    out.append(
        {
            "target": TARGET_TEXT["persample"],
            "value": f"worst {_f(worst['ratio_sq'])} x ({worst['key']})" if worst else "–",
            "verdict": _verdict(all(r["met"] for r in ps) if ps else None),
        }
    )
    fisher = tables.get("fisher", {})
    summaries = fisher.get("summaries", [])
    if not summaries:
        out.append({"target": TARGET_TEXT["fisher_plain"], "value": "–", "verdict": _verdict(None)})
        out.append({"target": TARGET_TEXT["fisher_peer"], "value": "–", "verdict": _verdict(None)})
    for s in summaries:
        w = s["workload"]
        out.append(
            {
                "target": f"{TARGET_TEXT['fisher_plain']} ({w})",
                "value": f"{_f(s.get('fisher_vs_plain'))} x",
                "verdict": _verdict(s.get("met_plain")),
            }
        )
        out.append(
            {
                "target": f"{TARGET_TEXT['fisher_peer']} ({w})",
                "value": f"{_f(s.get('speedup_vs_peer'))} x vs {s.get('fastest_exact_peer', '–')}",
                "verdict": _verdict(s.get("met_peer")),
            }
        )
    return out


def _table(head: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_f(c) for c in r) + " |" for r in rows]
    return lines


def _bandwidth_table(first: str, rows: list[dict]) -> list[str]:
    """A bandwidth table (consolidation ops, fused optimizer step): one row per measured ``key``, its
    bytes per parameter, time, GB/s, share of the same-run copy bandwidth and ratio to torch's AdamW."""
    return _table(
        [first, "params", "B/param", "ms", "GB/s", "% copy bw", "× AdamW step", "bytes"],
        [
            [
                r["key"],
                r["params"],
                r["bytes_per_param"],
                r["seconds"] * 1e3,
                r["gb_s"],
                None if r.get("copy_share") is None else r["copy_share"] * 100,
                r.get("vs_adamw"),
                r["bytes_model"],
            ]
            for r in rows
        ],
    )


def _status_line(t: dict) -> str:
    parts = [f"status: **{t.get('status', '?')}**"]
    if t.get("seconds") is not None:
        parts.append(f"{t['seconds']:.1f} s of {t.get('budget_s', 0):.0f} s")
    if t.get("cut"):
        parts.append("cut (no time left): " + ", ".join(t["cut"]))
    if t.get("error"):
        parts.append("error: " + t["error"])
    if t.get("reason"):
        parts.append(t["reason"])
    return "; ".join(parts)


def render(data: dict) -> str:
    meta = data.get("meta", {})
    L = ["# GPU check", ""]
    if data.get("dry_run"):
        L += [
            "> **DRY RUN** on the CPU: Triton in its interpreter, tiny sizes, `time.perf_counter`. It proves",
            "> that the script and every table's code path work; its numbers and verdicts mean nothing.",
            "",
        ]
    L += [
        "Card: {card}; driver {driver}; CUDA {cuda}; torch {torch}; Triton {triton}; Python {py}; "
        "ewc_fast {ew} ({commit}).".format(
            card=meta.get("card", "?"),
            driver=meta.get("driver") or "?",
            cuda=meta.get("torch_cuda") or "–",
            torch=meta.get("torch", "?"),
            triton=meta.get("triton", "?"),
            py=meta.get("python", "?"),
            ew=meta.get("ewc_fast", "?"),
            commit=meta.get("commit") or "no git",
        ),
        "",
        "## Phases",
        "",
    ]
    phases = data.get("phases", {})
    L += _table(
        ["phase", "status", "seconds", "limit (s)", "note"],
        [[k, p.get("status"), p.get("seconds"), p.get("budget_s"), p.get("note", "")] for k, p in phases.items()],
    )
    tests = phases.get("tests", {})
    if "counts" in tests:
        c = tests["counts"]
        L += [
            "",
            "## CUDA tests",
            "",
            f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('errors', 0)} errors, "
            f"{c.get('skipped', 0)} skipped (of {c.get('tests', 0)} selected).",
        ]
        for name in tests.get("failures", [])[:30]:
            L.append(f"- FAILED {name}")
        for reason, n in list(tests.get("skip_reasons", {}).items())[:5]:
            L.append(f"- skipped {n}: {reason}")
    T = data.get("tables", {})
    L += ["", "## Targets", ""]
    L += _table(["target", "measured", "verdict"], [[t["target"], t["value"], t["verdict"]] for t in targets(data)])
    if "ceilings" in T:
        t = T["ceilings"]
        L += ["", "## Ceilings", "", _status_line(t), ""]
        L += _table(
            ["what", "seconds", "GB/s", "TFLOP/s"],
            [[r["name"], r["seconds"], r.get("gb_s"), r.get("tflop_s")] for r in t.get("rows", [])],
        )
    if "persample" in T:
        t = T["persample"]
        L += ["", "## persample_sq_ vs the dW GEMM (same shapes, same FLOPs)", "", _status_line(t), ""]
        L += _table(
            [
                "row",
                "N x T, O x I",
                "dW GEMM ms",
                "sq ms",
                "sq+abs ms",
                "GEMM TFLOP/s",
                "sq / GEMM",
                "sq+abs / GEMM",
                "rel err (tol)",
                "≤ 1.5×",
            ],
            [
                [
                    r["key"],
                    f"{r['N']} x {r['T']}, {r['O']} x {r['I']}",
                    r["gemm_s"] * 1e3,
                    r["sq_s"] * 1e3,
                    r["sq_abs_s"] * 1e3,
                    r["gemm_tflop_s"],
                    r["ratio_sq"],
                    r["ratio_sq_abs"],
                    f"{r['rel_err']:.2e} ({r['tol']:.0e}) {r['check']}",
                    _verdict(r["met"]),
                ]
                for r in t.get("rows", [])
            ],
        )
    if "fisher" in T:
        t = T["fisher"]
        L += ["", "## Fisher on the transformer workloads", "", _status_line(t)]
        for s in t.get("summaries", []):
            w = s["workload"]
            L += [
                "",
                f"**{w}**: {s.get('title', '')}; rel. difference of the Fisher vs torch.func: "
                f"{_f(s.get('rel_diff_vs_torch_func'), '.2e')}",
                "",
            ]
            L += _table(
                ["contender", "kind", "seconds", "× plain", "note"],
                [
                    [r["key"], r["kind"], r.get("seconds"), r.get("vs_plain"), r.get("error", "")]
                    for r in t.get("rows", [])
                    if r["workload"] == w
                ],
            )
    if "consolidation" in T:
        t = T["consolidation"]
        L += ["", "## Consolidation ops vs copy bandwidth and torch's fused AdamW", "", _status_line(t), ""]
        L += _bandwidth_table("op", t.get("rows", []))
    if "optim" in T:
        t = T["optim"]
        L += ["", "## Fused optimizer step vs torch's fused AdamW", "", _status_line(t)]
        if t.get("rows"):
            L.append("")
            L += _bandwidth_table("step", t["rows"])
    L.append("")
    return "\n".join(L)


def write(out_dir) -> Path:
    data = results.load(out_dir)
    p = Path(out_dir) / "summary.md"
    tmp = p.with_suffix(".md.tmp")
    tmp.write_text(render(data))
    tmp.replace(p)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m benchmarks.gpu.report OUT_DIR", file=sys.stderr)
        return 2
    print(write(argv[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
