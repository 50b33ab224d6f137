"""The training-trajectory measures of ewc_fast.experiments.trackers against a hand-made trajectory."""

import torch
from torch import nn

from ewc_fast.experiments.trackers import TrajectoryTracker, inverse_magnitude


def test_tracker_counts_a_known_trajectory():
    # one parameter of 3 entries; plain SGD with lr 1 and hand-set gradients gives the steps −g
    model = nn.Module()
    model.w = nn.Parameter(torch.tensor([1.0, -0.5, 2.0]))
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    tr = TrajectoryTracker(model).attach(opt)
    steps = [torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-1.0, 1.0, 0.5]), torch.tensor([-1.5, 0.0, -0.25])]
    w = [model.w.detach().clone()]
    for g in steps:
        model.w.grad = g.clone()
        opt.step()
        w.append(model.w.detach().clone())
    tr.detach()
    dw = [w[s + 1] - w[s] for s in range(3)]
    flips = sum(((w[s] * w[s + 1]) < 0).float() for s in range(3))
    dws = sum(((dw[s - 1] * dw[s]) < 0).float() for s in range(1, 3))
    total = sum(d.abs() for d in dw)
    imp = tr.importances()
    assert torch.equal(imp["sign_flips"]["w"], flips)
    assert torch.equal(imp["dw_sign_changes"]["w"], dws)
    torch.testing.assert_close(imp["abs_change"]["w"], total, rtol=0, atol=0)
    assert flips.tolist() == [1.0, 2.0, 0.0] and dws.tolist() == [1.0, 1.0, 1.0]
    assert tr.steps == 3
    # detached: further steps are not counted
    model.w.grad = torch.ones(3)
    opt.step()
    assert torch.equal(tr.importances()["abs_change"]["w"], total)


def test_inverse_magnitude():
    lin = nn.Linear(2, 2)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[0.5, -2.0], [0.0, 4.0]]))
    imp = inverse_magnitude(lin)
    assert imp["weight"].tolist() == [[2.0, 0.5], [float("inf"), 0.25]]
