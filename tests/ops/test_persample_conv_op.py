"""persample_conv_sq_: every backend against the float64 oracle ``ewc_fast.testing.conv``.

The oracle takes each sample's weight gradient from autograd of ``F.conv{1,2,3}d`` in float64 over
the *same* (possibly bf16/fp16-rounded) inputs, then sum_n dW_n^2 and sum_n |dW_n|. Checks: all
outputs finite, relative Frobenius error within a tolerance justified per dtype:

* fp32 / bf16 / fp16 inputs (fp32 accumulation): each dW_n entry is a dot product over the L
  output positions (L <= 130 here), relative error ~ u*sqrt(L) typically (u = 6e-8), doubled by the
  square, plus ~u*sqrt(N) from the sum over samples: ~1e-6. 16-bit products are exact in fp32 and
  the oracle uses the rounded inputs, so the same bound holds. TOL32 = 1e-5.
* fp64 inputs with fp64 outputs: the same argument with u = 1.1e-16. TOL64 = 1e-12.

Triton runs in the CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes;
the ``cuda`` parameters (torch and Triton on CUDA tensors; skipped without a card, Triton also while
TRITON_INTERPRET=1) run the same checks on the card, inputs copied with their strides
(``tests.helpers.on_device``) and outputs copied back.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ewc_fast.ops import backends as _backend
from ewc_fast.ops import persample_conv_sq_
from ewc_fast.testing.conv import reference_persample_conv_sq
from tests.helpers import cuda_marks, on_device

TOL32 = 1e-5
TOL64 = 1e-12

_NO_CPP = _backend.why_unavailable("cpp", "cpu") is not None
_NO_TRITON = _backend.why_unavailable("triton", "cpu") is not None
#: (backend, threads, device)
BACKENDS = [
    pytest.param(("torch", None, "cpu"), id="torch"),
    pytest.param(("cpp", 1, "cpu"), id="cpp-1thread", marks=pytest.mark.skipif(_NO_CPP, reason="no C++ ext")),
    pytest.param(("cpp", 2, "cpu"), id="cpp-2threads", marks=pytest.mark.skipif(_NO_CPP, reason="no C++ ext")),
    pytest.param(("triton", None, "cpu"), id="triton-interp", marks=pytest.mark.skipif(_NO_TRITON, reason="no Triton")),
    pytest.param(("torch", None, "cuda"), id="torch-cuda", marks=cuda_marks()),
    pytest.param(("triton", None, "cuda"), id="triton-cuda", marks=cuda_marks(triton=True)),
]
#: the backends fast enough for the larger cases (not the CPU interpreter)
FAST = [b for b in BACKENDS if b.values[0][::2] != ("triton", "cpu")]
TRITON_DEVICES = [
    pytest.param("cpu", id="interp", marks=pytest.mark.skipif(_NO_TRITON, reason="no Triton")),
    pytest.param("cuda", id="cuda", marks=cuda_marks(triton=True)),
]


def _out_size(s, k, st, p, dl):
    return (s + 2 * p - dl * (k - 1) - 1) // st + 1


class Case:
    """A convolution: N, C, O, input extent S, kernel K, stride, padding, dilation, groups."""

    def __init__(self, N, C, O, S, K, stride=None, padding=None, dilation=None, groups=1, L=None):
        d = len(S)
        self.N, self.C, self.O, self.S, self.K, self.groups = N, C, O, tuple(S), tuple(K), groups
        self.stride = tuple(stride or (1,) * d)
        self.padding = tuple(padding or (0,) * d)
        self.dilation = tuple(dilation or (1,) * d)
        self.L = tuple(L) if L is not None else tuple(map(_out_size, S, K, self.stride, self.padding, self.dilation))

    def inputs(self, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(self.N, self.C, *self.S, generator=g, dtype=torch.float64).to(dtype)
        G = torch.randn(self.N, self.O, *self.L, generator=g, dtype=torch.float64).to(dtype)
        return G, X

    def kw(self):
        return dict(stride=self.stride, padding=self.padding, dilation=self.dilation, groups=self.groups)

    def __repr__(self):
        return (
            f"N{self.N}C{self.C}O{self.O}S{self.S}K{self.K}s{self.stride}p{self.padding}d{self.dilation}g{self.groups}"
        )


def _call(backend, sq, ab, G, X, case):
    name, threads, device = backend
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dsq, dab, dG, dX = on_device((sq, ab, G, X), device)
        persample_conv_sq_(dsq, dab, dG, dX, backend=name, **case.kw())
        for out, dev in ((sq, dsq), (ab, dab)):
            if out is not None and dev is not out:
                out.copy_(dev)
    finally:
        torch.set_num_threads(old)


def _rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    denom = ref.norm().item()
    err = (out.double() - ref).norm().item()
    return err / denom if denom > 0 else err


def _check(backend, case, G, X, *, do_sq=True, do_abs=True, out_dtype=torch.float32, init=False):
    ref_sq, ref_ab = reference_persample_conv_sq(G, X, case.K, **case.kw())
    shape = ref_sq.shape
    g = torch.Generator().manual_seed(3)
    sq0 = (torch.rand(shape, generator=g, dtype=torch.float64) * ref_sq.mean()).to(out_dtype) if init else None
    ab0 = (torch.rand(shape, generator=g, dtype=torch.float64) * ref_ab.mean()).to(out_dtype) if init else None
    sq0 = sq0 if init else torch.zeros(shape, dtype=out_dtype)
    ab0 = ab0 if init else torch.zeros(shape, dtype=out_dtype)
    sq = sq0.clone() if do_sq else None
    ab = ab0.clone() if do_abs else None
    _call(backend, sq, ab, G, X, case)
    tol = TOL64 if (G.dtype == torch.float64 and out_dtype == torch.float64) else TOL32
    if do_sq:
        e = _rel_err(sq, sq0.double() + ref_sq)
        assert e <= tol, f"{backend} sq: rel err {e:.3e} > {tol:.0e} {case} {G.dtype}"
    if do_abs:
        e = _rel_err(ab, ab0.double() + ref_ab)
        assert e <= tol, f"{backend} abs: rel err {e:.3e} > {tol:.0e} {case} {G.dtype}"


# N = 1; 1-D/2-D/3-D; stride, padding, dilation, groups (depthwise, grouped, multiplier 2);
# N == spatial size; asymmetric trailing padding ('same' with an even kernel: L given explicitly);
# a kernel larger than the input plus padding on one side; positions across C++ K blocks (L > 128)
CASES = [
    Case(1, 3, 4, (7,), (3,), padding=(1,)),
    Case(3, 4, 5, (9,), (2,), stride=(2,), dilation=(3,), padding=(2,)),
    Case(2, 4, 6, (9, 8), (3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    Case(2, 6, 6, (9, 8), (3, 3), padding=(1, 1), groups=6),  # depthwise
    Case(2, 3, 6, (6, 5), (3, 3), padding=(1, 1), groups=3),  # depthwise, multiplier 2
    Case(2, 3, 5, (5, 6, 4), (2, 3, 2), stride=(1, 2, 1), padding=(1, 0, 1), dilation=(1, 1, 2)),
    Case(5, 2, 3, (5,), (4,), padding=(1,), L=(5,)),  # 'same' with an even kernel: 1 in front, 2 behind
    Case(2, 2, 3, (3, 3), (5, 5), padding=(2, 2)),  # kernel larger than the input
    Case(4, 3, 4, (4, 4), (1, 1)),  # N == spatial size, 1x1 conv
]
CPU_CASES = [
    Case(2, 64, 130, (10, 14), (3, 3), padding=(1, 1)),  # O across C++ macro tiles, L = 140 > one K block
    Case(3, 20, 40, (12, 12), (3, 3), stride=(2, 2), padding=(1, 1)),  # J = 180 across column tiles
    Case(2, 16, 16, (6, 6, 6), (3, 3, 3), padding=(1, 1, 1), groups=4),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_fp32_cases(backend, case):
    G, X = case.inputs(torch.float32, seed=1)
    _check(backend, case, G, X)


# the edges of the CUDA tile (kernels/persample_conv.py CUDA_CONFIG = 64 x 64 x 32): O, J = C/groups * prod(K)
# and L one past a tile / a T block, and exact multiples
EDGE_CASES = [
    Case(2, 13, 65, (37,), (5,)),  # O = 65, J = 65, L = 33
    Case(3, 8, 64, (10, 10), (2, 4), padding=(0, 1)),  # O = 64, J = 64, L = 9 x 9
    Case(2, 8, 129, (10, 10), (3, 3), padding=(1, 1)),  # O = 129, J = 72, L = 100
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("case", CPU_CASES + EDGE_CASES, ids=repr)
def test_fp32_larger_cases_fast_backends(backend, case):
    G, X = case.inputs(torch.float32, seed=2)
    _check(backend, case, G, X)


# The C++ in-place path (fp32/fp64, >= NR channels and >= MR output channels per group: NR = 32/16/8 fp32
# and 16/8/4 fp64 columns, MR = 8/6/6 rows for AVX-512/AVX2/generic): a channel count that is not a
# multiple of NR and a row count that is not a multiple of MR (the shifted last blocks), groups, stride,
# dilation, 1x1 stride-1 (all positions one run), 3-D, and taps that only meet padding (dW entries 0).
INPLACE_CASES = [
    Case(3, 80, 52, (9, 8), (3, 3), stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=2),  # Cg 40, Og 26
    Case(3, 33, 13, (20,), (1,)),
    Case(2, 32, 12, (4, 5, 3), (3, 3, 2), stride=(1, 2, 1), padding=(1, 1, 0)),
    Case(2, 32, 12, (2, 2), (3, 3), padding=(2, 2), dilation=(2, 2)),  # taps 0 and 2 of each dim: padding only
    # depthwise with >= NR channels (the depthwise in-place path: channels in the vector lanes, last block shifted)
    Case(3, 40, 40, (9, 8), (3, 3), stride=(2, 1), padding=(1, 1), dilation=(1, 2), groups=40),
    Case(2, 33, 33, (12,), (3,), padding=(1,), groups=33),
]


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", INPLACE_CASES, ids=repr)
def test_inplace_path_cases(backend, dtype, case):
    G, X = case.inputs(dtype, seed=13)
    out = torch.float64 if dtype == torch.float64 else torch.float32
    _check(backend, case, G, X, out_dtype=out)
    cl = torch.channels_last if G.dim() == 4 else torch.channels_last_3d if G.dim() == 5 else None
    if cl is not None:  # already channels-last: read in place, no copy
        _check(backend, case, G.to(memory_format=cl), X.to(memory_format=cl), out_dtype=out, do_abs=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
def test_dtypes(backend, dtype):
    # inputs rounded to `dtype` first; the oracle sees exactly those rounded values
    case = CASES[2]
    G, X = case.inputs(dtype, seed=4)
    _check(backend, case, G, X, out_dtype=torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sq", "abs", "both"])
def test_outputs_and_accumulation(backend, mode):
    case = CASES[1]
    G, X = case.inputs(torch.float32, seed=5)
    for out_dtype in (torch.float32, torch.float64):
        _check(backend, case, G, X, do_sq=mode != "abs", do_abs=mode != "sq", out_dtype=out_dtype, init=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_channels_last(backend):
    # channels-last input and gradient, and a non-contiguous (sliced) batch, read through their strides
    case = Case(3, 8, 6, (6, 7), (3, 3), padding=(1, 1), stride=(1, 2))
    G, X = case.inputs(torch.float32, seed=6)
    _check(backend, case, G.to(memory_format=torch.channels_last), X.to(memory_format=torch.channels_last))
    big = Case(6, 8, 6, (6, 7), (3, 3), padding=(1, 1), stride=(1, 2))
    G2, X2 = big.inputs(torch.float32, seed=7)
    _check(backend, case, G2[::2], X2[::2])
    case3 = Case(2, 4, 4, (5, 5, 5), (2, 2, 2))
    G3, X3 = case3.inputs(torch.float32, seed=8)
    _check(backend, case3, G3.to(memory_format=torch.channels_last_3d), X3.to(memory_format=torch.channels_last_3d))


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_outputs(backend):
    case = CASES[0]
    G, X = case.inputs(torch.float32, seed=9)
    ref_sq, ref_ab = reference_persample_conv_sq(G, X, case.K, **case.kw())
    sq_nc = torch.zeros(3, 4, 3).transpose(0, 1)  # (4, 3, 3) views: written back through contiguous stand-ins
    ab = torch.zeros(4, 3, 3, 2)[..., 1]
    _call(backend, sq_nc, ab, G, X, case)
    assert _rel_err(sq_nc, ref_sq) <= TOL32 and _rel_err(ab, ref_ab) <= TOL32


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    case = CASES[0]
    G, X = case.inputs(torch.float32, seed=10)
    X[0, 1, 3] = float("nan")
    sq = torch.zeros(4, 3, 3)
    _call(backend, sq, None, G, X, case)
    assert torch.isnan(sq[:, 1]).any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_is_noop(backend):
    case = Case(0, 3, 4, (7,), (3,))
    G, X = case.inputs(torch.float32, seed=0)
    sq = torch.ones(4, 3, 3)
    _call(backend, sq, None, G, X, case)
    assert torch.equal(sq, torch.ones(4, 3, 3))


@pytest.mark.skipif(_NO_CPP, reason="no C++ ext")
def test_cpp_deterministic_across_runs_and_split():
    # 2 threads on a problem with few tiles splits the samples into slabs reduced in a fixed order
    case = Case(7, 3, 4, (9, 9), (3, 3), padding=(1, 1))
    G, X = case.inputs(torch.float32, seed=11)
    outs = []
    for _ in range(2):
        sq = torch.zeros(4, 3, 3, 3)
        _call(("cpp", 2, "cpu"), sq, None, G, X, case)
        outs.append(sq)
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
def test_triton_split_paths(device, splits):
    from ewc_fast.kernels.persample_conv import launch

    case = CASES[2]
    G, X = case.inputs(torch.float32, seed=12)
    ref_sq, ref_ab = reference_persample_conv_sq(G, X, case.K, **case.kw())
    sq, ab = torch.zeros(ref_sq.shape), torch.zeros(ref_sq.shape)
    dsq, dab, dG, dX = on_device((sq, ab, G, X), device)
    launch(dsq, dab, dG, dX, case.stride, case.padding, case.dilation, case.groups, splits=splits)
    sq, ab = dsq.cpu(), dab.cpu()
    assert _rel_err(sq, ref_sq) <= TOL32 and _rel_err(ab, ref_ab) <= TOL32


@pytest.mark.skipif(_NO_CPP, reason="no C++ ext")
def test_cpp_instruction_set_variants():
    # the AVX-512 / AVX2 / generic kernels are chosen once per process: run the others in a child
    code = (
        "import torch\n"
        "from ewc_fast.ops import persample_conv_sq_\n"
        "from ewc_fast.ops._cpp_ext import ext\n"
        "from ewc_fast.testing.conv import reference_persample_conv_sq\n"
        "torch.manual_seed(0)\n"
        "worst = 0.0\n"
        "for dt, C, O, g in ((torch.float32, 6, 20, 2), (torch.float64, 6, 20, 2), (torch.bfloat16, 6, 20, 2),\n"
        "                    (torch.float32, 76, 20, 2), (torch.float64, 76, 20, 2), (torch.float32, 20, 20, 20)):\n"
        # C = 76: 38 channels per group, the in-place path; C = O = groups = 20: the depthwise one
        "    X = torch.randn(2, C, 9, 8).to(dt); G = torch.randn(2, O, 5, 8).to(dt)\n"
        "    kw = dict(stride=(2, 1), padding=(1, 1), dilation=(1, 1), groups=g)\n"
        "    rs, ra = reference_persample_conv_sq(G, X, (3, 3), **kw)\n"
        "    sq = torch.zeros(O, C // g, 3, 3, dtype=torch.float64); ab = torch.zeros_like(sq)\n"
        "    persample_conv_sq_(sq, ab, G, X, backend='cpp', **kw)\n"
        "    for out, ref in ((sq, rs), (ab, ra)):\n"
        "        assert torch.isfinite(out).all()\n"
        "        worst = max(worst, ((out - ref).norm() / ref.norm()).item())\n"
        "print(ext().persample_isa(), worst)\n"
    )
    seen = set()
    for isa in ("generic", "avx2"):
        env = dict(os.environ, EWC_FAST_CPP_ISA=isa, OMP_NUM_THREADS="2")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        chosen, worst = out.stdout.split()
        seen.add(int(chosen))
        assert float(worst) <= TOL32, (isa, worst)
    assert 0 in seen


# ------------------------------------------------------------------------------------ validation
def test_bad_inputs():
    X = torch.randn(2, 4, 7, 7)
    G = torch.randn(2, 6, 5, 5)
    sq = torch.zeros(6, 2, 3, 3)

    def call(s=sq, a=None, g=G, x=X, **kw):
        persample_conv_sq_(s, a, g, x, **{"groups": 2, **kw})

    with pytest.raises(ValueError, match="both None"):
        call(s=None)
    with pytest.raises(ValueError, match="spatial dims"):
        call(g=G[0], x=X[0])
    with pytest.raises(ValueError, match="differ in N"):
        call(x=torch.randn(3, 4, 7, 7))
    with pytest.raises(ValueError, match="differ in N"):
        call(x=torch.randn(2, 4, 7))
    with pytest.raises(TypeError, match="dtype"):
        call(x=X.double())
    with pytest.raises(TypeError, match="dtype"):
        call(g=G.int(), x=X.int())
    with pytest.raises(ValueError, match="groups = 4 must divide"):
        call(groups=4)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        call(groups=0)
    with pytest.raises(ValueError, match="stride = \\[0, 1\\]"):
        call(stride=(0, 1))
    with pytest.raises(ValueError, match="padding has 3 entries"):
        call(padding=(1, 1, 1))
    with pytest.raises(TypeError, match="dilation must be an int"):
        call(dilation=1.5)
    with pytest.raises(ValueError, match="expected the weight's"):
        call(s=torch.zeros(6, 4, 3, 3))
    with pytest.raises(ValueError, match="differ in shape"):
        call(a=torch.zeros(6, 2, 3, 2))
    with pytest.raises(TypeError, match="dtype"):
        call(s=sq.bfloat16())
    with pytest.raises(ValueError, match="shares memory with abs_out"):
        call(a=sq)
    with pytest.raises(ValueError, match="shares memory with grad_out"):
        call(s=G.view(-1)[: sq.numel()].view(sq.shape))
    with pytest.raises(ValueError, match="on meta"):
        call(s=torch.zeros(6, 2, 3, 3, device="meta"))
    with pytest.raises(TypeError, match="Tensor"):
        call(g=G.numpy())
    with pytest.raises(ValueError, match="unknown backend"):
        call(backend="cuda-magic")
    assert torch.equal(sq, torch.zeros(6, 2, 3, 3))  # nothing was written by the failed calls


def test_opcheck_fake_impl():
    # schema, fake (meta) implementation and autograd registration of the custom op
    case = CASES[2]
    G, X = case.inputs(torch.float32, seed=13)
    w = (6, 2, 3, 2)
    for sq, ab in ((torch.zeros(w), torch.zeros(w)), (None, torch.zeros(w, dtype=torch.float64))):
        args = (sq, ab, G, X, list(case.stride), list(case.padding), list(case.dilation), case.groups, "torch")
        torch.library.opcheck(torch.ops.ewc_fast.persample_conv_sq_.default, args)
