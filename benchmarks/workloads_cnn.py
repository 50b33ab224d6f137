"""Convolutional workloads of the comparison benchmark: the CNNs continual-learning papers train.

Registered into :data:`benchmarks.workloads.WORKLOADS` (``kind="cnn"``). BatchNorm layers run in eval
mode, as every importance pass does (running statistics; samples stay independent). Inputs are
seeded Gaussian 3 x 32 x 32 images (``tiny``: 3 x 8 x 8).

* ``resnet18-32``: the CIFAR ResNet-18 layout (He et al. 2016, arXiv 1512.03385; 3x3 stem, four
  stages of two BasicBlocks, widths w, 2w, 4w, 8w, strided 3x3 + 1x1 projection shortcuts,
  BatchNorm after every conv, global average pool, linear head).
* ``dwsep-32``: a depthwise-separable net in the MobileNet-v1 layout (Howard et al. 2017, arXiv
  1704.04861): 3x3 stem, then blocks of depthwise 3x3 (groups = channels) + pointwise 1x1, each
  followed by BatchNorm and ReLU, global average pool, linear head.
* ``seed-cnn-32``: the conv net of Kutalev & Lapina 2021 (arXiv 2109.10021): three 3x3 conv +
  BatchNorm + ReLU + max-pool stages and one linear layer (widths 32-64-128 are ours).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .workloads import Workload, _gauss


class BasicBlock(nn.Module):
    """3x3 conv-BN-ReLU, 3x3 conv-BN, plus the identity or a strided 1x1 conv-BN projection."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.short = None
        if stride != 1 or c_in != c_out:
            self.short = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x):
        h = self.bn2(self.conv2(self.bn1(self.conv1(x)).relu()))
        return (h + (x if self.short is None else self.short(x))).relu()


class ResNet18(nn.Module):
    """CIFAR ResNet-18 (stem 3x3 without max-pool), base width ``w``."""

    def __init__(self, w: int = 64, n_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        blocks, c = [], w
        for i, width in enumerate((w, 2 * w, 4 * w, 8 * w)):
            for j in range(2):
                blocks.append(BasicBlock(c, width, 2 if (i > 0 and j == 0) else 1))
                c = width
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _dw_block(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(c_in, c_in, 3, stride=stride, padding=1, groups=c_in, bias=False),
        nn.BatchNorm2d(c_in),
        nn.ReLU(),
        nn.Conv2d(c_in, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(),
    ]


class DepthwiseSeparableNet(nn.Module):
    """3x3 stem, depthwise-separable blocks ``(c_out, stride)``, global average pool, linear head."""

    def __init__(self, stem: int, blocks: list[tuple[int, int]], n_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, stem, 3, padding=1, bias=False), nn.BatchNorm2d(stem), nn.ReLU()]
        c = stem
        for c_out, stride in blocks:
            layers += _dw_block(c, c_out, stride)
            c = c_out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c, n_classes)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3)))


class ConvBNNet(nn.Module):
    """Three (3x3 conv, BatchNorm, ReLU, 2x2 max-pool) stages and one linear layer."""

    def __init__(self, side: int, ch: tuple[int, int, int], n_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = []
        c = 3
        for w in ch:
            layers += [nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(c * (side // 8) ** 2, n_classes)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def _resnet(size):
    w, side, n, b = {"full": (64, 32, 128, 64), "small": (16, 32, 64, 32)}.get(size, (4, 8, 8, 4))
    return Workload(
        "resnet18-32",
        f"ResNet-18 (CIFAR layout, widths {w}-{2 * w}-{4 * w}-{8 * w}, BatchNorm eval) on 3x{side}x{side}",
        "cnn",
        size,
        lambda: ResNet18(w),
        _gauss(3, side, side),
        n,
        b,
        sequence=True,
    )


def _dwsep(size):
    if size in ("full", "small"):
        k = 1 if size == "full" else 2
        stem = 32 // k
        blocks = [(64 // k, 1), (128 // k, 2), (128 // k, 1), (256 // k, 2), (256 // k, 1), (512 // k, 2)]
        side, n, b = 32, (128 if size == "full" else 64), (64 if size == "full" else 32)
    else:
        stem, blocks, side, n, b = 4, [(8, 1), (8, 2)], 8, 8, 4
    return Workload(
        "dwsep-32",
        f"depthwise-separable net (stem {stem}, {len(blocks)} dw3x3+pw1x1 blocks to {blocks[-1][0]}, BatchNorm eval) "
        f"on 3x{side}x{side}",
        "cnn",
        size,
        lambda: DepthwiseSeparableNet(stem, blocks),
        _gauss(3, side, side),
        n,
        b,
        sequence=True,
    )


def _seed_cnn(size):
    if size == "full":
        side, ch, n, b = 32, (32, 64, 128), 512, 128
    elif size == "small":
        side, ch, n, b = 32, (16, 32, 64), 128, 64
    else:
        side, ch, n, b = 8, (4, 8, 8), 16, 8
    return Workload(
        "seed-cnn-32",
        f"3 x (conv3x3-BatchNorm-ReLU-maxpool) {ch[0]}-{ch[1]}-{ch[2]} + 1 linear (Kutalev & Lapina 2021 layout) "
        f"on 3x{side}x{side}",
        "cnn",
        size,
        lambda: ConvBNNet(side, ch),
        _gauss(3, side, side),
        n,
        b,
        sequence=True,
    )


def largest_activation_bytes(wl: Workload) -> int:
    """Bytes of the largest output of a single layer (a module without children) over one batch: the
    "one layer's activations" of the CNN memory target (benchmarks/compare/targets.py)."""
    model = wl.make_model()
    x, _ = wl.make_batches()[0]
    best = 0

    def hook(_m, _inp, out):
        nonlocal best
        if isinstance(out, torch.Tensor):
            best = max(best, out.numel() * out.element_size())

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return best


#: name -> factory(size), merged into benchmarks.workloads
FACTORIES: dict[str, Callable[[str], Workload]] = {
    "resnet18-32": _resnet,
    "dwsep-32": _dwsep,
    "seed-cnn-32": _seed_cnn,
}
