"""SynapticIntelligence against a hand-written float64 loop of Zenke's formulas."""

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc_fast import EWC, Importance, SynapticIntelligence
from ewc_fast.consolidation.exclusion import ZENKE_REGISTRY


def _model(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).to(device)


def _batches(task, n_steps, device="cpu"):
    g = torch.Generator().manual_seed(100 + task)
    w = torch.randn(5, 2, generator=g)
    out = []
    for _ in range(n_steps):
        x = torch.randn(8, 5, generator=g)
        out.append((x.to(device), (torch.tanh(x @ w) + 0.5 * task).to(device)))
    return out


def _fisher_like(model, seed):
    g = torch.Generator().manual_seed(seed)
    return Importance(
        {n: (torch.rand(p.shape, generator=g) * 3).to(p.device) for n, p in model.named_parameters()},
        method="fisher",
        n_samples=1,
    )


def _optimizer(name, model):
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return torch.optim.Adam(model.parameters(), lr=0.05)


def _check(got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, what: str):
    err = (got.double() - want).abs()
    assert bool((err <= bound + 1e-12).all()), f"{what}: max err {float(err.max())}, bound {float(bound.max())}"


@pytest.mark.parametrize("penalty", ["none", "apply", "autograd"])
@pytest.mark.parametrize("variant", ["zenke", "kutalev"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_si_matches_float64_loop(backend, device, opt_name, variant, penalty):
    xi, lam, n_steps = 0.1, 5.0, 6
    model = _model(device=device)
    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    si = SynapticIntelligence(model, xi=xi, variant=variant, backend=backend)
    ewc = EWC(model, lam, backend=backend)
    opt = _optimizer(opt_name, model)
    si.attach(opt)
    assert (si in [r() for r in ZENKE_REGISTRY._refs]) == (variant == "zenke")
    clip = variant == "zenke"
    omega = [torch.zeros(p.shape, dtype=torch.float64, device=device) for p in params]
    bound = [torch.zeros(p.shape, dtype=torch.float64, device=device) for p in params]
    start = [p.detach().double().clone() for p in params]
    cum = [torch.zeros(p.shape, dtype=torch.float64, device=device) for p in params]
    max_pen = 0.0
    for task in range(2):
        for x, y in _batches(task, n_steps, device):
            opt.zero_grad(set_to_none=True)
            loss = F.mse_loss(model(x), y)
            g_task = torch.autograd.grad(loss, params, retain_graph=True)
            if penalty == "autograd":
                (loss + ewc.penalty()).backward()
            else:
                loss.backward()
                if penalty == "apply":
                    ewc.apply_()
            g_total = [p.grad.clone() for p in params]
            max_pen = max(max_pen, max(float((a - b).abs().max()) for a, b in zip(g_total, g_task)))
            before = [p.detach().double().clone() for p in params]
            opt.step()
            for i, p in enumerate(params):
                delta = p.detach().double() - before[i]
                g = (g_task if variant == "zenke" else g_total)[i].double()
                omega[i] -= g * delta
                bound[i] += 1e-5 * (g.abs() + g_total[i].double().abs()) * delta.abs()
        for i in range(len(params)):
            _check(si.omega[names[i]], omega[i], bound[i], f"omega {names[i]} task {task}")
        assert si.steps == n_steps
        imp = si.consolidate()
        assert imp.method == "si" and imp.n_samples == n_steps and imp.meta["variant"] == variant
        assert si.steps == 0 and si.n_tasks == task + 1
        cum_imp = si.cumulative
        for i, p in enumerate(params):
            denom = (p.detach().double() - start[i]) ** 2 + xi
            t = omega[i] / denom
            cum[i] = (cum[i] + t).clamp_min(0) if clip else cum[i] + t
            want = t.clamp_min(0) if clip else t
            _check(imp[names[i]], want, bound[i] / denom + 1e-7 * t.abs(), f"importance {names[i]}")
            _check(
                cum_imp[names[i]], cum[i], 2 * bound[i] / denom + 1e-6 * cum[i].abs() + 1e-7, f"cumulative {names[i]}"
            )
            assert torch.count_nonzero(si.omega[names[i]]) == 0
            omega[i].zero_()
            bound[i].zero_()
            start[i] = p.detach().double().clone()
        if task == 0 and penalty != "none":
            ewc.consolidate(_fisher_like(model, 7))
    if penalty != "none":
        assert max_pen > 1e-2  # the penalty gradient mattered, so excluding it is tested
    if clip:
        assert any(bool((cum_imp[n] >= 0).all()) for n in names)
    si.detach()
    assert si not in [r() for r in ZENKE_REGISTRY._refs]


def test_penalty_and_apply_in_one_step_exclude_both():
    """penalty() through autograd and apply_() in the same step: the tracker still sees the task gradient."""
    model = _model()
    params = list(model.parameters())
    si = SynapticIntelligence(model, xi=0.1, backend="torch")
    ewc = EWC(model, 4.0, backend="torch")
    ewc.consolidate(_fisher_like(model, 1))
    with torch.no_grad():
        for p in params:
            p.add_(0.3)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.attach(opt)
    x, y = _batches(0, 1)[0]
    loss = F.mse_loss(model(x), y)
    g_task = torch.autograd.grad(loss, params, retain_graph=True)
    (loss + ewc.penalty()).backward()
    ewc.apply_()
    g_total = [p.grad.double() for p in params]
    before = [p.detach().double().clone() for p in params]
    opt.step()
    for (n, w), g, gt, b, p in zip(si.omega.items(), g_task, g_total, before, params):
        delta = p.detach().double() - b
        # exact up to the rounding of .grad - recorded (one fp32 ulp of the total gradient)
        _check(w, -g.double() * delta, 1e-6 * (g.double().abs() + gt.abs()) * delta.abs(), n)
    si.detach()


def test_grad_none_params_skipped_and_detach():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(4, 2), "unused": nn.Linear(4, 2)})
    si = SynapticIntelligence(model, xi=0.01, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1, weight_decay=0.1)
    si.attach(opt)
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        model["used"](torch.randn(6, 4)).pow(2).mean().backward()
        opt.step()
    om = si.omega
    assert all(torch.count_nonzero(om[n]) == 0 for n in om if n.startswith("unused"))
    assert all(torch.count_nonzero(om[n]) > 0 for n in om if n.startswith("used"))
    assert si.steps == 3
    si.detach()
    assert not si.attached
    snapshot = {n: t.clone() for n, t in si.omega.items()}
    opt.zero_grad(set_to_none=True)
    model["used"](torch.randn(6, 4)).pow(2).mean().backward()
    opt.step()
    assert si.steps == 3 and all(torch.equal(snapshot[n], t) for n, t in si.omega.items())
    imp = si.consolidate()
    assert set(imp) == set(n for n, _ in model.named_parameters())
    assert all(torch.count_nonzero(imp[n]) == 0 for n in imp if n.startswith("unused"))


def test_validation_and_attach_errors():
    model = _model()
    with pytest.raises(ValueError):
        SynapticIntelligence(model, xi=0.0)
    with pytest.raises(ValueError):
        SynapticIntelligence(model, variant="other")
    with pytest.raises(ValueError):
        SynapticIntelligence(model, backend="gpu")
    si = SynapticIntelligence(model)
    assert si.clip is True and SynapticIntelligence(model, variant="kutalev").clip is False
    assert SynapticIntelligence(model, variant="kutalev", clip=True).clip is True
    with pytest.raises(TypeError):
        si.attach("sgd")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.attach(opt)
    with pytest.raises(RuntimeError, match="already attached"):
        si.attach(opt)
    si.detach()
    assert not si.attached and "zenke" in repr(si)


def test_state_dict_round_trip():
    model = _model()
    si = SynapticIntelligence(model, xi=0.05, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.attach(opt)
    for task in range(2):
        for x, y in _batches(task, 3):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
        if task == 0:
            si.consolidate()
    buf = io.BytesIO()
    torch.save(si.state_dict(), buf)
    buf.seek(0)
    other = SynapticIntelligence(model, xi=0.1, backend="torch")
    other.load_state_dict(torch.load(buf, weights_only=True))
    a, b = si.state_dict(), other.state_dict()
    for k in a:
        if isinstance(a[k], dict):
            assert all(torch.equal(a[k][n], b[k][n]) for n in a[k]), k
        else:
            assert a[k] == b[k], k
    ia, ib = si.consolidate(), other.consolidate()
    assert all(torch.equal(ia[n], ib[n]) for n in ia)
    si.detach()
    with pytest.raises(ValueError):
        SynapticIntelligence(model, variant="kutalev").load_state_dict(a)


def _same_state(a: dict, b: dict) -> bool:
    if a.keys() != b.keys():
        return False
    for k in a:
        if isinstance(a[k], dict):
            if a[k].keys() != b[k].keys() or not all(torch.equal(a[k][n], b[k][n]) for n in a[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


@pytest.mark.parametrize("corrupt", ["no_steps", "no_n_tasks", "bad_cum_steps", "bad_clip", "bad_prev"])
def test_load_state_dict_validates_before_changing(corrupt):
    """A bad state dict raises ValueError/TypeError and leaves every part of the tracker as it was
    (the tensors used to be replaced before the counters were read)."""
    model = _model()
    src = SynapticIntelligence(model, xi=0.05, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    src.attach(opt)
    for x, y in _batches(0, 3):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    src.consolidate()
    src.detach()
    bad = dict(src.state_dict())
    if corrupt == "no_steps":
        del bad["steps"]
    elif corrupt == "no_n_tasks":
        del bad["n_tasks"]
    elif corrupt == "bad_cum_steps":
        bad["cum_steps"] = "three"
    elif corrupt == "bad_clip":
        bad["clip"] = "yes"
    else:  # the last tensor group, last entry of the wrong shape
        bad["prev"] = {**bad["prev"], src.names[-1]: torch.zeros(7)}
    target = SynapticIntelligence(model, xi=0.1, backend="torch")
    before = target.state_dict()
    with pytest.raises((ValueError, TypeError)):
        target.load_state_dict(bad)
    assert _same_state(target.state_dict(), before)
    target.load_state_dict(src.state_dict())  # the intact dict still loads
    assert _same_state(target.state_dict(), src.state_dict())
