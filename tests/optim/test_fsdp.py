"""The fused optimizer on an FSDP2-sharded model (``fully_shard``, gloo, 2 processes) equals one process
on the union of the data: each rank steps its local shards (state laid out like the parameters), the
penalty value is summed over ranks.

Tolerance: the sharded run differs from the single process only in summation order (task gradients
averaged by FSDP's reduce-scatter, the penalty value a sum of per-rank partial sums): a few fp32 ulps
per step over 3 Adam steps; 1e-5 relative to the tensor's largest element.
"""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ewc_fast
from ewc_fast import optim
from tests.helpers import spawn_gloo

N, D, C = 8, 6, 3
STEPS = 3
REL = 1e-5


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Linear(D, 5), nn.Linear(5, C)])

    def forward(self, x):
        return self.blocks[1](torch.tanh(self.blocks[0](x)))


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, D, generator=g), torch.randint(0, C, (N,), generator=g)


def run(model, x, y, world):
    ewc = ewc_fast.EWC(model, lam=2.0)
    ewc.consolidate({n: torch.full_like(p, 0.5) for n, p in model.named_parameters()})
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.1)
    si = ewc_fast.SynapticIntelligence(model)
    opt = optim.AdamW(model.parameters(), lr=0.01, ewc=ewc, si=si, backend="cpp")
    values = []
    for _ in range(STEPS):
        opt.zero_grad()
        (F.cross_entropy(model(x), y, reduction="sum") * (world / N)).backward()
        opt.step()
        values.append(opt.last_penalty)
    full = {n: _full(p) for n, p in model.named_parameters()}
    omega = {n: _full(t) for n, t in si.omega.items()}
    return full, omega, values


def _full(t):
    t = t.detach()
    return (t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t).clone()


def _worker(rank, world, path):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    x, y = data()
    model = Net()
    mesh = init_device_mesh("cpu", (world,))
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh)
    out = run(model, x[rank::world], y[rank::world], world)
    torch.save(out, os.path.join(path, f"out.{rank}"))


@pytest.mark.usefixtures("one_thread")
def test_fsdp2_two_ranks_equal_single_process():
    pytest.importorskip("torch.distributed.fsdp")
    x, y = data()
    ref_params, ref_omega, ref_values = run(Net(), x, y, 1)
    with tempfile.TemporaryDirectory() as d:
        spawn_gloo(_worker, 2, d)
        outs = [torch.load(os.path.join(d, f"out.{r}")) for r in range(2)]
    for params, omega, values in outs:
        for what, got, ref in (("params", params, ref_params), ("si", omega, ref_omega)):
            for n, t in ref.items():
                err = float((got[n].double() - t.double()).abs().max())
                assert err <= REL * float(t.abs().max()), f"{what}[{n}]: {err:.3g}"
        assert values == pytest.approx(ref_values, rel=REL)
