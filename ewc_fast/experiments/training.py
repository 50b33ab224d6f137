"""Building blocks of one task: train it, evaluate on it, estimate importances after it.

Every experiment (:mod:`.continual`, :mod:`.overlap`, :mod:`.prune`, :mod:`.correlate`,
:mod:`.reproduce`) trains through these functions, so a run differs from another only in what it
does around them (the consolidation strategy, :mod:`.strategies`, and the runner's hooks).

* :func:`make_optimizer` — ``cfg.optimizer``: Adam (``lr``) or SGD (``lr``, ``momentum``).
* :func:`train_task` — ``epochs`` epochs of minibatch cross-entropy training; the minibatch order
  is ``torch.randperm(n, generator)`` per epoch, and ``after_backward`` runs between
  ``loss.backward()`` and ``optimizer.step()`` (where ``EWC.apply_`` adds the penalty gradient);
  with ``cfg.clip_norm`` the total gradient (penalty included) is clipped to that L2 norm before
  the step (``torch.nn.utils.clip_grad_norm_``). Multi-head tasks score only their head's columns.
* :func:`evaluate` — accuracy and mean cross-entropy on a task's test set.
* :func:`estimate` — :func:`ewc_fast.estimate_importance` in eval mode on minibatches of
  ``importance_batch`` samples; :func:`importance_subset` picks the last ``n`` training samples
  (Kutalev & Lapina 2021, arXiv 2109.10021, compute importances on the last 5000);
  :func:`unit_importance` is Ω = 1 (EWC as an L2 pull to the anchor).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ..estimation import estimate_importance
from ..importance import Importance
from .models import sig_activations
from .tasks import Task

if TYPE_CHECKING:  # the run configuration; imported for annotations only (continual imports this module)
    from .continual import RunConfig

__all__ = [
    "OPTIMIZERS",
    "make_optimizer",
    "resolve_device",
    "unit_importance",
    "importance_subset",
    "minibatches",
    "estimate",
    "evaluate",
    "train_task",
]


#: optimizers of :func:`make_optimizer`
OPTIMIZERS = ("adam", "sgd")


def make_optimizer(model: nn.Module, cfg: RunConfig) -> torch.optim.Optimizer:
    """``torch.optim.Adam(lr)`` or ``torch.optim.SGD(lr, momentum)`` over all of ``model``'s parameters."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, foreach=True)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, foreach=True)
    raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {cfg.optimizer!r}")


def resolve_device(device: str = "auto") -> torch.device:
    """``"auto"`` → CUDA if available, else CPU; any other string → ``torch.device(device)``."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def unit_importance(model: nn.Module) -> Importance:
    """Ω = 1 for every trainable parameter (turns EWC into an L2 pull to the anchor)."""
    return Importance(
        {n: torch.ones_like(p, dtype=torch.float32) for n, p in model.named_parameters() if p.requires_grad},
        method="unit",
        n_samples=0,
    )


def importance_subset(x: torch.Tensor, y: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The last ``n`` samples (Kutalev & Lapina compute importances on the last 5000)."""
    n = min(int(n), x.shape[0])
    return x[x.shape[0] - n :], y[y.shape[0] - n :]


def minibatches(x: torch.Tensor, y: torch.Tensor, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``[(x[i:i+b], y[i:i+b]) for i = 0, b, 2b, …]`` in order (the last batch may be smaller)."""
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]


def estimate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    methods: Sequence[str],
    cfg: RunConfig,
    *,
    generator: torch.Generator | None = None,
    task: Task | None = None,
) -> dict:
    """``estimate_importance`` on ``(x, y)`` in eval mode (restores the training mode).

    Uses ``cfg.importance_batch``, ``cfg.mas_output``, ``cfg.mc_samples`` and ``cfg.backend``; SIG
    gets the model's activations (:func:`ewc_fast.experiments.models.sig_activations`). A
    multi-head ``task`` restricts the outputs to its head (:meth:`Task.logits`).
    """
    was_training = model.training
    model.eval()
    # a multi-head task: the model's output is cut to the head inside its forward (a forward hook),
    # where the estimator follows the samples through the slice
    hook = None
    if task is not None and task.head is not None:
        hook = model.register_forward_hook(lambda _m, _i, out: task.logits(out))
    try:
        return estimate_importance(
            model,
            minibatches(x, y, cfg.importance_batch),
            methods=tuple(methods),
            mas_output=cfg.mas_output,
            mc_samples=cfg.mc_samples,
            backend=cfg.backend,
            progress=False,
            generator=generator,
            sig_activation=(sig_activations(model) or None) if "sig" in methods else None,
        )
    finally:
        if hook is not None:
            hook.remove()
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
        out = task.logits(model(xb))
        loss += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    model.train(was_training)
    return (correct / n if n else float("nan")), (loss / n if n else float("nan"))


def _progress_bar(total: int, desc: str, enabled: bool):
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
    task: Task | None = None,
    on_step: Callable[[int, float], bool | None] | None = None,
) -> None:
    """``cfg.epochs`` epochs of minibatch training on ``(x, y)`` (already task-transformed).

    ``after_backward`` runs between ``loss.backward()`` and ``optimizer.step()`` (``EWC.apply_``),
    then the gradient is clipped to ``cfg.clip_norm`` if set. ``cfg.steps_per_task`` (if set)
    replaces the epoch count: exactly that many steps, epochs repeated as needed. ``task`` (multi-head) restricts the
    loss to its head's columns. ``on_step(step, task_loss)`` runs after every optimizer step; when
    it returns True training stops (e.g. a diverged run).
    """
    model.train()
    n = x.shape[0]
    bs = int(cfg.batch_size)
    n_batches = (n + bs - 1) // bs
    bar = _progress_bar(cfg.epochs * n_batches, desc, progress)
    dev = x.device
    head = task.logits if task is not None and task.head is not None else None
    clip = getattr(cfg, "clip_norm", None)
    max_steps = getattr(cfg, "steps_per_task", None)
    n_epochs = cfg.epochs if max_steps is None else -(-int(max_steps) // n_batches)
    step = 0
    for epoch in range(n_epochs):
        order = torch.randperm(n, generator=generator).to(dev)
        for b in range(n_batches):
            idx = order[b * bs : (b + 1) * bs]
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            optimizer.zero_grad(set_to_none=True)
            out = model(xb)
            loss = F.cross_entropy(head(out) if head is not None else out, yb)
            loss.backward()
            if after_backward is not None:
                after_backward()
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
            optimizer.step()
            step += 1
            if bar is not None:
                bar.update(1)
                if b % 20 == 0:
                    bar.set_postfix(loss=f"{float(loss.detach()):.3f}", refresh=False)
            stop = on_step is not None and on_step(step, float(loss.detach()))
            if stop or (max_steps is not None and step >= max_steps):
                if bar is not None:
                    bar.close()
                return
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    if bar is not None:
        bar.close()
