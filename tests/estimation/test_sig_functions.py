"""SIG through the function-level rules (parameters that enter ``F.linear``, ``addmm`` with a (in, out)
weight, ``F.embedding``, ``F.layer_norm``, a scale ``weight * x_hat``, a shift ``x + p``, and a tied
embedding / output layer) against the float64 oracle, which takes each factor from the call by
definition (ewc_fast.testing.importance)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import ewc_fast
from ewc_fast.testing.importance import reference_importance
from tests.helpers import ragged, rel

pytestmark = pytest.mark.usefixtures("one_thread")


class Conv1DLike(nn.Module):
    """Hugging Face's ``Conv1D``: ``addmm(bias, x.view(-1, in), weight)`` with weight (in, out)."""

    def __init__(self, i, o):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(i, o) * 0.4)
        self.bias = nn.Parameter(torch.randn(o) * 0.1)

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(x.shape[:-1] + (-1,))


class RMSLike(nn.Module):
    """A Llama-family RMSNorm class: ``weight * (x * rsqrt(mean(x^2) + eps))``."""

    def __init__(self, d):
        super().__init__()
        self.weight = nn.Parameter(1 + 0.2 * torch.randn(d))

    def forward(self, x):
        return self.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6))


class FuncNet(nn.Module):
    """ids -> Embedding -> Conv1D-like -> tanh -> RMSNorm class -> F.layer_norm -> F.linear -> + shift
    -> mean over tokens -> logits through the embedding matrix again (tied output layer)."""

    def __init__(self, vocab=11, d=6):
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(vocab, d)
        self.proj = Conv1DLike(d, d)
        self.rms = RMSLike(d)
        self.ln_w, self.ln_b = nn.Parameter(1 + 0.1 * torch.randn(d)), nn.Parameter(0.1 * torch.randn(d))
        self.fw, self.fb = nn.Parameter(torch.randn(d, d) * 0.4), nn.Parameter(torch.randn(d) * 0.1)
        self.shift = nn.Parameter(torch.randn(d) * 0.3)

    def forward(self, ids):
        h = self.rms(torch.tanh(self.proj(self.emb(ids))))
        h = F.layer_norm(h, (h.shape[-1],), self.ln_w, self.ln_b, 1e-5)
        h = F.linear(h, self.fw, self.fb) + self.shift
        return F.linear(h.mean(1), self.emb.weight)


def test_sig_through_function_rules_matches_the_oracle():
    """Every parameter gets its SIG factor from a function rule (none falls back to |w|), equal to the
    float64 oracle's: fp32 sums of a few hundred |.| terms, far inside 1e-5. Ragged batches, a batch of 1."""
    model = FuncNet()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 11, (8, 5), generator=g)
    data = ragged(ids, torch.randint(0, 11, (8,), generator=g), (3, 1, 4))
    res = ewc_fast.estimate_importance(model, data, ("sig", "fisher"), progress=False)
    ref = reference_importance(model, data, ("sig", "fisher"))
    assert res["fisher"].meta["fallback"] == {} and res["sig"].meta["sig_magnitude_fallback"] == []
    for name, p in model.named_parameters():
        assert not torch.equal(res["sig"][name], p.detach().abs()), f"{name}: |w| fallback"
        for m in ("sig", "fisher"):
            a = res[m][name]
            assert bool(torch.isfinite(a).all()), (m, name)
            assert rel(a, ref[m][name]) <= 1e-5, (m, name, rel(a, ref[m][name]))
