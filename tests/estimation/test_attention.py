"""nn.MultiheadAttention's native rule (ewc_fast/estimation/rules/attention.py) vs the float64 oracle.

Every configuration must be exact (relative error <= 1e-5 per parameter, every method: fp32 sums
of a few hundred products against the float64 oracle) and must not touch the torch.func fallback;
when the inner watch is unavailable the module goes to the fallback and stays exact. Small sizes:
E = 8, 2 heads, T <= 5, ragged batches (3, 1, 4); the "nt" cases have N == T == 4 (T = 4 tokens,
batches of 4) so that no size tells the sample dimension apart.
"""

import importlib

import pytest
import torch
from torch import nn

import ewc_fast
from ewc_fast.estimation import fallback as fallback_mod
from ewc_fast.estimation.provenance import BDim
from ewc_fast.estimation.rules.attention import MultiheadAttentionRule
from ewc_fast.testing.importance import reference_importance
from tests.helpers import ALL, TRITON, assert_close, cached_reference, ragged
from tests.helpers import run_case as _run_case

pytestmark = pytest.mark.usefixtures("one_thread")

E, HEADS, T = 8, 2, 5


class Net(nn.Module):
    """x (N, T, 3) -> h = inp(x) (N, T, E) -> attention variant -> fc(mean over tokens) (N, 3)."""

    def __init__(self, kind, batch_first=True, bias=True, **mha_kw):
        super().__init__()
        self.kind, self.bf = kind, batch_first
        self.inp = nn.Linear(3, E)
        kdim = vdim = None
        if kind in ("cross", "cross_kv"):
            kdim, vdim = 5, 6
            self.kin = nn.Linear(3, kdim)
            self.vin = nn.Linear(3, vdim)
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=batch_first, bias=bias, kdim=kdim, vdim=vdim, **mha_kw)
        self.fc = nn.Linear(E, 3)
        self.register_buffer("head_coef", torch.tensor([1.0, -0.7]))

    def attend(self, q, k, v, **kw):
        """Batch-first in and out, whatever the module's layout."""
        if not self.bf:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))
        a, w = self.mha(q, k, v, **kw)
        return (a if self.bf else a.transpose(0, 1)), w

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        n, t = h.shape[:2]
        kind = self.kind
        extra = 0.0
        if kind in ("self", "bias_kv", "zero_attn"):
            a, _ = self.attend(h, h, h)
        elif kind == "bias_kv_all":  # bias_k/bias_v and a zero key with masks and returned weights
            kpm = (x[..., 0] > 0.3) & (torch.arange(t) > 0)
            a, w = self.attend(h, h, h, key_padding_mask=kpm, need_weights=True, average_attn_weights=False)
            extra = 0.5 * w[..., :t].sum(1).mean(-1).sum(-1, keepdim=True)  # weights over the real keys
        elif kind == "cross_kv":  # kdim/vdim with bias_k/bias_v, a causal mask and a second call
            a, _ = self.attend(h[:, :3], torch.tanh(self.kin(x)), torch.tanh(self.vin(x)))
            a2, _ = self.attend(h, torch.tanh(self.kin(x)), torch.tanh(self.vin(x)))
            a = torch.cat([a, a2], 1)
        elif kind == "cross":
            a, _ = self.attend(h[:, :3], torch.tanh(self.kin(x)), torch.tanh(self.vin(x)))  # L = 3, S = 5
        elif kind == "kpm":
            kpm = (x[..., 0] > 0.3) & (torch.arange(t) > 0)  # never masks key 0
            a, _ = self.attend(h, h, h, key_padding_mask=kpm)
        elif kind == "causal":
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            a, _ = self.attend(h, h, h, attn_mask=mask, is_causal=True, need_weights=False)
        elif kind == "causal_kpm":  # is_causal with a key_padding_mask and weights: the mask itself is used
            mask = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            kpm = (x[..., 1] > 0.5) & (torch.arange(t) > 0)
            a, _ = self.attend(h, h, h, attn_mask=mask, is_causal=True, key_padding_mask=kpm)
        elif kind == "mask3d":  # a float mask per sample and head, (N * H, L, S)
            s = x[..., 0]
            m = -0.5 * (s.unsqueeze(2) - s.unsqueeze(1)).square()  # (N, L, S)
            m = m.unsqueeze(1) * torch.arange(1, HEADS + 1.0).view(1, HEADS, 1, 1)
            a, _ = self.attend(h, h, h, attn_mask=m.reshape(n * HEADS, t, t))
        elif kind == "weights_avg":
            a, w = self.attend(h, h, h, need_weights=True, average_attn_weights=True)  # (N, L, S)
            extra = 0.5 * torch.einsum("nls,nse->ne", w, h)
        elif kind == "weights_heads":
            a, w = self.attend(h, h, h, need_weights=True, average_attn_weights=False)  # (N, H, L, S)
            w = (w * self.head_coef.view(1, HEADS, 1, 1)).sum(1)
            extra = 0.5 * torch.einsum("nls,nse->ne", w, h)
        elif kind == "reuse":  # self-attention, then cross-attention of the result on h
            a, _ = self.attend(h, h, h)
            a, _ = self.attend(torch.tanh(a), h, h)
        elif kind == "reuse_self":  # twice self-attention (packed in_proj path, two calls)
            a, _ = self.attend(h, h, h)
            t2 = torch.tanh(a)
            a, _ = self.attend(t2, t2, t2, need_weights=False)
        elif kind == "tied_outproj":  # out_proj also called as a module: out_proj.* take the tied path
            a, _ = self.attend(h, h, h)
            extra = self.mha.out_proj(h).mean(1)
        else:
            raise KeyError(kind)
        return self.fc(a.mean(1) + extra)


SPECS = {
    "self_bf": dict(kind="self", batch_first=True),
    "self_sf": dict(kind="self", batch_first=False),
    "nobias": dict(kind="self", batch_first=True, bias=False),
    "nobias_sf": dict(kind="self", batch_first=False, bias=False),
    "cross_sf": dict(kind="cross", batch_first=False),
    "cross_bf": dict(kind="cross", batch_first=True),
    "kpm": dict(kind="kpm", batch_first=True),
    "kpm_sf": dict(kind="kpm", batch_first=False),
    "causal": dict(kind="causal", batch_first=True),
    "causal_kpm": dict(kind="causal_kpm", batch_first=False),
    "mask3d": dict(kind="mask3d", batch_first=True),
    "weights_avg": dict(kind="weights_avg", batch_first=True),
    "weights_heads_sf": dict(kind="weights_heads", batch_first=False),
    "reuse": dict(kind="reuse", batch_first=True),
    "reuse_self": dict(kind="reuse_self", batch_first=False),
    "tied_outproj": dict(kind="tied_outproj", batch_first=True),
    "bias_kv": dict(kind="bias_kv", batch_first=True, add_bias_kv=True),
    "zero_attn": dict(kind="zero_attn", batch_first=False, add_zero_attn=True),
    "bias_kv_all": dict(kind="bias_kv_all", batch_first=False, add_bias_kv=True, add_zero_attn=True),
    "cross_kv": dict(kind="cross_kv", batch_first=True, add_bias_kv=True),
    # N == T == 4: batch-first and sequence-first, self and cross attention
    "self_bf_nt": dict(kind="self", batch_first=True),
    "self_sf_nt": dict(kind="self", batch_first=False),
    "cross_sf_nt": dict(kind="cross", batch_first=False),
    "kpm_sf_nt": dict(kind="kpm", batch_first=False),
}
SUPPORTED = list(SPECS)
CPP = ["self_bf", "cross_sf", "weights_heads_sf", "reuse", "reuse_self", "tied_outproj", "bias_kv_all", "self_sf_nt"]


def make_case(name):
    torch.manual_seed(sum(map(ord, name)))
    model = Net(**SPECS[name])
    with torch.no_grad():  # non-zero biases (MHA initialises them to 0)
        for k, p in model.named_parameters():
            if "bias" in k:
                p.uniform_(-0.3, 0.3)
    if name.endswith("_nt"):  # N == T: batches of 4 samples of 4 tokens
        x = torch.randn(8, 4, 3)
        y = torch.randint(0, 3, (8,))
        return model, [(x[:4], y[:4]), (x[4:], y[4:])], ALL
    x = torch.randn(8, T, 3)
    y = torch.randint(0, 3, (8,))
    return model, ragged(x, y), ALL


def reference(name):
    return cached_reference(make_case, name)


def run_case(name, backend):
    return _run_case(make_case, name, backend)[0]


@pytest.fixture
def no_fallback(monkeypatch):
    """Make any use of the torch.func fallback an error."""

    def boom(self, module, *a, **k):
        raise AssertionError(f"torch.func fallback used for {type(module).__name__}")

    monkeypatch.setattr(fallback_mod.FunctionalFallback, "accumulate", boom)


def check(name, res):
    ref = reference(name)
    assert list(res) == list(ALL)
    for m in ALL:
        assert res[m].n_samples == (0 if m in ("magnitude", "random") else 8)
        assert_close(res[m], ref[m], what=f"{name}/{m}")


@pytest.mark.parametrize("name,backend", [(c, "torch") for c in SUPPORTED] + [(c, "cpp") for c in CPP])
def test_rule_matches_float64_oracle(name, backend, no_fallback):
    if backend == "cpp" and "cpp" not in ewc_fast.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    check(name, run_case(name, backend))


@pytest.mark.parametrize("name", ["self_sf", "bias_kv_all"])
def test_without_the_inner_watch_the_fallback_serves_mha_exactly(name, monkeypatch):
    """A PyTorch whose multi_head_attention_forward cannot be watched: the rule handles nothing and the
    torch.func fallback serves the module (named in meta['fallback']), still exact."""
    from ewc_fast.estimation.rules import attention_watch

    monkeypatch.setattr(attention_watch, "_BODY", None)
    model, data, _ = make_case(name)
    assert MultiheadAttentionRule().handles(model.mha) == ()
    used = []
    orig = fallback_mod.FunctionalFallback.accumulate

    def spy(self, module, *a, **k):
        used.append(type(module))
        return orig(self, module, *a, **k)

    monkeypatch.setattr(fallback_mod.FunctionalFallback, "accumulate", spy)
    with pytest.warns(UserWarning, match="torch.func"):
        res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    ref = reference(name)
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=f"{name}/{m}")
    assert nn.MultiheadAttention in used
    assert "mha.in_proj_weight" in res["fisher"].meta["fallback"]


def test_attention_is_not_recomputed(monkeypatch, no_fallback):
    """The rule reads the projections' gradients from the backward: the attention (softmax / SDPA)
    runs once per call of the module (capture and discovery forwards), never in the rule."""
    import torch.nn.functional as F

    model, data, _ = make_case("self_bf")
    calls = []
    for mod, name in ((F, "softmax"), (torch, "softmax"), (F, "scaled_dot_product_attention")):
        orig = getattr(mod, name)
        # attention maps are 3-D or 4-D (the losses' softmax over (N, classes) logits is not counted);
        # a patched function re-dispatched by a torch-function mode sees the same input twice in a row
        monkeypatch.setattr(mod, name, lambda *a, _o=orig, **k: calls.append(a[0]) or _o(*a, **k))
    runs = []
    model.mha.register_forward_hook(lambda *a: runs.append(1))
    res = ewc_fast.estimate_importance(model, data, ("fisher",), progress=False)
    maps = [t for i, t in enumerate(calls) if t.dim() >= 3 and (i == 0 or calls[i - 1] is not t)]
    assert len(runs) >= len(data) and len(maps) == len(runs)
    assert_close(res["fisher"], reference("self_bf")["fisher"], what="fisher")


def test_handles_names():
    rule = MultiheadAttentionRule()
    assert rule.handles(nn.MultiheadAttention(8, 2)) == (
        "in_proj_weight",
        "in_proj_bias",
        "out_proj.weight",
        "out_proj.bias",
    )
    assert rule.handles(nn.MultiheadAttention(8, 2, bias=False, kdim=3, vdim=5)) == (
        "q_proj_weight",
        "k_proj_weight",
        "v_proj_weight",
        "out_proj.weight",
    )
    assert rule.handles(nn.MultiheadAttention(8, 2, add_bias_kv=True)) == (
        "in_proj_weight",
        "in_proj_bias",
        "bias_k",
        "bias_v",
        "out_proj.weight",
        "out_proj.bias",
    )
    assert ewc_fast.estimation.rule_for(nn.MultiheadAttention(8, 2)).__class__ is MultiheadAttentionRule


@pytest.mark.parametrize("name", ["self_sf", "cross_bf", "mask3d", "weights_avg", "reuse", "tied_outproj", "cross_kv"])
def test_sample_chunking_gives_the_same_result(name, monkeypatch, no_fallback):
    from ewc_fast.estimation.rules import base as rules_base

    monkeypatch.setattr(rules_base, "CHUNK_BYTES", 64)
    monkeypatch.setattr(importlib.import_module("ewc_fast.ops.persample._torch"), "CHUNK_BYTES", 64)
    check(name, run_case(name, "torch"))


@pytest.mark.skipif(not TRITON, reason="Triton or kernels/persample.py not available")
def test_triton_interpreter_small(no_fallback):
    if "triton" not in ewc_fast.available_backends("cpu"):
        pytest.skip("Triton backend needs TRITON_INTERPRET=1 on CPU")
    res = run_case("cross_sf", "triton")
    ref = reference("cross_sf")
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=f"cross_sf/{m}")


def test_frozen_out_proj_and_partial_params(no_fallback):
    """Only some MHA parameters trainable: the others are left out, the rest stays exact."""
    model, data, _ = make_case("self_bf")
    model.mha.out_proj.weight.requires_grad_(False)
    model.mha.in_proj_bias.requires_grad_(False)
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    ref = reference_importance(model, data, ("fisher", "mas"))
    assert "mha.out_proj.weight" not in res["fisher"] and "mha.in_proj_bias" not in res["fisher"]
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=m)


def test_sig_is_magnitude_for_mha():
    model, data, _ = make_case("self_bf")
    res = ewc_fast.estimate_importance(model, data, "sig", progress=False)["sig"]
    assert "mha.in_proj_weight" in res.meta["sig_magnitude_fallback"]
    assert torch.equal(res["mha.in_proj_weight"], model.mha.in_proj_weight.detach().abs())


class FirstLayer(nn.Module):
    """MHA on the model input itself: no captured module below it, so its projections' outputs are
    the frontier the backward stops at."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS, batch_first=False, add_bias_kv=True)
        self.fc = nn.Linear(E, 3)

    def forward(self, x):  # x (N, T, E)
        a, _ = self.mha(x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), need_weights=False)
        return self.fc(a.mean(0))


def test_mha_on_the_model_input(no_fallback):
    torch.manual_seed(3)
    model = FirstLayer()
    x, y = torch.randn(8, 4, E), torch.randint(0, 3, (8,))
    data = ragged(x, y)
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    ref = reference_importance(model, data, ("fisher", "mas"))
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=m)


class Unbatched(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(E, HEADS)
        self.fc = nn.Linear(E, 3)

    def forward(self, x):  # one unbatched (T, E) attention per sample
        outs = [self.mha(s, s, s)[0].mean(0) for s in x]
        return self.fc(torch.stack(outs))


def test_unbatched_inputs_raise():
    x = torch.randn(4, T, E)
    # iterating over the batch splits the samples apart: their provenance is lost, a clear refusal
    with pytest.raises(ValueError, match="unbind along the sample dimension"):
        ewc_fast.estimate_importance(Unbatched(), [(x, torch.zeros(4, dtype=torch.long))], "fisher", progress=False)


@pytest.mark.parametrize("batch_first", [True, False])
def test_watch_records_the_projections(batch_first):
    """What the watch sees inside one call: the packed self-attention projection as PyTorch's blockwise
    copy (kept by autograd anyway, so the projection output itself is not held), a q projection plus a
    stacked kv copy when key is value, and the context (L*N, E)."""
    from ewc_fast.estimation.rules.attention_watch import MHAWatch

    m = nn.MultiheadAttention(E, HEADS, batch_first=batch_first)
    watch = MHAWatch()
    watch.add(m)
    x, kv = torch.randn(3, 4, E), torch.randn(3, 4, E)  # (N, T, E) or (T, N, E): N == T - 1 either way
    n = 3 if batch_first else 4
    with watch:
        m(x, x, x)
        tensors, dims, rec = watch.take(m, n)
        assert rec.entries == [("proj", 0, 3 * E, "in_proj_weight", "stacked")] and dims == [BDim(2)]
        assert tuple(tensors[0].shape) == ((3, 4, 3, E) if batch_first else (3, 3, 4, E))
        assert tuple(rec.ctx.shape) == (12, E)
        m(x, kv, kv)
        tensors, dims, rec = watch.take(m, n)
        assert rec.entries == [("proj", 0, E, "in_proj_weight"), ("proj", E, 2 * E, "in_proj_weight", "stacked")]
        assert dims == [BDim(1), BDim(2)]
        assert watch.take(m, n) == ((), [], None)  # taken once
