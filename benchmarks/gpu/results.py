"""The one result file of a GPU check, ``OUT/results.json``, updated atomically after every row.

Layout::

    {"schema": 1, "dry_run": bool, "meta": {card, driver, versions, ceilings' inputs},
     "phases": {"build" | "tests" | "bench": {"status", "seconds", "budget_s", ...}},
     "tables": {name: {"status": "ok" | "cut" | "error" | "gap" | "running", "seconds", "rows": [...],
                       "cut": [rows it had no time for], "error": str, "reason": str}}}

Every writer (the shell script's phase records, the benchmark process after each row) reads the
file, changes its own part and replaces the file (temporary file + ``os.replace``), so a phase
that is killed at its time limit leaves everything measured before it readable.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

SCHEMA = 1


def path_of(out_dir) -> Path:
    return Path(out_dir) / "results.json"


def load(out_dir) -> dict:
    """The results so far (an empty skeleton when there are none)."""
    p = path_of(out_dir)
    if p.exists():
        with open(p) as f:
            data = json.load(f)
    else:
        data = {}
    data.setdefault("schema", SCHEMA)
    data.setdefault("dry_run", False)
    data.setdefault("meta", {})
    data.setdefault("phases", {})
    data.setdefault("tables", {})
    return data


def save(out_dir, data: dict) -> None:
    """Write ``data`` atomically."""
    p = path_of(out_dir)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".results.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=False, default=float)
            f.write("\n")
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the file is a report, readable like the others
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def update(out_dir, fn) -> dict:
    """``fn(data)`` on the loaded results, then save them; returns the data."""
    data = load(out_dir)
    fn(data)
    save(out_dir, data)
    return data


def set_table(out_dir, name: str, table: dict) -> None:
    def put(data):
        data["tables"][name] = table

    update(out_dir, put)


def set_phase(out_dir, name: str, phase: dict) -> None:
    def put(data):
        data["phases"][name] = {**data["phases"].get(name, {}), **phase}

    update(out_dir, put)
