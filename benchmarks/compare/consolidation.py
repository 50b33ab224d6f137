"""The consolidation section of the comparison report: penalty and SI rows at the run's size.

The rows are :mod:`benchmarks.bench_consolidation`'s (its functions, imported): the fused EWC penalty
+ gradient ``grad += lam * Omega * (theta - mu)`` (Kirkpatrick et al. 2017) per backend next to a
memory copy and a per-task autograd loop, and the per-step overhead of Synaptic Intelligence
(Zenke et al. 2017) -- ewc_fast's ``SynapticIntelligence``, Avalanche's bookkeeping reproduced and, where
``avalanche-lib`` imports (the Avalanche environment), the real Avalanche plugin's.
Overhead = median with SI / median without - 1.
"""

from __future__ import annotations

from ewc_fast.experiments.records import jsonable

from .. import bench_consolidation as bc

# size -> (penalty parameter counts, numbers of tasks, SI MLP shape)
SCALES = {
    "tiny": ([1e5], [1, 3], dict(width=64, depth=2, batch=16)),
    "small": ([1e6], [1, 10], dict(width=512, depth=2, batch=64)),
    "full": ([10e6, 100e6], [1, 10], dict(width=2048, depth=3, batch=128)),
}


class _Skipped(Exception):
    """A part that was not asked for."""


def _overhead_line(what: str, plain, with_si) -> str:
    return f"| {what} | {plain} | {with_si} | {100 * (with_si.median_s / plain.median_s - 1):+.1f}% |"


#: the parts of the section (``--consolidation-parts``); ``si-avalanche-lib`` runs where avalanche-lib imports
PARTS = ("penalty", "si", "si-avalanche", "si-avalanche-lib")


def run_consolidation(size: str, device: str, repeats: int, log=print, parts=PARTS) -> dict:
    """Penalty and SI rows (results, Markdown table lines, and what could not be measured) of ``parts``."""
    bad = set(parts) - set(PARTS)
    if bad:
        raise ValueError(f"unknown consolidation parts {sorted(bad)}; valid: {PARTS}")
    sizes, tasks, si = SCALES.get(size, SCALES["full"])
    out = {"penalty": [], "penalty_lines": [], "si": None, "si_lines": [], "errors": []}
    for s in sizes if "penalty" in parts else ():
        for k in tasks:
            try:
                res = bc.bench_penalty(int(s), k, repeats, device)
                out["penalty_lines"] += bc.format_penalty(res)
                out["penalty"].append(jsonable(res))
            except Exception as exc:
                out["errors"].append(f"penalty {s:.0e} params, {k} tasks: {type(exc).__name__}: {exc}")
    out["si_title"] = f"MLP 784-{si['width']}x{si['depth']}-10, Adam, batch {si['batch']}"
    try:
        if "si" not in parts:
            raise _Skipped
        res = bc.bench_si(si["width"], si["depth"], si["batch"], repeats, device)
        out["si"] = jsonable(res)
        out["si_title"] = (
            f"MLP 784-{si['width']}x{si['depth']}-10 ({res['params'] / 1e6:.2f}M params), Adam, batch {res['batch']}"
        )
        for a, b in (("step", "step+si"), ("train_step", "train_step+si")):
            out["si_lines"].append(_overhead_line(a.replace("_", " "), res[a], res[b]))
    except _Skipped:
        pass
    except Exception as exc:
        out["errors"].append(f"SI: {type(exc).__name__}: {exc}")
    try:
        if "si-avalanche" not in parts:
            raise _Skipped
        res = bc.bench_si_avalanche(si["width"], si["depth"], si["batch"], repeats, device)
        out["si_avalanche"] = jsonable(res)
        out["si_lines"].append(
            _overhead_line("train step, Avalanche-style SI (reproduced)", res["train_step"], res["train_step+si"])
        )
    except _Skipped:
        pass
    except Exception as exc:
        out["errors"].append(f"Avalanche-style SI: {type(exc).__name__}: {exc}")
    try:
        import avalanche  # noqa: F401  (only in the Avalanche environment: scripts/avalanche_env.sh)
    except Exception:
        avalanche = None
    if avalanche is not None and "si-avalanche-lib" in parts:
        try:
            res = bc.bench_si_avalanche_lib(si["width"], si["depth"], si["batch"], repeats, device)
            out["si_avalanche_lib"] = jsonable(res)
            where = "CPU: its snapshots are views, no copy" if device == "cpu" else "copies to the host"
            # its own line: a row-wise merge (--merge-rows) carries it into a report measured elsewhere
            out["si_avalanche_lib_line"] = _overhead_line(
                f"train step, Avalanche SI plugin (real, torch {res['torch']}; {where})",
                res["train_step"],
                res["train_step+si"],
            )
        except Exception as exc:
            out["errors"].append(f"Avalanche SI: {type(exc).__name__}: {exc}")
    out["errors"] = [e.splitlines()[0][:400] for e in out["errors"]]
    for e in out["errors"]:
        log(f"[bench] consolidation: {e}")
    return out
