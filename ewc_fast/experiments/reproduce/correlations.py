"""Part ``correlate`` of ``ewc-fast reproduce``: Kutalev's correlations of the weight importances.

One sequential run on permuted MNIST with the MAS penalty; after each task the per-layer Pearson and
Spearman correlations of the accumulated FIS, MAS, SI (Kutalev's variant) and SIG importances
(:func:`ewc_fast.experiments.correlate.run_correlate`). :func:`correlation_claims` checks the
paper's statements on the weight layers (Pearson): FIS–MAS > 0.8, MAS–SI > 0.8, FIS–SI > 0.75,
FIS–MAS² above FIS–MAS, each importance against SIG ≈ 0.6 on the input layer (taken as 0.45–0.75)
and negative on the output layer — over every stage and after the last task.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import plots
from ..continual import default_lam
from ..correlate import run_correlate, surfaces
from ..data import MNIST
from ..records import write_json
from .protocol import RESULTS_SUBDIR, ReproConfig, base_run_config, run_metadata

__all__ = ["CORR_CLAIMS_PAIRS", "run_correlate_part", "final_weight_correlations", "correlation_claims"]

#: the pairs of the rendered correlation table, in its row order
CORR_CLAIMS_PAIRS = ("FIS-MAS", "FIS-MAS²", "MAS-SI", "FIS-SI", "FIS-SIG", "MAS-SIG", "SI-SIG")


def run_correlate_part(data: MNIST, cfg: ReproConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """The correlation run (``cfg.corr_tasks`` × ``cfg.corr_epochs``, MAS λ of the table) →
    ``OUT/results/correlate.json`` (rows, claims, meta) and the Pearson surface plot."""
    t_start = time.perf_counter()
    lam = default_lam("mas")[0]
    rc = base_run_config(cfg, method="mas", lam=lam, epochs=cfg.corr_epochs)
    log(
        f"== correlate: {cfg.corr_tasks} tasks × {cfg.corr_epochs} epochs, MAS penalty λ={lam:g}, "
        f"SI variant {rc.si_variant}"
    )
    res = run_correlate(data, rc, n_tasks=cfg.corr_tasks, seed=cfg.seed, log=log)
    res["run"].pop("curve", None)
    res["lam"] = lam
    res["wall_s"] = time.perf_counter() - t_start
    res["meta"] = run_metadata(cfg, data, res["wall_s"], n_tasks=cfg.corr_tasks, epochs=cfg.corr_epochs)
    res["claims"] = correlation_claims(res)
    res_dir = out_dir / RESULTS_SUBDIR
    vals, layers = surfaces(res, "pearson")
    png = plots.correlation_surfaces(vals, layers, cfg.corr_tasks, res_dir / "correlation_pearson.png", kind="pearson")
    res["png"] = Path(png).name if png else None
    write_json(res_dir / "correlate.json", res)
    log(f"== correlate done in {res['wall_s'] / 60:.1f} min")
    return res


def final_weight_correlations(res: dict) -> dict:
    """{pair: {layer: pearson}} at the last stage, weight tensors only."""
    last = max(r["stage"] for r in res["rows"])
    out: dict = {}
    for r in res["rows"]:
        if r["stage"] == last and r["param"].endswith("weight"):
            out.setdefault(r["pair"], {})[r["param"]] = r["pearson"]
    return out


def correlation_claims(res: dict) -> list[dict]:
    """The correlation paper's statements, checked on the weight layers (Pearson) of this run, over every stage
    (``holds_all``) and at the last stage (``holds_last``)."""
    rows = [r for r in res["rows"] if r["param"].endswith("weight")]
    layers = list(dict.fromkeys(r["param"] for r in rows))
    stages = sorted({r["stage"] for r in rows})
    last = stages[-1]
    val = {(r["pair"], r["param"], r["stage"]): r["pearson"] for r in rows}

    def get(pair, layer, stage):
        v = val.get((pair, layer, stage))
        return float("nan") if v is None else v

    def short(layer):
        return layer.rsplit(".", 1)[0]

    claims = []
    for pair, thr in (("FIS-MAS", 0.8), ("MAS-SI", 0.8), ("FIS-SI", 0.75)):
        allv = [get(pair, L, st) for L in layers for st in stages]
        lastv = [get(pair, L, last) for L in layers]
        claims.append(
            {
                "claim": f"{pair} > {thr} on every weight layer",
                "observed_all": f"min {np.nanmin(allv):+.3f} (max {np.nanmax(allv):+.3f})",
                "observed_last": ", ".join(f"{short(L)} {v:+.3f}" for L, v in zip(layers, lastv)),
                "holds_all": bool(np.nanmin(allv) > thr),
                "holds_last": bool(np.nanmin(lastv) > thr),
            }
        )
    wins = [(L, st) for L in layers for st in stages if get("FIS-MAS²", L, st) > get("FIS-MAS", L, st)]
    last_cmp = [(get("FIS-MAS²", L, last), get("FIS-MAS", L, last)) for L in layers]
    claims.append(
        {
            "claim": "FIS–MAS² higher than FIS–MAS",
            "observed_all": f"higher in {len(wins)} of {len(layers) * len(stages)} (layer, stage) cells",
            "observed_last": ", ".join(f"{short(L)} {a:+.3f} vs {b:+.3f}" for L, (a, b) in zip(layers, last_cmp)),
            "holds_all": len(wins) == len(layers) * len(stages),
            "holds_last": all(a > b for a, b in last_cmp),
        }
    )
    for pair in ("FIS-SIG", "MAS-SIG", "SI-SIG"):
        first_l, out_l = layers[0], layers[-1]
        inp = [get(pair, first_l, st) for st in stages]
        out = [get(pair, out_l, st) for st in stages]
        claims.append(
            {
                "claim": f"{pair} ≈ 0.6 on the input layer (taken as 0.45–0.75)",
                "observed_all": f"{short(first_l)}: {inp[0]:+.3f} after task 1 … {inp[-1]:+.3f} after "
                f"task {last + 1} (range {min(inp):+.3f}…{max(inp):+.3f})",
                "observed_last": f"{inp[-1]:+.3f}",
                "holds_all": bool(all(0.45 <= v <= 0.75 for v in inp)),
                "holds_last": bool(0.45 <= inp[-1] <= 0.75),
            }
        )
        claims.append(
            {
                "claim": f"{pair} negative on the output layer",
                "observed_all": f"{short(out_l)}: {out[0]:+.3f} after task 1 … {out[-1]:+.3f} after "
                f"task {last + 1} (range {min(out):+.3f}…{max(out):+.3f})",
                "observed_last": f"{out[-1]:+.3f}",
                "holds_all": bool(all(v < 0 for v in out)),
                "holds_last": bool(out[-1] < 0),
            }
        )
    return claims
