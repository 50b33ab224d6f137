"""Sequential (continual) training with an accuracy matrix.

One *run* trains a freshly initialised model on ``tasks[0], tasks[1], …`` in order with Adam and
cross-entropy; after each task it records the test accuracy (and loss) on every task, building

    R[i, j] = test accuracy on task j after training tasks 0..i      (Lopez-Paz & Ranzato 2017)

plus ``b[j]``, the accuracy of the untrained model on task j. Summaries:

* ``mean_acc_seen[i]  = mean_{j<=i} R[i, j]`` (average accuracy on the tasks seen so far);
* ``mean_acc_all[i]   = mean_j R[i, j]`` (over all tasks; after the last task it is the number
  Kutalev & Lapina report, NOTES §4);
* ``bwt = 1/(T-1) Σ_{j<T-1} (R[T-1, j] − R[j, j])`` (backward transfer, negative = forgetting);
* ``fwt = 1/(T-1) Σ_{j>=1} (R[j-1, j] − b[j])`` (forward transfer).

Consolidation methods (``RunConfig.method``):

=============  ==================================================================================
none           plain sequential training
l2             :class:`ewc_fast.EWC` with unit importance (Ω = 1): an L2 pull to every old optimum
fisher …       :class:`ewc_fast.EWC` fed by :func:`ewc_fast.estimate_importance` with that method
(fisher, fisher_mc, fisher_exact, mas, sig) on the last ``n_importance`` (5000) training samples of
               each task, after the task (NOTES §4)
si             :class:`ewc_fast.SynapticIntelligence` attached to the optimizer; after each task
               the penalty is Zenke's: one quadratic at the latest optimum with the running
               importance ``si.cumulative`` (online :class:`ewc_fast.EWC`, λ = 2c)
wva            :class:`ewc_fast.WVA` attached to the optimizer (no penalty: each step is
               attenuated by 1/(1+λA)); A accumulates ``wva_importance`` (default SIG, as in
               Kutalev 2020) estimated like the EWC importances
=============  ==================================================================================

The penalty gradient is added by ``EWC.apply_()`` after ``loss.backward()`` and before
``optimizer.step()`` (mode ``"separate"``: one anchor per task, summed exactly). ``stabilize``
turns on Kutalev & Lapina's stabilised penalty (``stabilize_lr = lr``).

λ convention — ``RunConfig.lam`` is always in **ewc_fast's convention**, penalty
``(λ/2) Σ_i Ω_i (θ_i − μ_i)²`` (gradient ``λ Ω (θ − μ)``). Kutalev & Lapina's code (and SI, MAS)
write ``λ' Σ Ω (θ − μ)²`` without the ½, so ``λ = 2 λ'``: their Fisher λ'=41 is our λ=82.
:func:`to_ewc_lam` converts; the CLI accepts ``--lam-convention kutalev`` and prints both.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .data import MNIST
from .models import build_model, sig_activations
from .tasks import Task, build_tasks

__all__ = [
    "METHODS",
    "IMPORTANCE_METHODS",
    "RunConfig",
    "RunResult",
    "FeatureUnavailable",
    "to_ewc_lam",
    "from_ewc_lam",
    "default_lam",
    "backward_transfer",
    "forward_transfer",
    "mean_accuracy_seen",
    "evaluate",
    "train_task",
    "run_sequence",
    "run_experiment",
    "summarize_runs",
    "importance_subset",
    "estimate",
    "unit_importance",
    "resolve_device",
]

METHODS = ("none", "l2", "fisher", "fisher_mc", "fisher_exact", "mas", "si", "sig", "wva")
IMPORTANCE_METHODS = ("fisher", "fisher_mc", "fisher_exact", "mas", "sig")
LAM_CONVENTIONS = ("ewc", "kutalev")

# Kutalev & Lapina 2021's tuned λ' (no-½ convention), FC net on permuted MNIST (NOTES §4).
_KUTALEV_LAM = {"fisher": 41.0, "fisher_mc": 41.0, "fisher_exact": 41.0, "mas": 4.5, "si": 0.25}
# Stabilised λs: their stabilised scripts (aakutalev/ewc-features, section3/*-stabilized.py) use
# regularizer = Ω·λ·0.5/(Ω·λ·lr + 1) in λ'·Σ reg·(θ−θ*)², i.e. the penalty already carries the ½:
# these values are in ewc_fast's convention as they stand (no doubling).
_KUTALEV_LAM_STABILIZED = {"fisher": 85.0, "fisher_mc": 85.0, "fisher_exact": 85.0, "mas": 8.5, "si": 0.64}
# Not from a paper: picked on the embedded set (3 permuted tasks, 3 epochs; ewc_fast convention).
# Starting points only — tune with --lam-grid.
_UNTUNED_LAM = {"l2": 1e-3, "sig": 10.0, "wva": 100.0, "none": 0.0}


class FeatureUnavailable(RuntimeError):
    """A library component the experiment needs is not available in this build."""


def to_ewc_lam(lam: float, convention: str = "ewc") -> float:
    """λ in ``convention`` → λ in ewc_fast's ``(λ/2)ΣΩ(θ−μ)²`` convention."""
    if convention == "ewc":
        return float(lam)
    if convention == "kutalev":
        return 2.0 * float(lam)
    raise ValueError(f"unknown λ convention {convention!r}: {LAM_CONVENTIONS}")


def from_ewc_lam(lam: float, convention: str = "kutalev") -> float:
    """Inverse of :func:`to_ewc_lam`."""
    return float(lam) / (2.0 if convention == "kutalev" else 1.0)


def default_lam(method: str, *, stabilize: bool = False) -> tuple[float, str]:
    """Default λ (ewc_fast convention) and where it comes from."""
    if stabilize and method in _KUTALEV_LAM_STABILIZED:
        lam = _KUTALEV_LAM_STABILIZED[method]
        return lam, (
            f"Kutalev & Lapina 2021 stabilised λ={lam:g} (their stabilised code already has the ½) → λ={lam:g}"
        )
    if method in _KUTALEV_LAM:
        return to_ewc_lam(_KUTALEV_LAM[method], "kutalev"), (
            f"Kutalev & Lapina 2021 λ'={_KUTALEV_LAM[method]:g} (no-½) → λ={2 * _KUTALEV_LAM[method]:g}"
        )
    if method == "wva":
        return _UNTUNED_LAM["wva"], "untuned default (WVA attenuation strength)"
    return _UNTUNED_LAM.get(method, 1.0), "untuned default; tune with --lam-grid"


# --------------------------------------------------------------------------------------------
# metrics on the accuracy matrix
# --------------------------------------------------------------------------------------------
def mean_accuracy_seen(R) -> list[float]:
    """``mean_{j<=i} R[i, j]`` for each stage ``i``."""
    R = np.asarray(R, dtype=float)
    return [float(R[i, : i + 1].mean()) for i in range(R.shape[0])]


def backward_transfer(R) -> float:
    """``1/(T-1) Σ_{j<T-1} (R[T-1, j] − R[j, j])``; 0.0 for a single task."""
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def forward_transfer(R, b) -> float:
    """``1/(T-1) Σ_{j>=1} (R[j-1, j] − b[j])``; 0.0 for a single task."""
    R = np.asarray(R, dtype=float)
    b = np.asarray(b, dtype=float)
    T = R.shape[0]
    if T < 2:
        return 0.0
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


# --------------------------------------------------------------------------------------------
# config / results
# --------------------------------------------------------------------------------------------
@dataclass
class RunConfig:
    """Hyper-parameters of one sequential run (λ in ewc_fast's convention, see module doc)."""

    method: str = "none"
    lam: float = 0.0
    stabilize: bool = False
    model: str = "mlp"
    lr: float = 1e-3
    batch_size: int = 100
    epochs: int = 6
    n_importance: int = 5000
    importance_batch: int = 500
    mas_output: str = "softmax"
    mc_samples: int = 1
    si_xi: float = 0.1
    si_variant: str = "zenke"
    wva_importance: str = "sig"
    backend: str = "auto"
    device: str = "cpu"
    eval_batch: int = 2000
    eval_every_epoch: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}: choose from {METHODS}")
        if self.wva_importance not in IMPORTANCE_METHODS:
            raise ValueError(f"wva_importance must be one of {IMPORTANCE_METHODS}")
        if self.mas_output not in ("logits", "softmax"):
            raise ValueError("mas_output must be 'logits' or 'softmax'")
        if not (self.lam >= 0 and math.isfinite(self.lam)):
            raise ValueError(f"lam must be finite and >= 0, got {self.lam}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    method: str
    lam: float
    seed: int
    task_names: list
    R: list  # R[i][j]
    loss: list  # test loss matrix, same layout
    initial: list  # b[j]: untrained accuracy on task j
    curve: list = field(default_factory=list)  # per-epoch [{"stage", "epoch", "acc": [...]}]
    train_time_s: float = 0.0
    importance_time_s: float = 0.0

    @property
    def mean_acc_seen(self) -> list[float]:
        return mean_accuracy_seen(self.R)

    @property
    def mean_acc_all(self) -> list[float]:
        return [float(np.mean(r)) for r in self.R]

    @property
    def final_mean_acc(self) -> float:
        return float(np.mean(self.R[-1]))

    @property
    def bwt(self) -> float:
        return backward_transfer(self.R)

    @property
    def fwt(self) -> float:
        return forward_transfer(self.R, self.initial)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "lam": self.lam,
            "seed": self.seed,
            "task_names": self.task_names,
            "R": self.R,
            "loss": self.loss,
            "initial": self.initial,
            "mean_acc_seen": self.mean_acc_seen,
            "mean_acc_all": self.mean_acc_all,
            "final_mean_acc": self.final_mean_acc,
            "bwt": self.bwt,
            "fwt": self.fwt,
            "curve": self.curve,
            "train_time_s": self.train_time_s,
            "importance_time_s": self.importance_time_s,
        }


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _lib(name: str):
    """``ewc_fast.<name>`` or a clear error if that component has not landed in this build."""
    import importlib

    import ewc_fast

    obj = getattr(ewc_fast, name, None)
    if obj is None:
        modules = {
            "EWC": "ewc",
            "SynapticIntelligence": "si",
            "WVA": "wva",
            "Importance": "importance",
            "estimate_importance": "estimation",
        }
        try:
            mod = importlib.import_module(f"ewc_fast.{modules.get(name, name)}")
            obj = getattr(mod, name, None)
        except ImportError:
            obj = None
    if obj is None:
        raise FeatureUnavailable(f"ewc_fast.{name} is not available in this build of ewc_fast")
    return obj


def unit_importance(model: nn.Module):
    """Ω = 1 for every trainable parameter (turns EWC into an L2 pull to the anchor)."""
    Importance = _lib("Importance")
    return Importance(
        {n: torch.ones_like(p, dtype=torch.float32) for n, p in model.named_parameters() if p.requires_grad},
        method="unit",
        n_samples=0,
    )


def importance_subset(x: torch.Tensor, y: torch.Tensor, n: int):
    """The last ``n`` samples (Kutalev & Lapina compute importances on the last 5000)."""
    n = min(int(n), x.shape[0])
    return x[x.shape[0] - n :], y[y.shape[0] - n :]


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list:
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def estimate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    methods,
    cfg: RunConfig,
    *,
    generator: torch.Generator | None = None,
) -> dict:
    """``estimate_importance`` on ``(x, y)`` in eval mode (restores the training mode)."""
    estimate_importance = _lib("estimate_importance")
    was_training = model.training
    model.eval()
    try:
        return estimate_importance(
            model,
            _batches(x, y, cfg.importance_batch),
            methods=tuple(methods),
            mas_output=cfg.mas_output,
            mc_samples=cfg.mc_samples,
            backend=cfg.backend,
            progress=False,
            generator=generator,
            sig_activation=(sig_activations(model) or None) if "sig" in methods else None,
        )
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, task: Task, batch_size: int = 2000
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of ``model`` on ``task`` applied to ``(x, y)``."""
    was_training = model.training
    model.eval()
    xs, ys = task.apply(x, y)
    correct, loss, n = 0, 0.0, int(ys.shape[0])
    dev = next(model.parameters()).device
    for i in range(0, n, batch_size):
        xb = xs[i : i + batch_size].to(dev, non_blocking=True)
        yb = ys[i : i + batch_size].to(dev, non_blocking=True)
        out = model(xb)
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was_training)
    return (correct / n if n else float("nan")), (loss / n if n else float("nan"))


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True)


def train_task(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: RunConfig,
    *,
    generator: torch.Generator,
    after_backward: Callable[[], None] | None = None,
    on_epoch_end: Callable[[int], None] | None = None,
    progress: bool = False,
    desc: str = "train",
) -> None:
    """``cfg.epochs`` epochs of minibatch training on ``(x, y)`` (already task-transformed).

    ``after_backward`` runs between ``loss.backward()`` and ``optimizer.step()`` (``EWC.apply_``).
    """
    model.train()
    n = x.shape[0]
    bs = int(cfg.batch_size)
    n_batches = (n + bs - 1) // bs
    bar = _progress(cfg.epochs * n_batches, desc, progress)
    dev = x.device
    for epoch in range(cfg.epochs):
        order = torch.randperm(n, generator=generator).to(dev)
        for b in range(n_batches):
            idx = order[b * bs : (b + 1) * bs]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            if after_backward is not None:
                after_backward()
            optimizer.step()
            if bar is not None:
                bar.update(1)
                if b % 20 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    if bar is not None:
        bar.close()


# --------------------------------------------------------------------------------------------
# consolidation strategies
# --------------------------------------------------------------------------------------------
class _Strategy:
    """What a method does around training: ``attach`` once, ``after_backward`` each step,
    ``end_task`` after each task (returns seconds spent estimating importances)."""

    def __init__(self, model: nn.Module, cfg: RunConfig):
        self.model, self.cfg = model, cfg

    def attach(self, optimizer) -> None:
        pass

    after_backward = None

    def end_task(self, x_imp: torch.Tensor, y_imp: torch.Tensor, generator) -> float:
        return 0.0


class _EWCStrategy(_Strategy):
    def __init__(self, model, cfg, importance_method: str | None):
        super().__init__(model, cfg)
        EWC = _lib("EWC")
        kw = {"stabilize_lr": cfg.lr} if cfg.stabilize else {}
        self.ewc = EWC(model, cfg.lam, mode="separate", **kw)
        self.importance_method = importance_method
        self.after_backward = self.ewc.apply_

    def end_task(self, x_imp, y_imp, generator) -> float:
        t0 = time.perf_counter()
        if self.importance_method is None:
            imp = unit_importance(self.model)
        else:
            imp = estimate(self.model, x_imp, y_imp, (self.importance_method,), self.cfg, generator=generator)[
                self.importance_method
            ]
        dt = time.perf_counter() - t0
        self.ewc.consolidate(imp)
        return dt


class _SIStrategy(_Strategy):
    """Zenke's SI: path integral per optimizer step; after each task the penalty is rebuilt as one
    quadratic at the latest parameters with the running importance ``si.cumulative`` (a fresh
    online :class:`ewc_fast.EWC`, λ = 2c). Kutalev's unclipped variant can produce negative
    entries: they are clamped at 0 for the penalty (EWC needs Ω ≥ 0)."""

    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self._SI = _lib("SynapticIntelligence")
        self._EWC = _lib("EWC")
        self.si = self._SI(model, xi=cfg.si_xi, variant=cfg.si_variant)
        self.ewc = None

    def after_backward(self):
        if self.ewc is not None:
            self.ewc.apply_()

    def attach(self, optimizer):
        self.si.attach(optimizer)

    def end_task(self, x_imp, y_imp, generator) -> float:
        t0 = time.perf_counter()
        self.si.consolidate()
        cum = self.si.cumulative
        dt = time.perf_counter() - t0
        if any(bool((t < 0).any()) for t in cum.values()):
            cum = type(cum)(
                {k: t.clamp_min(0) for k, t in cum.items()}, method=cum.method, n_samples=cum.n_samples, meta=cum.meta
            )
        kw = {"stabilize_lr": self.cfg.lr} if self.cfg.stabilize else {}
        self.ewc = self._EWC(self.model, self.cfg.lam, mode="online", **kw).consolidate(cum)
        return dt


class _WVAStrategy(_Strategy):
    def __init__(self, model, cfg):
        super().__init__(model, cfg)
        self.wva = _lib("WVA")(model, cfg.lam)

    def attach(self, optimizer):
        self.wva.attach(optimizer)

    def end_task(self, x_imp, y_imp, generator) -> float:
        t0 = time.perf_counter()
        m = self.cfg.wva_importance
        imp = estimate(self.model, x_imp, y_imp, (m,), self.cfg, generator=generator)[m]
        dt = time.perf_counter() - t0
        self.wva.consolidate(imp)
        return dt


def _make_strategy(model: nn.Module, cfg: RunConfig) -> _Strategy:
    m = cfg.method
    if m == "none":
        return _Strategy(model, cfg)
    if m == "l2":
        return _EWCStrategy(model, cfg, None)
    if m in IMPORTANCE_METHODS:
        return _EWCStrategy(model, cfg, m)
    if m == "si":
        return _SIStrategy(model, cfg)
    if m == "wva":
        return _WVAStrategy(model, cfg)
    raise ValueError(m)


# --------------------------------------------------------------------------------------------
# one run
# --------------------------------------------------------------------------------------------
def _to_tensors(data: MNIST):
    return (
        torch.from_numpy(data.x_train),
        torch.from_numpy(data.y_train),
        torch.from_numpy(data.x_test),
        torch.from_numpy(data.y_test),
    )


def run_sequence(
    data: MNIST,
    tasks: list[Task],
    cfg: RunConfig,
    *,
    seed: int = 0,
    progress: bool = False,
    model: nn.Module | None = None,
    on_task_end: Callable | None = None,
    log: Callable[[str], None] | None = None,
    setup: Callable | None = None,
) -> RunResult:
    """Train a fresh model (seeded ``seed``) on ``tasks`` in order; return the accuracy matrix.

    ``setup(model, optimizer)`` runs once after the method's own hooks are attached (e.g. to
    attach an extra SI tracker); ``on_task_end(stage, model, x_imp, y_imp, strategy)`` runs after
    each task's consolidation and evaluation (``x_imp, y_imp``: the task-transformed importance
    samples).
    """
    dev = resolve_device(cfg.device)
    torch.manual_seed(seed)
    if model is None:
        n_out = tasks[0].n_outputs or data.n_classes
        model = build_model(cfg.model, n_in=data.n_features, n_out=n_out)
    model = model.to(dev)
    gen = torch.Generator().manual_seed(seed)
    strategy = _make_strategy(model, cfg)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)
    strategy.attach(optimizer)
    if setup is not None:
        setup(model, optimizer)

    x_tr, y_tr, x_te, y_te = _to_tensors(data)
    x_te, y_te = x_te.to(dev), y_te.to(dev)
    T = len(tasks)

    def eval_all():
        accs, losses = [], []
        for task in tasks:
            a, l = evaluate(model, x_te, y_te, task, cfg.eval_batch)
            accs.append(a)
            losses.append(l)
        return accs, losses

    initial, _ = eval_all()
    R, L, curve = [], [], []
    train_time = imp_time = 0.0
    for i, task in enumerate(tasks):
        x_task, y_task = task.apply(x_tr, y_tr)
        x_task, y_task = x_task.to(dev), y_task.to(dev)

        def on_epoch_end(epoch, _i=i):
            if cfg.eval_every_epoch and epoch < cfg.epochs - 1:
                accs, _ = eval_all()
                curve.append({"stage": _i, "epoch": epoch + 1, "acc": accs})

        t0 = time.perf_counter()
        train_task(
            model,
            optimizer,
            x_task,
            y_task,
            cfg,
            generator=gen,
            after_backward=strategy.after_backward,
            on_epoch_end=on_epoch_end,
            progress=progress,
            desc=f"{cfg.method} task {i + 1}/{T}",
        )
        train_time += time.perf_counter() - t0
        x_imp, y_imp = importance_subset(x_task, y_task, cfg.n_importance)
        if i < T - 1 or on_task_end is not None:  # the last task needs no consolidation
            imp_time += strategy.end_task(x_imp, y_imp, gen)
        accs, losses = eval_all()
        R.append(accs)
        L.append(losses)
        curve.append({"stage": i, "epoch": cfg.epochs, "acc": accs})
        if log is not None:
            log(
                f"  [{cfg.method} λ={cfg.lam:g} seed={seed}] after task {i + 1}/{T}: "
                f"mean acc (seen) {np.mean(accs[: i + 1]):.4f}  " + " ".join(f"{a:.3f}" for a in accs)
            )
        if on_task_end is not None:
            on_task_end(i, model, x_imp, y_imp, strategy)
        del x_task, y_task
    return RunResult(cfg.method, cfg.lam, seed, [t.name for t in tasks], R, L, initial, curve, train_time, imp_time)


# --------------------------------------------------------------------------------------------
# several methods × λs × runs
# --------------------------------------------------------------------------------------------
def summarize_runs(results: list[RunResult]) -> dict:
    finals = np.array([r.final_mean_acc for r in results])
    R = np.mean([np.asarray(r.R) for r in results], axis=0)
    return {
        "n_runs": len(results),
        "final_mean_acc": float(finals.mean()),
        "final_mean_acc_std": float(finals.std(ddof=1)) if len(finals) > 1 else 0.0,
        "bwt": float(np.mean([r.bwt for r in results])),
        "fwt": float(np.mean([r.fwt for r in results])),
        "R_mean": R.tolist(),
        "mean_acc_seen": mean_accuracy_seen(R),
        "mean_acc_all": [float(np.mean(r)) for r in R],
        "train_time_s": float(np.sum([r.train_time_s for r in results])),
        "importance_time_s": float(np.sum([r.importance_time_s for r in results])),
    }


def run_experiment(
    data: MNIST,
    base: RunConfig,
    methods,
    *,
    lams: dict | None = None,
    n_tasks: int = 10,
    task_kind: str = "permuted",
    first_identity: bool = True,
    runs: int = 1,
    seed: int = 0,
    progress: bool = False,
    relabel: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict:
    """Every method in ``methods`` × every λ in ``lams[method]`` × ``runs`` seeds.

    Run ``k`` uses seed ``seed + k`` for the initial weights, the task permutations and the
    shuffling, shared by all methods (paired comparison). Returns a JSON-ready dict:
    ``{"methods": {m: {"lams": {λ: {"summary", "runs"}}, "best_lam"}}}``.
    """
    out = {
        "config": base.to_dict(),
        "n_tasks": n_tasks,
        "task_kind": task_kind,
        "first_identity": first_identity,
        "relabel": relabel,
        "runs": runs,
        "seed": seed,
        "data": data.source,
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "methods": {},
    }
    for method in methods:
        grid = (lams or {}).get(method) or [default_lam(method, stabilize=base.stabilize)[0]]
        if method == "none":
            grid = [0.0]
        per_lam = {}
        for lam in grid:
            cfg = dataclasses.replace(base, method=method, lam=float(lam))
            results = []
            for k in range(runs):
                s = seed + k
                tasks = build_tasks(
                    task_kind, n_tasks, s, first_identity=first_identity, n_pixels=data.n_features, relabel=relabel
                )
                results.append(run_sequence(data, tasks, cfg, seed=s, progress=progress, log=log))
            summary = summarize_runs(results)
            per_lam[f"{lam:g}"] = {"lam": float(lam), "summary": summary, "runs": [r.to_dict() for r in results]}
            if log is not None:
                log(
                    f"{method:>12s} λ={lam:<8g} final mean acc {summary['final_mean_acc']:.4f}"
                    f" ± {summary['final_mean_acc_std']:.4f}  BWT {summary['bwt']:+.4f}"
                )
        best = max(per_lam.values(), key=lambda v: v["summary"]["final_mean_acc"])
        out["methods"][method] = {
            "lams": per_lam,
            "best_lam": best["lam"],
            "best_final_mean_acc": best["summary"]["final_mean_acc"],
        }
    return out
