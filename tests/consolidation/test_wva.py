"""WVA: SGD with attenuation equals theta_old - lr*g/(1 + lam*A)."""

import io

import pytest
import torch
from torch import nn

from ewc_fast import WVA, Importance, SynapticIntelligence


def _model(device="cpu"):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).to(device)


def _imp(model, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return Importance(
        {n: (torch.rand(p.shape, generator=g) * scale).to(p.device) for n, p in model.named_parameters()},
        method="mas",
        n_samples=1,
    )


def _step(model, opt, seed):
    g = torch.Generator().manual_seed(seed)
    opt.zero_grad(set_to_none=True)
    x = torch.randn(8, 5, generator=g).to(next(model.parameters()))
    model(x).pow(2).mean().backward()
    grads = [p.grad.double().clone() for p in model.parameters()]
    before = [p.detach().double().clone() for p in model.parameters()]
    opt.step()
    return grads, before


def test_sgd_matches_formula(backend, device):
    model = _model(device)
    lr, lam = 0.1, 2.0
    wva = WVA(model, lam, backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    wva.attach(opt)
    # no-op before the first consolidation
    grads, before = _step(model, opt, 0)
    for p, g, b in zip(model.parameters(), grads, before):
        torch.testing.assert_close(p.detach().double(), b - lr * g, rtol=0, atol=1e-7)
    imps = [_imp(model, 1), _imp(model, 2)]
    wva.consolidate(imps[0]).consolidate(imps[1])
    A = [(imps[0][n].double() + imps[1][n].double()) for n, _ in model.named_parameters()]
    for n, a in zip(wva.names, A):
        torch.testing.assert_close(wva.accum[n].double(), a, rtol=1e-7, atol=0)
    for step in range(4):
        grads, before = _step(model, opt, 10 + step)
        for p, g, b, a in zip(model.parameters(), grads, before, A):
            want = b - lr * g / (1 + lam * a)
            torch.testing.assert_close(p.detach().double(), want, rtol=0, atol=1e-7)
    assert wva.n_tasks == 2
    wva.detach()
    grads, before = _step(model, opt, 99)
    for p, g, b in zip(model.parameters(), grads, before):
        torch.testing.assert_close(p.detach().double(), b - lr * g, rtol=0, atol=1e-7)


def test_si_attached_after_wva_sees_attenuated_step(backend, device):
    model = _model(device)
    lr, lam = 0.1, 5.0
    wva = WVA(model, lam, backend=backend).consolidate(_imp(model, 3))
    si = SynapticIntelligence(model, variant="kutalev", backend=backend)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    wva.attach(opt)
    si.attach(opt)
    grads, before = _step(model, opt, 0)
    for w, p, g, b in zip(si.omega.values(), model.parameters(), grads, before):
        torch.testing.assert_close(w.double(), -g * (p.detach().double() - b), rtol=1e-6, atol=1e-12)
    si.detach()
    wva.detach()


def test_validation_leaves_accumulator_unchanged():
    model = _model()
    wva = WVA(model, 1.0, backend="torch").consolidate(_imp(model, 0))
    before = {n: t.clone() for n, t in wva.accum.items()}
    good = dict(_imp(model, 1))
    bad_cases = [
        ({k: v for k, v in good.items() if k != "0.bias"}, ValueError),
        (dict(good, **{"x.weight": torch.zeros(1)}), ValueError),
        (dict(good, **{"0.bias": -torch.ones(3)}), ValueError),
        (dict(good, **{"0.bias": torch.full((3,), float("nan"))}), ValueError),
        (dict(good, **{"0.bias": torch.zeros(2)}), ValueError),
        (dict(good, **{"0.bias": torch.zeros(3, dtype=torch.int64)}), TypeError),
    ]
    for bad, exc in bad_cases:
        with pytest.raises(exc):
            wva.consolidate(bad)
        assert all(torch.equal(before[n], t) for n, t in wva.accum.items())
    assert wva.n_tasks == 1
    with pytest.raises(ValueError):
        WVA(model, -1.0)
    with pytest.raises(ValueError):
        wva.lam = float("inf")


def test_frozen_parameter_and_state_dict():
    model = _model()
    model[2].bias.requires_grad_(False)
    wva = WVA(model, 1.5, backend="torch")
    wva.consolidate(_imp(model, 0))  # entry for the frozen bias ignored
    assert "2.bias" not in wva.names
    buf = io.BytesIO()
    torch.save(wva.state_dict(), buf)
    buf.seek(0)
    other = WVA(model, 0.0, backend="torch")
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert other.lam == 1.5 and other.names == wva.names and other.n_tasks == 1
    assert all(torch.equal(wva.accum[n], other.accum[n]) for n in wva.names)


def test_load_state_dict_validates_before_changing():
    """Bad state dicts raise ValueError/TypeError and leave lam, A, names and the task count as they were."""
    model = _model()
    src = WVA(model, 1.5, backend="torch").consolidate(_imp(model, 0)).consolidate(_imp(model, 1))
    good = src.state_dict()
    first = next(iter(good["accum"]))
    bad_cases = [
        ({k: v for k, v in good.items() if k != "n_tasks"}, ValueError),
        (dict(good, n_tasks=-1), ValueError),
        (dict(good, n_tasks="2"), ValueError),
        (dict(good, names=good["names"] + [good["names"][0]]), ValueError),
        (dict(good, accum={**good["accum"], "extra": torch.zeros(1)}), ValueError),
        (dict(good, accum={**good["accum"], first: -good["accum"][first]}), ValueError),
        (dict(good, accum={**good["accum"], first: good["accum"][first].double()}), TypeError),
    ]
    target = WVA(model, 0.5, backend="torch").consolidate(_imp(model, 2))
    before = (target.lam, target.n_tasks, target.names, {n: t.clone() for n, t in target.accum.items()})
    for bad, exc in bad_cases:
        with pytest.raises(exc):
            target.load_state_dict(bad)
        assert (target.lam, target.n_tasks, target.names) == before[:3]
        assert all(torch.equal(before[3][n], t) for n, t in target.accum.items())
    target.load_state_dict(good)
    assert target.lam == 1.5 and target.n_tasks == 2


def test_float64_model_not_rounded_through_float32(backend, device):
    """fp64 parameters are attenuated in fp64: a step that does not move them (lr = 0) leaves them bit
    for bit, and A = 0 leaves the optimizer's own step (fp32 arithmetic rounded every weight to fp32)."""
    model = _model(device).double()
    with torch.no_grad():
        model[0].weight[0, 0] = 0.1
    wva = WVA(model, 2.0, backend=backend)
    zero = Importance(
        {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in model.named_parameters()},
        method="mas",
        n_samples=1,
    )
    wva.consolidate(zero)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    wva.attach(opt)
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(4, 5, dtype=torch.float64, device=device)).sum().backward()
    opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert model[0].weight[0, 0].item() == 0.1
    wva.detach()
