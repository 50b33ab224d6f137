"""SynapticIntelligence under bad and unusual input: a correct ``omega`` (against a float64 loop of
Zenke's ``omega -= g_task * (theta_after - theta_before)`` over the steps that actually ran), or a clear
error raised before the optimizer moves anything, with the tracker and the model bit-identical
(docs/GUARANTEES.md, "SynapticIntelligence")."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc_fast import EWC, Importance, SynapticIntelligence
from tests.helpers import assert_unchanged, frozen


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 2))


def _batches(n, seed=3):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(5, 2, generator=g)
    out = []
    for _ in range(n):
        x = torch.randn(8, 5, generator=g)
        out.append((x, torch.tanh(x @ w)))
    return out


def _ewc(model, lam=5.0):
    g = torch.Generator().manual_seed(11)
    imp = Importance(
        {n: torch.rand(p.shape, generator=g) * 3 for n, p in model.named_parameters()}, method="fisher", n_samples=1
    )
    ewc = EWC(model, lam, backend="torch").consolidate(imp)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))  # away from the anchor: the penalty gradient matters
    return ewc


class _Float64Loop:
    """Zenke's path integral in float64 over the steps that ran, with a rounding bound for the fp32
    tracker: each term g*dtheta is formed in fp32 (<= ~3 roundings of 2^-24), so |err| <= 1e-6 * sum |g*dtheta|."""

    def __init__(self, params):
        self.params = params
        self.omega = [torch.zeros(p.shape, dtype=torch.float64) for p in params]
        self.bound = [torch.zeros(p.shape, dtype=torch.float64) for p in params]

    def before(self):
        self.theta = [p.detach().double().clone() for p in self.params]

    def after(self, g_task):
        for i, p in enumerate(self.params):
            term = g_task[i].double() * (p.detach().double() - self.theta[i])
            self.omega[i] -= term
            self.bound[i] += 1e-6 * term.abs()

    def check(self, si):
        for i, (n, w) in enumerate(si.omega.items()):
            err = (w.double() - self.omega[i]).abs()
            assert bool((err <= self.bound[i] + 1e-12).all()), f"omega[{n}]: max err {float(err.max()):.3e}"


# ------------------------------------------------------------------------- item 1: skipped steps
@pytest.mark.parametrize("zero_grad_to_none", [True, False])
def test_grad_scaler_skipped_step_does_not_reuse_a_stale_snapshot(zero_grad_to_none):
    """A real torch.amp.GradScaler on CPU skips step() where the gradients hold inf; the EWC.apply_
    snapshot of that iteration (inf/NaN) must not be used by the next step."""
    model = _model()
    params = list(model.parameters())
    ewc = _ewc(model)
    si = SynapticIntelligence(model, xi=0.1, backend="torch")
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
    si.attach(opt)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    ref = _Float64Loop(params)
    skipped = 0
    for it, (x, y) in enumerate(_batches(6)):
        opt.zero_grad(set_to_none=zero_grad_to_none)
        loss = F.mse_loss(model(x), y)
        if it in (1, 3):
            loss = loss * float("inf")  # overflow: the scaler skips this step
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        g_task = [p.grad.clone() for p in params]
        ewc.apply_()
        ref.before()
        scaler.step(opt)
        scaler.update()
        ran = any(not torch.equal(p.detach().double(), t) for p, t in zip(params, ref.theta))
        if ran:
            ref.after(g_task)
        else:
            skipped += 1
    assert skipped == 2 and si.steps == 4
    ref.check(si)


def test_user_skipped_step_does_not_merge_stale_penalty_records():
    """EWC.penalty() through autograd: the records of an iteration whose step the user skipped are
    forgotten once .grad is reset by zero_grad; the next step excludes its own penalty only."""
    model = _model()
    params = list(model.parameters())
    ewc = _ewc(model)
    si = SynapticIntelligence(model, xi=0.1, backend="torch")
    opt = torch.optim.Adam(params, lr=0.05)
    si.attach(opt)
    ref = _Float64Loop(params)
    for it, (x, y) in enumerate(_batches(5)):
        opt.zero_grad(set_to_none=True)
        loss = F.mse_loss(model(x), y)
        g_task = torch.autograd.grad(loss, params, retain_graph=True)
        (loss + ewc.penalty()).backward()
        if it == 2:
            continue  # the user skips this step (e.g. a NaN check)
        ref.before()
        opt.step()
        ref.after(g_task)
    assert si.steps == 4
    ref.check(si)


# --------------------------------------------------------- item 2: movement outside the optimizer
def test_movement_by_something_else_is_not_attributed_and_warns_once():
    model = _model()
    params = list(model.parameters())
    si = SynapticIntelligence(model, xi=0.1, variant="kutalev", backend="torch")
    opt = torch.optim.SGD(params, lr=0.1)
    si.attach(opt)
    ref = _Float64Loop(params)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for it, (x, y) in enumerate(_batches(5)):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            if it in (1, 3):
                with torch.no_grad():
                    params[0].add_(0.5)  # a manual edit between steps (a second optimizer would do the same)
            g = [p.grad.clone() for p in params]
            ref.before()
            opt.step()
            ref.after(g)
    moved = [w for w in caught if "moved between optimizer steps" in str(w.message)]
    assert len(moved) == 1 and "'0.weight'" in str(moved[0].message)
    ref.check(si)


# ------------------------------------------------------------------ item 3: closure optimizers
def test_lbfgs_is_refused_at_attach():
    model = _model()
    si = SynapticIntelligence(model)
    with pytest.raises(TypeError, match="LBFGS evaluates several iterates.*first-order optimizer"):
        si.attach(torch.optim.LBFGS(model.parameters()))
    assert not si.attached


def test_step_with_closure_is_refused_before_the_optimizer_moves():
    model = _model()
    si = SynapticIntelligence(model, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.attach(opt)
    x, y = _batches(1)[0]

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    closure()
    before = frozen(model, si)
    with pytest.raises(RuntimeError, match=r"step\(closure\).*gradients='manual'.*capture_gradients"):
        opt.step(closure)
    assert_unchanged(before, model, si)


# -------------------------------------------------------------- item 8: dtype / device / shape
def test_dtype_change_after_construction_is_refused_before_the_step():
    model = _model()
    si = SynapticIntelligence(model, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    si.attach(opt)
    model.double()
    x, y = _batches(1)[0]
    F.mse_loss(model(x.double()), y.double()).backward()
    before = frozen(model, si)
    with pytest.raises(RuntimeError, match=r"'0.weight' is now torch.float64.*built for torch.float32.*Build"):
        opt.step()
    assert_unchanged(before, model, si)
    with pytest.raises(RuntimeError, match="is now torch.float64"):
        si.consolidate()
    assert_unchanged(before, model, si)


# ------------------------------------------------------------------------ item 10: load_state_dict
@pytest.mark.parametrize(
    "case, match",
    [
        ("omega_nan", r"omega\[.*NaN/Inf"),
        ("prev_inf", r"prev\[.*NaN/Inf"),
        ("start_f64", r"start\[.*dtype torch.float64, expected torch.float32"),
        ("cum_negative", r"cumulative\[.*negative"),
        ("no_cum_with_tasks", "inconsistent state"),
        ("xi_zero", "xi must be > 0"),
    ],
)
def test_load_state_dict_refuses_bad_fields_before_any_change(case, match):
    model = _model()
    src = SynapticIntelligence(model, backend="torch")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    src.attach(opt)
    for x, y in _batches(2):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
    src.consolidate()
    state = src.state_dict()
    first = state["names"][0]

    def edit(group, fn):
        entries = dict(state[group])
        entries[first] = fn(entries[first].clone())
        return dict(state, **{group: entries})

    bad = {
        "omega_nan": lambda: edit("omega", lambda t: t.fill_(float("nan"))),
        "prev_inf": lambda: edit("prev", lambda t: t.fill_(float("inf"))),
        "start_f64": lambda: edit("start", lambda t: t.double()),
        "cum_negative": lambda: edit("cumulative", lambda t: t.fill_(-1.0)),
        "no_cum_with_tasks": lambda: dict(state, cumulative=None),
        "xi_zero": lambda: dict(state, xi=0.0),
    }[case]()
    dst = SynapticIntelligence(model, xi=0.5, backend="torch")
    before = frozen(model, dst)
    with pytest.raises((ValueError, TypeError), match=match):
        dst.load_state_dict(bad)
    assert_unchanged(before, model, dst)
    dst.load_state_dict(state)  # the untouched state loads
    assert dst.n_tasks == 1


# ---------------------------------------------------------------------- item 12: sparse gradients
def test_sparse_embedding_gradients_are_tracked_exactly():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(12, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2))
    params = list(model.parameters())
    si = SynapticIntelligence(model, xi=0.1, variant="kutalev", backend="torch")
    opt = torch.optim.SGD(params, lr=0.1)  # SGD steps sparse gradients
    si.attach(opt)
    ref = _Float64Loop(params)
    g = torch.Generator().manual_seed(5)
    for _ in range(4):
        idx = torch.randint(0, 12, (4, 2), generator=g)
        opt.zero_grad()
        model(idx).pow(2).sum().backward()
        assert params[0].grad.layout == torch.sparse_coo
        grads = [p.grad.to_dense() for p in params]
        ref.before()
        opt.step()
        ref.after(grads)
    assert si.steps == 4
    ref.check(si)
    imp = si.consolidate()
    assert bool(torch.isfinite(imp["0.weight"]).all())
