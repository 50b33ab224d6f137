"""Side-by-side benchmark: ewc_fast vs the reference implementations and the peer libraries.

For every workload (``benchmarks/workloads.py``) x contender (``benchmarks/contenders.py``) x task
(``fisher``, ``fisher+mas``) one row is measured in its OWN subprocess, so that peak memory is clean:

* time: median of ``--repeats`` runs after one warm-up, with min-max spread (CUDA events on CUDA);
* the same for one plain forward+backward over the same data, measured in the same subprocess on a
  fresh copy of the model; the ratio is the headline number;
* peak extra memory over the baseline taken after model + data creation: peak RSS on CPU (the
  process's RSS high-water mark, reset at the baseline through ``/proc/self/clear_refs`` where the
  kernel allows it, else the ``getrusage`` ``ru_maxrss`` delta), ``torch.cuda.max_memory_allocated``
  on CUDA; also in units of one copy of the parameters;
* relative error ``||result - oracle|| / ||oracle||`` over all parameters against the float64 oracle
  (empirical Fisher, MAS, or -- for nngeometry's FIM -- the exact Fisher). Approximate methods are
  labelled; failures (unsupported layer, OOM, exception, time-out) are rows too.

Then the targets are checked (met / not met) and the consolidation benchmark
(``benchmarks/bench_consolidation.py``: penalty and SI rows) is appended. Writes markdown to
``--out`` and JSON to ``--json``.

Run: ``python -m benchmarks.compare [--size tiny|full] [--workloads ...] [--contenders ...]
[--repeats N] [--device cpu|cuda] [--out benchmarks/RESULTS.md] [--json benchmarks/RESULTS.json]``.
Programmatic: :func:`main` (argv list) or :func:`run_suite`.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

import torch

from .contenders import (
    FISHER,
    FISHER_EXACT,
    MAS,
    PlainFwdBwd,
    Unsupported,
    all_contenders,
    get_contender,
    mem_budget_bytes,
    oracle_importance,
    oracle_source,
    plain_fwd_bwd_fn,
    relative_error,
)
from .workloads import SIZES, WORKLOADS, get_workload, param_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent
TASKS = ("fisher", "fisher+mas", "fisher_exact")
TASK_METHODS = {"fisher": (FISHER,), "fisher+mas": (FISHER, MAS), "fisher_exact": (FISHER_EXACT,), "plain": ()}
DEFAULT_OUT = "benchmarks/RESULTS.md"

# Targets of the issue; evaluated by evaluate_targets().
TARGETS_DOC = """\
* MLP: Fisher <= 1.2x and Fisher+MAS <= 1.7x one plain forward+backward; Fisher no slower than BackPACK.
* Transformer: Fisher <= 2x plain; >= 3x faster than the fastest peer that gives the exact answer;
  extra peak memory <= 2 parameter copies (beyond what the plain forward+backward row needs: activations
  and one gradient copy are the unit's, not the method's).
* CNN: Fisher >= 3x faster than BackPACK and than Opacus."""


# ---------------------------------------------------------------------------------- measurement
def _status_kb() -> dict[str, int]:
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":", 1)
                    out[k] = int(v.split()[0])
    except OSError:
        pass
    return out


def _malloc_trim() -> None:
    """Return freed heap pages to the OS (glibc), so that RSS tracks live memory."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except Exception:  # not glibc
        pass


def _can_reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return "VmHWM" in _status_kb()
    except OSError:
        return False


class PeakMemory:
    """Peak extra memory of the code run between :meth:`start` and :meth:`stop` (bytes).

    CUDA: ``max_memory_allocated`` over ``memory_allocated`` at the start. CPU: the RSS high-water
    mark (VmHWM), reset to the current RSS at the start through ``/proc/self/clear_refs``, minus the
    RSS at the start; where the reset is not allowed, the ``ru_maxrss`` delta (``resettable`` is
    then False, and the caller must start before anything that could raise the high-water mark).
    """

    def __init__(self, device):
        self.device = torch.device(device)
        self.resettable = self.device.type == "cuda" or _can_reset_hwm()
        if self.device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated - allocated at baseline"
        elif self.resettable:
            self.method = "peak RSS (VmHWM, reset at the baseline) - RSS at the baseline"
        else:
            self.method = "getrusage ru_maxrss delta"

    def start(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return
        _malloc_trim()
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _status_kb()["VmRSS"] * 1024
        else:
            self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return max(0, torch.cuda.max_memory_allocated(self.device) - self.base)
        if self.resettable:
            return max(0, _status_kb()["VmHWM"] * 1024 - self.base)
        return max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - self.base)


def _timed(fn, device):
    """One call of ``fn``; returns (seconds, result). CUDA: CUDA events around the call."""
    dev = torch.device(device)
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        start.record()
        res = fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3, res
    t0 = time.perf_counter()
    res = fn()
    return time.perf_counter() - t0, res


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": len(times)}


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    if torch.cuda.is_available() and isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    msg = str(exc).lower()
    return "out of memory" in msg or "can't allocate memory" in msg or "cannot allocate memory" in msg


def measure_row(spec: dict) -> dict:
    """Measure one (workload, contender, task) row in THIS process; returns the row dict.

    ``spec``: workload, size, contender, task, device, repeats, warmup, max_time, result_path
    (where the result tensors are saved for the error check; may be None), threads,
    measure_memory (default True; meaningful only in a fresh process).
    """
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if spec.get("threads"):
                torch.set_num_threads(int(spec["threads"]))
            return _measure_row(spec)
    finally:
        torch.set_num_threads(threads)


def _measure_row(spec: dict) -> dict:
    device = spec["device"]
    row = {k: spec[k] for k in ("workload", "size", "contender", "task", "device")}
    row.update(status="ok", message="", notes=[])
    try:
        contender = get_contender(spec["contender"], device)
        why = contender.why_unavailable(device)  # also imports the peer before the baseline
        if why:
            row.update(status="unavailable", message=why)
            return row
        methods = TASK_METHODS[spec["task"]]
        missing = [m for m in methods if m not in contender.methods]
        if missing:
            row.update(status="unsupported", message=f"{contender.name} has no {'/'.join(missing)}")
            return row
        wl = get_workload(spec["workload"], spec["size"])
        model = wl.make_model(device)
        batches = wl.make_batches(device)
        row["n_params"] = sum(p.numel() for p in model.parameters())
        row["param_bytes"] = param_bytes(model)
    except Exception as exc:  # pragma: no cover - set-up failures are reported, not raised
        row.update(status="error", message=f"set-up: {type(exc).__name__}: {exc}")
        return row

    # Order: [baseline if the high-water mark cannot be reset] -> prepare -> warm-up (result kept for
    # the error check) -> [baseline] -> one run measured for memory -> timed runs interleaved with
    # plain forward+backward runs on a fresh model (noise on a shared machine hits both alike).
    measure_memory = spec.get("measure_memory", True)
    mem = PeakMemory(device) if measure_memory else None
    if mem is not None:
        row["memory_method"] = mem.method
    if mem is not None and not mem.resettable:
        mem.start()
        row["notes"].append("memory includes one-time costs of the first call")
    repeats = int(spec.get("repeats", 5))
    quick = repeats <= 0  # correctness-only mode: the first call is the only timing, no warm-up
    if quick:
        row["notes"].append("repeats=0: first call timed, no warm-up (correctness run)")
    try:
        run = contender.prepare(wl, model, batches, device, methods)
        t_warm, result = _timed(run, device)
        if spec.get("result_path"):
            torch.save(
                {m: {k: v.detach().to("cpu") for k, v in d.items()} for m, d in result.items()}, spec["result_path"]
            )
        del result
        max_time = spec.get("max_time")
        if not quick and max_time and t_warm * repeats > max_time:
            new = max(1, int(max_time // max(t_warm, 1e-9)))
            if new < repeats:
                row["notes"].append(f"{new} repeat(s) instead of {repeats} (time cap)")
                repeats = new
        if quick:
            times = [t_warm]
            mem = None
            row.pop("memory_method", None)
        else:
            if mem is not None and mem.resettable:
                mem.start()
            t_mem, _ = _timed(run, device)
            if mem is not None:
                row["peak_extra_bytes"] = mem.stop()
            times = [t_mem]
        plain, plain_times = None, []
        if spec["contender"] != "plain":
            plain_model = wl.make_model(device)
            plain = plain_fwd_bwd_fn(wl, plain_model, batches)
            for _ in range(0 if quick else int(spec.get("warmup", 1))):
                plain()
        for i in range(max(1, repeats)):
            if i > 0:
                times.append(_timed(run, device)[0])
            if plain is not None:
                plain_times.append(_timed(plain, device)[0])
        row["time"] = _summary(times)
        row["warmup_s"] = t_warm
        if plain_times:
            row["plain"] = _summary(plain_times)
            row["ratio_to_plain"] = row["time"]["median_s"] / row["plain"]["median_s"]
        elif spec["contender"] == "plain":
            row["plain"] = row["time"]
            row["ratio_to_plain"] = 1.0
    except Unsupported as exc:
        row.update(status="unsupported", message=str(exc))
    except Exception as exc:
        kind = "oom" if _is_oom(exc) else "error"
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" [{Path(tb[-1].filename).name}:{tb[-1].lineno}]" if tb else ""
        text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
        row.update(status=kind, message=f"{type(exc).__name__}: {text}{where}")
        row.pop("peak_extra_bytes", None)
    row["notes"] += contender.notes()
    run = plain = None
    if measure_memory:
        gc.collect()
    if row.get("peak_extra_bytes") is not None and row.get("param_bytes"):
        row["param_copies"] = row["peak_extra_bytes"] / row["param_bytes"]
    return row


def _child_main(spec_path: str) -> int:
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
    """Run :func:`measure_row` in a fresh interpreter; failures of the child become rows."""
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


# ------------------------------------------------------------------------------------ the suite
def _mem_total() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover
        return 0


def machine_info(device) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "host": platform.node(),
        "platform": platform.platform(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(_mem_total() / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": str(device),
    }
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    versions = {}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("opacus", "backpack-for-pytorch", "nngeometry", "asdfghjkl"):
        try:
            versions[dist] = version(dist)
        except PackageNotFoundError:
            versions[dist] = "not installed"
    try:
        import ewc_fast

        versions["ewc_fast"] = ewc_fast.__version__
        versions["ewc_fast backends"] = ", ".join(ewc_fast.available_backends(device))
    except Exception:  # pragma: no cover
        pass
    try:
        import triton

        versions["triton"] = triton.__version__
    except Exception:
        pass
    info["versions"] = versions
    return info


def _select_contenders(names, device):
    allc = all_contenders(device)
    if not names:
        return allc
    out = []
    for n in names:
        out.append(get_contender(n, device))
    return out


def run_suite(
    size: str = "tiny",
    workloads=None,
    contenders=None,
    tasks=TASKS,
    *,
    repeats: int = 5,
    warmup: int = 1,
    device: str = "cpu",
    isolate: bool = True,
    timeout: float | None = None,
    max_time: float | None = None,
    threads: int | None = None,
    consolidation: bool = True,
    mem_limit_bytes: int | None = None,
    log=print,
    checkpoint=None,
) -> dict:
    """Measure every row, check errors against the oracle and the targets; returns the report dict.

    ``isolate=False`` measures in this process (faster; the memory column is then not reported).
    ``checkpoint(report)`` is called after each workload with the report so far (``partial: True``),
    so that a long run stopped midway keeps its finished workloads.
    """
    device = str(device)
    wl_names = list(workloads) if workloads else list(WORKLOADS)
    cons = _select_contenders(contenders, device)
    timeout = timeout or {"tiny": 300.0, "small": 900.0}.get(size, 1800.0)
    if max_time is None:
        max_time = {"tiny": 30.0, "small": 120.0}.get(size, 300.0)
    if mem_limit_bytes is None and torch.device(device).type == "cpu" and _mem_total():
        mem_limit_bytes = int(0.8 * _mem_total())
    report = {
        "meta": machine_info(device),
        "oracle": oracle_source(),
        "size": size,
        "repeats": repeats,
        "isolate": isolate,
        "mem_budget_bytes": mem_budget_bytes(device),
        "workloads": {},
        "rows": [],
        "targets": [],
    }
    if threads:
        report["meta"]["torch_threads"] = threads
    tmp = tempfile.mkdtemp(prefix="ewc_fast_bench_")
    for wname in wl_names:
        wl = get_workload(wname, size)
        report["workloads"][wname] = {
            "title": wl.title,
            "description": wl.describe(),
            "kind": wl.kind,
            "n_params": wl.n_params(),
            "n_samples": wl.n_samples,
            "batch_size": wl.batch_size,
        }
        log(f"[bench] {wname}: {wl.describe()}")
        plan = [(PlainFwdBwd(), "plain")]
        for c in cons:
            for t in tasks:
                if all(m in c.methods for m in TASK_METHODS[t]):
                    plan.append((c, t))
        wrows = []
        for c, t in plan:
            spec = {
                "workload": wname,
                "size": size,
                "contender": c.name,
                "task": t,
                "device": device,
                "repeats": repeats,
                "warmup": warmup,
                "max_time": max_time,
                "threads": threads,
                "mem_limit_bytes": mem_limit_bytes,
                "result_path": os.path.join(tmp, f"{wname}__{c.name}__{t}.pt".replace("+", "_")),
            }
            t0 = time.perf_counter()
            if isolate:
                row = run_row_subprocess(spec, timeout, tmp)
            else:
                row = measure_row(dict(spec, measure_memory=False))
            row["label"] = c.label
            row["kind"] = c.kind
            q = {m: c.quantity(wl, m) for m in TASK_METHODS[t]}
            row["quantities"] = {m: {"oracle": v.oracle, "exact": v.exact, "note": v.note} for m, v in q.items()}
            row["exact"] = all(v.exact for v in q.values()) if q else None
            row["tolerance"] = c.tolerance_for(device)
            row["wall_s"] = time.perf_counter() - t0
            if row["status"] == "ok" and q and os.path.exists(spec["result_path"]):
                row["_result_path"] = spec["result_path"]
            wrows.append(row)
            log("[bench]   " + _one_line(row))
        _check_errors(wl, wrows, device, log)
        plain_peak = next((r.get("peak_extra_bytes") for r in wrows if r["contender"] == "plain"), None)
        for r in wrows:
            if r.get("peak_extra_bytes") is not None and plain_peak is not None and r.get("param_bytes"):
                r["copies_over_plain"] = (r["peak_extra_bytes"] - plain_peak) / r["param_bytes"]
        report["rows"] += wrows
        if checkpoint is not None:
            checkpoint(
                dict(
                    report,
                    partial=True,
                    rows=[{k: v for k, v in r.items() if k != "_result_path"} for r in report["rows"]],
                )
            )
    report["targets"] = evaluate_targets(report)
    if consolidation:
        report["consolidation"] = run_consolidation(size, device, repeats, log)
    for r in report["rows"]:
        r.pop("_result_path", None)
    return report


def _check_errors(wl, rows, device, log):
    needed = sorted({q["oracle"] for r in rows if r.get("_result_path") for q in r["quantities"].values()})
    if not needed:
        return
    t0 = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            oracle = oracle_importance(wl, needed, device=device)
    except Exception as exc:  # pragma: no cover
        for r in rows:
            r.setdefault("notes", []).append(f"oracle failed: {type(exc).__name__}: {exc}")
        return
    log(f"[bench]   oracle (float64, torch.func) {', '.join(needed)}: {time.perf_counter() - t0:.1f} s")
    for r in rows:
        path = r.get("_result_path")
        if not path:
            continue
        res = torch.load(path)
        r["rel_error"] = {}
        for m, q in r["quantities"].items():
            err, missing = relative_error(res.get(m, {}), oracle[q["oracle"]])
            r["rel_error"][m] = err
            if missing:
                r["notes"].append(f"{m}: {len(missing)} parameter(s) missing from the result, e.g. {missing[0]}")
        r["within_tolerance"] = all(e <= r["tolerance"] for e in r["rel_error"].values())
        if r["exact"] and not r["within_tolerance"]:
            r["notes"].append("MISMATCH: exact method outside its tolerance")
        os.remove(path)


# --------------------------------------------------------------------------------------- targets
def _ok(rows, contender=None, task="fisher", pred=None):
    out = [
        r
        for r in rows
        if r["status"] == "ok"
        and r["task"] == task
        and "time" in r
        and (contender is None or r["contender"] == contender)
        and (pred is None or pred(r))
    ]
    return out


def _best_ewc(rows, task):
    cands = _ok(rows, task=task, pred=lambda r: r["kind"] == "ewc_fast")
    return min(cands, key=lambda r: r["time"]["median_s"]) if cands else None


def evaluate_targets(report) -> list[dict]:
    out = []

    def add(workload, target, value, met, detail=""):
        out.append(
            {
                "workload": workload,
                "target": target,
                "value": value,
                "status": "n/a" if met is None else ("met" if met else "not met"),
                "detail": detail,
            }
        )

    by_wl = {}
    for r in report["rows"]:
        by_wl.setdefault(r["workload"], []).append(r)
    for wname, rows in by_wl.items():
        kind = report["workloads"][wname]["kind"]
        ef = _best_ewc(rows, "fisher")
        efm = _best_ewc(rows, "fisher+mas")
        na = "ewc_fast did not produce a result"
        if kind == "mlp":
            add(
                wname,
                "Fisher <= 1.2x plain fwd+bwd",
                ef and f"{ef['ratio_to_plain']:.2f}x",
                ef and ef.get("ratio_to_plain", 9e9) <= 1.2,
                ef["contender"] if ef else na,
            )
            add(
                wname,
                "Fisher+MAS <= 1.7x plain fwd+bwd",
                efm and f"{efm['ratio_to_plain']:.2f}x",
                efm and efm.get("ratio_to_plain", 9e9) <= 1.7,
                efm["contender"] if efm else na,
            )
            bp = _ok(rows, "backpack")
            if ef and bp:
                add(
                    wname,
                    "Fisher no slower than BackPACK",
                    f"{bp[0]['time']['median_s'] / ef['time']['median_s']:.2f}x faster",
                    ef["time"]["median_s"] <= bp[0]["time"]["median_s"],
                    ef["contender"],
                )
            else:
                add(wname, "Fisher no slower than BackPACK", None, None, na if not ef else "BackPACK gave no result")
        elif kind == "transformer":
            add(
                wname,
                "Fisher <= 2x plain fwd+bwd",
                ef and f"{ef['ratio_to_plain']:.2f}x",
                ef and ef.get("ratio_to_plain", 9e9) <= 2.0,
                ef["contender"] if ef else na,
            )
            peers = _ok(
                rows,
                pred=lambda r: (
                    r["kind"] != "ewc_fast"
                    and r.get("exact")
                    and r["quantities"].get(FISHER, {}).get("oracle") == FISHER
                    and r.get("within_tolerance", True)
                ),
            )
            if ef and peers:
                fastest = min(peers, key=lambda r: r["time"]["median_s"])
                sp = fastest["time"]["median_s"] / ef["time"]["median_s"]
                add(
                    wname,
                    ">= 3x faster than the fastest exact peer",
                    f"{sp:.2f}x vs {fastest['contender']}",
                    sp >= 3.0,
                    ef["contender"],
                )
            else:
                add(
                    wname,
                    ">= 3x faster than the fastest exact peer",
                    None,
                    None,
                    na if not ef else "no exact peer gave a result",
                )
            tgt = "extra peak memory beyond plain fwd+bwd <= 2 parameter copies"
            if ef and ef.get("copies_over_plain") is not None:
                add(
                    wname,
                    tgt,
                    f"{ef['copies_over_plain']:.2f} copies ({ef['param_copies']:.2f} in all)",
                    ef["copies_over_plain"] <= 2.0,
                    ef["contender"],
                )
            else:
                add(wname, tgt, None, None, na if not ef else "memory not measured (in-process run)")
        elif kind == "cnn":
            for peer in ("backpack", "opacus"):
                pr = _ok(rows, peer)
                if ef and pr:
                    sp = pr[0]["time"]["median_s"] / ef["time"]["median_s"]
                    add(wname, f">= 3x faster than {peer}", f"{sp:.2f}x", sp >= 3.0, ef["contender"])
                else:
                    add(wname, f">= 3x faster than {peer}", None, None, na if not ef else f"{peer} gave no result")
    return out


# --------------------------------------------------------------------------------- consolidation
def run_consolidation(size: str, device: str, repeats: int, log=print) -> dict:
    """Penalty and SI rows from ``benchmarks/bench_consolidation.py`` (its functions, imported)."""
    from . import bench_consolidation as bc

    if size == "tiny":
        sizes, tasks, si = [1e5], [1, 3], dict(width=64, depth=2, batch=16)
    elif size == "small":
        sizes, tasks, si = [1e6], [1, 10], dict(width=512, depth=2, batch=64)
    else:
        sizes, tasks, si = [10e6, 100e6], [1, 10], dict(width=2048, depth=3, batch=128)
    out = {"penalty": [], "penalty_lines": [], "si": None, "si_lines": [], "errors": []}
    for s in sizes:
        for k in tasks:
            try:
                res = bc.bench_penalty(int(s), k, repeats, device)
                out["penalty_lines"] += bc.format_penalty(res)
                out["penalty"].append(_jsonable(res))
            except Exception as exc:
                out["errors"].append(f"penalty {s:.0e} params, {k} tasks: {type(exc).__name__}: {exc}")
    out["si_title"] = f"MLP 784-{si['width']}x{si['depth']}-10, Adam, batch {si['batch']}"
    try:
        res = bc.bench_si(si["width"], si["depth"], si["batch"], repeats, device)
        out["si"] = _jsonable(res)
        out["si_title"] = (
            f"MLP 784-{si['width']}x{si['depth']}-10 ({res['params'] / 1e6:.2f}M params), Adam, batch {res['batch']}"
        )
        for a, b in (("step", "step+si"), ("train_step", "train_step+si")):
            ov = res[b].median_s / res[a].median_s - 1
            out["si_lines"].append(f"| {a.replace('_', ' ')} | {res[a]} | {res[b]} | {100 * ov:+.1f}% |")
    except Exception as exc:
        out["errors"].append(f"SI: {type(exc).__name__}: {exc}")
    try:
        res = bench_si_avalanche(si["width"], si["depth"], si["batch"], repeats, device)
        out["si_avalanche"] = _jsonable(res)
        ov = res["train_step+si"].median_s / res["train_step"].median_s - 1
        out["si_lines"].append(
            f"| train step, Avalanche-style SI (reproduced) | {res['train_step']} | "
            f"{res['train_step+si']} | {100 * ov:+.1f}% |"
        )
    except Exception as exc:
        out["errors"].append(f"Avalanche-style SI: {type(exc).__name__}: {exc}")
    out["errors"] = [e.splitlines()[0][:400] for e in out["errors"]]
    for e in out["errors"]:
        log(f"[bench] consolidation: {e}")
    return out


def bench_si_avalanche(width: int, depth: int, batch: int, repeats: int, device: str) -> dict:
    """Avalanche's SynapticIntelligencePlugin per-step bookkeeping, reproduced as a baseline.

    Same model / optimizer as ``bench_consolidation.bench_si``. Per training iteration, as the plugin
    does: before it, copy every parameter (flattened) into a CPU buffer (old theta); after it, copy
    parameters (new theta) and gradients into CPU buffers and add ``g * (new - old)`` to the
    trajectory, one parameter at a time. (The plugin's per-step penalty term is not included.)
    """
    from ._timing import measure
    from .bench_consolidation import si_workload

    model, x, y, opt, loss_fn = si_workload(width, depth, batch, device)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    buf = {
        k: {n: torch.zeros(p.numel(), dtype=p.dtype) for n, p in named} for k in ("old", "new", "grad", "trajectory")
    }

    def train_step():
        opt.zero_grad(set_to_none=False)
        loss_fn(model(x), y).backward()
        opt.step()

    @torch.no_grad()
    def copy_into(target, grads=False):
        for n, p in named:
            src = p.grad if grads else p
            target[n][...] = src.detach().cpu().flatten()

    def train_step_si():
        copy_into(buf["old"])
        train_step()
        with torch.no_grad():
            copy_into(buf["new"])
            copy_into(buf["grad"], grads=True)
            for n, _ in named:
                buf["trajectory"][n] += buf["grad"][n] * (buf["new"][n] - buf["old"][n])

    train_step()
    return {
        "params": sum(p.numel() for _, p in named),
        "batch": batch,
        "train_step": measure(train_step, repeats=repeats, device=device),
        "train_step+si": measure(train_step_si, repeats=repeats, device=device),
    }


def _jsonable(o):
    if isinstance(o, dict):
        return {k: _jsonable(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [_jsonable(v) for v in o]
    if hasattr(o, "__dict__"):
        return _jsonable(vars(o))
    return o


# ---------------------------------------------------------------------------------------- report
def _fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def _fmt_time(t: dict | None) -> str:
    if not t:
        return "-"
    return f"{_fmt_s(t['median_s'])} [{_fmt_s(t['min_s'])}-{_fmt_s(t['max_s'])}]"


def _fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit, f in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= f:
            return f"{b / f:.1f} {unit}"
    return f"{b} B"


def _what(r) -> str:
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


def _one_line(r) -> str:
    s = f"{r['contender']:<18} {r['task']:<10} {r['status']:<11}"
    if r["status"] == "ok":
        s += f" {_fmt_time(r.get('time'))}"
        if r.get("ratio_to_plain") is not None:
            s += f"  {r['ratio_to_plain']:.2f}x plain"
        if r.get("peak_extra_bytes") is not None:
            s += f"  +{_fmt_bytes(r['peak_extra_bytes'])}"
    else:
        s += f" {r.get('message', '')[:160]}"
    return s


_ERR_TAG = {FISHER: "F", MAS: "MAS", FISHER_EXACT: "F_exact"}


def format_markdown(report: dict) -> str:
    m = report["meta"]
    L = [f"# ewc_fast comparison benchmark ({report['size']})", ""]
    if report["size"] == "tiny":
        L += [
            "> size `tiny`: a smoke run. Models have a few thousand parameters, so times are dominated by "
            "per-call overheads and say nothing about the targets; only the error column is meaningful.",
            "",
        ]
    L.append(f"* date: {m['date']}; machine: {m['host']} ({m['platform']})")
    L.append(
        f"* CPU: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; torch threads {m['torch_threads']}"
        + (f"; GPU: {m['gpu']}" if m.get("gpu") else "")
    )
    L.append(f"* device: {m['device']}; Python {m['python']}, torch {m['torch']}")
    L.append("* libraries: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()))
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
        f"* per-sample-gradient memory budget of materialising contenders: {_fmt_bytes(report['mem_budget_bytes'])}"
    )
    if m.get("command"):
        L.append(f"* command: `{m['command']}`")
    for run in report.get("runs", []):
        L.append(
            f"* merged from `{run['source']}` ({run['date']}): {', '.join(run['workloads']) or '-'}"
            + ("; consolidation" if run["consolidation"] else "")
            + ("; a partial run (stopped midway: the workloads listed finished)" if run.get("partial") else "")
            + (f"; command `{run['command']}`" if run.get("command") else "")
        )
    L.append("")
    L.append("## Targets")
    L.append("")
    L.append(TARGETS_DOC)
    L.append("")
    L.append("| workload | target | value | status | ewc_fast row / reason |")
    L.append("|---|---|---|---|---|")
    for t in report["targets"]:
        L.append(f"| {t['workload']} | {t['target']} | {t['value'] or '-'} | {t['status']} | {t['detail']} |")
    for wname, w in report["workloads"].items():
        L += ["", f"## {wname}", "", w["description"], ""]
        L.append(
            "| contender | task | computes | time median [min-max] | x plain | peak extra mem | copies "
            "| copies over plain | rel. error vs oracle | status / notes |"
        )
        L.append("|---|---|---|---|---|---|---|---|---|---|")
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
            err = ", ".join(f"{_ERR_TAG[m]} {v:.1e}" for m, v in r.get("rel_error", {}).items()) or "-"
            L.append(
                f"| {name} | {task} | {_what(r)} | {_fmt_time(r.get('time'))} | {ratio} | "
                f"{_fmt_bytes(r.get('peak_extra_bytes'))} | {copies} | {over} | {err} | {status} |"
            )
    if report["rows"]:
        L += ["", "Contenders:", ""]
        seen = {}
        for r in report["rows"]:
            seen.setdefault(r["contender"], r["label"])
        for k, v in seen.items():
            L.append(f"* `{k}`: {v}")
    cons = report.get("consolidation")
    if cons:
        L += ["", "## Consolidation ops (benchmarks/bench_consolidation.py)", ""]
        if cons["penalty_lines"]:
            L.append("| params | tasks | contender | median [min-max] | GB/s | of copy BW | vs per-task loop |")
            L.append("|---|---|---|---|---|---|---|")
            L += cons["penalty_lines"]
        if cons.get("si_lines"):
            L += [
                "",
                f"SI overhead, {cons['si_title']}",
                "",
                "| measured | plain | with SI | overhead |",
                "|---|---|---|---|",
            ]
            L += cons["si_lines"]
        for e in cons["errors"]:
            L.append(f"\n* not measured: {e}")
    if report.get("notes_md"):
        L += ["", "## Analysis", "", report["notes_md"].strip()]
    return "\n".join(L) + "\n"


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    return str(o)


# ------------------------------------------------------------------------------------------- CLI
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.compare", description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=SIZES, default="full")
    ap.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=None)
    ap.add_argument(
        "--contenders",
        nargs="+",
        default=None,
        help="contender names (default: all): " + ", ".join(c.name for c in all_contenders("cpu")),
    )
    ap.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    ap.add_argument("--repeats", type=int, default=5, help="timed repeats per row (0: correctness run)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch threads in each measuring process")
    ap.add_argument("--out", default=None, help=f"markdown report (default: <repo>/{DEFAULT_OUT})")
    ap.add_argument("--json", default=None, help="JSON results (default: --out with .json)")
    ap.add_argument("--timeout", type=float, default=None, help="seconds per row (subprocess)")
    ap.add_argument("--max-time", type=float, default=None, help="cap on the timed repeats of one row (s)")
    ap.add_argument("--in-process", action="store_true", help="no subprocess per row (memory not measured)")
    ap.add_argument("--no-consolidation", action="store_true", help="skip the penalty / SI section")
    ap.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="measure nothing: combine the JSON reports of earlier runs (a later file's workloads "
        "replace an earlier one's; consolidation from the last that has it), re-check targets "
        "and write --out / --json",
    )
    ap.add_argument(
        "--notes",
        default=None,
        metavar="MD",
        help="markdown file appended to the report as its 'Analysis' section (why a target is or is not met)",
    )
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return ap


def merge_reports(reports: list[dict], sources: list[str] | None = None) -> dict:
    """One report from several runs' JSON reports: workloads and their rows in first-seen order, a later
    report's rows replacing an earlier one's for the same workload; targets re-evaluated."""
    if not reports:
        raise ValueError("merge_reports: no reports")
    sizes = {r["size"] for r in reports}
    if len(sizes) > 1:
        raise ValueError(f"merge_reports: reports of different sizes {sorted(sizes)}")
    devices = {r["meta"]["device"] for r in reports}
    if len(devices) > 1:
        raise ValueError(f"merge_reports: reports from different devices {sorted(devices)}")
    out = {k: v for k, v in reports[0].items() if k not in ("rows", "workloads", "targets", "consolidation")}
    out["meta"] = {k: v for k, v in reports[0]["meta"].items() if k != "command"}  # each run's is in "runs"
    out["meta"]["date"] = "merged " + _dt.datetime.now().isoformat(timespec="seconds")
    out["workloads"], out["rows"] = {}, []
    rows_by_wl: dict[str, list] = {}
    for r in reports:
        for wname, w in r["workloads"].items():
            out["workloads"][wname] = w
            rows_by_wl[wname] = [row for row in r["rows"] if row["workload"] == wname]
        if r.get("consolidation"):
            out["consolidation"] = r["consolidation"]
    for wname in out["workloads"]:
        out["rows"] += rows_by_wl[wname]
    out["repeats"] = min(r["repeats"] for r in reports)
    out["isolate"] = all(r["isolate"] for r in reports)
    out["runs"] = [
        {
            "source": (sources[i] if sources else f"report {i}"),
            "date": r["meta"].get("date"),
            "command": r["meta"].get("command"),
            "workloads": list(r["workloads"]),
            "consolidation": bool(r.get("consolidation")),
            "partial": bool(r.get("partial")),
        }
        for i, r in enumerate(reports)
    ]
    out["targets"] = evaluate_targets(out)
    return out


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.child:
        return _child_main(args.child)
    out = Path(args.out) if args.out else REPO_ROOT / DEFAULT_OUT
    out.parent.mkdir(parents=True, exist_ok=True)
    jpath = Path(args.json) if args.json else out.with_suffix(".json")
    jpath.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.compare " + " ".join(sys.argv[1:] if argv is None else argv)
    if args.merge:
        reports = [json.loads(Path(p).read_text()) for p in args.merge]
        for p, r in zip(args.merge, reports):
            if r.get("partial"):
                print(f"[bench] note: {p} is a partial run (stopped midway); its finished workloads are merged")
        report = merge_reports(reports, list(args.merge))
    else:

        def checkpoint(rep):
            rep["meta"] = dict(rep["meta"], command=command)
            jpath.write_text(json.dumps(rep, indent=1, default=_json_default))

        report = run_suite(
            args.size,
            args.workloads,
            args.contenders,
            tuple(args.tasks),
            repeats=args.repeats,
            device=args.device,
            isolate=not args.in_process,
            timeout=args.timeout,
            max_time=args.max_time,
            threads=args.threads,
            consolidation=not args.no_consolidation,
            checkpoint=checkpoint,
        )
        report["meta"]["command"] = command
    if args.notes:
        report["notes_md"] = Path(args.notes).read_text()
    jpath.write_text(json.dumps(report, indent=1, default=_json_default))  # first: never lose the data
    out.write_text(format_markdown(report))
    print(f"[bench] wrote {out} and {jpath}")
    for t in report["targets"]:
        print(f"[bench] target {t['workload']}: {t['target']}: {t['status']} ({t['value'] or t['detail']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
