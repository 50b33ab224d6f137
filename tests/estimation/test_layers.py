"""estimate_importance vs the float64 oracle (ewc_fast.testing.importance), layer by layer.

Target: relative error ||est - ref|| / ||ref|| <= 1e-5 per parameter in fp32, NaN never passing.
Every model runs every applicable method in one call on ragged batches (3, 1, 4 samples).
"""

import importlib
import importlib.util

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ewc_fast
from ewc_fast.testing.importance import reference_importance
from tests.helpers import ALL, TOKEN, TRITON, assert_close, cached_reference, cuda_marks, ragged
from tests.helpers import run_case as _run_case


# ------------------------------------------------------------------------------------------ models
class SeqCls(nn.Module):
    """Linear over a sequence (N, T, in), mean over T, classifier."""

    def __init__(self, bias=True):
        super().__init__()
        self.a = nn.Linear(5, 4, bias=bias)
        self.b = nn.Linear(4, 3, bias=bias)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)).mean(1))


class SeqTok(nn.Module):
    """Token outputs (N, T, C); targets (N, T) with -100 ignored; a 4-D Linear input too."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(5, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.a(x.unsqueeze(2).expand(-1, -1, 2, -1))).sum(2)
        return self.b(h)


def flat_size(module, shape):
    with torch.no_grad():
        return module.eval()(torch.zeros((2,) + shape)).flatten(1).shape[1]


class ConvNet(nn.Module):
    def __init__(self, conv, shape, n_cls=3, norm=None):
        super().__init__()
        self.conv, self.norm = conv, norm
        self.fc = nn.Linear(flat_size(conv, shape), n_cls)

    def forward(self, x):
        h = self.conv(x)
        if self.norm is not None:
            h = self.norm(h)
        return self.fc(torch.tanh(h).flatten(1))


class EmbNet(nn.Module):
    def __init__(self, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(10, 4, padding_idx=padding_idx)
        self.fc = nn.Linear(4, 3)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)).sum(1))


def norm_net(norm, pre, shape):
    class _N(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre, self.norm, self.fc = pre, norm, nn.Linear(flat_size(pre, shape), 3)

        def forward(self, x):
            return self.fc(torch.tanh(self.norm(self.pre(x))).flatten(1))

    return _N()


class MHANet(nn.Module):
    def __init__(self, batch_first, bias=True):
        super().__init__()
        self.batch_first = batch_first
        self.inp = nn.Linear(3, 4)
        self.mha = nn.MultiheadAttention(4, 2, batch_first=batch_first, bias=bias)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):  # x (N, T, 3)
        h = self.inp(x)
        if not self.batch_first:
            h = h.transpose(0, 1)
        a, _ = self.mha(h, h, h)
        if not self.batch_first:
            a = a.transpose(0, 1)
        return self.fc(a.mean(1))


class CustomParam(nn.Module):
    """An nn.Parameter used directly in forward (fallback on the root)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(5, 3)
        self.scale = nn.Parameter(torch.rand(3) + 0.5)
        self.shift = nn.Parameter(torch.randn(5) * 0.1)

    def forward(self, x):
        return self.fc(x + self.shift) * self.scale


class TiedReuse(nn.Module):
    """Tied embedding / output layer, a Linear applied twice (weight reuse), and an F.linear use of a
    Linear's weight outside its module."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=1)
        self.mid = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.emb.weight
        self.side = nn.Linear(4, 4)

    def forward(self, ids):
        h = self.emb(ids)  # (N, T, 4)
        h = torch.tanh(self.mid(torch.tanh(self.mid(h))))
        h = h + 0.1 * F.linear(h, self.side.weight)
        return self.head(h.mean(1))  # (N, 7)


class Mixed(nn.Module):
    """Every layer type at once, with reuse and tying."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 8, padding_idx=0)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.c2 = nn.Conv2d(1, 2, 2, stride=1, padding="same", padding_mode="reflect", bias=False)
        self.bn = nn.BatchNorm2d(2)
        self.ln = nn.LayerNorm(8)
        self.rms = nn.RMSNorm(8)
        self.mha = nn.MultiheadAttention(8, 2, batch_first=True)
        self.lin = nn.Linear(8, 8)
        self.head = nn.Linear(8, 5, bias=False)
        self.head.weight = self.emb.weight
        self.gate = nn.Parameter(torch.tensor(0.7))

    def forward(self, ids):
        h = self.emb(ids)  # (N, T, 8)
        h = self.gn(self.c1(h.transpose(1, 2))).transpose(1, 2)
        img = self.bn(self.c2(h.unsqueeze(1)))  # (N, 2, T, 8)
        h = h + img.mean(1)
        h = self.ln(torch.tanh(self.lin(h)))
        h = self.rms(torch.tanh(self.lin(h)))  # reuse of lin
        a, _ = self.mha(h, h, h, need_weights=False)
        h = h + self.gate * a
        return self.head(h.mean(1))


def randomize_bn(m):
    for mod in m.modules():
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            mod.running_mean.uniform_(-0.5, 0.5)
            mod.running_var.uniform_(0.5, 1.5)
        if isinstance(mod, (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._BatchNorm)):
            if getattr(mod, "weight", None) is not None:
                nn.init.uniform_(mod.weight, 0.5, 1.5)
            if getattr(mod, "bias", None) is not None:
                nn.init.uniform_(mod.bias, -0.3, 0.3)
    return m


def cls_data(shape, n_cls=3, n=8, ints=None):
    x = torch.randint(0, ints, (n,) + shape) if ints else torch.randn((n,) + shape)
    return x, torch.randint(0, n_cls, (n,))


def make_case(name):
    """(model, data, methods) of a named case; deterministic."""
    torch.manual_seed(sum(map(ord, name)))
    if name.startswith("linear"):
        bias = name.endswith("bias")
        m = nn.Sequential(nn.Linear(6, 5, bias=bias), nn.Tanh(), nn.Linear(5, 3, bias=bias))
        return m, ragged(*cls_data((6,))), ALL
    if name.startswith("seqcls"):
        return SeqCls(bias=name.endswith("bias")), ragged(*cls_data((4, 5))), ALL
    if name == "seqtok":
        x = torch.randn(8, 4, 5)
        y = torch.randint(0, 3, (8, 4))
        y[0, 1] = y[3, 0] = y[5, 3] = -100
        return SeqTok(), ragged(x, y), TOKEN
    if name.startswith("conv"):
        convs = {
            "conv1d": (nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2, bias=False), (2, 9)),
            "conv1d_bias": (nn.Conv1d(2, 4, 3, stride=2, padding=2, dilation=2), (2, 9)),
            "conv1d_circular_groups": (nn.Conv1d(4, 6, 3, padding=1, padding_mode="circular", groups=2), (4, 7)),
            "conv2d": (
                nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2, bias=False),
                (4, 5, 5),
            ),
            "conv2d_bias": (
                nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
                (4, 5, 5),
            ),
            "conv2d_same_reflect": (nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect"), (2, 4, 5)),
            "conv3d": (nn.Conv3d(2, 2, 2, stride=(1, 2, 1), padding=1, bias=False), (2, 3, 3, 3)),
            "conv3d_bias": (nn.Conv3d(2, 4, 2, stride=(1, 2, 1), padding=(1, 0, 1), groups=2), (2, 3, 3, 3)),
        }
        conv, shape = convs[name]
        return ConvNet(conv, shape), ragged(*cls_data(shape)), ALL
    if name == "embedding":
        x, y = cls_data((6,), ints=10)
        x[0, :3] = 4  # duplicates inside a sample
        x[1, 0] = 0  # padding idx
        return EmbNet(0), ragged(x, y), ALL
    if name == "embedding_nopad":
        x, y = cls_data((6,), ints=10)
        x[2, :] = 7
        return EmbNet(None), ragged(x, y), ALL
    norms = {
        "layernorm": (nn.LayerNorm(4), nn.Linear(6, 4), (6,)),
        "layernorm_nobias": (nn.LayerNorm(4, bias=False), nn.Linear(6, 4), (6,)),
        "layernorm_seq2d": (nn.LayerNorm((3, 4)), nn.Linear(6, 4), (3, 6)),
        "rmsnorm": (nn.RMSNorm(4), nn.Linear(6, 4), (6,)),
        "rmsnorm_seq_eps": (nn.RMSNorm(4, eps=1e-3), nn.Linear(6, 4), (3, 6)),
        "groupnorm": (nn.GroupNorm(2, 4), nn.Conv1d(2, 4, 3), (2, 5)),
        "batchnorm1d": (nn.BatchNorm1d(4), nn.Linear(6, 4), (6,)),
        "batchnorm1d_seq": (nn.BatchNorm1d(4), nn.Conv1d(2, 4, 2), (2, 5)),
        "batchnorm2d": (nn.BatchNorm2d(3), nn.Conv2d(2, 3, 2), (2, 3, 3)),
        "batchnorm2d_noaffine": (nn.BatchNorm2d(3, affine=False), nn.Conv2d(2, 3, 2), (2, 3, 3)),
        "batchnorm3d": (nn.BatchNorm3d(2), nn.Conv3d(1, 2, 2), (1, 3, 3, 3)),
    }
    if name in norms:
        norm, pre, shape = norms[name]
        return randomize_bn(norm_net(norm, pre, shape)), ragged(*cls_data(shape)), ALL
    if name.startswith("mha"):
        return MHANet(batch_first=name == "mha_batch_first", bias=True), ragged(*cls_data((4, 3))), ALL
    if name == "custom_param":
        return CustomParam(), ragged(*cls_data((5,))), ALL
    if name == "tied_reuse":
        x, y = cls_data((5,), n_cls=7, ints=7)
        x[0, :2] = 3
        return TiedReuse(), ragged(x, y), ALL
    if name == "mixed":
        x, y = cls_data((5,), n_cls=5, ints=5)
        x[0, :2] = 3
        x[1, 0] = 0
        return randomize_bn(Mixed()), ragged(x, y), ALL
    raise KeyError(name)


CASES = [
    "linear",
    "linear_bias",
    "seqcls",
    "seqcls_bias",
    "seqtok",
    "conv1d",
    "conv1d_bias",
    "conv1d_circular_groups",
    "conv2d",
    "conv2d_bias",
    "conv2d_same_reflect",
    "conv3d",
    "conv3d_bias",
    "embedding",
    "embedding_nopad",
    "layernorm",
    "layernorm_nobias",
    "layernorm_seq2d",
    "rmsnorm",
    "rmsnorm_seq_eps",
    "groupnorm",
    "batchnorm1d",
    "batchnorm1d_seq",
    "batchnorm2d",
    "batchnorm2d_noaffine",
    "batchnorm3d",
    "mha_batch_first",
    "mha_seq_first",
    "custom_param",
    "tied_reuse",
    "mixed",
]


def reference(name):
    """Float64 oracle of case ``name`` (cached)."""
    return cached_reference(make_case, name)


def run_case(name, backend, device="cpu", **kw):
    return _run_case(make_case, name, backend, device, **kw)


#: cases whose statistics go through ewc_fast.ops.persample_sq_ in interesting shapes (T = 1, T > 1, groups,
#: reuse): also run on the C++ backend (the norm / embedding / fallback rules do not depend on the backend)
CPP_CASES = [
    "linear_bias",
    "seqcls_bias",
    "seqtok",
    "conv1d_circular_groups",
    "conv2d_bias",
    "conv3d_bias",
    "tied_reuse",
    "mixed",
]


#: on a card: every case with the torch backend, and the persample cases with the Triton kernels
#: compiled for it (TF32 off: the 1e-5 bound is an fp32 one)
CUDA_RUNS = [pytest.param(c, "torch", "cuda", marks=cuda_marks(), id=f"{c}-torch-cuda") for c in CASES] + [
    pytest.param(c, "triton", "cuda", marks=cuda_marks(triton=True), id=f"{c}-triton-cuda") for c in CPP_CASES
]


@pytest.mark.parametrize(
    "name,backend,device",
    [(c, "torch", "cpu") for c in CASES] + [(c, "cpp", "cpu") for c in CPP_CASES] + CUDA_RUNS,
)
def test_matches_float64_oracle(name, backend, device, cuda_strict):
    if backend == "cpp" and "cpp" not in ewc_fast.available_backends("cpu"):
        pytest.skip("C++ extension not built")
    res, methods = run_case(name, backend, device)
    ref = reference(name)
    assert list(res) == list(methods)
    for m in methods:
        assert res[m].method == m and res[m].n_samples == (0 if m in ("magnitude", "random") else 8)
        assert_close(res[m], ref[m], what=f"{name}/{m}")


def test_batch_of_one_and_n_samples_truncation():
    torch.manual_seed(0)
    model = SeqCls(bias=True)
    x, y = cls_data((4, 5), n=9)
    one = [(x[:1], y[:1])]
    assert_close(
        ewc_fast.estimate_importance(model, one, "fisher", progress=False)["fisher"],
        reference_importance(model, one, "fisher")["fisher"],
    )
    data = ragged(x, y, (4, 5))
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), n_samples=6, progress=False)
    ref = reference_importance(model, data, ("fisher", "mas"), n_samples=6)
    assert res["fisher"].n_samples == 6
    assert_close(res["fisher"], ref["fisher"])
    assert_close(res["mas"], ref["mas"])


def test_mas_softmax_and_batch_size_invariance():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4))
    x, y = cls_data((6,), n_cls=4, n=12)
    a = ewc_fast.estimate_importance(
        model, ragged(x, y, (12,)), ("fisher", "mas"), mas_output="softmax", progress=False
    )
    b = ewc_fast.estimate_importance(
        model, ragged(x, y, (5, 5, 2)), ("fisher", "mas"), mas_output="softmax", progress=False
    )
    ref = reference_importance(model, ragged(x, y, (12,)), ("mas",), mas_output="softmax")
    assert_close(a["mas"], ref["mas"])
    assert_close(b["mas"], ref["mas"])
    for k in a["fisher"]:
        torch.testing.assert_close(a["fisher"][k], b["fisher"][k], rtol=1e-5, atol=0)
    assert b["mas"].meta["mas_output"] == "softmax"


def test_custom_loss_and_sig_activation():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.LeakyReLU(0.1), nn.Linear(5, 1))
    x = torch.randn(8, 6)
    y = torch.randn(8)

    def mse(out, t):
        return (out.squeeze(-1) - t).square()

    act = {"0": lambda t: F.leaky_relu(t, 0.1)}
    data = ragged(x, y)
    res = ewc_fast.estimate_importance(
        model, data, ("fisher", "sig", "mas"), loss_fn=mse, sig_activation=act, progress=False
    )
    ref = reference_importance(model, data, ("fisher", "sig", "mas"), loss_fn=mse, sig_activation=act)
    for m in ("fisher", "sig", "mas"):
        assert_close(res[m], ref[m], what=m)
    assert res["sig"].meta["sig_activation"] == ["0"]
    plain = ewc_fast.estimate_importance(model, data, "sig", progress=False)["sig"]
    assert not torch.allclose(plain["0.bias"], res["sig"]["0.bias"])


def test_fisher_batched_is_labelled_approximate():
    model, data, _ = make_case("linear_bias")
    res = ewc_fast.estimate_importance(model, data, ("fisher_batched",), progress=False)["fisher_batched"]
    assert res.meta["approximate"] is True and res.meta["batch_size_dependent"] is True
    assert res.meta["n_batches"] == 3


def test_random_and_magnitude_need_no_data():
    model = nn.Linear(3, 2)
    res = ewc_fast.estimate_importance(model, [], ("magnitude", "random"), generator=torch.Generator().manual_seed(0))
    assert torch.equal(res["magnitude"]["weight"], model.weight.detach().abs())
    r = res["random"]["weight"]
    assert r.min() >= 0 and r.max() < 1
    again = ewc_fast.estimate_importance(model, [], "random", generator=torch.Generator().manual_seed(0))["random"]
    assert torch.equal(again["weight"], r)


def test_inplace_activation_after_linear_is_detected():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 3))
    model_ref = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    model_ref.load_state_dict(model.state_dict())
    x, y = cls_data((6,))
    data = ragged(x, y)
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas", "sig"), progress=False)
    ref = reference_importance(model_ref, data, ("fisher", "mas", "sig"))
    for m in ("fisher", "mas", "sig"):
        assert_close(res[m], ref[m], what=m)


def test_frozen_params_are_left_out():
    model, data, _ = make_case("linear_bias")
    model[0].weight.requires_grad_(False)
    res = ewc_fast.estimate_importance(model, data, ("fisher", "sig"), progress=False)
    ref = reference_importance(model, data, ("fisher", "sig"))
    assert "0.weight" not in res["fisher"]
    assert_close(res["fisher"], ref["fisher"])
    assert_close(res["sig"], ref["sig"])


@pytest.mark.skipif(not TRITON, reason="Triton or kernels/persample.py not available")
@pytest.mark.parametrize("name", ["seqcls_bias", "conv1d_bias"])
def test_triton_interpreter_small(name):
    if "triton" not in ewc_fast.available_backends("cpu"):
        pytest.skip("Triton backend needs TRITON_INTERPRET=1 on CPU")
    res, methods = run_case(name, "triton")
    ref = reference(name)
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=f"{name}/{m}")


@pytest.mark.parametrize("name", ["conv2d_bias", "embedding", "tied_reuse", "mixed", "seqcls_bias"])
def test_sample_chunking_gives_the_same_result(name, monkeypatch):
    """A tiny chunk budget forces every chunked path (im2col, embedding scatter, tied parameters,
    torch.func fallback, persample_sq_'s own chunks) to split the batch sample by sample."""
    from ewc_fast.estimation.rules import base as rules_base

    monkeypatch.setattr(rules_base, "CHUNK_BYTES", 64)
    torch_persample = importlib.import_module("ewc_fast.ops.persample._torch")
    monkeypatch.setattr(torch_persample, "CHUNK_BYTES", 64)
    res, methods = run_case(name, "torch")
    ref = reference(name)
    for m in methods:
        assert_close(res[m], ref[m], what=f"{name}/{m}")
