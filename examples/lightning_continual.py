"""Continual learning with Lightning and EWC: one ``ConsolidationCallback``, one ``trainer.fit`` per task.

The callback adds the EWC gradient once per optimizer step (after ``accumulate_grad_batches``
micro-batches, before Lightning's gradient clipping), estimates the exact per-sample Fisher on each
task's data when ``fit`` ends, and keeps the EWC state in every Lightning checkpoint. Two tasks of
synthetic data that conflict on the same inputs; plain fine-tuning and EWC are compared.

    python examples/lightning_continual.py      # seconds on a CPU
"""

from __future__ import annotations

import argparse
import logging
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import ewc_fast
from ewc_fast.integrations.lightning import ConsolidationCallback


class Classifier(pl.LightningModule):
    """A small MLP trained with Adam."""

    def __init__(self, d_in: int = 8, n_classes: int = 3, lr: float = 1e-2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(d_in, 32), nn.Tanh(), nn.Linear(32, n_classes))
        self.lr = lr

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def make_task(task: int, n: int = 128, d_in: int = 8, seed: int = 0) -> TensorDataset:
    """Gaussian inputs, labels from a fixed random linear rule shifted by ``task`` (tasks conflict)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_in, 3, generator=torch.Generator().manual_seed(1234))
    x = torch.randn(n, d_in, generator=g)
    y = ((x @ w).argmax(1) + task) % 3
    return TensorDataset(x, y)


def trainer(max_epochs: int, **kw) -> pl.Trainer:
    """A quiet CPU Trainer."""
    base = dict(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    base.update(kw)
    return pl.Trainer(**base)


def loss_on(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def run(tasks: int, epochs: int, lam: float | None) -> list[list[float]]:
    """L[i][j]: loss on task j after training task i; ``lam=None``: plain fine-tuning."""
    model = Classifier()
    train = [make_task(k, seed=10 + k) for k in range(tasks)]
    test = [make_task(k, n=256, seed=20 + k) for k in range(tasks)]
    callbacks = []
    if lam is not None:
        # --- the recipe ---
        cb = ConsolidationCallback(ewc=ewc_fast.EWC(model, lam=lam), importance="fisher")
        callbacks.append(cb)
    out = []
    for k in range(tasks):
        if lam is not None:
            cb.importance_data = DataLoader(train[k], batch_size=32)  # the Fisher of task k at fit's end
        loader = DataLoader(train[k], batch_size=16, shuffle=True)
        trainer(epochs, callbacks=callbacks, accumulate_grad_batches=2).fit(model, loader)
        out.append([loss_on(model, t) for t in test])
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--lam", type=float, default=100.0)
    args = ap.parse_args(argv)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    pl.seed_everything(0, verbose=False)
    plain = run(args.tasks, args.epochs, None)
    pl.seed_everything(0, verbose=False)
    ewc = run(args.tasks, args.epochs, args.lam)
    result = {"loss_plain": plain, "loss_ewc": ewc}
    for name, L in (("plain", plain), ("ewc", ewc)):
        result[f"forgetting_{name}"] = L[-1][0] - L[0][0]
        print(
            f"{name:5s}: task-1 loss {L[0][0]:.3f} -> {L[-1][0]:.3f} after the last task "
            f"(forgetting {L[-1][0] - L[0][0]:+.3f}); last task's loss {L[-1][-1]:.3f}"
        )
    return result


if __name__ == "__main__":
    main()
