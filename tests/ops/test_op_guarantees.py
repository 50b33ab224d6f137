"""Refusals of the consolidation ops, on every backend: a refused call raises a clear error naming the
argument and leaves every tensor bit-identical (docs/GUARANTEES.md, "Ops").

Backends: "torch", "cpp" (1 and 2 OpenMP threads: a race shows with 2) and "triton" in the CPU
interpreter (tests/conftest.py sets TRITON_INTERPRET=1), skipped with the reason when unavailable;
"torch-cuda" / "triton-cuda": the same checks on CUDA tensors (marked ``cuda``: skipped at once without
a card, Triton also while TRITON_INTERPRET=1). The inputs are drawn on the CPU and copied to the device.
"""

from __future__ import annotations

import pytest
import torch

from ewc_fast import ops
from ewc_fast.testing import consolidation as reference
from tests.helpers import BACKEND_CASES, assert_unchanged, backend_for, frozen, on_device


@pytest.fixture(params=BACKEND_CASES)
def case(request):
    """(backend, device) of a test case."""
    return request.param


@pytest.fixture
def device(case):
    return case[1]


@pytest.fixture
def backend(case):
    with backend_for(case) as name:
        yield name


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def _penalty_args(n=3, size=37, seed=0):
    g = _g(seed)
    grads = [torch.randn(size, generator=g) for _ in range(n)]
    params = [torch.randn(size, generator=g) for _ in range(n)]
    omega = [torch.rand(size, generator=g) for _ in range(n)]
    mu = [torch.randn(size, generator=g, dtype=torch.float64) for _ in range(n)]
    return grads, params, omega, mu


# ------------------------------------------------------------------------------------ item 5: aliasing
def test_penalty_apply_refuses_the_same_gradient_twice(backend, device):
    grads, params, omega, mu = on_device(_penalty_args(), device)
    grads[2] = grads[0]  # the race: two threads add into one buffer
    before = frozen(grads, params, omega, mu)
    with pytest.raises(ValueError, match=r"grads\[[02]\] \(written in place\) and grads\[[02]\] share memory"):
        ops.penalty_apply_(grads, params, omega, mu, 2.0, backend=backend)
    assert_unchanged(before, grads, params, omega, mu)
    # overlapping views of one buffer are refused too; disjoint views are fine (DDP bucket views)
    flat = torch.zeros(3 * 37, device=device)
    views = [flat[0:37], flat[30:67], flat[74:111]]
    with pytest.raises(ValueError, match=r"grads\[0\].*grads\[1\]|grads\[1\].*grads\[0\]"):
        ops.penalty_apply_(views, params, omega, mu, 2.0, backend=backend)
    assert torch.equal(flat, torch.zeros(3 * 37, device=device))
    disjoint = [flat[0:37], flat[37:74], flat[74:111]]
    ops.penalty_apply_(disjoint, params, omega, mu, 2.0, backend=backend)
    want, _ = reference.penalty_apply([torch.zeros(37, device=device)] * 3, params, omega, mu, 2.0)
    for got, ref in zip(disjoint, want):
        # fp32 arithmetic: a few roundings of 2^-24 each
        assert torch.allclose(got.double(), ref.to(got.device), rtol=1e-6, atol=1e-6)


def test_ops_refuse_an_output_aliasing_an_input(backend, device):
    g = _g(1)
    o64 = torch.rand(9, generator=g, dtype=torch.float64).to(device)
    f, a = torch.rand(9, generator=g).to(device), torch.randn(9, generator=g).to(device)
    before = frozen(o64, f, a)
    with pytest.raises(ValueError, match=r"(omega|mu)\[0\] \(written in place\) and (omega|mu)\[0\] share memory"):
        ops.consolidate_([o64], [o64], [f], [a], backend=backend)  # omega is mu
    assert_unchanged(before, o64, f, a)

    w, gr, p = on_device((torch.zeros(9), torch.randn(9, generator=g), torch.randn(9, generator=g)), device)
    before = frozen(w, gr, p)
    with pytest.raises(ValueError, match=r"prev_params\[0\].*params\[0\].*share memory"):
        ops.si_accumulate_([w], [gr], [p], [p], backend=backend)  # prev_params is params
    assert_unchanged(before, w, gr, p)

    s, out = torch.randn(9, generator=g).to(device), torch.zeros(9, device=device)
    before = frozen(w, p, s, out)
    with pytest.raises(ValueError, match="share memory"):
        ops.si_consolidate_([w], [p], [s], [w], 0.1, backend=backend)  # out is omega_path
    assert_unchanged(before, w, p, s, out)

    acc = torch.rand(9, generator=g).to(device)
    before = frozen(p, acc)
    with pytest.raises(ValueError, match=r"params\[0\].*old_params\[0\].*share memory"):
        ops.wva_attenuate_([p], [p], [acc], 1.0, backend=backend)
    assert_unchanged(before, p, acc)


# --------------------------------------------------------------- item 6: autograd sees in-place writes
def test_penalty_apply_on_a_tensor_saved_by_autograd_fails_the_backward(backend, device):
    """Every backend bumps the version counter of what it wrote, so autograd refuses a backward that
    would read a saved tensor modified since it was saved (as for torch's own in-place ops)."""
    _, params, omega, mu = on_device(_penalty_args(n=1), device)
    w = torch.randn(37, device=device, requires_grad=True)
    saved = w * 2  # non-leaf
    y = (saved * saved).sum()  # saves `saved` for its backward
    with torch.no_grad():
        ops.penalty_apply_([saved], params, omega, mu, 1.0, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.backward()


def test_wva_attenuate_refuses_a_leaf_requiring_grad_outside_no_grad(backend, device):
    g = _g(2)
    p = torch.randn(11, generator=g).to(device).requires_grad_()
    old, acc = torch.randn(11, generator=g).to(device), torch.rand(11, generator=g).to(device)
    before = frozen(p, old, acc)
    with pytest.raises(RuntimeError, match=r"params\[0\] is a leaf Variable that requires grad.*torch.no_grad"):
        ops.wva_attenuate_([p], [old], [acc], 1.0, backend=backend)
    assert_unchanged(before, p, old, acc)
    (want,) = reference.wva_attenuate([p], [old], [acc], 1.0)
    with torch.no_grad():  # allowed there, like torch's in-place ops
        ops.wva_attenuate_([p], [old], [acc], 1.0, backend=backend)
    # fp32 arithmetic: about 4 roundings of 2^-24 relative each
    assert torch.allclose(p.detach().double(), want.to(p.device), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- item 7: fp32 overflow
def test_consolidate_refuses_an_importance_sum_that_overflows_fp32(backend, device):
    omega, mu = [torch.full((5,), 2e38, device=device)], [torch.zeros(5, dtype=torch.float64, device=device)]
    fisher, anchor = [torch.full((5,), 2e38, device=device)], [torch.ones(5, device=device)]  # the sum overflows fp32
    before = frozen(omega, mu, fisher, anchor)
    with pytest.raises(ValueError, match=r"overflows its dtype.*float64"):
        ops.consolidate_(omega, mu, fisher, anchor, backend=backend)
    assert_unchanged(before, omega, mu, fisher, anchor)
    # with fp64 state the same merge is exact
    o64 = [omega[0].double()]
    ops.consolidate_(o64, mu, fisher, anchor, backend=backend)
    assert torch.equal(o64[0].cpu(), torch.full((5,), 2 * float(torch.tensor(2e38)), dtype=torch.float64))


# ------------------------------------------------------------------- item 9: validated before writing
def test_penalty_apply_refuses_an_expanded_gradient_before_writing_any(backend, device):
    grads, params, omega, mu = on_device(_penalty_args(), device)
    grads[2] = torch.zeros(1, device=device).expand(37)  # stride 0: 37 elements share one float
    before = frozen(grads, params, omega, mu)
    with pytest.raises(ValueError, match=r"grads\[2\].*share memory.*expand"):
        ops.penalty_apply_(grads, params, omega, mu, 2.0, backend=backend)
    assert_unchanged(before, grads, params, omega, mu)  # grads[0] and grads[1] untouched


def test_ops_refuse_sparse_tensors_with_a_fix(backend, device):
    grads, params, omega, mu = on_device(_penalty_args(n=2), device)
    grads[1] = grads[1].to_sparse()
    before = frozen(grads, params, omega, mu)
    with pytest.raises(TypeError, match=r"grads\[1\] has layout torch.sparse_coo.*dense"):
        ops.penalty_apply_(grads, params, omega, mu, 2.0, backend=backend)
    assert_unchanged(before, grads, params, omega, mu)


# ------------------------------------------------- items 5, 6, 9 for the per-sample statistics ops
def test_persample_ops_refuse_expanded_outputs_and_bump_versions(backend, device):
    g = _g(3)
    G, A = on_device((torch.randn(2, 3, 4, generator=g), torch.randn(2, 3, 5, generator=g)), device)
    # conv: O=3, C=2, k=2
    Gc, Ac = on_device((torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 2, 5, 5, generator=g)), device)
    for call, shape in (
        (lambda sq, ab: ops.persample_sq_(sq, ab, G, A, backend=backend), (4, 5)),
        (lambda sq, ab: ops.persample_conv_sq_(sq, ab, Gc, Ac, backend=backend), (3, 2, 2, 2)),
    ):
        ab = torch.zeros(shape, device=device)
        expanded = torch.zeros(1, device=device).expand(shape)
        before = frozen(ab, G, A, Gc, Ac)
        with pytest.raises(ValueError, match=r"sq_out is written in place but several of its elements share memory"):
            call(expanded, ab)
        assert_unchanged(before, ab, G, A, Gc, Ac)
        # an output saved by autograd: the write bumps its version, so the backward refuses
        w = torch.randn(shape, device=device, requires_grad=True)
        sq = w * 1.0
        y = (sq * sq).sum()
        with torch.no_grad():
            call(sq, None)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.backward()
