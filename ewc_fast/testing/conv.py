"""Float64 oracle of :func:`ewc_fast.ops.persample_conv_sq_` (for tests; slow, obviously right).

Sample by sample, the weight gradient is taken from autograd of the library convolution itself:
X_n is zero padded explicitly (``padding`` in front, as much as needed behind), run through
``F.conv{1,2,3}d`` with the float64 weight, the output cropped to G's extent L, and
dW_n = d<conv(X_n)[..L], G_n>/dW. Returns ``(sum_n dW_n**2, sum_n |dW_n|)`` in float64. It shares no
code with the op it checks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["reference_persample_conv_sq"]

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def reference_persample_conv_sq(
    grad_out: Tensor, inputs: Tensor, kernel_size, *, stride, padding, dilation, groups: int = 1
) -> tuple[Tensor, Tensor]:
    """float64 (sum_n dW_n**2, sum_n |dW_n|), shaped like the weight (O, C/groups, *kernel_size)."""
    d = inputs.dim() - 2
    G = grad_out.detach().double()
    X = inputs.detach().double()
    N, O = G.shape[:2]
    L = G.shape[2:]
    w = torch.zeros((O, X.shape[1] // groups, *kernel_size), dtype=torch.float64, requires_grad=True)
    pads = []
    for s, l, k, st, p, dl in zip(X.shape[2:], L, kernel_size, stride, padding, dilation):
        right = max(0, (l - 1) * st + (k - 1) * dl + 1 - p - s)
        pads += [(p, right)]
    flat = [v for lr in reversed(pads) for v in lr]
    sq = torch.zeros(w.shape, dtype=torch.float64)
    ab = torch.zeros(w.shape, dtype=torch.float64)
    for n in range(N):
        xp = F.pad(X[n : n + 1], flat)
        y = _CONV[d](xp, w, stride=stride, dilation=dilation, groups=groups)
        y = y[(slice(None), slice(None)) + tuple(slice(0, l) for l in L)]
        (gw,) = torch.autograd.grad((y * G[n : n + 1]).sum(), w)
        sq += gw * gw
        ab += gw.abs()
    return sq, ab
