"""Peer: Opacus ``GradSampleModule`` (Yousefpour et al. 2021, arXiv 2109.12298): per-sample gradients
``grad_sample`` of the summed loss, squared and summed (Fisher) or of ``||f||**2``, abs and summed
(MAS), in micro-batches that keep the per-sample gradients under the memory budget."""

from __future__ import annotations

from torch import nn

from .base import FISHER, MAS, Contender, Unsupported, named_params, refuse_modules, scale_, zeros_like_params
from .budget import micro_batch, n_samples_of, split_batches


class OpacusGSM(Contender):
    """``GradSampleModule(model, loss_reduction="sum")``; ``p.grad_sample`` per micro-batch."""

    name = "opacus"
    label = "Opacus GradSampleModule (loss_reduction='sum'), grad_sample**2 summed"
    module = "opacus"
    methods = (FISHER, MAS)

    def prepare(self, workload, model, batches, device, methods):
        from opacus import GradSampleModule

        refuse_modules(
            model,
            lambda mod: isinstance(mod, nn.MultiheadAttention),
            lambda name, mod: (
                f"nn.MultiheadAttention ({name}): Opacus' functorch fallback calls it with the "
                "query only (TypeError: missing 'key' and 'value'); Opacus needs its own "
                "DPMultiheadAttention, a different module with different parameters"
            ),
        )
        model.train()  # Opacus only captures activations in training mode (no dropout/BN here)
        try:
            gsm = GradSampleModule(model, loss_reduction="sum", batch_first=True, strict=True)
        except Exception as exc:
            raise Unsupported(f"GradSampleModule: {type(exc).__name__}: {exc}") from exc
        pnames = named_params(model)
        n_params = sum(p.numel() for _, p in pnames)
        m = micro_batch(workload.batch_size, n_params, copies=2.0, device=device)
        if m < workload.batch_size:
            self._note(f"micro-batches of {m} samples (memory budget)")
        n_total = n_samples_of(batches)

        def collect(acc, fn):
            for n, p in pnames:
                gsamp = p.grad_sample
                if gsamp is None:
                    raise Unsupported(f"no grad_sample for {n}")
                acc[n] += fn(gsamp)

        def run():
            acc = {mm: zeros_like_params(model) for mm in methods}
            for x, y in split_batches(batches, m):
                if FISHER in methods:
                    gsm.zero_grad(set_to_none=True)
                    workload.loss_per_sample(gsm(x), y).sum().backward()
                    collect(acc[FISHER], lambda g: g.pow(2).sum(0))
                if MAS in methods:
                    gsm.zero_grad(set_to_none=True)
                    gsm(x).pow(2).sum().backward()
                    collect(acc[MAS], lambda g: g.abs().sum(0))
            gsm.zero_grad(set_to_none=True)
            return {mm: scale_(d, 1.0 / n_total) for mm, d in acc.items()}

        return run
