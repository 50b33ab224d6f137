"""Per-layer rules: captured (inputs, output gradients) of one module -> per-sample statistics.

A rule serves one module type. The engine hands it the module's *calls* (one :class:`Call` per
forward invocation in the current batch: positional args, kwargs, output) and, for one backward
seed, the gradient of that seed w.r.t. each call's output (``None`` where the output was unused).
Per-sample gradients are never formed where a closed form exists; every rule also offers them
explicitly (:meth:`Rule.per_sample`, chunked over samples) for tied parameters.

Formulas (n = sample, t = token / output position; a module called k times concatenates its k
(G, A) pairs along t):

* ``nn.Linear``      A (n, t, in), G (n, t, out): weight P_n = G_n^T A_n via
  :func:`ewc_fast.ops.persample_sq_` (sq += P_n^2, abs += |P_n|), bias p_n = sum_t G_n.
* ``nn.Conv1d/2d/3d`` im2col: A_n (t = output positions, C_in/groups * prod(kernel)) per group, then
  as Linear (chunked over samples). Bias p_n = sum over positions of G_n.
* ``nn.Embedding``   P_n[v] = sum_{t: id_nt = v} G_nt (duplicates summed *before* squaring,
  padding_idx rows get no gradient), scattered per sample over the ids present in a chunk.
* Norm layers        x_hat recomputed from the captured input; weight p_n = sum_t g ⊙ x_hat,
  bias p_n = sum_t g (LayerNorm, RMSNorm, GroupNorm, BatchNorm1d/2d/3d with running statistics).

SIG (Kutalev 2020 "total signal", our extension beyond Linear; ``act`` is the module output passed
through the optional user activation for that module):

* Linear weight: |w_ij| * mean_n sum_t |a_ntj|; bias: mean_n sum_t |act(y)_nti|.
* Conv weight w[o, c, k]: |w| * mean_n (sum over output positions of |unfolded input| at tap (c, k) of
  o's group) -- the total |signal| that passed through that tap (zero padding contributes 0).
* Embedding weight row v: |w_v| * mean_n #{t : id_nt = v} (one-hot input; padding_idx excluded).
* Norm layers: the affine map y = gamma * x_hat + beta is a diagonal Linear on x_hat, so weight:
  |gamma_c| * mean_n sum_t |x_hat_ntc|; bias: mean_n sum_t |act(y)_ntc|.

The registry :data:`RULES` maps a module class to a rule instance; a module uses the rule of the
first class in its MRO found there, provided it does not override that class's ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import persample_sq_

#: bytes bounding one chunk's temporaries (unfolded inputs, per-sample gradients, scatter buffers)
CHUNK_BYTES = 64 * 2**20


@dataclass
class Call:
    """One forward invocation of a module: its positional args, kwargs and output."""

    args: tuple
    kwargs: dict
    output: Any


def reduce_into(buf: Tensor, per_sample: Tensor, mode: str) -> None:
    """buf += sum_n per_sample[n]**2 (mode "sq") or sum_n |per_sample[n]| (mode "abs"), in fp32."""
    p = per_sample.to(buf.dtype)
    buf.add_((p.square() if mode == "sq" else p.abs()).sum(0))


def chunk_rows(n: int, bytes_per_sample: int, budget: int | None = None) -> int:
    """Samples per chunk such that ``chunk * bytes_per_sample <= budget`` (default :data:`CHUNK_BYTES`; at least 1)."""
    budget = CHUNK_BYTES if budget is None else budget
    return max(1, min(n, budget // max(1, bytes_per_sample)))


def call_input(call: Call, name: str = "input") -> Tensor:
    """The module's main input: first positional arg, else ``kwargs[name]``."""
    if call.args:
        return call.args[0]
    if name in call.kwargs:
        return call.kwargs[name]
    raise ValueError(f"could not find the input tensor of a module call (args empty, no {name!r} kwarg)")


class Rule:
    """Base class of a per-layer rule (subclass and put an instance in :data:`RULES`).

    Required: :attr:`param_names` and :meth:`per_sample`. :meth:`accumulate` defaults to squaring
    :meth:`per_sample` chunk by chunk; :meth:`sig` defaults to "no rule" (the engine then uses |w|).
    """

    #: the direct parameters of the module this rule can handle
    param_names: tuple[str, ...] = ("weight", "bias")
    #: False: ``grads[i]`` is the gradient of call i's (tensor) output; True: a list aligned with
    #: ``torch.utils._pytree.tree_flatten(call.output)[0]`` (None where a leaf got no gradient)
    per_leaf: bool = False

    def handles(self, module: nn.Module) -> tuple[str, ...]:
        """Names of the parameters this rule handles, relative to ``module``: direct ones (``"weight"``)
        or a submodule's that ``module``'s own forward uses (``"out_proj.weight"``). Raise ValueError
        if the module's configuration makes per-sample statistics undefined; return fewer names to
        leave parameters to the ``torch.func`` fallback."""
        return tuple(n for n in self.param_names if getattr(module, n, None) is not None and n in module._parameters)

    def per_sample(
        self, module: nn.Module, calls: list[Call], grads: list, names, lo: int, hi: int, n: int
    ) -> dict[str, Tensor]:
        """Per-sample gradients ``(hi - lo, *param.shape)`` of the named parameters for samples
        ``lo:hi`` (summed over the module's calls)."""
        raise NotImplementedError

    def accumulate(
        self,
        module: nn.Module,
        calls: list[Call],
        grads: list,
        bufs: dict[str, Tensor],
        mode: str,
        n: int,
        backend: str,
    ) -> None:
        """bufs[name] += sum_n g_n**2 (``mode="sq"``) or sum_n |g_n| (``mode="abs"``)."""
        names = list(bufs)
        per = sum(bufs[k].numel() for k in names) * 4
        step = chunk_rows(n, per)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            ps = self.per_sample(module, calls, grads, names, lo, hi, n)
            for k in names:
                reduce_into(bufs[k], ps[k], mode)

    def sig(
        self, module: nn.Module, calls: list[Call], names, n: int, activation: Callable | None
    ) -> dict[str, tuple[Tensor, bool]] | None:
        """SIG factor sums over the batch: name -> (tensor shaped like the parameter, times_abs_w).

        The engine divides by the sample count and multiplies by |w| where ``times_abs_w``.
        ``None``: no SIG rule (the engine falls back to |w| and says so in ``meta``)."""
        return None


def _batch_first(x: Tensor, n: int, module: nn.Module, what: str = "input") -> None:
    if x.dim() == 0 or x.shape[0] != n:
        raise ValueError(
            f"{type(module).__name__}: its {what} has shape {tuple(x.shape)}, whose leading "
            f"dimension is not the batch size {n}; per-layer rules need batch-first tensors"
        )


def _act(activation, y: Tensor) -> Tensor:
    return y if activation is None else activation(y)


# ------------------------------------------------------------------------------------------ Linear
class LinearRule(Rule):
    """nn.Linear with any leading dims: (N, in) -> T = 1, (N, *, in) -> T = prod(*)."""

    def pairs(self, module, calls, grads, n, lo=0, hi=None):
        """(G (c, T, out), A (c, T, in)) with the calls that received a gradient concatenated along T."""
        hi = n if hi is None else hi
        gs, as_ = [], []
        for call, g in zip(calls, grads):
            if g is None:
                continue
            a = call_input(call)
            _batch_first(a, n, module)
            gs.append(g[lo:hi].reshape(hi - lo, -1, g.shape[-1]))
            as_.append(a[lo:hi].reshape(hi - lo, -1, a.shape[-1]))
        if not gs:
            return None, None
        if len(gs) == 1:
            return gs[0], as_[0]
        return torch.cat(gs, 1), torch.cat(as_, 1)

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
            persample_sq_(
                bufs["weight"] if mode == "sq" else None,
                bufs["weight"] if mode == "abs" else None,
                G,
                A.to(G.dtype),
                backend=backend,
            )
        if "bias" in bufs:
            reduce_into(bufs["bias"], G.sum(1), mode)

    def sig(self, module, calls, names, n, activation):
        out = {}
        if "weight" in names:
            s = sum(
                call_input(c).reshape(n, -1, module.in_features).abs().sum((0, 1), dtype=torch.float32) for c in calls
            )
            out["weight"] = (s.expand(module.out_features, module.in_features), True)
        if "bias" in names:
            s = sum(
                _act(activation, c.output).reshape(n, -1, module.out_features).abs().sum((0, 1), dtype=torch.float32)
                for c in calls
            )
            out["bias"] = (s, False)
        return out


# -------------------------------------------------------------------------------------------- Conv
def conv_padding(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as the conv applies it (``'same'``: extra on the right)."""
    d = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * d
        out = []
        for k, dil in zip(module.kernel_size, module.dilation):
            total = dil * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in module.padding]


def unfold(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """im2col for any spatial rank: x (c, C, *S) -> (c, L, C * prod(kernel)), channel-major columns
    (the layout of ``weight.reshape(out, -1)``), L = number of output positions."""
    pads = conv_padding(module)
    flat = [v for lr in reversed(pads) for v in lr]  # F.pad wants the last dim first
    if any(flat):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, flat, mode=mode)
    c, C = x.shape[:2]
    d = len(module.kernel_size)
    if d == 2:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return cols.transpose(1, 2)
    for i, (k, dil, st) in enumerate(zip(module.kernel_size, module.dilation, module.stride)):
        span = dil * (k - 1) + 1
        x = x.unfold(2 + i, span, st)[..., ::dil]  # appends a kernel dim of size k
    # x: (c, C, L_1..L_d, k_1..k_d) -> (c, L, C * K)
    perm = [0] + list(range(2, 2 + d)) + [1] + list(range(2 + d, 2 + 2 * d))
    x = x.permute(perm)
    L = 1
    for s in x.shape[1 : 1 + d]:
        L *= s
    return x.reshape(c, L, -1)


class ConvRule(Rule):
    """Conv1d/2d/3d (stride, padding incl. 'same' and padding modes, dilation, groups) via im2col."""

    def _chunk(self, module, out, n):
        """Samples per chunk so that the unfolded inputs (positions x C_in*K per sample) fit the budget."""
        positions = 1
        for s in out.shape[2:]:
            positions *= s
        return chunk_rows(n, positions * module.weight[0].numel() * module.groups * out.element_size())

    def _ga(self, module, calls, grads, lo, hi, n):
        """Per call with a gradient: (G (c, L, O), A (c, L, C*K)) for samples lo:hi."""
        out = []
        for call, g in zip(calls, grads):
            if g is None:
                continue
            x = call_input(call)
            _batch_first(x, n, module)
            a = unfold(module, x[lo:hi])
            gg = g[lo:hi].flatten(2).transpose(1, 2)
            out.append((gg, a.to(gg.dtype)))
        return out

    def _groups(self, module):
        G = module.groups
        og = module.out_channels // G
        cg = module.weight[0].numel()
        return G, og, cg

    def per_sample(self, module, calls, grads, names, lo, hi, n):
        c = hi - lo
        res = {
            k: torch.zeros(
                (c,) + tuple(getattr(module, k).shape), dtype=module.weight.dtype, device=module.weight.device
            )
            for k in names
        }
        groups, og, cg = self._groups(module)
        for gg, a in self._ga(module, calls, grads, lo, hi, n):
            if "weight" in names:
                w = res["weight"].view(c, module.out_channels, cg)
                for gi in range(groups):
                    w[:, gi * og : (gi + 1) * og] += torch.bmm(
                        gg[..., gi * og : (gi + 1) * og].transpose(1, 2), a[..., gi * cg : (gi + 1) * cg]
                    )
            if "bias" in names:
                res["bias"] += gg.sum(1)
        return res

    def accumulate(self, module, calls, grads, bufs, mode, n, backend):
        groups, og, cg = self._groups(module)
        live = [(c, g) for c, g in zip(calls, grads) if g is not None]
        if not live:
            return
        if "bias" in bufs:
            gsum = sum(g.flatten(2).sum(2) for _, g in live)
            reduce_into(bufs["bias"], gsum, mode)
        if "weight" not in bufs:
            return
        w = bufs["weight"].view(module.out_channels, cg)
        step = self._chunk(module, max((g for _, g in live), key=lambda t: t.numel()), n)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            pairs = self._ga(module, [c for c, _ in live], [g for _, g in live], lo, hi, n)
            G = torch.cat([p[0] for p in pairs], 1) if len(pairs) > 1 else pairs[0][0]
            A = torch.cat([p[1] for p in pairs], 1) if len(pairs) > 1 else pairs[0][1]
            for gi in range(groups):
                rows = w[gi * og : (gi + 1) * og]
                persample_sq_(
                    rows if mode == "sq" else None,
                    rows if mode == "abs" else None,
                    G[..., gi * og : (gi + 1) * og],
                    A[..., gi * cg : (gi + 1) * cg],
                    backend=backend,
                )

    def sig(self, module, calls, names, n, activation):
        out = {}
        groups, og, cg = self._groups(module)
        if "weight" in names:
            tot = torch.zeros(groups, cg, dtype=torch.float32, device=module.weight.device)
            for call in calls:
                x = call_input(call)
                step = self._chunk(module, call.output, n)
                for lo in range(0, n, step):
                    a = unfold(module, x[lo : min(n, lo + step)]).abs().sum((0, 1), dtype=torch.float32)
                    tot += a.view(groups, cg)
            fac = tot.repeat_interleave(og, 0).view(module.weight.shape)
            out["weight"] = (fac, True)
        if "bias" in names:
            s = sum(
                _act(activation, c.output)
                .abs()
                .transpose(0, 1)
                .reshape(module.out_channels, -1)
                .sum(1, dtype=torch.float32)
                for c in calls
            )
            out["bias"] = (s, False)
        return out


# --------------------------------------------------------------------------------------- Embedding
class EmbeddingRule(Rule):
    """nn.Embedding: per-sample row gradients, duplicate ids of a sample summed before squaring.

    ``padding_idx`` rows get no gradient (as in PyTorch). ``max_norm`` renormalises rows in the
    forward; ``scale_grad_by_freq`` rescales only PyTorch's backward, not the true gradient: both
    are ignored (the true per-sample gradient is returned)."""

    param_names = ("weight",)

    def _ids_grads(self, module, calls, grads, lo, hi, n):
        ids, gs = [], []
        for call, g in zip(calls, grads):
            if g is None:
                continue
            x = call_input(call)
            _batch_first(x, n, module)
            ids.append(x[lo:hi].reshape(hi - lo, -1))
            gs.append(g[lo:hi].reshape(hi - lo, -1, module.embedding_dim))
        if not ids:
            return None, None
        ids = torch.cat(ids, 1) if len(ids) > 1 else ids[0]
        gs = torch.cat(gs, 1) if len(gs) > 1 else gs[0]
        if module.padding_idx is not None:
            gs = gs * (ids != module.padding_idx).unsqueeze(-1).to(gs.dtype)
        return ids, gs

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
        live = [g for g in grads if g is not None]
        if not live:
            return
        t = sum(call_input(c).reshape(n, -1).shape[1] for c, g in zip(calls, grads) if g is not None)
        V, D = module.num_embeddings, module.embedding_dim
        step = n
        while step > 1 and step * min(V, step * t) * D * 4 > CHUNK_BYTES:
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
            ids = call_input(call).reshape(-1)
            if module.padding_idx is not None:
                ids = ids[ids != module.padding_idx]
            cnt += torch.bincount(ids, minlength=V).to(torch.float32)
        return {"weight": (cnt.unsqueeze(1).expand(V, module.embedding_dim), True)}


# ------------------------------------------------------------------------------------------- Norms
class _NormRule(Rule):
    """Affine norm layers: weight p_n = sum_t g ⊙ x_hat, bias p_n = sum_t g (x_hat recomputed)."""

    def xhat(self, module, x: Tensor) -> Tensor:
        raise NotImplementedError

    def feat(self, module, t: Tensor, n: int) -> Tensor:
        """Reshape a (n, ...) tensor to (n, T, *param_shape) for the per-sample sum over T."""
        raise NotImplementedError

    def _terms(self, module, calls, grads, lo, hi, n):
        out = []
        for call, g in zip(calls, grads):
            if g is None:
                continue
            x = call_input(call)
            _batch_first(x, n, module)
            out.append((x[lo:hi], g[lo:hi]))
        return out

    def per_sample(self, module, calls, grads, names, lo, hi, n):
        c = hi - lo
        ref = module.weight if module.weight is not None else module.bias
        dt = torch.promote_types(ref.dtype, torch.float32)  # half models: fp32 statistics
        res = {k: torch.zeros((c,) + tuple(ref.shape), dtype=dt, device=ref.device) for k in names}
        for x, g in self._terms(module, calls, grads, lo, hi, n):
            if "weight" in names:
                xh = self.xhat(module, x)
                res["weight"] += self.feat(module, g.to(xh.dtype) * xh, c).sum(1).to(dt)
            if "bias" in names:
                res["bias"] += self.feat(module, g, c).sum(1).to(dt)
        return res

    def accumulate(self, module, calls, grads, bufs, mode, n, backend):
        ps = self.per_sample(module, calls, grads, list(bufs), 0, n, n)  # (n, features): small
        for k, b in bufs.items():
            reduce_into(b, ps[k], mode)

    def sig(self, module, calls, names, n, activation):
        out = {}
        if "weight" in names:
            s = sum(
                self.feat(module, self.xhat(module, call_input(c)), n).abs().sum((0, 1), dtype=torch.float32)
                for c in calls
            )
            out["weight"] = (s, True)
        if "bias" in names:
            s = sum(
                self.feat(module, _act(activation, c.output), n).abs().sum((0, 1), dtype=torch.float32) for c in calls
            )
            out["bias"] = (s, False)
        return out


class LayerNormRule(_NormRule):
    def xhat(self, module, x):
        dims = tuple(range(-len(module.normalized_shape), 0))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        mu = xf.mean(dims, keepdim=True)
        var = xf.var(dims, unbiased=False, keepdim=True)
        return (xf - mu) * torch.rsqrt(var + module.eps)

    def feat(self, module, t, n):
        return t.reshape((n, -1) + tuple(module.normalized_shape))


class RMSNormRule(LayerNormRule):
    param_names = ("weight",)

    def xhat(self, module, x):
        dims = tuple(range(-len(module.normalized_shape), 0))
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        return xf * torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)


class GroupNormRule(_NormRule):
    def xhat(self, module, x):
        n = x.shape[0]
        xf = (x.float() if x.dtype in (torch.float16, torch.bfloat16) else x).reshape(n, module.num_groups, -1)
        mu = xf.mean(2, keepdim=True)
        var = xf.var(2, unbiased=False, keepdim=True)
        return ((xf - mu) * torch.rsqrt(var + module.eps)).reshape(x.shape)

    def feat(self, module, t, n):
        return t.reshape(n, t.shape[1], -1).transpose(1, 2)


class BatchNormRule(_NormRule):
    """BatchNorm1d/2d/3d in eval mode with running statistics (per-sample x_hat)."""

    def handles(self, module):
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"{type(module).__name__} without running statistics (track_running_stats=False) "
                "normalises with batch statistics even in eval mode, which couples the samples: "
                "per-sample importances are undefined for it"
            )
        return super().handles(module)

    def xhat(self, module, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        rm = module.running_mean.to(xf.dtype).view(shape)
        rv = module.running_var.to(xf.dtype).view(shape)
        return (xf - rm) * torch.rsqrt(rv + module.eps)

    def feat(self, module, t, n):
        return t.reshape(n, t.shape[1], -1).transpose(1, 2)


# ---------------------------------------------------------------------------------------- registry
RULES: dict[type, Rule] = {
    nn.Linear: LinearRule(),
    nn.Conv1d: ConvRule(),
    nn.Conv2d: ConvRule(),
    nn.Conv3d: ConvRule(),
    nn.Embedding: EmbeddingRule(),
    nn.LayerNorm: LayerNormRule(),
    nn.GroupNorm: GroupNormRule(),
    nn.BatchNorm1d: BatchNormRule(),
    nn.BatchNorm2d: BatchNormRule(),
    nn.BatchNorm3d: BatchNormRule(),
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = RMSNormRule()


def register_rule(module_type: type, rule: Rule) -> None:
    """Use ``rule`` for modules of ``module_type`` (and subclasses that keep its ``forward``)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_rule: module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule: rule must be an ewc_fast.estimation.rules.Rule, got {type(rule).__name__}")
    RULES[module_type] = rule


def rule_for(module: nn.Module) -> Rule | None:
    """The registered rule for ``module`` (first class of its MRO in :data:`RULES` whose ``forward``
    the module did not override), else None."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None
