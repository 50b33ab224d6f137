"""Affine normalisation layers: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, ``nn.BatchNorm1d/2d/3d``.

The affine map y = gamma ⊙ x_hat + beta is a diagonal Linear on x_hat, so with G the output gradient
and t the positions sharing a parameter entry (tokens, spatial positions):

* weight: p_n = sum_t G_nt ⊙ x_hat_nt,   bias: p_n = sum_t G_nt.

x_hat is recomputed from the captured input (fp32 for fp16/bf16 inputs), never obtained by dividing
by gamma (which fails at gamma = 0): LayerNorm (x - mean) / sqrt(var + eps) over the normalised
shape; RMSNorm x / sqrt(mean(x^2) + eps) (``eps=None``: ``finfo(input dtype).eps``); GroupNorm per
group; BatchNorm with the running statistics (eval mode). A BatchNorm without running statistics
normalises with batch statistics even in eval mode, which couples the samples: it is refused.
The per-sample gradients are (N, features), small, so they are formed and reduced directly.

SIG (Kutalev 2020, the affine map as a diagonal Linear): weight |gamma_c| * mean_n sum_t
|x_hat_ntc|; bias mean_n sum_t |act(y)_ntc|.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Rule, apply_activation, input_grad_slices, live_calls, main_input, reduce_into

__all__ = ["NormRule", "LayerNormRule", "RMSNormRule", "GroupNormRule", "BatchNormRule"]


def _at_least_fp32(x: Tensor) -> Tensor:
    """``x`` in fp32 if it is fp16/bf16, else as is (x_hat is recomputed at least in fp32)."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


class NormRule(Rule):
    """Affine norm layers: weight p_n = sum_t g ⊙ x_hat, bias p_n = sum_t g (x_hat recomputed).

    Subclasses define :meth:`xhat` and :meth:`feat`."""

    #: the layer defines dim 0 as its batch (GroupNorm, BatchNorm)
    dim0 = False

    def xhat(self, module, x: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def _out_bf(call, n, module, activation):
        """The (activated) output of a call, batch-first."""
        from ..provenance import batch_first

        y = apply_activation(activation, call.output)
        bd = call.out_dims[0] if call.out_dims is not None else None
        return batch_first(y, bd, n, f"output of {type(module).__name__}") if call.out_dims is not None else y

    def feat(self, module, t: Tensor, n: int) -> Tensor:
        """Reshape a (n, ...) tensor to (n, T, *param_shape) for the per-sample sum over T."""
        raise NotImplementedError

    def cached_xhat(self, module, call, x: Tensor, lo: int, hi: int) -> Tensor:
        """x_hat of samples lo:hi of ``call`` (``x``: its input slice), recomputed once per batch and
        kept on the call for the next seed (and SIG); freed with the call's captured inputs."""
        key = ("xhat", id(self), lo, hi)
        xh = call.cache.get(key)
        if xh is None:
            xh = call.cache[key] = self.xhat(module, x)
        return xh

    def per_sample(self, module, calls, grads, names, lo, hi, n):
        c = hi - lo
        ref = module.weight if module.weight is not None else module.bias
        dt = torch.promote_types(ref.dtype, torch.float32)  # half models: fp32 statistics
        res = {k: torch.zeros((c,) + tuple(ref.shape), dtype=dt, device=ref.device) for k in names}
        live = live_calls(calls, grads)[0]
        for call, (x, g) in zip(live, input_grad_slices(module, calls, grads, lo, hi, n)):
            if "weight" in names:
                xh = self.cached_xhat(module, call, x, lo, hi)
                res["weight"] += self.feat(module, g.to(xh.dtype) * xh, c).sum(1).to(dt)
            if "bias" in names:
                res["bias"] += self.feat(module, g, c).sum(1).to(dt)
        return res

    def accumulate(self, module, calls, grads, bufs, mode, n, backend):
        ps = self.per_sample(module, calls, grads, list(bufs), 0, n, n)  # (n, features): small
        for k, b in bufs.items():
            reduce_into(b, ps[k], mode)

    def sig(self, module, calls, names, n, activation):
        out = {}
        if "weight" in names:
            s = sum(
                self.feat(module, self.cached_xhat(module, c, main_input(c, n, module, sample_dim0=self.dim0), 0, n), n)
                .abs()
                .sum((0, 1), dtype=torch.float32)
                for c in calls
            )
            out["weight"] = (s, True)
        if "bias" in names:
            s = sum(
                self.feat(module, self._out_bf(c, n, module, activation), n).abs().sum((0, 1), dtype=torch.float32)
                for c in calls
            )
            out["bias"] = (s, False)
        return out


class LayerNormRule(NormRule):
    def xhat(self, module, x):
        # (x - mean) / sqrt(var + eps) over the normalised dims: layer_norm without affine is that, fused
        return F.layer_norm(_at_least_fp32(x), tuple(module.normalized_shape), None, None, module.eps)

    def feat(self, module, t, n):
        return t.reshape((n, -1) + tuple(module.normalized_shape))


class RMSNormRule(LayerNormRule):
    param_names = ("weight",)

    def xhat(self, module, x):
        dims = tuple(range(-len(module.normalized_shape), 0))
        xf = _at_least_fp32(x)
        eps = module.eps if module.eps is not None else torch.finfo(x.dtype).eps
        if hasattr(F, "rms_norm"):  # x / sqrt(mean(x^2) + eps), fused
            return F.rms_norm(xf, tuple(module.normalized_shape), None, eps)
        return xf * torch.rsqrt(xf.square().mean(dims, keepdim=True) + eps)


class _ChannelNormRule(NormRule):
    """Norms whose parameters index dim 1 (channels): T = every other position of a sample."""

    dim0 = True

    def feat(self, module, t, n):
        return t.reshape(n, t.shape[1], -1).transpose(1, 2)


class GroupNormRule(_ChannelNormRule):
    def xhat(self, module, x):
        return F.group_norm(_at_least_fp32(x), module.num_groups, None, None, module.eps)  # fused x_hat


class BatchNormRule(_ChannelNormRule):
    """BatchNorm1d/2d/3d in eval mode with running statistics (per-sample x_hat)."""

    def handles(self, module):
        if module.running_mean is None or module.running_var is None:
            raise ValueError(
                f"{type(module).__name__} without running statistics (track_running_stats=False) "
                "normalises with batch statistics even in eval mode, which couples the samples: "
                "per-sample importances are undefined for it"
            )
        return super().handles(module)

    def per_sample(self, module, calls, grads, names, lo, hi, n):
        """Per (sample, channel) sum_t g * x_hat and sum_t g in one fused pass without forming x_hat:
        torch's eval-mode batch-norm backward (its weight / bias gradients are exactly these sums over
        its batch and positions) on the input viewed as one sample of samples x channels channels, the
        running statistics repeated per sample."""
        c = hi - lo
        ref = module.weight if module.weight is not None else module.bias
        dt = torch.promote_types(ref.dtype, torch.float32)  # half models: fp32 statistics
        res = {k: torch.zeros((c,) + tuple(ref.shape), dtype=dt, device=ref.device) for k in names}
        for x, g in input_grad_slices(module, calls, grads, lo, hi, n):
            xf = _at_least_fp32(x)
            ch, t = xf.shape[1], math.prod(xf.shape[2:])
            if xf.numel() == 0:
                continue
            _, gw, gb = torch.ops.aten.native_batch_norm_backward(
                g.to(xf.dtype).reshape(1, c * ch, t),
                xf.reshape(1, c * ch, t),
                None,
                module.running_mean.to(xf.dtype).repeat(c),
                module.running_var.to(xf.dtype).repeat(c),
                None,
                None,
                False,
                module.eps,
                [False, "weight" in names, "bias" in names],
            )
            if "weight" in names:
                res["weight"] += gw.view(c, ch).to(dt)
            if "bias" in names:
                res["bias"] += gb.view(c, ch).to(dt)
        return res

    def xhat(self, module, x):
        shape = (1, -1) + (1,) * (x.dim() - 2)
        xf = _at_least_fp32(x)
        rm = module.running_mean.to(xf.dtype).view(shape)
        rv = module.running_var.to(xf.dtype).view(shape)
        return (xf - rm) * torch.rsqrt(rv + module.eps)
