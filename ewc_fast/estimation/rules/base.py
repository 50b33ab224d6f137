"""The per-layer rule contract, the registry of rules, and the helpers every rule shares.

A rule serves one module type. The engine hands it the module's *calls* (one :class:`Call` per
forward invocation in the current batch: positional args, kwargs, output) and, for one backward
seed, the gradient of that seed w.r.t. each call's output (``None`` where the output was unused).
From them the rule adds, for each parameter θ it serves,

    buf_θ += sum_n g_n^2   (mode ``"sq"``: the Fisher methods)   or   sum_n |g_n|   (mode ``"abs"``: MAS)

where g_n is sample n's gradient of θ summed over the module's calls (a module called k times
concatenates its k (G, A) pairs along the token axis before squaring, so reuse is exact).
Per-sample gradients are never formed where a closed form exists; every rule also offers them
explicitly (:meth:`Rule.per_sample`, chunked over samples) for tied parameters, whose per-sample
gradients of several modules are summed before squaring. Chunks of samples keep temporaries under
:data:`CHUNK_BYTES` (read at call time, so tests can shrink it).

SIG (Kutalev 2020, arXiv 2005.07107, "total signal"; forward only) is :meth:`Rule.sig`: factor sums over the batch
that the engine divides by N and, where the rule says so, multiplies by |w|.

The registry :data:`RULES` maps a module class to a rule instance; a module uses the rule of the
first class in its MRO found there, provided it does not override that class's ``forward``
(:func:`rule_for`).

Sample dimensions: every :class:`Call` the engine records carries the provenance of its tensors
(:mod:`ewc_fast.estimation.provenance`): which dimension of each input and output holds the samples,
or that a tensor is shared by all samples. The output gradients handed to a rule are already
*batch-first* (``grads[i]`` has the N samples along dim 0); :func:`main_input` gives the main input
batch-first too (sequence-first and flattened ``(N * T, F)`` inputs are moved / unflattened, a shared
input is broadcast to every sample), and :func:`input_grad_slices` is the one place that slices both.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...ops import persample_sq_
from ..provenance import BDim, batch_first

#: bytes bounding one chunk's temporaries (unfolded inputs, per-sample gradients, scatter buffers)
CHUNK_BYTES = 64 * 2**20


@dataclass
class Call:
    """One forward invocation of a module (or of a torch function): its positional args, kwargs and
    output, and where their samples are.

    ``in_dims`` maps ``id(tensor)`` of the (detached) tensors in ``args``/``kwargs`` to their
    :class:`~ewc_fast.estimation.provenance.BDim` (absent: shared by all samples; an
    :class:`~ewc_fast.estimation.provenance.Unknown` says why it could not be followed);
    ``out_dims`` is aligned with ``tree_flatten(output)[0]``. ``None`` (a hand-made Call): every
    tensor whose leading size is the batch size holds the samples along dim 0.

    ``inner`` (rules with an :attr:`Rule.inner_capture`): tensors computed *inside* the call whose
    gradients the rule reads; a per-leaf rule's gradient list continues with theirs after the
    output leaves'. ``inner_dims`` holds their sample dimensions, ``watched`` what the rule's
    :class:`InnerCapture` recorded about the call (rule-private)."""

    args: tuple
    kwargs: dict
    output: Any
    in_dims: dict | None = None
    out_dims: list | None = None
    #: the torch function of a function-level call (None for a module call)
    func: Any = None
    #: what rules recompute from the inputs and reuse across the seeds of a batch (norms: x_hat)
    cache: dict = field(default_factory=dict, repr=False, compare=False)
    inner: tuple = ()
    inner_dims: list = field(default_factory=list)
    watched: Any = None

    def dim_of(self, t: Tensor, n: int):
        """The sample dimension of an input tensor of this call (None: shared)."""
        if self.in_dims is None:
            return BDim(0) if t.dim() > 0 and t.shape[0] == n else None
        return self.in_dims.get(id(t))


# ------------------------------------------------------------------------------------------ helpers
def reduce_into(buf: Tensor, per_sample: Tensor, mode: str) -> None:
    """buf += sum_n per_sample[n]**2 (mode "sq") or sum_n |per_sample[n]| (mode "abs"), in fp32."""
    p = per_sample.to(buf.dtype)
    buf.add_((p.square() if mode == "sq" else p.abs()).sum(0))


def persample_into(buf: Tensor, grad_out: Tensor, inputs: Tensor, mode: str, backend: str) -> None:
    """buf += sum_n (G_n^T A_n)^2 (mode "sq") or sum_n |G_n^T A_n| (mode "abs") through
    :func:`ewc_fast.ops.persample_sq_`, without forming the per-sample products."""
    persample_sq_(buf if mode == "sq" else None, buf if mode == "abs" else None, grad_out, inputs, backend=backend)


def chunk_rows(n: int, bytes_per_sample: int, budget: int | None = None) -> int:
    """Samples per chunk such that ``chunk * bytes_per_sample <= budget`` (default :data:`CHUNK_BYTES`; at least 1)."""
    budget = CHUNK_BYTES if budget is None else budget
    return max(1, min(n, budget // max(1, bytes_per_sample)))


def call_input(call: Call, name: str = "input") -> Tensor:
    """The module's main input: first positional arg, else ``kwargs[name]``."""
    if call.args:
        return call.args[0]
    if name in call.kwargs:
        return call.kwargs[name]
    raise ValueError(f"could not find the input tensor of a module call (args empty, no {name!r} kwarg)")


def module_name(module) -> str:
    """How messages name a rule's target (a module, or a function call site)."""
    return getattr(module, "describe", None) or type(module).__name__


def main_input(call: Call, n: int, module, name: str = "input", sample_dim0: bool = False) -> Tensor:
    """The call's main input with its samples along dim 0 (see the module doc). ``sample_dim0``:
    the layer defines dim 0 as its batch (convolutions, GroupNorm, BatchNorm): refuse anything else."""
    x = call_input(call, name)
    bd = call.dim_of(x, n)
    if sample_dim0 and isinstance(bd, BDim) and (bd.dim != 0 or bd.outer != 1 or bd.inner != 1) and n > 1:
        raise ValueError(
            f"{module_name(module)}: its input {tuple(x.shape)} holds the samples along dimension {bd.dim}"
            + (" (flattened with other positions)" if bd.dim == 0 else "")
            + "; this layer treats dim 0 as the batch, so it would mix the samples: per-sample "
            "importances are undefined (pass the samples along dim 0)"
        )
    return batch_first(x, bd, n, f"input of {module_name(module)}")


def live_calls(calls: list[Call], grads: list) -> tuple[list[Call], list]:
    """The calls that received an output gradient, and their gradients."""
    live = [(c, g) for c, g in zip(calls, grads) if g is not None]
    return [c for c, _ in live], [g for _, g in live]


def input_grad_slices(
    module: nn.Module, calls: list[Call], grads: list, lo: int, hi: int, n: int
) -> list[tuple[Tensor, Tensor]]:
    """(main input[lo:hi], output gradient[lo:hi]) of every call that received a gradient, both
    batch-first (:func:`main_input`): what every single-input rule reads for samples lo:hi."""
    out = []
    dim0 = getattr(module, "sample_dim0", False) or isinstance(
        module, (nn.modules.conv._ConvNd, nn.GroupNorm, nn.modules.batchnorm._BatchNorm)
    )
    for call, g in zip(*live_calls(calls, grads)):
        x = main_input(call, n, module, sample_dim0=dim0)
        out.append((x[lo:hi], g[lo:hi]))
    return out


def cat_tokens(tensors: list[Tensor]) -> Tensor:
    """Per-call (c, T_i, ...) tensors concatenated along the token axis 1 (the only one as is)."""
    return tensors[0] if len(tensors) == 1 else torch.cat(tensors, 1)


def apply_activation(activation: Callable | None, y: Tensor) -> Tensor:
    """SIG's post-activation: ``activation(y)``, or the module output itself without one."""
    return y if activation is None else activation(y)


# ------------------------------------------------------------------------------------ InnerCapture
class InnerCapture:
    """Watches *inside* the calls of a rule's modules during the capture forward (optional, see
    :attr:`Rule.inner_capture`): e.g. the projections inside ``F.multi_head_attention_forward``, so
    that a rule reads the gradients autograd computes there instead of recomputing them.

    One instance per rule class and capture serves all its modules (:meth:`add`). It is a context
    manager entered around each capture forward *outside* the provenance tracker (a torch-function
    mode below it sees the calls the tracker makes). Right after each call of a served module, the
    capture calls :meth:`take`, which returns ``(tensors, dims, data)``: the inner tensors whose
    gradients the rule wants (the capture hooks them like outputs), their sample dimensions
    (:class:`~ewc_fast.estimation.provenance.BDim`, or an ``Unknown`` saying why not), and what
    the rule reads later (:attr:`Call.watched`); ``((), [], None)`` when nothing was seen."""

    def add(self, module: nn.Module) -> None:
        raise NotImplementedError

    def take(self, module: nn.Module, n: int) -> tuple[tuple, list, Any]:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        return None


# --------------------------------------------------------------------------------------------- Rule
class Rule:
    """Base class of a per-layer rule (subclass and put an instance in :data:`RULES`).

    Required: :attr:`param_names` and :meth:`per_sample`. :meth:`accumulate` defaults to squaring
    :meth:`per_sample` chunk by chunk; :meth:`sig` defaults to "no rule" (the engine then uses |w|).
    """

    #: the direct parameters of the module this rule can handle
    param_names: tuple[str, ...] = ("weight", "bias")
    #: False: ``grads[i]`` is the gradient of call i's (tensor) output; True: a list aligned with
    #: ``torch.utils._pytree.tree_flatten(call.output)[0]`` (None where a leaf got no gradient)
    per_leaf: bool = False
    #: an :class:`InnerCapture` subclass whose instance watches inside this rule's module calls
    #: (None: the rule reads only the calls' inputs and output gradients)
    inner_capture: type | None = None
    #: parameters whose per-sample gradient is a product L_n^T R_n (:meth:`product_pairs`)
    product_names: tuple[str, ...] = ()
    #: parameters whose per-sample gradient is non-zero on a few rows only (:meth:`row_grads`)
    row_names: tuple[str, ...] = ()

    def handles(self, module: nn.Module) -> tuple[str, ...]:
        """Names of the parameters this rule handles, relative to ``module``: direct ones (``"weight"``)
        or a submodule's that ``module``'s own forward uses (``"out_proj.weight"``). Raise ValueError
        if the module's configuration makes per-sample statistics undefined; return fewer names to
        leave parameters to the ``torch.func`` fallback."""
        return tuple(n for n in self.param_names if getattr(module, n, None) is not None and n in module._parameters)

    def per_sample(
        self, module: nn.Module, calls: list[Call], grads: list, names, lo: int, hi: int, n: int
    ) -> dict[str, Tensor]:
        """Per-sample gradients ``(hi - lo, *param.shape)`` of the named parameters for samples
        ``lo:hi`` (summed over the module's calls)."""
        raise NotImplementedError

    def product_pairs(
        self, module: nn.Module, calls: list[Call], grads: list, name: str, lo: int, hi: int, n: int
    ) -> tuple[Tensor | None, Tensor | None]:
        """For a parameter in :attr:`product_names`, shaped (rows, cols): (L (c, t, rows), R (c, t, cols))
        for samples ``lo:hi`` (c = hi - lo), the calls concatenated along t, such that sample k's
        gradient is L_k^T R_k (``nn.Linear``'s weight: L = G, R = A); (None, None) when no call received
        a gradient. Lets the tied path (:mod:`ewc_fast.estimation.tied`) square a sum over uses without
        forming per-sample gradients."""
        raise NotImplementedError(f"{type(self).__name__} has no product form for {name!r}")

    def row_grads(
        self, module: nn.Module, calls: list[Call], grads: list, name: str, lo: int, hi: int, n: int
    ) -> tuple[Tensor | None, Tensor | None]:
        """For a parameter in :attr:`row_names`, shaped (rows, D): (ids (c, t) int64, vals (c, t, D)) for
        samples ``lo:hi``: sample k's gradient is sum_t vals[k, t] put at row ids[k, t] (duplicate ids
        summed; rows PyTorch gives no gradient, e.g. ``padding_idx``, have zero ``vals``); (None, None)
        when no call received a gradient."""
        raise NotImplementedError(f"{type(self).__name__} has no row form for {name!r}")

    def accumulate(
        self,
        module: nn.Module,
        calls: list[Call],
        grads: list,
        bufs: dict[str, Tensor],
        mode: str,
        n: int,
        backend: str,
    ) -> None:
        """bufs[name] += sum_n g_n**2 (``mode="sq"``) or sum_n |g_n| (``mode="abs"``)."""
        names = list(bufs)
        per = sum(bufs[k].numel() for k in names) * 4
        step = chunk_rows(n, per)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            ps = self.per_sample(module, calls, grads, names, lo, hi, n)
            for k in names:
                reduce_into(bufs[k], ps[k], mode)

    def sig(
        self, module: nn.Module, calls: list[Call], names, n: int, activation: Callable | None
    ) -> dict[str, tuple[Tensor, bool]] | None:
        """SIG factor sums over the batch: name -> (tensor shaped like the parameter, times_abs_w).

        The engine divides by the sample count and multiplies by |w| where ``times_abs_w``.
        ``None``: no SIG rule (the engine falls back to |w| and says so in ``meta``)."""
        return None


# ----------------------------------------------------------------------------------------- registry
#: module class -> rule instance (the built-in rules are registered by :mod:`ewc_fast.estimation.rules`)
RULES: dict[type, Rule] = {}


def register_rule(module_type: type, rule: Rule) -> None:
    """Use ``rule`` for modules of ``module_type`` (and subclasses that keep its ``forward``)."""
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"register_rule: module_type must be an nn.Module subclass, got {module_type!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule: rule must be an ewc_fast.estimation.rules.Rule, got {type(rule).__name__}")
    RULES[module_type] = rule


def rule_for(module: nn.Module) -> Rule | None:
    """The registered rule for ``module`` (first class of its MRO in :data:`RULES` whose ``forward``
    the module did not override), else None."""
    for cls in type(module).__mro__:
        rule = RULES.get(cls)
        if rule is not None:
            return rule if type(module).forward is cls.forward else None
    return None
