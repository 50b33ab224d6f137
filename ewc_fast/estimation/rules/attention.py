"""Exact per-layer rule for ``nn.MultiheadAttention`` (registered by :mod:`ewc_fast.estimation.rules`).

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward`` with its weights directly, so
``out_proj``'s hooks never fire and, without this rule, every MHA parameter goes to the slow
``torch.func`` fallback. The rule recomputes the attention of a chunk of samples from the captured
(detached) inputs and back-propagates the captured output gradients through it by hand.

Notation, per sample n (batch-first; ``batch_first=False`` inputs are transposed first): query
X_q (L, E), key X_k (S, kdim), value X_v (S, vdim), H heads of size d = E / H, scale s = 1/sqrt(d);
W_q, W_k, W_v the row blocks [0:E], [E:2E], [2E:3E] of ``in_proj_weight`` (or ``q/k/v_proj_weight``
when kdim/vdim != E), b_q, b_k, b_v the blocks of ``in_proj_bias``; W_o, b_o = ``out_proj``.
Forward (eval mode, no dropout)::

    q = X_q W_q^T + b_q,  k = X_k W_k^T + b_k,  v = X_v W_v^T + b_v          (split into heads h)
    P_h = softmax(s q_h k_h^T + M)        M: attn_mask (+) key_padding_mask, bool -> -inf
    C = concat_h(P_h v_h)  (L, E),   Y = C W_o^T + b_o,   weights = P (N, H, L, S) or mean_h P_h

with M as PyTorch builds it: a bool mask becomes -inf where True, a float mask is added as is, a
2-D attn_mask (L, S) is shared, a 3-D one is (N*H, L, S) (sample-major), key_padding_mask (N, S) is
added to every head and query row; ``is_causal=True`` with no key_padding_mask and
``need_weights=False`` ignores attn_mask and uses SDPA's causal mask (key j visible to query i iff
j <= i), otherwise attn_mask is used as given (the flag is only a hint).

Backward from the captured G_Y = dseed/dY (L, E) and, when the returned weights were used, G_W
(their gradient; spread as G_W / H over the heads if averaged)::

    G_C = G_Y W_o                                 (split into heads)
    G_v_h = P_h^T G_C_h
    G_P_h = G_C_h v_h^T + G_W_h
    G_S_h = P_h ⊙ (G_P_h - rowsum(G_P_h ⊙ P_h))   (softmax backward; 0 where masked)
    G_q_h = s G_S_h k_h,   G_k_h = s G_S_h^T q_h

Per-sample parameter gradients (sums over tokens, and over the module's calls when it is called
several times in one forward: the (G, A) pairs of the calls are concatenated along the token axis
before squaring, as for ``nn.Linear``):

* ``out_proj.weight``  G_Y^T C        ``out_proj.bias``  sum_t G_Y
* ``in_proj_weight``   rows [0:E] G_q^T X_q, [E:2E] G_k^T X_k, [2E:3E] G_v^T X_v
  (self-attention, X_q = X_k = X_v: one product [G_q | G_k | G_v]^T X); likewise ``q/k/v_proj_weight``
* ``in_proj_bias``     [sum_t G_q, sum_t G_k, sum_t G_v]

The weight terms go through :func:`ewc_fast.ops.persample_sq_` (sq += P_n^2 / abs += |P_n|, the
N x P per-sample gradients are never formed), the bias terms through ``reduce_into``. Chunks of
samples keep the (c, H, L, S) attention temporaries under :data:`.base.CHUNK_BYTES`. Computation is
in the input dtype (fp32 for fp16/bf16 inputs).

Unsupported (left to the exact ``torch.func`` fallback by :meth:`MultiheadAttentionRule.handles`):
``add_bias_kv=True`` and ``add_zero_attn=True``. Unbatched (2-D) calls raise ``ValueError``.
SIG has no rule for MHA (the engine uses |w|).
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..provenance import BDim
from .base import Call, Rule, cat_tokens, chunk_rows, live_calls, persample_into, reduce_into

__all__ = ["MultiheadAttentionRule"]

_PARAMS = (
    "in_proj_weight",
    "in_proj_bias",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "out_proj.weight",
    "out_proj.bias",
)
_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_BLOCKS = ("q", "k", "v")


def _bind(module: nn.MultiheadAttention, call: Call) -> dict:
    """The call's arguments by name (``MultiheadAttention.forward``'s signature, defaults applied)."""
    try:
        bound = _SIGNATURE.bind(module, *call.args, **call.kwargs)
    except TypeError as e:
        raise ValueError(f"nn.MultiheadAttention: could not bind the captured call arguments: {e}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


def _float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """PyTorch's canonical additive mask: bool -> 0 / -inf (True = masked), float -> as is."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not mask.is_floating_point():
        raise ValueError(f"nn.MultiheadAttention: masks must be bool or floating, got {mask.dtype}")
    return mask.to(dtype)


def _same(a: Tensor, b: Tensor) -> bool:
    """Whether two captured (separately detached) tensors are the same data."""
    return (a is b) or (
        a.data_ptr() == b.data_ptr()
        and a.shape == b.shape
        and a.stride() == b.stride()
        and a.dtype == b.dtype
        and a.device == b.device
    )


class _Chunk:
    """One call's recomputed quantities for samples lo:hi (batch-first, compute dtype).

    ``x``: block -> input (c, T_block, in_block); ``g``: block -> gradient of the projection output
    (c, T_block, E) (None when only out_proj is asked for); ``gy`` (c, L, E) or None (no output
    gradient); ``ctx`` (c, L, E); ``self_attn``: X_q = X_k = X_v."""

    __slots__ = ("x", "g", "gy", "ctx", "self_attn")


class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention``: exact per-sample statistics of its projections (formulas in the module doc)."""

    per_leaf = True

    def handles(self, module):
        if module.bias_k is not None or module.bias_v is not None or module.add_zero_attn:
            return ()  # bias_k/bias_v or a zero key/value: everything stays on the torch.func fallback
        out = []
        for name in _PARAMS:
            if "." in name:
                sub, leaf = name.split(".")
                p = getattr(getattr(module, sub, None), leaf, None)
            else:
                p = module._parameters.get(name)
            if isinstance(p, nn.Parameter):
                out.append(name)
        return tuple(out)

    # ------------------------------------------------------------------------------- recompute
    @staticmethod
    def _weights(module, dtype):
        """(W_q, W_k, W_v, b_q, b_k, b_v, W_o), detached, in ``dtype`` (biases None without bias)."""
        E = module.embed_dim
        if module._qkv_same_embed_dim:
            w = module.in_proj_weight.detach().to(dtype)
            wq, wk, wv = w[:E], w[E : 2 * E], w[2 * E :]
        else:
            wq, wk, wv = (getattr(module, f"{b}_proj_weight").detach().to(dtype) for b in _BLOCKS)
        if module.in_proj_bias is not None:
            b = module.in_proj_bias.detach().to(dtype)
            bq, bk, bv = b[:E], b[E : 2 * E], b[2 * E :]
        else:
            bq = bk = bv = None
        return wq, wk, wv, bq, bk, bv, module.out_proj.weight.detach().to(dtype)

    def _chunk(self, module, call: Call, g, lo: int, hi: int, n: int, need_qkv: bool) -> _Chunk | None:
        """Recompute the attention of one call for samples lo:hi and back-propagate its output gradients."""
        if g is None:
            return None
        a = _bind(module, call)
        query, key, value = a["query"], a["key"], a["value"]
        if not isinstance(query, Tensor) or query.dim() != 3:
            raise ValueError(
                "nn.MultiheadAttention called with unbatched (2-D) inputs: per-sample importances "
                "need a batch dimension (pass (N, L, E) with batch_first=True or (L, N, E))"
            )
        bf = module.batch_first
        bdim = 0 if bf else 1
        for what, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3 or t.shape[bdim] != n:
                raise ValueError(
                    f"nn.MultiheadAttention (batch_first={bf}): its {what} has shape {tuple(t.shape)}, "
                    f"whose batch dimension {bdim} is not the batch size {n}"
                )
            bd = call.dim_of(t, n)
            if n > 1 and bd is not None and bd != BDim(bdim):
                raise ValueError(
                    f"nn.MultiheadAttention (batch_first={bf}): its {what} {tuple(t.shape)} holds the samples "
                    + (f"along dimension {bd.dim}" if isinstance(bd, BDim) else f"in an unknown way ({bd.reason})")
                    + f", not along its batch dimension {bdim}: the attention would mix the samples"
                )
        leaves = tree_flatten(call.output)[0]
        g_y = g[0] if len(g) > 0 else None
        g_w = g[1] if len(g) > 1 and len(leaves) > 1 and isinstance(leaves[1], Tensor) else None
        if g_y is None and g_w is None:
            return None

        def take(t):
            return t[lo:hi] if bf else t[:, lo:hi].transpose(0, 1)

        dt = torch.promote_types(query.dtype, torch.float32)
        xq, xk, xv = take(query).to(dt), take(key).to(dt), take(value).to(dt)
        c, L, E = xq.shape[0], xq.shape[1], module.embed_dim
        S = xk.shape[1]
        H = module.num_heads
        d = E // H
        scale = 1.0 / math.sqrt(d)
        wq, wk, wv, bq, bk, bv, wo = self._weights(module, dt)

        def proj(x, w, b):
            y = torch.matmul(x, w.t())
            return y if b is None else y.add_(b)

        def heads(t):  # (c, T, E) -> (c, H, T, d)
            return t.view(c, t.shape[1], H, d).transpose(1, 2)

        def merge(t):  # (c, H, T, d) -> (c, T, E)
            return t.transpose(1, 2).reshape(c, t.shape[2], E)

        q, k, v = heads(proj(xq, wq, bq)), heads(proj(xk, wk, bk)), heads(proj(xv, wv, bv))
        scores = torch.matmul(q, k.transpose(-2, -1)).mul_(scale)  # (c, H, L, S)
        mask = self._mask(module, a, n, lo, hi, L, S, dt, query.device)
        if mask is not None:
            scores.add_(mask)
        p = torch.softmax(scores, -1)
        del scores
        ctx = merge(torch.matmul(p, v))
        gy = g_y[lo:hi].to(dt) if g_y is not None else None  # output gradients arrive batch-first
        out = _Chunk()
        out.gy, out.ctx = gy, ctx
        out.self_attn = _same(query, key) and _same(key, value)
        out.x = {"q": xq, "k": xk, "v": xv}
        out.g = {"q": None, "k": None, "v": None}
        if not need_qkv:
            return out
        gp = None
        if gy is not None:
            gc = heads(torch.matmul(gy, wo))  # G_C (c, H, L, d)
            out.g["v"] = merge(torch.matmul(p.transpose(-2, -1), gc))
            gp = torch.matmul(gc, v.transpose(-2, -1))
        else:  # only the returned weights were used: v gets no gradient
            out.g["v"] = torch.zeros(c, S, E, dtype=dt, device=xq.device)
        if g_w is not None:
            gw = g_w[lo:hi].to(dt)
            gw = gw.unsqueeze(1) / H if gw.dim() == 3 else gw  # averaged over heads: spread G_W / H
            gp = gw.expand(c, H, L, S).clone() if gp is None else gp.add_(gw)
        gs = gp.mul_(p)  # G_P ⊙ P
        gs.sub_(p * gs.sum(-1, keepdim=True))  # P ⊙ (G_P - rowsum(G_P ⊙ P))
        out.g["q"] = merge(torch.matmul(gs, k)).mul_(scale)
        out.g["k"] = merge(torch.matmul(gs.transpose(-2, -1), q)).mul_(scale)
        return out

    @staticmethod
    def _mask(module, a, n, lo, hi, L, S, dt, device) -> Tensor | None:
        """The additive mask for samples lo:hi, broadcastable to (c, H, L, S), as PyTorch builds it."""
        kpm, attn_mask = a["key_padding_mask"], a["attn_mask"]
        if kpm is not None and kpm.dim() != 2:
            raise ValueError(f"nn.MultiheadAttention: key_padding_mask of shape {tuple(kpm.shape)}; expected (N, S)")
        if a["is_causal"] and kpm is None and not a["need_weights"]:
            # PyTorch drops attn_mask and lets SDPA build its causal mask (top-left aligned)
            keep = torch.ones(L, S, dtype=torch.bool, device=device).tril()
            return torch.zeros(L, S, dtype=dt, device=device).masked_fill_(~keep, float("-inf"))
        m = _float_mask(attn_mask, dt)
        if m is not None:
            H = module.num_heads
            if m.dim() == 3:
                if m.shape[0] != n * H:
                    raise ValueError(
                        f"nn.MultiheadAttention: 3-D attn_mask of shape {tuple(m.shape)}; "
                        f"expected (N * num_heads, L, S) = ({n * H}, {L}, {S})"
                    )
                m = m.view(n, H, L, S)[lo:hi]
            elif m.dim() != 2:
                raise ValueError(f"nn.MultiheadAttention: attn_mask must be 2-D or 3-D, got {tuple(m.shape)}")
        kp = _float_mask(kpm, dt)
        if kp is not None:
            kp = kp[lo:hi, None, None, :]
            m = kp if m is None else m + kp
        return m

    # ----------------------------------------------------------------------------------- pairs
    def _pairs(self, module, calls, grads, names, lo, hi, n):
        """name -> list of (G (c, T, O), A (c, T, I)) pairs over the calls; in_proj_weight is split into
        blocks ``"in_proj_weight:q"`` ... or merged (``"in_proj_weight:qkv"``) for self-attention;
        biases: name -> per-sample gradient (c, *shape) summed over the calls."""
        need_qkv = any(not k.startswith("out_proj") for k in names)
        chunks = [
            ch for call, g in zip(calls, grads) if (ch := self._chunk(module, call, g, lo, hi, n, need_qkv)) is not None
        ]
        pairs: dict[str, list] = {}
        bias: dict[str, Tensor] = {}
        if not chunks:
            return pairs, bias
        merged = module._qkv_same_embed_dim and all(ch.self_attn for ch in chunks)
        for ch in chunks:
            if "out_proj.weight" in names and ch.gy is not None:
                pairs.setdefault("out_proj.weight", []).append((ch.gy, ch.ctx))
            gs = ch.g
            if "in_proj_weight" in names:
                if merged:
                    pairs.setdefault("in_proj_weight:qkv", []).append(
                        (torch.cat([gs[b] for b in _BLOCKS], -1), ch.x["q"])
                    )
                else:
                    for b in _BLOCKS:
                        pairs.setdefault(f"in_proj_weight:{b}", []).append((gs[b], ch.x[b]))
            for b in _BLOCKS:
                if f"{b}_proj_weight" in names:
                    pairs.setdefault(f"{b}_proj_weight", []).append((gs[b], ch.x[b]))
            if "in_proj_bias" in names:
                s = torch.cat([gs[b].sum(1) for b in _BLOCKS], -1)
                bias["in_proj_bias"] = s if "in_proj_bias" not in bias else bias["in_proj_bias"] + s
            if "out_proj.bias" in names and ch.gy is not None:
                s = ch.gy.sum(1)
                bias["out_proj.bias"] = s if "out_proj.bias" not in bias else bias["out_proj.bias"] + s
        return pairs, bias

    @staticmethod
    def _cat(pl):
        """One (G, A) pair from a call list's pairs, concatenated along the tokens."""
        return cat_tokens([g for g, _ in pl]), cat_tokens([x for _, x in pl])

    def _targets(self, module, key: str, out: Tensor) -> Tensor:
        """The slice of a (…, *param.shape) tensor that pair list ``key`` writes to (rows of in_proj_weight)."""
        if not key.startswith("in_proj_weight:") or key.endswith("qkv"):
            return out
        E = module.embed_dim
        i = _BLOCKS.index(key[-1])
        return out[..., i * E : (i + 1) * E, :]

    def _bytes_per_sample(self, module, calls, n) -> int:
        """Bytes of one sample's temporaries (bound): ~5 attention maps (H, L, S) and ~8 (T, E) tensors
        (q, k, v, context, G_C and the projection gradients) per call."""
        tot = 0
        for call in calls:
            a = _bind(module, call)
            q, k = a["query"], a["key"]
            if not isinstance(q, Tensor) or q.dim() != 3:
                continue
            L, S = q.shape[1 if module.batch_first else 0], k.shape[1 if module.batch_first else 0]
            elem = max(4, q.element_size())
            tot += elem * (5 * module.num_heads * L * S + 8 * (L + S) * module.embed_dim)
        return max(tot, 1)

    # -------------------------------------------------------------------------------- interface
    def per_sample(self, module, calls, grads, names, lo, hi, n):
        c = hi - lo
        res = {}
        for k in names:
            p = module.get_parameter(k)
            res[k] = torch.zeros(
                (c,) + tuple(p.shape), dtype=torch.promote_types(p.dtype, torch.float32), device=p.device
            )
        pairs, bias = self._pairs(module, calls, grads, names, lo, hi, n)
        for key, pl in pairs.items():
            G, A = self._cat(pl)
            name = key.split(":")[0]
            self._targets(module, key, res[name]).add_(torch.bmm(G.transpose(1, 2), A).to(res[name].dtype))
        for k, s in bias.items():
            res[k] += s.to(res[k].dtype)
        return res

    def accumulate(self, module, calls, grads, bufs, mode, n, backend):
        calls, grads = live_calls(calls, grads)
        if not calls:
            return
        names = list(bufs)
        step = chunk_rows(n, self._bytes_per_sample(module, calls, n))
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            pairs, bias = self._pairs(module, calls, grads, names, lo, hi, n)
            for key, pl in pairs.items():
                G, A = self._cat(pl)
                persample_into(self._targets(module, key, bufs[key.split(":")[0]]), G, A, mode, backend)
            for k, s in bias.items():
                reduce_into(bufs[k], s, mode)

    def sig(self, module, calls, names, n, activation):
        return None  # no SIG rule for attention projections: the engine uses |w|
