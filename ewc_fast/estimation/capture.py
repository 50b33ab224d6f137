"""Recording the planned calls during a forward, and restoring the model afterwards.

:class:`Capture` records, while a batch's forward runs under the provenance tracker
(:class:`~.provenance.Tracker`), every call of the planned modules (a forward hook placed before any
user hook, so the rule sees the module's own output even when a user's forward hook changes it) and
of the planned function call sites (:mod:`.rules.functional`), as :class:`~.rules.Call` s with
args and kwargs detached (rules and the fallback recompute from them) and the provenance of every
tensor. Each planned module's output tensors are handed on as fresh aliases (``view_as``): the
captured tensor is then used only outside the module, so its gradient is the gradient from the
module's consumers alone, never including a path back into the module itself (a module that also
consumes a tensor it returns, e.g. hidden states it returns and feeds on: the fallback re-runs the
module, so that path would otherwise be counted twice). A planned output that does not depend on the
batch is *tainted*, so that the tracker broadcasts it where it meets per-sample data (:mod:`.shared`).

Inside a call: a rule with an :attr:`~.rules.Rule.inner_capture` (``nn.MultiheadAttention``) watches
inside its modules' calls through a torch-function mode entered outside the tracker; the tensors it
picks (:attr:`~.rules.Call.inner`) are hooked like outputs, so the backward hands the rule their
gradients. Not for a module that also has fallback parameters (the fallback re-runs the module).

In-place modification: a forward that later modifies a captured tensor in place (e.g.
``ReLU(inplace=True)`` after a Linear) would hand rules the wrong inputs. Every captured tensor's
version counter is remembered, and if any changed by the end of the forward the batch is re-run in
*safe* mode: captured inputs are copied and module outputs cloned before the next module sees them
(and so are all later batches).

:class:`SavedState` holds what estimation changes on the model (train/eval flags, ``requires_grad``,
``.grad``) and puts it back.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import Tensor, nn
from torch.utils._pytree import SUPPORTED_NODES, tree_flatten, tree_leaves, tree_map

from .batches import forward
from .plan import ModuleStack, Plan, Use, function_key, param_args, role_name, rule_owned, use_of
from .provenance import Tracker
from .rules import Call, rule_for
from .rules.functional import function_role
from .shared import Meeting, broadcast_operand

__all__ = ["Capture", "SavedState"]


class SavedState:
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


class Capture:
    """Records the planned calls of a forward (module doc); ``calls[key]`` lists the calls of a
    module (key ``id(module)``) or function call site (:func:`~.plan.function_key`), in call order."""

    def __init__(self, model: nn.Module, plan: Plan, trainable_ids: set[int], modules=None):
        self.model, self.plan, self.ids = model, plan, trainable_ids
        self.active = False
        self.safe = False
        self.calls: dict = {k: [] for k in plan.keys()}
        self.versions: list[tuple[Tensor, int]] = []
        self.meetings: list[Meeting] = []
        self.tracker: Tracker | None = None
        self.func_params = {id(p) for t in plan.functions.values() for p in t.roles.values()}
        #: first batch (:meth:`first`): the uses discovered, and id(module) -> ids of the parameters its rule handles
        self.uses: list[Use] | None = None
        self.owned: dict[int, set[int]] = {}
        modules = plan.modules() if modules is None else modules
        self.inner = _inner_captures(modules, {f.key for f in plan.fallbacks})
        self.handles = [m.register_forward_hook(self._hook(id(m)), with_kwargs=True, prepend=True) for m in modules]

    @classmethod
    def first(cls, model: nn.Module, trainable_ids: set[int]) -> Capture:
        """The first batch's capture, made before any plan: its forward discovers the uses of the
        trainable parameters (:func:`~.plan.build_plan` makes the plan from :attr:`uses`) and captures
        every call a plan without fallback can need (every module with a rule for a trainable parameter,
        every call of a function with a rule taking one outside its rule module); :meth:`take_over`
        then keeps the planned ones, so no separate discovery forward runs."""
        owned = rule_owned(model, trainable_ids)
        modules = [m for m in model.modules() if id(m) in owned]
        cap = cls(model, Plan([], [], []), trainable_ids, modules)
        cap.calls = {id(m): [] for m in modules}
        cap.uses, cap.owned = [], owned
        return cap

    def take_over(self, first: Capture) -> bool:
        """Adopt the calls, provenance and meetings that ``first`` (:meth:`first`) recorded in the first
        batch's forward, restricted to this capture's plan. False (nothing adopted) if the plan needs
        calls that forward did not capture (a torch.func fallback module): the batch must be re-run."""
        keys = self.plan.keys()
        if self.plan.fallbacks or any(k not in first.calls for k in keys):
            return False
        self.calls = {k: first.calls[k] for k in keys}
        planned = {id(t) for lst in self.calls.values() for c in lst for t in tree_leaves(c.output)}
        self.meetings = []
        for m in first.meetings:  # shared outputs of unplanned calls need no per-sample gradients
            m.origins = tuple(o for o in m.origins if id(o) in planned)
            if m.origins:
                self.meetings.append(m)
        self.tracker, self.safe = first.tracker, first.safe
        first.calls, first.meetings = {}, []
        return True

    # ------------------------------------------------------------------------------ recording
    def _record_call(self, key, args, kwargs, output, func=None, inner=((), [], None)):
        """Append one call (args detached, provenance of every tensor) and return what the forward
        continues with (aliases of the output tensors; clones in safe mode).

        Runs with torch functions disabled: the detaches, aliases and attribute reads here are the
        engine's own bookkeeping, which the tracker (and any mode below it) need not see; from a
        module's forward hook they would otherwise each go through the tracker's Python dispatch."""
        with torch._C.DisableTorchFunction():
            return self._record(key, args, kwargs, output, func, inner)

    def _record(self, key, args, kwargs, output, func, inner):
        tr = self.tracker
        leaves, in_spec = _flatten_args(args, kwargs)
        dims_in = [tr.get(t) for t in leaves]
        if self.safe:
            det = [t.detach().clone() if isinstance(t, Tensor) else t for t in leaves]
        else:
            det = [t.detach() if isinstance(t, Tensor) else t for t in leaves]
        in_dims = {id(d): bd for d, bd in zip(det, dims_in) if isinstance(d, Tensor) and bd is not None}
        args_d, kwargs_d = (tuple(det), {}) if in_spec is None else in_spec.unflatten(det)
        outs, spec = ([output], None) if isinstance(output, Tensor) else tree_flatten(output)
        out_dims = [tr.get(t) for t in outs]
        new, handed = [], []
        for t, bd in zip(outs, out_dims):
            if isinstance(t, Tensor) and t.requires_grad:
                t2 = t.view_as(t)
                t3 = t2.clone() if self.safe else t2  # safe mode: later in-place ops hit the clone
                tr.set(t2, bd)
                tr.set(t3, bd)
                new.append(t2)
                handed.append(t3)
            else:
                new.append(t)
                handed.append(t)
        captured = new[0] if spec is None else spec.unflatten(new)
        for t, bd in zip(new, out_dims):
            if isinstance(t, Tensor) and t.requires_grad and bd is None:
                tr.taint[t] = (t,)
        for t, h in zip(new, handed):
            if h is not t and t in tr.taint:
                tr.taint[h] = (t,)  # shared by all samples: per-sample gradients from its meetings
        if not self.safe:
            for t in det + new:
                if isinstance(t, Tensor):
                    self.versions.append((t, t._version))
        tensors, dims, watched = inner
        self.calls[key].append(
            Call(args_d, kwargs_d, captured, in_dims, out_dims, func, inner=tensors, inner_dims=dims, watched=watched)
        )
        return handed[0] if spec is None else spec.unflatten(handed)

    def _hook(self, key):
        def hook(module, args, kwargs, output):
            if not self.active:
                return None
            watch = self.inner.get(key)
            inner = watch.take(module, self.tracker.n) if watch is not None else ((), [], None)
            return self._record_call(key, args, kwargs, output, inner=inner)

        return hook

    def _on_call(self, func, name, args, kwargs, out):
        """Function-level capture: a call of a planned function call site (tracker callback)."""
        if self.uses is not None:
            return self._on_call_first(func, name, args, kwargs, out)
        if not self.func_params or not self.tracker.stack:
            return
        found = [(pos, p) for pos, p in param_args(args, kwargs, self.ids) if id(p) in self.func_params]
        if not found:
            return
        fname = role_name(func, name)
        roles = [(fr[1], p) for pos, p in found if (fr := function_role(fname, pos, args, kwargs)) is not None]
        key = function_key(self.tracker.stack[-1], fname, roles)
        if key not in self.plan.functions:
            return
        return self._record_call(key, args, kwargs, out, func)

    def _on_call_first(self, func, name, args, kwargs, out):
        """First batch: record the use, and capture the call if a function rule may serve it."""
        use = use_of(func, name, args, kwargs, out, self.tracker.stack, self.ids)
        if use is None:
            return None
        self.uses.append(use)
        roles = [(fr[1], p) for _, p, fr in use.params if fr is not None]
        owned = self.owned.get(id(use.module), ())
        if not roles or all(id(p) in owned for _, p, _ in use.params):
            return None  # no function rule, or a module use (the module's rule serves it)
        key = function_key(use.module, use.fname, roles)
        self.calls.setdefault(key, [])
        return self._record_call(key, args, kwargs, out, func)

    def _on_meet(self, s, origins, bd, out_shape, tracker):
        s_b = broadcast_operand(s, bd, out_shape)
        self.meetings.append(Meeting(s, s_b, origins, bd, ""))
        return s_b

    def record(self, model: nn.Module, inputs, n: int):
        """The model outputs of a forward on ``inputs`` whose planned calls are now in :attr:`calls`
        (re-run in safe mode, once and for all, if the forward modified a captured tensor in place)."""
        for _ in range(2):
            self.clear()
            if self.uses is not None:
                self.uses = []
            self.tracker = tr = Tracker(n)
            tr.mark_inputs(tree_leaves(inputs))
            tr.on_call = self._on_call
            tr.on_meet = self._on_meet
            stack = ModuleStack(model, tr)
            self.active = True
            try:
                with contextlib.ExitStack() as modes:
                    for watch in {id(w): w for w in self.inner.values()}.values():
                        modes.enter_context(watch)  # below the tracker: sees the calls the tracker makes
                    modes.enter_context(tr)
                    outputs = forward(model, inputs)
            finally:
                self.active = False
                stack.remove()
            if self.safe or not self.modified_in_place():
                break
            self.safe = True
        self.versions.clear()
        return outputs

    def outputs_to_meta(self) -> None:
        """Replace every captured output tensor by a storage-less ``meta`` tensor of its shape and dtype:
        after SIG, rules and the fallback need only the outputs' structure and shapes, and holding the
        real tensors would keep them alive through the whole backward."""

        def meta(t):
            return torch.empty_like(t, device="meta") if isinstance(t, Tensor) else t

        for lst in self.calls.values():
            for i, c in enumerate(lst):
                lst[i] = dataclasses.replace(c, output=tree_map(meta, c.output), inner=tree_map(meta, c.inner))

    def clear(self) -> None:
        for v in self.calls.values():
            v.clear()
        self.versions.clear()
        self.meetings = []

    def modified_in_place(self) -> bool:
        return any(t._version != v for t, v in self.versions)

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []
        self.tracker = None


def _flatten_args(args: tuple, kwargs: dict) -> tuple[list, object]:
    """``tree_flatten((args, kwargs))``, or ``(list(args), None)`` for the common call of positional
    arguments none of which is a container (no pytree walk)."""
    if not kwargs and not any(isinstance(a, (tuple, list, dict)) or _is_pytree_node(a) for a in args):
        return list(args), None
    return tree_flatten((args, kwargs))


def _is_pytree_node(x) -> bool:
    return not isinstance(x, Tensor) and type(x) in SUPPORTED_NODES


def _inner_captures(modules, fallback: set) -> dict:
    """id(module) -> the :class:`~.rules.InnerCapture` watching inside its calls (one per rule class),
    for the captured modules whose rule has one and that have no fallback parameters (the first
    batch's capture watches every such module; a plan with a fallback re-runs that batch)."""
    by_class: dict = {}
    out: dict = {}
    for m in modules:
        rule = rule_for(m)
        cls = getattr(rule, "inner_capture", None)
        if cls is None or id(m) in fallback or id(m) in out:
            continue
        watch = by_class.setdefault(cls, cls())
        watch.add(m)
        out[id(m)] = watch
    return out
