"""Pluggable rules: a registered rule serves its module type, exactly."""

import pytest
import torch
from torch import nn

import ewc_fast
from ewc_fast.estimation import Rule, register_rule
from ewc_fast.estimation.rules import RULES
from ewc_fast.testing.importance import reference_importance
from tests.helpers import data_of, rel

pytestmark = pytest.mark.usefixtures("one_thread")


class Scale(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.rand(n) + 0.5)

    def forward(self, x):
        return x * self.weight


class ScaleRule(Rule):
    param_names = ("weight",)

    def per_sample(self, module, calls, grads, names, lo, hi, n):
        out = torch.zeros(hi - lo, *module.weight.shape)
        for c, g in zip(calls, grads):
            if g is not None:
                out += (g[lo:hi] * c.args[0][lo:hi]).reshape(hi - lo, -1, module.weight.shape[0]).sum(1)
        return {"weight": out}


def test_registered_rule_is_used_and_exact():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 4), Scale(4), nn.Tanh(), nn.Linear(4, 3))
    data = data_of()
    RULES[Scale] = ScaleRule()
    try:
        res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    finally:
        del RULES[Scale]
    ref = reference_importance(model, data, ("fisher", "mas"))
    for m in ("fisher", "mas"):
        for k in ref[m]:
            assert rel(res[m][k], ref[m][k]) <= 1e-5, (m, k)
    with pytest.raises(TypeError):
        register_rule(Scale, object())
