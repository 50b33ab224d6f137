"""Records a phase of scripts/gpu_check.sh in ``OUT/results.json``.

``python -m benchmarks.gpu.phases OUT NAME --rc RC --seconds S --budget S [--note TEXT] [--junit XML]``

Status from the exit code: 0 ``ok``, 124 / 137 ``cut`` (the phase ran past its budget and was
stopped: reported, not fatal), anything else ``failed (rc N)``; ``--rc skipped`` records a phase that
was not run (the note says why). With ``--junit`` (the tests phase) the pytest JUnit XML adds the
counts, the failing test ids and the skip reasons.
"""

from __future__ import annotations

import argparse
import sys
import xml.etree.ElementTree as ET
from collections import Counter

from . import results


def status_of(rc: str) -> str:
    if rc == "skipped":
        return "skipped"
    code = int(rc)
    if code == 0:
        return "ok"
    if code in (124, 137):
        return "cut"
    return f"failed (rc {code})"


def junit_summary(path: str) -> dict:
    """Counts, failing test ids and skip reasons of a pytest JUnit XML file (empty if unreadable)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return {}
    counts = Counter()
    failures, skips = [], Counter()
    for case in root.iter("testcase"):
        counts["tests"] += 1
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("failure") is not None:
            counts["failed"] += 1
            failures.append(name)
        elif case.find("error") is not None:
            counts["errors"] += 1
            failures.append(name + " (error)")
        elif (sk := case.find("skipped")) is not None:
            counts["skipped"] += 1
            skips[(sk.get("message") or "").strip()[:160]] += 1
        else:
            counts["passed"] += 1
    return {"counts": dict(counts), "failures": failures, "skip_reasons": dict(skips.most_common())}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu.phases", description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("name")
    ap.add_argument("--rc", required=True)
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--budget", type=float, default=None, help="the time limit the phase ran under (s)")
    ap.add_argument("--note", default="")
    ap.add_argument("--junit", default=None)
    ap.add_argument("--dry-run", action="store_true")
    a = ap.parse_args(argv)
    phase = {"status": status_of(a.rc), "seconds": a.seconds, "budget_s": a.budget, "note": a.note}
    if a.junit:
        phase.update(junit_summary(a.junit))
    results.set_phase(a.out, a.name, phase)
    if a.dry_run:
        results.update(a.out, lambda d: d.__setitem__("dry_run", True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
