"""Baseline: Avalanche's importance algorithms (Lomonaco et al. 2021, arXiv 2104.00405), reproduced
here because Avalanche itself needs torchvision (no CPU build in this environment).

Avalanche's EWC ``compute_importances`` and MAS ``_get_importance`` square (Fisher) or take the
absolute value of (MAS) the *batch-mean* gradient of each mini-batch, then average over the B
batches: ``(1/B) sum_b ((1/|b|) sum_{n in b} g_n)**2`` instead of ``(1/N) sum_n g_n**2``. Biased and
batch-size dependent (van de Ven 2025, arXiv 2502.11756): labelled approximate in the report.
"""

from __future__ import annotations

import torch

from .base import FISHER, MAS, Contender, Quantity, named_params, scale_, zeros_like_params


class AvalancheStyle(Contender):
    """Batch-mean-squared Fisher / abs-batch-mean MAS, as Avalanche computes them."""

    name = "avalanche-style"
    label = "Avalanche-style batch-mean**2 Fisher / |batch-mean| MAS (reproduced)"
    kind = "baseline"
    methods = (FISHER, MAS)

    def quantity(self, workload, method):
        what = "square of batch-mean gradient" if method == FISHER else "abs of batch-mean gradient"
        return Quantity(method, False, what)

    def prepare(self, workload, model, batches, device, methods):
        pnames = named_params(model)
        model.eval()

        def run():
            acc = {m: zeros_like_params(model) for m in methods}
            for x, y in batches:
                if FISHER in methods:
                    model.zero_grad(set_to_none=True)
                    workload.loss_per_sample(model(x), y).mean().backward()
                    for n, p in pnames:
                        acc[FISHER][n] += p.grad.pow(2)
                if MAS in methods:
                    model.zero_grad(set_to_none=True)
                    torch.linalg.vector_norm(model(x), dim=1).pow(2).mean().backward()
                    for n, p in pnames:
                        acc[MAS][n] += p.grad.abs()
            model.zero_grad(set_to_none=True)
            return {m: scale_(d, 1.0 / len(batches)) for m, d in acc.items()}

        return run
