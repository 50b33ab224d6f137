"""Which path serves each trainable parameter: decided once, on the first batch.

Discovery runs within the first batch's own forward (:meth:`.capture.Capture.first`: that forward
also captures every call a plan without fallback can need, and the planned ones are kept) under the
provenance tracker (:class:`~.provenance.Tracker`), which records, whenever a trainable parameter is
an argument of a torch function, the function, the argument position and the innermost module running
(reading ``weight.dtype`` / ``.shape`` / ``.device`` is no use: only functions that take the
tensor count). With the *owners* of a parameter (the modules holding it, plus a module whose rule
handles a submodule's parameter, e.g. ``nn.MultiheadAttention``'s ``out_proj.weight``), each use is

* a *module use*: inside an owner that has a module rule for it (:func:`~.rules.rule_for`: the fast
  path, e.g. ``nn.Linear``), or
* a *function use*: a function with a function-level rule (:mod:`.rules.functional`: ``linear``,
  ``addmm``, ``embedding``, the norms, convolutions, a broadcast ``mul`` / ``add`` / ``expand``), keyed
  by (innermost module, function, the planned parameters of the call), whatever the module's class.

If every use of a parameter is one of these: one use -> that rule (:class:`Group`); several (a tied
embedding / output layer, a module and a function use) -> the *tied path* (:class:`Tied`): the
per-sample gradients of all uses are summed chunk by chunk before squaring (exact). Otherwise (a
function without a rule, e.g. an ``nn.Parameter`` used in ``torch.einsum``) -> the exact
``torch.func`` fallback (:class:`Fallback`) on the lowest common ancestor of its users and owners
(the root if it is not reachable from there); :attr:`Plan.fallback_reasons` says why.

If the plan needs the fallback, whose module calls that forward did not capture, the first batch is
re-run under the plan. FSDP2-sharded models discover on a separate no-grad forward of two samples
(:func:`make_plan`). Models whose parameter use depends on the data are not supported (the plan is
not revisited).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .batches import Batch, forward, truncate
from .provenance import Tracker
from .rules import Rule, rule_for
from .rules.functional import FuncTarget, function_role

__all__ = [
    "Group",
    "TiedUse",
    "Tied",
    "Fallback",
    "Plan",
    "make_plan",
    "build_plan",
    "discover",
    "use_of",
    "rule_owned",
    "ModuleStack",
]


# ---------------------------------------------------------------------------------------- discovery
class ModuleStack:
    """Forward pre/post hooks on every module keeping ``tracker.stack`` (innermost module last)."""

    def __init__(self, model: nn.Module, tracker: Tracker):
        self.tracker = tracker
        self.handles = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._push, prepend=True))
            self.handles.append(m.register_forward_hook(self._pop, always_call=True))

    def _push(self, mod, args):
        self.tracker.stack.append(mod)

    def _pop(self, mod, args, output):
        if self.tracker.stack and self.tracker.stack[-1] is mod:
            self.tracker.stack.pop()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def param_args(args, kwargs, ids: set[int]):
    """(position or keyword, parameter) of every trainable parameter passed directly to a function."""
    # runs for every torch call of a forward: the id test first (an nn.Parameter isinstance test is a
    # Python-level metaclass check, 10x slower)
    out = []
    for i, a in enumerate(args):
        if id(a) in ids:
            if isinstance(a, nn.Parameter):
                out.append((i, a))
        elif isinstance(a, (list, tuple)):
            out.extend((("list", i), x) for x in a if id(x) in ids and isinstance(x, nn.Parameter))
    if kwargs:
        for k, a in kwargs.items():
            if id(a) in ids and isinstance(a, nn.Parameter):
                out.append((k, a))
    return out


def role_name(func, name: str) -> str:
    """The function-rule name of a torch function (operators: ``__rmul__`` -> ``mul``, ``__rsub__`` -> ``rsub``)."""
    raw = getattr(func, "__name__", "") or ""
    if raw.startswith("__") and raw.endswith("__"):
        core = raw[2:-2]
        return {"radd": "add", "rmul": "mul", "rsub": "rsub", "add": "add", "mul": "mul", "sub": "sub"}.get(
            core, "matmul" if core == "matmul" else "op_" + core
        )
    return name


class Use(NamedTuple):
    """One function call taking trainable parameters, seen in discovery."""

    module: nn.Module
    fname: str
    params: list  # (position, parameter, (rule, role) or None)


def use_of(func, name, args, kwargs, out, stack: list, trainable_ids: set[int]) -> Use | None:
    """The :class:`Use` of a torch function call that takes trainable parameters (None: no use)."""
    found = param_args(args, kwargs, trainable_ids)
    if not found or not stack:
        return None
    if out is found[0][1] or not any(isinstance(o, torch.Tensor) for o in tree_leaves(out)):
        return None  # p.to(p.dtype) returns p itself; non-tensor results are no use
    fname = role_name(func, name)
    return Use(stack[-1], fname, [(pos, p, function_role(fname, pos, args, kwargs)) for pos, p in found])


def discover(model: nn.Module, inputs, trainable_ids: set[int], n: int) -> list[Use]:
    """Every torch function call taking a trainable parameter during a no-grad forward on ``inputs``,
    with the innermost module running."""
    tracker = Tracker(n)
    uses: list[Use] = []

    def on_call(func, name, args, kwargs, out):
        use = use_of(func, name, args, kwargs, out, tracker.stack, trainable_ids)
        if use is not None:
            uses.append(use)

    tracker.on_call = on_call
    stack = ModuleStack(model, tracker)
    try:
        with torch.no_grad(), tracker:
            forward(model, inputs)
    finally:
        stack.remove()
    return uses


# --------------------------------------------------------------------------------------------- plan
@dataclass
class Group:
    """Parameters served by one rule on one target: local name (module rules) or role (function
    rules) -> full name. ``key`` indexes the captured calls: ``id(module)`` for a module rule,
    (id(module), function, planned parameters) for a function rule."""

    key: Any
    target: Any  # the module, or a :class:`~.rules.functional.FuncTarget`
    path: str
    rule: Rule
    params: dict[str, str] = field(default_factory=dict)

    @property
    def module(self):
        return self.target


class TiedUse(NamedTuple):
    """One use (module or function call site) of a tied parameter, under the name ``local``."""

    key: Any
    target: Any
    path: str
    rule: Rule
    local: str

    @property
    def module(self):
        return self.target


@dataclass
class Tied:
    """A parameter with several uses: per-sample gradients summed before squaring."""

    full: str
    uses: list[TiedUse]


@dataclass
class Fallback:
    """Parameters of one module served by the torch.func fallback: name relative to module -> full name."""

    module: nn.Module
    path: str
    params: dict[str, str] = field(default_factory=dict)

    @property
    def key(self):
        return id(self.module)


@dataclass
class Plan:
    """Every trainable parameter in exactly one group, tied entry or fallback."""

    groups: list[Group]
    tied: list[Tied]
    fallbacks: list[Fallback]
    #: function-rule capture keys -> target (the tracker records their calls)
    functions: dict = field(default_factory=dict)
    #: full name -> why it uses the torch.func fallback
    fallback_reasons: dict = field(default_factory=dict)

    def modules(self) -> list[nn.Module]:
        """The modules whose calls must be captured (module rules and fallbacks), each once, in plan order."""
        seen, out = set(), []
        targets = [g.target for g in self.groups] + [u.target for t in self.tied for u in t.uses]
        for m in targets + [f.module for f in self.fallbacks]:
            if isinstance(m, nn.Module) and id(m) not in seen:
                seen.add(id(m))
                out.append(m)
        return out

    def keys(self) -> list:
        """Every capture key (modules and function call sites), each once."""
        seen, out = set(), []
        for k in (
            [g.key for g in self.groups] + [u.key for t in self.tied for u in t.uses] + [f.key for f in self.fallbacks]
        ):
            if k not in seen:
                seen.add(k)
                out.append(k)
        return out


def function_key(module: nn.Module, fname: str, roles) -> tuple:
    """Capture key of a function call site: (id(innermost module), function, planned (role, id(param)))."""
    return (id(module), fname, tuple(sorted((r, id(p)) for r, p in roles)))


def rule_owners(model: nn.Module, ids: set[int]) -> tuple[dict, dict]:
    """``owners``: id(parameter) -> [(module, local name)] of the modules holding it (plus a module whose
    rule handles a submodule's parameter); ``handled``: id(module) -> (its rule or None, the local
    names the rule handles). Raises ValueError where a rule refuses its module's configuration."""
    owners: dict[int, list] = {}
    mods = {id(m): m for m in model.modules()}
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
    return owners, handled


def rule_owned(model: nn.Module, ids: set[int]) -> dict[int, set[int]]:
    """id(module) -> ids of the trainable parameters its module rule handles (modules with none omitted):
    a call inside such a module taking only these is a module use (:func:`build_plan`)."""
    owners, handled = rule_owners(model, ids)
    out: dict[int, set[int]] = {}
    for pid, lst in owners.items():
        for m, local in lst:
            if local in handled[id(m)][1]:
                out.setdefault(id(m), set()).add(pid)
    return out


def build_plan(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], uses: list[Use]) -> Plan:
    """The plan (module doc) from the uses found by :func:`discover` (or the first batch's capture)."""
    paths, parent = {}, {}
    for path, m in model.named_modules(remove_duplicate=False):
        paths.setdefault(id(m), path)
        for _, c in m.named_children():
            parent.setdefault(id(c), m)
    ids = {id(p) for _, p in trainable}
    owners, handled = rule_owners(model, ids)

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

    # per parameter: its units (module uses / function call sites), or why it cannot have them
    units: dict[int, dict] = {}
    users: dict[int, dict] = {}
    bad: dict[int, str] = {}
    for use in uses:
        roles = [(fr[1], p) for pos, p, fr in use.params if fr is not None]
        for pos, p, fr in use.params:
            users.setdefault(id(p), {})[id(use.module)] = use.module
            rule_owner = next(
                ((m, local) for m, local in owners.get(id(p), []) if m is use.module and local in handled[id(m)][1]),
                None,
            )
            if rule_owner is not None:
                units.setdefault(id(p), {})[id(use.module)] = ("module", use.module, rule_owner[1])
            elif fr is not None:
                key = function_key(use.module, use.fname, roles)
                units.setdefault(id(p), {})[key] = ("func", use.module, use.fname, fr[1], pos, fr[0], roles)
            else:
                bad.setdefault(
                    id(p),
                    f"used by torch function {use.fname!r} (argument {pos}) in "
                    f"{paths.get(id(use.module), '?') or '<root>'} ({type(use.module).__name__}), "
                    "which has no module or function rule for it",
                )

    groups: dict = {}
    functions: dict = {}
    tied: list[Tied] = []
    fallbacks: dict[int, Fallback] = {}
    reasons: dict[str, str] = {}

    def unit_of(key, u, local_hint):
        if u[0] == "module":
            m, local = u[1], u[2]
            return key, m, paths[id(m)], handled[id(m)][0], local
        _, m, fname, role, pos, rule, roles = u
        tgt = functions.get(key)
        if tgt is None:
            tgt = functions[key] = FuncTarget(m, paths.get(id(m), ""), fname, {}, {})
        tgt.roles[role] = next(p for r, p in roles if r == role and id(p) == local_hint)
        tgt.positions[role] = pos
        return key, tgt, tgt.describe, rule, role

    for full, p in trainable:
        own = owners.get(id(p), [])
        mine = units.get(id(p), {})
        if id(p) not in bad and not mine:  # never used in discovery: its rule owners serve it (zero)
            mine = {id(m): ("module", m, local) for m, local in own if local in handled[id(m)][1]}
        if id(p) not in bad and mine:
            built = [unit_of(k, u, id(p)) for k, u in mine.items()]
            if len(built) == 1:
                key, tgt, path, rule, local = built[0]
                g = groups.setdefault(key, Group(key, tgt, path, rule))
                g.params[local] = full
            else:
                tied.append(Tied(full, [TiedUse(*b) for b in built]))
            continue
        reasons[full] = bad.get(id(p), "no rule serves it (its module has no rule and it enters no function with one)")
        us = list(users.get(id(p), {}).values())
        anchor = lca(us + [m for m, _ in own]) if own or us else model
        rel = next((k for k, q in anchor.named_parameters(remove_duplicate=False) if q is p), None)
        if rel is None:  # not reachable from the common ancestor: use the root
            anchor = model
            rel = next(k for k, q in model.named_parameters(remove_duplicate=False) if q is p)
        fb = fallbacks.setdefault(id(anchor), Fallback(anchor, paths.get(id(anchor), "")))
        fb.params[rel] = full
    return Plan(list(groups.values()), tied, list(fallbacks.values()), functions, reasons)


def make_plan(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], batch: Batch, identity=None) -> Plan:
    """The plan of ``model``'s trainable parameters, discovered on (two samples of) ``batch``.

    ``identity``: a context manager factory under which the plan is built after discovery (FSDP2:
    the modules hold the parameter objects of ``trainable``; :func:`.sharded.unsharded_identity`)."""
    k = min(batch.n, 2)
    inputs = truncate(batch.inputs, batch.n, k)
    uses = discover(model, inputs, {id(p) for _, p in trainable}, k)
    with identity() if identity is not None else contextlib.nullcontext():
        return build_plan(model, trainable, uses)
