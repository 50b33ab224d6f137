"""``nn.ConvTranspose1d/2d/3d`` rule (stride, padding, output_padding, dilation, groups).

A transposed convolution scatters each input position i into the output:
y[n, g*Og' + o, i*stride + k*dilation - padding] += x[n, g*Cg + c, i] * W[g*Cg + c, o, k]
(W is (C_in, C_out/groups, *kernel); output positions outside y's extent, including
``output_padding``'s, are dropped). Its per-sample weight gradient is therefore the direct
correlation of the same kind as a convolution's, with the roles of input and output gradient
swapped:

    dW_n[g*Cg + c, o, k] = sum_i x[n, g*Cg + c, i] * gy[n, g*Og' + o, i*stride + k*dilation - padding]

(gy zero outside its extent): :func:`ewc_fast.ops.persample_conv_sq_` with ``grad_out = x`` and
``inputs = gy`` computes sum_n dW_n^2 (or |dW_n|) without unfolding, for a module called once per
batch. Several calls per batch, and tied parameters, go through :meth:`per_sample` (one kernel tap
at a time, chunked over samples). Bias: p_n = sum over positions of gy_n. No SIG rule (the engine
uses |w| and says so in ``meta``).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from ...ops import persample_conv_sq_
from .base import Rule, chunk_rows, input_grad_slices, live_calls, main_input, reduce_into

__all__ = ["ConvTransposeRule"]


class ConvTransposeRule(Rule):
    """ConvTranspose1d/2d/3d: the conv kernel with input and output gradient swapped."""

    def handles(self, module: nn.Module) -> tuple[str, ...]:
        if module.padding_mode != "zeros":  # torch itself refuses other modes for transposed convs
            raise ValueError(f"{type(module).__name__}: padding_mode {module.padding_mode!r} is not supported")
        return super().handles(module)

    def _tap_grads(self, module, x, gy):
        """Per-sample weight gradients (c, C_in, C_out/groups, *K) of samples x (c, C_in, *S) and their
        output gradients gy (c, C_out, *L), one kernel tap at a time over the zero-padded gy."""
        c = x.shape[0]
        groups, K = module.groups, module.kernel_size
        cin, cout = x.shape[1], gy.shape[1]
        cg, og = cin // groups, cout // groups
        S = x.shape[2:]
        pads = []
        for s, l, k, st, p, dl in zip(S, gy.shape[2:], K, module.stride, module.padding, module.dilation):
            pads.append((p, max(0, (s - 1) * st + (k - 1) * dl + 1 - p - l)))
        gp = F.pad(gy, [v for lr in reversed(pads) for v in lr])
        P = 1
        for s in S:
            P *= s
        xs = x.reshape(c, groups, cg, P)
        out = torch.zeros((c, cin, og, *K), dtype=x.dtype, device=x.device)
        for tap in itertools.product(*(range(k) for k in K)):
            win = gp
            for i, (k, st, dl, s) in enumerate(zip(tap, module.stride, module.dilation, S)):
                win = win.narrow(2 + i, k * dl, (s - 1) * st + 1)[(slice(None),) * (2 + i) + (slice(None, None, st),)]
            w = win.reshape(c, groups, og, P)
            out[(slice(None), slice(None), slice(None)) + tap] = torch.matmul(xs, w.transpose(2, 3)).reshape(c, cin, og)
        return out

    def per_sample(self, module, calls, grads, names, lo, hi, n):
        c = hi - lo
        res = {
            k: torch.zeros(
                (c,) + tuple(getattr(module, k).shape), dtype=module.weight.dtype, device=module.weight.device
            )
            for k in names
        }
        for x, gy in input_grad_slices(module, calls, grads, lo, hi, n):
            if "weight" in names:
                res["weight"] += self._tap_grads(module, x.to(gy.dtype), gy)
            if "bias" in names:
                res["bias"] += gy.flatten(2).sum(2)
        return res

    def accumulate(self, module, calls, grads, bufs, mode, n, backend):
        calls, grads = live_calls(calls, grads)
        if not calls:
            return
        if len(calls) > 1:  # per-sample gradients summed over the calls before squaring
            names = list(bufs)
            per = sum(bufs[k].numel() for k in names) * 4 * max(1, len(module.kernel_size))
            step = chunk_rows(n, per)
            for lo in range(0, n, step):
                hi = min(n, lo + step)
                ps = self.per_sample(module, calls, grads, names, lo, hi, n)
                for k in names:
                    reduce_into(bufs[k], ps[k], mode)
            return
        gy = grads[0]
        if "bias" in bufs:
            reduce_into(bufs["bias"], gy.reshape(n, gy.shape[1], -1).sum(2), mode)
        if "weight" in bufs:
            x = main_input(calls[0], n, module, sample_dim0=True)
            if x.dtype != gy.dtype:
                x = x.to(gy.dtype)
            buf = bufs["weight"]
            persample_conv_sq_(
                buf if mode == "sq" else None,
                buf if mode == "abs" else None,
                x,
                gy,
                stride=list(module.stride),
                padding=list(module.padding),
                dilation=list(module.dilation),
                groups=module.groups,
                backend=backend,
            )
