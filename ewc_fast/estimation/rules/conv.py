"""``nn.Conv1d/2d/3d`` rule (stride, padding incl. ``'same'`` and every padding mode, dilation, groups).

Weight, module called once per batch (the usual case): sum_n dW_n^2 (or |dW_n|) straight from the
captured input and output gradient through :func:`ewc_fast.ops.persample_conv_sq_`, which forms each
sample's gradient as a direct correlation of its input with its output gradient, tile by tile,
without unfolding the input: zero padding is passed as the leading padding (the trailing side,
including ``'same'``'s extra right column, follows from the output extent), other padding modes pad
the input first (one padded copy of the layer input).

A module called several times per batch needs each sample's gradient summed over the calls before
squaring: im2col A_n (t = output positions, C_in/groups * prod(kernel)) per group, from the captured
inputs unfolded per chunk of samples (at most :data:`~.base.CHUNK_BYTES` of unfolded input), the
calls concatenated along t, then as ``nn.Linear`` through :func:`ewc_fast.ops.persample_sq_`. The
same unfolding serves :meth:`ConvRule.per_sample` (tied parameters). Bias p_n = sum over positions
of G_n.

SIG (Kutalev 2020, extended to convolutions): weight w[o, c, k] gets |w| * mean_n (sum over output
positions of |unfolded input| at tap (c, k) of o's group), the total |signal| that passed through
that tap (zero padding contributes 0); bias mean_n sum over positions of |act(y)_n|.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ...ops import persample_conv_sq_
from .base import (
    Rule,
    apply_activation,
    cat_tokens,
    chunk_rows,
    input_grad_slices,
    live_calls,
    main_input,
    persample_into,
    reduce_into,
)

__all__ = ["ConvRule", "conv_padding", "unfold"]


def conv_padding(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dim, as the conv applies it (``'same'``: extra on the right)."""
    d = len(module.kernel_size)
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return [(0, 0)] * d
        out = []
        for k, dil in zip(module.kernel_size, module.dilation):
            total = dil * (k - 1)
            out.append((total // 2, total - total // 2))
        return out
    return [(p, p) for p in module.padding]


def unfold(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """im2col for any spatial rank: x (c, C, *S) -> (c, L, C * prod(kernel)), channel-major columns
    (the layout of ``weight.reshape(out, -1)``), L = number of output positions."""
    pads = conv_padding(module)
    flat = [v for lr in reversed(pads) for v in lr]  # F.pad wants the last dim first
    if any(flat):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, flat, mode=mode)
    d = len(module.kernel_size)
    if d == 2:
        cols = F.unfold(x, module.kernel_size, dilation=module.dilation, stride=module.stride)
        return cols.transpose(1, 2)
    c = x.shape[0]
    for i, (k, dil, st) in enumerate(zip(module.kernel_size, module.dilation, module.stride)):
        span = dil * (k - 1) + 1
        x = x.unfold(2 + i, span, st)[..., ::dil]  # appends a kernel dim of size k
    # x: (c, C, L_1..L_d, k_1..k_d) -> (c, L, C * K)
    perm = [0] + list(range(2, 2 + d)) + [1] + list(range(2 + d, 2 + 2 * d))
    x = x.permute(perm)
    L = 1
    for s in x.shape[1 : 1 + d]:
        L *= s
    return x.reshape(c, L, -1)


class ConvRule(Rule):
    """Conv1d/2d/3d (stride, padding incl. 'same' and padding modes, dilation, groups) via im2col."""

    def _chunk(self, module, out, n):
        """Samples per chunk so that the unfolded inputs (positions x C_in*K per sample) fit the budget."""
        positions = 1
        for s in out.shape[2:]:
            positions *= s
        return chunk_rows(n, positions * math.prod(module.weight.shape[1:]) * module.groups * out.element_size())

    def _ga(self, module, calls, grads, lo, hi, n):
        """Per call with a gradient: (G (c, L, O), A (c, L, C*K)) for samples lo:hi."""
        out = []
        for x, g in input_grad_slices(module, calls, grads, lo, hi, n):
            gg = g.flatten(2).transpose(1, 2)
            out.append((gg, unfold(module, x).to(gg.dtype)))
        return out

    def _groups(self, module):
        G = module.groups
        og = module.out_channels // G
        cg = math.prod(module.weight.shape[1:])
        return G, og, cg

    def per_sample(self, module, calls, grads, names, lo, hi, n):
        c = hi - lo
        res = {
            k: torch.zeros(
                (c,) + tuple(getattr(module, k).shape), dtype=module.weight.dtype, device=module.weight.device
            )
            for k in names
        }
        groups, og, cg = self._groups(module)
        for gg, a in self._ga(module, calls, grads, lo, hi, n):
            if "weight" in names:
                w = res["weight"].view(c, module.out_channels, cg)
                for gi in range(groups):
                    w[:, gi * og : (gi + 1) * og] += torch.bmm(
                        gg[..., gi * og : (gi + 1) * og].transpose(1, 2), a[..., gi * cg : (gi + 1) * cg]
                    )
            if "bias" in names:
                res["bias"] += gg.sum(1)
        return res

    def accumulate(self, module, calls, grads, bufs, mode, n, backend):
        groups, og, cg = self._groups(module)
        calls, grads = live_calls(calls, grads)
        if not calls:
            return
        if "bias" in bufs:
            reduce_into(bufs["bias"], sum(g.reshape(n, module.out_channels, -1).sum(2) for g in grads), mode)
        if "weight" not in bufs:
            return
        if len(calls) == 1:
            self._accumulate_direct(module, calls, grads, bufs["weight"], mode, n, backend)
            return
        w = bufs["weight"].view(module.out_channels, cg)
        step = self._chunk(module, max(grads, key=lambda t: t.numel()), n)
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            pairs = self._ga(module, calls, grads, lo, hi, n)
            G, A = cat_tokens([p[0] for p in pairs]), cat_tokens([p[1] for p in pairs])
            for gi in range(groups):
                persample_into(
                    w[gi * og : (gi + 1) * og],
                    G[..., gi * og : (gi + 1) * og],
                    A[..., gi * cg : (gi + 1) * cg],
                    mode,
                    backend,
                )

    def _accumulate_direct(self, module, calls, grads, buf, mode, n, backend):
        """buf += sum_n dW_n^2 (or |dW_n|) of the module's one call, by the direct per-sample kernel."""
        x = main_input(calls[0], n, module, sample_dim0=True)
        g = grads[0]
        pads = conv_padding(module)
        if module.padding_mode != "zeros" and any(v for lr in pads for v in lr):
            flat = [v for lr in reversed(pads) for v in lr]  # F.pad wants the last dim first
            x = F.pad(x, flat, mode=module.padding_mode)
            lead = [0] * len(pads)
        else:
            lead = [lr[0] for lr in pads]
        if x.dtype != g.dtype:  # autocast: the gradient's dtype, as the unfolding path does
            x = x.to(g.dtype)
        persample_conv_sq_(
            buf if mode == "sq" else None,
            buf if mode == "abs" else None,
            g,
            x,
            stride=list(module.stride),
            padding=lead,
            dilation=list(module.dilation),
            groups=module.groups,
            backend=backend,
        )

    def sig(self, module, calls, names, n, activation):
        out = {}
        groups, og, cg = self._groups(module)
        if "weight" in names:
            tot = torch.zeros(groups, cg, dtype=torch.float32, device=module.weight.device)
            for call in calls:
                x = main_input(call, n, module, sample_dim0=True)
                step = self._chunk(module, call.output, n)
                for lo in range(0, n, step):
                    a = unfold(module, x[lo : min(n, lo + step)]).abs().sum((0, 1), dtype=torch.float32)
                    tot += a.view(groups, cg)
            fac = tot.repeat_interleave(og, 0).view(module.weight.shape)
            out["weight"] = (fac, True)
        if "bias" in names:
            s = sum(
                apply_activation(activation, c.output)
                .abs()
                .transpose(0, 1)
                .reshape(module.out_channels, -1)
                .sum(1, dtype=torch.float32)
                for c in calls
            )
            out["bias"] = (s, False)
        return out
