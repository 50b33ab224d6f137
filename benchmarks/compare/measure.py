"""Measurement of one (workload, contender, task) row in this process: time, memory, result.

* time: median of ``repeats`` runs after one warm-up, with min-max spread (CUDA events on CUDA);
* the same for one plain forward+backward over the same data on a fresh copy of the model, the runs
  interleaved with the contender's (noise on a shared machine hits both alike); ``ratio_to_plain`` =
  contender median / plain median is the headline number;
* peak extra memory over a baseline taken after model + data creation and one warm-up call
  (:class:`PeakMemory`: peak RSS on CPU, ``torch.cuda.max_memory_allocated`` on CUDA), also in units
  of one copy of the parameters (``param_copies``). Meaningful only in a fresh process
  (:mod:`.isolation` runs each row in one);
* the result tensors, saved to ``spec["result_path"]`` for the error check against the oracle.

Failures (unsupported layer, OOM, exception) are rows too, with ``status`` and ``message``.
"""

from __future__ import annotations

import dataclasses
import gc
import resource
import time
import traceback
import warnings
from pathlib import Path

import torch

from .._timing import summarize
from ..contenders import FISHER, FISHER_EXACT, MAS, Unsupported, get_contender, plain_fwd_bwd_fn
from ..workloads import get_workload, param_bytes

TASKS = ("fisher", "fisher+mas", "fisher_exact")
TASK_METHODS = {"fisher": (FISHER,), "fisher+mas": (FISHER, MAS), "fisher_exact": (FISHER_EXACT,), "plain": ()}


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
    return dataclasses.asdict(summarize(times))


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
    row.update(contender.row_extras())
    run = plain = None
    if measure_memory:
        gc.collect()
    if row.get("peak_extra_bytes") is not None and row.get("param_bytes"):
        row["param_copies"] = row["peak_extra_bytes"] / row["param_bytes"]
    return row
