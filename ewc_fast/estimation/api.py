"""The public entry point :func:`estimate_importance`: argument checks, defaults, results.

Every data-driven method is a mean over the N samples used (``fisher_mc``: over N * K label draws;
``fisher_batched``: over the B batches) of per-sample statistics of the trainable parameters θ
(formulas and backward seeds in :mod:`.methods`):

* ``fisher``       F = mean_n (∇_θ ℓ(x_n, y_n))^2              (empirical Fisher; EWC: Kirkpatrick et al. 2017)
* ``fisher_mc``    same with y ~ p_θ(y|x_n), K = ``mc_samples`` draws per sample
* ``fisher_exact`` F = mean_n sum_y p_θ(y|x_n) (∇_θ log p_θ(y|x_n))^2
* ``mas``          Ω = mean_n |∇_θ ||f(x_n)||_2^2|                (Aljundi et al. 2018)
* ``sig``          Kutalev 2020 (arXiv 2005.07107) total signal, forward only (:mod:`.sig`)
* ``magnitude``    |θ|;  ``random``  U(0, 1);  neither reads the data
* ``fisher_batched`` APPROXIMATE: mean_b (mean_{n in b} ∇_θ ℓ_n)^2 (batch-size dependent baseline)

The data pass that computes them is :mod:`.engine`; ``docs/IMPORTANCE.md`` is the user guide.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from ..importance import Importance
from ..ops import backends as _backend
from ..ops._sharding import is_sharded, like_param
from . import distributed, sharded
from .engine import RunConfig, run
from .methods import STATIC_METHODS, check_methods

__all__ = ["estimate_importance"]


def _check_activations(model: nn.Module, sig_activation) -> dict[str, Callable]:
    if sig_activation is None:
        return {}
    if not isinstance(sig_activation, dict):
        raise TypeError("sig_activation must be a dict module name -> callable")
    names = {n for n, _ in model.named_modules()}
    for k, f in sig_activation.items():
        if k not in names:
            raise ValueError(
                f"sig_activation: {k!r} is not a module name of the model (e.g. {sorted(n for n in names if n)[:5]})"
            )
        if not callable(f):
            raise TypeError(f"sig_activation[{k!r}] is not callable")
    return dict(sig_activation)


def is_causal_lm(model: nn.Module) -> bool:
    """Whether ``model`` looks like a Hugging Face causal language model (its loss shifts the labels)."""
    name = type(model).__name__
    return (
        name.endswith("ForCausalLM")
        or name.endswith("LMHeadModel")
        or getattr(model, "loss_type", None) == "ForCausalLM"
        or getattr(getattr(model, "config", None), "loss_type", None) == "ForCausalLM"
    )


def estimate_importance(
    model: nn.Module,
    data,
    methods=("fisher",),
    *,
    loss_fn: Callable | None = None,
    n_samples: int | None = None,
    mc_samples: int = 1,
    mas_output: str = "logits",
    backend: str = "auto",
    progress: bool = True,
    process_group=None,
    generator: torch.Generator | None = None,
    sig_activation: dict[str, Callable] | None = None,
    output: str | Callable | None = None,
    label_shift: bool | None = None,
    token_reduction: str = "sum",
) -> dict[str, Importance]:
    """Estimate weight importances of ``model``'s trainable parameters on ``data``.

    Args:
        model: the network; run in eval mode during estimation (BatchNorm running statistics, no
            dropout). Its train/eval flags, ``requires_grad`` flags and ``.grad`` are restored and
            all hooks removed on return, also when an exception is raised.
        data: iterable of batches (e.g. a DataLoader): ``(inputs, targets)`` or ``inputs`` alone;
            ``inputs`` is passed as ``model(inputs)`` (a tuple/list as ``model(*inputs)``, a dict as
            ``model(**inputs)``); the first dimension of every batched tensor is the sample.
        methods: any subset of ``"fisher"``, ``"fisher_mc"``, ``"fisher_exact"``, ``"mas"``,
            ``"sig"``, ``"magnitude"``, ``"random"``, ``"fisher_batched"`` (formulas in
            :mod:`ewc_fast.estimation.methods`).
        loss_fn: ``loss_fn(outputs, targets) -> (N,)`` per-sample losses for ``fisher`` /
            ``fisher_batched``; default: cross-entropy for (N, C) outputs, summed token NLL for
            (N, T, C) outputs with (N, T) targets (-100 ignored).
        n_samples: use at most this many samples (the last batch is truncated).
        mc_samples: label draws per sample for ``fisher_mc`` (averaged).
        mas_output: ``"logits"`` (Aljundi) or ``"softmax"`` (Kutalev's code) for ``mas``.
        backend: backend of :func:`ewc_fast.ops.persample_sq_` (``"auto"``, ``"triton"``, ``"cpp"``,
            ``"torch"``).
        progress: show a tqdm bar over batches.
        process_group: reduce over this ``torch.distributed`` group (default: the world group if
            ``torch.distributed`` is initialised); ranks on disjoint shards get the result of one
            process on the union.
        generator: ``torch.Generator`` for ``fisher_mc`` label draws and ``random``.
        sig_activation: module name -> callable applied to that module's output before SIG's
            |post-activation| bias statistic (default: the module output itself).
        output: which tensor of the model's outputs the methods (and the default loss) use: None ->
            the output itself if it is a tensor, else its ``"logits"`` entry (Hugging Face
            ``ModelOutput`` / dict); a key; or a callable ``outputs -> tensor``.
        label_shift: the default loss scores position t against target t + 1, as causal language
            models' own losses do. None: True for Hugging Face causal language models (class name
            ending in ``ForCausalLM`` / ``LMHeadModel``, or ``loss_type == "ForCausalLM"``), else False.
        token_reduction: ``"sum"`` (default: the sequence's log-likelihood) or ``"mean"`` (over the
            sample's non-ignored tokens) of the default loss's token NLLs for (N, T, C) outputs.

    Returns:
        ``{method: Importance}`` in the order of ``methods``; each maps every trainable parameter name
        (as in ``model.named_parameters()``) to a float32 tensor shaped like the parameter. Data-driven
        methods are per-sample means (sum over samples / N). Frozen parameters are left out.

    Notes:
        * ``fisher_batched`` is an APPROXIMATE, batch-size dependent baseline (square of the
          batch-mean gradient, averaged over batches, as Avalanche does); ``meta`` says so.
        * Parameters shared by several modules (tied embedding / output layer) and parameters used
          outside their module are exact: their per-sample gradients are summed over all uses
          before squaring (materialised chunk by chunk). Parameters reached only through the
          ``torch.func`` fallback (e.g. an ``nn.Parameter`` used in the root ``forward``) re-run the
          smallest enclosing module per sample, which can be slow when that module is the whole model.
        * Per-layer rules need batch-first activations (the ``nn.MultiheadAttention`` rule also
          takes ``batch_first=False``); a rule module whose input's leading size is not the batch
          size raises.
        * SIG falls back to |w| for parameters without a SIG rule (``nn.MultiheadAttention``,
          fallback modules) or whose module never ran (on any rank: the choice is made
          collectively, so every rank returns what a single process on all shards would);
          ``meta["sig_magnitude_fallback"]`` lists them.
        * Which rule serves which parameter is decided on the first batch (models whose parameter
          use depends on the data are not supported).
    """
    group = distributed.resolve_group(process_group)

    def validate():
        nonlocal methods
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if isinstance(data, Tensor) or not hasattr(data, "__iter__"):
            raise TypeError(
                f"data must be an iterable of batches (e.g. a DataLoader or a list of (inputs, targets)), "
                f"got {type(data).__name__}"
            )
        methods = check_methods(methods)
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise ValueError(f"mc_samples must be an int >= 1, got {mc_samples!r}")
        if mas_output not in ("logits", "softmax"):
            raise ValueError(f"mas_output must be 'logits' or 'softmax', got {mas_output!r}")
        if n_samples is not None and (isinstance(n_samples, bool) or not isinstance(n_samples, int) or n_samples < 1):
            raise ValueError(f"n_samples must be None or an int >= 1, got {n_samples!r}")
        if output is not None and not (isinstance(output, str) or callable(output)):
            raise TypeError(
                f"output must be None, a key (str) or a callable outputs -> tensor, got {type(output).__name__}"
            )
        if label_shift is not None and not isinstance(label_shift, bool):
            raise TypeError(f"label_shift must be None or a bool, got {type(label_shift).__name__}")
        if token_reduction not in ("sum", "mean"):
            raise ValueError(f"token_reduction must be 'sum' or 'mean', got {token_reduction!r}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError("loss_fn must be callable (outputs, targets) -> per-sample losses (N,)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        activations = _check_activations(model, sig_activation)
        named = dict(model.named_parameters())
        trainable = [(k, p) for k, p in named.items() if p.requires_grad]
        if not trainable:
            raise ValueError("the model has no trainable parameters (none with requires_grad=True)")
        devices = {p.device for _, p in trainable}
        if len(devices) > 1:
            raise ValueError(
                f"the model's trainable parameters are on several devices {sorted(map(str, devices))}; "
                "estimate_importance needs them on one device"
            )
        device = next(iter(devices))
        shards = [k for k, p in trainable if is_sharded(p)]
        for m in methods:
            if shards and m in sharded.UNSUPPORTED:
                raise ValueError(
                    f"method {m!r} is not supported on sharded (FSDP2 DTensor) parameters such as {shards[0]!r}: "
                    f"{sharded.UNSUPPORTED[m]}; estimate it on an unsharded copy of the model"
                )
        resolved = _backend.resolve(backend, device)
        return methods, activations, trainable, device, resolved

    error = None
    try:
        methods, activations, trainable, device, resolved = validate()
    except Exception as e:  # every rank learns about it in the collective check below
        error = e
    config = {
        "methods": tuple(methods) if isinstance(methods, (list, tuple)) else methods,
        "mc_samples": mc_samples,
        "mas_output": mas_output,
        "loss_fn": loss_fn is not None,
        "output": output if isinstance(output, str) or output is None else "callable",
        "label_shift": label_shift,
        "token_reduction": token_reduction,
        "sig_activation": sorted(sig_activation) if isinstance(sig_activation, dict) else None,
        "parameters": [(k, tuple(p.shape)) for k, p in model.named_parameters() if p.requires_grad]
        if isinstance(model, nn.Module)
        else None,
    }
    distributed.check_config(config, error, group)

    results: dict[str, Importance] = {}
    base_meta = {"estimator": "ewc_fast.estimate_importance", "backend": resolved}
    if "random" in methods:  # drawn first, in parameter order (the float64 oracle does the same)
        rnd = {}
        for k, p in trainable:  # one full-size tensor at a time; a sharded parameter keeps its shard
            t = torch.rand(
                p.shape,
                generator=generator,
                dtype=torch.float32,
                device=generator.device if generator is not None else p.device,
            ).to(p.device)
            distributed.broadcast_first([t], group)
            rnd[k] = like_param("estimate_importance", f"random[{k!r}]", t, p)
    data_methods = tuple(m for m in methods if m not in STATIC_METHODS)
    stats = None
    if data_methods:
        cfg = RunConfig(
            data_methods,
            trainable,
            device,
            resolved,
            group,
            loss_fn=loss_fn,
            n_samples=n_samples,
            mc_samples=mc_samples,
            mas_output=mas_output,
            progress=progress,
            generator=generator,
            activations=activations,
            output=output,
            label_shift=is_causal_lm(model) if label_shift is None else label_shift,
            token_reduction=token_reduction,
        )
        stats = run(model, data, cfg)
    for m in methods:
        meta = dict(base_meta)
        if m == "magnitude":
            results[m] = Importance(
                {k: p.detach().abs().float() for k, p in trainable}, method=m, n_samples=0, meta=meta
            )
            continue
        if m == "random":
            results[m] = Importance(rnd, method=m, n_samples=0, meta=meta)
            continue
        meta["n_batches"] = stats.n_batches
        if m in ("fisher", "fisher_mc", "fisher_exact", "mas", "fisher_batched"):
            meta["fallback"] = dict(stats.fallback)
            if stats.sharded is not None:
                meta["fsdp"] = dict(stats.sharded)
        if m == "fisher":
            meta["loss"] = "loss_fn" if loss_fn is not None else "nll"
            if loss_fn is None:
                meta["label_shift"] = cfg.label_shift
                meta["token_reduction"] = token_reduction
        elif m == "fisher_mc":
            meta["mc_samples"] = mc_samples
        elif m == "mas":
            meta["mas_output"] = mas_output
        elif m == "sig":
            meta["sig_activation"] = sorted(activations)
            meta["sig_magnitude_fallback"] = stats.sig_magnitude_fallback
        elif m == "fisher_batched":
            meta.update(
                {
                    "approximate": True,
                    "batch_size_dependent": True,
                    "batch_size": stats.batch_size,
                    "note": "square of the batch-mean gradient averaged over batches (Avalanche-style); "
                    "biased, not the empirical Fisher",
                }
            )
        results[m] = Importance(stats.means[m], method=m, n_samples=stats.n_samples, meta=meta)
    return results
