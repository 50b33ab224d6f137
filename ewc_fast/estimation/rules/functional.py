"""Function-level rules: a parameter entering the graph through a torch *function*, whatever module calls it.

Module rules (``nn.Linear``, ...) are the fast path, but third-party layers compute the same things
with their own classes: GPT-2's ``Conv1D`` is ``addmm(bias, x, weight)`` with weight (in, out),
Llama-family and T5 RMSNorm classes are ``weight * normalized(x)``, BART's scaled word embedding
overrides ``forward`` around ``F.embedding``, a ViT adds ``position_embeddings`` and expands a
``cls_token``. Keyed by the function (and the parameter's argument position) instead of the class,
one rule covers them all. With the call's input A and output gradient G batch-first
(:mod:`ewc_fast.estimation.provenance`), per sample n:

* ``linear(x, W, b)``                 W: G_n^T A_n, b: sum_t G_n (the ``nn.Linear`` rule)
* ``addmm(b, x, W)`` / ``matmul(x, W)`` W (in, out): A_n^T G_n, b: sum_t G_n
* ``embedding(ids, W)``               the ``nn.Embedding`` rule (duplicate ids summed before squaring)
* ``layer_norm`` / ``rms_norm`` / ``group_norm``  the norm rules (x_hat recomputed)
* ``conv1d/2d/3d``                    the convolution rule (direct per-sample kernel)
* ``mul(p, x)`` (a scale)             sum over the positions p is broadcast to of G_n ⊙ x_n
* ``add(x, p)`` / ``sub`` / ``expand(p)``  sum over the broadcast positions of ±G_n

Reductions: "sq" adds sum_n g_n^2, "abs" sum_n |g_n| (:func:`.base.reduce_into`).

SIG (Kutalev 2020) through the same functions, with the module rules' formulas (y = the call's output;
a ``sig_activation`` applies to module paths only, so none here):

* ``linear`` / ``embedding`` / the norms / convolutions: as the module rules;
* ``addmm(b, x, W)`` / ``matmul(x, W)`` with W (in, out): W_ij: |W_ij| * mean_n sum_t |x_nti|,
  b: mean_n sum_t |y_nt|;
* ``mul(p, x)`` (a scale, e.g. an RMSNorm class's ``weight * x_hat``): |p| * mean_n (sum over the
  positions p is broadcast to of |x_n|), the norms' |gamma| * sum |x_hat|;
* ``add`` / ``sub`` / ``rsub`` (a shift): mean_n (sum over those positions of |y_n|), a bias's;
* ``expand`` (a broadcast copy, e.g. a cls token): no SIG rule (|w|).

A shared output or operand (not derived from the batch) counts for every sample (N times per batch).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from ..provenance import BDim, batch_first
from .base import Rule, cat_tokens, chunk_rows, live_calls, main_input, persample_into, reduce_into
from .conv import ConvRule
from .embedding import EmbeddingRule
from .linear import LinearRule
from .norm import GroupNormRule, LayerNormRule, RMSNormRule

__all__ = ["FuncTarget", "FUNCTION_RULES", "function_role"]


class FuncTarget:
    """What a function rule serves: the calls of torch function ``fname`` inside module ``module``
    (innermost), with the parameters ``roles`` (role name -> parameter) at fixed argument positions."""

    def __init__(self, module, path: str, fname: str, roles: dict, positions: dict):
        self.module, self.path, self.fname = module, path, fname
        self.roles = roles  # role -> nn.Parameter
        self.positions = positions  # role -> argument position (int) or keyword (str)
        self.describe = f"torch function {fname!r} in {path or '<root>'} ({type(module).__name__})"
        self.sample_dim0 = fname.startswith("conv") or fname == "group_norm"

    def arg(self, call, key, default=None):
        if isinstance(key, int):
            return call.args[key] if len(call.args) > key else default
        return call.kwargs.get(key, default)


def _arg(call, pos: int, kw: str, default=None):
    if len(call.args) > pos:
        return call.args[pos]
    return call.kwargs.get(kw, default)


def _tuple(v, d):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * d


class _Delegating(Rule):
    """A function rule that rebuilds the module a module rule expects from the call's arguments."""

    inner: Rule

    def module_of(self, target: FuncTarget, call) -> SimpleNamespace:
        raise NotImplementedError

    def per_sample(self, target, calls, grads, names, lo, hi, n):
        return self.inner.per_sample(self.module_of(target, calls[0]), calls, grads, names, lo, hi, n)

    def accumulate(self, target, calls, grads, bufs, mode, n, backend):
        self.inner.accumulate(self.module_of(target, calls[0]), calls, grads, bufs, mode, n, backend)

    def product_pairs(self, target, calls, grads, name, lo, hi, n):
        return self.inner.product_pairs(self.module_of(target, calls[0]), calls, grads, name, lo, hi, n)

    def row_grads(self, target, calls, grads, name, lo, hi, n):
        return self.inner.row_grads(self.module_of(target, calls[0]), calls, grads, name, lo, hi, n)

    def sig(self, target, calls, names, n, activation):
        return self.inner.sig(self.module_of(target, calls[0]), calls, names, n, None)


class LinearFunc(_Delegating):
    param_names = ("weight", "bias")
    product_names = ("weight",)
    inner = LinearRule()

    def module_of(self, target, call):
        w = target.roles.get("weight", _arg(call, 1, "weight"))
        b = target.roles.get("bias", _arg(call, 2, "bias"))
        return SimpleNamespace(
            weight=w, bias=b, in_features=w.shape[1], out_features=w.shape[0], describe=target.describe
        )


class EmbeddingFunc(_Delegating):
    param_names = ("weight",)
    row_names = ("weight",)
    inner = EmbeddingRule()

    def module_of(self, target, call):
        w = target.roles["weight"]
        pad = _arg(call, 2, "padding_idx")
        if pad is not None and pad < 0:
            pad += w.shape[0]
        return SimpleNamespace(
            weight=w, num_embeddings=w.shape[0], embedding_dim=w.shape[1], padding_idx=pad, describe=target.describe
        )


class LayerNormFunc(_Delegating):
    param_names = ("weight", "bias")
    inner = LayerNormRule()

    def module_of(self, target, call):
        shape = _arg(call, 1, "normalized_shape")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return SimpleNamespace(
            weight=target.roles.get("weight", _arg(call, 2, "weight")),
            bias=target.roles.get("bias", _arg(call, 3, "bias")),
            normalized_shape=shape,
            eps=_arg(call, 4, "eps", 1e-5),
            describe=target.describe,
        )


class RMSNormFunc(_Delegating):
    param_names = ("weight",)
    inner = RMSNormRule()

    def module_of(self, target, call):
        shape = _arg(call, 1, "normalized_shape")
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        return SimpleNamespace(
            weight=target.roles["weight"],
            bias=None,
            normalized_shape=shape,
            eps=_arg(call, 3, "eps"),
            describe=target.describe,
        )


class GroupNormFunc(_Delegating):
    param_names = ("weight", "bias")
    inner = GroupNormRule()

    def module_of(self, target, call):
        return SimpleNamespace(
            weight=target.roles.get("weight", _arg(call, 2, "weight")),
            bias=target.roles.get("bias", _arg(call, 3, "bias")),
            num_groups=_arg(call, 1, "num_groups"),
            eps=_arg(call, 4, "eps", 1e-5),
            describe=target.describe,
            sample_dim0=True,
        )


class ConvFunc(_Delegating):
    param_names = ("weight", "bias")
    inner = ConvRule()

    def module_of(self, target, call):
        w = target.roles.get("weight", _arg(call, 1, "weight"))
        d = w.dim() - 2
        pad = _arg(call, 4, "padding", 0)
        return SimpleNamespace(
            weight=w,
            bias=target.roles.get("bias", _arg(call, 2, "bias")),
            kernel_size=tuple(w.shape[2:]),
            stride=_tuple(_arg(call, 3, "stride", 1), d),
            padding=pad if isinstance(pad, str) else _tuple(pad, d),
            dilation=_tuple(_arg(call, 5, "dilation", 1), d),
            groups=_arg(call, 6, "groups", 1),
            padding_mode="zeros",
            out_channels=w.shape[0],
            describe=target.describe,
            sample_dim0=True,
        )


class MatmulFunc(Rule):
    """``addmm(bias, x, W)`` / ``matmul(x, W)`` / ``mm(x, W)`` with W (in, out): P_n = A_n^T G_n."""

    param_names = ("weight_t", "bias")
    product_names = ("weight_t",)

    def product_pairs(self, target, calls, grads, name, lo, hi, n):
        G, A = self._pairs(target, calls, grads, lo, hi, n)
        return (None, None) if G is None else (A.to(G.dtype), G)  # P_n = A_n^T G_n: (in, out)

    def _pairs(self, target, calls, grads, lo, hi, n):
        xpos = 1 if target.fname == "addmm" else 0
        gs, as_ = [], []
        for call, g in zip(*live_calls(calls, grads)):
            view = SimpleNamespace(describe=target.describe)
            a = main_input(_Shifted(call, xpos), n, view)[lo:hi]
            gs.append(g[lo:hi].reshape(hi - lo, -1, g.shape[-1]))
            as_.append(a.reshape(hi - lo, -1, a.shape[-1]))
        if not gs:
            return None, None
        return cat_tokens(gs), cat_tokens(as_)

    def per_sample(self, target, calls, grads, names, lo, hi, n):
        G, A = self._pairs(target, calls, grads, lo, hi, n)
        out = {}
        for k in names:
            p = target.roles[k]
            if G is None:
                out[k] = torch.zeros((hi - lo,) + tuple(p.shape), dtype=p.dtype, device=p.device)
            elif k == "weight_t":
                out[k] = torch.bmm(A.transpose(1, 2), G.to(A.dtype))
            else:
                out[k] = G.sum(1).reshape((hi - lo,) + tuple(p.shape))
        return out

    def accumulate(self, target, calls, grads, bufs, mode, n, backend):
        G, A = self._pairs(target, calls, grads, 0, n, n)
        if G is None:
            return
        if "weight_t" in bufs:
            persample_into(bufs["weight_t"], A.to(G.dtype), G, mode, backend)  # (A_n^T G_n): (in, out)
        if "bias" in bufs:
            reduce_into(bufs["bias"], G.sum(1).reshape((n,) + tuple(bufs["bias"].shape)), mode)

    def sig(self, target, calls, names, n, activation):
        xpos = 1 if target.fname == "addmm" else 0
        out = {}
        if "weight_t" in names:
            w = target.roles["weight_t"]
            s = sum(
                main_input(_Shifted(c, xpos), n, SimpleNamespace(describe=target.describe))
                .reshape(-1, w.shape[0])
                .abs()
                .sum(0, dtype=torch.float32)
                for c in calls
            )
            out["weight_t"] = (s.unsqueeze(1).expand(tuple(w.shape)), True)
        if "bias" in names:
            b = target.roles["bias"]
            out["bias"] = (sum(_abs_out(c, n).reshape(-1, b.numel()).sum(0).view(b.shape) for c in calls), False)
        return out


def _abs_out(call, n: int) -> Tensor:
    """|output| of a call in fp32, batch-first (a shared output broadcast to every sample)."""
    bd = call.out_dims[0] if call.out_dims is not None else BDim(0)
    return batch_first(call.output, bd, n).abs().float()


class _Shifted:
    """A call seen with argument ``pos`` as its main input (for :func:`.base.main_input`)."""

    def __init__(self, call, pos):
        self.args = call.args[pos:]
        self.kwargs = {}
        self._call = call

    def dim_of(self, t, n):
        return self._call.dim_of(t, n)


class BroadcastFunc(Rule):
    """``mul`` (scale), ``add`` / ``sub`` (shift) and ``expand`` of a parameter p broadcast over the
    output: per-sample gradient = the sum over the positions p is broadcast to of s * G_n (s = the
    other factor for ``mul``, ±1 otherwise)."""

    param_names = ("p",)

    def _factor(self, target, call):
        """The other operand (a tensor in the output's layout, a number, or None) and the sign."""
        pos = target.positions["p"]
        fname = target.fname
        if fname in ("expand", "expand_as", "broadcast_to"):
            return None, 1.0
        others = [a for i, a in enumerate(call.args[:2]) if i != pos] + [
            v for k, v in call.kwargs.items() if k in ("other", "input") and k != pos
        ]
        other = others[0] if others else None
        if fname == "mul":
            return other, 1.0
        alpha = call.kwargs.get("alpha", 1)
        sign = 1.0
        if fname == "sub":
            sign = -float(alpha) if pos == 1 else 1.0
        elif fname == "rsub":
            sign = -1.0 if pos == 0 else float(alpha)
        else:
            sign = float(alpha) if pos == 1 else 1.0
        return None, sign

    def _per(self, target, calls, grads, lo, hi, n):
        p = target.roles["p"]
        out = torch.zeros(
            (hi - lo,) + tuple(p.shape), dtype=torch.promote_types(p.dtype, torch.float32), device=p.device
        )
        for call, g in zip(*live_calls(calls, grads)):
            o = call.output
            bd = call.out_dims[0] if call.out_dims is not None else BDim(0)
            other, sign = self._factor(target, call)
            h = g[lo:hi]
            if isinstance(other, Tensor):  # in the output's layout, then batch-first like G
                ob = batch_first(other.expand(o.shape), bd, n)
                h = h * ob[lo:hi].to(h.dtype)
            elif other is not None:
                h = h * other
            if sign != 1.0:
                h = h * sign
            out += self._reduce(h, p, bd, tuple(o.shape), n, lo, hi).to(out.dtype)
        return out

    @staticmethod
    def _reduce(h: Tensor, p: Tensor, bd, out_shape, n, lo, hi) -> Tensor:
        """Per sample, the sum of h (batch-first) over the output positions that read each entry of p."""
        c = hi - lo
        k = len(out_shape) - p.dim()
        if bd is None:  # shared output: h is (c, *out_shape)
            return h.sum_to_size((c,) + (1,) * k + tuple(p.shape)).reshape((c,) + tuple(p.shape))
        if bd.outer == 1 and bd.inner == 1 and bd.dim < k:  # p broadcast over the leading dims only
            trail = tuple(h.shape[h.dim() - p.dim() :])
            return h.reshape((c, -1) + trail).sum(1).sum_to_size((c,) + tuple(p.shape))
        # general: scatter by the index of the p entry each output position reads
        idx = torch.arange(p.numel(), device=h.device).view(p.shape).expand(out_shape)
        idx = batch_first(idx, bd, n)[lo:hi].reshape(c, -1)
        res = torch.zeros(c, p.numel(), dtype=h.dtype, device=h.device)
        res.scatter_add_(1, idx, h.reshape(c, -1))
        return res.view((c,) + tuple(p.shape))

    def per_sample(self, target, calls, grads, names, lo, hi, n):
        return {"p": self._per(target, calls, grads, lo, hi, n)}

    def sig(self, target, calls, names, n, activation):
        """mul: |p| * sum of |other| over p's positions; add / sub / rsub: sum of |y| there (module doc)."""
        fname, p = target.fname, target.roles["p"]
        if fname not in ("mul", "add", "sub", "rsub"):
            return None
        tot = torch.zeros(tuple(p.shape), dtype=torch.float32, device=p.device)
        for call in calls:
            o = call.output
            bd = call.out_dims[0] if call.out_dims is not None else BDim(0)
            if fname == "mul":
                other, _ = self._factor(target, call)
                if isinstance(other, Tensor):
                    h = batch_first(other.expand(o.shape), bd, n).abs().float()
                else:  # a number: |other| at every position
                    h = batch_first(torch.full(tuple(o.shape), abs(float(other)), device=o.device), bd, n).float()
            else:
                h = _abs_out(call, n)
            tot += self._reduce(h, p, bd, tuple(o.shape), n, 0, n).sum(0)
        return {"p": (tot, fname == "mul")}

    def accumulate(self, target, calls, grads, bufs, mode, n, backend):
        step = chunk_rows(n, 4 * sum(max(1, c.output.numel() // max(1, n)) for c in calls) * 2)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            reduce_into(bufs["p"], self._per(target, calls, grads, lo, hi, n), mode)


_LINEAR, _MATMUL, _EMB = LinearFunc(), MatmulFunc(), EmbeddingFunc()
_LN, _RMS, _GN, _CONV, _BCAST = LayerNormFunc(), RMSNormFunc(), GroupNormFunc(), ConvFunc(), BroadcastFunc()

#: function name -> (rule, {argument position or keyword: role})
FUNCTION_RULES: dict[str, tuple[Rule, dict]] = {
    "linear": (_LINEAR, {1: "weight", "weight": "weight", 2: "bias", "bias": "bias"}),
    "addmm": (_MATMUL, {0: "bias", "input": "bias", 2: "weight_t", "mat2": "weight_t"}),
    "matmul": (_MATMUL, {1: "weight_t", "other": "weight_t"}),
    "mm": (_MATMUL, {1: "weight_t", "mat2": "weight_t"}),
    "embedding": (_EMB, {1: "weight", "weight": "weight"}),
    "layer_norm": (_LN, {2: "weight", "weight": "weight", 3: "bias", "bias": "bias"}),
    "rms_norm": (_RMS, {2: "weight", "weight": "weight"}),
    "group_norm": (_GN, {2: "weight", "weight": "weight", 3: "bias", "bias": "bias"}),
    "conv1d": (_CONV, {1: "weight", "weight": "weight", 2: "bias", "bias": "bias"}),
    "conv2d": (_CONV, {1: "weight", "weight": "weight", 2: "bias", "bias": "bias"}),
    "conv3d": (_CONV, {1: "weight", "weight": "weight", 2: "bias", "bias": "bias"}),
    "mul": (_BCAST, {0: "p", 1: "p", "other": "p"}),
    "add": (_BCAST, {0: "p", 1: "p", "other": "p"}),
    "sub": (_BCAST, {0: "p", 1: "p", "other": "p"}),
    "rsub": (_BCAST, {0: "p", 1: "p"}),
    "expand": (_BCAST, {0: "p"}),
    "expand_as": (_BCAST, {0: "p"}),
    "broadcast_to": (_BCAST, {0: "p"}),
}


def function_role(fname: str, pos, args, kwargs) -> tuple[Rule, str] | None:
    """(rule, role) if the parameter at argument ``pos`` of ``fname`` has a function rule, else None."""
    entry = FUNCTION_RULES.get(fname)
    if entry is None:
        return None
    rule, roles = entry
    role = roles.get(pos)
    if role is None:
        return None
    if fname == "addmm" and (kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1):
        return None
    if fname == "embedding" and (_kw(args, kwargs, 3, "max_norm") is not None):
        return None
    if rule is _BCAST:  # the parameter on both sides (p * p) or in place: no
        tensors = [a for a in list(args[:2]) + list(kwargs.values()) if isinstance(a, Tensor)]
        if sum(1 for t in tensors if t is (args[pos] if isinstance(pos, int) else kwargs[pos])) > 1:
            return None
        if (
            fname in ("mul",)
            and not any(isinstance(a, (Tensor, int, float)) for i, a in enumerate(args[:2]) if i != pos)
            and "other" not in kwargs
        ):
            return None
    return rule, role


def _kw(args, kwargs, pos, kw):
    return args[pos] if len(args) > pos else kwargs.get(kw)
