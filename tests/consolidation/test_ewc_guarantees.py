"""EWC under bad and unusual input: a correct result, or a clear error with every piece of state
(parameters, gradients, Omega, mu, c, task count) bit-identical to before the call
(docs/GUARANTEES.md, "EWC"). References are float64 loops of the penalty's definition."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ewc_fast import EWC, Importance
from tests.helpers import assert_unchanged, frozen


def _model(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).to(dtype)


def _importance(model, scale=3.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Importance(
        {n: (torch.rand(p.shape, generator=g) * scale).to(p.dtype) for n, p in model.named_parameters()},
        method="fisher",
        n_samples=1,
    )


def _consolidated(model, lam=2.0, tasks=2, state_dtype=torch.float32):
    ewc = EWC(model, lam, state_dtype=state_dtype)
    refs = []
    for t in range(tasks):
        imp = _importance(model, seed=t + 1)
        ewc.consolidate(imp)
        refs.append(
            (
                {n: v.double() for n, v in imp.items()},
                {n: p.detach().double().clone() for n, p in model.named_parameters()},
            )
        )
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    return ewc, refs


def _reference(model, refs, lam):
    """float64 sum of per-task penalties (lam/2) F (theta - theta*)^2 and its gradient."""
    value, grads = 0.0, {n: torch.zeros(p.shape, dtype=torch.float64) for n, p in model.named_parameters()}
    for fisher, anchor in refs:
        for n, p in model.named_parameters():
            d = p.detach().double() - anchor[n]
            value += 0.5 * lam * float((fisher[n] * d * d).sum())
            grads[n] += lam * fisher[n] * d
    return value, grads


# ------------------------------------------------------------------------------ item 4: backward twice
def test_penalty_backward_twice_without_retain_graph_raises_like_torch_ops():
    model = _model()
    ewc, _ = _consolidated(model)
    pen = ewc.penalty()
    pen.backward()
    before = frozen(model, ewc)
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        pen.backward()
    assert_unchanged(before, model, ewc)  # .grad not doubled
    # with retain_graph the second backward adds the gradient again, as for torch ops
    model.zero_grad(set_to_none=True)
    pen = ewc.penalty()
    pen.backward(retain_graph=True)
    once = [p.grad.clone() for p in model.parameters()]
    pen.backward()
    assert all(torch.equal(p.grad, 2 * g) for p, g in zip(model.parameters(), once))


# ------------------------------------------------------------------- item 9: expanded user .grad
def test_apply_refuses_an_expanded_grad_before_any_change():
    model = _model()
    ewc, _ = _consolidated(model)
    params = list(model.parameters())
    params[0].grad = torch.ones_like(params[0])
    params[3].grad = torch.zeros(1).expand(params[3].shape)  # stride 0, as a user may assign it
    # params[1], params[2]: .grad None (apply_ would create zeros first)
    before = frozen(model, ewc)
    with pytest.raises(ValueError, match=r"grads\[3\].*share memory.*expand"):
        ewc.apply_()
    assert_unchanged(before, model, ewc)
    assert params[1].grad is None and params[2].grad is None


# --------------------------------------------------------------------------- item 12: sparse .grad
def test_apply_refuses_a_sparse_grad_with_a_clear_message():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 2))
    ewc = EWC(model, 1.0).consolidate(_importance(model))
    with torch.no_grad():
        model[0].weight.add_(0.1)
    model(torch.tensor([[1, 2, 2]])).sum().backward()
    assert model[0].weight.grad.layout == torch.sparse_coo
    before = frozen(model, ewc)
    with pytest.raises(TypeError, match=r"'0.weight' has a torch.sparse_coo \.grad.*EWC.penalty\(\).*sparse=False"):
        ewc.apply_()
    assert_unchanged(before, model, ewc)


# --------------------------------------------------------------------- item 11: fp16 penalty value
def test_fp16_model_penalty_value_is_returned_in_fp32():
    model = _model(torch.float16)
    lam = 1.0e6  # the penalty is ~2e6, far above fp16's largest finite value 65504
    ewc, refs = _consolidated(model, lam=lam)
    want, _ = _reference(model, refs, lam)
    assert want > 65504
    pen = ewc.penalty()
    assert pen.dtype == torch.float32
    # fp32 arithmetic of fp16 data (exact in fp32) and fp64 anchors: sums of < 100 terms, ~1e-6
    assert abs(float(pen) - want) <= 1e-5 * want
    assert abs(float(ewc.apply_()) - want) <= 1e-5 * want
    pen.backward()  # the gradient reaches the fp16 parameters in their dtype
    assert all(p.grad.dtype == torch.float16 for p in model.parameters())


# -------------------------------------------------------------------------- item 10: load_state_dict
@pytest.mark.parametrize(
    "field, value, match",
    [
        ("n_tasks", 0, "n_tasks is 0 but the state has"),
        ("c", -1.0, "c must be >= 0"),
        ("c", float("nan"), "c must be finite"),
        ("omega", "nan", r"omega\[.*NaN/Inf"),
        ("omega", "neg", r"omega\[.*negative"),
        ("mu", "inf", r"mu\[.*NaN/Inf"),
        ("mu", "f32", r"mu\[.*dtype torch.float32"),
        ("omega", "shape", r"omega\[.*shape"),
        ("lam", -2.0, "lam must be >= 0"),
        ("gamma", 0.0, "gamma must be > 0"),
    ],
)
def test_load_state_dict_refuses_inconsistent_fields_before_any_change(field, value, match):
    model = _model()
    ewc, _ = _consolidated(model)
    state = ewc.state_dict()
    bad = dict(state)
    first = state["names"][0]
    if field in ("omega", "mu"):
        entries = dict(state[field])
        t = entries[first].clone()
        if value == "nan":
            t[0] = float("nan")
        elif value == "inf":
            t[0] = float("inf")
        elif value == "neg":
            t[0] = -1.0
        elif value == "f32":
            t = t.float()
        elif value == "shape":
            t = t.reshape(-1)[:-1]
        entries[first] = t
        bad[field] = entries
    else:
        bad[field] = value
    other = EWC(model, 7.0, mode="online")  # a different state, which must survive the refusal
    other.consolidate(_importance(model, seed=9))
    before = frozen(model, other)
    with pytest.raises((ValueError, TypeError), match=match):
        other.load_state_dict(bad)
    assert_unchanged(before, model, other)
    online = dict(state, mode="online")  # separate-mode c != 0 cannot be an online state
    with pytest.raises(ValueError, match="c must be 0 in online mode"):
        other.load_state_dict(online)
    assert_unchanged(before, model, other)


# ------------------------------------------------------------ item 8: parameters change dtype / shape
def test_dtype_change_after_consolidate_is_followed_exactly():
    """EWC looks parameters up by name at every call and keeps Omega/mu in its own dtypes, so a model
    converted with .double() after consolidate() is penalised in fp64 arithmetic (documented)."""
    model = _model()
    lam = 3.0
    ewc, refs = _consolidated(model, lam=lam, state_dtype=torch.float64)  # Omega exact: isolate the arithmetic
    model.double()
    want_v, want_g = _reference(model, refs, lam)
    model.zero_grad(set_to_none=True)
    pen = ewc.penalty()
    assert pen.dtype == torch.float64
    pen.backward()
    # fp64 arithmetic throughout: a few fp64 roundings
    assert abs(pen.item() - want_v) <= 1e-12 * want_v
    for n, p in model.named_parameters():
        assert p.grad.dtype == torch.float64
        assert torch.allclose(p.grad, want_g[n], rtol=1e-12, atol=1e-14), n


def test_shape_change_after_consolidate_is_refused_before_any_change():
    model = _model()
    ewc, _ = _consolidated(model)
    model[2] = nn.Linear(4, 5)  # same name '2.weight', another shape
    before = frozen(model, ewc)
    for call in (ewc.penalty, ewc.apply_):
        with pytest.raises(RuntimeError, match=r"'2.weight' now has shape \(5, 4\), its EWC state \(3, 4\)"):
            call()
        assert_unchanged(before, model, ewc)


# ------------------------------------------------------------------------- item 7: fp32 overflow
def test_consolidate_refuses_an_overflowing_importance_sum_before_any_change():
    model = _model()
    ewc = EWC(model, 1.0)
    huge = Importance({n: torch.full(p.shape, 2e38) for n, p in model.named_parameters()}, method="fisher", n_samples=1)
    ewc.consolidate(huge)
    before = frozen(model, ewc)
    with pytest.raises(ValueError, match=r"'0.weight' reaches 4.000e\+38, which overflows float32"):
        ewc.consolidate(huge)
    assert_unchanged(before, model, ewc)
    assert ewc.penalty().item() == 0.0  # at the anchor: 0, not NaN
    # fp32 parameters compute the penalty in fp32, so fp64 state does not help them: refused as well
    ewc64 = EWC(model, 1.0, state_dtype=torch.float64).consolidate(huge)
    with pytest.raises(ValueError, match="overflows float32, the kernels' arithmetic for torch.float32 parameters"):
        ewc64.consolidate(huge)
    assert ewc64.penalty().item() == 0.0
    # fp64 parameters with fp64 state: the merge is exact
    model.double()
    ewc64 = EWC(model, 1.0, state_dtype=torch.float64).consolidate(huge).consolidate(huge)
    assert ewc64.penalty().item() == 0.0 and all(
        bool((o == 2 * float(torch.tensor(2e38))).all()) for o in ewc64.omega.values()
    )
