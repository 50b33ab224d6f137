"""``nn.Embedding`` rule.

Per-sample row gradients P_n[v] = sum_{t: id_nt = v} G_nt: duplicate ids of a sample are summed
*before* squaring, ``padding_idx`` rows get no gradient (as in PyTorch). Per chunk of samples the
rows are scattered into (samples x unique ids x D) with ``index_add_``, squared (or |.|) and added
to the buffer rows of those ids. ``max_norm`` renormalises rows in the forward and
``scale_grad_by_freq`` rescales only PyTorch's backward, not the true gradient: both are ignored
(the true per-sample gradient is returned).

SIG (Kutalev 2020, one-hot input): row v gets |w_v| * mean_n #{t : id_nt = v} (padding_idx excluded).
"""

from __future__ import annotations

import torch

from . import base
from .base import Rule, cat_tokens, input_grad_slices, live_calls, main_input

__all__ = ["EmbeddingRule"]


class EmbeddingRule(Rule):
    """nn.Embedding: per-sample row gradients, duplicate ids of a sample summed before squaring
    (``padding_idx``, ``max_norm``, ``scale_grad_by_freq``: see the module doc)."""

    param_names = ("weight",)
    row_names = ("weight",)

    def _ids_grads(self, module, calls, grads, lo, hi, n):
        ids, gs = [], []
        for x, g in input_grad_slices(module, calls, grads, lo, hi, n):
            ids.append(x.reshape(hi - lo, -1))
            gs.append(g.reshape(hi - lo, -1, module.embedding_dim))
        if not ids:
            return None, None
        ids, gs = cat_tokens(ids), cat_tokens(gs)
        if module.padding_idx is not None:
            gs = gs * (ids != module.padding_idx).unsqueeze(-1).to(gs.dtype)
        return ids, gs

    def row_grads(self, module, calls, grads, name, lo, hi, n):
        return self._ids_grads(module, calls, grads, lo, hi, n)

    def _scatter(self, ids, gs, dtype):
        """(uniq ids, per-sample rows (c, U, D)) with duplicates of a sample summed."""
        c, t = ids.shape
        uniq, inv = torch.unique(ids, return_inverse=True)
        U, D = uniq.numel(), gs.shape[-1]
        buf = torch.zeros(c * U, D, dtype=dtype, device=gs.device)
        index = (torch.arange(c, device=ids.device).unsqueeze(1) * U + inv).reshape(-1)
        buf.index_add_(0, index, gs.reshape(-1, D).to(dtype))
        return uniq, buf.view(c, U, D)

    def per_sample(self, module, calls, grads, names, lo, hi, n):
        w = module.weight
        out = torch.zeros((hi - lo,) + tuple(w.shape), dtype=w.dtype, device=w.device)
        ids, gs = self._ids_grads(module, calls, grads, lo, hi, n)
        if ids is not None:
            uniq, rows = self._scatter(ids, gs, w.dtype)
            out[:, uniq] = rows
        return {"weight": out}

    def accumulate(self, module, calls, grads, bufs, mode, n, backend):
        buf = bufs["weight"]
        live, _ = live_calls(calls, grads)
        if not live:
            return
        t = sum(main_input(c, n, module).reshape(n, -1).shape[1] for c in live)
        V, D = module.num_embeddings, module.embedding_dim
        step = n  # scatter buffer (step x unique ids x D) in fp32; unique ids <= min(V, step * t)
        while step > 1 and step * min(V, step * t) * D * 4 > base.CHUNK_BYTES:
            step //= 2
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            ids, gs = self._ids_grads(module, calls, grads, lo, hi, n)
            uniq, rows = self._scatter(ids, gs, torch.float32)
            buf.index_add_(0, uniq, (rows.square() if mode == "sq" else rows.abs()).sum(0))

    def sig(self, module, calls, names, n, activation):
        V = module.num_embeddings
        cnt = torch.zeros(V, dtype=torch.float32, device=module.weight.device)
        for call in calls:
            ids = main_input(call, n, module).reshape(-1)
            if module.padding_idx is not None:
                ids = ids[ids != module.padding_idx]
            cnt += torch.bincount(ids, minlength=V).to(torch.float32)
        return {"weight": (cnt.unsqueeze(1).expand(V, module.embedding_dim), True)}
