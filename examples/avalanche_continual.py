"""Avalanche with ewc_fast's plugins: exact per-sample EWC next to Avalanche's own EWC plugin.

Runs a Naive strategy on a small benchmark of three conflicting experiences (synthetic data, built
locally) with no plugin, Avalanche's ``EWCPlugin`` and ``ewc_fast.integrations.avalanche.EWCPlugin``
(same ``ewc_lambda``), and prints the loss on the first experience after each one. Needs the Avalanche
environment (``bash scripts/avalanche_env.sh``: avalanche-lib imports torchvision).

    .venv-avalanche/bin/python examples/avalanche_continual.py
"""

from __future__ import annotations

import argparse
import warnings

import torch
import torch.nn.functional as F
from avalanche.benchmarks.scenarios.dataset_scenario import benchmark_from_datasets
from avalanche.benchmarks.utils import as_classification_dataset
from avalanche.training import plugins as avalanche_plugins
from avalanche.training.supervised import Naive
from torch import nn
from torch.utils.data import TensorDataset

from ewc_fast.integrations.avalanche import EWCPlugin


def make_benchmark(n_exp: int = 3, n: int = 128, seed: int = 0):
    """Experience k: Gaussian inputs, labels of one fixed linear rule shifted by k (they conflict)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(8, 3, generator=g)
    sets, raw = [], []
    for k in range(n_exp):
        x = torch.randn(n, 8, generator=g)
        d = TensorDataset(x, ((x @ w).argmax(1) + k) % 3)
        d.targets = d.tensors[1].tolist()
        sets.append(as_classification_dataset(d))
        raw.append(d.tensors)
    return benchmark_from_datasets(train=sets, test=sets), raw


def run(plugin, n_exp: int, epochs: int) -> list[float]:
    """Loss on experience 0 after training each experience."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 3))
    bench, raw = make_benchmark(n_exp)
    strategy = Naive(
        model=model,
        optimizer=torch.optim.Adam(model.parameters(), lr=1e-2),
        train_mb_size=16,
        train_epochs=epochs,
        plugins=[plugin] if plugin is not None else [],
        evaluator=None,
    )
    x0, y0 = raw[0]
    out = []
    for exp in bench.train_stream:
        strategy.train(exp)
        with torch.no_grad():
            out.append(float(F.cross_entropy(model(x0), y0)))
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--experiences", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--ewc-lambda", type=float, default=50.0, help="Avalanche's convention (no 1/2)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    res = {
        "none": run(None, args.experiences, args.epochs),
        "avalanche": run(avalanche_plugins.EWCPlugin(args.ewc_lambda), args.experiences, args.epochs),
        "ewc_fast": run(EWCPlugin(args.ewc_lambda), args.experiences, args.epochs),
    }
    for name, losses in res.items():
        print(f"{name:10s} loss on experience 0 after each experience: " + ", ".join(f"{v:.3f}" for v in losses))
    return res


if __name__ == "__main__":
    main()
