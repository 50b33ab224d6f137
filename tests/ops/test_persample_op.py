"""persample_sq_: every backend against a float64 oracle that materialises the per-sample gradients.

Oracle: P_n = G_n^T A_n formed with a float64 einsum over the *same* (possibly bf16/fp16-rounded)
inputs, then sum_n P_n^2 and sum_n |P_n|. Checks: all outputs finite, relative Frobenius error
within a tolerance justified per dtype:

* fp32 / bf16 / fp16 inputs (fp32 accumulation): each P_n entry is a length-T fp32 dot product,
  relative error ~ u*sqrt(T) typically (u = 6e-8; worst case u*T), doubled by the square, plus
  ~u*sqrt(N) from the fp32 sum over samples. With T <= 140 that is ~1e-6; 16-bit products are exact
  in fp32 and the oracle uses the rounded inputs, so the same bound holds. TOL32 = 1e-5.
* fp64 inputs with fp64 outputs: same argument with u = 1.1e-16. TOL64 = 1e-12.
* fp64 inputs into fp32 outputs: the final rounding to fp32 dominates (u = 6e-8): TOL32.

* tf32 (``kernels.persample.launch(precision="tf32")``, CUDA only): inputs rounded to a 10-bit
  mantissa, u = 2^-11 (2^-10 if truncated), so each product is off by <= 2u ~ 2e-3 relative; with
  random signs the errors of a length-T dot product add like the terms themselves, so an entry of
  P_n is off by ~u..2u relative whatever T is, P_n^2 by twice that, and the Frobenius error of the
  sum over samples stays near 2e-3. TOL_TF32 = 1e-2: 5x margin, yet a lost or doubled T block
  (an error of >= 1/#blocks ~ 1e-1 here) still fails.

Triton runs in the CPU interpreter (tests/conftest.py sets TRITON_INTERPRET=1) on small shapes;
the ``cuda`` parameters (torch and Triton on CUDA tensors, skipped without a card, Triton also while
TRITON_INTERPRET=1) run the same checks on the card: the inputs are copied with their strides
(``tests.helpers.on_device``) and the outputs copied back, so every check below is unchanged.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from ewc_fast.ops import backends as _backend
from ewc_fast.ops import persample_sq_
from tests.helpers import cuda_marks, on_device

TOL32 = 1e-5
TOL64 = 1e-12
TOL_TF32 = 1e-2

#: (backend, threads, device)
BACKENDS = [
    pytest.param(("torch", None, "cpu"), id="torch"),
    pytest.param(
        ("cpp", 1, "cpu"),
        id="cpp-1thread",
        marks=pytest.mark.skipif(_backend.why_unavailable("cpp", "cpu") is not None, reason="no C++ ext"),
    ),
    pytest.param(
        ("cpp", 2, "cpu"),
        id="cpp-2threads",
        marks=pytest.mark.skipif(_backend.why_unavailable("cpp", "cpu") is not None, reason="no C++ ext"),
    ),
    pytest.param(
        ("triton", None, "cpu"),
        id="triton-interp",
        marks=pytest.mark.skipif(
            _backend.why_unavailable("triton", "cpu") is not None, reason="Triton interpreter unavailable"
        ),
    ),
    pytest.param(("torch", None, "cuda"), id="torch-cuda", marks=cuda_marks()),
    pytest.param(("triton", None, "cuda"), id="triton-cuda", marks=cuda_marks(triton=True)),
]
#: the backends fast enough for the larger shapes (not the CPU interpreter)
FAST = [b for b in BACKENDS if b.values[0][::2] != ("triton", "cpu")]
#: where the Triton launcher itself runs: the interpreter on CPU tensors, the card on CUDA tensors
TRITON_DEVICES = [
    pytest.param(
        "cpu",
        id="interp",
        marks=pytest.mark.skipif(
            _backend.why_unavailable("triton", "cpu") is not None, reason="Triton interpreter unavailable"
        ),
    ),
    pytest.param("cuda", id="cuda", marks=cuda_marks(triton=True)),
]


def _call(backend, sq, ab, G, A):
    """``persample_sq_`` on ``backend``'s device: inputs and outputs copied there with their strides,
    the outputs copied back into ``sq`` / ``ab``."""
    name, threads, device = backend
    old = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        dsq, dab, dG, dA = on_device((sq, ab, G, A), device)
        persample_sq_(dsq, dab, dG, dA, backend=name)
        for out, dev in ((sq, dsq), (ab, dab)):
            if out is not None and dev is not out:
                out.copy_(dev)
    finally:
        torch.set_num_threads(old)


def _launch(device, sq, ab, G, A, **kw):
    """``kernels.persample.launch`` on ``device`` (copies as in :func:`_call`)."""
    from ewc_fast.kernels import persample as K

    dsq, dab, dG, dA = on_device((sq, ab, G, A), device)
    K.launch(dsq, dab, dG, dA, **kw)
    for out, dev in ((sq, dsq), (ab, dab)):
        if out is not None and dev is not out:
            out.copy_(dev)


def _oracle(G, A):
    P = torch.einsum("nto,nti->noi", G.double(), A.double())  # (N, O, I): materialised on purpose
    return (P * P).sum(0), P.abs().sum(0)


def _rel_err(out, ref):
    assert torch.isfinite(out).all(), "non-finite output"
    ref = ref.double()
    denom = ref.norm().item()
    err = (out.double() - ref).norm().item()
    return err / denom if denom > 0 else err


def _inputs(N, T, O, I, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(N, T, O, generator=g, dtype=torch.float64).to(dtype)
    A = torch.randn(N, T, I, generator=g, dtype=torch.float64).to(dtype)
    return G, A


def _tol(in_dtype, out_dtype):
    return TOL64 if (in_dtype == torch.float64 and out_dtype == torch.float64) else TOL32


def _check(backend, G, A, *, do_sq=True, do_abs=True, out_dtype=torch.float32, init=False, seed=0):
    O, I = G.shape[2], A.shape[2]
    ref_sq, ref_ab = _oracle(G, A)
    g = torch.Generator().manual_seed(seed + 1)
    sq0 = (
        (torch.rand(O, I, generator=g, dtype=torch.float64) * ref_sq.mean()).to(out_dtype)
        if init
        else torch.zeros(O, I, dtype=out_dtype)
    )
    ab0 = (
        (torch.rand(O, I, generator=g, dtype=torch.float64) * ref_ab.mean()).to(out_dtype)
        if init
        else torch.zeros(O, I, dtype=out_dtype)
    )
    sq = sq0.clone() if do_sq else None
    ab = ab0.clone() if do_abs else None
    _call(backend, sq, ab, G, A)
    tol = _tol(G.dtype, out_dtype)
    errs = {}
    if do_sq:
        errs["sq"] = _rel_err(sq, sq0.double() + ref_sq)
    if do_abs:
        errs["abs"] = _rel_err(ab, ab0.double() + ref_ab)
    for k, e in errs.items():
        assert e <= tol, f"{backend} {k}: rel err {e:.3e} > {tol:.0e} (N,T,O,I)={tuple(G.shape[:2]) + (O, I)} {G.dtype}"
    return errs


# (N, T, O, I): N = 1, T = 1, ragged O/I/T, T > one Triton T block (32), T > one C++ K block (128),
# O/I across C++ macro tiles (96 x 128), T = 1 with N > one C++ K block
SHAPES = [(1, 1, 5, 3), (1, 7, 5, 3), (4, 7, 5, 3), (3, 9, 33, 17), (6, 1, 33, 17), (2, 40, 20, 70)]
CPU_SHAPES = [(2, 140, 13, 40), (3, 5, 100, 130), (300, 1, 20, 40), (9, 3, 200, 7)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_shapes(backend, shape):
    G, A = _inputs(*shape, torch.float32, seed=sum(shape))
    _check(backend, G, A)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_fp32_larger_shapes_fast_backends(backend, shape):
    G, A = _inputs(*shape, torch.float32, seed=sum(shape))
    _check(backend, G, A)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("shape", [(3, 9, 33, 17), (5, 1, 9, 20), (2, 70, 5, 9)], ids=lambda s: "x".join(map(str, s)))
def test_dtypes(backend, dtype, shape):
    # inputs are rounded to `dtype` first; the oracle sees exactly those rounded values
    G, A = _inputs(*shape, dtype, seed=7)
    _check(backend, G, A, out_dtype=torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mode", ["sq", "abs", "both"])
@pytest.mark.parametrize("T", [1, 6])
def test_outputs_and_accumulation(backend, mode, T):
    # accumulate into non-zero outputs of both output dtypes; one output at a time or both
    G, A = _inputs(5, T, 11, 19, torch.float32, seed=3)
    for out_dtype in (torch.float32, torch.float64):
        _check(backend, G, A, do_sq=mode != "abs", do_abs=mode != "sq", out_dtype=out_dtype, init=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp64_inputs_into_fp32_outputs(backend):
    G, A = _inputs(4, 5, 7, 9, torch.float64, seed=11)
    _check(backend, G, A, out_dtype=torch.float32, init=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 7])
def test_non_contiguous_inputs_and_outputs(backend, T):
    g = torch.Generator().manual_seed(5)
    N, O, I = 4, 9, 6
    G = torch.randn(T, N, 2 * O, generator=g).transpose(0, 1)[:, :, ::2]  # strides (2O, 2*N*O, 2)
    A = torch.randn(N, 2 * I, T, generator=g).transpose(1, 2)[:, :, ::2]  # strides (2*I*T, 1, 2T)
    assert not G.is_contiguous() and not A.is_contiguous()
    _check(backend, G, A)
    # a broadcast (stride-0) sample dimension and a transposed output
    A0 = torch.randn(1, T, I, generator=g).expand(N, T, I)
    ref_sq, ref_ab = _oracle(G, A0)
    sq = torch.zeros(I, O).t()
    ab = torch.zeros(I, O, dtype=torch.float64).t()
    _call(backend, sq, ab, G, A0)
    assert _rel_err(sq, ref_sq) <= TOL32 and _rel_err(ab, ref_ab) <= TOL32


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_propagates(backend):
    G, A = _inputs(3, 4, 6, 5, torch.float32, seed=2)
    G[1, 2, 4] = float("nan")
    sq = torch.zeros(6, 5)
    ab = torch.zeros(6, 5)
    _call(backend, sq, ab, G, A)
    assert torch.isnan(sq[4]).all() and torch.isnan(ab[4]).all()
    assert torch.isfinite(sq[:4]).all() and torch.isfinite(ab[5]).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_is_noop(backend):
    sq = torch.ones(3, 2)
    _call(backend, sq, None, torch.zeros(0, 4, 3), torch.zeros(0, 4, 2))
    _call(backend, sq, None, torch.zeros(2, 0, 3), torch.zeros(2, 0, 2))
    assert torch.equal(sq, torch.ones(3, 2))


def test_torch_backend_chunks_bound_memory(monkeypatch):
    from ewc_fast.ops.persample import _torch as _torch_persample

    # force chunks of 2 samples (2 * O * I * 4 bytes) so several chunks, one ragged, are summed
    monkeypatch.setattr(_torch_persample, "CHUNK_BYTES", 2 * 7 * 5 * 4)
    G, A = _inputs(5, 3, 7, 5, torch.float32, seed=9)
    _check(("torch", None, "cpu"), G, A, init=True)


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("T", [1, 35])
def test_triton_split_paths(device, splits, T):
    # splits == 1: plain read-add-write epilogue; splits > 1: atomic adds from several programs
    G, A = _inputs(7, T, 70, 10, torch.float32, seed=13)
    ref_sq, ref_ab = _oracle(G, A)
    sq = torch.ones(70, 10)
    ab = torch.ones(70, 10, dtype=torch.float64)
    _launch(device, sq, ab, G, A, splits=splits)
    assert _rel_err(sq, ref_sq + 1) <= TOL32 and _rel_err(ab, ref_ab + 1) <= TOL32


@pytest.mark.skipif(_backend.why_unavailable("cpp", "cpu") is not None, reason="no C++ ext")
def test_cpp_instruction_set_variants():
    # the AVX-512 / AVX2 / generic kernels are chosen once per process: run the others in a child
    code = (
        "import torch\n"
        "from ewc_fast.ops import persample_sq_\n"
        "from ewc_fast.ops._cpp_ext import ext\n"
        "torch.manual_seed(0)\n"
        "worst = 0.0\n"
        "for (N, T, O, I), dt in [((3, 9, 33, 17), torch.float32), ((4, 1, 100, 130), torch.float32),\n"
        "                         ((2, 5, 30, 20), torch.float64), ((3, 4, 20, 9), torch.bfloat16),\n"
        "                         ((3, 4, 20, 9), torch.float16), ((2, 140, 13, 40), torch.float32)]:\n"
        "    G = torch.randn(N, T, O).to(dt); A = torch.randn(N, T, I).to(dt)\n"
        "    P = torch.einsum('nto,nti->noi', G.double(), A.double())\n"
        "    sq = torch.zeros(O, I, dtype=torch.float64); ab = torch.zeros(O, I, dtype=torch.float64)\n"
        "    persample_sq_(sq, ab, G, A, backend='cpp')\n"
        "    for out, ref in ((sq, (P * P).sum(0)), (ab, P.abs().sum(0))):\n"
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


# ------------------------------------------------------------------------------- on the card only
#: every CUDA configuration kind with the input dtypes it serves (kernels/persample.py, _prune)
KINDS = {
    "fused16": (torch.bfloat16, torch.float16),
    "fused32": (torch.float32,),
    "fused64": (torch.float64,),
    "gemm": (torch.float32, torch.bfloat16),
    "gemm64": (torch.float64,),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks(triton=True))])
def test_every_cuda_config_on_its_tile_edges(device, kind):
    """Each (BLOCK_O, BLOCK_I, BLOCK_T, warps, stages) the autotuner may pick, launched directly on
    shapes one past / one short of its tiles (O = BO+1, I = BI-1, T = BT+1 or N = 2 BT+1 samples for
    the T = 1 GEMM) and on exact multiples: masks, the last T block and the epilogue of every config."""
    from ewc_fast.kernels import persample as K

    gemm = kind.startswith("gemm")
    for bo, bi, bt, warps, stages in K.CUDA_CONFIGS[kind]:
        for dtype in KINDS[kind]:
            edges = [(2 * bt + 1, 1, bo + 1, bi - 1), (bt, 1, bo, bi)] if gemm else [(3, bt + 1, bo + 1, bi - 1)]
            if not gemm:
                edges.append((2, 2 * bt, bo, bi))
            for N, T, O, I in edges:
                G, A = _inputs(N, T, O, I, dtype, seed=N + T + O + I)
                ref_sq, ref_ab = _oracle(G, A)
                out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
                both = bo * bi <= 64 * 128  # 128 x 128 tiles are only used with a single output
                sq = torch.zeros(O, I, dtype=out_dtype)
                ab = torch.zeros(O, I, dtype=out_dtype) if both else None
                _launch(device, sq, ab, G, A, config=(bo, bi, bt, warps, stages))
                what = f"{kind} {(bo, bi, bt, warps, stages)} {dtype} (N,T,O,I)={(N, T, O, I)}"
                tol = _tol(dtype, out_dtype)
                assert _rel_err(sq, ref_sq) <= tol, what
                if both:
                    assert _rel_err(ab, ref_ab) <= tol, what


@pytest.mark.parametrize("T", [1, 96])
@pytest.mark.parametrize("device", [pytest.param("cuda", marks=cuda_marks(triton=True))])
def test_tf32_against_ieee(device, T):
    """fp32 inputs: precision="ieee" (the op's) holds TOL32; precision="tf32" holds TOL_TF32 (module
    docstring) and really is less exact than ieee (the switch reaches the tensor cores)."""
    G, A = _inputs(6, T, 70, 50, torch.float32, seed=21)
    ref_sq, ref_ab = _oracle(G, A)
    errs = {}
    for precision in ("ieee", "tf32"):
        sq, ab = torch.zeros(70, 50), torch.zeros(70, 50)
        _launch(device, sq, ab, G, A, precision=precision)
        errs[precision] = max(_rel_err(sq, ref_sq), _rel_err(ab, ref_ab))
    assert errs["ieee"] <= TOL32, errs
    assert errs["tf32"] <= TOL_TF32, errs
    assert errs["tf32"] > errs["ieee"], errs


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_launcher_rejects_unknown_precision(device):
    from ewc_fast.kernels import persample as K

    G, A = _inputs(2, 3, 4, 5, torch.float32, seed=1)
    sq = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="precision='fp8'"):
        K.launch(sq, None, G, A, precision="fp8")
    assert torch.equal(sq, torch.zeros(4, 5))


@pytest.mark.parametrize("device", TRITON_DEVICES)
def test_explicit_config_path(device):
    # the config= launch path (what the CUDA config test drives) on a small problem
    G, A = _inputs(3, 17, 9, 70, torch.float32, seed=23)
    ref_sq, ref_ab = _oracle(G, A)
    sq, ab = torch.zeros(9, 70), torch.zeros(9, 70)
    _launch(device, sq, ab, G, A, config=(32, 64, 16, 4, 3))
    assert _rel_err(sq, ref_sq) <= TOL32 and _rel_err(ab, ref_ab) <= TOL32


# ------------------------------------------------------------------------------------ validation
def test_bad_inputs():
    G = torch.randn(2, 3, 4)
    A = torch.randn(2, 3, 5)
    sq = torch.zeros(4, 5)
    with pytest.raises(ValueError, match="both None"):
        persample_sq_(None, None, G, A)
    with pytest.raises(ValueError, match="3-D"):
        persample_sq_(sq, None, G[0], A)
    with pytest.raises(ValueError, match="3-D"):
        persample_sq_(sq, None, G, A.unsqueeze(0))
    with pytest.raises(ValueError, match="differ in N or T"):
        persample_sq_(sq, None, G, torch.randn(3, 3, 5))
    with pytest.raises(ValueError, match="differ in N or T"):
        persample_sq_(sq, None, G, torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="dtype"):
        persample_sq_(sq, None, G, A.double())
    with pytest.raises(TypeError, match="dtype"):
        persample_sq_(sq, None, G.int(), A.int())
    with pytest.raises(ValueError, match="expected \\(O, I\\)"):
        persample_sq_(torch.zeros(5, 4), None, G, A)
    with pytest.raises(ValueError, match="expected \\(O, I\\)"):
        persample_sq_(None, torch.zeros(4, 5, 1), G, A)
    with pytest.raises(TypeError, match="dtype"):
        persample_sq_(sq.bfloat16(), None, G, A)
    with pytest.raises(ValueError, match="share memory"):
        persample_sq_(sq, sq, G, A)
    with pytest.raises(ValueError, match="on meta"):
        persample_sq_(torch.zeros(4, 5, device="meta"), None, G, A)
    with pytest.raises(ValueError, match="inputs on meta"):
        persample_sq_(sq, None, G, A.to("meta"))
    with pytest.raises(TypeError, match="Tensor"):
        persample_sq_(sq, None, G.numpy(), A)
    with pytest.raises(ValueError, match="unknown backend"):
        persample_sq_(sq, None, G, A, backend="cuda-magic")
    assert torch.equal(sq, torch.zeros(4, 5))  # nothing was written by the failed calls


def test_opcheck_fake_impl():
    # schema, fake (meta) implementation and autograd registration of the custom op
    G, A = _inputs(3, 4, 5, 6, torch.float32, seed=1)
    for sq, ab in ((torch.zeros(5, 6), torch.zeros(5, 6)), (None, torch.zeros(5, 6, dtype=torch.float64))):
        torch.library.opcheck(torch.ops.ewc_fast.persample_sq_.default, (sq, ab, G, A, "torch"))


@pytest.mark.parametrize("device", TRITON_DEVICES)
@pytest.mark.parametrize("T", [1, 9])
def test_triton_int64_offsets(monkeypatch, device, T):
    # the int64 address path (operands spanning >= 2^30 elements) on a small problem
    from ewc_fast.kernels import persample as K

    monkeypatch.setattr(K, "_needs_idx64", lambda *tensors: True)
    G, A = _inputs(3, T, 10, 7, torch.float32, seed=17)
    _check(("triton", None, device), G, A)


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1, 2])
def test_16bit_conversion_all_bit_patterns(backend, dtype, T):
    # every 16-bit pattern (normals, subnormals, +-0, +-inf, nan) times an exact 1: abs_out must be
    # |x| and sq_out x*x (fp32), bit for bit, nan where x is nan
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    x = bits.view(dtype)
    G = torch.zeros(1, T, x.numel(), dtype=dtype)
    G[0, 0] = x
    A = torch.ones(1, T, 1, dtype=dtype)
    sq = torch.zeros(x.numel(), 1)
    ab = torch.zeros(x.numel(), 1)
    _call(backend, sq, ab, G, A)
    xf = x.float()
    torch.testing.assert_close(ab[:, 0], xf.abs(), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(sq[:, 0], xf * xf, rtol=0, atol=0, equal_nan=True)
