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

import importlib.util
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
        self.gate = nn.Linear(D, 1)  # first dimension 1: rank 1's shards of it are empty

    def forward(self, x):
        h = self.ln(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        x = x + a
        return x + torch.tanh(self.fc(x)) * torch.sigmoid(self.gate(x))


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


def shard(model, world, mesh_shape=None):
    """FSDP2 units per block and at the root (head left out); ``mesh_shape`` (replicate, shard): HSDP."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if mesh_shape is None:
        mesh = init_device_mesh("cpu", (world,))
    else:
        mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=("replicate", "shard"))
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


METHODS = ("fisher", "fisher_exact", "mas", "magnitude", "random")


def estimate(model, x, y, methods=METHODS):
    """estimate_importance on batches of 2 (each rank: its half of the samples, as many batches)."""
    batches = [(x[i : i + 2], y[i : i + 2]) for i in range(0, len(x), 2)]
    return ewc_fast.estimate_importance(
        model, batches, methods, progress=False, generator=torch.Generator().manual_seed(1)
    )


def scenario(model, x, y, world):
    """Importances estimated on the model; the Fisher consolidated into EWC; two SGD steps under EWC
    (apply_) with SI attached; SI's task importance consolidated into EWC; a step with the autograd
    penalty; a WVA-attenuated step. Returns full tensors and values."""
    out = {}
    est = estimate(model, x, y)
    out["importances"] = {m: {k: full(t) for k, t in r.items()} for m, r in est.items()}
    out["imp_types"] = sorted({type(t).__name__ for r in est.values() for t in r.values()})
    out["imp_bytes"] = local_bytes(est["fisher"].values())
    out["fsdp_meta"] = est["fisher"].meta.get("fsdp")
    ewc = ewc_fast.EWC(model, lam=0.8, gamma=0.9).consolidate(est["fisher"])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    si = ewc_fast.SynapticIntelligence(model, xi=0.1).attach(opt)
    out["gmax_si"] = {}
    for step in range(2):
        opt.zero_grad()
        backward(model, x, y, world)
        for k, p in model.named_parameters():
            if p.requires_grad:
                g = float(full(p.grad).abs().max())
                out["gmax_si"][k] = max(g, out["gmax_si"].get(k, 0.0))
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


def short_run(model, x, y, world):
    """Fisher estimated, consolidated into EWC, one backward with apply_ (the HSDP checks)."""
    fisher = estimate(model, x, y, ("fisher",))["fisher"]
    ewc = ewc_fast.EWC(model, lam=0.8).consolidate(fisher)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # away from the anchor
    backward(model, x, y, world)
    value = float(ewc.apply_())
    return {
        "fisher": {k: full(t) for k, t in fisher.items()},
        "value": value,
        "grads": {k: full(p.grad) for k, p in model.named_parameters() if p.requires_grad},
        "placements": sorted({str(tuple(p.placements)) for p in ewc.omega.values() if hasattr(p, "placements")}),
    }


HAVE_OPTIM = importlib.util.find_spec("ewc_fast.optim") is not None


def optim_run(model, x, y, world):
    """Three steps of ewc_fast.optim.SGD (momentum, weight decay) carrying EWC, SI and WVA (no hooks, no
    apply_). SGD, not Adam: Adam's first steps are lr * g / (|g| + eps), which turns the last-ulp
    differences of near-zero gradients summed in another order into O(lr) differences of the update --
    a property of Adam, not of sharding; SGD's update is linear in the gradient."""
    import ewc_fast.optim

    lr = 0.05
    ewc = ewc_fast.EWC(model, lam=0.8).consolidate(importance(model))
    wva = ewc_fast.WVA(model, lam=2.0).consolidate(importance(model))
    si = ewc_fast.SynapticIntelligence(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.01)  # away from the anchor
    opt = ewc_fast.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=lr,
        momentum=0.9,
        weight_decay=0.01,
        ewc=ewc,
        si=si,
        wva=wva,
    )
    out = {"penalty": [], "gmax": {}}
    for _ in range(3):
        opt.zero_grad()
        backward(model, x, y, world)
        for k, p in model.named_parameters():
            if p.requires_grad:
                out["gmax"][k] = max(out["gmax"].get(k, 0.0), float(full(p.grad).abs().max()))
        opt.step()
        out["penalty"].append(float(opt.last_penalty))
    names = {id(p): k for k, p in model.named_parameters()}
    out["params"] = {k: full(p) for k, p in model.named_parameters()}
    out["momentum"] = {names[id(p)]: full(s["momentum_buffer"]) for p, s in opt.state.items()}
    out["si"] = {k: full(t) for k, t in si.omega.items()}
    out["types"] = sorted({type(s["momentum_buffer"]).__name__ for s in opt.state.values()})
    if world > 1:
        try:
            opt.clip_grad_norm_(1.0)
        except NotImplementedError as e:
            out["clip"] = str(e)
    return out


def refused(rank, world):
    """Layouts the state does not support: clear errors on every rank, nothing changed."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    out = {}
    lin = nn.Linear(3, 2)
    lin.weight = nn.Parameter(DTensor.from_local(torch.ones(2, 3), mesh, [Partial()]))
    ewc = ewc_fast.EWC(lin, lam=1.0)
    try:
        ewc.consolidate({"weight": torch.ones(2, 3), "bias": torch.ones(2)})
    except TypeError as e:
        out["partial"] = str(e)
    out["partial_n_tasks"] = ewc.n_tasks
    tp = nn.Linear(3, 2)  # sharded by hand (tensor-parallel style), outside FSDP2
    tp.weight = nn.Parameter(distribute_tensor(tp.weight.detach(), mesh, [Shard(0)]))
    try:
        ewc_fast.estimate_importance(tp, [(torch.randn(2, 3), torch.tensor([0, 1]))], progress=False)
    except ValueError as e:
        out["tp"] = str(e)
    return out


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
    # HSDP meshes: (replicate 1, shard 2) and (replicate 2, shard 1) -- placements (Replicate(), Shard(0))
    out["hsdp"] = [short_run(shard(Tiny(), world, shape), x, y, world) for shape in ((1, world), (world, 1))]
    out["refused"] = refused(rank, world)
    out["optim"] = optim_run(shard(Tiny(), world), x, y, world) if HAVE_OPTIM else None
    # a single-process state (plain full tensors, e.g. torch.save'd) loads onto the sharded model:
    # each rank keeps its shard, the penalty is the single process's
    plain = Tiny()
    ewc1 = ewc_fast.EWC(plain, lam=0.8).consolidate(importance(plain))
    sharded_model = shard(Tiny(), world)
    ewc2 = ewc_fast.EWC(sharded_model, lam=1.0)
    ewc2.load_state_dict(ewc1.state_dict())
    with torch.no_grad():
        for p, q in zip(plain.parameters(), sharded_model.parameters()):
            p.mul_(1.01)
            q.mul_(1.01)
    out["adopted"] = (
        float(ewc1.penalty().detach()),
        float(ewc2.penalty().detach()),
        sorted({type(t).__name__ for t in ewc2.omega.values()}),
    )
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


def sharded_numel(ref):
    """Elements of the trainable parameters FSDP shards (all but the head's)."""
    return sum(t.numel() for k, t in ref["importances"]["fisher"].items() if not k.startswith("head."))


def _scalar(a, b, what):
    assert abs(a - b) <= REL * abs(b), f"{what}: {a} vs {b}"


@pytest.fixture(scope="module")
def fsdp_run():
    """Every sharded check in one spawned 2-rank run (each spawn costs seconds): the ranks' outputs
    and the directory holding their checkpoint."""
    with tempfile.TemporaryDirectory() as d:
        spawn_gloo(_worker, 2, d)
        ranks = [torch.load(os.path.join(d, f"out.{r}"), weights_only=True) for r in range(2)]
        yield ranks, d


def test_fused_optimizer_on_local_shards(fsdp_run):
    """ewc_fast.optim's fused steps (EWC + SI + WVA inside SGD) on the FSDP2 shards equal one process."""
    if not HAVE_OPTIM:
        pytest.skip("ewc_fast.optim is not in this tree")
    ranks, _ = fsdp_run
    x, y = data()
    ref = optim_run(Tiny(), x, y, 1)
    for r, out in enumerate(ranks):
        o = out["optim"]
        assert o["types"] == ["DTensor", "Tensor"], o["types"]
        assert "does not support sharded" in o["clip"]  # refused, not silently wrong
        for i, (v, w) in enumerate(zip(o["penalty"], ref["penalty"])):
            _scalar(v, w, f"rank {r} fused step {i} penalty")
        _close_dict(o["params"], ref["params"], f"rank {r} fused params")
        _close_dict(o["momentum"], ref["momentum"], f"rank {r} fused momentum")
        for k, t in ref["si"].items():  # 3 steps' SI terms, each with an ulp(theta) of slack (_si_slack)
            slack = 3 * ref["gmax"][k] * 2.0**-21 * float(ref["params"][k].abs().max())
            _close(o["si"][k], t, f"rank {r} fused SI omega[{k}]", slack)


def test_fsdp2_two_ranks_equal_single_process(fsdp_run):
    ranks, d = fsdp_run
    ranks = list(ranks)
    x, y = data()
    model = Tiny()
    ref, objs = scenario(model, x, y, 1)
    ref["hsdp"] = short_run(Tiny(), x, y, 1)
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
        for h in out["hsdp"]:
            assert h["placements"] == ["(Replicate(), Shard(dim=0))"], h["placements"]
            _close_dict(h["fisher"], ref["hsdp"]["fisher"], f"rank {r} HSDP fisher")
            _close_dict(h["grads"], ref["hsdp"]["grads"], f"rank {r} HSDP grads")
            _scalar(h["value"], ref["hsdp"]["value"], f"rank {r} HSDP penalty value")
        v1, v2, types = out["adopted"]
        _scalar(v2, v1, f"rank {r} penalty after loading a plain state")
        assert types == ["DTensor", "Tensor"], types
        assert "(Partial(sum),)" in out["refused"]["partial"] and out["refused"]["partial_n_tasks"] == 0
        assert "no FSDP2 fully_shard unit" in out["refused"]["tp"], out["refused"]["tp"]
        assert out["types"] == ["DTensor", "Tensor"], out["types"]  # sharded state + the plain head's
        assert out["head_type"] == "Tensor"
        for key in ("value_apply", "value_penalty", "c"):
            _scalar(out[key], ref[key], f"rank {r} {key}")
        assert out["imp_types"] == ["DTensor", "Tensor"], out["imp_types"]  # shards + the plain head's
        for m in METHODS:  # estimation on the sharded model equals one process on all the data
            _close_dict(out["importances"][m], ref["importances"][m], f"rank {r} importance {m}")
        for key in ("grads_apply", "grads_penalty", "params"):
            _close_dict(out[key], ref[key], f"rank {r} {key}")
        for k, t in ref["si_task"].items():
            # omega / ((theta - theta_start)^2 + xi) after 2 steps: omega's terms -g * dtheta carry an
            # ulp of theta each as absolute error (see _si_slack), divided by at least xi = 0.1
            slack = 2 * ref["gmax_si"][k] * 2.0**-21 * float(ref["params"][k].abs().max()) / 0.1
            _close(out["si_task"][k], t, f"rank {r} si_task[{k}]", slack)
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
    # estimation never held a full-size copy of every layer: at most the largest module's transient
    # sums (attention: in_proj 3D x D + 3D, out_proj D x D + D, fp32) beside its shards
    largest = 4 * (3 * D * D + 3 * D + D * D + D)
    for o in ranks[:2]:
        assert 0 < o["fsdp_meta"]["transient_peak_bytes"] <= largest, o["fsdp_meta"]
        # fisher + fisher_exact (one seed per class) + mas, 2 batches: the full sharded size per seed
        assert o["fsdp_meta"]["reduce_scatter_bytes"] == 2 * (1 + C + 1) * sharded_numel(ref) * 4, o["fsdp_meta"]
    # the estimated importance: each rank holds its shards (and the plain head's full tensors)
    head = sum(t.numel() * 4 for k, t in ref["importances"]["fisher"].items() if k.startswith("head."))
    sharded = ref["imp_bytes"] - head
    assert sum(o["imp_bytes"] - head for o in ranks[:2]) == sharded
    for o in ranks[:2]:
        assert abs((o["imp_bytes"] - head) / sharded - 0.5) < 0.05, (o["imp_bytes"], head, sharded)
