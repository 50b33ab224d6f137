"""Importance methods: names, validation, per-sample losses and the backward *seeds* of each method.

A seed is a scalar whose gradient w.r.t. a module output, restricted to sample n, is the gradient of
that sample's own objective (samples do not interact in eval mode), so per-sample parameter
gradients follow from the layer rules. Results are per-sample means (sums divided by N).

* ``fisher``         F = mean_n g_n^2, g_n = ∇ ℓ(x_n, y_n) (empirical Fisher; ℓ = per-sample loss,
                     default NLL / cross-entropy at the true label). Seed: sum_n ℓ_n.
* ``fisher_mc``      same with y_n ~ p_θ(y|x_n), ``mc_samples`` draws averaged (one seed per draw).
* ``fisher_exact``   F = mean_n sum_y p(y|x_n) (∇ log p(y|x_n))^2, outputs (N, C): one seed per class
                     y, sum_n sqrt(p_ny) (-log p_ny) with sqrt(p_ny) detached, so its per-sample
                     gradient squared is p_ny g_ny^2.
* ``mas``            Ω = mean_n |∇ ||f(x_n)||_2^2|, f = logits (``mas_output="logits"``, Aljundi 2018)
                     or softmax(logits) (``"softmax"``, Kutalev's code). Seed: sum_n ||f(x_n)||^2.
* ``sig``            Kutalev's total signal (layer formulas in :mod:`ewc_fast.estimation.rules`, the
                     |w| fallback in :mod:`ewc_fast.estimation.sig`); forward only.
* ``magnitude``      |θ|.  ``random``: U(0, 1) from ``generator``.
* ``fisher_batched`` APPROXIMATE (Avalanche-style): mean over batches of (batch-mean gradient)^2.
                     Biased and batch-size dependent; a baseline, not a Fisher estimate.

Model outputs: a tensor is used as is; a mapping or ``ModelOutput`` (Hugging Face) by its
``"logits"`` entry; ``output=`` (a key, or a callable ``outputs -> tensor``) picks another
(:func:`select_output`). ``fisher_mc``, ``fisher_exact``, ``mas`` and the default loss use the
selected tensor; a user ``loss_fn`` receives the outputs as the model returned them.

Default loss: outputs (N, C) with integer targets (N,) -> cross-entropy per sample; outputs
(N, T, C) (or (N, *, C)) with targets (N, T) (or (N, *)) -> the token NLLs of each sample, tokens
with target -100 ignored, summed (``token_reduction="sum"``: the sequence's log-likelihood) or
averaged over the sample's counted tokens (``"mean"``). With ``label_shift`` (causal language
models, as their own loss does) position t predicts the target at t + 1: logits[:, :-1] against
targets[:, 1:]. A user ``loss_fn(outputs, targets)`` must return shape (N,). ``fisher_mc`` and
``fisher_exact`` always use the categorical NLL of ``softmax(outputs)`` (``fisher_mc`` masks the
positions whose (shifted) target is -100 when the batch has token targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_leaves

METHODS = ("fisher", "fisher_mc", "fisher_exact", "mas", "sig", "magnitude", "random", "fisher_batched")
#: methods accumulated from per-sample gradients: method -> reduction ("sq": g^2, "abs": |g|)
GRADIENT_METHODS = {"fisher": "sq", "fisher_mc": "sq", "fisher_exact": "sq", "mas": "abs"}
#: methods that need no data
STATIC_METHODS = ("magnitude", "random")
IGNORE_INDEX = -100


def check_methods(methods) -> tuple[str, ...]:
    """Normalise ``methods`` (a name or an iterable of names) to a tuple of unique valid names."""
    if isinstance(methods, str):
        methods = (methods,)
    try:
        methods = tuple(methods)
    except TypeError:
        raise TypeError(f"methods must be a str or an iterable of str, got {type(methods).__name__}") from None
    if not methods:
        raise ValueError("methods is empty; valid methods: " + ", ".join(METHODS))
    out = []
    for m in methods:
        if not isinstance(m, str) or m not in METHODS:
            raise ValueError(f"unknown importance method {m!r}; valid methods: " + ", ".join(METHODS))
        if m not in out:
            out.append(m)
    return tuple(out)


def _is_class_targets(outputs: Tensor, targets) -> bool:
    return (
        isinstance(targets, Tensor)
        and not targets.is_floating_point()
        and not targets.is_complex()
        and targets.dtype != torch.bool
        and outputs.dim() == targets.dim() + 1
        and tuple(outputs.shape[:-1]) == tuple(targets.shape)
    )


def select_output(outputs, output, batch_idx: int) -> Tensor:
    """The tensor the methods use from a model's outputs (module doc)."""
    if callable(output):
        sel = output(outputs)
        what = "output(outputs)"
    elif isinstance(output, str):
        try:
            sel = outputs[output]
        except (KeyError, TypeError, IndexError):
            keys = list(outputs.keys()) if hasattr(outputs, "keys") else type(outputs).__name__
            raise ValueError(
                f"batch {batch_idx}: output={output!r} is not an entry of the model outputs ({keys})"
            ) from None
        what = f"outputs[{output!r}]"
    elif isinstance(outputs, Tensor):
        return outputs
    elif hasattr(outputs, "keys") and "logits" in outputs.keys():
        sel, what = outputs["logits"], "outputs['logits']"
    else:
        keys = f" with entries {list(outputs.keys())}" if hasattr(outputs, "keys") else ""
        raise ValueError(
            f"batch {batch_idx}: the model returned a {type(outputs).__name__}{keys}, not a tensor and without "
            "'logits'; pass output=<key> or output=callable(outputs) -> tensor to say which tensor the "
            "importance methods use"
        )
    if not isinstance(sel, Tensor):
        raise ValueError(f"batch {batch_idx}: {what} is a {type(sel).__name__}, not a tensor")
    return sel


def token_losses(outputs: Tensor, targets: Tensor, label_shift: bool, token_reduction: str) -> Tensor:
    """Per-sample NLL of (N, *, C) logits against integer (N, *) targets (-100 ignored), shifted
    by one position for causal language models, summed or averaged per sample."""
    n, c = outputs.shape[0], outputs.shape[-1]
    if label_shift:
        outputs, targets = outputs[:, :-1], targets[:, 1:]
    tok = F.cross_entropy(
        outputs.reshape(-1, c), targets.reshape(-1).long(), reduction="none", ignore_index=IGNORE_INDEX
    ).view(n, -1)
    total = tok.sum(1)
    if token_reduction == "mean":
        count = (targets.reshape(n, -1) != IGNORE_INDEX).sum(1).clamp(min=1)
        total = total / count.to(total.dtype)
    return total


def default_loss(outputs, targets, label_shift: bool = False, token_reduction: str = "sum") -> Tensor:
    """Per-sample NLL: cross-entropy for (N, C) / integer (N,); token NLLs for (N, *, C) / (N, *)
    (target -100 ignored; shifted and reduced as :func:`token_losses`)."""
    if not isinstance(outputs, Tensor) or not outputs.is_floating_point() or outputs.dim() < 2:
        raise ValueError(
            "the default loss needs floating (N, C) or (N, T, C) model outputs; got "
            + (f"shape {tuple(outputs.shape)}" if isinstance(outputs, Tensor) else type(outputs).__name__)
            + "; pass loss_fn(outputs, targets) returning one loss per sample"
        )
    if not _is_class_targets(outputs, targets):
        got = f"{tuple(targets.shape)} {targets.dtype}" if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(
            f"the default loss needs integer class targets shaped like the outputs without the class "
            f"dim (outputs {tuple(outputs.shape)}, targets {got}); pass loss_fn(outputs, targets) "
            "returning one loss per sample"
        )
    if outputs.dim() == 2:
        return F.cross_entropy(outputs, targets.long(), reduction="none", ignore_index=IGNORE_INDEX)
    return token_losses(outputs, targets, label_shift, token_reduction)


def per_sample_loss(
    outputs, logits, targets, loss_fn, n: int, batch_idx: int, label_shift=False, token_reduction="sum"
):
    """The validated per-sample loss (N,) of a batch (raises on wrong shape or non-finite values):
    ``loss_fn(outputs, targets)``, or the default loss on the selected ``logits``."""
    if loss_fn is None:
        loss = default_loss(logits, targets, label_shift, token_reduction)
        who = "the default loss"
    else:
        loss = loss_fn(outputs, targets)
        who = "loss_fn"
    if not isinstance(loss, Tensor) or tuple(loss.shape) != (n,):
        got = f"shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else type(loss).__name__
        raise ValueError(
            f"{who} must return one loss per sample, a tensor of shape ({n},), got {got} "
            f"(batch {batch_idx}); use reduction='none'"
        )
    if not loss.is_floating_point():
        raise ValueError(f"{who} returned a {loss.dtype} tensor (batch {batch_idx}); it must be floating")
    if not bool(torch.isfinite(loss).all()):
        bad = (~torch.isfinite(loss)).nonzero().flatten()[:5].tolist()
        raise ValueError(
            f"non-finite (NaN/Inf) per-sample loss in batch {batch_idx} (samples {bad}, indices within the batch)"
        )
    if not loss.requires_grad:
        raise ValueError(
            "the per-sample loss does not depend on any trainable parameter (no autograd graph); "
            "check that the loss is computed from the model outputs without detaching"
        )
    return loss


def check_outputs(raw, outputs, methods, n: int, batch_idx: int, bd=None, default_loss_used=False) -> None:
    """Output checks shared by every method: finite values; shapes needed by mc/exact/mas; the
    samples of the selected output (``bd``, its provenance) along dim 0."""
    for leaf in tree_leaves(raw) + ([outputs] if outputs is not None else []):
        if isinstance(leaf, Tensor) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            raise ValueError(f"non-finite (NaN/Inf) model outputs in batch {batch_idx}")
    needs_tensor = [m for m in ("fisher_mc", "fisher_exact", "mas") if m in methods]
    if default_loss_used and any(m in methods for m in ("fisher", "fisher_batched")):
        needs_tensor.append("the default loss")
    if not needs_tensor:
        return
    if not isinstance(outputs, Tensor) or not outputs.is_floating_point() or outputs.dim() < 1:
        got = f"shape {tuple(outputs.shape)}" if isinstance(outputs, Tensor) else type(outputs).__name__
        raise ValueError(f"{needs_tensor} need a floating model output tensor with the samples first, got {got}")
    if n > 1 and bd != (0, 1, 1):
        where = (
            f"its samples could not be followed ({bd.reason})"
            if hasattr(bd, "reason")
            else "it does not depend on the batch"
            if bd is None
            else f"it holds the samples along dimension {bd[0]}" + (" (flattened)" if bd[1:] != (1, 1) else "")
        )
        raise ValueError(
            f"{needs_tensor} need the selected model output {tuple(outputs.shape)} to hold the samples along "
            f"dim 0 (batch {batch_idx}), but {where}; select a batch-first output with output=..."
        )
    if "fisher_exact" in methods and outputs.dim() != 2:
        raise ValueError(
            f"fisher_exact needs classification outputs (N, C) (logits of a categorical model), "
            f"got shape {tuple(outputs.shape)}"
        )
    if "fisher_mc" in methods and (outputs.dim() < 2 or outputs.shape[-1] < 2):
        raise ValueError(
            f"fisher_mc needs classification outputs (N, C) or (N, T, C) with C >= 2 (logits of a "
            f"categorical model), got shape {tuple(outputs.shape)}"
        )


def divisor(method: str, n_samples: int, n_batches: int, mc_samples: int) -> int:
    """What a data-driven method's sum is divided by: N samples (N * ``mc_samples`` draws for
    ``fisher_mc``), or the number of batches B for ``fisher_batched``."""
    if method == "fisher_batched":
        return n_batches
    return n_samples * (mc_samples if method == "fisher_mc" else 1)


@dataclass
class Seed:
    """One backward pass: ``value`` is differentiated; statistics go to ``method`` (may be None) with
    reduction ``mode``; ``batched``: also take the batch-mean parameter gradient (fisher_batched)."""

    method: str | None
    mode: str
    value: Tensor
    batched: bool = False


def sample_labels(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """One label per row of ``logits`` (…, C) drawn from softmax(logits) with ``generator``."""
    c = logits.shape[-1]
    probs = torch.softmax(logits.detach().float(), -1).reshape(-1, c)
    if generator is not None:
        probs = probs.to(generator.device)
    y = torch.multinomial(probs, 1, generator=generator).view(logits.shape[:-1])
    return y.to(logits.device)


def seeds(
    methods,
    raw,
    outputs,
    targets,
    loss_fn,
    *,
    n: int,
    batch_idx: int,
    mc_samples: int,
    mas_output: str,
    generator,
    label_shift: bool = False,
    token_reduction: str = "sum",
):
    """Yield the :class:`Seed` s of one batch, one at a time (each is consumed before the next is built).
    ``raw``: the model's outputs as returned (for ``loss_fn``); ``outputs``: the selected tensor."""
    if "fisher" in methods or "fisher_batched" in methods:
        loss = per_sample_loss(raw, outputs, targets, loss_fn, n, batch_idx, label_shift, token_reduction)
        yield Seed("fisher" if "fisher" in methods else None, "sq", loss.sum(), "fisher_batched" in methods)
    if "fisher_mc" in methods:
        logp = torch.log_softmax(outputs, -1)
        mask = None
        if outputs.dim() > 2 and _is_class_targets(outputs, targets):
            valid = targets != IGNORE_INDEX
            if label_shift:  # position t is scored against target t + 1; the last position has none
                valid = torch.cat([valid[:, 1:], torch.zeros_like(valid[:, :1])], 1)
            mask = valid.to(logp.dtype)
        elif outputs.dim() > 2 and label_shift:
            mask = torch.ones(outputs.shape[:-1], dtype=logp.dtype, device=logp.device)
            mask[:, -1] = 0
        for _ in range(mc_samples):
            y = sample_labels(outputs, generator)
            nll = -logp.gather(-1, y.unsqueeze(-1)).squeeze(-1)
            if mask is not None:
                nll = nll * mask
            yield Seed("fisher_mc", "sq", nll.sum())
    if "fisher_exact" in methods:
        logp = torch.log_softmax(outputs, -1)
        root_p = logp.detach().exp().sqrt()
        for c in range(outputs.shape[1]):
            yield Seed("fisher_exact", "sq", -(root_p[:, c] * logp[:, c]).sum())
    if "mas" in methods:
        f = torch.softmax(outputs, -1) if mas_output == "softmax" else outputs
        yield Seed("mas", "abs", f.square().sum())
