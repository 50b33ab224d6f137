"""Pure-PyTorch backend of ``persample_sq_`` (any device; the readable path).

``persample_sq(sq_out, abs_out, G, A)`` has the same name, signature and semantics in
``ewc_fast/ops/persample/_cpp.py`` (C++, ``csrc/persample.cpp``) and ``ewc_fast/ops/persample/_triton.py``
(Triton, ``kernels/persample.py``). Inputs arrive validated from the op layer: ``G`` (N, T, O) and
``A`` (N, T, I) share a float dtype and may have any strides; ``sq_out`` / ``abs_out`` are contiguous
(O, I) fp32/fp64 tensors or None (not both None).

Per-sample weight gradient P_n = G_n^T A_n (summed over T);
``sq_out += sum_n P_n**2`` and ``abs_out += sum_n |P_n|``, computed in fp32 (fp64 for fp64 inputs).

* T == 1: P_n is an outer product, so the sums factor exactly into two GEMMs:
  sum_n P_n**2 = (G*G)^T (A*A) and sum_n |P_n| = |G|^T |A|.
* T > 1: the squares do not factor. Samples are processed in chunks whose (chunk, O, I) batch of
  per-sample gradients stays under ``CHUNK_BYTES``; each chunk is one batched GEMM, then |.| and
  square are applied in place and reduced over the chunk. Memory is bounded by ``CHUNK_BYTES``
  (plus one (O, I) reduction temporary), never N x O x I.
"""

from __future__ import annotations

import torch

#: upper bound on the bytes of the per-chunk (chunk, O, I) batch of per-sample gradients
CHUNK_BYTES = 64 * 2**20


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def persample_sq(sq_out, abs_out, G, A):
    """sq_out += sum_n (G_n^T A_n)**2; abs_out += sum_n |G_n^T A_n| (either output may be None)."""
    N, T, O = G.shape
    I = A.shape[2]
    if N == 0 or T == 0 or O == 0 or I == 0:
        return
    cdt = _compute_dtype(G.dtype)
    if T == 1:
        g = G[:, 0, :].to(cdt)
        a = A[:, 0, :].to(cdt)
        if sq_out is not None:
            sq_out.add_(torch.mm((g * g).t(), a * a))
        if abs_out is not None:
            abs_out.add_(torch.mm(g.abs().t(), a.abs()))
        return
    elem = torch.empty((), dtype=cdt).element_size()
    chunk = max(1, min(N, CHUNK_BYTES // max(1, O * I * elem)))
    for s in range(0, N, chunk):
        e = min(N, s + chunk)
        gc = G[s:e].to(cdt)
        ac = A[s:e].to(cdt)
        p = torch.bmm(gc.transpose(1, 2), ac)  # (c, O, I) per-sample gradients of this chunk
        if abs_out is not None:
            p.abs_()
            abs_out.add_(p.sum(0))
        if sq_out is not None:
            p.square_()
            sq_out.add_(p.sum(0))
