"""``estimate_importance``: one forward per batch, one backward per seed, per-layer rules.

Per batch: (1) one forward with forward hooks capturing every needed module's (args, kwargs,
output) — activations are shared by all methods; SIG uses them only and is computed right away;
(2) for each seed (:mod:`.methods`) one backward that stops at the captured module outputs
(``torch.autograd.grad`` w.r.t. the *frontier*: the captured outputs below which no other one lies),
so autograd skips every weight-gradient GEMM; (3) tensor hooks on the captured outputs receive
each output gradient G as the backward produces it, and as soon as all of a module's gradients
have arrived its rule (:mod:`.rules`) or the ``torch.func`` fallback (:mod:`.fallback`) turns
(inputs, G) into sums of g^2 / |g| (:class:`_Stream`). G is dropped right after, and on the last
seed (no ``retain_graph``) so are the module's captured inputs: peak memory stays near a plain
forward+backward's instead of holding every layer's G until the backward ends. Tied parameters
(per-sample gradients of several modules summed before squaring) are done after the backward. At
the end the sums are all-reduced across ranks (:mod:`.distributed`) and divided by the sample count.

Which path serves a trainable parameter is decided once, on the first batch, by watching which
module's ``forward`` is innermost whenever the parameter enters a torch function (a
``TorchFunctionMode``):

* used only by modules that own it and have a rule for it -> that rule; if several such modules
  use it (tied embedding / output layer), the *tied path*: their per-sample gradients are
  materialised chunk by chunk and summed before squaring (exact);
* otherwise (no rule, or used outside its owner, e.g. an ``nn.Parameter`` in a custom ``forward``
  or ``F.linear(h, self.emb.weight)``) -> the exact ``torch.func`` fallback on the lowest common
  ancestor of its users and owners.

A forward that modifies a captured tensor in place (e.g. ``ReLU(inplace=True)`` after a Linear)
is detected through tensor version counters; the batch is then re-run with captured inputs copied
and module outputs cloned before the next module sees them (and so are all later batches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_leaves, tree_map

from ..importance import Importance
from ..ops import backends as _backend
from . import distributed
from .fallback import FunctionalFallback
from .methods import GRADIENT_METHODS, STATIC_METHODS, check_methods, check_outputs, seeds
from .rules import Call, Rule, chunk_rows, reduce_into, rule_for

__all__ = ["estimate_importance"]


# ------------------------------------------------------------------------------------ model state
class _SavedState:
    """Train/eval flag of every submodule, requires_grad and .grad of every parameter."""

    def __init__(self, model: nn.Module):
        self.modules = [(m, m.training) for m in model.modules()]
        self.params = [(p, p.requires_grad, p.grad) for p in model.parameters()]

    def restore(self) -> None:
        for m, training in self.modules:
            m.training = training
        for p, rg, g in self.params:
            if p.requires_grad != rg:
                p.requires_grad_(rg)
            if p.grad is not g:
                p.grad = g


# ------------------------------------------------------------------------------------------ batches
def _split(batch, idx: int):
    """(inputs, targets or None) of one batch."""
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise ValueError(
            f"batch {idx} is a {type(batch).__name__} of length {len(batch)}; expected "
            "(inputs, targets) or inputs alone"
        )
    return batch, None


def _batch_size(inputs, idx: int) -> int:
    for t in tree_leaves(inputs):
        if isinstance(t, Tensor):
            if t.dim() == 0:
                raise ValueError(f"batch {idx}: inputs hold a 0-dim tensor; the first dimension must be the batch")
            return int(t.shape[0])
    raise ValueError(f"batch {idx}: inputs hold no tensor (got {type(inputs).__name__})")


def _truncate(obj, n: int, k: int):
    return tree_map(lambda t: t[:k] if isinstance(t, Tensor) and t.dim() > 0 and t.shape[0] == n else t, obj)


def _check_device(obj, device: torch.device, what: str, idx: int) -> None:
    for t in tree_leaves(obj):
        if isinstance(t, Tensor) and t.device != device:
            raise ValueError(
                f"batch {idx}: {what} on device {t.device} but the model's parameters are on {device}; "
                "move the batches to the model's device"
            )


def _forward(model: nn.Module, inputs):
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


# ---------------------------------------------------------------------------------------- discovery
class _UseRecorder(TorchFunctionMode):
    """Records, for every trainable parameter entering a torch function, the innermost module running."""

    def __init__(self, trainable_ids: set[int]):
        super().__init__()
        self.ids = trainable_ids
        self.stack: list[nn.Module] = []
        self.uses: dict[int, dict[int, nn.Module]] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.stack:
            top = self.stack[-1]
            for t in tree_leaves((args, kwargs)):
                if isinstance(t, nn.Parameter) and id(t) in self.ids:
                    self.uses.setdefault(id(t), {})[id(top)] = top
        return func(*args, **kwargs)


def _discover(model: nn.Module, inputs, trainable_ids: set[int]) -> dict[int, dict[int, nn.Module]]:
    rec = _UseRecorder(trainable_ids)
    handles = []
    try:

        def push(mod, args):
            rec.stack.append(mod)

        def pop(mod, args, output):
            rec.stack.pop()

        for m in model.modules():
            handles.append(m.register_forward_pre_hook(push))
            handles.append(m.register_forward_hook(pop))
        with torch.no_grad(), rec:
            _forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return rec.uses


# --------------------------------------------------------------------------------------------- plan
@dataclass
class _Group:
    """Parameters of one module served by its rule: local name -> full name."""

    module: nn.Module
    path: str
    rule: Rule
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class _Tied:
    """A parameter used by several rule modules: per-sample gradients summed before squaring."""

    full: str
    uses: list  # (module, path, rule, local name)


@dataclass
class _Fallback:
    """Parameters of one module served by the torch.func fallback: name relative to module -> full name."""

    module: nn.Module
    path: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class _Plan:
    groups: list[_Group]
    tied: list[_Tied]
    fallbacks: list[_Fallback]

    def modules(self) -> list[nn.Module]:
        seen, out = set(), []
        for m in (
            [g.module for g in self.groups]
            + [u[0] for t in self.tied for u in t.uses]
            + [f.module for f in self.fallbacks]
        ):
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
        return out


def _build_plan(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], uses) -> _Plan:
    paths, parent = {}, {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), path)
        for _, c in m.named_children():
            parent.setdefault(id(c), m)
    mods = {id(m): m for m in model.modules()}
    ids = {id(p) for _, p in trainable}
    owners: dict[int, list] = {}
    for m in mods.values():
        for local, p in m._parameters.items():
            if p is not None and id(p) in ids:
                owners.setdefault(id(p), []).append((m, local))
    handled: dict[int, tuple[Rule, set]] = {}
    for m in mods.values():
        rule = rule_for(m) if any(id(p) in ids for p in m.parameters()) else None
        handled[id(m)] = (rule, set(rule.handles(m)) if rule is not None else set())
        for local in handled[id(m)][1]:
            if "." in local:  # a submodule's parameter used by this module's forward (MHA's out_proj)
                p = m.get_parameter(local)
                if id(p) in ids:
                    owners.setdefault(id(p), []).append((m, local))

    def chain(m):
        out = [m]
        while id(out[-1]) in parent:
            out.append(parent[id(out[-1])])
        return out

    def lca(modules):
        modules = list(modules)
        others = [{id(a) for a in chain(m)} for m in modules[1:]]
        for a in chain(modules[0]):
            if all(id(a) in o for o in others):
                return a
        return model

    groups: dict[int, _Group] = {}
    tied: list[_Tied] = []
    fallbacks: dict[int, _Fallback] = {}
    for full, p in trainable:
        own = owners.get(id(p), [])
        rule_owners = [(m, local) for m, local in own if local in handled[id(m)][1]]
        users = uses.get(id(p), {})
        rule_ids = {id(m) for m, _ in rule_owners}
        if rule_owners and all(u in rule_ids for u in users):
            used = [(m, local) for m, local in rule_owners if not users or id(m) in users]
            if len(used) == 1:
                m, local = used[0]
                g = groups.setdefault(id(m), _Group(m, paths[id(m)], handled[id(m)][0]))
                g.params[local] = full
            else:
                tied.append(_Tied(full, [(m, paths[id(m)], handled[id(m)][0], local) for m, local in used]))
            continue
        anchor = lca(list(users.values()) + [m for m, _ in own]) if own else model
        rel = next((k for k, q in anchor.named_parameters(remove_duplicate=False) if q is p), None)
        if rel is None:  # not reachable from the common ancestor: use the root
            anchor = model
            rel = next(k for k, q in model.named_parameters(remove_duplicate=False) if q is p)
        fb = fallbacks.setdefault(id(anchor), _Fallback(anchor, paths.get(id(anchor), "")))
        fb.params[rel] = full
    return _Plan(list(groups.values()), tied, list(fallbacks.values()))


# ------------------------------------------------------------------------------------------ capture
class _Capture:
    """Forward hooks recording (args, kwargs, output) of the planned modules while ``active``."""

    def __init__(self, modules: list[nn.Module]):
        self.active = False
        self.safe = False
        self.calls: dict[int, list[Call]] = {id(m): [] for m in modules}
        self.versions: list[tuple[Tensor, int]] = []
        self.handles = [m.register_forward_hook(self._hook(id(m)), with_kwargs=True) for m in modules]

    def _hook(self, key):
        def hook(module, args, kwargs, output):
            if not self.active:
                return None
            if self.safe:
                args, kwargs = tree_map(lambda t: t.detach().clone() if isinstance(t, Tensor) else t, (args, kwargs))
                self.calls[key].append(Call(args, kwargs, output))
                return tree_map(lambda t: t.clone() if isinstance(t, Tensor) else t, output)
            args, kwargs = tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, (args, kwargs))
            for t in tree_leaves((args, kwargs, output)):
                if isinstance(t, Tensor):
                    self.versions.append((t, t._version))
            self.calls[key].append(Call(args, kwargs, output))
            return None

        return hook

    def outputs_to_meta(self) -> None:
        """Replace every captured output tensor by a storage-less ``meta`` tensor of its shape and dtype:
        after SIG, rules and the fallback need only the outputs' structure and shapes, and holding the
        real tensors would keep them alive through the whole backward."""

        def meta(t):
            return torch.empty_like(t, device="meta") if isinstance(t, Tensor) else t

        for lst in self.calls.values():
            for i, c in enumerate(lst):
                lst[i] = Call(c.args, c.kwargs, tree_map(meta, c.output))

    def clear(self) -> None:
        for v in self.calls.values():
            v.clear()
        self.versions.clear()

    def modified_in_place(self) -> bool:
        return any(t._version != v for t, v in self.versions)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


# ------------------------------------------------------------------------------------------ engine
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
    resolved = _backend.resolve(backend, device)
    group = distributed.resolve_group(process_group)

    results: dict[str, Importance] = {}
    base_meta = {"estimator": "ewc_fast.estimate_importance", "backend": resolved}
    if "random" in methods:  # drawn first, in parameter order (the float64 oracle does the same)
        rnd = {
            k: torch.rand(
                p.shape,
                generator=generator,
                dtype=torch.float32,
                device=generator.device if generator is not None else p.device,
            ).to(p.device)
            for k, p in trainable
        }
        distributed.broadcast_first(list(rnd.values()), group)
    data_methods = [m for m in methods if m not in STATIC_METHODS]
    stats = n_total = n_batches = batched_meta = sig_meta = None
    if data_methods:
        stats, n_total, n_batches, batched_meta, sig_meta = _run(
            model,
            data,
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
        )
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
        meta["n_batches"] = n_batches
        if m == "fisher":
            meta["loss"] = "loss_fn" if loss_fn is not None else "nll"
        elif m == "fisher_mc":
            meta["mc_samples"] = mc_samples
        elif m == "mas":
            meta["mas_output"] = mas_output
        elif m == "sig":
            meta.update(sig_meta)
        elif m == "fisher_batched":
            meta.update(batched_meta)
        results[m] = Importance(stats[m], method=m, n_samples=n_total, meta=meta)
    return results


def _run(
    model,
    data,
    methods,
    trainable,
    device,
    backend,
    group,
    *,
    loss_fn,
    n_samples,
    mc_samples,
    mas_output,
    progress,
    generator,
    activations,
):
    """The data pass. Returns (method -> name -> fp32 tensor, N, batches, fisher_batched meta, sig meta)."""
    from tqdm.auto import tqdm

    sums = {m: {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in trainable} for m in methods}
    times_w: dict[str, bool] = {}
    params = [p for _, p in trainable]
    needs_grad = any(m in GRADIENT_METHODS or m == "fisher_batched" for m in methods)  # else: SIG only
    state = _SavedState(model)
    capture = None
    plan = None
    n_total = n_batches = 0
    batch_size = None
    bar = None
    try:
        model.eval()
        total = len(data) if hasattr(data, "__len__") else None
        bar = tqdm(total=total, disable=not progress, desc="importance", unit="batch", leave=False)
        for idx, batch in enumerate(data):
            bar.update(1)
            inputs, targets = _split(batch, idx)
            n = _batch_size(inputs, idx)
            if n_samples is not None and n_total + n > n_samples:
                k = n_samples - n_total
                inputs, targets = _truncate(inputs, n, k), _truncate(targets, n, k)
                n = k
            if n == 0:
                continue
            _check_device(inputs, device, "inputs", idx)
            _check_device(targets, device, "targets", idx)
            if targets is None and ("fisher" in methods or "fisher_batched" in methods):
                raise ValueError(
                    f"batch {idx} has no targets, but 'fisher'/'fisher_batched' need (inputs, targets) "
                    "batches (use 'fisher_mc'/'fisher_exact'/'mas' for unlabelled data)"
                )
            if plan is None:
                ids = {id(p) for p in params}
                plan = _build_plan(model, trainable, _discover(model, _truncate(inputs, n, min(n, 2)), ids))
                capture = _Capture(plan.modules())
            with torch.enable_grad() if needs_grad else torch.no_grad():
                _batch(
                    model,
                    plan,
                    capture,
                    inputs,
                    targets,
                    n,
                    idx,
                    methods,
                    sums,
                    params,
                    trainable,
                    backend,
                    loss_fn=loss_fn,
                    mc_samples=mc_samples,
                    mas_output=mas_output,
                    generator=generator,
                    activations=activations,
                    times_w=times_w,
                )
            n_total += n
            n_batches += 1
            batch_size = batch_size or n
            if n_samples is not None and n_total >= n_samples:
                break  # before the iterator loads another batch
    finally:
        if capture is not None:
            capture.clear()
            capture.remove()
        if bar is not None:
            bar.close()
        state.restore()
    names = [k for k, _ in trainable]
    # SIG's per-parameter flags travel with the counts (same collective): the rule must be the same
    # on every rank, so it is decided on the reduced flags, not on this rank's own
    counts = [float(n_total), float(n_batches)] + (_sig_flags(names, times_w) if "sig" in methods else [])
    flat = [sums[m][k] for m in methods for k in names]
    reduced, counts = distributed.all_reduce_sums(flat, counts, group)
    n_total, n_batches = int(round(counts[0])), int(round(counts[1]))
    if n_total == 0:
        raise ValueError("data yielded no samples (empty iterable or empty batches)")
    sig_rule = _sig_decide(names, counts[2:]) if "sig" in methods else {}
    it = iter(reduced)
    out = {}
    for m in methods:
        div = n_batches if m == "fisher_batched" else n_total * (mc_samples if m == "fisher_mc" else 1)
        res = {}
        for k, p in trainable:
            t = next(it).div_(div) if group is None else (next(it) / div).float()
            if m == "sig" and sig_rule[k] is None:
                t = p.detach().abs()  # no SIG rule / module never ran on any rank: |w|
            elif m == "sig" and sig_rule[k]:
                t = t * p.detach().abs()
            res[k] = t.float()
        out[m] = res
    batched_meta = {
        "approximate": True,
        "batch_size_dependent": True,
        "batch_size": batch_size,
        "note": "square of the batch-mean gradient averaged over batches (Avalanche-style); "
        "biased, not the empirical Fisher",
    }
    sig_meta = {
        "sig_activation": sorted(activations),
        "sig_magnitude_fallback": sorted(k for k, v in sig_rule.items() if v is None),
    }
    return out, n_total, n_batches, batched_meta, sig_meta


def _sig_flags(names: list[str], times_w: dict[str, bool]) -> list[float]:
    """This rank's SIG flags, to be SUM-reduced over the ranks: per parameter, 1 if a factor arrived
    here, then per parameter, 1 if that factor is multiplied by |w|."""
    return [1.0 if k in times_w else 0.0 for k in names] + [1.0 if times_w.get(k) else 0.0 for k in names]


def _sig_decide(names: list[str], flags: list[float]) -> dict[str, bool | None]:
    """SIG's rule per parameter from the flags of :func:`_sig_flags` summed over all ranks: None -> |w|
    (no rank got a factor: no SIG rule, or its module never ran anywhere), else whether the factor
    sum is multiplied by |w|. Ranks that got no factor contribute zero sums and follow the others,
    so the result equals a single process on the union of the shards."""
    n = len(names)
    out = {}
    for i, k in enumerate(names):
        have, times_w = flags[i], flags[n + i]
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


def _call_grads(calls, received, per_leaf: bool):
    """Output gradients of each call from ``received`` ((call index, leaf index) -> gradient): a
    tensor per call (rules) or a list aligned with the call's output leaves (fallback, per-leaf rules)."""
    out = []
    for ci, c in enumerate(calls):
        if per_leaf:
            leaves = tree_flatten(c.output)[0]
            gs = [received.get((ci, li)) for li in range(len(leaves))]
            out.append(gs if any(g is not None for g in gs) else None)
        else:
            out.append(received.get((ci, 0)) if isinstance(c.output, Tensor) else None)
    return out


def _walk(root, edges: dict) -> tuple[set, list, list]:
    """Autograd graph below ``root`` (a grad_fn): the (node, output_nr) edges some node reaches
    (ids; the node objects are kept alive by the third returned list), the *frontier*: the captured edges
    (keys of ``edges``: (id(node), nr) -> tensor) reachable from ``root`` below which no other
    captured edge is reachable. Gradients w.r.t. the frontier make autograd run every node between
    the seed and all captured outputs, and nothing below them. Edges are keyed (id(node), output_nr)."""
    keep, referenced = [root], {(id(root), 0)}
    below: dict[int, bool] = {}
    stack = [(root, False)]
    while stack:  # iterative post-order DFS: below[node] = a captured edge is reachable under node
        node, done = stack.pop()
        if done:
            below[id(node)] = any(
                (id(c), nr) in edges or below.get(id(c), False) for c, nr in node.next_functions if c is not None
            )
            continue
        if id(node) in below:
            continue
        below[id(node)] = False  # visiting (a DAG: no cycles)
        stack.append((node, True))
        for c, nr in node.next_functions:
            if c is None:
                continue
            referenced.add((id(c), nr))
            if id(c) not in below:
                keep.append(c)
                stack.append((c, False))
    frontier = [t for key, t in edges.items() if key in referenced and not below.get(key[0], False)]
    return referenced, frontier, keep


class _Stream:
    """Consumes the captured outputs' gradients of one backward as they arrive (tensor hooks).

    A module's statistics are computed as soon as every gradient its calls can receive (per the
    graph walk) has arrived, so its output gradients and, on the last seed, its captured inputs
    are freed during the backward instead of all being alive at its end. Modules serving tied
    parameters keep their gradients until the backward ends (the tied sums need all uses)."""

    def __init__(self, plan: _Plan, capture: _Capture, n: int, backend: str):
        self.plan, self.capture, self.n, self.backend = plan, capture, n, backend
        self.groups = {id(g.module): g for g in plan.groups}
        self.fallbacks = {id(f.module): f for f in plan.fallbacks}
        self.tied_modules = {id(m) for t in plan.tied for m, *_ in t.uses}
        # (id(grad_fn), output_nr) of a captured output -> [(module key, call index, leaf index)]
        self.where: dict[tuple, list] = {}
        self.edges: dict[tuple, GradientEdge] = {}
        self.leaf_output = False
        self.handles = []
        self.seed = None
        for m in plan.modules():
            for ci, c in enumerate(capture.calls[id(m)]):
                for li, t in enumerate(tree_flatten(c.output)[0]):
                    if not (isinstance(t, Tensor) and t.requires_grad):
                        continue
                    if t.grad_fn is None:
                        self.leaf_output = True
                        continue
                    key = (id(t.grad_fn), t.output_nr)
                    self.where.setdefault(key, []).append((id(m), ci, li))
                    if key not in self.edges:
                        self.edges[key] = get_gradient_edge(t)
                        self.handles.append(t.register_hook(self._hook(key)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def _hook(self, key):
        def hook(g):
            if self.seed is not None:
                self._arrive(key, g)
            return None

        return hook

    # ------------------------------------------------------------------------------------ one seed
    def begin(self, seed, bufs: dict, last: bool) -> list[GradientEdge]:
        """Start a seed; returns the frontier (gradient edges of captured outputs) to differentiate to."""
        self.seed, self.bufs, self.last = seed, bufs, last
        self.received = {key: {} for key in set(self.groups) | set(self.fallbacks) | self.tied_modules}
        self.done: set[int] = set()
        referenced, frontier, keep = _walk(seed.value.grad_fn, self.edges)
        self.expected = {key: 0 for key in self.received}
        for key in self.edges:
            if key in referenced:
                for mkey, _, _ in self.where[key]:
                    self.expected[mkey] += 1
        for mkey, cnt in self.expected.items():  # nothing can arrive: done now (also frees on the last seed)
            if cnt == 0 and mkey not in self.tied_modules:
                self._process(mkey)
        del keep
        return frontier

    def _arrive(self, key: tuple, g: Tensor) -> None:
        for mkey, ci, li in self.where[key]:
            if mkey in self.done:
                raise RuntimeError(
                    "ewc_fast internal error: a module output gradient arrived after its module "
                    "was processed; please report this model"
                )
            self.received[mkey][(ci, li)] = g
            if len(self.received[mkey]) >= self.expected[mkey] and mkey not in self.tied_modules:
                self._process(mkey)

    def _process(self, mkey: int) -> None:
        """Statistics of the group / fallback parameters of one module from the gradients received."""
        calls, got = self.capture.calls[mkey], self.received[mkey]
        g = self.groups.get(mkey)
        if g is not None:
            g.rule.accumulate(
                g.module,
                calls,
                _call_grads(calls, got, g.rule.per_leaf),
                {local: self.bufs[full] for local, full in g.params.items()},
                self.seed.mode,
                self.n,
                self.backend,
            )
        f = self.fallbacks.get(mkey)
        if f is not None:
            FunctionalFallback().accumulate(
                f.module,
                calls,
                _call_grads(calls, got, True),
                {rel: self.bufs[full] for rel, full in f.params.items()},
                self.seed.mode,
                self.n,
            )
        self.done.add(mkey)
        got.clear()
        if self.last and mkey not in self.tied_modules:
            self.capture.calls[mkey] = []  # release the captured inputs/outputs during the backward

    def finish(self) -> None:
        """After the backward: modules still waiting (a gradient that never came), then the tied sums."""
        for mkey in list(self.received):
            if mkey not in self.done and mkey not in self.tied_modules:
                self._process(mkey)
        n = self.n
        for t in self.plan.tied:
            buf = self.bufs[t.full]
            step = chunk_rows(n, 4 * buf.numel())
            per_use = []
            for m, _, rule, local in t.uses:
                cs = self.capture.calls[id(m)]
                per_use.append((m, rule, local, cs, _call_grads(cs, self.received[id(m)], rule.per_leaf)))
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                ps = sum(rule.per_sample(m, cs, gs, [local], lo, hi, n)[local] for m, rule, local, cs, gs in per_use)
                reduce_into(buf, ps, self.seed.mode)
        for mkey in self.tied_modules:
            if mkey not in self.done:  # its group / fallback parameters, with the gradients kept
                self._process(mkey)
        self.received = {}  # the seed is cleared by the caller (also when the backward raised)


def _batch(
    model,
    plan: _Plan,
    capture: _Capture,
    inputs,
    targets,
    n,
    idx,
    methods,
    sums,
    params,
    trainable,
    backend,
    *,
    loss_fn,
    mc_samples,
    mas_output,
    generator,
    activations,
    times_w,
):
    capture.clear()
    capture.active = True
    try:
        outputs = _forward(model, inputs)
        if not capture.safe and capture.modified_in_place():
            capture.clear()
            capture.safe = True
            outputs = _forward(model, inputs)
    finally:
        capture.active = False
    capture.versions.clear()
    check_outputs(outputs, methods, n, idx)
    if "sig" in methods:  # activations only: before the backward frees the captured tensors
        with torch.no_grad():
            _sig(plan, capture.calls, sums["sig"], n, activations, times_w)
    grad_methods = [m for m in methods if m in GRADIENT_METHODS or m == "fisher_batched"]
    if grad_methods:
        stream = _Stream(plan, capture, n, backend)
        try:
            if stream.leaf_output:
                raise ValueError(
                    "a planned module returned a tensor that requires grad but has no grad_fn (a "
                    "leaf, e.g. a parameter returned as is); per-layer rules cannot observe its gradient"
                )
            capture.outputs_to_meta()
            it = iter(
                seeds(
                    methods,
                    outputs,
                    targets,
                    loss_fn,
                    n=n,
                    batch_idx=idx,
                    mc_samples=mc_samples,
                    mas_output=mas_output,
                    generator=generator,
                )
            )
            del outputs
            seed = next(it, None)
            while seed is not None:
                nxt = next(it, None)
                _backward(seed, stream, sums, params, trainable, n, last=nxt is None)
                seed = nxt
        finally:
            stream.remove()
    capture.clear()


def _backward(seed, stream: _Stream, sums, params, trainable, n, last: bool) -> None:
    """One seed's backward: statistics streamed per module, then fisher_batched from the weight grads."""
    if not seed.value.requires_grad:
        raise ValueError("the model output does not depend on any trainable parameter (no autograd graph)")
    bufs = sums[seed.method] if seed.method is not None else {}
    frontier = stream.begin(seed, bufs, last) if seed.method is not None else []
    wrt = frontier + (params if seed.batched else [])
    try:
        if wrt:
            gs = torch.autograd.grad(seed.value, wrt, retain_graph=not last, allow_unused=True)
            with torch.no_grad():
                if seed.batched:
                    for (k, _), g in zip(trainable, gs[len(wrt) - len(params) :]):
                        if g is not None:
                            sums["fisher_batched"][k].add_((g.float() / n).square())
            del gs
        if seed.method is not None:
            with torch.no_grad():
                stream.finish()
    finally:
        stream.seed = None


def _sig(plan: _Plan, calls, bufs, n, activations, times_w) -> None:
    """Add SIG factor sums; ``times_w[name]`` records that a factor arrived (and whether |w| multiplies it).
    Parameters that never get one (no SIG rule, or their module never ran) fall back to |w|."""
    uses = [(g.module, g.path, g.rule, local, full) for g in plan.groups for local, full in g.params.items()]
    uses += [(m, path, rule, local, t.full) for t in plan.tied for m, path, rule, local in t.uses]
    for m, path, rule, local, full in uses:
        cs = calls[id(m)]
        if not cs:
            continue
        res = rule.sig(m, cs, [local], n, activations.get(path))
        if res is None or local not in res:
            continue
        fac, tw = res[local]
        bufs[full].add_(fac)
        times_w[full] = tw
