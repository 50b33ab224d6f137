"""Peer: the real Avalanche 0.6 (``avalanche-lib``; Lomonaco et al. 2021, arXiv 2104.00405) EWC and MAS
importance passes.

Avalanche imports torchvision, which imports only beside its own torch build, so this contender runs in
the side environment of ``scripts/avalanche_env.sh`` (torch 2.14.1 + torchvision 0.29.1) and is
``unavailable`` elsewhere. Its rows are merged into the report with ``python -m benchmarks.compare
--merge ... --merge-rows``; each row notes the torch it ran under.

* Fisher: ``EWCPlugin.compute_importances(model, CrossEntropyLoss(), optimizer, dataset, device,
  batch_size)`` -- the square of each mini-batch's *mean* gradient, averaged over batches.
* MAS: ``MASPlugin._get_importance(strategy)`` -- the absolute value of each mini-batch's mean gradient
  of ``||f(x)||^2``, averaged over batches. The strategy it reads (``model``, ``experience.dataset``,
  ``train_mb_size``, ``optimizer``, ``device``) is a plain namespace here; the code that runs is
  Avalanche's.

Both are batch-size dependent approximations (van de Ven 2025, arXiv 2502.11756): labelled approximate,
the error column shows how far they are from the per-sample quantities. The reproduction
(:mod:`.avalanche_style`) computes the same numbers; the error columns of the two agree.
"""

from __future__ import annotations

import types

import torch
from torch.utils.data import TensorDataset

from .base import FISHER, MAS, Contender, Quantity, Unsupported


class AvalancheLib(Contender):
    """``avalanche.training.plugins.EWCPlugin`` / ``MASPlugin`` importance passes (real library)."""

    name = "avalanche"
    label = "Avalanche 0.6 EWCPlugin / MASPlugin importance passes (real library, Avalanche environment)"
    kind = "peer"
    methods = (FISHER, MAS)
    module = "avalanche"

    def quantity(self, workload, method):
        what = "square of batch-mean gradient" if method == FISHER else "abs of batch-mean gradient"
        return Quantity(method, False, what)

    def version(self):
        try:
            from importlib.metadata import version

            return version("avalanche-lib")
        except Exception:
            return "?"

    def prepare(self, workload, model, batches, device, methods):
        try:
            from avalanche.training.plugins import EWCPlugin, MASPlugin
        except Exception as exc:
            raise Unsupported(f"avalanche not importable ({type(exc).__name__}: {exc})") from exc
        sizes = {int(x.shape[0]) for x, _ in batches[:-1]}
        if len(sizes) > 1:
            raise Unsupported("ragged batches: Avalanche re-batches the dataset with one batch size")
        batch_size = int(batches[0][0].shape[0])
        dataset = TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        self._note(f"run under torch {torch.__version__} (Avalanche environment)")
        strategy = types.SimpleNamespace(
            model=model,
            experience=types.SimpleNamespace(dataset=dataset),
            train_mb_size=batch_size,
            optimizer=optimizer,
            device=torch.device(device),
        )

        def run():
            out = {}
            if FISHER in methods:
                imp = EWCPlugin(1.0).compute_importances(
                    model, torch.nn.CrossEntropyLoss(), optimizer, dataset, torch.device(device), batch_size
                )
                out[FISHER] = {k: v.data for k, v in imp.items()}
            if MAS in methods:
                imp = MASPlugin(1.0)._get_importance(strategy)
                out[MAS] = {k: v.data for k, v in imp.items()}
            model.zero_grad(set_to_none=True)
            model.eval()
            return out

        return run
