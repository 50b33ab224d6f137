"""EWC: penalty()/apply_() against float64 per-task sums, modes, validation, persistence."""

import io
import warnings

import pytest
import torch
from torch import nn

import ewc_fast
from ewc_fast import EWC, Importance


def _model(dtype=torch.float32, seed=0, device="cpu"):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 2)).to(device=device, dtype=dtype)


def _importance(model, seed, dtype=None, zeros=True):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, p in model.named_parameters():
        t = torch.rand(p.shape, generator=g, dtype=torch.float64) * 3
        if zeros:
            t[torch.rand(p.shape, generator=g) < 0.2] = 0  # some unimportant weights
        out[n] = t.to(device=p.device, dtype=dtype or p.dtype)
    return Importance(out, method="fisher", n_samples=7)


@torch.no_grad()
def _perturb(model, seed, scale=0.3):
    g = torch.Generator().manual_seed(1000 + seed)
    for p in model.parameters():
        p.add_((torch.randn(p.shape, generator=g) * scale).to(p))


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _penalty_grads(ewc, model):
    model.zero_grad(set_to_none=True)
    v = ewc.penalty()
    assert v.requires_grad and v.grad_fn is not None
    v.backward()
    return v.detach(), _grads(model)


def _apply_grads(ewc, model):
    model.zero_grad(set_to_none=True)
    v = ewc.apply_()
    return v, _grads(model)


def _naive(tasks, model, lam, gamma, alpha=None):
    """float64 per-task sum: value and gradient of sum_K gamma^(n-K) (lam/2) sum F_K (theta - theta*_K)^2,
    or, stabilised, (lam/2)(sum W (theta - mu)^2 + c) with W = Omega/(1 + alpha lam Omega)."""
    n = len(tasks)
    value, grads = 0.0, {}
    for name, p in model.named_parameters():
        th = p.detach().double()
        ws = [gamma ** (n - 1 - k) for k in range(n)]
        Fs = [t[0][name].double() for t in tasks]
        As = [t[1][name] for t in tasks]
        if alpha is None:
            value += sum(w * 0.5 * lam * (F * (th - a) ** 2).sum() for w, F, a in zip(ws, Fs, As))
            grads[name] = sum(w * lam * F * (th - a) for w, F, a in zip(ws, Fs, As))
        else:
            om = sum(w * F for w, F in zip(ws, Fs))
            mu = torch.where(om > 0, sum(w * F * a for w, F, a in zip(ws, Fs, As)) / om.clamp_min(1e-300), As[-1])
            c = sum((w * F * (a - mu) ** 2).sum() for w, F, a in zip(ws, Fs, As))
            W = om / (1 + alpha * lam * om)
            value += 0.5 * lam * ((W * (th - mu) ** 2).sum() + c)
            grads[name] = lam * W * (th - mu)
    return float(value), grads


def _run_tasks(model, ewc, n_tasks, seed=0, idtype=None):
    tasks = []
    for k in range(n_tasks):
        _perturb(model, seed + k)
        imp = _importance(model, seed + k, dtype=idtype)
        ewc.consolidate(imp)
        tasks.append((imp, {n: p.detach().double().clone() for n, p in model.named_parameters()}))
    _perturb(model, seed + 99, scale=0.2)
    return tasks


def _close(got, want, rtol):
    scale = max(float(want.abs().max()), 1e-30)
    assert float((got.double() - want).abs().max()) <= rtol * scale, (got, want)


@pytest.mark.parametrize("gamma", [1.0, 0.7])
@pytest.mark.parametrize("alpha", [None, 0.05])
def test_separate_matches_float64_per_task_sum(backend, device, gamma, alpha):
    model = _model(device=device)
    lam = 3.0
    ewc = EWC(model, lam, gamma=gamma, stabilize_lr=alpha, backend=backend)
    tasks = _run_tasks(model, ewc, 4)
    v1, g1 = _penalty_grads(ewc, model)
    v2, g2 = _apply_grads(ewc, model)
    assert v1.dtype == torch.float32 and v2.dtype == torch.float64 and not v2.requires_grad
    want_v, want_g = _naive(tasks, model, lam, gamma, alpha)
    assert set(g1) == set(g2) == set(want_g)
    for n in want_g:
        assert torch.equal(g1[n], g2[n]), n  # same op, same buffers: bit-identical
        _close(g1[n], want_g[n], 2e-6)
    assert abs(float(v2) - want_v) <= 2e-6 * want_v
    assert abs(float(v1) - want_v) <= 2e-6 * want_v
    assert ewc.n_tasks == 4 and ewc.c > 0


def test_online_matches_schwarz_recursion(backend, device):
    model = _model(device=device)
    lam, gamma = 2.0, 0.8
    ewc = EWC(model, lam, mode="online", gamma=gamma, backend=backend)
    omega = {n: torch.zeros(p.shape, dtype=torch.float64, device=device) for n, p in model.named_parameters()}
    for k in range(3):
        _perturb(model, k)
        imp = _importance(model, k)
        ewc.consolidate(imp)
        for n in omega:
            omega[n] = gamma * omega[n] + imp[n].double()
        anchor = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    assert ewc.c == 0.0
    for n in omega:
        torch.testing.assert_close(ewc.omega[n].double(), omega[n], rtol=1e-7, atol=0)
        assert torch.equal(ewc.mu[n], anchor[n])  # mu is exactly the latest anchor
    _perturb(model, 50, scale=0.2)
    v1, g1 = _penalty_grads(ewc, model)
    v2, g2 = _apply_grads(ewc, model)
    want = 0.0
    for n, p in model.named_parameters():
        d = p.detach().double() - anchor[n]
        want += 0.5 * lam * float((omega[n] * d * d).sum())
        assert torch.equal(g1[n], g2[n])
        _close(g1[n], lam * omega[n] * d, 2e-6)
    assert abs(float(v2) - want) <= 2e-6 * want and abs(float(v1) - want) <= 2e-6 * want


def test_gradient_exact_at_anchor():
    """Right after consolidation theta == anchor: fp64 mu makes the gradient exactly zero for one task
    and tiny-but-right near it (where an fp32 mu would be wrong by ~100 %)."""
    model = _model()
    ewc = EWC(model, 5.0, backend="torch")
    ewc.consolidate(_importance(model, 0))
    _, g = _apply_grads(ewc, model)
    assert all(torch.count_nonzero(t) == 0 for t in g.values())
    _perturb(model, 1)
    ewc.consolidate(_importance(model, 1))  # mu is now between two anchors, not fp32-representable
    _, g = _apply_grads(ewc, model)
    want = {n: 5.0 * ewc.omega[n].double() * (p.detach().double() - ewc.mu[n]) for n, p in model.named_parameters()}
    for n in g:
        _close(g[n], want[n], 1e-6)


def test_autograd_scaling_and_composition():
    model = _model()
    ewc = EWC(model, 1.5, backend="torch")
    _run_tasks(model, ewc, 2)
    _, g1 = _penalty_grads(ewc, model)
    model.zero_grad(set_to_none=True)
    x = torch.randn(4, 5)
    loss = model(x).pow(2).sum()
    (loss + 3.0 * ewc.penalty()).backward()
    g_total = _grads(model)
    model.zero_grad(set_to_none=True)
    model(x).pow(2).sum().backward()
    g_task = _grads(model)
    for n in g1:
        torch.testing.assert_close(g_total[n], g_task[n] + 3.0 * g1[n], rtol=1e-6, atol=1e-6)


def test_penalty_is_once_differentiable_with_clear_error():
    """First-order gradients with create_graph=True are unchanged; differentiating them again raises a
    clear RuntimeError -- also next to a twice-differentiable task loss, where a second derivative
    used to come out silently without the penalty's lam*W term."""
    model = _model()
    ewc = EWC(model, 1.5, backend="torch")
    _run_tasks(model, ewc, 2)
    params = list(model.parameters())
    plain = torch.autograd.grad(ewc.penalty(), params)
    graph = torch.autograd.grad(ewc.penalty(), params, create_graph=True)
    assert all(torch.equal(a, b.detach()) for a, b in zip(plain, graph))
    with pytest.raises(RuntimeError, match="differentiable only once"):
        torch.autograd.grad(sum(g.sum() for g in graph), params)

    x = torch.randn(4, 5)
    gs = torch.autograd.grad(model(x).pow(2).sum() + ewc.penalty(), params, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiable only once"):
        torch.autograd.grad(sum(g.pow(2).sum() for g in gs), params)
    # the task loss alone is still twice differentiable, and plain backward is unaffected
    gs = torch.autograd.grad(model(x).pow(2).sum(), params, create_graph=True)
    torch.autograd.grad(sum(g.pow(2).sum() for g in gs), params)
    model.zero_grad(set_to_none=True)
    ewc.penalty().backward()
    assert all(torch.equal(p.grad, g) for p, g in zip(params, plain))


def test_bf16_params(backend, device):
    model = _model(torch.bfloat16, device=device)
    lam = 2.0
    ewc = EWC(model, lam, backend=backend)
    tasks = _run_tasks(model, ewc, 3, idtype=torch.float32)
    v1, g1 = _penalty_grads(ewc, model)
    v2, g2 = _apply_grads(ewc, model)
    assert v1.dtype == torch.float32 and v2.dtype == torch.float64  # the value is never returned in bf16
    want_v, want_g = _naive(tasks, model, lam, 1.0)
    for n in want_g:
        assert g1[n].dtype == torch.bfloat16 and torch.equal(g1[n], g2[n])
        _close(g1[n], want_g[n], 1e-2)  # one bf16 rounding of the stored gradient
    assert abs(float(v2) - want_v) <= 1e-5 * want_v  # the value is accumulated in fp32/fp64


def test_before_consolidation_is_zero_and_noop():
    model = _model()
    ewc = EWC(model, 1.0, backend="torch")
    v = ewc.penalty()
    assert float(v) == 0.0 and v.dtype == torch.float32
    v = ewc.apply_()
    assert float(v) == 0.0 and v.dtype == torch.float64
    assert all(p.grad is None for p in model.parameters())


def test_apply_with_grad_none_allocates_and_moves_params():
    model = _model()
    ewc = EWC(model, 10.0, backend="torch")
    ewc.consolidate(_importance(model, 0, zeros=False))
    anchor = [p.detach().clone() for p in model.parameters()]
    _perturb(model, 3)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    dist0 = sum(float((p.detach() - a).pow(2).sum()) for p, a in zip(model.parameters(), anchor))
    for _ in range(5):
        opt.zero_grad(set_to_none=True)
        ewc.apply_()
        assert all(p.grad is not None for p in model.parameters())
        opt.step()
    dist1 = sum(float((p.detach() - a).pow(2).sum()) for p, a in zip(model.parameters(), anchor))
    assert dist1 < 0.8 * dist0
    # apply_ adds to an existing gradient
    model.zero_grad(set_to_none=True)
    ewc.apply_()
    pen = _grads(model)
    for p in model.parameters():
        p.grad = torch.full_like(p, 0.25)
    ewc.apply_()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, pen[n] + 0.25, rtol=0, atol=1e-6)
    # grad_scale multiplies the added gradient only
    model.zero_grad(set_to_none=True)
    ewc.apply_(grad_scale=4.0)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, 4.0 * pen[n], rtol=1e-6, atol=0)


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if k in ("omega", "mu"):
            assert a[k].keys() == b[k].keys()
            for n in a[k]:
                assert a[k][n].dtype == b[k][n].dtype and torch.equal(a[k][n], b[k][n]), (k, n)
        else:
            assert a[k] == b[k], k


def _bad_cases(model):
    good = dict(_importance(model, 5))
    nan = dict(good)
    nan["0.weight"] = nan["0.weight"].clone()
    nan["0.weight"][1, 2] = float("nan")
    inf = dict(good)
    inf["2.bias"] = torch.full((2,), float("inf"))
    neg = dict(good)
    neg["2.weight"] = -good["2.weight"] - 1
    missing = {k: v for k, v in good.items() if k != "2.bias"}
    extra = dict(good, **{"nope.weight": torch.zeros(3)})
    shape = dict(good, **{"0.bias": torch.zeros(4)})
    int_dtype = dict(good, **{"0.bias": torch.zeros(3, dtype=torch.int32)})
    complex_dtype = dict(good, **{"0.bias": torch.zeros(3, dtype=torch.complex64)})
    device = dict(good, **{"0.bias": torch.zeros(3, device="meta")})
    not_tensor = dict(good, **{"0.bias": [0.0, 0.0, 0.0]})
    return {
        "nan": (nan, ValueError, "0.weight"),
        "inf": (inf, ValueError, "2.bias"),
        "negative": (neg, ValueError, "2.weight"),
        "missing": (missing, ValueError, "2.bias"),
        "extra": (extra, ValueError, "nope.weight"),
        "shape": (shape, ValueError, "0.bias"),
        "int_dtype": (int_dtype, TypeError, "0.bias"),
        "complex_dtype": (complex_dtype, TypeError, "0.bias"),
        "device": (device, ValueError, "0.bias"),
        "not_tensor": (not_tensor, TypeError, "0.bias"),
        "not_mapping": ([1, 2], TypeError, "mapping"),
    }


@pytest.mark.parametrize(
    "case",
    [
        "nan",
        "inf",
        "negative",
        "missing",
        "extra",
        "shape",
        "int_dtype",
        "complex_dtype",
        "device",
        "not_tensor",
        "not_mapping",
        "nan_param",
    ],
)
@pytest.mark.parametrize("mode", ["separate", "online"])
def test_bad_importance_leaves_state_unchanged(case, mode):
    model = _model()
    ewc = EWC(model, 2.0, mode=mode, gamma=0.9, backend="torch")
    _run_tasks(model, ewc, 2)
    before = ewc.state_dict()
    if case == "nan_param":
        imp, exc, word = _importance(model, 9), ValueError, "0.bias"
        with torch.no_grad():
            model[0].bias[1] = float("nan")
    else:
        imp, exc, word = _bad_cases(model)[case]
    with pytest.raises(exc, match=word.replace(".", r"\.")):
        ewc.consolidate(imp)
    _assert_same_state(before, ewc.state_dict())


def test_hyperparameter_validation():
    model = _model()
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            EWC(model, bad)
    for bad in (0.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ValueError):
            EWC(model, 1.0, gamma=bad)
    with pytest.raises(ValueError):
        EWC(model, 1.0, mode="sum")
    with pytest.raises(ValueError):
        EWC(model, 1.0, stabilize_lr=-0.1)
    with pytest.raises(TypeError):
        EWC(model, 1.0, state_dtype=torch.bfloat16)
    with pytest.raises(TypeError):
        EWC(model, "1")
    with pytest.raises(TypeError):
        EWC("model", 1.0)
    with pytest.raises(ValueError):
        EWC(model, 1.0, backend="cuda")
    ewc = EWC(model, 1.0)
    with pytest.raises(ValueError):
        ewc.lam = -2
    with pytest.raises(ValueError):
        ewc.gamma = 0
    with pytest.raises(ValueError):
        ewc.stabilize_lr = float("nan")
    assert ewc.lam == 1.0 and ewc.gamma == 1.0 and ewc.stabilize_lr is None
    ewc.lam, ewc.gamma, ewc.stabilize_lr = 0, 0.5, 0.1
    assert (ewc.lam, ewc.gamma, ewc.stabilize_lr) == (0.0, 0.5, 0.1)
    with pytest.raises(AttributeError):
        ewc.mode = "online"


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_dict_round_trip_bit_exact(mode):
    model = _model()
    ewc = EWC(model, 2.5, mode=mode, gamma=0.6, stabilize_lr=0.01, state_dtype=torch.float64, backend="torch")
    _run_tasks(model, ewc, 3)
    sd = ewc.state_dict()
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    other = EWC(model, 0.0, backend="torch")
    other.load_state_dict(loaded)
    _assert_same_state(sd, other.state_dict())
    assert (other.mode, other.lam, other.gamma, other.stabilize_lr, other.n_tasks, other.state_dtype) == (
        mode,
        2.5,
        0.6,
        0.01,
        3,
        torch.float64,
    )
    assert other.names == ewc.names
    _, g1 = _apply_grads(ewc, model)
    v1 = ewc.apply_()
    model.zero_grad(set_to_none=True)
    v2 = other.apply_()
    assert float(v1) == float(v2)
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, g1[n])
    # consolidating further continues identically
    imp = _importance(model, 42)
    ewc.consolidate(imp)
    other.consolidate(imp)
    _assert_same_state(ewc.state_dict(), other.state_dict())


def test_load_state_dict_validates_and_leaves_state():
    model = _model()
    ewc = EWC(model, 2.0, backend="torch")
    _run_tasks(model, ewc, 2)
    sd = ewc.state_dict()
    target = EWC(model, 1.0, backend="torch")
    target.consolidate(_importance(model, 3))
    before = target.state_dict()
    bad_name = dict(
        sd,
        names=["zzz"] + sd["names"][1:],
        omega={("zzz" if k == "0.weight" else k): v for k, v in sd["omega"].items()},
        mu={("zzz" if k == "0.weight" else k): v for k, v in sd["mu"].items()},
    )
    bad_shape = dict(sd, omega=dict(sd["omega"], **{"0.bias": torch.zeros(4)}))
    bad_mu = dict(sd, mu=dict(sd["mu"], **{"0.bias": sd["mu"]["0.bias"].float()}))
    for bad, exc in (
        (bad_name, ValueError),
        (bad_shape, ValueError),
        (bad_mu, TypeError),
        (dict(sd, lam=-1.0), ValueError),
        (dict(sd, mode="x"), ValueError),
        (dict(sd, format="x"), ValueError),
    ):
        with pytest.raises(exc):
            target.load_state_dict(bad)
        _assert_same_state(before, target.state_dict())
    smaller = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="shape"):
        EWC(smaller, 1.0).load_state_dict(sd)


def test_new_parameter_after_consolidation_warns_once():
    model = _model()
    ewc = EWC(model, 1.0, backend="torch")
    ewc.consolidate(_importance(model, 0))
    model.extra = nn.Parameter(torch.ones(3))
    with pytest.warns(RuntimeWarning, match="extra"):
        ewc.penalty()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ewc.penalty()
        ewc.apply_()
    assert model.extra.grad is None  # unpenalised
    imp = dict(_importance(model, 1))
    ewc.consolidate(imp)
    assert "extra" in ewc.names
    with torch.no_grad():
        model.extra.add_(1.0)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ewc.apply_()
    torch.testing.assert_close(model.extra.grad, imp["extra"] * 1.0)


def test_frozen_parameter_skipped():
    model = _model()
    model[2].bias.requires_grad_(False)
    ewc = EWC(model, 1.0, backend="torch")
    full = _importance(model, 0)
    ewc.consolidate(full)  # entry for the frozen bias is accepted and ignored
    assert "2.bias" not in ewc.names
    ewc.consolidate({k: v for k, v in full.items() if k != "2.bias"})  # no entry needed either
    _perturb(model, 1)
    _, g = _penalty_grads(ewc, model)
    assert "2.bias" not in g and model[2].bias.grad is None
    _, g = _apply_grads(ewc, model)
    assert "2.bias" not in g and model[2].bias.grad is None
    # a penalised parameter frozen later keeps its state and gets no .grad, but still counts in the value
    model[0].bias.requires_grad_(False)
    before = ewc.state_dict()
    ewc.consolidate({k: v for k, v in full.items() if k not in ("2.bias",)})
    after = ewc.state_dict()
    assert torch.equal(before["omega"]["0.bias"], after["omega"]["0.bias"])
    assert torch.equal(before["mu"]["0.bias"], after["mu"]["0.bias"])
    _perturb(model, 2)
    model.zero_grad(set_to_none=True)
    v = ewc.apply_()
    assert model[0].bias.grad is None
    d = model[0].bias.detach().double() - ewc.mu["0.bias"]
    frozen_term = 0.5 * float((ewc.omega["0.bias"].double() * d * d).sum())
    v_pen = ewc.penalty().detach()
    assert abs(float(v) - float(v_pen)) <= 1e-5 * float(v) and float(v) > frozen_term > 0


def test_model_parameter_replaced_same_shape_is_followed():
    model = _model()
    ewc = EWC(model, 1.0, backend="torch")
    ewc.consolidate(_importance(model, 0))
    model[0].bias = nn.Parameter(model[0].bias.detach() + 1.0)
    model.zero_grad(set_to_none=True)
    ewc.apply_()
    assert model[0].bias.grad is not None
    model[0].bias = nn.Parameter(torch.zeros(7))
    with pytest.raises(RuntimeError, match="shape"):
        ewc.penalty()


def test_exported():
    assert {"Importance", "EWC", "SynapticIntelligence", "WVA"} <= set(ewc_fast.__all__)
