"""``ewc_fast.consolidation.checkpoint`` in one process (no process group): a DCP round trip of
EWC/SI/WVA state with the model into fresh objects is bit-exact and continues identically; wrong
arguments raise clear errors. The 2-rank FSDP2 -> 1-process resharding is in
``tests/distributed/test_fsdp.py``."""

import pytest
import torch
from torch import nn

import ewc_fast
from ewc_fast.consolidation import checkpoint
from tests.helpers import data_of, mlp

pytestmark = pytest.mark.usefixtures("one_thread")


def _train_step(model, objs, batch):
    ewc, si, wva = objs
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    wva.attach(opt)
    si.attach(opt)
    x, y = batch
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    ewc.apply_()
    opt.step()
    si.detach()
    wva.detach()


def _objects(model, lam=0.5):
    return ewc_fast.EWC(model, lam=lam, gamma=0.9), ewc_fast.SynapticIntelligence(model), ewc_fast.WVA(model, lam=lam)


def _state(model, objs):
    ewc, si, wva = objs
    out = {f"p.{k}": p.detach().clone() for k, p in model.named_parameters()}
    out.update({f"omega.{k}": t for k, t in ewc.omega.items()})
    out.update({f"mu.{k}": t for k, t in ewc.mu.items()})
    out.update({f"si.{k}": t for k, t in si.omega.items()})
    out.update({f"A.{k}": t for k, t in wva.accum.items()})
    return out


def test_round_trip_into_fresh_objects_is_exact(tmp_path):
    batches = data_of(n=8, sizes=(4, 4))
    model = mlp()
    model.eval()
    objs = _objects(model)
    imp = ewc_fast.estimate_importance(model, batches, "fisher", progress=False)["fisher"]
    objs[0].consolidate(imp)
    objs[2].consolidate(imp)
    _train_step(model, objs, batches[0])
    objs[0].consolidate(objs[1].consolidate())  # SI's task importance into EWC (c != 0)
    path = str(tmp_path / "ckpt")
    checkpoint.save(path, model, ewc=objs[0], si=objs[1], wva=objs[2])

    model2 = mlp(seed=5)  # other weights, other settings: everything comes from the checkpoint
    model2.eval()
    objs2 = _objects(model2, lam=3.0)
    checkpoint.load(path, model2, ewc=objs2[0], si=objs2[1], wva=objs2[2])
    assert (objs2[0].lam, objs2[0].gamma, objs2[0].n_tasks, objs2[0].c) == (0.5, 0.9, 2, objs[0].c)
    assert objs2[1].n_tasks == 1 and objs2[2].lam == 0.5
    a, b = _state(model, objs), _state(model2, objs2)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    _train_step(model, objs, batches[1])
    _train_step(model2, objs2, batches[1])
    a, b = _state(model, objs), _state(model2, objs2)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_errors(tmp_path):
    model = mlp()
    ewc = ewc_fast.EWC(model, lam=1.0)
    ewc.consolidate({k: torch.ones_like(p) for k, p in model.named_parameters()})
    path = str(tmp_path / "ckpt")
    with pytest.raises(TypeError, match="no state_dict"):
        checkpoint.save(path, model, ewc=object())
    with pytest.raises(TypeError, match="torch.nn.Module"):
        checkpoint.save(path, "model", ewc=ewc)
    checkpoint.save(path, model, ewc=ewc)
    with pytest.raises(ValueError, match="no state under 'si'"):
        checkpoint.load(path, model, si=ewc_fast.SynapticIntelligence(model))
    with pytest.raises(TypeError, match="directory path"):
        checkpoint.load(3, model, ewc=ewc)
    # a model whose shapes differ: the object refuses the state and keeps its own
    other = nn.Sequential(nn.Linear(6, 4), nn.Tanh(), nn.Dropout(0.5), nn.Linear(4, 3))
    fresh = ewc_fast.EWC(other, lam=2.0)
    with pytest.raises(ValueError, match="shape"):
        checkpoint.load(path, ewc=fresh)
    assert fresh.n_tasks == 0 and fresh.lam == 2.0
