"""Peer: ASDL (Osawa et al. 2023, arXiv 2305.04684; package ``asdfghjkl``) ``FisherEmp`` with
``SHAPE_DIAG``: the diagonal empirical Fisher, read back from each module's ``fisher.diag``."""

from __future__ import annotations

from .base import FISHER, Contender, Quantity, Unsupported, named_params
from .budget import n_samples_of


class ASDL(Contender):
    """``asdl.get_fisher_maker(model, FisherConfig(FISHER_EMP, [SHAPE_DIAG]))``, accumulated over batches.

    On sequence workloads ASDL flattens tokens / positions into samples, so its result is the
    per-token approximation (labelled approximate)."""

    name = "asdl"
    label = "ASDL (asdfghjkl) FisherEmp, SHAPE_DIAG"
    module = "asdl"
    methods = (FISHER,)

    def quantity(self, workload, method):
        if workload.sequence:
            return Quantity(FISHER, False, "flattens tokens/positions into samples (per-token approximation)")
        return Quantity(FISHER, True)

    def prepare(self, workload, model, batches, device, methods):
        import asdl
        import torch.nn.functional as F

        model.eval()
        n_total = n_samples_of(batches)
        cfg = asdl.FisherConfig(fisher_type=asdl.FISHER_EMP, fisher_shapes=[asdl.SHAPE_DIAG], data_size=n_total)
        fm = asdl.get_fisher_maker(model, cfg)
        pnames = named_params(model)
        owner = {}
        for mod_name, mod in model.named_modules():
            for pn, _ in mod.named_parameters(recurse=False):
                owner[f"{mod_name}.{pn}" if mod_name else pn] = (mod, pn)

        def run():
            fm.zero_fisher()
            for x, y in batches:
                dummy = fm.setup_model_call(model, x)
                fm.setup_loss_call(F.cross_entropy, dummy, y)
                fm.forward_and_backward(accumulate=True)
            out = {}
            for n, p in pnames:
                mod, pn = owner[n]
                f = getattr(mod, "fisher", None)
                diag = getattr(f, "diag", None) if f is not None else None
                t = getattr(diag, pn, None) if diag is not None else None
                if t is None:
                    raise Unsupported(f"ASDL computed no diagonal for {n} ({type(mod).__name__})")
                out[n] = t.reshape(p.shape)
            model.zero_grad(set_to_none=True)
            return {FISHER: out}

        return run
