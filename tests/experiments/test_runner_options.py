"""Runner options of ewc_fast.experiments.continual: SGD (momentum, clipping), EWC anchoring
modes, multi-head (task-incremental) outputs — each against a hand computation."""

import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ewc_fast.experiments import continual as C
from ewc_fast.experiments.data import MNIST
from ewc_fast.experiments.strategies import METHODS, EWCStrategy, SIStrategy, Strategy, WVAStrategy, make_strategy
from ewc_fast.experiments.tasks import head_outputs, split_tasks, with_heads
from ewc_fast.experiments.training import estimate, evaluate, make_optimizer, train_task


def _data(n_train=200, n_test=60, seed=0):
    rng = np.random.default_rng(seed)
    return MNIST(
        rng.random((n_train, 784), dtype=np.float32),
        rng.integers(0, 10, n_train).astype(np.int64),
        rng.random((n_test, 784), dtype=np.float32),
        rng.integers(0, 10, n_test).astype(np.int64),
        "synthetic",
    )


def test_run_config_rejects_bad_options():
    with pytest.raises(ValueError, match="optimizer"):
        C.RunConfig(optimizer="rmsprop")
    with pytest.raises(ValueError, match="--optimizer sgd"):
        C.RunConfig(momentum=0.9)  # Adam has no momentum option
    with pytest.raises(ValueError, match="momentum"):
        C.RunConfig(optimizer="sgd", momentum=1.0)
    with pytest.raises(ValueError, match="clip"):
        C.RunConfig(clip_norm=0.0)
    with pytest.raises(ValueError, match="anchor"):
        C.RunConfig(anchor="first")


def test_sgd_momentum_clipped_step_matches_hand_computation():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    cfg = C.RunConfig(optimizer="sgd", lr=0.1, momentum=0.9, clip_norm=0.05, batch_size=8, epochs=2)
    opt = make_optimizer(model, cfg)
    assert isinstance(opt, torch.optim.SGD) and opt.defaults["momentum"] == 0.9
    # hand: two full-batch steps (one batch per epoch) of heavy-ball SGD on the clipped gradient
    w = [p.detach().clone().double() for p in model.parameters()]
    buf = None
    for _ in range(2):
        wt = [t.clone().requires_grad_(True) for t in w]
        loss = F.cross_entropy(x.double() @ wt[0].T + wt[1], y)
        g = torch.autograd.grad(loss, wt)
        norm = torch.sqrt(sum((t**2).sum() for t in g))
        g = [t * min(1.0, 0.05 / (float(norm) + 1e-6)) for t in g]  # clip_grad_norm_'s formula
        buf = g if buf is None else [0.9 * b + t for b, t in zip(buf, g)]
        w = [t - 0.1 * b for t, b in zip(w, buf)]
    train_task(model, opt, x, y, cfg, generator=torch.Generator().manual_seed(0))
    for p, ref in zip(model.parameters(), w):
        # fp32 training vs the fp64 hand computation: two steps of size ≤ 0.1·0.05·2, rounding ~1e-7
        torch.testing.assert_close(p.detach().double(), ref, rtol=0, atol=1e-6)


@pytest.mark.parametrize("anchor", ["all", "previous", "latest"])
def test_anchor_modes_penalty(anchor):
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    lam = 3.0
    cfg = C.RunConfig(method="l2", lam=lam, anchor=anchor)  # Ω = 1 for every entry
    strat = make_strategy(model, cfg)
    anchors = []
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    for _ in range(2):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        anchors.append([p.detach().clone().double() for p in model.parameters()])
        strat.end_task(x, y, None)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    theta = [p.detach().double() for p in model.parameters()]

    def sq(a, b, weight=1.0):
        return weight * sum(((t - m) ** 2).sum() for t, m in zip(a, b))

    expected = {
        "all": lam / 2 * (sq(theta, anchors[0]) + sq(theta, anchors[1])),
        "previous": lam / 2 * sq(theta, anchors[1]),
        "latest": lam / 2 * sq(theta, anchors[1], 2.0),  # Ω summed over the two tasks, latest anchor
    }[anchor]
    # the "all" value carries the constant c of the completed square in fp64: relative 1e-6 covers fp32 θ
    torch.testing.assert_close(strat.ewc.penalty().double(), expected, rtol=1e-6, atol=0)


def test_every_method_has_its_strategy_and_unknown_is_refused():
    model = nn.Linear(4, 2)
    kinds = {"none": Strategy, "l2": EWCStrategy, "si": SIStrategy, "wva": WVAStrategy}
    for m in METHODS:
        strat = make_strategy(model, C.RunConfig(method=m, lam=1.0))
        assert type(strat) is kinds.get(m, EWCStrategy), m
        if m in C.IMPORTANCE_METHODS:
            assert strat.importance_method == m
    assert make_strategy(model, C.RunConfig(method="l2")).importance_method is None
    cfg = C.RunConfig()
    cfg.method = "ewc++"  # set after RunConfig's own check: make_strategy must still refuse it
    with pytest.raises(ValueError, match="ewc\\+\\+"):
        make_strategy(model, cfg)


def test_end_task_times_importance_then_consolidates():
    torch.manual_seed(0)
    model = nn.Linear(4, 2)
    strat = make_strategy(model, C.RunConfig(method="fisher", lam=2.0))
    x, y = torch.randn(6, 4), torch.randint(0, 2, (6,))
    dt = strat.end_task(x, y, None)
    assert dt > 0.0
    ref = estimate(model, x, y, ("fisher",), strat.cfg)["fisher"]
    with torch.no_grad():
        model.weight.add_(1.0)
    # one anchor at the parameters of end_task with Ω = the Fisher there: penalty (λ/2)·ΣΩ·1²
    torch.testing.assert_close(strat.ewc.penalty().double(), ref["weight"].double().sum(), rtol=1e-6, atol=0)


def test_multi_head_tasks_and_importance():
    tasks = with_heads(split_tasks(3))
    assert [t.head for t in tasks] == [(0, 1), (2, 3), (4, 5)] and all(t.relabel for t in tasks)
    assert head_outputs(tasks, 10) == 6
    perm = with_heads(C.build_tasks("permuted", 3, 0))
    assert [t.head for t in perm] == [tuple(range(10 * k, 10 * k + 10)) for k in range(3)]
    assert head_outputs(perm, 10) == 30
    out = torch.arange(12.0).view(2, 6)
    assert torch.equal(tasks[1].logits(out), out[:, [2, 3]])

    torch.manual_seed(0)
    model = nn.Linear(784, 10)
    d = _data()
    x, y = tasks[1].apply(torch.from_numpy(d.x_train), torch.from_numpy(d.y_train))
    assert set(y.tolist()) <= {0, 1}
    cfg = C.RunConfig(importance_batch=17)
    imp = estimate(model, x, y, ("fisher", "fisher_exact"), cfg, task=tasks[1])
    for m in ("fisher", "fisher_exact"):
        w = imp[m]["weight"]
        assert bool((w[[2, 3]] > 0).all())
        assert float(w[[0, 1, 4, 5, 6, 7, 8, 9]].abs().max()) == 0.0  # other heads get no gradient
    # evaluation scores the head only: a huge logit on a column outside the head changes nothing
    with torch.no_grad():
        model.bias[9] = 1e6
    acc, loss = evaluate(model, torch.from_numpy(d.x_test), torch.from_numpy(d.y_test), tasks[1])
    assert np.isfinite(loss) and 0.0 <= acc <= 1.0
    with torch.no_grad():
        logits = model(tasks[1].apply(torch.from_numpy(d.x_test), torch.from_numpy(d.y_test))[0])[:, [2, 3]]
    yt = tasks[1].apply(torch.from_numpy(d.x_test), torch.from_numpy(d.y_test))[1]
    assert acc == pytest.approx(float((logits.argmax(1) == yt).double().mean()))


def test_multi_head_run_keeps_other_heads_under_plain_sgd():
    """Task-incremental with plain SGD: task 2's training never touches task 1's output rows."""
    d = _data()
    cfg = C.RunConfig(
        method="fisher",
        lam=10.0,
        model="small-mlp",
        optimizer="sgd",
        lr=0.05,
        epochs=1,
        batch_size=50,
        n_importance=50,
        multi_head=True,
        eval_every_epoch=False,
    )
    snap = {}

    def on_task_end(stage, model, x_imp, y_imp, strategy):
        snap[stage] = model.out.weight.detach().clone()

    res = C.run_sequence(d, split_tasks(2), cfg, seed=0, on_task_end=on_task_end)
    assert np.asarray(res.R).shape == (2, 2)
    assert torch.equal(snap[0][[0, 1]], snap[1][[0, 1]])
    assert not torch.equal(snap[0][[2, 3]], snap[1][[2, 3]])
    assert dataclasses.asdict(cfg)["multi_head"] is True
