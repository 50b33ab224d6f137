"""The data pass of :func:`~ewc_fast.estimation.estimate_importance`: one forward per batch, one
backward per seed, per-layer rules; then the per-rank sums become means.

Per batch: (1) one forward with the planned modules' calls captured (:mod:`.capture`; the plan,
discovered within the first batch's forward, is :mod:`.plan`): activations are shared by all methods; SIG uses them
only and is computed right away (:mod:`.sig`); (2) for each seed (:mod:`.methods`) one backward that
stops at the captured module outputs, whose gradients are consumed as they arrive (:mod:`.stream`);
``fisher_batched`` also takes the batch-mean parameter gradient of its seed. At the end the sums are
all-reduced across ranks (:mod:`.distributed`) and divided by the count of each method
(:func:`.methods.divisor`).

The model runs in eval mode; its train/eval flags, ``requires_grad`` flags and ``.grad`` are restored
and every hook removed on return, also when an exception is raised.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import distributed, sharded, sig
from .batches import Batch, forward, read_batch, truncate
from .capture import Capture, SavedState
from .methods import GRADIENT_METHODS, Seed, check_outputs, divisor, seeds, select_output
from .plan import Plan, build_plan, make_plan
from .stream import Stream

__all__ = ["RunConfig", "PassResult", "run"]


@dataclass(frozen=True)
class RunConfig:
    """What one data pass computes and how; fixed for the whole pass."""

    #: data-driven methods (no ``magnitude`` / ``random``), in the caller's order
    methods: tuple[str, ...]
    #: (full name, parameter) of every trainable parameter, in ``named_parameters`` order
    trainable: list[tuple[str, nn.Parameter]]
    #: the parameters' device (batches must be on it)
    device: torch.device
    #: resolved backend of :func:`ewc_fast.ops.persample_sq_`
    backend: str
    #: ``torch.distributed`` group to reduce over, or None
    group: object = None
    loss_fn: Callable | None = None
    n_samples: int | None = None
    mc_samples: int = 1
    mas_output: str = "logits"
    progress: bool = False
    generator: torch.Generator | None = None
    #: SIG: module path -> activation applied to its output
    activations: dict[str, Callable] = field(default_factory=dict)
    #: which tensor of the model outputs the methods use (:func:`.methods.select_output`)
    output: object = None
    #: the default loss scores position t against target t + 1 (causal language models)
    label_shift: bool = False
    #: "sum" or "mean" of a sample's token losses (default loss)
    token_reduction: str = "sum"

    @property
    def needs_selected(self) -> bool:
        """Whether a method reads the selected output tensor (else only ``loss_fn`` sees the outputs)."""
        return any(m in self.methods for m in ("fisher_mc", "fisher_exact", "mas")) or self.loss_fn is None

    @property
    def names(self) -> list[str]:
        return [k for k, _ in self.trainable]

    @property
    def needs_backward(self) -> bool:
        """Whether any method needs gradients (else: SIG only, the pass runs without autograd)."""
        return any(m in GRADIENT_METHODS or m == "fisher_batched" for m in self.methods)

    @property
    def needs_targets(self) -> bool:
        return "fisher" in self.methods or "fisher_batched" in self.methods


@dataclass
class PassResult:
    """The means of one data pass, reduced over all ranks."""

    #: method -> parameter name -> float32 tensor shaped like the parameter
    means: dict[str, dict[str, Tensor]]
    n_samples: int
    n_batches: int
    #: this rank's first batch size (``fisher_batched`` depends on it), None if no batch was used
    batch_size: int | None
    #: SIG: parameters that got |w| (no rule, or their module never ran on any rank)
    sig_magnitude_fallback: list[str]
    #: parameters served by the torch.func fallback -> why
    fallback: dict = field(default_factory=dict)
    #: FSDP2 (sharded parameters): this rank's peak bytes of transient full-size sums and the bytes it
    #: reduce-scattered (:class:`.sharded.ShardedSums`); None without sharded parameters
    sharded: dict | None = None


class _DataPass:
    """State of one pass: the sums, and the plan and capture made on the first batch."""

    def __init__(self, model: nn.Module, cfg: RunConfig):
        self.model, self.cfg = model, cfg
        # FSDP2: name -> sharded DTensor parameter; their sums are reduce-scattered (:mod:`.sharded`)
        self.sharded = sharded.sharded_params(cfg.trainable)
        if self.sharded:
            self.sums = {m: sharded.ShardedSums(cfg.trainable, self.sharded) for m in cfg.methods}
        else:
            self.sums = {
                m: {k: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for k, p in cfg.trainable}
                for m in cfg.methods
            }
        self.identity = None
        self.sig_times_w: dict[str, bool] = {}
        self.plan: Plan | None = None
        self.capture: Capture | None = None

    def add(self, batch: Batch) -> None:
        """Add one batch's statistics to the sums."""
        ids = {id(p) for _, p in self.cfg.trainable}
        if self.plan is None and self.sharded:  # track FSDP2's unsharded twins (module doc of .sharded)
            sharded.check_managed("estimate_importance", self.model, self.sharded)
            sharded.warm_up(self.model, forward, truncate(batch.inputs, batch.n, min(batch.n, 2)))
            aliases = sharded.unsharded_aliases("estimate_importance", self.model, self.sharded)
            trainable = [(k, aliases.get(k, p)) for k, p in self.cfg.trainable]
            self.cfg = dataclasses.replace(self.cfg, trainable=trainable)
            self.identity = lambda: sharded.unsharded_identity(self.model, aliases)
            self._set_plan(make_plan(self.model, self.cfg.trainable, batch, self.identity), 5)
            self.capture = Capture(self.model, self.plan, {id(p) for _, p in self.cfg.trainable})
        with contextlib.ExitStack() as stack:
            stack.enter_context(torch.enable_grad() if self.cfg.needs_backward else torch.no_grad())
            if self.sharded:
                # the capture hands planned outputs on as view_as aliases (.capture); FSDP2 warns that an
                # in-place op on a unit's view output would skip its pre-backward hook. The pass runs none.
                stack.enter_context(warnings.catch_warnings())
                warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
            raw = self._first(batch, ids) if self.plan is None else None
            self._batch(batch, raw)

    def _first(self, batch: Batch, ids: set[int]):
        """The first batch's forward, which also discovers the plan (:meth:`.capture.Capture.first`): the
        model outputs with the planned calls captured, or None if the plan needs a fallback module whose
        calls were not captured (the batch is then re-run under the plan)."""
        first = Capture.first(self.model, ids)
        try:
            raw = first.record(self.model, batch.inputs, batch.n)
            self._set_plan(build_plan(self.model, self.cfg.trainable, first.uses), 6)
            self.capture = Capture(self.model, self.plan, ids)
            return raw if self.capture.take_over(first) else None
        finally:
            first.remove()

    def _set_plan(self, plan: Plan, stacklevel: int) -> None:
        """Adopt ``plan``; warn once if parameters use the fallback (``stacklevel``: the user's frame)."""
        self.plan = plan
        if plan.fallback_reasons:
            reasons = plan.fallback_reasons
            shown = "; ".join(f"{k}: {v}" for k, v in list(reasons.items())[:3])
            warnings.warn(
                f"estimate_importance: {len(reasons)} parameter(s) use the exact but slower torch.func "
                f"fallback (re-runs the enclosing module per sample): {shown}"
                + (" ..." if len(reasons) > 3 else "")
                + ". meta['fallback'] lists them all.",
                stacklevel=stacklevel,
            )

    def _batch(self, batch: Batch, raw=None) -> None:
        """One batch's statistics; ``raw``: the model outputs of the first batch's forward, already
        recorded with the planned calls (:meth:`_first`), else the forward runs here."""
        cfg, capture, n = self.cfg, self.capture, batch.n
        if raw is None:
            raw = capture.record(self.model, batch.inputs, n)
        outputs = select_output(raw, cfg.output, batch.idx) if cfg.needs_selected else None
        bd = capture.tracker.get(outputs) if outputs is not None else None
        check_outputs(raw, outputs, cfg.methods, n, batch.idx, bd, cfg.loss_fn is None)
        if "sig" in cfg.methods:  # activations only: before the backward frees the captured tensors
            with torch.no_grad():
                sig.add_factors(self.plan, capture.calls, self.sums["sig"], n, cfg.activations, self.sig_times_w)
        if cfg.needs_backward:
            stream = Stream(self.plan, capture, n, cfg.backend)
            try:
                if stream.leaf_output:
                    raise ValueError(
                        "a planned module returned a tensor that requires grad but has no grad_fn (a "
                        "leaf, e.g. a parameter returned as is); per-layer rules cannot observe its gradient"
                    )
                capture.outputs_to_meta()
                it = iter(
                    seeds(
                        cfg.methods,
                        raw,
                        outputs,
                        batch.targets,
                        cfg.loss_fn,
                        n=n,
                        batch_idx=batch.idx,
                        mc_samples=cfg.mc_samples,
                        mas_output=cfg.mas_output,
                        generator=cfg.generator,
                        label_shift=cfg.label_shift,
                        token_reduction=cfg.token_reduction,
                    )
                )
                del outputs, raw
                seed = next(it, None)
                while seed is not None:
                    nxt = next(it, None)
                    self._backward(seed, stream, n, last=nxt is None)
                    seed = nxt
            finally:
                stream.remove()
            if not self.sharded:  # sharded: checked once at the end, on every rank alike (_means)
                self._check_finite(batch.idx)
        capture.clear()

    def _check_finite(self, idx: int) -> None:
        """The model outputs and losses were finite, yet a NaN/Inf inside the model that a later op
        masked (nan_to_num, where) still reaches the per-sample gradients (autograd's too): refuse."""
        # one sum per buffer (a read of it, no temporaries): non-finite iff it holds a NaN/Inf, or the sum
        # overflowed, which the exact check then rules out (15x cheaper than isfinite(b).all() per buffer)
        items = [
            (m, k, b)
            for m in self.cfg.methods
            if m in GRADIENT_METHODS or m == "fisher_batched"
            for k, b in self.sums[m].items()
            if b.numel()
        ]
        if not items:
            return
        totals = torch.stack([b.sum(dtype=torch.float32) for _, _, b in items])
        if bool(torch.isfinite(totals).all()):
            return
        bad = [(m, k) for m, k, b in items if not bool(torch.isfinite(b).all())]
        if bad:
            names = sorted({k for _, k in bad})
            raise ValueError(
                f"non-finite (NaN/Inf) importance for {names[:5]}{' ...' if len(names) > 5 else ''} after batch "
                f"{idx}, although the model outputs and losses are finite: a NaN/Inf inside the model that a "
                "later op masks (e.g. nan_to_num or torch.where) still poisons the per-sample gradients (autograd's "
                "own gradients are non-finite too); remove the non-finite values where they arise"
            )

    def _backward(self, seed: Seed, stream: Stream, n: int, last: bool) -> None:
        """One seed's backward: statistics streamed per module, then fisher_batched from the weight grads."""
        if not seed.value.requires_grad:
            raise ValueError("the model output does not depend on any trainable parameter (no autograd graph)")
        params = [p for _, p in self.cfg.trainable]
        bufs = self.sums[seed.method] if seed.method is not None else {}
        frontier = stream.begin(seed, bufs, last) if seed.method is not None else []
        wrt = frontier + (params if seed.batched else [])
        try:
            if wrt:
                gs = torch.autograd.grad(seed.value, wrt, retain_graph=not last, allow_unused=True)
                with torch.no_grad():
                    if seed.batched:
                        for k, g in zip(self.cfg.names, gs[len(wrt) - len(params) :]):
                            if g is not None:
                                self.sums["fisher_batched"][k].add_((g.float() / n).square())
                del gs
            if seed.method is not None:
                with torch.no_grad():
                    stream.finish()
        finally:
            stream.seed = None

    def close(self) -> None:
        if self.capture is not None:
            self.capture.clear()
            self.capture.remove()


def run(model: nn.Module, data, cfg: RunConfig) -> PassResult:
    """The data pass over ``data`` (module doc), reduced over ``cfg.group``."""
    from tqdm.auto import tqdm

    state = SavedState(model)
    dp = _DataPass(model, cfg)
    n_total = n_batches = 0
    batch_size = None
    bar = None
    error = None
    try:
        model.eval()
        total = len(data) if hasattr(data, "__len__") else None
        bar = tqdm(total=total, disable=not cfg.progress, desc="importance", unit="batch", leave=False)
        for idx, raw in enumerate(data):
            bar.update(1)
            batch = read_batch(raw, idx, n_total, cfg.n_samples, cfg.device, cfg.needs_targets)
            if batch is None:
                continue
            dp.add(batch)
            n_total += batch.n
            n_batches += 1
            batch_size = batch_size or batch.n
            if cfg.n_samples is not None and n_total >= cfg.n_samples:
                break  # before the iterator loads another batch
    except Exception as e:
        if cfg.group is None:
            raise
        error = e  # still join the closing collective, with a failure flag, so no rank waits forever
    finally:
        dp.close()
        if bar is not None:
            bar.close()
        state.restore()
    res = _means(cfg, dp.sums, dp.sig_times_w, n_total, n_batches, batch_size, error)
    res.fallback = dict(dp.plan.fallback_reasons) if dp.plan is not None else {}
    if dp.sharded:
        sums = [s for s in dp.sums.values() if isinstance(s, sharded.ShardedSums)]
        res.sharded = {
            "transient_peak_bytes": max((s.peak for s in sums), default=0),
            "reduce_scatter_bytes": sum(s.rs_bytes for s in sums),
        }
    return res


def _means(cfg: RunConfig, sums, sig_times_w, n_total: int, n_batches: int, batch_size, error=None) -> PassResult:
    """All-reduce the sums and counts (one collective) and divide each method by its count. Each
    rank's failure flag travels with the counts: if any rank failed, every rank raises."""
    names, methods = cfg.names, cfg.methods
    # SIG's per-parameter flags travel with the counts (same collective): the rule must be the same
    # on every rank, so it is decided on the reduced flags, not on this rank's own
    fails = distributed.failure_slots(error is not None, cfg.group)
    shards = {m: sums[m] for m in methods if isinstance(sums[m], sharded.ShardedSums)}
    # sharded sums (FSDP2) are reduced already; their finiteness is checked here, on every rank alike
    nonfinite = []
    if shards:
        bad = any(not bool(torch.isfinite(t).all()) for s in shards.values() for t in s.local_tensors().values())
        nonfinite = [1.0 if bad else 0.0]
    counts = [float(n_total), float(n_batches)] + (sig.flags(names, sig_times_w) if "sig" in methods else [])
    counts += nonfinite + fails
    flat = [sums[m][k] for m in methods for k in names if m not in shards or k not in shards[m].sharded]
    reduced, counts = distributed.all_reduce_sums(flat, counts, cfg.group)
    if fails:
        distributed.raise_if_failed(counts[len(counts) - len(fails) :], error, cfg.group)
        counts = counts[: len(counts) - len(fails)]
    if nonfinite:
        if counts.pop() > 0:
            raise ValueError(
                "non-finite (NaN/Inf) importance on some rank, although the model outputs and losses are finite: "
                "a NaN/Inf inside the model that a later op masks (e.g. nan_to_num or torch.where) still poisons "
                "the per-sample gradients; remove the non-finite values where they arise"
            )
    n_total, n_batches = int(round(counts[0])), int(round(counts[1]))
    if n_total == 0:
        raise ValueError("data yielded no samples (empty iterable or empty batches)")
    sig_rule = sig.decide(names, counts[2:]) if "sig" in methods else {}
    it = iter(reduced)
    out = {}
    for m in methods:
        div = divisor(m, n_total, n_batches, cfg.mc_samples)
        res = {}
        for k, p in cfg.trainable:
            if m in shards and k in shards[m].sharded:  # the local shard, as a DTensor like the parameter
                res[k] = shards[m].result(k, div)
                continue
            t = next(it).div_(div) if cfg.group is None else (next(it) / div).float()
            if m == "sig":
                t = sig.finalize(t, p, sig_rule[k])
            res[k] = t.float()
        out[m] = res
    fallback = sorted(k for k, v in sig_rule.items() if v is None)
    return PassResult(out, n_total, n_batches, batch_size, fallback)
