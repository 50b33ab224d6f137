"""Matplotlib figures for the experiments (headless ``Agg`` backend).

matplotlib is optional (``pip install ewc_fast[plots]``): without it every function returns
``None`` and writes nothing; :func:`available` tells which.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

PathLike = str | os.PathLike

__all__ = [
    "available",
    "accuracy_heatmaps",
    "task_curves",
    "lam_grid",
    "correlation_surfaces",
    "prune_curves",
    "overlap_curves",
    "estimator_comparison",
    "explosion_curves",
    "correlation_heatmaps",
]


def _plt():
    try:
        import matplotlib

        if "MPLBACKEND" not in os.environ:
            matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def available() -> bool:
    return _plt() is not None


def _save(fig: Any, path: PathLike) -> str:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return str(path)


def accuracy_heatmaps(matrices: dict, path: PathLike, *, title: str = "accuracy matrix R[i, j]") -> str | None:
    """One heatmap per label: rows = after training task i, columns = test task j."""
    plt = _plt()
    if plt is None or not matrices:
        return None
    n = len(matrices)
    T = max(np.asarray(R).shape[1] for R in matrices.values())
    size = max(3.2, 0.45 * T + 1.8)
    fig, axes = plt.subplots(1, n, figsize=(size * n + 0.6 * (n - 1), size), squeeze=False)
    fig.subplots_adjust(wspace=0.45)
    for ax, (label, R) in zip(axes[0], matrices.items()):
        R = np.asarray(R, dtype=float)
        im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
        ax.set_title(f"{label}\nfinal mean {R[-1].mean():.3f}", fontsize=9)
        ax.set_xlabel("test task j")
        ax.set_ylabel("after training task i")
        ax.set_xticks(range(R.shape[1]))
        ax.set_yticks(range(R.shape[0]))
        if R.shape[1] <= 10:
            for i in range(R.shape[0]):
                for j in range(R.shape[1]):
                    ax.text(
                        j,
                        i,
                        f"{R[i, j]:.2f}",
                        ha="center",
                        va="center",
                        fontsize=7,
                        color="white" if R[i, j] < 0.6 else "black",
                    )
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def task_curves(
    curves: dict,
    n_tasks: int,
    epochs: int,
    path: PathLike,
    *,
    title: str = "test accuracy of each task during sequential training",
) -> str | None:
    """Per label a panel: x = tasks trained so far (fractional within a task), one line per task.

    A curve point may carry ``acc_min`` / ``acc_max`` beside ``acc`` (e.g. the mean over runs with
    the runs' range): the range is drawn as a band around the line."""
    plt = _plt()
    if plt is None or not curves:
        return None
    n = len(curves)
    fig, axes = plt.subplots(1, n, figsize=(5.0 * n, 3.6), squeeze=False, sharey=True)
    cmap = plt.get_cmap("tab10" if n_tasks <= 10 else "tab20")
    for ax, (label, curve) in zip(axes[0], curves.items()):
        xs = [c["stage"] + c["epoch"] / max(epochs, 1) for c in curve]
        acc = np.asarray([c["acc"] for c in curve], dtype=float)
        band = all("acc_min" in c and "acc_max" in c for c in curve)
        if band:
            lo = np.asarray([c["acc_min"] for c in curve], dtype=float)
            hi = np.asarray([c["acc_max"] for c in curve], dtype=float)
        for j in range(acc.shape[1]):
            start = j  # a task's curve starts when its training starts
            mask = np.asarray(xs) > start
            x = np.asarray(xs)[mask]
            ax.plot(x, acc[mask, j], marker=".", ms=3, color=cmap(j % 20), label=f"task {j}")
            if band:
                ax.fill_between(x, lo[mask, j], hi[mask, j], color=cmap(j % 20), alpha=0.18, lw=0)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("tasks trained")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("test accuracy")
    axes[0][-1].legend(fontsize=7, loc="lower left", ncol=2)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def lam_grid(grid: dict, path: PathLike, *, title: str = "final mean accuracy vs λ") -> str | None:
    """``grid[method] = {λ: (mean, std)}`` → one line per method on a log-λ axis."""
    plt = _plt()
    if plt is None or not grid:
        return None
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for method, points in grid.items():
        lams = sorted(points)
        if not lams:
            continue
        means = [points[l][0] for l in lams]
        stds = [points[l][1] for l in lams]
        ax.errorbar([max(l, 1e-12) for l in lams], means, yerr=stds, marker="o", capsize=3, label=method)
    ax.set_xscale("log")
    ax.set_xlabel("λ (ewc_fast convention, (λ/2)ΣΩ(θ−μ)²)")
    ax.set_ylabel("mean accuracy over tasks, after the last")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def correlation_surfaces(
    values: dict, layers: list, n_tasks: int, path: PathLike, *, kind: str = "pearson"
) -> str | None:
    """``values[pair] = array (n_tasks, n_layers)`` → one 3-D surface per pair (layer × task)."""
    plt = _plt()
    if plt is None or not values:
        return None
    n = len(values)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig = plt.figure(figsize=(4.2 * cols, 3.8 * rows))
    L, Tk = np.meshgrid(np.arange(len(layers)), np.arange(1, n_tasks + 1))
    for k, (pair, Z) in enumerate(values.items()):
        Z = np.asarray(Z, dtype=float)
        ax = fig.add_subplot(rows, cols, k + 1, projection="3d")
        if Z.shape[0] >= 2 and Z.shape[1] >= 2:
            ax.plot_surface(L, Tk, np.nan_to_num(Z), cmap="coolwarm", vmin=-1, vmax=1, edgecolor="k", linewidth=0.3)
        else:
            ax.scatter(L.ravel(), Tk.ravel(), np.nan_to_num(Z).ravel(), c="C0")
        ax.set_zlim(-1, 1)
        ax.set_zlabel(f"{kind} correlation", fontsize=8)
        ax.set_xticks(range(len(layers)))
        ax.set_xticklabels(layers, fontsize=6)
        ax.set_xlabel("layer", fontsize=8)
        ax.set_ylabel("tasks learned", fontsize=8)
        ax.set_title(f"{pair} ({kind})", fontsize=9)
    return _save(fig, path)


def prune_curves(
    curves: dict,
    fractions: Sequence[float],
    path: PathLike,
    *,
    title: str = "importance-ordered pruning",
    mark: float | None = 0.9,
) -> str | None:
    """``curves[label] = {"acc": [...], "loss": [...]}`` over ``fractions`` → acc and loss panels;
    ``acc_min`` / ``acc_max`` (when present) are drawn as a band around the mean accuracy, and a
    dotted line marks the fraction ``mark``."""
    plt = _plt()
    if plt is None or not curves:
        return None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    fig.subplots_adjust(wspace=0.3)
    for label, c in curves.items():
        (line,) = a1.plot(fractions, c["acc"], marker=".", label=label)
        if "acc_min" in c and "acc_max" in c:
            a1.fill_between(fractions, c["acc_min"], c["acc_max"], color=line.get_color(), alpha=0.15, lw=0)
        a2.plot(fractions, c["loss"], marker=".", label=label)
    if mark is not None:
        for a in (a1, a2):
            a.axvline(mark, color="k", ls=":", lw=1)
        a1.text(mark, 1.0, f" {mark:.0%}", fontsize=7, va="top")
    a1.set_xlabel("fraction pruned")
    a1.set_ylabel("test accuracy")
    a2.set_xlabel("fraction pruned")
    a2.set_ylabel("test loss")
    a2.set_yscale("log")
    for a in (a1, a2):
        a.grid(alpha=0.3)
    a1.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def overlap_curves(
    fractions: Sequence[float],
    overlaps: dict,
    path: PathLike,
    *,
    title: str = "Fisher overlap between task A and a partly permuted task B",
) -> str | None:
    """``overlaps[layer] = [overlap at each fraction]``."""
    plt = _plt()
    if plt is None or not overlaps:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, vals in overlaps.items():
        ax.plot(
            fractions,
            vals,
            marker="o",
            label=label,
            lw=2.5 if label == "all" else 1.2,
            color="k" if label == "all" else None,
        )
    ax.set_xlabel("fraction of pixels permuted")
    ax.set_ylabel("Fisher overlap Σ√(f̂₁f̂₂)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=10)
    return _save(fig, path)


def estimator_comparison(res: dict, path: PathLike, *, title: str = "EWC with four Fisher estimators") -> str | None:
    """``ewc-fast estimators`` result → accuracy (ours: mean with min–max, theirs: marker) and the
    median estimator time per task, per estimator (no EWC as the accuracy baseline)."""
    plt = _plt()
    if plt is None or not res.get("estimators"):
        return None
    names = list(res["estimators"])
    ref = res.get("reference", {})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    fig.subplots_adjust(wspace=0.3)
    xs = np.arange(len(names) + 1)
    labels = [*names, "none"]
    sums = [res["estimators"][n]["summary"] for n in names] + [res["none"]["summary"]]
    mean = np.array([100 * s["acc_mean"] for s in sums])
    lo = mean - np.array([100 * s["acc_min"] for s in sums])
    hi = np.array([100 * s["acc_max"] for s in sums]) - mean
    a1.errorbar(xs, mean, yerr=[lo, hi], fmt="o", capsize=4, label="ours: mean, min–max")
    theirs = [ref.get(n, {}).get("acc") for n in labels]
    a1.plot([x for x, t in zip(xs, theirs) if t], [t for t in theirs if t], "k_", ms=18, mew=2, label="van de Ven 2025")
    a1.set_xticks(xs, labels)
    a1.set_ylabel("mean accuracy over the 5 tasks (%)")
    a1.legend(fontsize=7)
    t = [1e3 * res["estimators"][n]["summary"]["importance_time_median_s"] for n in names]
    a2.bar(np.arange(len(names)), t, color="tab:orange")
    a2.set_xticks(np.arange(len(names)), names)
    a2.set_ylabel("estimator time per task, median (ms)")
    for a in (a1, a2):
        a.grid(alpha=0.3, axis="y")
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def explosion_curves(res: dict, path: PathLike) -> str | None:
    """``ewc-fast explosion`` result → one row per model, one column per variant: task-B loss plus
    penalty against the step for every α·λ·max Ω (log scale; × = diverged there), and a last
    column with the final accuracy on task B (solid) and A (dashed) against α·λ·max Ω."""
    plt = _plt()
    if plt is None or not res.get("models"):
        return None
    models = list(res["models"])
    variants = list(res["config"]["variants"])
    values = list(res["config"]["values"])
    cmap = plt.get_cmap("viridis")
    fig, axes = plt.subplots(len(models), len(variants) + 1, figsize=(4 * (len(variants) + 1), 3.2 * len(models)))
    axes = np.atleast_2d(axes)
    for i, name in enumerate(models):
        runs = res["models"][name]["runs"]
        for j, variant in enumerate(variants):
            ax = axes[i, j]
            for r in (r for r in runs if r["variant"] == variant):
                c = cmap(values.index(r["value"]) / max(len(values) - 1, 1))
                tot = [
                    (s, l + p) for s, l, p in zip(r["step"], r["loss"], r["penalty"]) if l is not None and p is not None
                ]
                if tot:
                    ax.plot(*zip(*tot), color=c, lw=1, label=f"{r['value']:g}")
                if r["diverged"] and tot:
                    ax.plot(tot[-1][0], tot[-1][1], "x", color=c, ms=8, mew=2)
            ax.set_yscale("log")
            ax.set_title(f"{name}: {variant}", fontsize=9)
            ax.set_xlabel("SGD step on task B")
            ax.set_ylabel("task-B loss + penalty")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.legend(title="α·λ·max Ω", fontsize=6, title_fontsize=7)
        ax = axes[i, -1]
        for variant, ls in zip(variants, ("-", "--", ":")):
            rs = sorted((r for r in runs if r["variant"] == variant), key=lambda r: r["value"])
            for key, mk in (("final_acc_B", "o"), ("final_acc_A", "s")):
                xs = [r["value"] for r in rs]
                ys = [r[key] if r[key] is not None else np.nan for r in rs]
                ax.plot(xs, ys, ls=ls, marker=mk, ms=4, label=f"{variant} {key[-1]}")
        ax.axvline(2.0, color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("α·λ·max Ω")
        ax.set_ylabel("final test accuracy (gap = diverged)")
        ax.set_title(f"{name}: accuracy after task B", fontsize=9)
        ax.legend(fontsize=6)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def correlation_heatmaps(
    values: dict, layers: list, path: PathLike, *, kind: str = "pearson", title: str | None = None
) -> str | None:
    """``values[pair] = array (n_tasks, n_layers)`` → one annotated heat-map per pair (rows: tasks
    learned, columns: layers) on a shared diverging colour scale [−1, 1] with a labelled colour bar."""
    plt = _plt()
    if plt is None or not values:
        return None
    n = len(values)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    T = max(np.asarray(Z).shape[0] for Z in values.values())
    fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols + 1.2, 0.32 * T * rows + 1.4 * rows), squeeze=False)
    im = None
    for ax, (pair, Z) in zip(axes.ravel(), values.items()):
        Z = np.asarray(Z, dtype=float)
        im = ax.imshow(Z, vmin=-1, vmax=1, cmap="coolwarm", aspect="auto")
        for i in range(Z.shape[0]):
            for j in range(Z.shape[1]):
                if np.isfinite(Z[i, j]):
                    ax.text(j, i, f"{Z[i, j]:.2f}", ha="center", va="center", fontsize=6)
        ax.set_xticks(range(len(layers)), layers, fontsize=7)
        ax.set_yticks(range(Z.shape[0]), [str(i + 1) for i in range(Z.shape[0])], fontsize=6)
        ax.set_xlabel("layer (weights)", fontsize=8)
        ax.set_ylabel("tasks learned", fontsize=8)
        ax.set_title(pair, fontsize=9)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    if im is not None:
        cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.8)
        cb.set_label(f"{kind.capitalize()} correlation")
    fig.suptitle(title or f"{kind.capitalize()} correlation of the importances, per layer and task", fontsize=10)
    return _save(fig, path)
