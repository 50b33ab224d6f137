"""``ewc-fast bench`` finds the checkout's ``benchmarks`` package from any working directory."""

import subprocess
import sys


def test_bench_runs_outside_the_checkout(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ewc_fast", "bench", "compare", "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--merge" in out.stdout


def test_bench_unknown_name(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "ewc_fast", "bench", "no_such_benchmark"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "no benchmark 'no_such_benchmark'" in out.stderr + out.stdout
