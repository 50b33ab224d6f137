"""Part ``table`` of ``ewc-fast reproduce``: Kutalev & Lapina 2021's permuted-MNIST table, and the
variants of its rows run on request to explain a deviation.

:func:`run_table` runs every row of :data:`~.protocol.TABLE_ROWS` ``K`` times (seeds ``seed …
seed+K−1``, shared by all rows) and writes ``OUT/results/table.json`` after each row; runs already
in that file for the same protocol are kept, so ``--runs K+1`` adds one seed per row. ``K`` comes
from a measured calibration and the time budget (:func:`~.protocol.choose_runs`) unless
``--runs`` fixes it. The score of a run is the mean test accuracy over all tasks after the last.

:func:`run_investigations` runs the named :data:`INVESTIGATIONS` (or ``ROW+seeds``) and stores them
in the same file, under ``"investigations"``.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from ..continual import from_ewc_lam
from ..data import MNIST
from ..records import read_json, write_json
from .protocol import (
    RESULTS_SUBDIR,
    TABLE_ROWS,
    ReproConfig,
    base_run_config,
    calibrate,
    choose_runs,
    estimate_run_seconds,
    run_metadata,
    run_variant,
)

__all__ = ["run_table", "INVESTIGATIONS", "run_investigations"]


def _previous_runs(prev: dict | None, cfg: ReproConfig, data: MNIST) -> dict:
    """{row key: {seed: run}} from an earlier table.json of the same protocol (else empty)."""
    if not prev:
        return {}
    m = prev.get("meta", {})
    same = (
        prev.get("n_tasks") == cfg.tasks
        and prev.get("epochs") == cfg.epochs
        and m.get("data") == data.source
        and m.get("n_train") == int(data.x_train.shape[0])
        and m.get("n_test") == int(data.x_test.shape[0])
        and m.get("quick") == cfg.quick
        and prev.get("config", {}).get("backend") == cfg.backend
    )
    if not same:
        return {}
    return {key: {r["seed"]: r for r in row["runs"]} for key, row in prev.get("rows", {}).items()}


def run_table(data: MNIST, cfg: ReproConfig, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """The table. Runs already in ``out/results/table.json`` for the same protocol and seed are
    kept (not re-run), so ``--runs K+1`` after ``--runs K`` adds one seed per row."""
    t_start = time.perf_counter()
    path = out_dir / RESULTS_SUBDIR / "table.json"
    prev = read_json(path)
    reuse = _previous_runs(prev, cfg, data)
    log(
        "== table: calibration (1 task × 1 epoch, then 2 tasks × 1 epoch with the Fisher penalty; "
        "each twice, minimum kept)"
    )
    cal = calibrate(data, cfg)
    est = {row.key: estimate_run_seconds(cal, row.method, cfg.tasks, cfg.epochs) for row in TABLE_ROWS}
    K_auto = choose_runs(est.values(), cfg.budget_min * 60.0)
    K = cfg.runs if cfg.runs is not None else K_auto
    log(
        f"   epoch {cal['epoch_plain_s']:.2f} s (first epoch of the process "
        f"{cal['first_epoch_s']:.2f} s; penalised {cal['epoch_penalty_s']:.2f} s), importance "
        f"{cal['importance_s']:.2f} s, eval {cal['eval_task_s']:.3f} s/task → one run ≈ "
        f"{est['none']:.0f} s (none) / {est['fisher']:.0f} s (EWC); {len(TABLE_ROWS)} rows × K: "
        f"budget {cfg.budget_min:g} min gives K = {K_auto}; using K = {K}"
    )
    invocations = []
    if reuse:
        invocations = list(
            prev.get("invocations")
            or [
                {
                    # a table.json written before invocations were recorded: its one invocation
                    "command": prev["meta"]["command"],
                    "date": prev["meta"]["date"],
                    "calibration": prev["calibration"],
                    "estimate_run_s": prev["estimate_run_s"],
                    "runs_auto": prev["runs_auto"],
                    "runs": prev["runs"],
                    "new_runs": sum(len(r["runs"]) for r in prev["rows"].values()),
                    "wall_s": prev.get("wall_s"),
                }
            ]
        )
    invocation = {
        "command": cfg.command,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "calibration": cal,
        "estimate_run_s": est,
        "runs_auto": K_auto,
        "runs": K,
        "new_runs": 0,
    }
    invocations.append(invocation)
    out = {
        "calibration": cal,
        "estimate_run_s": est,
        "budget_min": cfg.budget_min,
        "runs_auto": K_auto,
        "runs": K,
        "n_tasks": cfg.tasks,
        "epochs": cfg.epochs,
        "config": base_run_config(cfg).to_dict(),
        "rows": {},
        "invocations": invocations,
    }
    if reuse and prev.get("investigations"):
        out["investigations"] = prev["investigations"]
        out["investigations_meta"] = prev.get("investigations_meta", {})
    for row in TABLE_ROWS:
        runs = []
        for k in range(K):
            seed = cfg.seed + k
            old = reuse.get(row.key, {}).get(seed)
            if old is not None:
                runs.append(old)
                log(
                    f"   {row.key:>12s} run {k + 1}/{K} (seed {seed}): kept from the previous "
                    f"table.json, final mean accuracy {old['final_mean_acc']:.4f}"
                )
                continue
            t0 = time.perf_counter()
            res, extra = run_variant(data, row, cfg, seed, log)  # the row as in the authors' code
            wall = time.perf_counter() - t0
            d = {**res.to_dict(), **extra}
            d.pop("curve", None)
            d["wall_s"] = wall
            d["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
            runs.append(d)
            invocation["new_runs"] += 1
            log(
                f"   {row.key:>12s} run {k + 1}/{K} (seed {seed}): final mean accuracy "
                f"{res.final_mean_acc:.4f}  ({wall:.0f} s)"
            )
        finals = np.array([r["final_mean_acc"] for r in runs])
        summary = {
            "mean": float(finals.mean()),
            "std": float(finals.std(ddof=1)) if len(finals) > 1 else None,
            "wall_s": float(sum(r["wall_s"] for r in runs)),
            "first_task_acc": float(np.mean([r["R"][0][0] for r in runs])),
        }
        if row.reference is not None:
            summary["diff_points"] = 100.0 * (summary["mean"] - row.reference)
            summary["within_1_point"] = bool(abs(summary["diff_points"]) <= 1.0)
        out["rows"][row.key] = {
            **dataclasses.asdict(row),
            "lam_ours": row.lam_ours,
            "lam_theirs_no_half": (from_ewc_lam(row.lam_ours) if row.method != "none" else 0.0),
            "summary": summary,
            "runs": runs,
        }
        invocation["wall_s"] = time.perf_counter() - t_start
        # compute of the table: every run kept in it plus every calibration
        out["wall_s"] = sum(r["summary"]["wall_s"] for r in out["rows"].values()) + sum(
            i["calibration"].get("calibration_wall_s", 0.0) for i in invocations
        )
        out["meta"] = run_metadata(cfg, data, out["wall_s"])
        write_json(path, out)  # after every row: a partial table survives an interruption
    log(
        f"== table done: this invocation {invocation['wall_s'] / 60:.1f} min, table compute "
        f"{out['wall_s'] / 60:.1f} min"
    )
    return out


# --------------------------------------------------------------------------------------------
# investigations: variants of a row, run on request
# --------------------------------------------------------------------------------------------
#: Variants run on request (``--investigate``) to explain a deviating row:
#: name → (table row it varies, RunConfig overrides, anchoring of Fisher/MAS, description).
#: ``ROW+seeds`` (any row key) re-runs that row unchanged on further seeds.
INVESTIGATIONS = {
    "fisher_separate": (
        "fisher",
        {},
        "separate",
        "Fisher λ=82, one anchor per task (`ewc-fast permuted-mnist`'s EWC mode)",
    ),
    "mas_separate": ("mas", {}, "separate", "MAS λ=9, one anchor per task (`ewc-fast permuted-mnist`'s EWC mode)"),
    "si_zenke": (
        "si",
        {"si_variant": "zenke"},
        "latest",
        "SI λ=0.5, Zenke's variant (task gradient only, clipped per Zenke)",
    ),
    "fisher_stab_x2": (
        "fisher_stab",
        {"lam": 170.0},
        "latest",
        "stabilised Fisher at λ=170 (85 doubled, the old default_lam)",
    ),
    "mas_stab_x2": ("mas_stab", {"lam": 17.0}, "latest", "stabilised MAS at λ=17 (8.5 doubled, the old default_lam)"),
    "si_stab_x2": ("si_stab", {"lam": 1.28}, "latest", "stabilised SI at λ=1.28 (0.64 doubled, the old default_lam)"),
    "si_stab_adam_carry": (
        "si_stab",
        {},
        "latest",
        "stabilised SI, Adam state carried from one run into the next as in their "
        "script (`model.reset()` leaves the optimizer alone); the chain's first "
        "run starts fresh",
        {"adam_carry": True},
    ),
    "si_adam_carry": (
        "si",
        {},
        "latest",
        "SI, Adam state carried from one run into the next as in their script; the chain's first run starts fresh",
        {"adam_carry": True},
    ),
    "fisher_adam_carry": (
        "fisher",
        {},
        "latest",
        "Fisher, Adam state carried from one run into the next as in their script; the chain's first run starts fresh",
        {"adam_carry": True},
    ),
    "mas_adam_carry": (
        "mas",
        {},
        "latest",
        "MAS, Adam state carried from one run into the next as in their script; the chain's first run starts fresh",
        {"adam_carry": True},
    ),
}


def run_investigations(
    data: MNIST,
    cfg: ReproConfig,
    names: Sequence[str],
    out_dir: Path,
    runs: int = 1,
    log: Callable[[str], None] = print,
) -> dict:
    """Run the named :data:`INVESTIGATIONS` (or ``ROW+seeds``) and store them in table.json."""
    path = out_dir / RESULTS_SUBDIR / "table.json"
    table = read_json(path)
    if table is None:
        raise FileNotFoundError(f"{path}: run the table first")
    rows = {r.key: r for r in TABLE_ROWS}
    inv = table.setdefault("investigations", {})
    for name in names:
        if name.endswith("+seeds"):
            key = name[: -len("+seeds")]
            if key not in rows:
                raise ValueError(f"unknown row {key!r} in {name!r}: {sorted(rows)}")
            row, overrides, anchor, opts = rows[key], {}, "latest", {}
            done = table["runs"] + len(inv.get(name, {}).get("per_run", []))
            seeds = [cfg.seed + done + k for k in range(runs)]
            note = f"{row.label}, unchanged, further seeds"
        else:
            if name not in INVESTIGATIONS:
                raise ValueError(f"unknown investigation {name!r}: {sorted(INVESTIGATIONS)} or ROW+seeds")
            spec = INVESTIGATIONS[name]
            key, overrides, anchor, note = spec[:4]
            opts = spec[4] if len(spec) > 4 else {}
            row = rows[key]
            done = len(inv.get(name, {}).get("per_run", []))
            seeds = [cfg.seed + done + k for k in range(runs)]
        entry = inv.get(name, {"row": key, "note": note, "per_run": [], "wall_s": 0.0, "commands": []})
        entry.setdefault("commands", []).append(cfg.command)
        carry = None
        for s in seeds:
            t0 = time.perf_counter()
            res, extra = run_variant(
                data,
                row,
                cfg,
                s,
                log,
                overrides=overrides,
                anchor=anchor,
                adam_state=carry,
                keep_adam=bool(opts.get("adam_carry")),
            )
            carry = extra.pop("_adam_state", None)
            wall = time.perf_counter() - t0
            entry["per_run"].append(
                {
                    "seed": s,
                    "final_mean_acc": res.final_mean_acc,
                    "R_last": res.R[-1],
                    "lam": res.lam,
                    "wall_s": wall,
                    **extra,
                }
            )
            entry["wall_s"] += wall
            log(f"   {name} (seed {s}): final mean accuracy {res.final_mean_acc:.4f} ({wall:.0f} s)")
        accs = np.array([r["final_mean_acc"] for r in entry["per_run"]])
        entry.update(runs=len(accs), mean=float(accs.mean()), std=float(accs.std(ddof=1)) if len(accs) > 1 else None)
        if name.endswith("+seeds"):
            base = [r["final_mean_acc"] for r in table["rows"][key]["runs"]]
            allv = np.array(base + accs.tolist())
            entry["all_runs_mean"] = float(allv.mean())
            entry["all_runs_std"] = float(allv.std(ddof=1)) if len(allv) > 1 else None
            entry["all_runs_n"] = int(len(allv))
        inv[name] = entry
        table["investigations_meta"] = {"command": cfg.command, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
        write_json(path, table)
    return inv
