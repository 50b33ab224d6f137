"""Peer: ``torch.func`` ``vmap(grad)`` per-sample gradients (float32, chunked to the memory budget),
through the same :func:`~benchmarks.contenders.oracle.func_persample` the oracle uses in float64."""

from __future__ import annotations

import torch

from .base import FISHER, FISHER_EXACT, MAS, Contender
from .budget import micro_batch
from .oracle import func_persample


class TorchFunc(Contender):
    """Empirical Fisher, MAS and exact Fisher (one ``vmap(grad)`` pass per class) with ``torch.func``."""

    name = "torch.func"
    label = "torch.func vmap(grad), chunked (float32); exact Fisher: one vmap(grad) pass per class"
    kind = "peer"
    methods = (FISHER, MAS, FISHER_EXACT)

    def version(self):
        return torch.__version__

    def prepare(self, workload, model, batches, device, methods):
        n_params = sum(p.numel() for p in model.parameters())
        chunk = micro_batch(workload.batch_size, n_params, copies=2.0, device=device)
        if (workload.has_mha or workload.kind == "transformer") and torch.device(device).type == "cpu":
            self._note("no vmap batching rule for CPU SDPA: torch falls back to a per-sample loop there")
        if chunk < workload.batch_size:
            self._note(f"chunks of {chunk} samples (memory budget)")

        def run():
            return func_persample(model, batches, methods, workload.loss_per_sample, chunk, torch.float32)

        return run
