"""Run records: JSON-safe values, atomic JSON/CSV writes and a description of the machine.

Shared by the experiment commands (:mod:`ewc_fast.cli`), the reproduction report
(:mod:`ewc_fast.experiments.reproduce`) and the benchmark driver (``benchmarks/``), so that every
result file is written the same way:

* :func:`jsonable` turns floats that are not finite into ``None`` (JSON has no NaN), numpy and
  0-dim torch values into Python numbers, arrays and tensors into lists, dataclasses into dicts.
* :func:`write_json` / :func:`write_csv` write to a temporary file in the target folder and rename
  it over the target: a crash mid-write never leaves a half file behind.
* :func:`machine_info` records what a number was measured on (CPU, threads, versions, git commit).
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["jsonable", "write_json", "read_json", "write_csv", "git_commit", "cpu_model", "machine_info"]


def jsonable(obj: Any) -> Any:
    """``obj`` with every value made JSON-safe (see the module docstring); other values pass unchanged."""
    if isinstance(obj, bool) or obj is None or isinstance(obj, (int, str)):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return jsonable(obj.item())
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, torch.Tensor):
        return jsonable(obj.item() if obj.dim() == 0 else obj.tolist())
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    return obj


@contextmanager
def _atomic(path: Path, newline: str | None = None):
    """An open text file whose content replaces ``path`` only when the block ends without error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline=newline) as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def write_json(path: str | Path, obj: Any) -> Path:
    """Write ``jsonable(obj)`` to ``path`` atomically (indent 1, no NaN); returns the path."""
    path = Path(path)
    with _atomic(path) as f:
        json.dump(jsonable(obj), f, indent=1, allow_nan=False)
    return path


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path``, or ``None`` if the file does not exist."""
    path = Path(path)
    if not path.exists():
        return None
    with open(path) as f:
        return json.load(f)


def write_csv(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write dict rows to ``path`` atomically (columns: every key in first-seen order; non-finite
    floats as empty cells); returns the path."""
    path = Path(path)
    rows = list(rows)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with _atomic(path, newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return path


def git_commit(where: str | Path | None = None) -> str:
    """Short commit of the checkout holding ``where`` (default: this package), with
    ``" + uncommitted changes"`` when tracked files differ; ``"unknown"`` outside a checkout."""
    here = Path(where) if where is not None else Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=10).stdout.strip()

    try:
        rev = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev + (" + uncommitted changes" if dirty else "")) if rev else "unknown"


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what :mod:`platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _dist_version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def machine_info(device: str | torch.device = "cpu", *, packages: Iterable[str] = ()) -> dict:
    """What a measurement ran on: date, host, CPU, cores, the CPU affinity and torch threads of this
    process, memory, Python / torch / numpy / Triton / ewc_fast versions, the git commit, the
    ``device`` and the ewc_fast backends available there (and the GPU's name on CUDA), plus the
    installed versions of the distributions named in ``packages`` (e.g. peer libraries)."""
    import ewc_fast

    device = torch.device(device)
    try:
        affinity = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    try:
        backends = list(ewc_fast.available_backends(device))
    except Exception:  # informational only
        backends = []
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # not installed or not importable here
        triton_version = "not installed"
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "affinity": affinity,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "memory_gib": _memory_gib(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "triton": triton_version,
        "ewc_fast": getattr(ewc_fast, "__version__", "?"),
        "git": git_commit(),
        "device": str(device),
        "backends": backends,
    }
    if device.type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(device)
    packages = list(packages)
    if packages:
        info["versions"] = {d: _dist_version(d) for d in packages}
    return info
