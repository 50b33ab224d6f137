"""Peer: BackPACK (Dangel et al. 2020, arXiv 1912.10985): ``SumGradSquared`` on the summed loss gives
``sum_n g_n**2`` (Fisher) directly; MAS takes ``|.|`` of ``BatchGrad``'s per-sample gradients of
``||f||**2``, in micro-batches under the memory budget (``BatchGrad`` materialises N x P)."""

from __future__ import annotations

from torch import nn

from .base import FISHER, MAS, Contender, named_params, refuse_modules, scale_, zeros_like_params
from .budget import micro_batch, n_samples_of, split_batches


class BackPACK(Contender):
    """``extend(model)``; ``with backpack(SumGradSquared())`` / ``with backpack(BatchGrad())``."""

    name = "backpack"
    label = "BackPACK SumGradSquared (reduction='sum'); MAS via BatchGrad |.| summed"
    module = "backpack"
    methods = (FISHER, MAS)

    def prepare(self, workload, model, batches, device, methods):
        from backpack import backpack, extend
        from backpack.extensions import BatchGrad, SumGradSquared

        exts = ([SumGradSquared()] if FISHER in methods else []) + ([BatchGrad()] if MAS in methods else [])
        for ext in exts:  # first-order extensions skip unknown layers with a warning: refuse instead
            known = ext.__dict__.get("_BackpropExtension__module_extensions")
            if known is None:
                continue
            refuse_modules(
                model,
                lambda mod, known=known: (
                    type(mod) not in known and any(p.requires_grad for p in mod.parameters(recurse=False))
                ),
                lambda name, mod, ext=ext: (
                    f"no BackPACK {type(ext).__name__} extension for {type(mod).__name__} ({name})"
                ),
            )
        model = extend(model)
        lossfn = extend(nn.CrossEntropyLoss(reduction="sum"))
        pnames = named_params(model)
        n_params = sum(p.numel() for _, p in pnames)
        n_total = n_samples_of(batches)
        m = workload.batch_size
        if MAS in methods or workload.sequence:  # BatchGrad / per-sample einsum materialise N x P
            m = micro_batch(workload.batch_size, n_params, copies=2.0, device=device)
            if m < workload.batch_size:
                self._note(f"micro-batches of {m} samples (memory budget)")

        def run():
            acc = {mm: zeros_like_params(model) for mm in methods}
            for x, y in split_batches(batches, m):
                if FISHER in methods:
                    model.zero_grad(set_to_none=True)
                    loss = lossfn(model(x), y)
                    with backpack(SumGradSquared()):
                        loss.backward()
                    for n, p in pnames:
                        acc[FISHER][n] += p.sum_grad_squared
                        del p.sum_grad_squared
                if MAS in methods:
                    model.zero_grad(set_to_none=True)
                    out = model(x).pow(2).sum()
                    with backpack(BatchGrad()):
                        out.backward()
                    for n, p in pnames:
                        acc[MAS][n] += p.grad_batch.abs().sum(0)
                        del p.grad_batch
            model.zero_grad(set_to_none=True)
            return {mm: scale_(d, 1.0 / n_total) for mm, d in acc.items()}

        return run
