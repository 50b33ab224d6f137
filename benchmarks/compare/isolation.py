"""One row per fresh interpreter, so that its peak memory is its own.

:func:`run_row_subprocess` writes the row's spec to a JSON file and runs
``python -m benchmarks.compare --child SPEC`` (:func:`child_main`), which measures the row with
:func:`~benchmarks.compare.measure.measure_row` and writes it back as JSON. A child that times out,
is killed or exits non-zero becomes a ``timeout`` / ``oom`` / ``error`` row. On CPU the child caps
its address space at ``spec["mem_limit_bytes"]``, so that an allocation failure becomes an OOM row
instead of the machine swapping.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import torch

from .measure import measure_row

REPO_ROOT = Path(__file__).resolve().parents[2]


def child_main(spec_path: str) -> int:
    """Entry of the measuring child: read the spec, measure the row, write it to ``spec["row_path"]``."""
    with open(spec_path) as f:
        spec = json.load(f)
    if spec.get("mem_limit_bytes") and torch.device(spec["device"]).type == "cpu":
        try:  # an allocation failure becomes an OOM row instead of the machine swapping
            lim = int(spec["mem_limit_bytes"])
            resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
        except (ValueError, OSError):
            pass
    row = measure_row(spec)
    with open(spec["row_path"], "w") as f:
        json.dump(row, f)
    return 0


def run_row_subprocess(spec: dict, timeout: float, workdir: str) -> dict:
    """Run :func:`~benchmarks.compare.measure.measure_row` in a fresh interpreter; failures of the
    child become rows."""
    tag = f"{spec['workload']}__{spec['contender']}__{spec['task']}".replace("/", "_").replace("+", "_")
    spec = dict(spec, row_path=os.path.join(workdir, tag + ".row.json"))
    spec_path = os.path.join(workdir, tag + ".spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    base = {k: spec[k] for k in ("workload", "size", "contender", "task", "device")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "benchmarks.compare", "--child", spec_path],
            cwd=str(REPO_ROOT),
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return dict(base, status="timeout", message=f"no result within {timeout:.0f} s", notes=[])
    if proc.returncode != 0 or not os.path.exists(spec["row_path"]):
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
        status = "oom" if proc.returncode in (-9, 137) else "error"
        msg = f"child exited with {proc.returncode}" + (" (killed: out of memory?)" if status == "oom" else "")
        return dict(base, status=status, message=f"{msg}: {tail[0][:300]}", notes=[])
    with open(spec["row_path"]) as f:
        return json.load(f)
