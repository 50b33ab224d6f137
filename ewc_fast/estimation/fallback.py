"""Exact fallback for modules without a rule: per-sample gradients with ``torch.func``.

For a module M with captured calls (args_c, kwargs_c, out_c) and output gradients g_c of one seed,
the per-sample gradient of parameter θ for sample n is the vector-Jacobian product

    p_n = ∂/∂θ  sum_c <M_θ(args_c[n]), g_c[n]>

evaluated with ``functional_call`` on a batch of one (the sample keeps a batch dimension of size 1,
so modules that insist on batched input work) and vectorised over the samples of a chunk with
``vmap(grad(.))``. Only M is re-run, not the model, and only M's parameters that need the
fallback are differentiated. Used for any module with direct parameters but no rule, and
parameters used outside the module that owns
them (then M is the lowest common ancestor of every module using the parameter).

Which dimension of each tensor holds the samples comes from provenance (each :class:`Call`
records it, :mod:`.provenance`): a tensor derived from the batch is sliced per sample along that
dimension (kept as a dimension of size 1, so the module sees the layout it was called with), a
shared tensor is passed whole to every sample, and a tensor whose samples were flattened with other
positions or could not be followed is refused with the reason. ``BATCH_DIMS`` maps a module class to
a resolver that overrides provenance for its calls. Output gradients arrive batch-first; the
gradient of a shared output arrives per sample (:mod:`.shared`). The module must treat samples
independently in eval mode (no batch statistics, no data-dependent Python control flow under
``vmap``). Attention runs on SDPA's math backend, the one with ``vmap`` batching rules (the fused
CPU/CUDA kernels fall back to a per-sample loop). Chunks of samples keep the ``vmap`` temporaries
under a quarter of :data:`.rules.base.CHUNK_BYTES`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from .provenance import Unknown
from .rules import base as rules_base
from .rules.base import Call, chunk_rows, reduce_into


def _plain(bd, what: str, module: nn.Module):
    """A provenance entry as a plain dimension index (None: shared), or a clear refusal."""
    if bd is None:
        return None
    if isinstance(bd, Unknown):
        raise ValueError(
            f"{type(module).__name__} (torch.func fallback): cannot tell where the samples of {what} are: {bd.reason}"
        )
    if bd.outer != 1 or bd.inner != 1:
        raise ValueError(
            f"{type(module).__name__} (torch.func fallback): {what} holds the samples flattened with other "
            f"positions (dimension {bd.dim}); the fallback can only split a plain sample dimension"
        )
    return bd.dim


def _provenance_dims(module: nn.Module, call: Call, n: int):
    """(dim per leaf of (args, kwargs), dim per leaf of the output) from the call's provenance."""
    leaves = tree_flatten((call.args, call.kwargs))[0]
    in_dims = [
        _plain(call.dim_of(t, n), f"input #{i} {tuple(t.shape)}", module) if isinstance(t, Tensor) else None
        for i, t in enumerate(leaves)
    ]
    outs = tree_flatten(call.output)[0]
    if call.out_dims is None:
        out_dims = [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else None for t in outs]
    else:
        out_dims = [
            _out_dim(bd, j, module) if isinstance(t, Tensor) else None
            for j, (t, bd) in enumerate(zip(outs, call.out_dims))
        ]
    return in_dims, out_dims


def _out_dim(bd, j: int, module: nn.Module):
    """An output's plain sample dimension, or the refusal (raised only if that output gets a gradient:
    e.g. a Hugging Face model's own loss, which mixes the samples, is returned but never differentiated)."""
    try:
        return _plain(bd, f"output #{j}", module)
    except ValueError as e:
        return e


#: module class -> resolver(module, call, n) -> (batch dims of the (args, kwargs) leaves, of the output
#: leaves); overrides provenance for that class (none is registered by default)
BATCH_DIMS: dict[type, Callable] = {}


def batch_dims(module: nn.Module, call: Call, n: int):
    """The sample dimension of every leaf of ``call``'s (args, kwargs) and output (None: shared by all
    samples), from the resolver in :data:`BATCH_DIMS` of the first class in ``module``'s MRO, else
    from provenance."""
    for cls in type(module).__mro__:
        if cls in BATCH_DIMS:
            return BATCH_DIMS[cls](module, call, n)
    return _provenance_dims(module, call, n)


def _take(t: Tensor, d: int, lo: int, hi: int) -> Tensor:
    return t.detach().narrow(d, lo, hi - lo).movedim(d, 0)


def per_sample_grads(
    module: nn.Module, calls: list[Call], grads: list, names: list[str], lo: int, hi: int, n: int
) -> dict[str, Tensor]:
    """Per-sample gradients (hi - lo, *shape) of ``module``'s parameters ``names`` (dotted names
    relative to ``module``) for samples lo:hi. ``grads[c]``: list of gradients aligned with the
    tensor leaves of ``calls[c].output`` (None where unused), or None if the call got none."""
    from torch.func import functional_call, grad, vmap

    named = dict(module.named_parameters(remove_duplicate=False))
    params = {k: named[k].detach() for k in names}
    plans, batched = [], []
    for call, g in zip(calls, grads):
        if g is None or all(x is None for x in g):
            continue
        in_dims, out_dims = batch_dims(module, call, n)
        leaves, spec = tree_flatten((call.args, call.kwargs))
        fixed = [x.detach() if isinstance(x, Tensor) else x for x in leaves]
        slots = []
        for i, (x, d) in enumerate(zip(leaves, in_dims)):
            if d is not None:
                slots.append((i, d))
                batched.append(_take(x, d, lo, hi))
        outs = []
        for j, (gj, d) in enumerate(zip(g, out_dims)):
            if gj is None:
                continue
            if isinstance(d, ValueError):
                raise d
            outs.append((j, d))  # gradients arrive batch-first (a shared output's: per sample)
            batched.append(gj[lo:hi].detach())
        plans.append((fixed, spec, slots, outs))
    if not plans:
        return {k: torch.zeros((hi - lo,) + tuple(p.shape), dtype=p.dtype, device=p.device) for k, p in params.items()}

    def vjp_sum(p, sample):
        it = iter(sample)
        total = 0.0
        for fixed, spec, slots, outs in plans:
            leaves = list(fixed)
            for i, d in slots:
                leaves[i] = next(it).unsqueeze(d)
            args, kwargs = tree_unflatten(leaves, spec)
            out_leaves = tree_flatten(functional_call(module, p, tuple(args), kwargs))[0]
            for j, d in outs:
                g = next(it)
                g = g.unsqueeze(d) if d is not None else g
                total = total + (out_leaves[j] * g.to(out_leaves[j].dtype)).sum()
        return total

    # the math attention kernel has vmap batching rules (the fused CPU/CUDA kernels fall back to a loop)
    with sdpa_kernel([SDPBackend.MATH]):
        return vmap(grad(vjp_sum), in_dims=(None, 0))(params, batched)


class FunctionalFallback:
    """Accumulates statistics of parameters ``names`` of one module through :func:`per_sample_grads`."""

    def accumulate(self, module, calls, grads, bufs: dict[str, Tensor], mode: str, n: int) -> None:
        names = list(bufs)
        step = chunk_rows(n, 4 * sum(b.numel() for b in bufs.values()), rules_base.CHUNK_BYTES // 4)  # vmap temps
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            try:
                ps = per_sample_grads(module, calls, grads, names, lo, hi, n)
            except RuntimeError as e:  # e.g. data-dependent control flow (a mask check) under vmap
                shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                why = why if len(why) <= 240 else why[:240] + "..."
                raise ValueError(
                    f"{type(module).__name__} (torch.func fallback for parameter(s) {shown}): its forward "
                    f"cannot run per sample under torch.func.vmap ({why}). "
                    "Register a rule for the layer that uses them (ewc_fast.estimation.rules.register_rule), "
                    "or exclude them with requires_grad=False."
                ) from e
            for k in names:
                reduce_into(bufs[k], ps[k], mode)
