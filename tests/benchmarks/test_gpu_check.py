"""scripts/gpu_check.sh and benchmarks/gpu: the CPU dry run end to end (so the script is known to work
before a card is lent), and the pieces it is built from (phase records, JUnit parsing, targets,
budgets that cut rows)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.gpu import phases, report, results
from benchmarks.gpu.timing import Budget, rotation

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TABLES = ("ceilings", "persample", "consolidation", "fisher")


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU path; on a card run it for real")
def test_dry_run_end_to_end(tmp_path):
    # budgets with room for a loaded CI machine (the script's own dry-run defaults total 110 s); a phase
    # cut at its limit would fail the status checks below
    env = dict(
        os.environ,
        PYTHON=sys.executable,
        OMP_NUM_THREADS="1",
        GPU_CHECK_TOTAL_S="400",
        GPU_CHECK_BUILD_S="40",
        GPU_CHECK_TESTS_S="120",
        GPU_CHECK_BENCH_S="230",
    )
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself, before anything imports Triton
    out = tmp_path / "gpu"
    proc = subprocess.run(
        ["bash", str(SCRIPT), str(out), "--dry-run"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for f in ("results.json", "summary.md", "build.log", "tests.log", "tests.xml", "bench.log"):
        assert (out / f).is_file(), f
    assert len(list(out.iterdir())) <= 8  # what a lent machine sends back: at most 8 files

    data = json.loads((out / "results.json").read_text())
    assert data["dry_run"] is True and data["meta"]["triton_interpret"] == "1"
    for name in ("build", "tests", "bench"):
        assert data["phases"][name]["status"] == "ok", (name, data["phases"][name], (out / "bench.log").read_text())
    c = data["phases"]["tests"]["counts"]
    # every selected test is a cuda one: collected, and skipped here with the reason, none failing
    assert c["tests"] > 100 and c["skipped"] == c["tests"] and c.get("failed", 0) == c.get("errors", 0) == 0
    assert all("CUDA" in r for r in data["phases"]["tests"]["skip_reasons"])

    T = data["tables"]
    for name in TABLES:
        assert T[name]["status"] == "ok", (name, T[name].get("error"), T[name].get("cut"))
    assert T["optim"]["status"] in ("ok", "gap")
    if T["optim"]["status"] == "gap":
        assert "fused_step_" in T["optim"]["reason"]
    else:
        keys = [r["key"] for r in T["optim"]["rows"]]
        assert keys == ["torch AdamW(fused=True).step()", "fused_step_ AdamW+EWC+SI", *keys[2:]] and len(keys) == 3
        assert all(r["vs_adamw"] > 0 for r in T["optim"]["rows"])
    assert [r["key"] for r in T["ceilings"]["rows"]] == ["copy", "bf16", "tf32", "fp32-ieee"]
    # persample_sq_ in the interpreter agrees with the float64 oracle on every row (3 T x 3 precisions)
    ps = T["persample"]["rows"]
    assert len(ps) == 9 and all(r["check"] == "ok" and r["rel_err"] <= r["tol"] for r in ps), ps
    assert {r["precision"] for r in ps} == {"fp32-ieee", "tf32", "bf16"}
    keys = {r["key"] for r in T["consolidation"]["rows"]}
    assert {"penalty_apply_", "si_accumulate_", "wva_attenuate_", "torch AdamW(fused=True).step()"} <= keys
    fisher = T["fisher"]
    assert not [r for r in fisher["rows"] if "error" in r and r["kind"] != "exact-peer"], fisher["rows"]
    (s,) = fisher["summaries"]
    assert s["rel_diff_vs_torch_func"] < 1e-4  # ewc_fast's Fisher is torch.func's, up to fp32 rounding
    assert "fisher_vs_plain" in s and "speedup_vs_peer" in s

    md = (out / "summary.md").read_text()
    assert "DRY RUN" in md and "## Targets" in md and "## CUDA tests" in md
    for heading in ("## Ceilings", "## persample_sq_", "## Fisher", "## Consolidation ops", "## Fused optimizer"):
        assert heading in md, heading
    target_rows = [line for line in md.split("## Targets")[1].split("\n## ")[0].splitlines() if line.startswith("| ")]
    assert len(target_rows) == 1 + 5  # header + penalty, optim, persample, fisher x plain, fisher x peer
    for line in target_rows[1:]:
        assert line.rstrip(" |").endswith(("| met", "| not met", "| not measured")), line


def test_usage_errors():
    for args in ([], [str(ROOT / "x"), "--fast"]):
        proc = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
        assert proc.returncode == 2


def test_phase_status_and_junit(tmp_path):
    assert phases.status_of("0") == "ok"
    assert phases.status_of("124") == phases.status_of("137") == "cut"
    assert phases.status_of("1") == "failed (rc 1)"
    assert phases.status_of("skipped") == "skipped"
    xml = tmp_path / "t.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.a" name="ok"/>'
        '<testcase classname="tests.a" name="bad"><failure message="x"/></testcase>'
        '<testcase classname="tests.a" name="err"><error message="y"/></testcase>'
        '<testcase classname="tests.b" name="s1"><skipped message="no CUDA device"/></testcase>'
        '<testcase classname="tests.b" name="s2"><skipped message="no CUDA device"/></testcase>'
        "</testsuite></testsuites>"
    )
    s = phases.junit_summary(str(xml))
    assert s["counts"] == {"tests": 5, "passed": 1, "failed": 1, "errors": 1, "skipped": 2}
    assert s["failures"] == ["tests.a::bad", "tests.a::err (error)"]
    assert s["skip_reasons"] == {"no CUDA device": 2}
    assert phases.junit_summary(str(tmp_path / "missing.xml")) == {}
    phases.main([str(tmp_path), "tests", "--rc", "124", "--seconds", "150", "--budget", "150", "--junit", str(xml)])
    rec = results.load(tmp_path)["phases"]["tests"]
    assert rec["status"] == "cut" and rec["counts"]["failed"] == 1
    md = report.render(results.load(tmp_path))
    assert "FAILED tests.a::bad" in md and "| tests | cut |" in md


def _data(ratio_sq, share, vs_plain, speedup):
    return {
        "tables": {
            "consolidation": {"rows": [{"key": "penalty_apply_", "copy_share": share, "met": share >= 0.85}]},
            "persample": {
                "rows": [
                    {"key": "T=1 bf16", "ratio_sq": 1.0, "met": True},
                    {"key": "T=128 tf32", "ratio_sq": ratio_sq, "met": ratio_sq <= 1.5},
                ]
            },
            "fisher": {
                "summaries": [
                    {
                        "workload": "w",
                        "fisher_vs_plain": vs_plain,
                        "met_plain": vs_plain <= 1.3,
                        "speedup_vs_peer": speedup,
                        "fastest_exact_peer": "torch.func",
                        "met_peer": speedup >= 3,
                    }
                ]
            },
            "optim": {"status": "gap", "reason": "gap: not in this tree"},
        }
    }


def test_targets_verdicts():
    good = {t["target"]: t for t in report.targets(_data(1.2, 0.9, 1.1, 4.0))}
    bad = {t["target"]: t for t in report.targets(_data(1.7, 0.5, 2.0, 2.0))}
    assert len(good) == len(bad) == 5
    opt = report.TARGET_TEXT["optim"]
    assert good[opt]["verdict"] == bad[opt]["verdict"] == "not measured" and "gap" in good[opt]["value"]
    for k in good:
        if k != opt:
            assert (good[k]["verdict"], bad[k]["verdict"]) == ("met", "not met"), k
    assert "T=128 tf32" in bad[report.TARGET_TEXT["persample"]]["value"]
    empty = report.targets({"tables": {}})
    assert [t["verdict"] for t in empty] == ["not measured"] * 5


def test_expired_budget_cuts_every_row():
    from benchmarks.gpu import ceilings, kernels
    from benchmarks.gpu.sizes import DRY

    spent = Budget(0.0)
    assert spent.expired()
    rows, cut = ceilings.measure("cpu", DRY, spent)
    assert rows == [] and cut == ["copy", "bf16", "tf32", "fp32-ieee"]
    rows, cut = kernels.persample_rows("cpu", DRY, spent)
    assert rows == [] and len(cut) == 3 * len(DRY.ps_T)


def test_rotation_exceeds_twice_l2():
    l2 = 32 << 20  # the nominal CPU cache of benchmarks.gpu.timing
    assert rotation(l2, "cpu") == 2 and rotation(4 * l2, "cpu") == 1 and rotation(1, "cpu") == 8
    assert rotation(l2 // 3 + 1, "cpu") * (l2 // 3 + 1) >= 2 * l2


def test_fused_step_target_reads_the_fused_row():
    def data(ratio):
        rows = [
            {"key": "torch AdamW(fused=True).step()", "vs_adamw": 1.0},
            {"key": "fused_step_ AdamW+EWC+SI", "vs_adamw": ratio, "target": 1.8, "met": ratio <= 1.8},
        ]
        return {"tables": {"optim": {"status": "ok", "rows": rows}}}

    opt = report.TARGET_TEXT["optim"]
    for ratio, verdict in ((1.5, "met"), (2.5, "not met")):
        (row,) = [t for t in report.targets(data(ratio)) if t["target"] == opt]
        assert row["verdict"] == verdict and row["value"] == f"{ratio:.3g} x"
