"""Correlation of the weight importances (Kutalev's study): how alike are FIS, MAS, SI and SIG?

Protocol (as in the paper): train the FC net sequentially on permuted-MNIST tasks with an EWC
penalty fed by MAS importances (Kutalev's best). An SI tracker runs along the whole time (Kutalev's
variant by default: total gradient incl. the penalty, ε = 0.1, no clip). After each task the FIS,
MAS and SIG importances are estimated on the last ``n_importance`` training samples of the task
and *accumulated* (summed over the tasks so far); SI is the tracker's accumulated Ω. Then, for each
parameter tensor ("layer"), the Pearson and Spearman correlations of every pair of importances,
and of FIS vs MAS², are recorded.

``batched_fisher=True`` adds FISB, the square of the batch-mean gradient averaged over batches of
``importance_batch`` samples (``fisher_batched``), with the pairs FISB–MAS and FISB–MAS²: the
paper's explanation of FIS–MAS² > FIS–MAS approximates FIS by the square of a gradient *summed over
the samples* (its eq. 2), which is this batched form rather than the per-sample empirical Fisher.
:func:`summarize_seeds` combines runs of several seeds (mean, min, max per pair, layer and stage).

Output rows: ``stage`` (tasks learned − 1), ``param``, ``pair``, ``pearson``, ``spearman``.
A constant vector has no correlation: NaN (e.g. an all-zero SI tensor).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import torch
from numpy.typing import ArrayLike

from ..consolidation import SynapticIntelligence
from .continual import RunConfig, run_sequence
from .data import MNIST
from .tasks import build_tasks
from .training import estimate

__all__ = [
    "rankdata",
    "pearson",
    "spearman",
    "correlation_table",
    "run_correlate",
    "summarize_seeds",
    "IMPORTANCE_NAMES",
    "PAIRS",
    "BATCHED_PAIRS",
]

IMPORTANCE_NAMES = ("FIS", "MAS", "SI", "SIG")
PAIRS = tuple(itertools.combinations(IMPORTANCE_NAMES, 2)) + (("FIS", "MAS²"),)
#: pairs of the batched Fisher (``batched_fisher=True``)
BATCHED_PAIRS = (("FISB", "MAS"), ("FISB", "MAS²"), ("FISB", "FIS"))


def rankdata(a: ArrayLike) -> np.ndarray:
    """Ranks 1..n of a 1-D array, ties get the average rank (as ``scipy.stats.rankdata``)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    order = np.argsort(a, kind="mergesort")
    sa = a[order]
    # runs of equal values in the sorted array share the mean of their 1-based ranks
    bounds = np.flatnonzero(np.concatenate(([True], sa[1:] != sa[:-1], [True])))
    starts, counts = bounds[:-1], np.diff(bounds)
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.repeat(starts + (counts + 1) / 2.0, counts)
    return ranks


def pearson(a: ArrayLike, b: ArrayLike) -> float:
    """Pearson correlation in float64; NaN if either vector is constant or empty."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"pearson: sizes differ ({a.size} vs {b.size})")
    if a.size < 2:
        return float("nan")
    da, db = a - a.mean(), b - b.mean()
    den = np.sqrt(np.dot(da, da) * np.dot(db, db))
    if not np.isfinite(den) or den == 0:
        return float("nan")
    return float(np.clip(np.dot(da, db) / den, -1.0, 1.0))


def spearman(a: ArrayLike, b: ArrayLike) -> float:
    """Spearman rank correlation (Pearson of average ranks)."""
    return pearson(rankdata(a), rankdata(b))


def _as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().to("cpu", torch.float64).numpy().ravel()


def correlation_table(importances: dict, *, stage: int = 0, names: Sequence[str] | None = None) -> list[dict]:
    """Rows ``{stage, param, pair, pearson, spearman}`` for every pair of :data:`PAIRS` present.

    ``importances[label]`` maps parameter name → tensor (an ``Importance`` or a dict).
    """
    labels = set(importances)
    params = names or list(next(iter(importances.values())).keys())
    rows = []
    for pname in params:
        for a, b in PAIRS + BATCHED_PAIRS:
            if b == "MAS²":
                if not {a, "MAS"} <= labels:
                    continue
                va = _as_np(importances[a][pname])
                vb = _as_np(importances["MAS"][pname]) ** 2
            else:
                if not {a, b} <= labels:
                    continue
                va, vb = _as_np(importances[a][pname]), _as_np(importances[b][pname])
            rows.append(
                {
                    "stage": stage,
                    "param": pname,
                    "pair": f"{a}-{b}",
                    "pearson": pearson(va, vb),
                    "spearman": spearman(va, vb),
                }
            )
    return rows


def _add(acc: dict | None, imp) -> dict:
    new = {k: v.detach().to(torch.float64).clone() for k, v in imp.items()}
    if acc is None:
        return new
    for k in acc:
        acc[k] += new[k]
    return acc


def run_correlate(
    data: MNIST,
    cfg: RunConfig,
    *,
    n_tasks: int = 10,
    seed: int = 0,
    first_identity: bool = True,
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    batched_fisher: bool = False,
) -> dict:
    """Sequential training with ``cfg.method`` (MAS) penalty; correlations after each task."""
    tasks = build_tasks("permuted", n_tasks, seed, first_identity=first_identity, n_pixels=data.n_features)
    est = (("FIS", "fisher"), ("MAS", "mas"), ("SIG", "sig")) + (
        (("FISB", "fisher_batched"),) if batched_fisher else ()
    )
    state: dict = {"acc": {label: None for label, _ in est}, "rows": [], "si": None}

    def setup(model, optimizer):
        state["si"] = SynapticIntelligence(model, xi=cfg.si_xi, variant=cfg.si_variant)
        state["si"].attach(optimizer)

    def on_task_end(stage, model, x_imp, y_imp, strategy):
        imps = estimate(model, x_imp, y_imp, tuple(key for _, key in est), cfg)
        for label, key in est:
            state["acc"][label] = _add(state["acc"][label], imps[key])
        state["si"].consolidate()
        si_imp = state["si"].cumulative  # running Ω over the tasks so far
        current = dict(state["acc"])
        current["SI"] = {k: v.detach().to(torch.float64) for k, v in si_imp.items()}
        rows = correlation_table(current, stage=stage)
        state["rows"].extend(rows)
        if log is not None:
            weights = [r for r in rows if r["param"].endswith("weight")]
            summary = {}
            for r in weights:
                summary.setdefault(r["pair"], []).append(r["pearson"])
            log(
                f"  after task {stage + 1}: Pearson per weight layer  "
                + "  ".join(
                    f"{p} " + "/".join("nan" if np.isnan(v) else f"{v:+.2f}" for v in vals)
                    for p, vals in summary.items()
                )
            )

    result = run_sequence(
        data, tasks, cfg, seed=seed, progress=progress, on_task_end=on_task_end, setup=setup, log=None
    )
    params = list(dict.fromkeys(r["param"] for r in state["rows"]))
    return {
        "rows": state["rows"],
        "params": params,
        "pairs": [f"{a}-{b}" for a, b in PAIRS + (BATCHED_PAIRS if batched_fisher else ())],
        "run": result.to_dict(),
        "config": cfg.to_dict(),
        "n_tasks": n_tasks,
        "seed": seed,
    }


def summarize_seeds(results: Sequence[dict]) -> dict:
    """Several :func:`run_correlate` results (seeds) → ``{"rows": [{stage, param, pair, pearson,
    pearson_min, pearson_max, spearman, …, n_seeds}], "params", "pairs", "n_tasks", "seeds"}``; the
    mean rows have the layout :func:`surfaces` reads."""
    groups: dict = {}
    for res in results:
        for r in res["rows"]:
            groups.setdefault((r["stage"], r["param"], r["pair"]), []).append(r)
    rows = []
    for (stage, param, pair), rs in groups.items():
        row = {"stage": stage, "param": param, "pair": pair, "n_seeds": len(rs)}
        for kind in ("pearson", "spearman"):
            v = np.array([r[kind] for r in rs], dtype=float)
            ok = v[np.isfinite(v)]
            row[kind] = float(ok.mean()) if ok.size else float("nan")
            row[f"{kind}_min"] = float(ok.min()) if ok.size else float("nan")
            row[f"{kind}_max"] = float(ok.max()) if ok.size else float("nan")
        rows.append(row)
    first = results[0]
    return {
        "rows": rows,
        "params": first["params"],
        "pairs": first["pairs"],
        "n_tasks": first["n_tasks"],
        "seeds": [r["seed"] for r in results],
    }


def surfaces(out: dict, kind: str = "pearson", *, weights_only: bool = True) -> tuple[dict, list[str]]:
    """``{pair: array (n_tasks, n_layers)}`` and the layer labels, for plotting."""
    params = [p for p in out["params"] if (p.endswith("weight") or not weights_only)]
    T = out["n_tasks"]
    idx = {p: i for i, p in enumerate(params)}
    vals = {pair: np.full((T, len(params)), np.nan) for pair in out["pairs"]}
    for r in out["rows"]:
        if r["param"] in idx and r["pair"] in vals:
            vals[r["pair"]][r["stage"], idx[r["param"]]] = r[kind]
    return vals, [p.rsplit(".", 1)[0] if weights_only else p for p in params]
