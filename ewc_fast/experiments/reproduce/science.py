"""RESULTS.md sections for the experiments run by their own commands (``ewc-fast prune``,
``estimators``, ``explosion``, ``permuted-mnist``, ``overlap``), rendered from their JSON files.

Each command's output folder is copied under ``OUT/results/<name>/`` (:data:`SCIENCE_DIRS`); a
missing folder leaves its section out. Every number in these sections is read from those files;
the reference values come from the papers, as stored by the experiment modules
(:data:`ewc_fast.experiments.estimators.REFERENCE`, :data:`PRUNE_REFERENCE`, :data:`LAYER_REFERENCE`).
``notes.json`` may add free text after a section under the folder's name.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from .. import plots
from ..continual import mean_curve, merge_experiments
from ..correlate import surfaces
from ..prune import value_at
from ..records import read_json
from .pruning import PRUNE_REFERENCE

__all__ = [
    "SCIENCE_DIRS",
    "ANCHORING_MODES",
    "LAYER_REFERENCE",
    "CONV_REFERENCE",
    "render_science",
    "table_figures",
    "correlate_figures",
]

#: section → (folder under results/, JSON file name)
SCIENCE_DIRS = {
    "prune_layer_weights": ("prune_layer/weights-only", "prune.json"),
    "prune_layer_entries": ("prune_layer/all-entries", "prune.json"),
    "estimators": ("estimators", "estimators.json"),
    "explosion": ("explosion", "explosion.json"),
    "conv": ("conv", "permuted_mnist.json"),
    "overlap": ("overlap", "overlap.json"),
    "correlate_seeds": ("correlate_seeds", "correlations.json"),
}

#: the anchoring experiment (section 8): mode → folder under ``results/anchoring/``; each holds one
#: ``permuted_mnist.json`` or one per seed in ``seed<k>/`` (merged by :func:`_read_runs`)
ANCHORING_MODES = {
    "none": "no penalty",
    "all": "penalty for all previous tasks",
    "previous": "penalty for the previous task only",
}

#: Kutalev & Lapina 2021's conv-net rows (stabilised EWC, 10 permuted-MNIST tasks): method → (λ, accuracy)
CONV_REFERENCE = {"fisher": (675.0, 0.585), "mas": (300.0, 0.601), "si": (24.0, 0.507)}

#: accuracy at 90 % pruned *by layer* (Kutalev & Lapina 2021, 10 runs)
LAYER_REFERENCE = {"|w|": 0.677, "SIG": 0.625}


def _f(x, nd=3):
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{x:.{nd}f}"


def _minutes(s: float | None) -> str:
    if s is None:
        return "—"
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _meta_lines(res: dict) -> list[str]:
    m = res.get("meta")
    if not m:
        w = res.get("wall_s")
        return [f"- wall time {_minutes(w)} (command line and machine not recorded in this file)"] if w else []
    mach = m["machine"]
    load = m.get("load_avg")
    shared = ""
    if load:
        shared = f"; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min)"
        if load[2] > mach["cpu_count"]:
            shared += " — the machine was **shared** (more runnable jobs than CPUs): times are upper bounds"
    # the output folder of the run is not shown: its files are the ones next to this report
    command = re.sub(r"\s--out\s+\S+", "", m["command"])
    return [
        f"- command: `{command}` — finished {m['date']}, wall time {_minutes(m['wall_s'])}",
        f"- machine: {mach['cpu']}, {mach['cpu_count']} logical CPUs, torch threads {mach['torch_threads']}, "
        f"ewc_fast git {mach['git']}{shared}",
    ]


def _band90(fractions, c) -> tuple[float, float, float]:
    if "acc_min" not in c or "acc_max" not in c:
        raise ValueError(
            "prune.json has no min–max band (written by an older `ewc-fast prune`): rerun the command to render it"
        )
    return (
        value_at(fractions, c["acc"], 0.9),
        value_at(fractions, c["acc_min"], 0.9),
        value_at(fractions, c["acc_max"], 0.9),
    )


def _render_prune_layer(w: dict | None, e: dict | None, rel: str) -> list[str]:
    res = w or e
    L = [f"## 4. Pruning by layer and globally, {res['runs']} runs, min–max bands", ""]
    L += _meta_lines(res)
    L += [
        f"- protocol: one task (unpermuted MNIST), FC 784-300-150-10, Adam 1e-3, {res['config']['epochs']} "
        f"epochs; importances on the last {res['config']['n_importance']} training samples; pruned entries set to "
        f"0, no fine-tuning; **{res['runs']} runs** (seeds {res['seed']}…{res['seed'] + res['runs'] - 1}); "
        "*global* ranks every entry of the network together, *layer* prunes the same fraction inside each layer.",
        "- *weights only*: biases kept (Kutalev's script); *all entries*: biases pruned too (the `prune` default).",
        "",
        "Accuracy at 90 % pruned: mean over runs and [min, max].",
        "",
    ]
    protos = [(n, r) for n, r in (("weights only", w), ("all entries", e)) if r]
    head = "| importance | theirs, global | theirs, by layer |"
    sep = "|---|---|---|"
    for n, _ in protos:
        head += f" {n}, global | {n}, by layer |"
        sep += "---|---|"
    L += [head, sep]
    labels = list(next(iter(res["results"].values()))["curves"])
    for lab in labels:
        row = f"| {lab.replace('|', chr(92) + '|')} | {_f(PRUNE_REFERENCE.get(lab))} | {_f(LAYER_REFERENCE.get(lab))} |"
        for _, r in protos:
            for scope in ("global", "layer"):
                key = f"{scope}/weight/mean"
                if key not in r["results"] or lab not in r["results"][key]["curves"]:
                    row += " — |"  # this protocol was run without this scope or importance
                    continue
                m, lo, hi = _band90(r["fractions"], r["results"][key]["curves"][lab])
                row += f" {m:.3f} [{lo:.3f}, {hi:.3f}] |"
        L.append(row)
    L += [""]
    for n, r in protos:
        slug = "weights-only" if n == "weights only" else "all-entries"
        for scope in ("global", "layer"):
            if f"{scope}/weight/mean" in r["results"]:
                L.append(f"![{n}, {scope}]({rel}/prune_layer/{slug}/prune_{scope}_weight_mean.png)")
    L += [
        "",
        "Curves: mean with the min–max band over the runs; the dotted line marks 90 %. Per-run curves: "
        f"`{rel}/prune_layer/*/prune.json` (`acc_runs`).",
        "",
    ]
    return L


def _render_estimators(r: dict, rel: str) -> list[str]:
    c = r["config"]
    L = ["## 5. Which Fisher for EWC: van de Ven 2025 (arXiv 2502.11756)", ""]
    L += _meta_lines(r)
    L += [
        f"- protocol: Split MNIST, {c['n_tasks']} tasks, task-incremental (a 2-unit head per task), MLP "
        f"784-400-400-10 ReLU, Adam lr {c['lr']:g}, batch {c['batch_size']}, **{c['iterations']} iterations per "
        "task** (theirs: 2000), online EWC (Fisher summed, anchored at the latest optimum), Fisher on every "
        f"training sample of the task (BATCHED: b = {c['importance_batch']}); λ grid "
        f"{', '.join(f'{v:g}' for v in c['lams'])} with {c['grid_runs']} seed(s), then {c['runs']} seeds at "
        "each estimator's best λ (chosen on the test accuracy; theirs on validation data, 30 seeds).",
        "",
        "| estimator | best λ | ours: accuracy % (mean [min, max]) | theirs % | ours: estimator s/task (median) "
        "| ratio to BATCHED | ours: extra train time over none (s/run) | theirs: extra s (GPU) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    ref = r["reference"]
    for name, v in r["estimators"].items():
        s = v["summary"]
        L.append(
            f"| {name} (`{v['method']}`) | {v['best_lam']:g} | {100 * s['acc_mean']:.2f} "
            f"[{100 * s['acc_min']:.2f}, {100 * s['acc_max']:.2f}] | {ref[name]['acc']:.2f} | "
            f"{s['importance_time_median_s']:.3f} | {_f(s.get('time_vs_batched'), 2)} | "
            f"{s['extra_time_s']:+.1f} | +{ref[name]['extra_s']:.0f} |"
        )
    s = r["none"]["summary"]
    L.append(
        f"| none | — | {100 * s['acc_mean']:.2f} [{100 * s['acc_min']:.2f}, {100 * s['acc_max']:.2f}] | "
        f"{ref['none']['acc']:.2f} | — | — | 0 | 0 |"
    )
    L += ["", "λ grid (accuracy %, grid seed(s)):", ""]
    lams = list(next(iter(r["estimators"].values()))["grid"])
    L += ["| estimator | " + " | ".join(f"λ={k}" for k in lams) + " |", "|---|" + "---|" * len(lams)]
    for name, v in r["estimators"].items():
        L.append(f"| {name} | " + " | ".join(f"{100 * v['grid'][k]['summary']['acc_mean']:.2f}" for k in lams) + " |")
    L += ["", f"![estimators]({rel}/estimators/estimators.png)", ""]
    return L


def _render_explosion(r: dict, rel: str) -> list[str]:
    c = r["config"]
    L = ["## 6. The EWC step explosion under plain SGD: Kutalev & Lapina 2021 (arXiv 2109.10021)", ""]
    L += _meta_lines(r)
    L += [
        f"- protocol: task A (MNIST, {c['epochs_a']} epoch of plain SGD, α = {c['lr']:g}, batch "
        f"{c['batch_size']}), {c['importance']} importance on {c['n_importance']} samples; from that state, "
        f"task B (a pixel permutation) for {c['steps']} plain-SGD steps with the EWC penalty at "
        f"α·λ·max Ω ∈ {{{', '.join(f'{v:g}' for v in c['values'])}}}: *plain*, *clip* (total gradient clipped "
        f"to norm {c['clip_norm']:g}), *stabilized* (Ω/(1 + αλΩ)). Diverged = non-finite loss/parameters or "
        f"penalty > {c['blowup']:g}. One seed (the outcome is a threshold, not a noisy mean).",
        "- prediction (the linear analysis): plain diverges once α·λ·max Ω > 2; clip and stabilized never do.",
        "",
        "| model | parameters | max Ω | variant | diverges from α·λ·max Ω | stable up to | final acc A / B at the "
        "largest stable value | at the largest value of the grid |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, m in r["models"].items():
        for variant, t in m["thresholds"].items():
            rs = {x["value"]: x for x in m["runs"] if x["variant"] == variant}
            st = rs.get(t["last_stable"]) if t["last_stable"] is not None else None
            big = rs.get(max(rs))
            big_s = (
                f"diverged at step {big['diverged_at']}"
                if big["diverged"]
                else f"{_f(big['final_acc_A'])} / {_f(big['final_acc_B'])}"
            )
            L.append(
                f"| {name} | {m['n_params']} | {m['max_omega']:.4g} | {variant} | {t['first_diverged'] or 'never'} | "
                f"{t['last_stable'] if t['last_stable'] is not None else '—'} | "
                f"{_f(st['final_acc_A']) if st else '—'} / {_f(st['final_acc_B']) if st else '—'} | {big_s} |"
            )
        L.append(f"| {name} | | | before task B | | | {_f(m['acc_A_before'])} / {_f(m['acc_B_before'])} | |")
    L += ["", f"![explosion]({rel}/explosion/explosion.png)", ""]
    return L


def _render_permuted(
    r: dict, title: str, rel: str, folder: str, reference: dict | None = None, figures: bool = True
) -> list[str]:
    """A ``permuted-mnist`` result: protocol, one row per method at its best λ (mean [min, max] over
    the runs; *learned* = mean of R[i][i], the accuracy on each task right after training it);
    ``reference``: method → (their λ, their accuracy), a column."""
    c = r["config"]
    L = [title, ""] if title else []
    L += _meta_lines(r)
    L += [
        f"- protocol: {r['n_tasks']} {r['task_kind']} tasks, model `{c['model']}`, {c['optimizer']} lr {c['lr']:g}"
        + (f" momentum {c['momentum']:g}" if c["optimizer"] == "sgd" else "")
        + f", {c['epochs']} epoch(s)/task, batch {c['batch_size']}, {r['n_train']} training images "
        f"({_steps(r)} steps per task), anchoring `{c['anchor']}`, stabilised: {c['stabilize']}; {r['runs']} run(s).",
        "",
        "| method | λ (ours) | final mean accuracy | ± std | BWT | learned (mean R[i][i]) |"
        + (" theirs: λ → accuracy |" if reference else ""),
        "|---|---|---|---|---|---|" + ("---|" if reference else ""),
    ]
    for m, v in r["methods"].items():
        for key, entry in v["lams"].items():
            if len(v["lams"]) > 1 or key == f"{v['best_lam']:g}":
                L.append(_permuted_row(m, entry, reference))
    if figures:
        L += [
            "",
            f"![accuracy matrices]({rel}/{folder}/accuracy_matrices.png)",
            f"![per-task curves]({rel}/{folder}/task_curves.png)",
        ]
    return L + [""]


def _render_conv_scans(scans: list[dict]) -> list[str]:
    """Smaller runs and λ scans of the conv net (every ``results/conv/scan/*/permuted_mnist.json``),
    one table: a row per run size × anchoring × model × method × λ, sorted."""
    L = [
        "### Smaller runs and λ scans of the conv net",
        "",
        "Every row: one `permuted-mnist` output under `results/conv/scan/` (command and wall time in its `meta`).",
        "",
        "| steps per task | tasks | anchoring | model | method | λ (ours) | final mean accuracy | BWT "
        "| learned (mean R[i][i]) | runs | theirs: λ → accuracy |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for r in scans:
        c = r["config"]
        for m, v in r["methods"].items():
            for entry in v["lams"].values():
                s = entry["summary"]
                R = np.asarray(s["R_mean"], dtype=float)
                ref = CONV_REFERENCE.get(m)
                rows.append(
                    (
                        (_steps(r), r["n_tasks"], c["anchor"], c["model"], m != "none", m, entry["lam"]),
                        f"| {_steps(r)} | {r['n_tasks']} | `{c['anchor']}` | `{c['model']}` | {m} | {entry['lam']:g} | "
                        f"{s['final_mean_acc']:.4f}{_range(entry.get('runs'), 'final_mean_acc')} | {s['bwt']:+.4f} | "
                        f"{float(np.mean(np.diag(R))):.3f} | {s['n_runs']} | "
                        + (f"{ref[0]:g} → {ref[1]:.3f} |" if ref else "— |"),
                    )
                )
    L += [row for _, row in sorted(rows, key=lambda x: x[0])]
    return L + [""]


def _steps(r: dict) -> int:
    c = r["config"]
    if c.get("steps_per_task"):
        return int(c["steps_per_task"])
    return int(math.ceil(r["n_train"] / c["batch_size"])) * int(c["epochs"])


def _permuted_row(m: str, entry: dict, reference: dict | None) -> str:
    s = entry["summary"]
    R = np.asarray(s["R_mean"], dtype=float) if "R_mean" in s else None
    learned = f"{float(np.mean(np.diag(R))):.3f}" if R is not None else "—"
    row = (
        f"| {m} | {entry['lam']:g} | {s['final_mean_acc']:.4f}{_range(entry.get('runs'), 'final_mean_acc')} | "
        f"{s['final_mean_acc_std']:.4f} | {s['bwt']:+.4f} | {learned} |"
    )
    if reference is not None:
        ref = reference.get(m)
        row += f" {ref[0]:g} → {ref[1]:.3f} |" if ref else " — |"
    return row


def _range(runs: list[dict] | None, key: str) -> str:
    """`` [min, max]`` of ``run[key]`` over ``runs`` (empty for fewer than two runs)."""
    if not runs or len(runs) < 2:
        return ""
    vals = [x[key] for x in runs]
    return f" [{min(vals):.4f}, {max(vals):.4f}]"


def _read_runs(folder: Path) -> dict | None:
    """``folder/permuted_mnist.json``, or the per-seed files ``folder/seed*/permuted_mnist.json``
    merged into one result (:func:`ewc_fast.experiments.continual.merge_experiments`); ``None`` if none."""
    single = read_json(folder / "permuted_mnist.json")
    if single is not None:
        return single
    parts = [read_json(p) for p in sorted(folder.glob("seed*/permuted_mnist.json"))]
    return merge_experiments(parts) if parts else None


def _only_entry(r: dict) -> dict:
    """The best-λ entry (summary + runs) of a one-method result."""
    (v,) = r["methods"].values()
    return v["lams"][f"{v['best_lam']:g}"]


def _render_anchoring(modes: dict, res_dir: Path, rel: str) -> list[str]:
    """Section 8: no penalty / all previous / previous only, each over the same seeds."""
    first = next(iter(modes.values()))
    c = first["config"]
    penalised = next((m for r in modes.values() for m in r["methods"] if m != "none"), "—")
    L = [
        "## 8. Penalty for all previous tasks vs only the previous one (Sörberg 2020, EWC on a CNN)",
        "",
        f"- protocol: {first['n_tasks']} {first['task_kind']} tasks (task 0 unpermuted), the report's CNN "
        f"(`{c['model']}`: Conv 64@3×3 → MaxPool → Dense 1024 → Dense 1024 → 10 with dropouts, 13.9 M parameters), "
        f"{c['optimizer']} lr {c['lr']:g}, {c['epochs']} epochs/task, batch {c['batch_size']}, "
        f"{first['n_train']} training and {first['n_test']} test images per task, penalty importance "
        f"`{penalised}` (with the true labels, the report's empirical Fisher) on {c['n_importance']} samples, "
        "λ as the report (200, (λ/2)·ΣF(θ−θ*)²). "
        "The report: 30 epochs/task on all of MNIST, Adam 1e-4.",
    ]
    for mode, r in modes.items():
        runs = _only_entry(r)["runs"]
        walls = [m["wall_s"] for m in r.get("parts_meta") or [r.get("meta")] if m] or [r.get("wall_s") or 0.0]
        cmd = re.sub(r"\s--out\s+\S+", "", (r.get("meta") or {}).get("command", "?"))
        L.append(
            f"- `{mode}`: {len(runs)} run(s), seeds {', '.join(str(x['seed']) for x in runs)}; wall time "
            f"{_minutes(sum(walls))} in total ({_minutes(min(walls))}–{_minutes(max(walls))} per run); command "
            f"`{cmd}`" + (" (one invocation per seed, `--seed k`)" if r.get("parts_meta") else "")
        )
    mach = (first.get("meta") or {}).get("machine")
    if mach:
        L.append(
            f"- machine: {mach['cpu']}, {mach['cpu_count']} logical CPUs, torch threads {mach['torch_threads']}, "
            f"ewc_fast git {mach['git']}; shared with other jobs (run under `nice`): wall times are upper bounds."
        )
    L += [
        "",
        "| penalty | runs | final mean accuracy: mean [min, max] | per seed | BWT: mean [min, max] "
        "| task 0 at the end: mean [min, max] |",
        "|---|---|---|---|---|---|",
    ]
    finals = {}
    for mode, r in modes.items():
        runs = _only_entry(r)["runs"]
        f = [x["final_mean_acc"] for x in runs]
        b = [x["bwt"] for x in runs]
        t0 = [x["R"][-1][0] for x in runs]
        finals[mode] = {x["seed"]: x["final_mean_acc"] for x in runs}
        L.append(
            f"| {ANCHORING_MODES.get(mode, mode)} (`{mode}`) | {len(runs)} | "
            f"{np.mean(f):.4f} [{min(f):.4f}, {max(f):.4f}] "
            f"| {', '.join(f'{v:.3f}' for v in f)} | {np.mean(b):+.4f} [{min(b):+.4f}, {max(b):+.4f}] "
            f"| {np.mean(t0):.3f} [{min(t0):.3f}, {max(t0):.3f}] |"
        )
    pairs = [("all", "previous"), ("previous", "none"), ("all", "none")]
    wins = []
    for a, b in pairs:
        if a in finals and b in finals:
            common = sorted(set(finals[a]) & set(finals[b]))
            if common:
                n = sum(finals[a][k] > finals[b][k] for k in common)
                wins.append(f"`{a}` > `{b}` in {n} of {len(common)}")
    if wins:
        L += ["", "Paired by seed (same initial weights, permutations and shuffling): " + "; ".join(wins) + "."]
    curves = {f"{ANCHORING_MODES.get(m, m)}": mean_curve(_only_entry(r)["runs"]) for m, r in modes.items()}
    mats = {
        f"{ANCHORING_MODES.get(m, m)}": np.mean(
            [np.asarray(x["R"], dtype=float) for x in _only_entry(r)["runs"]], axis=0
        ).tolist()
        for m, r in modes.items()
    }
    n = max(len(_only_entry(r)["runs"]) for r in modes.values())
    a = plots.task_curves(
        curves,
        first["n_tasks"],
        c["epochs"],
        Path(res_dir) / "anchoring" / "anchoring_curves.png",
        title=f"test accuracy of each task after each epoch: mean over {n} seeds, band = min–max",
    )
    b = plots.accuracy_heatmaps(
        mats,
        Path(res_dir) / "anchoring" / "anchoring_matrices.png",
        title=f"accuracy matrix R[i, j], mean over {n} seeds",
    )
    L.append("")
    if a:
        L.append(f"![per-task curves, mean and min–max over seeds]({rel}/anchoring/anchoring_curves.png)")
    if b:
        L.append(f"![accuracy matrices]({rel}/anchoring/anchoring_matrices.png)")
    L += ["", f"Per-run values (R, curves, times): `{rel}/anchoring/<mode>/[seed<k>/]permuted_mnist.json`.", ""]
    return L


def _render_overlap(r: dict, rel: str) -> list[str]:
    L = ["## 9. Fisher overlap vs fraction of pixels permuted, per layer (Kirkpatrick et al. 2017, Fig. 3C)", ""]
    L += _meta_lines(r)
    names = [k for k in r["per_fraction"][0]["overlap"] if k == "all" or k.endswith("weight")]
    L += [
        "- overlap = Σ_i √(f̂_A,i f̂_B,i) of the unit-sum-normalised Fisher diagonals (1 = same importances).",
        "",
        "| fraction permuted | " + " | ".join(names) + " | acc A | acc B |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for pf in r["per_fraction"]:
        L.append(
            f"| {pf['fraction']:g} | "
            + " | ".join(f"{pf['overlap'][n]:.3f}" for n in names)
            + f" | {pf['acc_A']:.3f} | {pf['acc_B']:.3f} |"
        )
    L += ["", f"![overlap]({rel}/overlap/overlap.png)", ""]
    return L


def table_figures(res_dir: Path, t: dict, rel: str = "results") -> list[str]:
    """The main table's mean accuracy matrices R[i, j] and per-task curves (accuracy of every task
    after each task trained, mean over the runs), drawn from ``table.json``; markdown lines."""
    mats, curves = {}, {}
    for row in t["rows"].values():
        runs = row.get("runs") or []
        if not runs:
            continue
        R = np.mean([np.asarray(r["R"], dtype=float) for r in runs], axis=0)
        mats[row["label"]] = R.tolist()
        curves[row["label"]] = [{"stage": i, "epoch": 1, "acc": R[i].tolist()} for i in range(R.shape[0])]
    if not mats:
        return []
    a = plots.accuracy_heatmaps(
        mats, Path(res_dir) / "table_accuracy_matrices.png", title="mean accuracy matrix R[i, j] of each table row"
    )
    b = plots.task_curves(
        curves,
        t["n_tasks"],
        1,
        Path(res_dir) / "table_task_curves.png",
        title="test accuracy of each task after each task trained (mean over the runs)",
    )
    L = ["### Accuracy matrices and per-task curves of the table", ""]
    if a:
        L.append(f"![accuracy matrices]({rel}/table_accuracy_matrices.png)")
    if b:
        L.append(f"![per-task curves]({rel}/table_task_curves.png)")
    return L + [""] if (a or b) else []


def correlate_figures(res_dir: Path, c: dict, rel: str = "results") -> list[str]:
    """Heat-maps (tasks learned × layer, colour bar) of the Pearson and Spearman correlations in
    ``correlate.json``; markdown lines."""
    L = []
    for kind in ("pearson", "spearman"):
        vals, layers = surfaces(c, kind)
        p = plots.correlation_heatmaps(vals, layers, Path(res_dir) / f"correlation_heatmap_{kind}.png", kind=kind)
        if p:
            L.append(f"![{kind} correlations, heat-map]({rel}/correlation_heatmap_{kind}.png)")
    return (
        ["Heat-map form (each cell: the correlation after that many tasks on that layer's weights):", ""] + L + [""]
        if L
        else []
    )


def _render_correlate_seeds(r: dict, rel: str) -> list[str]:
    c = r.get("config", {})
    T = r["n_tasks"]
    L = ["## 10. Correlations of the importances over several seeds, the authors' anchoring, the batched Fisher", ""]
    L += _meta_lines(r)
    L += [
        f"- protocol: as section 2 but {T} tasks, **{len(r['seeds'])} seeds** ({', '.join(map(str, r['seeds']))}), the "
        f"MAS penalty anchored `{c.get('anchor', '?')}` (summed importances at the latest optimum, as the authors' EWC "
        "code), SIG summed over tasks on raw pixels in [0, 1]; FISB = the square of the batch-mean gradient over "
        f"batches of {c.get('importance_batch', '?')} samples (what the paper's eq. 2 approximates).",
        "",
        f"Pearson correlation after task {T}, mean over seeds [min, max]:",
        "",
    ]
    params = [p for p in r["params"] if p.endswith("weight")]
    L += ["| pair | " + " | ".join(p.rsplit(".", 1)[0] for p in params) + " |", "|---|" + "---|" * len(params)]
    last = {(x["param"], x["pair"]): x for x in r["rows"] if x["stage"] == T - 1}
    for pair in r["pairs"]:
        cells = []
        for p in params:
            x = last.get((p, pair))
            cells.append(
                "—" if x is None else f"{x['pearson']:+.2f} [{x['pearson_min']:+.2f}, {x['pearson_max']:+.2f}]"
            )
        L.append(f"| {pair} | " + " | ".join(cells) + " |")
    L += ["", f"![correlations over seeds]({rel}/correlate_seeds/correlation_heatmap_pearson.png)", ""]
    return L


def render_science(res_dir: Path, notes: dict | None = None, rel: str = "results") -> list[str]:
    """The sections of every :data:`SCIENCE_DIRS` folder present under ``res_dir`` (markdown lines)."""
    notes = notes or {}
    res = {k: read_json(Path(res_dir) / d / f) for k, (d, f) in SCIENCE_DIRS.items()}
    L: list[str] = []

    def add(key: str, lines: list[str]) -> None:
        L.extend(lines)
        if notes.get(key):
            L.extend(notes[key] + [""])

    if res["prune_layer_weights"] or res["prune_layer_entries"]:
        add("prune_layer", _render_prune_layer(res["prune_layer_weights"], res["prune_layer_entries"], rel))
    if res["estimators"]:
        add("estimators", _render_estimators(res["estimators"], rel))
    if res["explosion"]:
        add("explosion", _render_explosion(res["explosion"], rel))
    if res["conv"]:
        lines = _render_permuted(
            res["conv"],
            "## 7. Kutalev & Lapina 2021's conv net on permuted MNIST, stabilised EWC",
            rel,
            "conv",
            reference=CONV_REFERENCE,
        )
        scans = [read_json(f) for f in sorted((Path(res_dir) / "conv" / "scan").glob("*/permuted_mnist.json"))]
        if scans:
            lines += _render_conv_scans(scans)
        add("conv", lines)
    modes = {m: r for m in ANCHORING_MODES if (r := _read_runs(Path(res_dir) / "anchoring" / m)) is not None}
    if modes:
        add("anchoring", _render_anchoring(modes, Path(res_dir), rel))
    if res["overlap"]:
        add("overlap", _render_overlap(res["overlap"], rel))
    if res["correlate_seeds"]:
        add("correlate_seeds", _render_correlate_seeds(res["correlate_seeds"], rel))
    return L
