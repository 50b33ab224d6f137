"""Per-sample gradients of planned outputs that are shared by all samples.

Some layers run on tensors that do not depend on the batch: GPT-2's, BERT's and BART's position
embeddings of ``(1, T)`` position ids, T5's relative attention bias (an Embedding on a ``(T, T)``
bucket matrix), a ``cls_token.expand(N, 1, E)``. The output O of such a call is shared by all
samples (provenance, :mod:`.provenance`), so the gradient autograd delivers at O is already summed
over the samples: squaring it would give the square of a sum, not a sum of squares.

The samples separate where a tensor S derived from O meets per-sample data (a *meeting*: a
pointwise op or a ``cat`` whose output holds the samples, e.g. ``inputs_embeds + position_embeds``).
There the tracker replaces S by its explicit broadcast S_b (``S.expand`` to the output's sample
dimension, or an alias when S already has one entry per sample): the op computes the same values,
and the gradient at S_b holds one slice per sample. In the backward a hook on S_b takes, for each
chunk of samples, the per-sample gradient of S (sample n's slice of S_b's gradient, everything else
zero, summed over the broadcast dimensions) and carries it back to O through the shared ops between
them (``autograd.grad(S, O, ..., is_grads_batched=True)``; nothing to do when S is O). Summed over
all meetings this is sample n's gradient at O, exactly; :meth:`SharedGrads.take` checks that the
per-sample gradients add up to the gradient autograd delivered at O, so a path that bypassed every
meeting (e.g. O reaching the outputs unchanged, or through a function without a meeting rule) is
refused instead of being silently dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .provenance import BDim
from .rules import base as rules_base
from .rules.base import chunk_rows

__all__ = ["Meeting", "SharedGrads", "broadcast_operand"]


class Meeting:
    """One tainted shared operand S swapped for its broadcast S_b at an op whose output holds the samples."""

    __slots__ = ("s", "s_b", "origins", "bd", "fname")

    def __init__(self, s: Tensor, s_b: Tensor, origins, bd: BDim, fname: str):
        self.s, self.s_b, self.origins, self.bd, self.fname = s, s_b, origins, bd, fname


def broadcast_operand(s: Tensor, bd: BDim, out_shape) -> Tensor:
    """S as a view broadcast to ``out_shape``'s sample dimension (aligned from the right)."""
    lead = len(out_shape) - s.dim()
    s2 = s.reshape((1,) * lead + tuple(s.shape)) if lead > 0 else s
    target = list(s2.shape)
    target[bd.dim] = out_shape[bd.dim]
    return s2.expand(target)


class SharedGrads:
    """Per-sample gradient buffers of the shared planned outputs, filled by the meetings' hooks."""

    def __init__(self, meetings: list[Meeting], n: int):
        self.meetings, self.n = meetings, n
        self.bufs: dict[int, Tensor] = {}
        self.active = False
        self.busy = False  # inside the nested per-sample backward (the stream's hooks stand aside)
        self.handles = [m.s_b.register_hook(self._hook(m)) for m in meetings]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def reset(self) -> None:
        self.bufs = {}

    def _hook(self, m: Meeting):
        def hook(g):
            if self.active:
                with torch.no_grad():
                    self._add(m, g)
            return None

        return hook

    def _add(self, m: Meeting, g: Tensor) -> None:
        n, bd = self.n, m.bd
        d = bd.dim
        gu = g.unflatten(d, (bd.outer, n, bd.inner))  # sample index at d + 1
        s2_shape = (1,) * (g.dim() - m.s.dim()) + tuple(m.s.shape)
        aligned = s2_shape[d] != 1  # S already had one entry per sample along d
        origins = [o for o in m.origins if o.requires_grad]
        direct = len(origins) == 1 and origins[0] is m.s
        per = 4 * max(g.numel() // max(1, n), 1) * (n if aligned else 1) + 4 * sum(o.numel() for o in origins)
        step = chunk_rows(n, per, rules_base.CHUNK_BYTES // 4)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            c = hi - lo
            if aligned:  # sample k's gradient of S: its own slice, zeros elsewhere
                e = torch.zeros((c,) + tuple(gu.shape), dtype=g.dtype, device=g.device)
                for k in range(c):
                    e[k].select(d + 1, lo + k).copy_(gu.select(d + 1, lo + k))
                e = e.flatten(d + 1, d + 3)
            else:  # S broadcast along d: sample k's gradient is its slice, summed over the broadcast
                e = gu.narrow(d + 1, lo, c).movedim(d + 1, 0).sum((d + 1, d + 2), keepdim=False)
                e = e.unsqueeze(d + 1)
            e = e.sum_to_size((c,) + s2_shape).reshape((c,) + tuple(m.s.shape))
            if direct:
                self._acc(origins[0], lo, hi, e)
                continue
            self.busy = True
            try:
                with torch.enable_grad():
                    gs = torch.autograd.grad(
                        m.s, origins, e, is_grads_batched=True, retain_graph=True, allow_unused=True
                    )
            finally:
                self.busy = False
            for o, go in zip(origins, gs):
                if go is not None:
                    self._acc(o, lo, hi, go)

    def _acc(self, o: Tensor, lo: int, hi: int, val: Tensor) -> None:
        buf = self.bufs.get(id(o))
        if buf is None:
            buf = self.bufs[id(o)] = torch.zeros((self.n,) + tuple(o.shape), dtype=o.dtype, device=o.device)
        buf[lo:hi] += val.to(buf.dtype)

    def take(self, o, total: Tensor, what: str) -> Tensor:
        """The per-sample gradients (N, *shape) of a shared output (``o.key``: the id of the captured
        tensor) whose summed gradient is ``total``; raises if they do not add up to it (a path that
        met no per-sample data)."""
        buf = self.bufs.pop(o.key, None)
        if self.n == 1:
            return total.unsqueeze(0)
        tot = total.detach()
        got = buf.sum(0) if buf is not None else torch.zeros_like(tot)
        scale = float(tot.abs().max()) if tot.numel() else 0.0
        # the per-sample split is exact; the check only has to catch a missing path (an O(1) part of
        # the gradient), so it allows fp32 summation-order differences with a wide margin
        if scale > 0 and float((got - tot).abs().max()) > 1e-3 * scale:
            raise ValueError(
                f"{what}: its output does not depend on the batch (shared by all samples) and part of its "
                "gradient reaches the model outputs without being combined with per-sample data in a "
                "pointwise op or cat, so it cannot be split by sample; per-sample importances are undefined "
                "for this use (compute it from per-sample inputs, or exclude the parameter with "
                "requires_grad=False)"
            )
        return buf if buf is not None else torch.zeros((self.n,) + tuple(tot.shape), dtype=tot.dtype, device=tot.device)
