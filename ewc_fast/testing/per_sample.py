"""Float64 per-sample *loop* oracle for :func:`ewc_fast.estimate_importance` on any model (for tests).

Where :mod:`ewc_fast.testing.importance` vectorises one model call with ``torch.func``, this oracle
makes no assumption about the model at all, so it also serves third-party models (Hugging Face
transformers, PEFT) whose forward cannot run under ``vmap``: a float64 copy of the model (eval
mode) is called on **one sample at a time** (every tensor of the batch cut to that sample's row,
the batch contract) and differentiated with plain ``torch.autograd.grad``; each method's formula is
then applied literally:

* fisher: mean_n g_n^2 (g_n = ∇ of sample n's loss: ``loss_fn``, or the token NLL of the selected
  logits, -100 ignored, shifted by one for causal LMs, summed or averaged per sample),
* fisher_mc: mean_n mean_k g_{n,y_k}^2, labels drawn like the engine (per batch, ``mc_samples``
  draws of ``torch.multinomial`` on the fp32 softmax of the batch's logits),
* fisher_exact: mean_n sum_y p(y|x_n) (∇ log p(y|x_n))^2, one backward per class,
* mas: mean_n |∇ ||f(x_n)||^2| (f = the selected logits, or their softmax).

Returns ``{method: {name: float64 tensor}}``. It imports nothing from :mod:`ewc_fast.estimation`.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

__all__ = ["loop_reference"]


def _cut(obj, lo: int, hi: int):
    return tree_map(lambda t: t[lo:hi] if isinstance(t, Tensor) and t.dim() > 0 else t, obj)


def _to64(obj):
    return tree_map(lambda t: t.detach().double() if isinstance(t, Tensor) and t.is_floating_point() else t, obj)


def _call(model, inputs):
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def _select(out, output):
    if callable(output):
        return output(out)
    if isinstance(output, str):
        return out[output]
    return out if isinstance(out, Tensor) else out["logits"]


def _nll(logits: Tensor, y: Tensor, shift: bool, reduction: str) -> Tensor:
    """Sample loss: (1, C) / (1,) cross-entropy, or (1, T, C) / (1, T) token NLLs (-100 ignored)."""
    if logits.dim() == 2:
        return F.cross_entropy(logits, y.long(), ignore_index=-100, reduction="sum")
    if shift:
        logits, y = logits[:, :-1], y[:, 1:]
    tok = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long(), ignore_index=-100, reduction="none"
    )
    total = tok.sum()
    if reduction == "mean":
        total = total / (y != -100).sum().clamp(min=1)
    return total


def loop_reference(
    model: nn.Module,
    data,
    methods=("fisher",),
    *,
    loss_fn=None,
    output=None,
    label_shift: bool = False,
    token_reduction: str = "sum",
    mc_samples: int = 1,
    mas_output: str = "logits",
    generator=None,
) -> dict[str, dict[str, Tensor]]:
    """Float64 importances by a per-sample loop of plain autograd (module doc)."""
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    m64 = copy.deepcopy(model).double().eval()
    params = {k: p for k, p in m64.named_parameters() if p.requires_grad}
    names = list(params)
    res = {m: {k: torch.zeros_like(p, dtype=torch.float64) for k, p in params.items()} for m in methods}
    total = 0

    def grads(value):
        gs = torch.autograd.grad(value, [params[k] for k in names], retain_graph=True, allow_unused=True)
        return {k: (g if g is not None else torch.zeros_like(params[k])) for k, g in zip(names, gs)}

    for batch in data:
        if isinstance(batch, Mapping):
            inputs, targets = dict(batch), batch.get("labels")
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            inputs, targets = batch
        elif isinstance(batch, (tuple, list)):
            inputs, targets = batch[0], None
        else:
            inputs, targets = batch, None
        inputs = _to64(inputs)
        leading = [t for t in torch.utils._pytree.tree_leaves(inputs) if isinstance(t, Tensor) and t.dim() > 0]
        nb = int(leading[0].shape[0])
        draws = []
        if "fisher_mc" in methods:
            with torch.no_grad():
                logits = _select(_call(m64, inputs), output)
            c = logits.shape[-1]
            for _ in range(mc_samples):
                probs = torch.softmax(logits.float(), -1).reshape(-1, c)
                if generator is not None:
                    probs = probs.to(generator.device)
                draws.append(torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1]).cpu())
        for i in range(nb):
            x = _cut(inputs, i, i + 1)
            y = _cut(targets, i, i + 1)
            out = _call(m64, x)
            f = _select(out, output) if (loss_fn is None or set(methods) - {"fisher"}) else None
            if "fisher" in methods:
                loss = loss_fn(out, y)[0] if loss_fn is not None else _nll(f, y, label_shift, token_reduction)
                for k, g in grads(loss).items():
                    res["fisher"][k] += g.square()
            if "mas" in methods:
                h = torch.softmax(f, -1) if mas_output == "softmax" else f
                for k, g in grads(h.square().sum()).items():
                    res["mas"][k] += g.abs()
            if "fisher_exact" in methods:
                logp = torch.log_softmax(f, -1)[0]
                p = logp.detach().exp()
                for c in range(logp.shape[-1]):
                    for k, g in grads(logp[c]).items():
                        res["fisher_exact"][k] += p[c] * g.square()
            for ys in draws:
                yi = ys[i : i + 1]
                logp = torch.log_softmax(f, -1)
                nll = -logp.gather(-1, yi.unsqueeze(-1)).squeeze(-1)
                if f.dim() > 2:
                    mask = torch.ones_like(nll, dtype=torch.bool)
                    if y is not None and isinstance(y, Tensor) and y.shape == f.shape[:-1]:
                        mask = y != -100
                        if label_shift:
                            mask = torch.cat([mask[:, 1:], torch.zeros_like(mask[:, :1])], 1)
                    elif label_shift:
                        mask[:, -1] = False
                    nll = nll * mask
                for k, g in grads(nll.sum()).items():
                    res["fisher_mc"][k] += g.square() / mc_samples
        total += nb
    for m in methods:
        for k in names:
            res[m][k] = res[m][k] / total
    return res
