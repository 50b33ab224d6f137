"""WVA under bad and unusual input: a correct attenuated step (against the float64 formula
``theta_old + (theta - theta_old)/(1 + lam*A)``), or a clear error with the state and the model
bit-identical (docs/GUARANTEES.md, "WVA")."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ewc_fast import WVA, Importance
from tests.helpers import assert_unchanged, frozen


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def _imp(model, fill=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Importance(
        {
            n: torch.full(p.shape, fill) if fill is not None else torch.rand(p.shape, generator=g) * 3
            for n, p in model.named_parameters()
        },
        method="fisher",
        n_samples=1,
    )


def _step(model, opt, dtype=torch.float32):
    x = torch.randn(6, 5, dtype=dtype)
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    opt.step()


# ------------------------------------------------------------------------- item 7: fp32 overflow
def test_consolidate_refuses_an_overflowing_accumulator_and_weights_never_turn_nan():
    model = _model()
    wva = WVA(model, lam=0.0, backend="torch").consolidate(_imp(model, 2e38))
    before = frozen(model, wva)
    with pytest.raises(ValueError, match=r"reaches 4.000e\+38, which overflows float32"):
        wva.consolidate(_imp(model, 2e38))
    assert_unchanged(before, model, wva)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wva.attach(opt)
    for lam in (0.0, 1.0, 1e10):  # lam*A from 0 to beyond fp32: the step is kept, shrunk or zero, never NaN
        wva.lam = lam
        _step(model, opt)
        assert all(bool(torch.isfinite(p).all()) for p in model.parameters()), lam


# -------------------------------------------------------------- item 8: dtype / device / shape
def test_dtype_change_after_consolidate_is_followed_in_float64():
    model = _model()
    lam = 2.0
    wva = WVA(model, lam, backend="torch").consolidate(_imp(model))
    model.double()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wva.attach(opt)
    x = torch.randn(6, 5, dtype=torch.float64)
    old = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    model(x).pow(2).sum().backward()
    sgd = [p.detach() - 0.1 * p.grad for p in model.parameters()]  # what SGD's step gives, in fp64
    opt.step()
    for (n, p), q, s in zip(model.named_parameters(), old, sgd):
        assert p.dtype == torch.float64
        want = q + (s - q) / (1.0 + lam * wva.accum[n].double())
        # fp64 arithmetic end to end: a few fp64 roundings; an fp32 snapshot of theta_old would be off by ~1e-8
        assert torch.allclose(p.detach(), want, rtol=1e-14, atol=1e-15), n


def test_shape_change_is_refused_before_the_optimizer_moves():
    model = _model()
    wva = WVA(model, 1.0, backend="torch").consolidate(_imp(model))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wva.attach(opt)
    with torch.no_grad():
        model[0].weight.data = torch.zeros(3, 5)  # same object, another shape
    model[0].weight.grad = torch.ones(3, 5)
    before = frozen(model, wva)
    with pytest.raises(RuntimeError, match=r"'0.weight' now has shape \(3, 5\), its WVA state \(4, 5\)"):
        opt.step()
    assert_unchanged(before, model, wva)


# ------------------------------------------------------------------------ item 10: load_state_dict
@pytest.mark.parametrize(
    "case, match",
    [
        ("tasks_zero", "n_tasks is 0 but the state has"),
        ("nan", r"A\[.*NaN/Inf"),
        ("negative", r"A\[.*negative"),
        ("f64", r"A\[.*dtype torch.float64"),
        ("lam", "lam must be finite"),
    ],
)
def test_load_state_dict_refuses_bad_fields_before_any_change(case, match):
    model = _model()
    state = WVA(model, 1.0, backend="torch").consolidate(_imp(model)).state_dict()
    first = state["names"][0]

    def edit(fn):
        accum = dict(state["accum"])
        accum[first] = fn(accum[first].clone())
        return dict(state, accum=accum)

    bad = {
        "tasks_zero": lambda: dict(state, n_tasks=0),
        "nan": lambda: edit(lambda t: t.fill_(float("nan"))),
        "negative": lambda: edit(lambda t: t.fill_(-1.0)),
        "f64": lambda: edit(lambda t: t.double()),
        "lam": lambda: dict(state, lam=float("inf")),
    }[case]()
    dst = WVA(model, 3.0, backend="torch").consolidate(_imp(model, seed=4))
    before = frozen(model, dst)
    with pytest.raises((ValueError, TypeError), match=match):
        dst.load_state_dict(bad)
    assert_unchanged(before, model, dst)
