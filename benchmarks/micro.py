"""Micro-benchmarks (pytest-benchmark) of every ewc_fast op, per backend, next to a memory copy.

Run from the repository root, with pytest-benchmark installed (the ``dev`` extra). The file is named
explicitly: it is not collected by the test suite (``testpaths = ["tests"]``, and its name does not
match ``test_*.py``)::

    .venv/bin/python -m pytest benchmarks/micro.py                       # timings
    .venv/bin/python -m pytest benchmarks/micro.py --benchmark-disable   # each case once (smoke)
    EWC_FAST_MICRO_NUMEL=1e7 .venv/bin/python -m pytest benchmarks/micro.py --benchmark-group-by=group

Sizes: ``EWC_FAST_MICRO_NUMEL`` parameters (default 1e6) split into 24 ragged tensors like a model's
layers (multi-tensor ops); ``persample_sq_`` uses ``EWC_FAST_MICRO_PERSAMPLE=N,T,O,I`` (default
32,16,256,256) and the plain-Linear case T = 1. Backends: C++ and torch on CPU; Triton and torch on
CUDA (``EWC_FAST_MICRO_DEVICE``, default cuda when available). Triton on CPU would be the
interpreter, so it is not benchmarked there. Compare rows within a group: ``group`` = op.
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

import ewc_fast  # noqa: E402
from ewc_fast import ops  # noqa: E402

from .bench_consolidation import ragged_sizes  # noqa: E402

DEVICE = os.environ.get("EWC_FAST_MICRO_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
NUMEL = int(float(os.environ.get("EWC_FAST_MICRO_NUMEL", "1e6")))
PERSAMPLE = tuple(int(v) for v in os.environ.get("EWC_FAST_MICRO_PERSAMPLE", "32,16,256,256").split(","))


def _backends():
    found = ewc_fast.available_backends(DEVICE)
    if torch.device(DEVICE).type == "cpu":
        found = [b for b in found if b != "triton"]
    return found


BACKENDS = _backends()


def _sync():
    if torch.device(DEVICE).type == "cuda":
        torch.cuda.synchronize()


def _bench(benchmark, fn, group):
    benchmark.group = group

    def call():
        fn()
        _sync()

    call()  # first call outside the timing (compilation, autotuning)
    benchmark(call)


def _lists(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    sizes = ragged_sizes(NUMEL)
    return [torch.randn(s, generator=g, dtype=dtype).to(DEVICE) for s in sizes]


@pytest.fixture(scope="module")
def state():
    params = _lists(seed=1)
    return {
        "params": params,
        "grads": [torch.randn_like(p) for p in params],
        "omega": [torch.rand_like(p) for p in params],
        "mu": [p.double() + 0.01 for p in params],
        "fisher": [torch.rand_like(p) for p in params],
        "anchor": [p + 0.01 for p in params],
        "prev": [p.clone() for p in params],
        "path": [torch.zeros_like(p) for p in params],
        "out": [torch.zeros_like(p) for p in params],
    }


def test_memory_copy(benchmark, state):
    """Roofline reference: copy NUMEL fp32 values (8 B per parameter moved)."""
    src = torch.cat([p.reshape(-1) for p in state["params"]])
    dst = torch.empty_like(src)
    _bench(benchmark, lambda: dst.copy_(src), "copy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_apply(benchmark, state, backend):
    s = state
    _bench(
        benchmark,
        lambda: ops.penalty_apply_(s["grads"], s["params"], s["omega"], s["mu"], 1.0, c=0.5, backend=backend),
        "penalty_apply_",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_penalty_apply_stabilised(benchmark, state, backend):
    s = state
    _bench(
        benchmark,
        lambda: ops.penalty_apply_(s["grads"], s["params"], s["omega"], s["mu"], 1.0, alpha=1e-3, backend=backend),
        "penalty_apply_ (alpha)",
    )


@pytest.mark.parametrize("online", [False, True], ids=["separate", "online"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_consolidate(benchmark, backend, online):
    params = _lists(seed=2)
    omega = [torch.rand_like(p) for p in params]
    mu = [p.double() for p in params]
    fisher = [torch.rand_like(p) * 1e-6 for p in params]  # small: Omega stays bounded over many calls
    anchor = [p + 0.01 for p in params]
    _bench(
        benchmark,
        lambda: ops.consolidate_(omega, mu, fisher, anchor, 0.9, online=online, backend=backend),
        "consolidate_",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_si_accumulate(benchmark, state, backend):
    s = state
    _bench(
        benchmark,
        lambda: ops.si_accumulate_(s["path"], s["grads"], s["params"], s["prev"], backend=backend),
        "si_accumulate_",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_si_consolidate(benchmark, backend):
    params = _lists(seed=3)
    path = [torch.randn_like(p) for p in params]
    start = [p - 0.1 for p in params]
    out = [torch.zeros_like(p) for p in params]
    _bench(
        benchmark,
        lambda: ops.si_consolidate_(path, params, start, out, 0.1, clip=True, backend=backend),
        "si_consolidate_",
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_wva_attenuate(benchmark, backend):
    params = _lists(seed=4)
    old = [p - 0.01 for p in params]
    accum = [torch.rand_like(p) for p in params]
    _bench(benchmark, lambda: ops.wva_attenuate_(params, old, accum, 0.5, backend=backend), "wva_attenuate_")


def _persample_inputs(t_one: bool):
    """Output gradients G (N, T, O), inputs A (N, T, I), a zero (O, I) accumulator and the group name;
    ``t_one``: the plain-Linear case, N*T samples of T = 1."""
    n, t, o, i = PERSAMPLE
    if t_one:
        n, t = n * t, 1
    g = torch.Generator().manual_seed(5)
    G = torch.randn(n, t, o, generator=g).to(DEVICE)
    A = torch.randn(n, t, i, generator=g).to(DEVICE)
    return G, A, torch.zeros(o, i, device=DEVICE), f"persample_sq_ N,T,O,I={n},{t},{o},{i}"


@pytest.mark.skipif(not hasattr(ops, "persample_sq_"), reason="persample_sq_ not in this checkout")
@pytest.mark.parametrize("t_one", [False, True], ids=["sequence", "T=1"])
@pytest.mark.parametrize("outputs", ["sq", "sq+abs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_persample_sq(benchmark, backend, outputs, t_one):
    G, A, sq, group = _persample_inputs(t_one)
    ab = torch.zeros_like(sq) if outputs == "sq+abs" else None
    _bench(benchmark, lambda: ops.persample_sq_(sq, ab, G, A, backend=backend), group)


@pytest.mark.parametrize("t_one", [False, True], ids=["sequence", "T=1"])
def test_persample_sq_unfused_reference(benchmark, t_one):
    """What the fused op avoids: materialise the N x O x I per-sample gradients, square, sum."""
    G, A, sq, group = _persample_inputs(t_one)
    _bench(benchmark, lambda: sq.add_(torch.bmm(G.transpose(1, 2), A).square().sum(0)), group)
