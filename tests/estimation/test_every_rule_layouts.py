"""Sequence-first layouts and N == T for EVERY rule and the fallback, against the float64 per-sample
loop oracle (ewc_fast.testing.per_sample), which knows nothing of layouts: each sample is cut from the
batch and run alone.

N == T == C (== the feature size where a layer allows it), so no size can tell the sample dimension
apart. Each module rule (Linear, Embedding, LayerNorm, RMSNorm, GroupNorm, BatchNorm, Conv1d/2d/3d,
MultiheadAttention) and each function rule (linear, addmm, matmul, mm, embedding, layer_norm,
rms_norm, group_norm, conv1d/2d/3d, broadcast mul / add / sub / rsub / expand / expand_as /
broadcast_to) is called on a sequence-first (T, N, ...) tensor or, where the function fixes the
samples to dim 0 (convolutions, group / batch norm), on an (N, C, L) tensor with N == C == L; the
flattened (T*N, E) view (samples inner, positions outer) reaches addmm and mm. The fallback is served
a sequence-first nn.LSTM (batch_first=False) and a module with no rule.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ewc_fast
from ewc_fast.testing.per_sample import loop_reference
from tests.helpers import assert_close

pytestmark = pytest.mark.usefixtures("one_thread")
N = T = E = 4  # N == T == E: every candidate dimension has the same size
V, C = 7, 3


class Functional(nn.Module):
    """No module rule: every parameter enters through a torch function (the function rules)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(5)

        def p(*shape, base=0.0):
            return nn.Parameter(torch.randn(*shape, generator=g) * 0.4 + base)

        self.w_lin, self.b_lin = p(E, E), p(E)
        self.w_addmm, self.b_addmm = p(E, E), p(E)
        self.w_matmul, self.w_mm = p(E, E), p(E, E)
        self.table = p(V, E)
        self.ln_w, self.ln_b = p(E, base=1.0), p(E)
        self.rms_w = p(E, base=1.0)
        self.gn_w, self.gn_b = p(E, base=1.0), p(E)
        self.c1_w, self.c1_b = p(E, E, 3), p(E)
        self.c2_w, self.c2_b = p(E, 1, 1, 3), p(E)
        self.c3_w, self.c3_b = p(E, 1, 1, 1, 3), p(E)
        self.scale, self.shift, self.sub_p, self.rsub_p = p(E, base=1.0), p(E), p(E), p(E)
        self.exp_p, self.exp_as_p, self.bcast_p = p(1, 1, E), p(1, 1, E), p(1, E)

    def forward(self, ids):  # ids (N, T)
        s = ids.t()  # (T, N): sequence-first
        h = F.embedding(s, self.table)  # (T, N, E)
        h = torch.tanh(F.linear(h, self.w_lin, self.b_lin))
        flat = h.reshape(-1, E)  # (T*N, E): positions outer, samples inner
        flat = torch.tanh(torch.addmm(self.b_addmm, flat, self.w_addmm))
        flat = torch.tanh(torch.mm(flat, self.w_mm))
        h = flat.view(T, -1, E)
        h = torch.tanh(h @ self.w_matmul)
        h = F.layer_norm(h, (E,), self.ln_w, self.ln_b)
        h = F.rms_norm(h, (E,), self.rms_w, eps=1e-5)
        h = torch.tanh(h * self.scale + self.shift)
        h = (h - self.sub_p) + torch.rsub(self.rsub_p, h)
        h = h + self.exp_p.expand(T, h.shape[1], E) + self.exp_as_p.expand_as(h)
        h = h * torch.broadcast_to(self.bcast_p, (h.shape[1], E))
        x = h.permute(1, 2, 0)  # (N, E, T): samples first for the convolutions and group norm
        x = F.group_norm(x, 2, self.gn_w, self.gn_b)
        x = torch.tanh(F.conv1d(x, self.c1_w, self.c1_b, padding=1))
        x2 = torch.tanh(F.conv2d(x.unsqueeze(1), self.c2_w, self.c2_b, padding=(0, 1)))  # (N, E, E, T)
        x3 = torch.tanh(F.conv3d(x.unsqueeze(1).unsqueeze(1), self.c3_w, self.c3_b, padding=(0, 0, 1)))
        return x + x2.mean(1) + x3.mean((1, 2))  # (N, E, T)


class NoRule(nn.Module):
    """A parameter entering through torch.diag: no rule, so the torch.func fallback."""

    def __init__(self):
        super().__init__()
        self.d = nn.Parameter(torch.rand(E) + 0.5)

    def forward(self, h):
        return torch.tanh(h @ torch.diag(self.d))


class EveryRule(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(V, E)
        self.lin = nn.Linear(E, E)
        self.ln = nn.LayerNorm(E)
        self.rms = nn.RMSNorm(E)
        self.mha = nn.MultiheadAttention(E, 2, batch_first=False)
        self.lstm = nn.LSTM(E, E)  # batch_first=False: the fallback on a sequence-first input
        self.norule = NoRule()
        self.func = Functional()
        self.gn = nn.GroupNorm(2, E)
        self.bn = nn.BatchNorm1d(E)
        self.c1 = nn.Conv1d(E, E, 3, padding=1)
        self.c2 = nn.Conv2d(1, 2, 3, padding=1)
        self.c3 = nn.Conv3d(1, 1, (1, 1, 3), padding=(0, 0, 1))
        self.head = nn.Linear(E, C)
        with torch.no_grad():  # move the norms off their constant init
            for m in (self.ln, self.rms, self.gn, self.bn):
                m.weight.add_(torch.randn_like(m.weight) * 0.3)
                if getattr(m, "bias", None) is not None:
                    m.bias.add_(torch.randn_like(m.bias) * 0.3)
            self.bn.running_mean.normal_(0, 0.3)
            self.bn.running_var.uniform_(0.5, 1.5)

    def forward(self, ids):  # ids (N, T)
        h = self.emb(ids.t())  # (T, N, E)
        h = self.rms(self.ln(torch.tanh(self.lin(h))))
        h = h + self.mha(h, h, h, need_weights=False)[0]
        h = self.lstm(h)[0]
        h = self.norule(h)
        x = self.func(ids) + h.permute(1, 2, 0)  # (N, E, T)
        x = torch.tanh(self.c1(self.bn(self.gn(x))))
        x = x + self.c2(x.unsqueeze(1)).mean(1) + self.c3(x.unsqueeze(1).unsqueeze(1))[:, 0, 0]
        return self.head(x.mean(-1))


def _data():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, V, (7, T), generator=g), torch.randint(0, C, (7,), generator=g)
    return [(x[:N], y[:N]), (x[N : N + 1], y[N : N + 1]), (x[N + 1 :], y[N + 1 :])]  # N == T, 1, ragged


def test_every_rule_and_the_fallback_sequence_first_with_n_equal_t():
    model = EveryRule().eval()
    data = _data()
    methods = ("fisher", "mas", "fisher_exact", "fisher_mc")
    res = ewc_fast.estimate_importance(model, data, methods, progress=False, generator=torch.Generator().manual_seed(2))
    ref = loop_reference(model, data, methods, generator=torch.Generator().manual_seed(2))
    for m in methods:
        # fp32 sums of a few hundred terms against float64: far below 1e-5 relative (tests/helpers.TOL)
        assert_close(res[m], ref[m], what=m)
    fb = res["fisher"].meta["fallback"]
    lstm = {k for k, _ in model.named_parameters() if k.startswith("lstm.")}
    assert set(fb) == lstm | {"norule.d"}, sorted(fb)


class ReadsAttributes(nn.Module):
    """A parent reading its child's weight.dtype / .device / .shape (ViT embeddings, T5 feed-forward,
    PEFT LoRA do this): no use of the parameter, so the Linear rule still serves it."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(E, E)
        self.head = nn.Linear(E, C)

    def forward(self, x):
        w = self.lin.weight
        h = x.to(w.dtype).to(w.device).reshape(-1, T, w.shape[1])
        return self.head(torch.tanh(self.lin(h)).mean(1))


def test_reading_weight_attributes_is_no_use():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(5, T, E, generator=g), torch.randint(0, C, (5,), generator=g)
    model = ReadsAttributes()
    data = [(x[:N], y[:N]), (x[N:], y[N:])]
    res = ewc_fast.estimate_importance(model, data, ("fisher", "mas"), progress=False)
    assert res["fisher"].meta["fallback"] == {}
    ref = loop_reference(model, data, ("fisher", "mas"))
    for m in ("fisher", "mas"):
        assert_close(res[m], ref[m], what=m)
