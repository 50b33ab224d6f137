"""Sample dimensions by provenance, never by sizes: sequence-first layouts with N == T for every rule
and the fallback, a T5-style relative bias on a shared (T, T) bucket matrix, flattened (N*T, F) views;
clear errors where the samples are mixed; the fallback double count, user forward hooks that change
outputs, NaN masked inside the model, the batch contract."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ewc_fast
from ewc_fast.estimation.provenance import BDim, Tracker, Unknown
from ewc_fast.testing.importance import reference_importance
from tests.helpers import assert_close, ragged

pytestmark = pytest.mark.usefixtures("one_thread")
N = T = 4  # N == T: a size can never tell the sample dimension apart


class SeqFirst(nn.Module):
    """Batch-first input (N, T, F) run through sequence-first layers (T, N, F): Linear, LayerNorm,
    Embedding on (T, N) ids, nn.TransformerEncoderLayer(batch_first=False), an RMSNorm-style scale and
    a fallback module (no rule), then mean-pooled."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 8)
        self.lin = nn.Linear(8, 8)
        self.ln = nn.LayerNorm(8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=False)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)
        self.diag = nn.Parameter(torch.rand(8) + 0.5)  # via torch.diag: no rule -> fallback
        self.head = nn.Linear(8, 3)

    def forward(self, ids):  # ids (N, T)
        h = self.emb(ids.t())  # (T, N, 8)
        h = self.ln(torch.tanh(self.lin(h)))
        h = self.enc(h) * self.scale
        h = torch.tanh(h @ torch.diag(self.diag))
        return self.head(h.mean(0))


class RelBias(nn.Module):
    """T5-style relative attention bias: an Embedding on a shared (T, T) bucket matrix, added to
    per-sample scores (N, H, T, T); also a learned position embedding on (1, T) ids."""

    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(9, 8)
        self.pos = nn.Embedding(T, 8)
        self.rel = nn.Embedding(2 * T, 2)
        self.qk = nn.Linear(8, 16)
        self.head = nn.Linear(8, 3)

    def forward(self, ids):
        t = ids.shape[1]
        ar = torch.arange(t)
        h = self.tok(ids) + self.pos(ar.unsqueeze(0))  # (1, T) position ids, broadcast
        buckets = (ar[None, :] - ar[:, None]) + t  # (T, T), shared by all samples
        bias = self.rel(buckets).permute(2, 0, 1).unsqueeze(0)  # (1, H, T, T)
        q, k = self.qk(h).view(ids.shape[0], t, 2, 8).transpose(1, 2).chunk(2, -1)
        scores = q @ k.transpose(-1, -2) + bias
        v = h.view(ids.shape[0], t, 2, 4).transpose(1, 2)
        a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(ids.shape[0], t, 8)
        return self.head(a.mean(1))


def _ids(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 9, (n, T), generator=g), torch.randint(0, 3, (n,), generator=g)


@pytest.mark.parametrize("model_cls", [SeqFirst, RelBias])
def test_sequence_first_and_shared_inputs_are_exact_with_n_equal_t(model_cls):
    torch.manual_seed(0)
    model = model_cls().eval()
    x, y = _ids()
    data = ragged(x, y, (N, 1, 3))
    methods = ("fisher", "mas", "fisher_exact")
    res = ewc_fast.estimate_importance(model, data, methods, progress=False)
    ref = reference_importance(model, data, methods)
    for m in methods:
        assert_close(res[m], ref[m], what=f"{model_cls.__name__}/{m}")
    fb = res["fisher"].meta["fallback"]
    assert set(fb) == ({"diag"} if model_cls is SeqFirst else set()), fb


def test_view_and_transpose_provenance_is_arithmetic():
    tr = Tracker(N)
    x = torch.randn(N, T, 6)
    tr.mark_inputs([x])
    with tr:
        flat = x.reshape(-1, 6)  # (N*T, 6): samples outer, positions inner
        seq = x.transpose(0, 1)  # (T, N, 6)
        seq_flat = seq.reshape(-1, 6)  # (T*N, 6): positions outer
        back = flat.view(N, T, 6)
        mixed = x.mean(0)
        picked = x[torch.arange(N), 0]
    assert tr.get(flat) == BDim(0, 1, T)
    assert tr.get(seq) == BDim(1)
    assert tr.get(seq_flat) == BDim(0, T, 1)
    assert tr.get(back) == BDim(0)
    assert isinstance(tr.get(mixed), Unknown) and "mixes the samples" in tr.get(mixed).reason
    assert tr.get(picked) == BDim(0)  # an advanced index verified to be arange(N)


class MixesSamples(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x):
        h = self.a(x)
        return self.b(h - h.mean(0))  # couples the samples: per-sample gradients are undefined


def test_mixed_samples_are_refused_clearly():
    x, y = torch.randn(5, 6), torch.randint(0, 3, (5,))
    with pytest.raises(ValueError, match="mixes the samples"):
        ewc_fast.estimate_importance(MixesSamples(), [(x, y)], "fisher", progress=False)


class ReturnsWhatItConsumes(nn.Module):
    """A fallback module returning a hidden state it also consumes (the double-count trap)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.rand(5) + 0.5)

    def forward(self, x):
        h1 = torch.tanh(x @ torch.diag(self.w))
        h2 = torch.tanh(h1 @ torch.diag(self.w))
        return h2, h1


class DoubleCount(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = ReturnsWhatItConsumes()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        h2, h1 = self.inner(x)
        return self.head(h2 + h1)


def test_fallback_output_also_consumed_inside_is_not_counted_twice():
    torch.manual_seed(1)
    model = DoubleCount()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    data = ragged(x, y, (4, 2))
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    ref = reference_importance(model, data, ("fisher", "mas"))
    assert "inner.w" in res["fisher"].meta["fallback"]
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=m)


def test_user_forward_hook_that_changes_the_output():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    model[2].register_forward_pre_hook(lambda m, i: (i[0] * 0.5,))
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    data = ragged(x, y, (4, 2))
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    ref = reference_importance(model, data, ("fisher", "mas"))
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=m)


class MaskedNaN(nn.Module):
    def __init__(self, after):
        super().__init__()
        self.after = after
        self.a = nn.Linear(6, 5)
        self.b = nn.Linear(5, 3)

    def forward(self, x):
        h = torch.log(self.a(x))  # NaN where the pre-activation is negative
        if self.after:  # b reads the NaN, its output is masked: b's weight gradient is 0 * NaN
            return torch.nan_to_num(self.b(h))
        return self.b(torch.nan_to_num(h))  # masked before b: every gradient is finite


def test_nan_masked_inside_the_model_is_exact_or_a_clear_error():
    torch.manual_seed(3)
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    before = MaskedNaN(after=False)
    res = ewc_fast.estimate_importance(before, [(x, y)], ("fisher", "mas"), progress=False)
    ref = reference_importance(before, [(x, y)], ("fisher", "mas"))
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=m)
    after = MaskedNaN(after=True)
    assert bool(torch.isfinite(after(x)).all())
    with pytest.raises(ValueError, match="masks .*nan_to_num"):
        ewc_fast.estimate_importance(after, [(x, y)], ("fisher", "mas"), progress=False)


def test_batch_contract_names_the_disagreeing_tensors():
    """A shared tensor first in the batch (a (7, 7) mask) used to set N and fail later with a loss
    message; the batch contract now names it."""

    class WithMask(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(7, 3)

        def forward(self, mask, x):
            return self.fc(x @ mask)

    x, y = torch.randn(4, 7), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"disagree on the leading \(sample\) dimension.*\(7, 7\)"):
        ewc_fast.estimate_importance(WithMask(), [((torch.eye(7), x), y)], "fisher", progress=False)


def test_torch_compiled_model():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    x, y = torch.randn(6, 6), torch.randint(0, 3, (6,))
    data = ragged(x, y, (4, 2))
    compiled = torch.compile(model)
    res = ewc_fast.estimate_importance(compiled, data, ("fisher", "mas"), progress=False)
    ref = reference_importance(model, data, ("fisher", "mas"))
    for m in ("fisher", "mas"):
        assert_close({k.removeprefix("_orig_mod."): v for k, v in res[m].items()}, ref[m], what=m)
    assert all(k.startswith("_orig_mod.") for k in res["fisher"])  # the names of the model passed
    _ = F


def test_boolean_mask_pooling_provenance():
    """x[mask, :] with the same number c of selected positions per sample: samples in blocks of c along
    dim 0 (Hugging Face's eos pooling); different counts: refused with the reason."""
    x = torch.randn(N, T, 6)
    ids = torch.tensor([[1, 2, 9, 9], [9, 3, 9, 1], [9, 9, 0, 0], [5, 9, 9, 5]])
    tr = Tracker(N)
    tr.mark_inputs([x, ids])
    with tr:
        sel = x[ids.eq(9), :]  # two positions per sample
        pooled = sel.view(N, -1, 6)[:, -1, :]
        uneven = x[ids.eq(1)]
    assert tr.get(sel) == BDim(0, 1, 2) and tr.get(pooled) == BDim(0)
    assert isinstance(tr.get(uneven), Unknown) and "different number" in tr.get(uneven).reason
