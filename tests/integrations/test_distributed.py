"""The Consolidator under real DDP (torch.distributed, gloo, 2 processes): every rank applies the same
penalty and SI step, the task-end importance on each rank's shard is all-reduced, and the result is the
single process's on the union of the shards."""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import ewc_fast
from ewc_fast.integrations.common import Consolidator
from tests.helpers import mlp, spawn_gloo

pytestmark = pytest.mark.usefixtures("one_thread")


def _data(seed=11):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 8, 6, generator=g)  # 4 steps x (2 ranks x 4 samples)
    return x, torch.randint(0, 3, (4, 8), generator=g)


def _setup():
    model = mlp(seed=3).eval()  # no dropout: ranks and the single process compute the same function
    ewc = ewc_fast.EWC(model, lam=5.0)
    ewc.consolidate(
        ewc_fast.Importance({n: torch.rand_like(p) for n, p in model.named_parameters()}, method="x", n_samples=1)
    )
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2)
    si = ewc_fast.SynapticIntelligence(model)
    return model, Consolidator(ewc=ewc, si=si, importance="si"), Consolidator(ewc=ewc, importance="fisher")


def _train(model, net, cons, end, batches):
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    cons.attach(opt)
    for x, y in batches:
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        cons.before_step(opt)
        opt.step()
    cons.detach()
    cons.end_task(model)  # SI -> EWC
    end.end_task(model, batches)  # then the Fisher of the data seen -> EWC


def _worker(rank, world, path):
    model, cons, end = _setup()
    x, y = _data()
    shard = [(x[s, rank * 4 : rank * 4 + 4], y[s, rank * 4 : rank * 4 + 4]) for s in range(4)]
    _train(model, DistributedDataParallel(model), cons, end, shard)
    torch.save({"params": dict(model.state_dict()), "ewc": cons.ewc.state_dict()}, f"{path}.{rank}")


def test_two_ddp_ranks_equal_one_process_on_the_union():
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "res")
        spawn_gloo(_worker, 2, path)
        ranks = [torch.load(f"{path}.{r}", weights_only=True) for r in range(2)]
    model, cons, end = _setup()
    x, y = _data()
    _train(model, model, cons, end, [(x[s], y[s]) for s in range(4)])
    for k, t in model.state_dict().items():
        assert torch.equal(ranks[0]["params"][k], ranks[1]["params"][k]), k  # ranks stay in sync
        # DDP averages the two shard gradients, the single process takes the mean over 8: fp32 order
        torch.testing.assert_close(ranks[0]["params"][k], t, rtol=1e-5, atol=1e-6)
    assert ranks[0]["ewc"]["n_tasks"] == cons.ewc.n_tasks == 3
    for key in ("omega", "mu"):
        for n, t in cons.ewc.state_dict()[key].items():
            assert torch.equal(ranks[0]["ewc"][key][n], ranks[1]["ewc"][key][n]), (key, n)
            torch.testing.assert_close(ranks[0]["ewc"][key][n], t, rtol=1e-5, atol=1e-7)
