"""Which path serves each trainable parameter: decided once, on the first batch.

Discovery runs a no-grad forward of (at most two samples of) the first batch under a
``TorchFunctionMode`` that records, whenever a trainable parameter enters a torch function, which
module's ``forward`` is innermost at that moment (its *users*). With the *owners* of a parameter
(the modules holding it, plus a module whose rule handles a submodule's parameter, e.g.
``nn.MultiheadAttention``'s ``out_proj.weight``), the plan is:

* used only by owners that have a rule for it (:func:`~.rules.rule_for`) -> that rule (a
  :class:`Group` per module); if several such owners use it (tied embedding / output layer), the
  *tied path* (:class:`Tied`): their per-sample gradients are summed chunk by chunk before squaring
  (exact);
* otherwise (no rule, or used outside its owner, e.g. an ``nn.Parameter`` in a custom ``forward``
  or ``F.linear(h, self.emb.weight)``) -> the exact ``torch.func`` fallback (:class:`Fallback`) on
  the lowest common ancestor of its users and owners (the root if it is not reachable from there).

Models whose parameter use depends on the data are not supported (the plan is not revisited).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from .batches import Batch, forward, truncate
from .rules import Rule, rule_for

__all__ = ["Group", "TiedUse", "Tied", "Fallback", "Plan", "make_plan", "build_plan", "discover"]


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


def discover(model: nn.Module, inputs, trainable_ids: set[int]) -> dict[int, dict[int, nn.Module]]:
    """id(parameter) -> {id(module): module} of the innermost modules running when the parameter
    entered a torch function during a no-grad forward on ``inputs``."""
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
            forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return rec.uses


# --------------------------------------------------------------------------------------------- plan
@dataclass
class Group:
    """Parameters of one module served by its rule: local name -> full name."""

    module: nn.Module
    path: str
    rule: Rule
    params: dict[str, str] = field(default_factory=dict)


class TiedUse(NamedTuple):
    """One rule module using a tied parameter, under the name ``local``."""

    module: nn.Module
    path: str
    rule: Rule
    local: str


@dataclass
class Tied:
    """A parameter used by several rule modules: per-sample gradients summed before squaring."""

    full: str
    uses: list[TiedUse]


@dataclass
class Fallback:
    """Parameters of one module served by the torch.func fallback: name relative to module -> full name."""

    module: nn.Module
    path: str
    params: dict[str, str] = field(default_factory=dict)


@dataclass
class Plan:
    """Every trainable parameter in exactly one group, tied entry or fallback."""

    groups: list[Group]
    tied: list[Tied]
    fallbacks: list[Fallback]

    def modules(self) -> list[nn.Module]:
        """The modules whose calls must be captured, each once, in plan order."""
        seen, out = set(), []
        for m in (
            [g.module for g in self.groups]
            + [u.module for t in self.tied for u in t.uses]
            + [f.module for f in self.fallbacks]
        ):
            if id(m) not in seen:
                seen.add(id(m))
                out.append(m)
        return out


def build_plan(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], uses) -> Plan:
    """The plan (module doc) from the users found by :func:`discover`."""
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

    groups: dict[int, Group] = {}
    tied: list[Tied] = []
    fallbacks: dict[int, Fallback] = {}
    for full, p in trainable:
        own = owners.get(id(p), [])
        rule_owners = [(m, local) for m, local in own if local in handled[id(m)][1]]
        users = uses.get(id(p), {})
        rule_ids = {id(m) for m, _ in rule_owners}
        if rule_owners and all(u in rule_ids for u in users):
            used = [(m, local) for m, local in rule_owners if not users or id(m) in users]
            if len(used) == 1:
                m, local = used[0]
                g = groups.setdefault(id(m), Group(m, paths[id(m)], handled[id(m)][0]))
                g.params[local] = full
            else:
                tied.append(Tied(full, [TiedUse(m, paths[id(m)], handled[id(m)][0], local) for m, local in used]))
            continue
        anchor = lca(list(users.values()) + [m for m, _ in own]) if own else model
        rel = next((k for k, q in anchor.named_parameters(remove_duplicate=False) if q is p), None)
        if rel is None:  # not reachable from the common ancestor: use the root
            anchor = model
            rel = next(k for k, q in model.named_parameters(remove_duplicate=False) if q is p)
        fb = fallbacks.setdefault(id(anchor), Fallback(anchor, paths.get(id(anchor), "")))
        fb.params[rel] = full
    return Plan(list(groups.values()), tied, list(fallbacks.values()))


def make_plan(model: nn.Module, trainable: list[tuple[str, nn.Parameter]], batch: Batch) -> Plan:
    """The plan of ``model``'s trainable parameters, discovered on (two samples of) ``batch``."""
    inputs = truncate(batch.inputs, batch.n, min(batch.n, 2))
    return build_plan(model, trainable, discover(model, inputs, {id(p) for _, p in trainable}))
