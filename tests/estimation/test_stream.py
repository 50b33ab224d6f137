"""The engine consumes each module's output gradient during the backward (tensor hooks), not after it.

Checks the order and timing of rule calls, that captured tensors are released on the last seed, and
that models where a gradient cannot be scheduled early (reuse, residual paths, unused outputs, tied
parameters) still match the float64 oracle.
"""

import pytest
import torch
from torch import nn

import ewc_fast
from ewc_fast.estimation import rules as rules_mod
from ewc_fast.testing.importance import reference_importance
from tests.helpers import assert_close, ragged

pytestmark = pytest.mark.usefixtures("one_thread")


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class Chain(nn.Module):
    def __init__(self, depth=5, d=6):
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(d, d) for _ in range(depth))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for lin in self.layers:
            x = torch.tanh(lin(x))
        return self.head(x)


def test_rules_run_during_the_backward_in_reverse_layer_order(monkeypatch):
    torch.manual_seed(0)
    model = Chain()
    seen = []
    orig = rules_mod.LinearRule.accumulate

    def spy(self, module, calls, grads, bufs, mode, n, backend):
        seen.append((module, mode, _in_backward()))
        return orig(self, module, calls, grads, bufs, mode, n, backend)

    monkeypatch.setattr(rules_mod.LinearRule, "accumulate", spy)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    ewc_fast.estimate_importance(model, [(x, y)], ["fisher", "mas"], backend="torch", progress=False)
    order = [model.head] + list(model.layers)[::-1]
    assert [m for m, mode, _ in seen if mode == "sq"] == order
    assert [m for m, mode, _ in seen if mode == "abs"] == order
    # every module but the first layer (the frontier: its gradient is what autograd.grad returns) is
    # processed while the backward is still running
    inside = {m: b for m, mode, b in seen if mode == "sq"}
    assert all(inside[m] for m in order[:-1])


def test_captured_inputs_are_released_on_the_last_seed(monkeypatch):
    """On the last seed a processed module's captured calls are dropped, so its inputs can be freed."""
    torch.manual_seed(0)
    model = Chain(depth=3)
    sizes = []
    orig = rules_mod.LinearRule.accumulate
    holder = {}

    def spy(self, module, calls, grads, bufs, mode, n, backend):
        cap = holder.get("capture")
        if cap is not None:
            sizes.append(sum(len(v) for v in cap.calls.values()))
        return orig(self, module, calls, grads, bufs, mode, n, backend)

    from ewc_fast.estimation import engine

    orig_cls = engine.Capture

    class Spy(orig_cls):
        def __init__(self, *args):
            super().__init__(*args)
            holder["capture"] = self

    monkeypatch.setattr(engine, "Capture", Spy)
    monkeypatch.setattr(rules_mod.LinearRule, "accumulate", spy)
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    ewc_fast.estimate_importance(model, [(x, y)], ["fisher"], backend="torch", progress=False)
    assert sizes == [4, 3, 2, 1]  # one fewer captured call after each processed module


class Awkward(nn.Module):
    """A module reused on a residual path, an unused branch, an output used twice and tied weights."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 5)
        self.b = nn.Linear(5, 5)
        self.unused = nn.Linear(5, 5)
        self.emb = nn.Embedding(6, 5)
        self.head = nn.Linear(5, 6, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        e = self.emb(x[:, :2].abs().long() % 6).mean(1)
        h = torch.tanh(self.a(x[:, 2:7] + e))
        h = h + self.a(h)  # reuse, residual
        self.unused(h)  # output never reaches the loss
        z = self.b(h)
        return self.head(torch.tanh(z) * z)  # b's output used twice


def test_awkward_graph_matches_the_oracle():
    torch.manual_seed(1)
    model = Awkward()
    x = torch.randn(8, 7)
    y = torch.randint(0, 6, (8,))
    data = ragged(x, y)
    methods = ["fisher", "fisher_mc", "mas", "fisher_batched"]
    ref = reference_importance(model, data, methods, generator=torch.Generator().manual_seed(3), mc_samples=2)
    for backend in ("torch", "cpp"):
        res = ewc_fast.estimate_importance(
            model,
            data,
            methods,
            backend=backend,
            progress=False,
            generator=torch.Generator().manual_seed(3),
            mc_samples=2,
        )
        for m in methods:
            assert_close(res[m], ref[m], what=f"{backend} {m}")


def test_capture_bookkeeping_bypasses_torch_function_modes():
    """The capture's own work per captured call (detached inputs, output aliases, attribute reads) runs
    with torch functions disabled: a mode entered around the estimate sees none of its detaches and
    aliases during the forward (so the provenance tracker, also a mode, spends no Python dispatch on
    them). It still sees the model's calls, and what the tracker itself calls (``dim``, ``shape``)."""
    from torch.overrides import TorchFunctionMode

    class Log(TorchFunctionMode):
        def __init__(self):
            super().__init__()
            self.names, self.on = [], False

        def __torch_function__(self, func, types, args=(), kwargs=None):
            if self.on:
                self.names.append(getattr(func, "__name__", ""))
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    model = Chain()
    x, y = torch.randn(4, 6), torch.randint(0, 3, (4,))
    with Log() as log:
        model.register_forward_pre_hook(lambda m, a: setattr(log, "on", True))
        model.register_forward_hook(lambda m, a, o: setattr(log, "on", False))
        res = ewc_fast.estimate_importance(model, [(x, y)], "fisher", backend="torch", progress=False)
    assert log.names.count("linear") == 6 and log.names.count("tanh") == 5
    assert not {"detach", "view_as"} & set(log.names), sorted(set(log.names))
    ref = reference_importance(model, [(x, y)], "fisher")
    assert_close(res["fisher"], ref["fisher"], what="logged")
