"""Reference contenders: the plain forward+backward (the unit every time is divided by) and the
batch-1 loop (one forward/backward per sample, the straightforward way to per-sample gradients)."""

from __future__ import annotations

import torch
from torch import nn

from ..workloads import Workload
from .base import FISHER, MAS, Contender, RunFn, named_params, scale_, zeros_like_params
from .budget import n_samples_of


def plain_fwd_bwd_fn(workload: Workload, model: nn.Module, batches) -> RunFn:
    """One forward + backward of the summed per-sample loss over every batch; returns ``{}``."""
    params = [p for _, p in named_params(model)]

    def run():
        for x, y in batches:
            for p in params:
                p.grad = None
            workload.loss_per_sample(model(x), y).sum().backward()
        for p in params:
            p.grad = None
        return {}

    return run


class PlainFwdBwd(Contender):
    """One plain forward + backward of the summed per-sample loss over the same data (the unit)."""

    name = "plain"
    label = "plain forward+backward (reference unit)"
    kind = "reference"
    methods = ()

    def prepare(self, workload, model, batches, device, methods):
        return plain_fwd_bwd_fn(workload, model, batches)


class PerSampleLoop(Contender):
    """Batch-1 backward loop, float32: Fisher ``(1/N) sum_n g_n**2`` and MAS ``(1/N) sum_n |d||f||**2/d theta|``
    from one forward/backward per sample."""

    name = "per-sample-loop"
    label = "per-sample loop (batch-1 forward/backward per sample)"
    kind = "reference"
    methods = (FISHER, MAS)

    def prepare(self, workload, model, batches, device, methods):
        pnames = named_params(model)
        params = [p for _, p in pnames]
        n_total = n_samples_of(batches)
        model.eval()

        def run():
            acc = {m: zeros_like_params(model) for m in methods}
            for x, y in batches:
                for i in range(x.shape[0]):
                    out = model(x[i : i + 1])
                    if FISHER in methods:
                        gs = torch.autograd.grad(
                            workload.loss_per_sample(out, y[i : i + 1]).sum(), params, retain_graph=MAS in methods
                        )
                        for (n, _), g in zip(pnames, gs):
                            acc[FISHER][n].addcmul_(g, g)
                    if MAS in methods:
                        gs = torch.autograd.grad(out.pow(2).sum(), params)
                        for (n, _), g in zip(pnames, gs):
                            acc[MAS][n].add_(g.abs())
            return {m: scale_(d, 1.0 / n_total) for m, d in acc.items()}

        return run
