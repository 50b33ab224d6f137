"""Problem sizes of the GPU tables: ``GPU`` for the card, ``DRY`` for the CPU dry run (Triton
interpreter, tiny shapes, the same code paths)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    # ceilings: bytes copied per copy; square GEMM side
    copy_bytes: int
    gemm_n: int
    # persample_sq_ vs the dW GEMM: (O, I) of the layer, tokens N*T per call, the T values
    ps_out: int
    ps_in: int
    ps_tokens: int
    ps_T: tuple
    # consolidation ops: parameters in total (ragged list of ps_tensors tensors)
    cons_params: int
    cons_tensors: int
    # Fisher table: workload names, workload size, (samples, batch size) per workload, repeats
    workloads: tuple
    workload_size: str
    samples: dict
    repeats: int
    # timing of short operations (do_bench milliseconds on the card; ignored on CPU)
    warmup_ms: float
    rep_ms: float


GPU = Sizes(
    copy_bytes=1 << 30,
    gemm_n=8192,
    ps_out=4096,  # a transformer FFN projection, d = 1024 -> 4096
    ps_in=1024,
    ps_tokens=8192,
    ps_T=(128, 512, 1),  # the fused path first: rows are cut from the end when time runs out
    cons_params=64 << 20,
    cons_tensors=24,
    workloads=("transformer-T128", "transformer-T512"),
    workload_size="full",
    samples={"transformer-T128": (64, 32), "transformer-T512": (16, 8)},
    repeats=3,
    warmup_ms=25,
    rep_ms=100,
)

DRY = Sizes(
    copy_bytes=1 << 20,
    gemm_n=64,
    ps_out=24,
    ps_in=20,
    ps_tokens=32,
    ps_T=(8, 16, 1),
    cons_params=1500,
    cons_tensors=3,
    workloads=("transformer-T128",),
    workload_size="tiny",
    samples={"transformer-T128": (4, 2)},
    repeats=1,
    warmup_ms=1,
    rep_ms=1,
)
