"""Models of the experiments (all take flattened images ``(N, 784)`` and return logits).

* ``mlp`` — Kutalev & Lapina 2021's FC 784-300-150-10 with leaky-ReLU (torch's default negative
  slope 0.01; the table, correlation and pruning experiments). Parameters: ``fc1``, ``fc2``, ``out``.
* ``cnn`` — a Keras-style network for block-permuted MNIST: Dropout(0.2) → Conv 64@3×3 'same' +
  ReLU → MaxPool 2×2 → Flatten → Dense 1024 + ReLU → Dropout(0.5) → Dense 1024 + ReLU → Dropout(0.5) →
  Dense 10 (the softmax lives in the loss). 13.9 M parameters (the 12544×1024 ``fc1`` dominates):
  a GPU model.
* ``small-mlp`` — 784-100-10 leaky-ReLU (tests, quick runs).
* ``small-cnn`` — Conv 8@5×5/2 → ReLU → Conv 16@3×3/2 → ReLU → Linear 784→10 (tests of conv paths
  and per-filter pruning).
* ``mlp400`` — 784-400-400-10 ReLU: van de Ven et al. 2025's (arXiv 2502.11756) Split MNIST network.
* ``kutalev-cnn`` — the shape of Kutalev & Lapina 2021's conv net (3 conv + BatchNorm, 1 linear): three
  blocks Conv 3×3 'same' (16, 32, 64 filters) → BatchNorm → ReLU → MaxPool 2×2, then Linear 576→10.
  Their filter counts are not given in the paper: these are ours (29 k parameters).
* ``kutalev-cnn-code`` — the conv net of the authors' code (``aakutalev/ewc-features``,
  ``section2``/``section3`` ``convolutional-ewc-*.py``): Conv 64@5×5 (valid) → BatchNorm → leaky-ReLU →
  MaxPool 2×2 → Conv 128@3×3 (valid) → BatchNorm → leaky-ReLU → Conv 256@3×3 (valid) → BatchNorm →
  leaky-ReLU → Linear 8·8·256→10 on 28×28 images (535 k parameters, 18× ``kutalev-cnn``).
* ``attention`` — a small self-attention classifier: the image as 16 tokens of 7×7 patches, Linear
  49→32 plus a fixed sinusoidal position code, one ``nn.MultiheadAttention`` (2 heads) with a residual
  connection, LayerNorm, mean over tokens, Linear 32→10 (5.9 k parameters).

Every model is an ``nn.Sequential`` with named children and explicit activation modules, so the
parameter names (``fc1.weight`` …) are readable in tables and each layer's activation is a module.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "MLP",
    "SeedCNN",
    "SmallCNN",
    "KutalevCNN",
    "KutalevCodeCNN",
    "PatchAttention",
    "build_model",
    "MODEL_NAMES",
    "weight_layers",
    "sig_activations",
]

MODEL_NAMES = ("mlp", "cnn", "small-mlp", "small-cnn", "mlp400", "kutalev-cnn", "kutalev-cnn-code", "attention")


class MLP(nn.Sequential):
    """Fully connected net ``n_in → hidden… → n_out`` with leaky-ReLU between layers."""

    def __init__(
        self, n_in: int = 784, hidden: Sequence[int] = (300, 150), n_out: int = 10, negative_slope: float = 0.01
    ):
        layers: list[tuple[str, nn.Module]] = []
        width = n_in
        for i, h in enumerate(hidden, start=1):
            layers.append((f"fc{i}", nn.Linear(width, h)))
            layers.append((f"act{i}", nn.LeakyReLU(negative_slope)))
            width = h
        layers.append(("out", nn.Linear(width, n_out)))
        super().__init__(OrderedDict(layers))


class SeedCNN(nn.Sequential):
    """The Keras-style CNN of ``build_model("cnn")`` (dropouts, one 64-filter conv, two 1024-unit dense layers)."""

    def __init__(self, image_size: int = 28, n_out: int = 10):
        if image_size % 2:
            raise ValueError("SeedCNN needs an even image size")
        flat = 64 * (image_size // 2) ** 2
        super().__init__(
            OrderedDict(
                [
                    ("unflatten", nn.Unflatten(1, (1, image_size, image_size))),
                    ("drop0", nn.Dropout(0.2)),
                    ("conv1", nn.Conv2d(1, 64, 3, padding=1)),
                    ("act1", nn.ReLU()),
                    ("pool1", nn.MaxPool2d(2)),
                    ("flatten", nn.Flatten()),
                    ("fc1", nn.Linear(flat, 1024)),
                    ("act2", nn.ReLU()),
                    ("drop1", nn.Dropout(0.5)),
                    ("fc2", nn.Linear(1024, 1024)),
                    ("act3", nn.ReLU()),
                    ("drop2", nn.Dropout(0.5)),
                    ("out", nn.Linear(1024, n_out)),
                ]
            )
        )


class SmallCNN(nn.Sequential):
    """Two strided convs and a linear head: cheap, exercises conv code paths."""

    def __init__(self, image_size: int = 28, n_out: int = 10):
        s1 = (image_size + 2 * 2 - 5) // 2 + 1
        s2 = (s1 + 2 * 1 - 3) // 2 + 1
        super().__init__(
            OrderedDict(
                [
                    ("unflatten", nn.Unflatten(1, (1, image_size, image_size))),
                    ("conv1", nn.Conv2d(1, 8, 5, stride=2, padding=2)),
                    ("act1", nn.ReLU()),
                    ("conv2", nn.Conv2d(8, 16, 3, stride=2, padding=1)),
                    ("act2", nn.ReLU()),
                    ("flatten", nn.Flatten()),
                    ("out", nn.Linear(16 * s2 * s2, n_out)),
                ]
            )
        )


class KutalevCNN(nn.Sequential):
    """3 × (Conv 3×3 'same' → BatchNorm → ReLU → MaxPool 2×2) → Flatten → Linear (see module doc)."""

    def __init__(self, image_size: int = 28, n_out: int = 10, widths: Sequence[int] = (16, 32, 64)):
        layers: list[tuple[str, nn.Module]] = [("unflatten", nn.Unflatten(1, (1, image_size, image_size)))]
        c, side = 1, image_size
        for i, w in enumerate(widths, start=1):
            layers += [
                (f"conv{i}", nn.Conv2d(c, w, 3, padding=1)),
                (f"bn{i}", nn.BatchNorm2d(w)),
                (f"act{i}", nn.ReLU()),
                (f"pool{i}", nn.MaxPool2d(2)),
            ]
            c, side = w, side // 2
        layers += [("flatten", nn.Flatten()), ("out", nn.Linear(c * side * side, n_out))]
        super().__init__(OrderedDict(layers))


class KutalevCodeCNN(nn.Sequential):
    """The authors' conv net (see module doc): Conv 5×5 → BN → leaky-ReLU → MaxPool 2×2, then two
    × (Conv 3×3 → BN → leaky-ReLU), all 'valid', then Flatten → Linear. Spatial side: s → s − 4 →
    (s − 4) // 2 → … − 2 → … − 2 (28 → 24 → 12 → 10 → 8)."""

    def __init__(self, image_size: int = 28, n_out: int = 10, widths: Sequence[int] = (64, 128, 256)):
        side = (image_size - 4) // 2 - 4
        if side < 1:
            raise ValueError(f"kutalev-cnn-code needs images of at least 14×14 pixels, got {image_size}×{image_size}")
        c1, c2, c3 = widths
        layers: list[tuple[str, nn.Module]] = [
            ("unflatten", nn.Unflatten(1, (1, image_size, image_size))),
            ("conv1", nn.Conv2d(1, c1, 5)),
            ("bn1", nn.BatchNorm2d(c1)),
            ("act1", nn.LeakyReLU()),
            ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(c1, c2, 3)),
            ("bn2", nn.BatchNorm2d(c2)),
            ("act2", nn.LeakyReLU()),
            ("conv3", nn.Conv2d(c2, c3, 3)),
            ("bn3", nn.BatchNorm2d(c3)),
            ("act3", nn.LeakyReLU()),
            ("flatten", nn.Flatten()),
            ("out", nn.Linear(c3 * side * side, n_out)),
        ]
        super().__init__(OrderedDict(layers))


class PatchAttention(nn.Module):
    """Patches → tokens → one self-attention layer (residual) → LayerNorm → mean → Linear."""

    def __init__(self, image_size: int = 28, patch: int = 7, dim: int = 32, heads: int = 2, n_out: int = 10):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image size {image_size} is not a multiple of the patch size {patch}")
        self.image_size, self.patch = image_size, patch
        n_tok = (image_size // patch) ** 2
        self.embed = nn.Linear(patch * patch, dim)
        pos = torch.arange(n_tok, dtype=torch.float32)[:, None]
        freq = torch.exp(-torch.arange(0, dim, 2, dtype=torch.float32) * (torch.log(torch.tensor(1e4)) / dim))
        code = torch.zeros(n_tok, dim)
        code[:, 0::2], code[:, 1::2] = torch.sin(pos * freq), torch.cos(pos * freq)
        self.register_buffer("pos", code)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, s, p = x.shape[0], self.image_size, self.patch
        g = s // p
        tok = x.reshape(n, g, p, g, p).permute(0, 1, 3, 2, 4).reshape(n, g * g, p * p)
        h = self.embed(tok) + self.pos
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.out(self.norm(h + a).mean(1))


def build_model(name: str = "mlp", *, n_in: int = 784, n_out: int = 10) -> nn.Module:
    """Build a model by name (see :data:`MODEL_NAMES`); CNNs need a square image of ``n_in``."""
    if name == "mlp":
        return MLP(n_in, (300, 150), n_out)
    if name == "small-mlp":
        return MLP(n_in, (100,), n_out)
    if name == "mlp400":
        return MLP(n_in, (400, 400), n_out, negative_slope=0.0)
    if name in ("cnn", "small-cnn", "kutalev-cnn", "kutalev-cnn-code", "attention"):
        side = int(round(n_in**0.5))
        if side * side != n_in:
            raise ValueError(f"{name} needs square images, got {n_in} features")
        if name == "attention":
            return PatchAttention(side, n_out=n_out)
        cls = {"cnn": SeedCNN, "small-cnn": SmallCNN, "kutalev-cnn": KutalevCNN, "kutalev-cnn-code": KutalevCodeCNN}
        return cls[name](side, n_out=n_out)
    raise ValueError(f"unknown model {name!r}: choose from {MODEL_NAMES}")


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the Linear/Conv layers in forward order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))]


_ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.Softmax)


def sig_activations(model: nn.Module) -> dict:
    """``{layer name: activation}`` for SIG's bias statistic (|post-activation output|).

    In an ``nn.Sequential`` (all models here), a Linear/Conv layer directly followed by an
    activation module gets that module; the last Linear/Conv layer, whose activation is the softmax
    inside the cross-entropy, gets ``softmax`` over classes (Kutalev's networks end in a Softmax
    layer). Other models: ``{}`` (the estimator then uses the raw layer output).
    """
    if not isinstance(model, nn.Sequential):
        return {}
    children = list(model.named_children())
    out = {}
    last = None
    for k, (name, mod) in enumerate(children):
        if isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            last = name
            nxt = children[k + 1][1] if k + 1 < len(children) else None
            if isinstance(nxt, _ACTIVATIONS):
                out[name] = nxt
    if last is not None and last not in out:
        out[last] = _softmax_classes
    return out


def _softmax_classes(y: torch.Tensor) -> torch.Tensor:
    return torch.softmax(y, dim=-1)


@torch.no_grad()
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
