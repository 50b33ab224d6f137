"""The ``ewc-fast reproduce`` driver: the parts in order, re-rendering RESULTS.md after each.

:func:`run_reproduce` loads the data, runs the parts of ``cfg.parts`` (:func:`~.table.run_table`,
:func:`~.correlations.run_correlate_part`, :func:`~.pruning.run_prune_part`) and renders
``OUT/RESULTS.md`` (:func:`~.render.render_results`) after each, so an interrupted reproduction
still leaves a report of the finished parts. :func:`run_investigation_command` runs variants of
the table's rows into the existing ``table.json`` at the table's own sizes.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..data import load_mnist
from ..records import read_json
from .correlations import run_correlate_part
from .protocol import RESULTS_SUBDIR, ReproConfig
from .pruning import run_prune_part
from .render import format_minutes, render_results
from .table import run_investigations, run_table

__all__ = ["run_reproduce", "run_investigation_command"]


def run_investigation_command(
    cfg: ReproConfig, names: Sequence[str], runs: int = 1, log: Callable[[str], None] = print
) -> dict:
    """``ewc-fast reproduce --investigate NAMES``: variants into table.json, then re-render."""
    torch.set_num_threads(cfg.threads)
    out_dir = Path(cfg.out)
    table = read_json(out_dir / RESULTS_SUBDIR / "table.json")
    if table is None:
        raise FileNotFoundError(f"{out_dir / RESULTS_SUBDIR / 'table.json'}: run the table first")
    # the table's own sizes, so the variants are comparable with its rows
    cfg = dataclasses.replace(cfg, tasks=table["n_tasks"], epochs=table["epochs"], seed=table["meta"]["seed"])
    data = load_mnist(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test)
    if int(data.x_train.shape[0]) != table["meta"]["n_train"]:
        raise ValueError("--investigate must use the same data (and --n-train) as the table")
    inv = run_investigations(data, cfg, names, out_dir, runs=runs, log=log)
    render_results(out_dir)
    log(f"wrote {out_dir / 'RESULTS.md'}")
    return inv


def run_reproduce(cfg: ReproConfig, log: Callable[[str], None] = print, *, render_only: bool = False) -> dict:
    """Run ``cfg.parts`` into ``cfg.out/results/*.json`` and render ``cfg.out/RESULTS.md``; returns
    ``{part: result}``. ``render_only``: only re-render from the existing JSON files."""
    out_dir = Path(cfg.out)
    if render_only:
        render_results(out_dir)
        log(f"wrote {out_dir / 'RESULTS.md'}")
        return {}
    torch.set_num_threads(cfg.threads)
    t0 = time.perf_counter()
    data = load_mnist(cfg.data, n_train=cfg.n_train, n_test=cfg.n_test)
    log(
        f"data: {data.source}  train {data.x_train.shape[0]}  test {data.x_test.shape[0]}  "
        f"({time.perf_counter() - t0:.1f} s); torch threads {torch.get_num_threads()}"
    )
    done = {}
    if "table" in cfg.parts:
        done["table"] = run_table(data, cfg, out_dir, log)
        render_results(out_dir)
    if "correlate" in cfg.parts:
        done["correlate"] = run_correlate_part(data, cfg, out_dir, log)
        render_results(out_dir)
    if "prune" in cfg.parts:
        try:
            emb = load_mnist("embedded")
        except Exception as e:  # noqa: BLE001 - the comparison is optional
            log(f"   embedded set unavailable ({e}); skipping that comparison")
            emb = None
        done["prune"] = run_prune_part(data, cfg, out_dir, log, embedded=emb)
    render_results(out_dir)
    log(f"wrote {out_dir / 'RESULTS.md'} (total {format_minutes(time.perf_counter() - t0)})")
    return done
