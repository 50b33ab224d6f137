"""Recording the planned modules' calls during a forward, and restoring the model afterwards.

:class:`Capture` puts a forward hook on every module of the plan; while a batch is recorded each
call's (args, kwargs, output) is kept as a :class:`~.rules.Call`, with args and kwargs detached
(rules and the fallback recompute from them; the outputs stay attached so the backward can deliver
their gradients).

In-place modification: a forward that later modifies a captured tensor in place (e.g.
``ReLU(inplace=True)`` after a Linear) would hand rules the wrong inputs. Every captured tensor's
version counter is remembered, and if any changed by the end of the forward the batch is re-run in
*safe* mode: captured inputs are copied and module outputs cloned before the next module sees them
(and so are all later batches).

:class:`SavedState` holds what estimation changes on the model (train/eval flags, ``requires_grad``,
``.grad``) and puts it back.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_leaves, tree_map

from .batches import forward
from .rules import Call

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
    """Forward hooks recording (args, kwargs, output) of the planned modules while ``active``.

    ``calls[id(module)]`` lists the module's calls of the current batch, in call order."""

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

    def record(self, model: nn.Module, inputs):
        """The model outputs of a forward on ``inputs`` whose planned calls are now in :attr:`calls`
        (re-run in safe mode, once and for all, if the forward modified a captured tensor in place)."""
        self.clear()
        self.active = True
        try:
            outputs = forward(model, inputs)
            if not self.safe and self.modified_in_place():
                self.clear()
                self.safe = True
                outputs = forward(model, inputs)
        finally:
            self.active = False
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
