"""Consuming the captured outputs' gradients of one backward while the backward runs.

Per seed (:mod:`.methods`) the engine differentiates the seed w.r.t. the *frontier* (:func:`walk`):
the captured module outputs below which no other captured output lies. Autograd then runs every node
between the seed and all captured outputs and nothing below them, so no weight-gradient GEMM runs.

Tensor hooks on the captured outputs receive each output gradient G as the backward produces it
(:class:`Stream`). As soon as every gradient a module's calls can receive (per the graph walk) has
arrived, its rule (:mod:`.rules`) or the ``torch.func`` fallback (:mod:`.fallback`) turns
(inputs, G) into sums of g^2 / |g|; G is dropped right after and, on the last seed (no
``retain_graph``), so are the module's captured inputs. Peak memory thus stays near a plain
forward+backward's instead of holding every layer's G until the backward ends. Modules serving tied
parameters keep their gradients until the backward ends: the tied sums (per-sample gradients of
every use summed before squaring, :mod:`.tied`) need all uses and are done in :meth:`Stream.finish`.

Tensors a rule captured *inside* a call (:attr:`~.rules.Call.inner`, e.g. the projections of
``nn.MultiheadAttention``) are hooked and counted like outputs; their gradients follow the output
leaves' in the call's per-leaf gradient list.

Gradients reach the rules *batch-first*: each captured output's gradient is laid out with the samples
along dim 0 from the output's provenance (:func:`~.provenance.batch_first`); the gradient of an
output shared by all samples is replaced by its per-sample gradients (:mod:`.shared`).
"""

from __future__ import annotations

from torch import Tensor
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.utils._pytree import tree_flatten

from .capture import Capture
from .fallback import FunctionalFallback
from .methods import Seed
from .plan import Plan
from .provenance import BDim, Unknown, batch_first
from .shared import SharedGrads
from .tied import accumulate_tied

__all__ = ["Stream", "walk", "call_grads"]


def call_grads(calls, received, per_leaf: bool) -> list:
    """Output gradients of each call from ``received`` ((call index, leaf index) -> gradient): a
    tensor per call (rules) or a list aligned with the call's output leaves, then its
    :attr:`~.rules.Call.inner` tensors (fallback, per-leaf rules)."""
    out = []
    for ci, c in enumerate(calls):
        if per_leaf:
            leaves = _leaves(c)
            gs = [received.get((ci, li)) for li in range(len(leaves))]
            out.append(gs if any(g is not None for g in gs) else None)
        else:
            out.append(received.get((ci, 0)) if isinstance(c.output, Tensor) else None)
    return out


def _leaves(call) -> list:
    """A call's output leaves, then its inner tensors (the leaf indices of its gradients)."""
    return tree_flatten(call.output)[0] + list(call.inner)


def _describe(target) -> str:
    return getattr(target, "describe", None) or type(target).__name__


def walk(root, edges: dict) -> tuple[set, list, list]:
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


class Stream:
    """Consumes the captured outputs' gradients of one backward as they arrive (tensor hooks).

    A module's statistics are computed as soon as every gradient its calls can receive (per the
    graph walk) has arrived, so its output gradients and, on the last seed, its captured inputs
    are freed during the backward instead of all being alive at its end. Modules serving tied
    parameters keep their gradients until the backward ends (the tied sums need all uses)."""

    def __init__(self, plan: Plan, capture: Capture, n: int, backend: str):
        self.plan, self.capture, self.n, self.backend = plan, capture, n, backend
        self.groups = {g.key: g for g in plan.groups}
        self.fallbacks = {f.key: f for f in plan.fallbacks}
        self.tied_modules = {u.key for t in plan.tied for u in t.uses}
        self.targets = {g.key: g.target for g in plan.groups}
        self.targets.update({u.key: u.target for t in plan.tied for u in t.uses})
        self.targets.update({f.key: f.module for f in plan.fallbacks})
        # (id(grad_fn), output_nr) of a captured output -> [(unit key, call index, leaf index)]
        self.where: dict[tuple, list] = {}
        self.edges: dict[tuple, GradientEdge] = {}
        self.ids: dict[tuple, int] = {}  # (unit key, call, leaf) -> id of the captured output tensor
        self.leaf_output = False
        self.handles = []
        self.seed: Seed | None = None
        self.shared = SharedGrads(capture.meetings, n)
        for mkey in plan.keys():
            for ci, c in enumerate(capture.calls[mkey]):
                for li, t in enumerate(_leaves(c)):
                    if not (isinstance(t, Tensor) and t.requires_grad):
                        continue
                    if t.grad_fn is None:
                        self.leaf_output = True
                        continue
                    self.ids[(mkey, ci, li)] = id(t)
                    key = (id(t.grad_fn), t.output_nr)
                    self.where.setdefault(key, []).append((mkey, ci, li))
                    if key not in self.edges:
                        self.edges[key] = get_gradient_edge(t)
                        self.handles.append(t.register_hook(self._hook(key)))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.shared.remove()

    def _hook(self, key):
        def hook(g):
            if self.seed is not None and not self.shared.busy:
                self._arrive(key, g)
            return None

        return hook

    # ------------------------------------------------------------------------------------ one seed
    def begin(self, seed: Seed, bufs: dict, last: bool) -> list[GradientEdge]:
        """Start a seed; returns the frontier (gradient edges of captured outputs) to differentiate to."""
        self.seed, self.bufs, self.last = seed, bufs, last
        self.shared.reset()
        self.shared.active = True
        self.received = {key: {} for key in set(self.groups) | set(self.fallbacks) | self.tied_modules}
        self.done: set[int] = set()
        referenced, frontier, keep = walk(seed.value.grad_fn, self.edges)
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
            self.received[mkey][(ci, li)] = self._batch_first(mkey, ci, li, g)
            if len(self.received[mkey]) >= self.expected[mkey] and mkey not in self.tied_modules:
                self._process(mkey)

    def _batch_first(self, mkey, ci: int, li: int, g: Tensor) -> Tensor:
        """The gradient of one captured output, batch-first (per sample for a shared output)."""
        c = self.capture.calls[mkey][ci]
        n_out = len(tree_flatten(c.output)[0])
        if li >= n_out:  # an inner tensor of the call
            bd = c.inner_dims[li - n_out]
        else:
            bd = c.out_dims[li] if c.out_dims is not None else BDim(0)
        what = _describe(self.targets[mkey])
        if isinstance(bd, Unknown):
            raise ValueError(f"{what}: cannot tell which dimension of its output holds the samples: {bd.reason}")
        if bd is None:
            ids = self.ids[(mkey, ci, li)]
            return self.shared.take(_ById(ids), g, what)
        return batch_first(g, bd, self.n)

    def _process(self, mkey) -> None:
        """Statistics of the group / fallback parameters of one module from the gradients received."""
        calls, got = self.capture.calls[mkey], self.received[mkey]
        g = self.groups.get(mkey)
        if g is not None:
            g.rule.accumulate(
                g.target,
                calls,
                call_grads(calls, got, g.rule.per_leaf),
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
                call_grads(calls, got, True),
                {rel: self.bufs[full] for rel, full in f.params.items()},
                self.seed.mode,
                self.n,
            )
        flush = getattr(self.bufs, "flush", None)  # sharded sums (FSDP2): reduce-scatter this module's now
        if flush is not None:
            flush([*(g.params.values() if g is not None else ()), *(f.params.values() if f is not None else ())])
        self.done.add(mkey)
        got.clear()
        if self.last and mkey not in self.tied_modules:
            self.capture.calls[mkey] = []  # release the captured inputs/outputs during the backward

    def finish(self) -> None:
        """After the backward: modules still waiting (a gradient that never came), then the tied sums."""
        self.shared.active = False
        for mkey in list(self.received):
            if mkey not in self.done and mkey not in self.tied_modules:
                self._process(mkey)
        for t in self.plan.tied:
            per_use = []
            for u in t.uses:
                cs = self.capture.calls[u.key]
                per_use.append((u, cs, call_grads(cs, self.received[u.key], u.rule.per_leaf)))
            accumulate_tied(per_use, self.bufs[t.full], self.seed.mode, self.n, self.backend)
            if hasattr(self.bufs, "flush"):
                self.bufs.flush([t.full])
        for mkey in self.tied_modules:
            if mkey not in self.done:  # its group / fallback parameters, with the gradients kept
                self._process(mkey)
        self.received = {}  # the seed is cleared by the caller (also when the backward raised)


class _ById:
    """Stands for a captured output tensor (replaced by a meta tensor) in :meth:`SharedGrads.take`."""

    def __init__(self, key: int):
        self.key = key
