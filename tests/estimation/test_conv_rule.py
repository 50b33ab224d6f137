"""Convolution rules (direct per-sample kernel) vs the float64 oracle, on awkward CNNs.

Every case runs Fisher, MAS (and the other methods of ``ALL`` where cheap) through
``estimate_importance`` and compares with ``ewc_fast.testing.importance.reference_importance``
(relative error <= 1e-5 per parameter, tests/helpers.py): ragged batches (3, 1, 4 samples, so N = 1
occurs), N == spatial size, channels-last inputs, depthwise and grouped convolutions, stride,
dilation, 'same' padding, circular padding, a module called twice (the unfolding path), transposed
convolutions (stride, output_padding, groups, dilation) and one BatchNorm in eval mode.
"""

import pytest
import torch
from torch import nn

import ewc_fast
from tests.helpers import ALL, assert_close, cached_reference, cuda_marks, ragged
from tests.helpers import run_case as _run_case

FAST = ("fisher", "fisher_exact", "mas", "sig", "fisher_batched")


class DepthwiseSeparable(nn.Module):
    """Depthwise 3x3 (stride 2) + pointwise 1x1 + depthwise (multiplier 2, dilation 2), BatchNorm (eval);
    fed channels-last inputs (the activations stay channels-last in eager mode)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.dw = nn.Conv2d(4, 4, 3, stride=2, padding=1, groups=4)
        self.bn = nn.BatchNorm2d(4)
        self.pw = nn.Conv2d(4, 6, 1)
        self.dw2 = nn.Conv2d(6, 12, 3, padding="same", groups=6, dilation=2, bias=False)  # multiplier 2
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        h = torch.relu(self.bn(self.dw(h)))
        h = torch.tanh(self.dw2(torch.relu(self.pw(h))))
        return self.fc(h.mean((2, 3)))


class Reuse(nn.Module):
    """One conv applied twice per forward (per-sample gradients summed over calls before squaring)."""

    def __init__(self):
        super().__init__()
        self.c = nn.Conv1d(3, 3, 3, padding=1, padding_mode="circular")
        self.fc = nn.Linear(3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c(torch.tanh(self.c(x)))).mean(2))


class Transposed(nn.Module):
    """Conv -> ConvTranspose2d (stride 2, output_padding 1, groups 2, dilation) -> ConvTranspose1d."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=(1, 2))
        self.up1 = nn.ConvTranspose1d(6, 2, 2, stride=3, bias=False)
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        h = torch.tanh(self.up(torch.tanh(self.down(x))))
        h = torch.tanh(self.up1(h.mean(2)))
        return self.fc(h.mean(2))


class Transposed3d(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.ConvTranspose3d(2, 2, 2, stride=(1, 2, 1), padding=(0, 1, 0))
        self.fc = nn.Linear(2, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.up(x)).mean((2, 3, 4)))


class SeedCNN(nn.Module):
    """3 conv + BatchNorm + 1 linear (the seed papers' layout), tiny."""

    def __init__(self):
        super().__init__()
        layers, c = [], 1
        for w in (4, 6, 8):
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.features(x).flatten(1))


def _randomize_bn(model):
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


def make_case(name):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    if name == "depthwise_separable":
        model, shape, methods = _randomize_bn(DepthwiseSeparable()), (2, 7, 6), FAST
    elif name == "n_equals_spatial":  # 8 samples, 8 positions: a mixed-up sample dim would go unnoticed by shape
        model, shape, methods = nn.Sequential(nn.Conv1d(2, 3, 1), nn.Flatten(), nn.Linear(24, 3)), (2, 8), ALL
    elif name == "reuse_circular":
        model, shape, methods = Reuse(), (3, 6), FAST
    elif name == "transposed":
        model, shape, methods = Transposed(), (2, 5, 6), FAST
    elif name == "transposed3d":
        model, shape, methods = Transposed3d(), (2, 3, 3, 3), FAST
    elif name == "seed_cnn":
        model, shape, methods = _randomize_bn(SeedCNN()), (1, 8, 8), FAST
    else:
        raise KeyError(name)
    x = torch.randn(8, *shape, generator=g)
    if name == "depthwise_separable":
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 3, (8,), generator=g)
    return model, ragged(x, y), methods


CASES = ["depthwise_separable", "n_equals_spatial", "reuse_circular", "transposed", "transposed3d", "seed_cnn"]


@pytest.mark.parametrize(
    "backend,device",
    [
        ("torch", "cpu"),
        ("cpp", "cpu"),
        pytest.param("torch", "cuda", marks=cuda_marks(), id="torch-cuda"),
        pytest.param("triton", "cuda", marks=cuda_marks(triton=True), id="triton-cuda"),
    ],
)
@pytest.mark.parametrize("name", CASES)
def test_conv_rules_match_float64_oracle(name, backend, device, cuda_strict):
    # on a card: TF32 off (cuda_strict), so cuDNN's fp32 convolutions keep the fp32 tolerance
    if device == "cpu" and backend not in ewc_fast.available_backends("cpu"):
        pytest.skip(f"{backend} backend unavailable")
    res, methods = _run_case(make_case, name, backend, device)
    ref = cached_reference(make_case, name)
    for m in methods:
        assert_close(res[m], ref[m], what=f"{name}/{m}")


def test_transposed_convs_are_served_by_their_rule():
    # no parameter of the transposed convolutions goes to the torch.func fallback
    model, data, _ = make_case("transposed")
    res = ewc_fast.estimate_importance(model, data, ("fisher",), progress=False)
    assert res["fisher"].meta["fallback"] == {}
    from ewc_fast.estimation.rules import ConvTransposeRule, rule_for

    assert isinstance(rule_for(model.up), ConvTransposeRule) and isinstance(rule_for(model.up1), ConvTransposeRule)
