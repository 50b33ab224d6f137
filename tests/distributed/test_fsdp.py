"""EWC, SI and WVA on an FSDP2-sharded transformer (``fully_shard``, gloo, 2 processes) equal one
process on the union of the data; the state is sharded like the parameters; a checkpoint saved with
``torch.distributed.checkpoint`` on 2 ranks loads on 1 and continues identically.

One spawned run does every sharded check (each spawn costs seconds); the single-process reference
runs in the test process. The model mixes layouts: FSDP2 units per block and at the root, a frozen
sharded parameter (``emb.weight``) and a parameter group left out of FSDP (``head``, plain tensors on
every rank, its gradients averaged by hand as DDP would).

Tolerances: the sharded run differs from the single process only in summation order (the penalty
value and the consolidation increment are sums of per-rank partial sums; the task gradients are
averaged by FSDP's reduce-scatter), a few fp32 ulps over a few hundred terms: 1e-6 relative (the
issue's bound) holds with a wide margin.
"""

import os
import tempfile

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ewc_fast
from ewc_fast.consolidation import checkpoint
from tests.helpers import spawn_gloo

pytestmark = pytest.mark.usefixtures("one_thread")

D, V, C, T, N = 6, 11, 5, 4, 8  # width (2 heads), vocabulary, classes, tokens, samples
REL = 1e-6


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln = nn.LayerNorm(D)
        self.attn = nn.MultiheadAttention(D, 2, batch_first=True)
        self.fc = nn.Linear(D, D)

    def forward(self, x):
        h = self.ln(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        return x + torch.tanh(self.fc(x))


class Tiny(nn.Module):
    """Embedding, two pre-norm attention blocks, mean-pooled linear head."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, D)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(D, C)
        self.emb.weight.requires_grad_(False)  # frozen (and sharded under FSDP)

    def forward(self, x):
        h = self.emb(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h.mean(1))


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, V, (N, T), generator=g), torch.randint(0, C, (N,), generator=g)


def importance(model):
    """A deterministic positive importance (full tensors) of every trainable parameter."""
    return {
        k: ((torch.arange(p.numel()) % 5 + 1).float() / 5).reshape(p.shape)
        for k, p in model.named_parameters()
        if p.requires_grad
    }


def full(t):
    t = t.detach()
    return (t.full_tensor() if isinstance(t, torch.distributed.tensor.DTensor) else t).clone()


def shard(model, world):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for b in model.blocks:
        fully_shard(b, mesh=mesh)
    fully_shard(model, mesh=mesh, ignored_params=set(model.head.parameters()))
    return model


def backward(model, x, y, world, extra=None):
    """Task loss scaled so that FSDP's gradient average over ranks is the mean over all N samples;
    the head's plain gradients are averaged by hand (as DDP would)."""
    loss = F.cross_entropy(model(x), y, reduction="sum") * (world / N)
    (loss if extra is None else loss + extra()).backward()
    if world > 1:
        for p in model.head.parameters():
            torch.distributed.all_reduce(p.grad)
            p.grad /= world


def state_tensors(ewc, si, wva):
    return {
        **{f"ewc.omega.{k}": t for k, t in ewc.omega.items()},
        **{f"ewc.mu.{k}": t for k, t in ewc.mu.items()},
        **{f"si.omega.{k}": t for k, t in si.omega.items()},
        **{f"wva.A.{k}": t for k, t in wva.accum.items()},
    }


def local_bytes(tensors):
    """Storage bytes held by this rank for ``tensors`` (the local shard of a DTensor)."""
    out = 0
    for t in tensors:
        t = t.to_local() if isinstance(t, torch.distributed.tensor.DTensor) else t
        out += t.untyped_storage().nbytes()
    return out


def scenario(model, x, y, world):
    """Two SGD steps under EWC (apply_) with SI attached; SI's task importance consolidated into EWC;
    a step with the autograd penalty; a WVA-attenuated step. Returns full tensors and values."""
    out = {}
    ewc = ewc_fast.EWC(model, lam=0.8, gamma=0.9).consolidate(importance(model))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    si = ewc_fast.SynapticIntelligence(model, xi=0.1).attach(opt)
    for step in range(2):
        opt.zero_grad()
        backward(model, x, y, world)
        v = ewc.apply_()
        if step == 0:
            out["value_apply"] = float(v)
            out["grads_apply"] = {k: full(p.grad) for k, p in model.named_parameters() if p.requires_grad}
        opt.step()
    task = si.consolidate()
    out["si_task"] = {k: full(t) for k, t in task.items()}
    ewc.consolidate(task)
    out["c"] = ewc.c
    opt.zero_grad()
    value = []
    backward(model, x, y, world, extra=lambda: value.append(ewc.penalty()) or value[0])
    out["value_penalty"] = float(value[0].detach())
    out["grads_penalty"] = {k: full(p.grad) for k, p in model.named_parameters() if p.requires_grad}
    before = {k: full(p) for k, p in model.named_parameters() if p.requires_grad}
    opt.step()
    out["dtheta_penalty"] = {k: full(p) - before[k] for k, p in model.named_parameters() if p.requires_grad}
    si.detach()
    wva = ewc_fast.WVA(model, lam=3.0).consolidate(importance(model)).attach(opt)
    opt.zero_grad()
    backward(model, x, y, world)
    ewc.apply_()
    opt.step()
    wva.detach()
    out["params"] = {k: full(p) for k, p in model.named_parameters()}
    st = state_tensors(ewc, si, wva)
    out["state"] = {k: full(t) for k, t in st.items()}
    out["state_bytes"] = local_bytes(st.values())
    return out, (ewc, si, wva, opt)


def continue_one_step(model, objs, x, y, world):
    """One more step with all three attached (WVA before SI): the continuation after a checkpoint."""
    ewc, si, wva, _ = objs
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    wva.attach(opt)
    si.attach(opt)
    opt.zero_grad()
    backward(model, x, y, world)
    v = float(ewc.apply_())
    opt.step()
    si.detach()
    wva.detach()
    return {
        "value": v,
        "grads": {k: full(p.grad) for k, p in model.named_parameters() if p.requires_grad},
        "params": {k: full(p) for k, p in model.named_parameters()},
        "si_omega": {k: full(t) for k, t in si.omega.items()},
    }


def _worker(rank, world, path):
    x, y = data()
    x, y = x[rank::world], y[rank::world]
    model = shard(Tiny(), world)
    out, objs = scenario(model, x, y, world)
    ewc, si, wva, _ = objs
    out["types"] = sorted({type(t).__name__ for t in state_tensors(ewc, si, wva).values()})
    out["head_type"] = type(ewc.omega["head.weight"]).__name__
    checkpoint.save(os.path.join(path, "ckpt"), model, ewc=ewc, si=si, wva=wva)
    out["continued"] = continue_one_step(model, objs, x, y, world)
    torch.save(out, os.path.join(path, f"out.{rank}"))


def _close(a, b, what, slack=0.0):
    a, b = a.double(), b.double()
    assert a.shape == b.shape, what
    assert bool(torch.isfinite(a).all()), what
    denom = float(b.abs().max())
    err = float((a - b).abs().max()) - slack
    assert err <= REL * denom, f"{what}: error {err:.3g}, scale {denom:.3g}"


def _close_dict(a, b, what):
    assert set(a) == set(b), what
    for k in b:
        _close(a[k], b[k], f"{what}[{k}]")


def _si_slack(ref, name, grad):
    """Absolute error allowed in one SGD step's SI term -g * (theta_after - theta_before). The two
    runs' parameters agree to about an ulp of theta (fp32 SGD updates of gradients summed in another
    order); dtheta inherits that ulp as an *absolute* error, large against a small step at theta ~ 1
    (LayerNorm weights): |error| <= |g| * 2 ulp(theta) <= |g| 2^-21 |theta|; plus one fp32 rounding
    of .grad in the Zenke task gradient (.grad minus the recorded penalty, documented)."""
    g = float(grad.abs().max())
    theta = float(ref["params"][name].abs().max())
    return g * (2.0**-21 * theta + 2.0**-23 * float(ref["dtheta_penalty"][name].abs().max()))


def _scalar(a, b, what):
    assert abs(a - b) <= REL * abs(b), f"{what}: {a} vs {b}"


def test_fsdp2_two_ranks_equal_single_process():
    x, y = data()
    with tempfile.TemporaryDirectory() as d:
        spawn_gloo(_worker, 2, d)
        ranks = [torch.load(os.path.join(d, f"out.{r}"), weights_only=True) for r in range(2)]
        model = Tiny()
        ref, objs = scenario(model, x, y, 1)
        ref["continued"] = continue_one_step(model, objs, x, y, 1)
        # the 2-rank checkpoint onto one plain process (fresh objects, other settings): resharded
        model1 = Tiny()
        loaded = (
            ewc_fast.EWC(model1, lam=5.0),
            ewc_fast.SynapticIntelligence(model1, xi=0.5),
            ewc_fast.WVA(model1, lam=0.0),
            None,
        )
        checkpoint.load(os.path.join(d, "ckpt"), model1, ewc=loaded[0], si=loaded[1], wva=loaded[2])
        assert (loaded[0].lam, loaded[0].gamma, loaded[0].n_tasks, loaded[1].xi, loaded[2].lam) == (
            0.8,
            0.9,
            2,
            0.1,
            3.0,
        )
        _close_dict({k: full(p) for k, p in model1.named_parameters()}, ranks[0]["params"], "loaded params")
        _close_dict({k: full(t) for k, t in state_tensors(*loaded[:3]).items()}, ranks[0]["state"], "loaded state")
        ranks.append({"continued": continue_one_step(model1, loaded, x, y, 1)})
    for r, out in enumerate(ranks):
        if r == 2:  # the 1-process continuation from the 2-rank checkpoint equals both continuations
            _scalar(out["continued"]["value"], ranks[0]["continued"]["value"], "loaded continued value")
            _close_dict(out["continued"]["params"], ranks[0]["continued"]["params"], "loaded continued params")
            for k, t in ranks[0]["continued"]["si_omega"].items():  # one step apart in summation order
                slack = _si_slack(ref, k, ref["continued"]["grads"][k])
                _close(out["continued"]["si_omega"][k], t, f"loaded continued SI omega[{k}]", slack)
            continue
        assert out["types"] == ["DTensor", "Tensor"], out["types"]  # sharded state + the plain head's
        assert out["head_type"] == "Tensor"
        for key in ("value_apply", "value_penalty", "c"):
            _scalar(out[key], ref[key], f"rank {r} {key}")
        for key in ("grads_apply", "si_task", "grads_penalty", "params"):
            _close_dict(out[key], ref[key], f"rank {r} {key}")
        assert set(out["state"]) == set(ref["state"])
        for k, t in ref["state"].items():
            name = k.split(".", 2)[2]
            slack = _si_slack(ref, name, ref["grads_penalty"][name]) if k.startswith("si.omega.") else 0.0
            _close(out["state"][k], t, f"rank {r} state[{k}]", slack)
        _scalar(out["continued"]["value"], ref["continued"]["value"], f"rank {r} continued value")
        _close_dict(out["continued"]["params"], ref["continued"]["params"], f"rank {r} continued params")
        for k, t in ref["continued"]["si_omega"].items():  # two steps' path-integral terms (see _si_slack)
            slack = _si_slack(ref, k, ref["grads_penalty"][k]) + _si_slack(ref, k, ref["continued"]["grads"][k])
            _close(out["continued"]["si_omega"][k], t, f"rank {r} continued SI omega[{k}]", slack)
    # memory: each rank holds its shards plus the full state of the plain head; the shards of all
    # ranks add up to the single process's sharded state exactly (no padding, no copy)
    head = sum(t.numel() * t.element_size() for k, t in ref["state"].items() if ".head." in k)
    sharded = ref["state_bytes"] - head
    assert sum(o["state_bytes"] - head for o in ranks[:2]) == sharded
    for o in ranks[:2]:  # ragged shards (odd first dimensions): not exactly half
        assert abs((o["state_bytes"] - head) / sharded - 0.5) < 0.05, (o["state_bytes"], head, sharded)
