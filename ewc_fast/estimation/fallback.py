"""Exact fallback for modules without a rule: per-sample gradients with ``torch.func``.

For a module M with captured calls (args_c, kwargs_c, out_c) and output gradients g_c of one seed,
the per-sample gradient of parameter θ for sample n is the vector-Jacobian product

    p_n = ∂/∂θ  sum_c <M_θ(args_c[n]), g_c[n]>

evaluated with ``functional_call`` on a batch of one (the sample keeps a batch dimension of size 1,
so modules that insist on batched input work) and vectorised over the samples of a chunk with
``vmap(grad(.))``. Only M is re-run, not the model, and only M's parameters that need the
fallback are differentiated. Used for any module with direct parameters but no rule (including
``nn.MultiheadAttention`` with ``add_bias_kv`` / ``add_zero_attn``, which its rule in
:mod:`.rules.attention` leaves here), and parameters used outside the module that owns
them (then M is the lowest common ancestor of every module using the parameter).

Which dimension of each tensor is the batch dimension is decided by a resolver: by default a tensor
whose leading size equals the batch size N is batched along dim 0 and any other tensor is shared by
all samples. ``BATCH_DIMS`` maps a module class to a specific resolver (``nn.MultiheadAttention``
with ``batch_first=False`` is batched along dim 1). The module must treat samples independently in
eval mode (no batch statistics, no data-dependent Python control flow under ``vmap``).
Attention runs on SDPA's math backend, the one with ``vmap`` batching rules (the fused CPU/CUDA
kernels fall back to a per-sample loop). Chunks of samples keep the ``vmap`` temporaries under a
quarter of :data:`.rules.base.CHUNK_BYTES`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_flatten, tree_unflatten

from .rules import base as rules_base
from .rules.base import Call, chunk_rows, reduce_into


def _default_dims(module: nn.Module, call: Call, n: int):
    """(batch dim per leaf of (args, kwargs), batch dim per leaf of the output): 0 if size[0] == n."""

    def dims(leaves):
        return [0 if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else None for t in leaves]

    return dims(tree_flatten((call.args, call.kwargs))[0]), dims(tree_flatten(call.output)[0])


def _mha_dims(module: nn.MultiheadAttention, call: Call, n: int):
    """nn.MultiheadAttention: 3-D query/key/value and the attention output are batched along dim 0 if
    ``batch_first`` else dim 1; key_padding_mask and the attention weights along dim 0; a 2-D
    attn_mask is shared; a 3-D (per sample and head) attn_mask is refused."""
    names = list(inspect.signature(type(module).forward).parameters)[1:]
    seq_dim = 0 if module.batch_first else 1

    def dims(name, v):
        if not isinstance(v, Tensor):
            return [None] * len(tree_flatten(v)[0])
        if name in ("query", "key", "value"):
            return [seq_dim if v.dim() == 3 else None]
        if name == "key_padding_mask":
            return [0 if v.dim() == 2 else None]
        if name == "attn_mask" and v.dim() == 3:
            raise NotImplementedError(
                "nn.MultiheadAttention with a 3-D attn_mask (one mask per sample and head) "
                "is not supported by the per-sample fallback; pass a 2-D attn_mask or "
                "a key_padding_mask"
            )
        return [None]

    in_dims = []
    for i, a in enumerate(call.args):
        in_dims += dims(names[i] if i < len(names) else "", a)
    for k, v in call.kwargs.items():
        in_dims += dims(k, v)
    out_leaves = tree_flatten(call.output)[0]
    out_dims = [seq_dim if i == 0 else (0 if isinstance(t, Tensor) else None) for i, t in enumerate(out_leaves)]
    return in_dims, out_dims


#: module class -> resolver(module, call, n) -> (batch dims of the (args, kwargs) leaves, of the output leaves)
BATCH_DIMS: dict[type, Callable] = {nn.MultiheadAttention: _mha_dims}


def batch_dims(module: nn.Module, call: Call, n: int):
    """The batch dimension of every leaf of ``call``'s (args, kwargs) and output (None: shared by all
    samples), from the resolver in :data:`BATCH_DIMS` of the first class in ``module``'s MRO, else by size."""
    for cls in type(module).__mro__:
        if cls in BATCH_DIMS:
            return BATCH_DIMS[cls](module, call, n)
    return _default_dims(module, call, n)


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
            if d is None:
                raise ValueError(
                    f"{type(module).__name__}: output #{j} with a gradient has no batch dimension "
                    f"of size {n}; the per-sample fallback cannot split it by sample"
                )
            outs.append((j, d))
            batched.append(_take(gj, d, lo, hi))
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
                g = next(it).unsqueeze(d)
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
            ps = per_sample_grads(module, calls, grads, names, lo, hi, n)
            for k in names:
                reduce_into(bufs[k], ps[k], mode)
