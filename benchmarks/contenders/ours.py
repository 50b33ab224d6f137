"""ewc_fast's own contender: :func:`ewc_fast.estimate_importance` with one backend (``cpp`` / ``torch``
on CPU, ``triton`` / ``torch`` on CUDA), default loss (= the workloads' cross-entropy)."""

from __future__ import annotations

import torch

from .base import FISHER, FISHER_EXACT, MAS, Contender, Unsupported


class EwcFast(Contender):
    """``ewc_fast.estimate_importance(model, batches, methods, backend=backend)``."""

    kind = "ewc_fast"
    methods = (FISHER, MAS, FISHER_EXACT)
    module = "ewc_fast"
    tolerance = 1e-4

    def __init__(self, backend: str):
        self.backend = backend
        self.name = f"ewc_fast[{backend}]"
        self.label = f"ewc_fast.estimate_importance(backend={backend!r}), default loss (= the workloads' cross-entropy)"

    def version(self):
        import ewc_fast

        return ewc_fast.__version__

    def why_unavailable(self, device):
        import ewc_fast

        if not hasattr(ewc_fast, "estimate_importance"):
            return "ewc_fast.estimate_importance is not available in this checkout yet"
        if self.backend not in ewc_fast.available_backends(device):
            return f"backend {self.backend} is not available on {device}"
        if self.backend == "triton" and torch.device(device).type != "cuda":
            return "triton on CPU is the interpreter: not benchmarked"
        return None

    def row_extras(self) -> dict:
        """``fallback``: the parameters the last run left to the torch.func fallback (``meta["fallback"]``)."""
        fb = getattr(self, "_fallback", None)
        return {} if fb is None else {"fallback": fb}

    def notes(self) -> list[str]:
        fb = getattr(self, "_fallback", None)
        if fb is None:
            return super().notes()
        shown = ", ".join(fb[:3]) + (" ..." if len(fb) > 3 else "")
        return super().notes() + [f"fallback: {len(fb)} parameter(s) ({shown})" if fb else "fallback: none"]

    def prepare(self, workload, model, batches, device, methods):
        import ewc_fast

        why = self.why_unavailable(device)
        if why:
            raise Unsupported(why)
        estimate = ewc_fast.estimate_importance

        def run():
            res = estimate(model, batches, methods=tuple(methods), backend=self.backend, progress=False)
            # parameters left to the torch.func fallback (the Hugging Face targets require none)
            self._fallback = sorted({k for m in methods for k in res[m].meta.get("fallback", {})})
            return {m: {k: v for k, v in res[m].items()} for m in methods}

        return run
