"""The sums of a tied parameter: one parameter with several uses (a tied embedding / output layer).

Sample n's gradient of a parameter used by several modules (or function call sites) is the sum of
its per-use gradients, which must be added *before* squaring: buf += sum_n (sum_u g_nu)^2 (mode
``"sq"``) or sum_n |sum_u g_nu| (mode ``"abs"``). :func:`accumulate_tied` picks one of two paths.

*Split path* (every use has a product or a row form, :attr:`.rules.Rule.product_names` /
:attr:`.rules.Rule.row_names`; e.g. GPT-2's ``wte`` embedding and its ``lm_head`` Linear). Per sample,
P_n = sum over the product uses of L_n^T R_n (a Linear weight: G_n^T A_n; the uses' (L, R) pairs are
concatenated along the token axis, as for a module called twice) and E_n = the row uses' gradient,
non-zero only on sample n's distinct ids (rows of one id in one sample summed; ``padding_idx`` rows
zero). Then

    sum_n (P_n + E_n)^2 = sum_n P_n^2 + sum_n (2 P_n + E_n) ⊙ E_n
    sum_n |P_n + E_n|   = sum_n |P_n| + sum_n (|P_n + E_n| - |P_n|)

where the first term is the per-sample kernel (:func:`ewc_fast.ops.persample_sq_`, no P_n formed)
and the correction is non-zero only on the (sample, id) pairs of the row uses, so it needs P_n on
those rows only: P_n[v] = L_n[:, v]^T R_n, one small GEMM per sample of (distinct ids) x t x D. The
same id in two samples is two pairs (the correction is per sample). Rounding can leave a corrected
entry a few ulps below zero where the exact value is 0 (P_n = -E_n): those entries are clamped to 0
(every exact value is a sum of non-negative terms; NaN stays NaN).

*Dense path* (anything else): chunks of explicit per-sample gradients (:meth:`.rules.Rule.per_sample`)
of every use, summed, squared (or |.|) and added (:func:`.rules.reduce_into`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .rules import chunk_rows, reduce_into
from .rules.base import cat_tokens, persample_into

__all__ = ["accumulate_tied", "split_applies"]


def split_applies(uses) -> bool:
    """Whether the split path serves a tied parameter with these uses (:class:`~.plan.TiedUse`)."""
    return all(u.local in u.rule.product_names or u.local in u.rule.row_names for u in uses)


def accumulate_tied(per_use: list, buf: Tensor, mode: str, n: int, backend: str) -> None:
    """buf += the tied sums of one parameter (module doc). ``per_use``: [(use, calls, grads)] with
    ``use`` a :class:`~.plan.TiedUse`, the use's captured calls and their output gradients."""
    if split_applies([u for u, _, _ in per_use]):
        _split(per_use, buf, mode, n, backend)
    else:
        _dense(per_use, buf, mode, n)


def _dense(per_use: list, buf: Tensor, mode: str, n: int) -> None:
    step = chunk_rows(n, 4 * buf.numel())
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        ps = sum(u.rule.per_sample(u.target, cs, gs, [u.local], lo, hi, n)[u.local] for u, cs, gs in per_use)
        reduce_into(buf, ps, mode)


def _cat(pairs: list) -> tuple[Tensor | None, Tensor | None]:
    """Per-use (X (n, t_u, a), Y (n, t_u, b)) pairs (None where a use received no gradient) joined along t."""
    pairs = [(x, y) for x, y in pairs if x is not None]
    if not pairs:
        return None, None
    dx, dy = pairs[0][0].dtype, pairs[0][1].dtype
    return cat_tokens([x.to(dx) for x, _ in pairs]), cat_tokens([y.to(dy) for _, y in pairs])


def _split(per_use: list, buf: Tensor, mode: str, n: int, backend: str) -> None:
    prod = [(u, cs, gs) for u, cs, gs in per_use if u.local in u.rule.product_names]
    rows = [(u, cs, gs) for u, cs, gs in per_use if u.local not in u.rule.product_names]
    L, R = _cat([u.rule.product_pairs(u.target, cs, gs, u.local, 0, n, n) for u, cs, gs in prod])
    ids, E = _cat([u.rule.row_grads(u.target, cs, gs, u.local, 0, n, n) for u, cs, gs in rows])
    if L is not None:  # sum_n P_n^2 (or |P_n|), nothing materialised
        persample_into(buf, L, R, mode, backend)
    if ids is None:
        return
    nrows, d = buf.shape
    ct = torch.promote_types(E.dtype if L is None else L.dtype, torch.float32)
    te, tp = ids.shape[1], 0 if L is None else L.shape[1]
    step = chunk_rows(n, ct.itemsize * te * (4 * d + tp))  # E rows, P rows, delta; padded L rows
    touched = []
    for lo in range(0, n, step):
        hi = min(n, lo + step)
        c = hi - lo
        # the distinct (sample, id) pairs of the chunk, sample-major, and E_n on them
        key = torch.arange(c, device=ids.device).unsqueeze(1) * nrows + ids[lo:hi]
        uniq, inv = torch.unique(key, return_inverse=True)
        e = torch.zeros(uniq.numel(), d, dtype=ct, device=buf.device)
        e.index_add_(0, inv.reshape(-1), E[lo:hi].reshape(-1, d).to(ct))
        s, v = uniq // nrows, uniq % nrows
        if L is None:
            p = torch.zeros_like(e)
        else:  # P_n on those rows: L_n[:, v]^T R_n, padded to the most pairs of one sample, one bmm
            counts = torch.bincount(s, minlength=c)
            pos = torch.arange(uniq.numel(), device=s.device) - (torch.cumsum(counts, 0) - counts)[s]
            lsel = torch.zeros(c, int(counts.max()), tp, dtype=ct, device=buf.device)
            lsel[s, pos] = L[lo:hi][s, :, v].to(ct)  # gathered first: no fp32 copy of the chunk's L
            p = torch.bmm(lsel, R[lo:hi].to(ct))[s, pos]
        delta = (2 * p + e) * e if mode == "sq" else (p + e).abs() - p.abs()
        buf.index_add_(0, v, delta.to(buf.dtype))
        touched.append(v)
    t = torch.unique(torch.cat(touched))
    buf.index_copy_(0, t, buf.index_select(0, t).clamp_min_(0))
