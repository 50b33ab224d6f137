"""``nn.Linear`` rule.

With A (n, t, in) the captured input and G (n, t, out) the output gradient (any leading dims: (N, in)
-> t = 1, (N, *, in) -> t = prod(*); a module called k times concatenates its k (G, A) pairs along t):

* weight: P_n = G_n^T A_n, accumulated by :func:`ewc_fast.ops.persample_sq_` (sq += P_n^2,
  abs += |P_n|) without forming the N per-sample matrices;
* bias: p_n = sum_t G_n.

SIG (Kutalev 2020; ``act`` = the module output through the optional user activation):
weight |w_ij| * mean_n sum_t |a_ntj|; bias mean_n sum_t |act(y)_nti|.
"""

from __future__ import annotations

import torch

from .base import Rule, apply_activation, cat_tokens, input_grad_slices, main_input, persample_into, reduce_into

__all__ = ["LinearRule"]


class LinearRule(Rule):
    """nn.Linear with any leading dims: (N, in) -> T = 1, (N, *, in) -> T = prod(*)."""

    product_names = ("weight",)

    def pairs(self, module, calls, grads, n, lo=0, hi=None):
        """(G (c, T, out), A (c, T, in)) with the calls that received a gradient concatenated along T."""
        hi = n if hi is None else hi
        gs, as_ = [], []
        for a, g in input_grad_slices(module, calls, grads, lo, hi, n):
            gs.append(g.reshape(hi - lo, -1, g.shape[-1]))
            as_.append(a.reshape(hi - lo, -1, a.shape[-1]))
        if not gs:
            return None, None
        return cat_tokens(gs), cat_tokens(as_)

    def product_pairs(self, module, calls, grads, name, lo, hi, n):
        G, A = self.pairs(module, calls, grads, n, lo, hi)
        return (G, None if A is None else A.to(G.dtype))

    def per_sample(self, module, calls, grads, names, lo, hi, n):
        G, A = self.pairs(module, calls, grads, n, lo, hi)
        out = {}
        for k in names:
            p = getattr(module, k)
            if G is None:
                out[k] = torch.zeros((hi - lo,) + tuple(p.shape), dtype=p.dtype, device=p.device)
            elif k == "weight":
                out[k] = torch.bmm(G.transpose(1, 2), A.to(G.dtype))
            else:
                out[k] = G.sum(1)
        return out

    def accumulate(self, module, calls, grads, bufs, mode, n, backend):
        G, A = self.pairs(module, calls, grads, n)
        if G is None:
            return
        if "weight" in bufs:
            persample_into(bufs["weight"], G, A.to(G.dtype), mode, backend)
        if "bias" in bufs:
            reduce_into(bufs["bias"], G.sum(1), mode)

    def sig(self, module, calls, names, n, activation):
        out = {}
        if "weight" in names:
            s = sum(
                main_input(c, n, module).reshape(n, -1, module.in_features).abs().sum((0, 1), dtype=torch.float32)
                for c in calls
            )
            out["weight"] = (s.expand(module.out_features, module.in_features), True)
        if "bias" in names:
            s = sum(
                apply_activation(activation, c.output)
                .abs()
                .reshape(-1, module.out_features)
                .sum(0, dtype=torch.float32)
                * (n if c.out_dims is not None and c.out_dims[0] is None else 1)  # shared: every sample
                for c in calls
            )
            out["bias"] = (s, False)
        return out
