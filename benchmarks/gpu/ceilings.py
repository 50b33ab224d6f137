"""The card's own ceilings, measured first in the same run: device copy bandwidth and large GEMMs.

* Copy bandwidth: ``dst.copy_(src)`` of ``copy_bytes`` (fp32), counted as bytes read + written
  (2 x ``copy_bytes``), two buffer pairs rotated (together far beyond L2). The unit of every
  memory-bound row (the consolidation ops, the optimizer steps).
* GEMM: ``n x n x n`` products in bf16, fp32 with TF32 tensor cores, and fp32 ieee (TF32 off),
  ``2 n^3`` FLOPs each: the compute ceilings of ``persample_sq_``'s table.
"""

from __future__ import annotations

import torch

from .sizes import Sizes
from .timing import Rotor, time_sized


def _tf32(on: bool):
    class _Ctx:
        def __enter__(self):
            self.old = torch.backends.cuda.matmul.allow_tf32
            torch.backends.cuda.matmul.allow_tf32 = on

        def __exit__(self, *exc):
            torch.backends.cuda.matmul.allow_tf32 = self.old

    return _Ctx()


def copy_bandwidth(device, sizes: Sizes) -> dict:
    n = sizes.copy_bytes // 4
    pairs = [(torch.empty(n, device=device), torch.empty(n, device=device)) for _ in range(2)]
    for s, _ in pairs:
        s.uniform_()
    t = time_sized(Rotor(lambda p: p[1].copy_(p[0]), pairs), device, sizes)
    moved = 2 * n * 4
    return {"name": "device copy (fp32, read + write)", "bytes": moved, "seconds": t, "gb_s": moved / t / 1e9}


def gemm(device, sizes: Sizes, kind: str) -> dict:
    """``kind``: ``bf16`` | ``tf32`` | ``fp32-ieee``."""
    n = sizes.gemm_n
    dtype = torch.bfloat16 if kind == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=g)
    with _tf32(kind == "tf32"):
        t = time_sized(lambda: a @ b, device, sizes)
    flops = 2 * n**3
    return {"name": f"GEMM {n}^3 {kind}", "flops": flops, "seconds": t, "tflop_s": flops / t / 1e12}


def measure(device, sizes: Sizes, budget) -> tuple[list[dict], list[str]]:
    """Rows (copy, then the three GEMMs) and the names of the rows cut by ``budget``."""
    rows, cut = [], []
    steps = [("copy", lambda: copy_bandwidth(device, sizes))] + [
        (k, lambda k=k: gemm(device, sizes, k)) for k in ("bf16", "tf32", "fp32-ieee")
    ]
    for key, fn in steps:
        if budget.expired():
            cut.append(key)
            continue
        rows.append({"key": key, **fn()})
    return rows, cut
