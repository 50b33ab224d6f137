"""ewc_fast.optim.SGD / Adam / AdamW against the same steps taken the slow way: torch.optim's
single-tensor step on ``loss + EWC.penalty()`` (or after ``EWC.apply_``), SI through its optimizer
hooks, WVA through ``wva_attenuate_`` in its hooks -- over several steps with an lr schedule, param
groups with different hyper-parameters, weight decay, momentum / nesterov, amsgrad, skipped steps
(GradScaler with an inf), clipping, state_dict round trips, bf16 parameters; on every backend. On a
CUDA machine the torch and Triton backends also run on CUDA tensors (ids ``torch-cuda`` /
``triton-cuda``, marked ``cuda``: skipped at once without a card, Triton also while
TRITON_INTERPRET=1) against the same slow path (torch.optim + hooks) run on the same device, TF32 off
(``cuda_strict``), so the model's forward/backward is the same in both runs and only the step differs.

Tolerances: float64 runs agree to 1e-10 relative (a few fp64 ulps per step, several steps; any wrong
term is >= 1e-4). float32 runs: the fused kernels and torch's kernels round differently (operation
order, vectorised lerp / FMA in torch), a few fp32 ulps per value and step, compounded over the steps
(and amplified by Adam's 1/sqrt(v) where v is small): 2e-5 relative fails for any wrong term (>= 1e-3).
SI's omega sums g*dtheta with cancellation (elements near 0): compared relative to its largest element.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import ewc_fast
from ewc_fast import optim
from tests.helpers import available_case, backend_cases

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
# the same on CUDA: both runs share the device's forward/backward, the steps are elementwise (no
# reduction but the penalty value and the clipping norm, a few fp32/fp64 roundings in any order)
TOL = {F64: 1e-10, F32: 2e-5}

CASES = backend_cases(cpp_threads=None)


@pytest.fixture(params=CASES)
def case(request):
    """(backend, device) of a test case, skipped with the reason when the backend cannot run there."""
    return available_case(request)


@pytest.fixture
def backend(case):
    return case[0]


@pytest.fixture
def device(case):
    return case[1]


def _rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    den = float(b.norm())
    return float((a - b).norm()) / (den if den > 0 else 1.0)


def _close_model(m1, m2, tol, what=""):
    for (n, a), (_, b) in zip(m1.named_parameters(), m2.named_parameters()):
        assert _rel(a, b) <= tol, f"{what} {n}: {_rel(a, b):.2e} > {tol:.1e}"


def _si_close(s1, s2, tol):
    for n, a in s1.omega.items():
        b = s2.omega[n]
        scale = float(b.abs().max()) or 1.0
        err = float((a.double() - b.double()).abs().max()) / scale
        assert err <= tol, f"SI omega {n}: {err:.2e} > {tol:.1e}"


def _setup(dtype, *, seed=0, si_variant="zenke", wva=False, device="cpu"):
    """Model (on ``device``), EWC with two consolidated tasks, SI, WVA (if ``wva``) and a batch; every
    random value is drawn on the CPU (the same on every device) and copied there."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).to(device, dtype)
    gen = torch.Generator().manual_seed(seed + 1)

    def draw(f, shape):
        return f(shape, generator=gen, dtype=F64).to(device, dtype)

    ewc = ewc_fast.EWC(model, lam=3.0)
    for _ in range(2):  # two tasks: c != 0, mu a weighted mean of anchors
        imp = {n: draw(torch.rand, p.shape) for n, p in model.named_parameters()}
        ewc.consolidate(imp)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.3 * draw(torch.randn, p.shape))
    si = ewc_fast.SynapticIntelligence(model, xi=0.1, variant=si_variant)
    w = None
    if wva:
        w = ewc_fast.WVA(model, lam=0.8)
        w.consolidate({n: draw(torch.rand, p.shape) for n, p in model.named_parameters()})
    x = draw(torch.randn, (16, 5))
    y = draw(torch.randn, (16, 1))
    return model, ewc, si, w, (x, y)


def _groups(model, hp0, hp1):
    return [{"params": list(model[0].parameters()), **hp0}, {"params": list(model[2].parameters()), **hp1}]


CONFIGS = {
    "sgd-momentum": ("SGD", dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01), dict(lr=0.02, momentum=0.5)),
    "sgd-nesterov": ("SGD", dict(lr=0.05, momentum=0.9, nesterov=True), dict(lr=0.03, weight_decay=0.05)),
    "adam-amsgrad": ("Adam", dict(lr=0.01, weight_decay=0.01, amsgrad=True), dict(lr=0.02, betas=(0.8, 0.99))),
    "adamw": ("AdamW", dict(lr=0.01, weight_decay=0.1), dict(lr=0.005, weight_decay=0.0, eps=1e-6)),
}


def _torch_opt(name, groups):
    return getattr(torch.optim, name)(groups, foreach=False)


def _train_reference(name, hp, dtype, steps, *, si_variant="zenke", wva=False, penalty="autograd", device="cpu"):
    model, ewc, si, w, (x, y) = _setup(dtype, si_variant=si_variant, wva=wva, device=device)
    opt = _torch_opt(name, _groups(model, *hp))
    if w is not None:
        w.attach(opt)  # before SI: SI sees the attenuated step
    si.attach(opt)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    for _ in range(steps):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        if penalty == "autograd":
            (loss + ewc.penalty()).backward()
        else:
            loss.backward()
            ewc.apply_()
        opt.step()
        sched.step()
    return model, si


def _train_fused(name, hp, dtype, steps, backend, *, si_variant="zenke", wva=False, device="cpu"):
    model, ewc, si, w, (x, y) = _setup(dtype, si_variant=si_variant, wva=wva, device=device)
    opt = getattr(optim, name)(_groups(model, *hp), ewc=ewc, si=si, wva=w, backend=backend)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    values = []
    for _ in range(steps):
        opt.zero_grad()
        with torch.no_grad():
            values.append(float(ewc.penalty()))
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        assert opt.last_penalty == pytest.approx(values[-1], rel=1e-5)
        sched.step()
    return model, si, opt


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [F64, F32])
def test_matches_the_slow_way(backend, device, config, dtype):
    name, *hp = CONFIGS[config]
    steps = 5
    ref_model, ref_si = _train_reference(name, hp, dtype, steps, device=device)
    model, si, _ = _train_fused(name, hp, dtype, steps, backend, device=device)
    _close_model(model, ref_model, TOL[dtype], config)
    _si_close(si, ref_si, TOL[dtype])
    assert si.steps == ref_si.steps == steps
    # SI's end of task gives the same importance from the fused path (no theta_prev) as from the hooks
    imp, ref_imp = si.consolidate(), ref_si.consolidate()
    for n in ref_imp:
        scale = float(ref_imp[n].abs().max()) or 1.0
        assert float((imp[n].double() - ref_imp[n].double()).abs().max()) / scale <= TOL[dtype]


@pytest.mark.parametrize("config", ["sgd-momentum", "adamw"])
def test_wva_and_kutalev_si_match_the_hook_path(backend, device, config):
    """WVA (hooks: snapshot + wva_attenuate_ after the step) and Kutalev's SI (total gradient, read
    after EWC.apply_) against the fused step, float64."""
    name, *hp = CONFIGS[config]
    ref_model, ref_si = _train_reference(
        name, hp, F64, 4, si_variant="kutalev", wva=True, penalty="apply_", device=device
    )
    model, si, _ = _train_fused(name, hp, F64, 4, backend, si_variant="kutalev", wva=True, device=device)
    _close_model(model, ref_model, TOL[F64], config)
    _si_close(si, ref_si, TOL[F64])


def test_grad_scaler_skipped_step_changes_nothing():
    """GradScaler: the fused step unscales inside; a step with an inf gradient is skipped entirely --
    parameters, optimizer state and SI (omega, steps) -- exactly as torch.optim + hooks under the scaler.
    Kutalev's SI (total gradient): the hook path's Zenke exclusion assumes unscaled gradients."""
    results = []
    for fused in (False, True):
        model, ewc, si, _, (x, y) = _setup(F32, si_variant="kutalev")
        groups = _groups(model, *CONFIGS["adamw"][1:])
        if fused:
            opt = optim.AdamW(groups, ewc=ewc, si=si)
        else:
            opt = _torch_opt("AdamW", groups)
            si.attach(opt)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1)
        for k in range(4):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            if not fused:
                loss = loss + ewc.penalty()
            scaler.scale(loss).backward()
            if k == 1:
                model[0].weight.grad[0, 0] = float("inf")
                before = [p.detach().clone() for p in model.parameters()]
                si_before = {n: t.clone() for n, t in si.omega.items()}
                steps_before = si.steps
            scaler.step(opt)
            scaler.update()
            if k == 1:
                assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
                assert all(torch.equal(si_before[n], t) for n, t in si.omega.items())
                assert si.steps == steps_before
            if not fused:
                si.clear_exclusions()
        results.append((model, si))
    _close_model(results[1][0], results[0][0], TOL[F32], "scaler")
    _si_close(results[1][1], results[0][1], TOL[F32])  # unscaling by 2^-k is exact in both
    assert results[1][1].steps == results[0][1].steps == 3


def test_clip_grad_norm_clips_task_and_penalty_gradient_together(backend, device):
    """opt.clip_grad_norm_ equals EWC.apply_ + torch.nn.utils.clip_grad_norm_ + torch.optim step."""
    name, *hp = CONFIGS["sgd-momentum"]
    finals, norms = [], []
    for fused in (False, True):
        model, ewc, _, _, (x, y) = _setup(F64, device=device)
        groups = _groups(model, *hp)
        opt = optim.SGD(groups, ewc=ewc, backend=backend) if fused else _torch_opt(name, groups)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            if fused:
                norms.append(float(opt.clip_grad_norm_(0.5)))
            else:
                ewc.apply_()
                norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)))
            opt.step()
        finals.append(model)
    assert norms[0] > 0.5  # the clip is active
    assert norms[:3] == pytest.approx(norms[3:], rel=1e-10)
    _close_model(finals[1], finals[0], TOL[F64], "clip")


def test_state_dict_round_trip_and_params_without_grad(backend, device):
    """Resume from state_dict = uninterrupted run; parameters without .grad are not touched; bf16
    parameters keep fp32 state through a round trip."""
    name, *hp = CONFIGS["adam-amsgrad"]
    model, ewc, si, _, (x, y) = _setup(F32, device=device)
    model2, ewc2, si2, _, _ = _setup(F32, device=device)
    opt = optim.Adam(_groups(model, *hp), ewc=ewc, si=si, backend=backend)
    opt2 = optim.Adam(_groups(model2, *hp), ewc=ewc2, si=si2, backend=backend)
    for k in range(4):
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad(set_to_none=True)
            nn.functional.mse_loss(m(x), y).backward()
            m[2].bias.grad = None  # skipped: no grad
        if k == 2:
            opt2 = optim.Adam(_groups(model2, *hp), ewc=ewc2, si=si2, backend=backend)
            opt2.load_state_dict(opt.state_dict())
        bias = model[2].bias.detach().clone()
        opt.step()
        opt2.step()
        assert torch.equal(model[2].bias, bias)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    mb = nn.Linear(3, 2).to(device, BF16)
    ob = optim.AdamW(mb.parameters(), backend=backend)
    mb(torch.randn(4, 3, dtype=BF16).to(device)).sum().backward()
    ob.step()
    ob2 = optim.AdamW(mb.parameters(), backend=backend)
    ob2.load_state_dict(ob.state_dict())
    assert all(t.dtype == F32 for s in ob2.state.values() for k, t in s.items() if k != "step")


def test_bf16_params_every_backend_agrees_with_the_torch_twin(backend, device):
    """bf16 parameters with fp32 state, several steps: every backend stores the torch twin's bf16 values
    (one bf16 ulp, 2^-7 relative, where fp32 results differ in their last bit before rounding)."""
    runs = []
    for b in ("torch", backend):
        model, ewc, si, w, (x, y) = _setup(BF16, wva=True, device=device)
        opt = optim.SGD(_groups(model, *CONFIGS["sgd-momentum"][1:]), ewc=ewc, si=si, wva=w, backend=b)
        for _ in range(3):
            opt.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            opt.step()
        assert all(s["momentum_buffer"].dtype == F32 for s in opt.state.values())
        runs.append(model)
    _close_model(runs[1], runs[0], 2.0**-7, "bf16")


def test_bad_arguments():
    model, ewc, si, _, _ = _setup(F32)
    with pytest.raises(TypeError, match="ewc must be"):
        optim.SGD(model.parameters(), lr=0.1, ewc=si)
    si.attach(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match="detach"):
        optim.SGD(model.parameters(), lr=0.1, si=si)
    with pytest.raises(ValueError, match="nesterov"):
        optim.SGD(model.parameters(), lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="betas"):
        optim.Adam(model.parameters(), betas=(1.0, 0.9))
    with pytest.raises(ValueError, match="lr"):
        optim.AdamW(model.parameters(), lr=float("nan"))
