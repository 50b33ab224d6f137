"""Smoke run of the comparison benchmark (the benchmarks.compare package) on tiny sizes.

Checks the machinery, not the speed: every exact contender matches the float64 oracle within its
stated tolerance, approximate ones are labelled as such, failures are rows with a reason, and the
driver's subprocess path (clean peak memory per row), report and JSON work end to end. Peers that
are not installed show up as ``unavailable`` rows and are skipped by the assertions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

compare = pytest.importorskip("benchmarks.compare")
from benchmarks.contenders import FISHER, FISHER_EXACT, MAS, relative_error  # noqa: E402
from benchmarks.workloads import WORKLOADS, get_workload  # noqa: E402

ALLOWED = {"ok", "unsupported", "unavailable", "error", "oom", "timeout"}


@pytest.fixture(scope="module")
def tiny_report():
    """All workloads x all contenders x all tasks, in this process, one call each (fast; no memory)."""
    return compare.run_suite("tiny", repeats=0, isolate=False, consolidation=False, threads=1, log=lambda *a, **k: None)


def test_every_row_is_reported(tiny_report):
    rows = tiny_report["rows"]
    assert {r["workload"] for r in rows} == set(WORKLOADS)
    for r in rows:
        assert r["status"] in ALLOWED, r
        if r["status"] != "ok":
            assert r.get("message"), f"failure without a reason: {r}"
    for w in WORKLOADS:
        plain = [r for r in rows if r["workload"] == w and r["contender"] == "plain"]
        assert len(plain) == 1 and plain[0]["status"] == "ok"


def test_exact_contenders_match_the_oracle(tiny_report):
    checked = 0
    for r in tiny_report["rows"]:
        if r["status"] != "ok" or not r.get("quantities"):
            continue
        assert "rel_error" in r, f"no error computed for {r['workload']} / {r['contender']} / {r['task']}"
        assert set(r["rel_error"]) == set(r["quantities"])
        for m, q in r["quantities"].items():
            if q["exact"]:
                checked += 1
                assert r["rel_error"][m] <= r["tolerance"], (
                    f"{r['workload']} / {r['contender']} / {m}: rel. error {r['rel_error'][m]:.2e} > "
                    f"tolerance {r['tolerance']:.0e}"
                )
    assert checked > 0


def test_ewc_fast_rows_succeed(tiny_report):
    import ewc_fast

    if not hasattr(ewc_fast, "estimate_importance"):
        pytest.skip("estimate_importance not in this checkout")
    rows = [r for r in tiny_report["rows"] if r["kind"] == "ewc_fast"]
    assert rows
    for r in rows:
        assert r["status"] == "ok", f"{r['workload']} / {r['contender']} / {r['task']}: {r.get('message')}"
        assert r["exact"] and r["within_tolerance"]


def test_approximate_contenders_are_labelled(tiny_report):
    rows = [r for r in tiny_report["rows"] if r["status"] == "ok"]
    md = compare.format_markdown(tiny_report)
    aval = [r for r in rows if r["contender"] == "avalanche-style"]
    assert aval and all(r["exact"] is False for r in aval)
    # batch-mean squared gradients are far from the per-sample Fisher on these models
    assert all(r["rel_error"][FISHER] > 1e-2 for r in aval if FISHER in r["rel_error"])
    for r in rows:
        if r["contender"] == "asdl" and get_workload(r["workload"], "tiny").sequence:
            assert r["exact"] is False
    assert "**approximate**" in md
    for r in rows:
        if r.get("exact") is False:
            line = next(
                ln
                for ln in md.splitlines()
                if ln.startswith(f"| {r['contender']} | {r['task']} |") and r["workload"] in _section_of(md, ln)
            )
            assert "approximate" in line


def _section_of(md: str, line: str) -> str:
    head = ""
    for ln in md.splitlines():
        if ln.startswith("## "):
            head = ln
        if ln == line:
            return head
    return ""


def test_known_peer_limits_are_rows_not_crashes(tiny_report):
    by = {(r["workload"], r["contender"], r["task"]): r for r in tiny_report["rows"]}
    r = by[("transformer-T128", "backpack", "fisher")]
    if r["status"] != "unavailable":
        assert r["status"] == "unsupported" and "LayerNorm" in r["message"]
    r = by[("transformer-mha-T128", "opacus", "fisher")]
    if r["status"] != "unavailable":
        assert r["status"] == "unsupported" and "MultiheadAttention" in r["message"]
    r = by[("mlp-mnist", "nngeometry", "fisher_exact")]
    if r["status"] != "unavailable":  # nngeometry's FIM is the exact Fisher: compared with that oracle
        assert r["status"] == "ok" and r["quantities"][FISHER_EXACT]["oracle"] == FISHER_EXACT


def test_targets_and_markdown(tiny_report):
    md = compare.format_markdown(tiny_report)
    for w in WORKLOADS:
        assert f"## {w}" in md
    assert "## Targets" in md and "torch" in md
    kinds = {t["workload"] for t in tiny_report["targets"]}
    assert {"mlp-mnist", "transformer-T128", "cnn-32"} <= kinds
    assert all(t["status"] in ("met", "not met", "n/a") for t in tiny_report["targets"])


@pytest.mark.parametrize(
    "workload,q",
    [
        ("mlp-mnist", (FISHER, MAS, FISHER_EXACT)),
        ("embedding", (FISHER, MAS, FISHER_EXACT)),
        ("transformer-mha-T128", (FISHER, MAS)),
    ],
)
def test_the_two_oracles_agree(workload, q):
    """The benchmark's own float64 oracle and ewc_fast.testing.importance are independent codes."""
    pytest.importorskip("ewc_fast.testing.importance")
    from benchmarks.contenders import oracle_importance

    wl = get_workload(workload, "tiny")
    ours = oracle_importance(wl, q, source="benchmarks", chunk=3)
    theirs = oracle_importance(wl, q, source="ewc_fast")
    for m in q:
        err, missing = relative_error(ours[m], theirs[m])
        assert not missing and err < 1e-10, (m, err)


def test_relative_error_counts_missing_parameters():
    import torch

    ref = {"a": torch.ones(3, dtype=torch.float64), "b": torch.ones(1, dtype=torch.float64)}
    err, missing = relative_error({"a": torch.ones(3)}, ref)
    assert missing == ["b"] and abs(err - 0.5) < 1e-12
    assert relative_error({"a": torch.ones(3), "b": torch.ones(1)}, ref)[0] == 0.0
    # a result of the wrong size (a peer ignoring a conv's groups) is an infinite error, named with its shape
    err, missing = relative_error({"a": torch.ones(3, 3), "b": torch.ones(1)}, ref)
    assert err == float("inf") and missing == ["a (wrong shape (3, 3), expected (3,))"]


def test_cli_subprocess_rows_and_files(tmp_path):
    """The real path: one subprocess per row (peak memory measured), markdown + JSON, penalty/SI section."""
    out = tmp_path / "R.md"
    rc = compare.main(
        [
            "--size",
            "tiny",
            "--workloads",
            "mlp-mnist",
            "--contenders",
            "ewc_fast[torch]",
            "avalanche-style",
            "--tasks",
            "fisher",
            "--repeats",
            "1",
            "--threads",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    rows = {r["contender"]: r for r in rep["rows"]}
    assert set(rows) == {"plain", "ewc_fast[torch]", "avalanche-style"}
    for name, r in rows.items():
        if r["status"] == "unavailable":
            continue
        assert r["status"] == "ok", r
        assert isinstance(r["peak_extra_bytes"], int) and r["peak_extra_bytes"] >= 0
        assert r["memory_method"] and r["time"]["median_s"] > 0
        if name != "plain":
            assert r["ratio_to_plain"] > 0 and "copies_over_plain" in r
    assert rows["avalanche-style"]["rel_error"][FISHER] > 1e-2
    md = out.read_text()
    assert "## mlp-mnist" in md and "## Consolidation ops" in md
    cons = rep["consolidation"]
    assert cons["penalty_lines"] or cons["errors"]
    assert MAS not in rows["avalanche-style"]["rel_error"]


def test_merge_reports_and_notes(tiny_report, tmp_path):
    """--merge combines runs (a later run's workload replaces the earlier one's), re-checks the targets
    and appends --notes as the Analysis section; mixing sizes is refused."""
    import copy

    a = copy.deepcopy(tiny_report)
    a["meta"]["command"] = "run A"
    b = copy.deepcopy(tiny_report)
    b["workloads"] = {"mlp-mnist": b["workloads"]["mlp-mnist"]}
    b["rows"] = [dict(r, message="from B") for r in b["rows"] if r["workload"] == "mlp-mnist"]
    b["meta"]["command"] = "run B"
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a, default=str))
    pb.write_text(json.dumps(b, default=str))
    notes = tmp_path / "notes.md"
    notes.write_text("Why the MLP target is met.\n")
    out = tmp_path / "M.md"
    assert compare.main(["--merge", str(pa), str(pb), "--notes", str(notes), "--out", str(out)]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    assert list(rep["workloads"]) == list(a["workloads"])  # order of first appearance
    mlp = [r for r in rep["rows"] if r["workload"] == "mlp-mnist"]
    assert mlp and all(r.get("message") == "from B" for r in mlp)
    assert len(rep["rows"]) == len(a["rows"])
    assert [r["command"] for r in rep["runs"]] == ["run A", "run B"]
    md = out.read_text()
    assert "merged from" in md and "## Analysis" in md and "Why the MLP target is met." in md
    c = copy.deepcopy(b)
    c["size"] = "full"
    with pytest.raises(ValueError, match="sizes"):
        compare.merge_reports([a, c])


def test_merge_rows_adds_a_few_contenders_to_a_workload(tiny_report, tmp_path):
    """--merge-rows: a run of one contender in another environment (the real Avalanche) adds its rows
    to the workloads measured elsewhere, replaces only its own (contender, task) rows, keeps the first
    run's plain row and consolidation entries, and adds the consolidation keys the first run lacks."""
    import copy

    a = copy.deepcopy(tiny_report)
    a["consolidation"] = {"penalty_lines": ["| A |"], "si_lines": [], "errors": []}
    b = copy.deepcopy(tiny_report)
    b["workloads"] = {"mlp-mnist": b["workloads"]["mlp-mnist"]}
    b["rows"] = [
        dict(r, contender=name, message="from B")
        for r in b["rows"]
        if r["workload"] == "mlp-mnist" and r["contender"] in ("plain", "avalanche-style")
        for name in ([r["contender"]] if r["contender"] == "plain" else ["avalanche", "avalanche-style"])
    ]
    b["consolidation"] = {"penalty_lines": ["| B |"], "si_avalanche_lib_line": "| real SI |", "errors": []}
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a, default=str))
    pb.write_text(json.dumps(b, default=str))
    out = tmp_path / "M.md"
    assert compare.main(["--merge", str(pa), str(pb), "--merge-rows", "--out", str(out)]) == 0
    rep = json.loads(out.with_suffix(".json").read_text())
    mlp = [r for r in rep["rows"] if r["workload"] == "mlp-mnist"]
    old = [r for r in a["rows"] if r["workload"] == "mlp-mnist"]
    plain = [r for r in mlp if r["contender"] == "plain"]
    assert len(plain) == 1 and plain[0].get("message") != "from B"
    assert [r.get("message") for r in mlp if r["contender"] in ("avalanche", "avalanche-style")] == ["from B"] * 4
    # this environment's run already has (unavailable) avalanche rows: both kinds are replaced, none added
    n_new = 2 * (not any(r["contender"] == "avalanche" for r in old))
    assert len(mlp) == len(old) + n_new
    assert len(rep["rows"]) == len(a["rows"]) + n_new
    assert rep["consolidation"]["penalty_lines"] == ["| A |"]
    assert "| real SI |" in out.read_text()


def test_checkpoint_after_each_workload():
    """A long run stopped midway keeps its finished workloads: run_suite hands the report so far to
    ``checkpoint`` after every workload, marked partial and without private fields."""
    seen = []
    compare.run_suite(
        "tiny",
        workloads=["mlp-mnist", "embedding"],
        contenders=["ewc_fast[torch]"],
        tasks=("fisher",),
        repeats=0,
        isolate=False,
        consolidation=False,
        threads=1,
        log=lambda *a, **k: None,
        checkpoint=lambda rep: seen.append(json.loads(json.dumps(rep, default=str))),
    )
    assert [list(r["workloads"]) for r in seen] == [["mlp-mnist"], ["mlp-mnist", "embedding"]]
    assert all(r["partial"] for r in seen)
    assert {r["workload"] for r in seen[0]["rows"]} == {"mlp-mnist"}
    assert not any("_result_path" in row for r in seen for row in r["rows"])
    merged = compare.merge_reports([seen[0]])
    assert merged["runs"][0]["partial"] and "partial run" in compare.format_markdown(merged)


def test_remerging_a_merged_report_keeps_its_runs(tiny_report):
    """Re-rendering a merged report through --merge keeps the runs it was merged from, and its rows."""
    import copy

    a = copy.deepcopy(tiny_report)
    a["meta"]["command"] = "run A"
    merged = compare.merge_reports([a], ["a.json"])
    again = compare.merge_reports([json.loads(json.dumps(merged, default=str))], ["merged.json"])
    assert again["runs"] == merged["runs"] and [r["source"] for r in again["runs"]] == ["a.json"]
    assert len(again["rows"]) == len(merged["rows"]) and again["targets"] == merged["targets"]


def test_committed_report_renders_from_its_json():
    """benchmarks/results/RESULTS.md is what the renderer makes of benchmarks/results/RESULTS.json."""
    results = ROOT / "benchmarks" / "results"
    report = json.loads((results / "RESULTS.json").read_text())
    assert compare.format_markdown(report) == (results / "RESULTS.md").read_text()
    assert compare.evaluate_targets(report) == report["targets"]


def test_a_target_is_not_decided_on_too_few_or_scattered_timings():
    """A ratio from one repeat, or from timings spread by more than MAX_SPREAD, is n/a with the reason;
    three steady repeats decide it."""
    from benchmarks.compare.targets import MAX_SPREAD, evaluate_targets

    def t(*xs):
        return {"median_s": sorted(xs)[len(xs) // 2], "min_s": min(xs), "max_s": max(xs), "repeats": len(xs)}

    def report(time, plain):
        row = {
            "workload": "cnn-32",
            "contender": "ewc_fast[cpp]",
            "kind": "ewc_fast",
            "task": "fisher",
            "status": "ok",
            "time": time,
            "plain": plain,
            "ratio_to_plain": time["median_s"] / plain["median_s"],
        }
        return {"workloads": {"cnn-32": {"kind": "cnn"}}, "rows": [row]}

    def fisher_target(rep):
        return next(x for x in evaluate_targets(rep) if x["target"].startswith("Fisher <="))

    steady = fisher_target(report(t(1.0, 1.1, 1.05), t(1.0, 1.0, 1.0)))
    assert steady["status"] == "met" and steady["value"] == "1.05x"
    one = fisher_target(report(t(0.5), t(1.0, 1.0, 1.0)))
    assert one["status"] == "n/a" and "1 repeat" in one["detail"] and one["value"] == "0.50x"
    wide = fisher_target(report(t(1.0, 1.0, 1.0), t(1.0, 1.0, MAX_SPREAD * 1.5)))
    assert wide["status"] == "n/a" and "its plain timings spread" in wide["detail"]
