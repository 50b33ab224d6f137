"""estimate_importance: state restoration, clear errors, MC-vs-exact Fisher, tuple inputs and early stop."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jacrev, vmap

import ewc_fast
from ewc_fast.testing.importance import reference_importance
from tests.helpers import data_of, mlp, rel

pytestmark = pytest.mark.usefixtures("one_thread")


def hooks_left(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


def snapshot(model):
    return (
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.grad for p in model.parameters()],
    )


# --------------------------------------------------------------------------------------- state
def _prepared_model():
    model = mlp()
    model.train()
    model[2].eval()
    model[0].bias.requires_grad_(False)
    model[3].weight.grad = torch.full_like(model[3].weight, 7.0)
    return model


def test_state_restored_after_success_and_eval_mode_used():
    model = _prepared_model()
    before = snapshot(model)
    data = data_of()
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas", "sig"), progress=False)
    after = snapshot(model)
    assert before[0] == after[0] and before[1] == after[1]
    assert all(a is b for a, b in zip(before[2], after[2]))
    assert hooks_left(model) == 0
    ref = reference_importance(model, data, ("fisher",))  # the oracle runs in eval mode: dropout off
    assert "0.bias" not in res["fisher"]
    for k in ref["fisher"]:
        assert rel(res["fisher"][k], ref["fisher"][k]) <= 1e-5


class Boom(Exception):
    pass


@pytest.mark.parametrize("where", ["loss", "forward"])
def test_state_restored_after_exception_mid_pass(where):
    model = _prepared_model()
    before = snapshot(model)
    calls = {"n": 0}

    def bad_loss(out, y):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Boom("loss failed in the middle of the pass")
        return F.cross_entropy(out, y, reduction="none")

    if where == "forward":
        orig = model[1].forward

        def bad_forward(x):  # raise inside the model, after hooked modules already ran this batch
            calls["n"] += 1
            if calls["n"] == 3:
                raise Boom("forward failed in the middle of the pass")
            return orig(x)

        model[1].forward = bad_forward
    with pytest.raises(Boom):
        ewc_fast.estimate_importance(
            model, data_of(), ("fisher", "mas"), progress=False, loss_fn=bad_loss if where == "loss" else None
        )
    after = snapshot(model)
    assert before[0] == after[0] and before[1] == after[1]
    assert all(a is b for a, b in zip(before[2], after[2]))
    assert hooks_left(model) == 0


# -------------------------------------------------------------------------------------- errors
def test_errors_are_clear():
    model = mlp()
    data = data_of()
    with pytest.raises(ValueError, match="no samples"):
        ewc_fast.estimate_importance(model, [], "fisher", progress=False)
    with pytest.raises(ValueError, match="no samples"):
        ewc_fast.estimate_importance(
            model, [(torch.zeros(0, 6), torch.zeros(0, dtype=torch.long))], "fisher", progress=False
        )
    frozen = mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        ewc_fast.estimate_importance(frozen, data, "fisher", progress=False)
    with pytest.raises(ValueError, match="unknown importance method 'fishr'.*fisher_exact"):
        ewc_fast.estimate_importance(model, data, ("fisher", "fishr"), progress=False)
    reg = nn.Sequential(nn.Linear(6, 1), nn.Flatten(0))  # outputs (N,): not classification
    for m in ("fisher_exact", "fisher_mc"):
        with pytest.raises(ValueError, match=m):
            ewc_fast.estimate_importance(reg, data, m, progress=False)
    seq = nn.Linear(6, 3)
    with pytest.raises(ValueError, match="fisher_exact needs classification outputs"):
        ewc_fast.estimate_importance(seq, [torch.randn(2, 4, 6)], "fisher_exact", progress=False)
    with pytest.raises(ValueError, match="no targets"):
        ewc_fast.estimate_importance(model, [x for x, _ in data], "fisher", progress=False)
    ok = ewc_fast.estimate_importance(model, [x for x, _ in data], ("mas", "fisher_mc"), progress=False)
    assert ok["mas"].n_samples == 8
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ewc_fast.estimate_importance(model, data, "fisher", loss_fn=lambda o, y: F.cross_entropy(o, y), progress=False)
    with pytest.raises(ValueError, match="device meta"):
        ewc_fast.estimate_importance(
            model, [(torch.randn(2, 6, device="meta"), torch.zeros(2, dtype=torch.long))], "fisher", progress=False
        )
    with pytest.raises(ValueError, match="mc_samples"):
        ewc_fast.estimate_importance(model, data, "fisher_mc", mc_samples=0, progress=False)
    with pytest.raises(ValueError, match="mas_output"):
        ewc_fast.estimate_importance(model, data, "mas", mas_output="probs", progress=False)
    bn = nn.Sequential(nn.Linear(6, 3), nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(ValueError, match="running statistics"):
        ewc_fast.estimate_importance(bn, data, "fisher", progress=False)
    assert hooks_left(model) == 0 and hooks_left(bn) == 0


def test_non_finite_outputs_and_losses_name_the_batch():
    data = data_of()
    data[1][0][0, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite.*outputs in batch 1"):
        ewc_fast.estimate_importance(mlp(), data, "fisher", progress=False)
    n = {"k": 0}

    def inf_loss(out, y):
        n["k"] += 1
        loss = F.cross_entropy(out, y, reduction="none")
        return loss * float("inf") if n["k"] == 3 else loss

    with pytest.raises(ValueError, match="non-finite.*loss in batch 2"):
        ewc_fast.estimate_importance(mlp(), data_of(), "fisher", loss_fn=inf_loss, progress=False)


def test_progress_bar(capsys):
    res = ewc_fast.estimate_importance(mlp(), data_of(), "fisher", progress=True)
    assert res["fisher"].n_samples == 8
    assert "importance" in capsys.readouterr().err


# ------------------------------------------------------------------------ MC vs exact Fisher
def test_mc_fisher_consistent_with_exact_fisher():
    """F_mc - F_exact = (1/N) sum_n [(1/K) sum_k v_{n,y_k} - mu_n] with v_ny = g_ny^2 elementwise, so
    its exact standard deviation is sigma = sqrt(sum_n Var_n / K) / N, Var_n = sum_y p_ny v_ny^2 - mu_n^2
    (computed in float64 from the per-class per-sample gradients). Each element must lie within 6 sigma
    (plus fp32 rounding); with ~60 elements the chance of a false failure is < 1e-7 (CLT over N*K = 2000
    draws). The mean deviation over elements must also be small in sigma units (no systematic bias)."""
    model = mlp(n_in=4, n_out=3, seed=5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g)
    data = [x[:6], x[6:]]
    K = 200
    res = ewc_fast.estimate_importance(
        model,
        data,
        ("fisher_mc", "fisher_exact"),
        mc_samples=K,
        backend="torch",
        generator=torch.Generator().manual_seed(1),
        progress=False,
    )
    m64 = __import__("copy").deepcopy(model).double().eval()
    params = {k: p.detach() for k, p in m64.named_parameters()}
    J = vmap(jacrev(lambda p, xx: torch.log_softmax(functional_call(m64, p, (xx[None],))[0], -1)), in_dims=(None, 0))(
        params, x.double()
    )
    probs = torch.softmax(m64(x.double()), -1).detach()
    N = x.shape[0]
    z = []
    for k in params:
        v = J[k].square()  # (N, C, *shape)
        p = probs.reshape(probs.shape + (1,) * (v.dim() - 2))
        mu = (p * v).sum(1)
        var = (p * v.square()).sum(1) - mu.square()
        exact = mu.mean(0)
        sigma = var.clamp(min=0).sum(0).sqrt() / (N * math.sqrt(K))
        assert rel(res["fisher_exact"][k], exact) <= 1e-5
        dev = (res["fisher_mc"][k].double() - exact).abs()
        assert bool((dev <= 6 * sigma + 1e-6 * exact.abs().max()).all()), (k, float((dev / sigma).max()))
        z.append(((res["fisher_mc"][k].double() - exact) / sigma.clamp(min=1e-30))[sigma > 0].flatten())
    z = torch.cat(z)
    assert abs(float(z.mean())) <= 6 / math.sqrt(len(params))  # elements are correlated: loose, still a bias check
    assert res["fisher_mc"].meta["mc_samples"] == K


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(6, 4), nn.Linear(2, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x, z):
        return self.out(torch.tanh(self.a(x) + self.b(z)))


def test_tuple_inputs_and_early_stop():
    torch.manual_seed(0)
    model = TwoInputs()
    x, z, y = torch.randn(8, 6), torch.randn(8, 2), torch.randint(0, 3, (8,))
    pulled = []

    def batches():
        for s in range(0, 8, 3):
            pulled.append(s)
            yield (x[s : s + 3], z[s : s + 3]), y[s : s + 3]

    res = ewc_fast.estimate_importance(model, batches(), "fisher", n_samples=5, progress=False)
    assert res["fisher"].n_samples == 5 and pulled == [0, 3]  # no third batch was loaded

    class Wrap(nn.Module):  # the oracle passes one tensor: pack (x, z) into one input
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, xz):
            return self.inner(xz[:, :6], xz[:, 6:])

    ref = reference_importance(Wrap(model), [(torch.cat([x, z], 1)[:5], y[:5])], "fisher")
    for k in res["fisher"]:
        assert rel(res["fisher"][k], ref["fisher"]["inner." + k]) <= 1e-5
    with pytest.raises(TypeError, match="iterable of batches"):
        ewc_fast.estimate_importance(model, x, "fisher", progress=False)


# ------------------------------------------------------------------------------ first-batch plan
class EinsumHead(nn.Module):
    """A parameter used in ``torch.einsum``: no rule serves it (the torch.func fallback re-runs this module)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4) * 0.5)

    def forward(self, h):
        return torch.einsum("ni,oi->no", h, self.w)


class CountingNet(nn.Module):
    """Linear, Tanh, then a Linear head or (``einsum=True``) :class:`EinsumHead`; counts its forwards."""

    def __init__(self, einsum: bool):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(6, 4)
        self.out = EinsumHead() if einsum else nn.Linear(4, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.out(torch.tanh(self.lin(x)))


@pytest.mark.parametrize("einsum", [False, True], ids=["rules", "fallback"])
def test_the_first_batch_forward_also_discovers_the_plan(einsum):
    """The plan is discovered in the first batch's own forward: a model served by rules runs one forward
    per batch; one that needs the fallback re-runs its first batch under the plan. Both exact (fp32 sums
    of a few terms against the float64 oracle: far inside 1e-5)."""
    model = CountingNet(einsum)
    data = data_of(sizes=(3, 1, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the fallback's one-time slowness warning
        res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    assert model.calls == len(data) + (1 if einsum else 0)
    assert (res["fisher"].meta["fallback"] != {}) == einsum
    assert hooks_left(model) == 0
    ref = reference_importance(model, data, ("fisher", "mas"))
    for m in ("fisher", "mas"):
        for k in ref[m]:
            assert rel(res[m][k], ref[m][k]) <= 1e-5, (m, k)
