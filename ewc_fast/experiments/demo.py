"""The two-minute demo: catastrophic forgetting, EWC, and the speed of the importance pass.

1. Three permuted-MNIST tasks (task 0 unpermuted) on the embedded 5000-digit set, FC 784-300-150-10,
   trained without consolidation and with EWC (empirical Fisher); both accuracy matrices printed.
2. On the trained model, the empirical Fisher of ``n_timing`` samples two ways:
   ewc_fast's ``estimate_importance(..., methods=("fisher",))`` and the per-sample loop of
   Kutalev & Lapina's code (batch of 1, one ``backward`` per sample, square, average) — wall time of
   each and the largest relative difference between them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import ArrayLike
from torch import nn

from ..estimation import estimate_importance
from .continual import RunConfig, run_sequence
from .data import MNIST
from .tasks import permuted_tasks
from .training import minibatches

__all__ = ["loop_fisher", "max_relative_difference", "time_importance", "run_demo"]


def loop_fisher(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Empirical Fisher by a batch-1 loop of backward passes (the reference way of Kutalev & Lapina's code).

    ``F = (1/N) Σ_n (∂ CE(f(x_n), y_n) / ∂θ)²`` accumulated in float64.
    """
    was_training = model.training
    model.eval()
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params}
    try:
        for i in range(x.shape[0]):
            model.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            loss.backward()
            for n, p in params:
                acc[n] += p.grad.detach().double() ** 2
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    n = max(int(x.shape[0]), 1)
    return {k: v / n for k, v in acc.items()}


def max_relative_difference(
    a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], *, floor: float = 1e-6
) -> float:
    """``max |a − b| / max(|b|, floor · max|b|)`` over all entries of all tensors (``b`` = reference).

    The floor keeps entries that are ~0 in the reference (dead units) from dividing by zero.
    """
    worst = 0.0
    for name in b:
        ref = b[name].detach().double().cpu()
        got = a[name].detach().double().cpu()
        scale = float(ref.abs().max())
        if scale == 0.0:
            worst = max(worst, float((got - ref).abs().max()))
            continue
        den = ref.abs().clamp_min(floor * scale)
        worst = max(worst, float(((got - ref).abs() / den).max()))
    return worst


def time_importance(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 500,
    backend: str = "auto",
    repeats: int = 1,
) -> dict:
    """Time ewc_fast's Fisher pass and the batch-1 loop on the same samples."""
    model.eval()
    batches = minibatches(x, y, batch_size)
    # warm-up (first-call dispatch, allocations) on a few samples
    estimate_importance(model, batches[:1], methods=("fisher",), backend=backend, progress=False)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    t_fast = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fast = estimate_importance(model, batches, methods=("fisher",), backend=backend, progress=False)["fisher"]
        sync()
        t_fast.append(time.perf_counter() - t0)
    sync()
    t0 = time.perf_counter()
    ref = loop_fisher(model, x, y)
    sync()
    t_loop = time.perf_counter() - t0
    return {
        "n_samples": int(x.shape[0]),
        "ewc_fast_s": min(t_fast),
        "loop_s": t_loop,
        "speedup": t_loop / max(min(t_fast), 1e-12),
        "max_rel_diff": max_relative_difference(fast, ref),
        "backend": backend,
        "fast_method": getattr(fast, "method", "fisher"),
        "fast_meta": {k: v for k, v in getattr(fast, "meta", {}).items() if isinstance(v, (str, int, float, bool))},
    }


def format_matrix(R: ArrayLike, names: Sequence[str] | None = None) -> str:
    """The accuracy matrix as text: one row per stage, plus the mean over the tasks seen so far."""
    R = np.asarray(R, dtype=float)
    head = "after \\ test " + " ".join(f"{j:>6d}" for j in range(R.shape[1])) + "   mean(seen)"
    lines = [head]
    for i in range(R.shape[0]):
        lines.append(f"task {i:<8d}" + " ".join(f"{v:6.3f}" for v in R[i]) + f"   {R[i, : i + 1].mean():.3f}")
    return "\n".join(lines)


def run_demo(
    data: MNIST,
    *,
    n_tasks: int = 3,
    epochs: int = 3,
    lam: float = 82.0,
    model: str = "mlp",
    seed: int = 0,
    n_timing: int = 1000,
    device: str = "cpu",
    backend: str = "auto",
    progress: bool = False,
    log: Callable[[str], None] = print,
) -> dict:
    tasks = permuted_tasks(n_tasks, seed, first_identity=True, n_pixels=data.n_features)
    out = {
        "data": data.source,
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "n_tasks": n_tasks,
        "epochs": epochs,
        "lam": lam,
        "seed": seed,
        "runs": {},
    }
    models = {}
    for method, lam_m in (("none", 0.0), ("fisher", lam)):
        cfg = RunConfig(
            method=method,
            lam=lam_m,
            model=model,
            epochs=epochs,
            device=device,
            backend=backend,
            n_importance=min(5000, data.x_train.shape[0]),
        )
        holder = {}

        def on_task_end(stage, m, x_imp, y_imp, strategy, _h=holder):
            _h["model"], _h["x"], _h["y"] = m, x_imp, y_imp

        t0 = time.perf_counter()
        res = run_sequence(data, tasks, cfg, seed=seed, progress=progress, on_task_end=on_task_end)
        wall = time.perf_counter() - t0
        label = "no consolidation" if method == "none" else f"EWC (Fisher, λ={lam:g})"
        log(f"\n{label}: accuracy matrix R[i, j] (row: after training task i; column: test task j), {wall:.1f} s")
        log(format_matrix(res.R))
        log(f"final mean accuracy {res.final_mean_acc:.4f}   backward transfer {res.bwt:+.4f}")
        out["runs"][method] = {**res.to_dict(), "label": label, "wall_s": wall}
        models[method] = holder
    h = models["fisher"]
    n = min(n_timing, h["x"].shape[0])
    x, y = h["x"][-n:], h["y"][-n:]
    timing = time_importance(h["model"], x, y, backend=backend)
    out["timing"] = timing
    log(
        f"\nFisher importance of {n} samples on the final model "
        f"({sum(p.numel() for p in h['model'].parameters()):,} parameters):"
    )
    log(f"  ewc_fast estimate_importance : {timing['ewc_fast_s'] * 1e3:9.1f} ms")
    log(f"  per-sample backward loop     : {timing['loop_s'] * 1e3:9.1f} ms   (×{timing['speedup']:.1f} slower)")
    log(f"  max relative difference      : {timing['max_rel_diff']:.2e}")
    return out
