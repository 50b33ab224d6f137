"""Pure-PyTorch backend of ``persample_conv_sq_`` (any device; the readable path).

``persample_conv_sq(sq_out, abs_out, G, X, stride, padding, dilation, groups)`` has the same name,
signature and semantics in ``_cpp.py`` (C++, ``csrc/persample_conv.cpp``) and ``_triton.py``
(Triton, ``kernels/persample_conv.py``). Inputs arrive validated from the op layer: X (N, C, *S) and
G (N, O, *L) share a float dtype and may have any strides; ``sq_out`` / ``abs_out`` are contiguous
(O, Cg, *K) fp32/fp64 tensors or None (not both).

One kernel tap k at a time: the input window W_k = Xpad[:, :, k*dilation :: stride][..L] (Xpad:
X zero padded by ``padding`` in front and as far as needed behind) gives the per-sample gradient of
that tap as a batched GEMM per group, dW_n[:, :, k] = G_ng (Og x L) @ W_kng^T (L x Cg); its square /
|.| is reduced over the samples. Samples are taken in chunks whose (chunk, O, Cg) per-tap gradients
stay under ``CHUNK_BYTES``. Arithmetic in fp32 (fp64 for fp64 inputs).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

#: upper bound on the bytes of one chunk's (chunk, O, Cg) per-tap per-sample gradients
CHUNK_BYTES = 64 * 2**20


def persample_conv_sq(sq_out, abs_out, G, X, stride, padding, dilation, groups):
    """sq_out += sum_n dW_n**2; abs_out += sum_n |dW_n| (either output may be None)."""
    ref = sq_out if sq_out is not None else abs_out
    N, O = G.shape[:2]
    L = tuple(G.shape[2:])
    K = tuple(ref.shape[2:])
    C = X.shape[1]
    Og, Cg = O // groups, C // groups
    Lp = 1
    for v in L:
        Lp *= v
    if N == 0 or Lp == 0 or O == 0 or C == 0:
        return
    cdt = torch.float64 if G.dtype == torch.float64 else torch.float32
    # zero padding: `padding` in front, behind as much as the last tap of the last position needs
    pads = []
    for s, l, k, st, p, dl in zip(X.shape[2:], L, K, stride, padding, dilation):
        need = (l - 1) * st + (k - 1) * dl + 1
        pads.append((p, max(0, need - p - s)))
    flat = [v for lr in reversed(pads) for v in lr]  # F.pad wants the last dim first
    elem = torch.empty((), dtype=cdt).element_size()
    chunk = max(1, min(N, CHUNK_BYTES // max(1, O * Cg * elem)))
    for lo in range(0, N, chunk):
        hi = min(N, lo + chunk)
        c = hi - lo
        xp = F.pad(X[lo:hi].to(cdt), flat)
        g = G[lo:hi].to(cdt).reshape(c, groups, Og, Lp)
        for tap in itertools.product(*(range(k) for k in K)):
            win = xp
            for i, (k, st, dl, l) in enumerate(zip(tap, stride, dilation, L)):
                win = win.narrow(2 + i, k * dl, (l - 1) * st + 1)[(slice(None),) * (2 + i) + (slice(None, None, st),)]
            w = win.reshape(c, groups, Cg, Lp)
            per = torch.matmul(g, w.transpose(2, 3)).reshape(c, O, Cg)  # this tap's per-sample gradients
            idx = (slice(None), slice(None)) + tap
            if abs_out is not None:
                abs_out[idx] += per.abs().sum(0)
            if sq_out is not None:
                sq_out[idx] += per.square().sum(0)
