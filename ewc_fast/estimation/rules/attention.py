"""Exact per-layer rule for ``nn.MultiheadAttention`` (registered by :mod:`ewc_fast.estimation.rules`).

``nn.MultiheadAttention`` calls ``F.multi_head_attention_forward`` with its weights directly, so
``out_proj``'s hooks never fire and, without this rule, every MHA parameter goes to the slow
``torch.func`` fallback. The rule reads what the forward and backward compute anyway: during the
capture forward, :class:`~.attention_watch.MHAWatch` records inside each call the outputs P of the
input projections, the context C fed to ``out_proj`` and the ``bias_k`` / ``bias_v`` repeats; the
backward that autograd runs to reach the layers below hands over G_P = dseed/dP, because the
projection outputs are captured like module outputs. No attention is recomputed.

Notation, per sample n: query X_q (L, E), key X_k (S, kdim), value X_v (S, vdim) (batch-first;
``batch_first=False`` inputs are transposed), W_q, W_k, W_v the row blocks [0:E], [E:2E], [2E:3E]
of ``in_proj_weight`` (or ``q/k/v_proj_weight`` when kdim/vdim != E), b_q, b_k, b_v those of
``in_proj_bias``; W_o, b_o = ``out_proj``; Y the output, C the context (the attention output
before ``out_proj``), G_Y = dseed/dY. PyTorch projects with one ``linear`` per row block it
covers: [0:3E] (self-attention, X_q = X_k = X_v), [0:E] and [E:3E] (X_k = X_v), or one per block.
For a projection P = X W_r^T + b_r of rows r, with G_P its output gradient (everything between P
and Y -- masks, ``is_causal``, returned weights, ``add_zero_attn`` -- is PyTorch's own code, so
G_P is exact whatever the configuration), per sample:

* ``in_proj_weight`` / ``q/k/v_proj_weight`` rows r:   G_P^T X  (X: the query for q rows, the key
  for k rows, the value for v rows; equal where one projection covers several blocks)
* ``in_proj_bias`` rows r:                         sum_t G_P
* ``out_proj.weight``  G_Y^T C,   ``out_proj.bias``  sum_t G_Y
* ``bias_k`` / ``bias_v`` (``add_bias_kv``):       G_R[0, n] for R = bias.repeat(1, N, 1)

A module called several times per batch sums each parameter's per-sample gradient over its calls:
the (G, X) pairs of the calls are concatenated along the token axis before squaring (as for
``nn.Linear``); when every call is one [0:3E] projection the three blocks stay one product
[G_q | G_k | G_v]^T X. The weight terms go through :func:`ewc_fast.ops.persample_sq_` (sq += P_n^2
/ abs += |P_n|, the N x P per-sample gradients are never formed), the bias terms through
``reduce_into``. Computation is in the input dtype (fp32 for fp16/bf16 inputs). Dropout is off:
estimation runs the model in eval mode.

Refused: unbatched (2-D) calls and calls whose query/key/value do not hold the samples along the
batch dimension (``ValueError``). Left to the exact ``torch.func`` fallback (``meta['fallback']``
names them) when the watch cannot run on this PyTorch (:func:`~.attention_watch.watch_available`).
SIG has no rule for MHA (the engine uses |w|).
"""

from __future__ import annotations

import inspect

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_flatten

from ..provenance import BDim
from .attention_watch import MHAWatch, context_batch_first, watch_available
from .base import Call, Rule, cat_tokens, chunk_rows, live_calls, persample_into, reduce_into

__all__ = ["MultiheadAttentionRule"]

_PARAMS = (
    "in_proj_weight",
    "in_proj_bias",
    "q_proj_weight",
    "k_proj_weight",
    "v_proj_weight",
    "bias_k",
    "bias_v",
    "out_proj.weight",
    "out_proj.bias",
)
_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)
_BLOCKS = ("q", "k", "v")
_INPUTS = {"q": "query", "k": "key", "v": "value"}


def _bind(module: nn.MultiheadAttention, call: Call) -> dict:
    """The call's arguments by name (``MultiheadAttention.forward``'s signature, defaults applied)."""
    try:
        bound = _SIGNATURE.bind(module, *call.args, **call.kwargs)
    except TypeError as e:
        raise ValueError(f"nn.MultiheadAttention: could not bind the captured call arguments: {e}") from None
    bound.apply_defaults()
    return dict(bound.arguments)


class MultiheadAttentionRule(Rule):
    """``nn.MultiheadAttention``: exact per-sample statistics of its projections (formulas in the module doc)."""

    per_leaf = True
    inner_capture = MHAWatch

    def handles(self, module):
        if not watch_available():
            return ()  # this PyTorch's MHA cannot be watched: everything stays on the torch.func fallback
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

    # ------------------------------------------------------------------------------- one call
    @staticmethod
    def _inputs(module, call: Call, n: int) -> dict:
        """query / key / value of a call, batch-first, after checking that they hold the samples
        along the module's batch dimension."""
        a = _bind(module, call)
        bf = module.batch_first
        bdim = 0 if bf else 1
        out = {}
        for what in ("query", "key", "value"):
            t = a[what]
            if not isinstance(t, Tensor) or t.dim() != 3:
                raise ValueError(
                    "nn.MultiheadAttention called with unbatched (2-D) inputs: per-sample importances "
                    "need a batch dimension (pass (N, L, E) with batch_first=True or (L, N, E))"
                )
            if t.shape[bdim] != n:
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
            out[what] = t if bf else t.transpose(0, 1)
        return out

    def _pairs(self, module, calls, grads, names, lo, hi, n):
        """name -> list of (G (c, T, O), A (c, T, I)) pairs over the calls (in_proj_weight split into
        row blocks ``"in_proj_weight:q"`` ..., or ``"in_proj_weight:qkv"`` when every call projects all
        rows at once); biases: name -> per-sample gradient (c, *shape) summed over the calls."""
        E = module.embed_dim
        c = hi - lo
        pairs: dict[str, list] = {}
        bias: dict[str, Tensor] = {}
        recs = []
        for call, g in zip(calls, grads):
            rec = call.watched
            if rec is None:
                raise ValueError(
                    "nn.MultiheadAttention: this call was not seen from inside during the forward (was it run "
                    "outside nn.MultiheadAttention.forward, or on its inference fast path?), so its "
                    "projections' gradients are unknown"
                )
            xs = self._inputs(module, call, n)
            spans = sorted(e[1:3] for e in rec.entries if e[0] == "proj")
            if (
                [r0 for r0, _ in spans] != [0] + [r0 + r for r0, r in spans[:-1]]
                or sum(r for _, r in spans) != 3 * E
                or (rec.ctx is None)
            ):
                raise ValueError(
                    f"nn.MultiheadAttention: the projections seen inside its call cover rows {spans} of "
                    f"{3 * E} (context {'missing' if rec.ctx is None else 'seen'}): this PyTorch's "
                    "multi_head_attention_forward is not the one the rule was written for; please report it"
                )
            n_out = len(tree_flatten(call.output)[0])
            recs.append((rec, xs, g[0] if g else None, g[n_out:]))
        merged = (
            all([e[1:3] for e in rec.entries if e[0] == "proj"] == [(0, 3 * E)] for rec, _, _, _ in recs)
            and module._qkv_same_embed_dim
        )

        def add_bias(name, s):
            bias[name] = s if name not in bias else bias[name] + s

        for rec, xs, gy, inner in recs:
            dt = torch.promote_types(xs["query"].dtype, torch.float32)
            if gy is not None:
                gy = gy[lo:hi].to(dt)
                if "out_proj.weight" in names:
                    pairs.setdefault("out_proj.weight", []).append((gy, context_batch_first(rec, lo, hi).to(dt)))
                if "out_proj.bias" in names:
                    add_bias("out_proj.bias", gy.sum(1))
            b_in = None
            for entry, gi in zip(rec.entries, inner):
                if gi is None:
                    continue  # no gradient reached this tensor: it contributes nothing
                gi = gi[lo:hi].to(dt)
                if entry[0] == "bias":
                    if entry[1] in names:
                        add_bias(entry[1], gi.reshape(c, 1, 1, -1))
                    continue
                _, r0, rows, pname = entry[:4]
                if len(entry) > 4:  # stacked blocks (c, k, T, E) -> (c, T, k*E)
                    gi = gi.transpose(1, 2).reshape(c, gi.shape[2], rows)
                if "in_proj_bias" in names:
                    b_in = torch.zeros(c, 3 * E, dtype=dt, device=gi.device) if b_in is None else b_in
                    b_in[:, r0 : r0 + rows] += gi.sum(1)
                if pname != "in_proj_weight":  # q/k/v_proj_weight: one block, its own input
                    if pname in names:
                        x = xs[_INPUTS[pname[0]]][lo:hi].to(dt)
                        pairs.setdefault(pname, []).append((gi, x))
                    continue
                if "in_proj_weight" not in names:
                    continue
                x = xs[_INPUTS[_BLOCKS[r0 // E]]][lo:hi].to(dt)  # one input for all blocks it covers
                if merged:
                    pairs.setdefault("in_proj_weight:qkv", []).append((gi, x))
                    continue
                for j in range(r0 // E, (r0 + rows) // E):
                    col = j * E - r0
                    pairs.setdefault(f"in_proj_weight:{_BLOCKS[j]}", []).append((gi[..., col : col + E], x))
            if b_in is not None:
                add_bias("in_proj_bias", b_in)
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

    # -------------------------------------------------------------------------------- interface
    def per_sample(self, module, calls, grads, names, lo, hi, n):
        c = hi - lo
        res = {}
        for k in names:
            p = module.get_parameter(k)
            res[k] = torch.zeros(
                (c,) + tuple(p.shape), dtype=torch.promote_types(p.dtype, torch.float32), device=p.device
            )
        calls, grads = live_calls(calls, grads)
        if not calls:
            return res
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
        # the pairs are views of captured tensors; what is copied per chunk is their dtype cast and,
        # for several calls, their concatenation: (L + S) tokens x (3E + kdim + vdim) per call, bounded
        # inner tensors: (T, N, rows) or stacked (k, T, N, E); bias repeats (1, N, E) count 1
        tokens = sum(sum(t.shape[t.dim() - 3] for t in c.inner) for c in calls)
        width = 4 * module.embed_dim + module.kdim + module.vdim
        step = chunk_rows(n, 4 * max(1, tokens) * width)
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
