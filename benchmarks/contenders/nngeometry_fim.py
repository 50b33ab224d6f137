"""Peer: nngeometry (T. George, ``nngeometry`` package) ``FIM(model, loader, PMatDiag)``, the diagonal of
the Fisher in nngeometry's layer representation, mapped back to parameter names."""

from __future__ import annotations

import torch
from torch import nn

from .base import FISHER, FISHER_EXACT, Contender, Quantity, Unsupported, named_params


class _PrebatchedLoader(torch.utils.data.DataLoader):
    """A DataLoader (nngeometry insists on one) that yields the workload's ready-made batches,
    so that per-sample collation does not count against the peer."""

    def __init__(self, batches):
        xs = torch.cat([x for x, _ in batches])
        ys = torch.cat([y for _, y in batches])
        super().__init__(torch.utils.data.TensorDataset(xs, ys), batch_size=len(batches[0][1]))
        self._batches = batches

    def __iter__(self):
        return iter([(x.clone(), y) for x, y in self._batches])


class NNGeometry(Contender):
    """nngeometry ``FIM(model, loader, PMatDiag)``.

    ``variant="classif_logits"`` computes the *exact* (true) Fisher, the expectation over
    y ~ p(y|x) in closed form -- not the empirical Fisher -- so it is compared with the exact-Fisher
    oracle. ``empirical=True`` uses nngeometry's ``regression`` variant on a 1-output function
    ``x -> loss(x, y)``, whose Gram diagonal is exactly sum_n g_n**2 (the empirical Fisher).
    """

    module = "nngeometry"

    def __init__(self, empirical: bool):
        self.empirical = empirical
        self.methods = (FISHER,) if empirical else (FISHER_EXACT,)
        self.name = "nngeometry-emp" if empirical else "nngeometry"
        self.label = (
            "nngeometry FIM(PMatDiag), variant='regression' on the per-sample loss (empirical Fisher)"
            if empirical
            else "nngeometry FIM(PMatDiag), variant='classif_logits' (exact Fisher)"
        )

    def quantity(self, workload, method):
        if self.empirical:
            return Quantity(FISHER, True, "empirical Fisher via a 1-output 'regression' function")
        return Quantity(FISHER_EXACT, True, "exact Fisher E_{y~p(y|x)} in closed form")

    def prepare(self, workload, model, batches, device, methods):
        from nngeometry.layercollection import LayerCollection
        from nngeometry.metrics import FIM
        from nngeometry.object import PMatDiag
        from nngeometry.object.vector import PVector

        if not batches[0][0].is_floating_point():
            raise Unsupported("integer (token) inputs: nngeometry sets requires_grad on the inputs")
        try:
            lc = LayerCollection.from_model(model)
        except Exception as exc:
            raise Unsupported(f"LayerCollection: {exc}") from exc
        covered = {
            f"{lid}.{w}"
            for lid, layer in lc.layers.items()
            for w in (("weight", "bias") if layer.bias is not None else ("weight",))
        }
        missing = [n for n, _ in named_params(model) if n not in covered]
        if missing:
            raise Unsupported(
                f"parameters outside nngeometry's layers: {', '.join(missing[:4])}"
                + (" ..." if len(missing) > 4 else "")
            )
        grouped = [n for n, m in model.named_modules() if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1]
        if grouped:  # its Conv2d layer ignores `groups` and returns a (C_out, C_in, k, k) diagonal
            raise Unsupported(f"grouped / depthwise convolution {grouped[0]}: nngeometry's conv layer ignores groups")
        _refuse_linear_on_sequences(model, batches[0][0][:1])
        loader = _PrebatchedLoader(batches)
        model.eval()
        kwargs = {}
        if self.empirical:
            kwargs = dict(
                variant="regression", function=lambda x, y: workload.loss_per_sample(model(x), y).unsqueeze(1)
            )
        else:
            kwargs = dict(variant="classif_logits")

        def run():
            fim = FIM(model=model, loader=loader, representation=PMatDiag, device=device, layer_collection=lc, **kwargs)
            d = PVector(lc, vector_repr=fim.get_diag()).to_dict()
            out = {}
            for lid, wb in d.items():
                out[f"{lid}.weight"] = wb[0]
                if len(wb) > 1 and wb[1] is not None:
                    out[f"{lid}.bias"] = wb[1]
            return {self.methods[0]: out}

        return run


def _refuse_linear_on_sequences(model: nn.Module, x) -> None:
    """Raise :class:`Unsupported` if an ``nn.Linear`` sees (N, T, d) inputs in a forward of ``x``:
    nngeometry's Linear rule assumes (N, d)."""
    seen3d = []
    hooks = [
        mod.register_forward_hook(lambda mod, a, o, name=name: seen3d.append(name) if a[0].dim() > 2 else None)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)
    ]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    if seen3d:
        raise Unsupported(
            f"nn.Linear on (N, T, d) inputs ({seen3d[0]}): nngeometry's Linear rule assumes (N, d) "
            "(RuntimeError: size mismatch)"
        )
