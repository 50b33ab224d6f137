"""SIG (Kutalev 2020, arXiv 2005.07107, "total signal"; forward only): the engine's side of the method.

Per batch, while the captured activations are alive (before any backward frees them), every rule
module's :meth:`~.rules.Rule.sig` adds its factor sums (per-layer formulas in :mod:`.rules`) to the
parameter's buffer, summed over every use of a tied parameter (:func:`add_factors`). At the end:

    SIG(θ) = (sum over samples of the factor) / N * (|θ| if the rule says so, else 1)

and |θ| for a parameter that never got a factor (no SIG rule: ``nn.MultiheadAttention``, fallback
modules; or its module never ran). With several ranks that choice is collective: per-parameter
flags (:func:`flags`) are summed with the other statistics and decided on the sums
(:func:`decide`), so every rank returns what a single process on all shards would.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .plan import Plan
from .rules import Call

__all__ = ["add_factors", "flags", "decide", "finalize"]


def add_factors(
    plan: Plan,
    calls: dict[int, list[Call]],
    bufs: dict[str, Tensor],
    n: int,
    activations: dict[str, Callable],
    times_w: dict[str, bool],
) -> None:
    """Add one batch's SIG factor sums to ``bufs``; ``times_w[name]`` records that a factor arrived
    (and whether |w| multiplies it). Parameters that never get one fall back to |w|."""
    uses = [(g.key, g.target, g.path, g.rule, local, full) for g in plan.groups for local, full in g.params.items()]
    uses += [(u.key, u.target, u.path, u.rule, u.local, t.full) for t in plan.tied for u in t.uses]
    for key, m, path, rule, local, full in uses:
        cs = calls[key]
        if not cs:
            continue
        res = rule.sig(m, cs, [local], n, activations.get(path))
        if res is None or local not in res:
            continue
        fac, tw = res[local]
        bufs[full].add_(fac)
        times_w[full] = tw


def flags(names: list[str], times_w: dict[str, bool]) -> list[float]:
    """This rank's SIG flags, to be SUM-reduced over the ranks: per parameter, 1 if a factor arrived
    here, then per parameter, 1 if that factor is multiplied by |w|."""
    return [1.0 if k in times_w else 0.0 for k in names] + [1.0 if times_w.get(k) else 0.0 for k in names]


def decide(names: list[str], summed_flags: list[float]) -> dict[str, bool | None]:
    """SIG's rule per parameter from the flags of :func:`flags` summed over all ranks: None -> |w|
    (no rank got a factor: no SIG rule, or its module never ran anywhere), else whether the factor
    sum is multiplied by |w|. Ranks that got no factor contribute zero sums and follow the others,
    so the result equals a single process on the union of the shards."""
    n = len(names)
    out = {}
    for i, k in enumerate(names):
        have, times_w = summed_flags[i], summed_flags[n + i]
        if have == 0:
            out[k] = None
        elif times_w in (0, have):
            out[k] = times_w > 0
        else:
            raise RuntimeError(
                f"SIG: ranks disagree on whether |w| multiplies the factor of {k!r} "
                "(different sig_activation or rules per rank?)"
            )
    return out


def finalize(mean_factor: Tensor, param: Tensor, decision: bool | None) -> Tensor:
    """SIG of one parameter from its mean factor and :func:`decide`'s decision."""
    if decision is None:
        return param.detach().abs()  # no SIG rule / module never ran on any rank: |w|
    return mean_factor * param.detach().abs() if decision else mean_factor
