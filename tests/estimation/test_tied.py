"""Tied parameters (an embedding matrix that is also the output layer) against float64 oracles.

The split path (:mod:`ewc_fast.estimation.tied`): sum_n P_n^2 by the per-sample kernel plus a
correction on each sample's distinct ids. Awkward cases: repeated ids in a sample, ``padding_idx``,
the same id in several samples, a batch of one sample, ragged sequence lengths, the embedding or the
head used first, either one called twice, and every method that applies. Tolerance: the relative
error 1e-5 of every fp32-vs-float64 test (sums over a few dozen terms)."""

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ewc_fast
from ewc_fast.estimation.plan import TiedUse, build_plan, discover
from ewc_fast.estimation.rules import Call
from ewc_fast.estimation.rules.embedding import EmbeddingRule
from ewc_fast.estimation.rules.linear import LinearRule
from ewc_fast.estimation.tied import accumulate_tied, split_applies
from ewc_fast.testing.importance import reference_importance
from tests.helpers import ALL, TOKEN, assert_close

pytestmark = pytest.mark.usefixtures("one_thread")

V, D, PAD = 9, 4, 1


class TiedLM(nn.Module):
    """``emb`` (V, D, padding_idx=1) tied to ``head`` (Linear D -> V).

    ``order="emb_head"``: a language model (token logits through the embedding matrix; ``pooled``:
    logits of the mean state, (N, V), so fisher_exact applies). ``order="head_emb"``: the head scores
    per-token features first, the embedding of the same ids follows, gated by those scores; a
    classifier (N, 3). ``order="functions"``: the matrix enters torch functions only (``F.embedding``,
    ``F.linear`` twice, a soft embedding ``probs @ W``). ``twice``: the first use is called a second
    time (on flipped ids / squared features), so a use concatenates two calls."""

    def __init__(self, order="emb_head", twice=False, pooled=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.order, self.twice, self.pooled = order, twice, pooled
        self.emb = nn.Embedding(V, D, padding_idx=PAD)
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.emb.weight
        self.mid = nn.Linear(D, D)
        self.pre = nn.Linear(1, D)
        self.out = nn.Linear(D, 3)

    def forward(self, ids):
        if self.order == "functions":  # F.embedding, a soft embedding (probs @ W, addmm-type), F.linear
            h = F.embedding(ids, self.emb.weight, padding_idx=PAD)
            probs = torch.softmax(self.mid(h), -1)  # (N, T, D)
            soft = torch.softmax(F.linear(probs, self.emb.weight), -1) @ self.emb.weight  # (N, T, V) @ (V, D)
            return F.linear(torch.tanh(h + soft).mean(1), self.emb.weight)  # (N, V)
        if self.order == "emb_head":
            h = self.emb(ids)
            if self.twice:
                h = h + 0.5 * self.emb(ids.flip(1))
            h = torch.tanh(self.mid(h))
            return self.head(h.mean(1) if self.pooled else h)
        f = torch.tanh(self.pre(ids.unsqueeze(-1).to(self.pre.weight.dtype) / V))
        s = self.head(f)  # the head's use comes first
        if self.twice:
            s = s + self.head(f * f)
        h = self.emb(ids) * torch.sigmoid(s.mean(-1, keepdim=True))
        return self.out(torch.tanh(self.mid(h)).mean(1))


def token_batches(targets: str):
    """Ragged batches (3 x 5, 1 x 2, 4 x 6 tokens): repeated ids in a sample, the padding id, ids
    shared by several samples; targets per token (with -100), per sample or none."""
    g = torch.Generator().manual_seed(4)
    out = []
    for n, t in ((3, 5), (1, 2), (4, 6)):
        ids = torch.randint(0, V, (n, t), generator=g)
        ids[0, :2] = 3  # repeated id in one sample, and in several samples below
        ids[-1, 0] = 3
        ids[-1, -1] = PAD
        if targets == "token":
            y = torch.randint(0, V, (n, t), generator=g)
            y[0, -1] = -100
        else:
            y = torch.randint(0, V if targets == "vocab" else 3, (n,), generator=g)
        out.append((ids, y))
    return out


CASES = {
    "lm": (dict(order="emb_head"), "token", TOKEN),
    "lm_twice": (dict(order="emb_head", twice=True), "token", ("fisher", "mas")),
    "lm_pooled": (dict(order="emb_head", pooled=True), "vocab", ALL),
    "head_first": (dict(order="head_emb"), "cls", ALL),
    "functions": (dict(order="functions"), "vocab", ("fisher", "mas", "fisher_exact")),
    "head_first_twice": (dict(order="head_emb", twice=True), "cls", ("fisher", "mas", "fisher_mc")),
}


def run(name, backend="torch"):
    kw, targets, methods = CASES[name]
    model, data = TiedLM(**kw), token_batches(targets)
    ref = reference_importance(model, data, methods, generator=torch.Generator().manual_seed(3), mc_samples=2)
    res = ewc_fast.estimate_importance(
        model, data, methods, backend=backend, progress=False, generator=torch.Generator().manual_seed(3), mc_samples=2
    )
    return model, data, methods, res, ref


@pytest.mark.parametrize("name", list(CASES))
def test_tied_embedding_and_head_match_float64_oracle(name):
    model, data, methods, res, ref = run(name)
    for m in methods:
        assert "head.weight" not in res[m]
        assert res[m].meta.get("fallback", {}) == {}
        assert_close(res[m], ref[m], what=f"{name}/{m}")
    ids = data[0][0]
    trainable = list(model.named_parameters())
    plan = build_plan(model, trainable, discover(model, (ids,), {id(p) for _, p in trainable}, len(ids)))
    assert [t.full for t in plan.tied] == ["emb.weight"] and split_applies(plan.tied[0].uses)


@pytest.mark.parametrize("name", ["lm", "head_first"])
def test_tied_split_on_the_cpp_backend(name):
    if "cpp" not in ewc_fast.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    _, _, methods, res, ref = run(name, "cpp")
    for m in methods:
        assert_close(res[m], ref[m], what=f"{name}/{m}/cpp")


def test_tied_split_chunked_sample_by_sample(monkeypatch):
    """A tiny chunk budget splits the correction (and persample_sq_) into one sample per chunk."""
    from ewc_fast.estimation.rules import base as rules_base

    monkeypatch.setattr(rules_base, "CHUNK_BYTES", 64)
    monkeypatch.setattr(importlib.import_module("ewc_fast.ops.persample._torch"), "CHUNK_BYTES", 64)
    _, _, methods, res, ref = run("lm_twice")
    for m in methods:
        assert_close(res[m], ref[m], what=f"chunked/{m}")


def uses(n, t_head, t_emb, ids, seed=0):
    """Hand-made calls of a tied Linear head and Embedding (``Call`` without provenance: dim 0 holds
    the samples), their output gradients, and the explicit per-sample gradients (float64)."""
    g = torch.Generator().manual_seed(seed)
    lin, emb = nn.Linear(D, V, bias=False), nn.Embedding(V, D, padding_idx=PAD)
    lin.weight = emb.weight
    a = torch.randn(n, t_head, D, generator=g)
    gh = torch.randn(n, t_head, V, generator=g)
    ge = torch.randn(n, t_emb, D, generator=g)
    per = torch.einsum("ntv,ntd->nvd", gh.double(), a.double())
    for k in range(n):
        for t in range(t_emb):
            if int(ids[k, t]) != PAD:
                per[k, ids[k, t]] += ge[k, t].double()
    per_use = [
        (TiedUse(0, lin, "head", LinearRule(), "weight"), [Call((a,), {}, None)], [gh]),
        (TiedUse(1, emb, "emb", EmbeddingRule(), "weight"), [Call((ids,), {}, None)], [ge]),
    ]
    return per_use, per, (a, gh, ge)


@pytest.mark.parametrize("mode", ["sq", "abs"])
@pytest.mark.parametrize("n,t_head,t_emb", [(1, 3, 2), (5, 1, 4), (4, 6, 6)])
def test_accumulate_tied_against_explicit_per_sample_gradients(mode, n, t_head, t_emb):
    """The split path directly: T = 1 head, N = 1, ids repeated / shared / padding, into a buffer that
    already holds earlier batches' sums."""
    g = torch.Generator().manual_seed(n)
    ids = torch.randint(0, V, (n, t_emb), generator=g)
    ids[0, 0] = ids[-1, -1] = 2
    ids[0, -1] = PAD
    per_use, per, _ = uses(n, t_head, t_emb, ids)
    assert split_applies([u for u, _, _ in per_use])
    start = torch.rand(V, D, generator=g)
    buf = start.clone()
    accumulate_tied(per_use, buf, mode, n, "torch")
    ref = start.double() + (per.square() if mode == "sq" else per.abs()).sum(0)
    assert_close({"w": buf}, {"w": ref}, what=mode)


def test_accumulate_tied_rounding_never_leaves_a_negative_sum():
    """sum_n (P_n + E_n)^2 >= 0, but in fp32 P^2 + (2P + E) E can round below zero where E is close
    to -P. Pairs (P, E) for which it does are searched among random ones (about 1 in 1e5 at E =
    -P (1 + 1e-4 u)); a head call with one token (G = 1, A = P: the kernel's product is P exactly)
    and an embedding call with one token (E) put them in one row. The sum must be clamped to >= 0
    and stay within fp32 rounding of the float64 value."""
    g = torch.Generator().manual_seed(0)
    p = torch.randn(1_000_000, generator=g)
    e = -p * (1 + 1e-4 * torch.randn(p.shape, generator=g))
    neg = (p * p + (2 * p + e) * e < 0).nonzero().flatten()[:D]
    assert neg.numel() == D  # the search finds such pairs
    a = p[neg].view(1, 1, D)
    gh = torch.zeros(1, 1, V)
    gh[0, 0, 5] = 1.0
    ids = torch.tensor([[5]])
    per_use, _, _ = uses(1, 1, 1, ids)
    per_use[0][1][0].args, per_use[0][2][0] = (a,), gh
    per_use[1][2][0] = e[neg].view(1, 1, D)
    buf = torch.zeros(V, D)
    accumulate_tied(per_use, buf, "sq", 1, "torch")
    ref = (p[neg].double() + e[neg].double()).square()
    assert bool((buf >= 0).all())
    assert float((buf[5].double() - ref).abs().max()) <= 1e-6 * float(p[neg].square().max())
    assert float(buf[torch.arange(V) != 5].abs().max()) == 0.0


def test_dense_path_still_serves_other_uses():
    """A use with neither form (a broadcast add of the embedding matrix) keeps the tied parameter on the
    dense path; exact against the oracle."""

    class AddUse(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.emb = nn.Embedding(V, D)
            self.head = nn.Linear(D, V, bias=False)
            self.head.weight = self.emb.weight

        def forward(self, ids):
            h = self.emb(ids).mean(1)  # (N, D)
            z = torch.tanh(h.unsqueeze(1) + self.emb.weight)  # (N, V, D): a broadcast add of the matrix
            return self.head(z.mean(1))

    model, data = AddUse(), [(b[0], b[1]) for b in token_batches("vocab")]
    trainable = list(model.named_parameters())
    ids = data[0][0]
    plan = build_plan(model, trainable, discover(model, (ids,), {id(p) for _, p in trainable}, len(ids)))
    assert [t.full for t in plan.tied] == ["emb.weight"] and not split_applies(plan.tied[0].uses)
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    ref = reference_importance(model, data, ("fisher", "mas"))
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=f"dense/{m}")


def test_tied_split_on_a_float64_model():
    """A float64 model: the correction runs in float64 (P rows and E rows), the sums in fp32 as always."""
    data = token_batches("token")
    model = TiedLM(order="emb_head", twice=True).double()
    ref = reference_importance(TiedLM(order="emb_head", twice=True), data, ("fisher", "mas"))
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=f"float64/{m}")
