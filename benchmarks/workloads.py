"""Workloads of the comparison benchmark (``benchmarks/compare.py``): model, data and per-sample loss.

Every workload is a classification problem (integer labels, per-sample loss = cross-entropy of the
logits at the true label), so all contenders -- ewc_fast, the peers and the float64 oracle -- compute
the same quantities:

* empirical Fisher ``F = (1/N) sum_n g_n**2`` with ``g_n = d loss(x_n, y_n) / d theta``;
* MAS ``Omega = (1/N) sum_n |d ||f(x_n)||_2**2 / d theta|`` with ``f`` the logits;
* exact Fisher ``(1/N) sum_n sum_y p(y|x_n) (d -log p(y|x_n) / d theta)**2`` (for peers that compute it).

Models contain no dropout. The CNN workloads of :mod:`benchmarks.workloads_cnn` (ResNet-18,
depthwise-separable, the seed papers' conv net) contain BatchNorm, which runs in eval mode (running
statistics, as in every importance pass), so no layer couples the samples of a batch. Data are
synthetic and seeded: the benchmark measures speed, memory and agreement with the oracle, not
accuracy.

``size="tiny"`` shrinks every dimension so that the whole suite runs in seconds (smoke test);
``size="small"`` keeps the architectures' shapes but smaller (minutes on a laptop: checks the memory
columns); ``size="full"`` is the size of the report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SIZES = ("tiny", "small", "full")


# ----------------------------------------------------------------------------------------- models
class MLP(nn.Module):
    """Fully connected net ``d_in -> hidden... -> n_classes`` with the given activation."""

    def __init__(self, d_in: int, hidden: list[int], n_classes: int, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        layers: list[nn.Module] = []
        d = d_in
        for h in hidden:
            layers += [nn.Linear(d, h), act()]
            d = h
        layers.append(nn.Linear(d, n_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with its four projections as separate ``nn.Linear`` modules."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by heads={heads}")
        self.heads = heads
        self.q = nn.Linear(d, d)
        self.k = nn.Linear(d, d)
        self.v = nn.Linear(d, d)
        self.o = nn.Linear(d, d)

    def forward(self, x):
        n, t, d = x.shape
        h = self.heads

        def split(z):
            return z.reshape(n, t, h, d // h).transpose(1, 2)

        z = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.o(z.transpose(1, 2).reshape(n, t, d))


class MHASelfAttention(nn.Module):
    """The same block built on ``nn.MultiheadAttention`` (whose out_proj hooks never fire)."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        self.mha = nn.MultiheadAttention(d, heads, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x, need_weights=False)[0]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: ``x + attn(ln(x))`` then ``x + mlp(ln(x))``."""

    def __init__(self, d: int, heads: int, ffn: int, mha: bool):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = MHASelfAttention(d, heads) if mha else SelfAttention(d, heads)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ffn)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(ffn, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(self.act(self.fc1(self.ln2(x))))


class TransformerClassifier(nn.Module):
    """Stack of blocks on (N, T, d) input features, final LayerNorm, mean pool over T, linear head."""

    def __init__(self, d: int, heads: int, ffn: int, depth: int, n_classes: int, mha: bool):
        super().__init__()
        self.blocks = nn.ModuleList([Block(d, heads, ffn, mha) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, n_classes)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.ln(x).mean(dim=1))


class SmallCNN(nn.Module):
    """conv3x3(c1)-relu-pool, conv3x3(c2)-relu-pool, conv3x3(c3)-relu-pool, fc-relu, fc."""

    def __init__(self, in_ch: int, side: int, ch: tuple[int, int, int], fc: int, n_classes: int):
        super().__init__()
        c1, c2, c3 = ch
        self.features = nn.Sequential(
            nn.Conv2d(in_ch, c1, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c2, c3, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(c3 * (side // 8) ** 2, fc), nn.ReLU(), nn.Linear(fc, n_classes)
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class EmbeddingBagClassifier(nn.Module):
    """Large ``nn.Embedding`` (vocab x dim), mean over tokens, small MLP head."""

    def __init__(self, vocab: int, dim: int, hidden: int, n_classes: int):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, n_classes)

    def forward(self, tokens):
        return self.fc2(self.act(self.fc1(self.emb(tokens).mean(dim=1))))


# -------------------------------------------------------------------------------------- workloads
def per_sample_cross_entropy(logits, target):
    """Per-sample loss of every workload: cross-entropy at the true label, shape (N,)."""
    return F.cross_entropy(logits, target, reduction="none")


@dataclass
class Workload:
    """One benchmark workload. ``make_model`` / ``make_batches`` are deterministic (seeded)."""

    name: str
    title: str
    kind: str  # "mlp" | "transformer" | "cnn" | "embedding" (selects the targets)
    size: str
    model_fn: Callable[[], nn.Module]
    input_fn: Callable[[int, torch.Generator], torch.Tensor]  # (n, generator) -> inputs on CPU
    n_samples: int
    batch_size: int
    n_classes: int = 10
    # weights shared over positions (tokens / pixels): per-sample gradient = a sum over positions, so
    # "flatten positions into samples" shortcuts (ASDL) are only approximations here
    sequence: bool = False
    has_mha: bool = False
    seed: int = 0
    # the float64 oracle: "func" (torch.func vmap(grad)), or "loop" (a per-sample loop of plain
    # autograd, for models whose forward cannot run under vmap: the Hugging Face workloads)
    oracle: str = "func"
    notes: list[str] = field(default_factory=list)

    loss_per_sample = staticmethod(per_sample_cross_entropy)

    def make_model(self, device="cpu", dtype=torch.float32) -> nn.Module:
        torch.manual_seed(self.seed)
        model = self.model_fn()
        return model.to(device=device, dtype=dtype).eval()

    def make_batches(self, device="cpu", dtype=torch.float32) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The whole data set as a list of ``(inputs, labels)`` batches (last batch may be short)."""
        g = torch.Generator().manual_seed(self.seed + 1)
        x = self.input_fn(self.n_samples, g)
        y = torch.randint(0, self.n_classes, (self.n_samples,), generator=g)
        if x.is_floating_point():
            x = x.to(dtype)
        out = []
        for i in range(0, self.n_samples, self.batch_size):
            out.append((x[i : i + self.batch_size].to(device), y[i : i + self.batch_size].to(device)))
        return out

    def n_params(self) -> int:
        return sum(p.numel() for p in self.make_model().parameters())

    def describe(self) -> str:
        return (
            f"{self.title}; {self.n_samples} samples in batches of {self.batch_size}; "
            f"{self.n_params() / 1e6:.3g}M parameters"
        )


def _gauss(*shape):
    def fn(n, g):
        return torch.randn(n, *shape, generator=g)

    return fn


def _mnist_like(d):
    def fn(n, g):  # pixels in [0, 1) like MNIST
        return torch.rand(n, d, generator=g)

    return fn


def _tokens(vocab, t):
    def fn(n, g):  # Zipf-like token ids: a few frequent tokens, a long tail (duplicates within a sample)
        u = torch.rand(n, t, generator=g)
        return (vocab**u - 1).long().clamp_(0, vocab - 1)

    return fn


def _mlp_mnist(size):
    if size == "full":
        d, hidden, n, b = 784, [300, 150], 5000, 500
    elif size == "small":
        d, hidden, n, b = 784, [300, 150], 1000, 500
    else:
        d, hidden, n, b = 64, [32, 16], 48, 16
    return Workload(
        "mlp-mnist",
        f"MLP {d}-{'-'.join(map(str, hidden))}-10 (leaky ReLU), MNIST-sized batches",
        "mlp",
        size,
        lambda: MLP(d, hidden, 10, nn.LeakyReLU),
        _mnist_like(d),
        n,
        b,
    )


def _mlp_wide(size):
    if size == "full":
        d, w, n, b = 1024, 4096, 1024, 256
    elif size == "small":
        d, w, n, b = 256, 1024, 256, 128
    else:
        d, w, n, b = 32, 48, 32, 16
    return Workload(
        "mlp-3x4096", f"MLP {d}-{w}x3-10 (ReLU)", "mlp", size, lambda: MLP(d, [w, w, w], 10), _gauss(d), n, b
    )


def _transformer(size, t_full, mha):
    if size == "full":
        d, h, ffn, depth, t = 512, 8, 2048, 4, t_full
        n, b = (32, 8) if t_full <= 128 else (8, 2)
    elif size == "small":
        d, h, ffn, depth, n, b = 128, 4, 512, 2, 16, 8
        t = t_full // 4
    else:
        d, h, ffn, depth, n, b = 32, 4, 64, 2, 8, 4
        t = 8 if t_full <= 128 else 16
    kind = "nn.MultiheadAttention" if mha else "nn.Linear q/k/v/o"
    name = f"transformer{'-mha' if mha else ''}-T{t_full}"
    return Workload(
        name,
        f"{depth} pre-LN transformer blocks, d={d}, {h} heads ({kind}), FFN {ffn}, T={t}, mean-pool + linear head",
        "transformer",
        size,
        lambda: TransformerClassifier(d, h, ffn, depth, 10, mha),
        _gauss(t, d),
        n,
        b,
        sequence=True,
        has_mha=mha,
    )


def _cnn(size):
    if size == "full":
        side, ch, fc, n, b = 32, (32, 64, 128), 256, 512, 128
    elif size == "small":
        side, ch, fc, n, b = 32, (16, 32, 64), 128, 128, 64
    else:
        side, ch, fc, n, b = 16, (4, 8, 8), 16, 16, 8
    return Workload(
        "cnn-32",
        f"CNN 3x{side}x{side} -> conv{ch[0]}-conv{ch[1]}-conv{ch[2]} (3x3, max-pool) -> fc{fc} -> 10",
        "cnn",
        size,
        lambda: SmallCNN(3, side, ch, fc, 10),
        _gauss(3, side, side),
        n,
        b,
        sequence=True,
    )


def _embedding(size):
    if size == "full":
        vocab, dim, hidden, t, n, b = 50000, 128, 64, 64, 256, 64
    elif size == "small":
        vocab, dim, hidden, t, n, b = 10000, 64, 32, 32, 64, 32
    else:
        vocab, dim, hidden, t, n, b = 200, 16, 16, 8, 16, 8
    return Workload(
        "embedding",
        f"nn.Embedding({vocab}, {dim}) on T={t} tokens, mean, fc{hidden} -> 10",
        "embedding",
        size,
        lambda: EmbeddingBagClassifier(vocab, dim, hidden, 10),
        _tokens(vocab, t),
        n,
        b,
        sequence=True,
    )


_FACTORIES: dict[str, Callable[[str], Workload]] = {
    "mlp-mnist": _mlp_mnist,
    "mlp-3x4096": _mlp_wide,
    "transformer-T128": lambda s: _transformer(s, 128, False),
    "transformer-T512": lambda s: _transformer(s, 512, False),
    "transformer-mha-T128": lambda s: _transformer(s, 128, True),
    "transformer-mha-T512": lambda s: _transformer(s, 512, True),
    "cnn-32": _cnn,
    "embedding": _embedding,
}
# the CNN workloads live in their own module, which imports Workload from here
from .workloads_cnn import FACTORIES as _CNN_FACTORIES  # noqa: E402

_FACTORIES.update(_CNN_FACTORIES)
WORKLOADS = tuple(_FACTORIES)  # the default run

# Hugging Face workloads (benchmarks/workloads_hf.py, need transformers): registered, run when named
from .workloads_hf import HF_FACTORIES, HF_WORKLOADS  # noqa: E402

_FACTORIES.update(HF_FACTORIES)
ALL_WORKLOADS = WORKLOADS + HF_WORKLOADS


def get_workload(name: str, size: str = "full") -> Workload:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; valid: {SIZES}")
    try:
        return _FACTORIES[name](size)
    except KeyError:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(ALL_WORKLOADS)}") from None


def all_workloads(size: str = "full") -> list[Workload]:
    return [get_workload(n, size) for n in WORKLOADS]


def param_bytes(model: nn.Module) -> int:
    """Bytes of one copy of the model's parameters (the unit of the memory column)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())
