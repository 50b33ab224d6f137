"""fused_step_ (one optimizer step of SGD / Adam / AdamW + EWC penalty + SI + WVA) on every backend
against the float64 oracle :func:`ewc_fast.testing.fused_step.fused_step`; validation (clear errors,
nothing written); torch.library.opcheck.

Backends: "torch"; "cpp" with 1 and 2 threads; "triton" on CPU tensors in the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1); "torch-cuda" / "triton-cuda" on CUDA tensors (marked
``cuda``: skipped without a card, Triton also while TRITON_INTERPRET=1), the inputs copied there with
their strides and the results copied back, so every check is the CPU one. Results are compared per
tensor by relative norm error (NaN/inf never pass); each tolerance says where it comes from.
"""

from __future__ import annotations

import pytest
import torch

from ewc_fast import ops
from ewc_fast.ops.backends import why_unavailable
from ewc_fast.testing import fused_step as oracle
from tests.helpers import BACKEND_CASES, backend_for, isa_variant_results, on_device

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16

# --- tolerances ---------------------------------------------------------------------------------
# parameters and optimizer state, fp32 arithmetic: each value is <= ~12 fp32 roundings of
# well-conditioned data (penalty, decay, moments, sqrt, division, step), each <= 2^-24 ~ 6e-8 relative;
# 2e-6 leaves ~3x margin and fails for any wrong term (errors of a wrong formula are >= 1e-3 here).
TOL_FP32 = 2e-6
# fp64 arithmetic: a few fp64 ulps; 1e-12 fails for any step done in fp32.
TOL_FP64 = 1e-12
# bf16 / fp16 parameters: the stored value is rounded to nearest once (twice with WVA): the fp32 result
# and the fp64 oracle may round to neighbouring values, one ulp apart: <= 2^-7 relative for bf16
# (8-bit significand), 2^-10 for fp16.
TOL_STORED = {F32: TOL_FP32, F64: TOL_FP64, BF16: 2.0**-7, F16: 2.0**-10}
# SI's omega: g * (theta_new - theta_old) with theta_new rounded to fp32 -- the backend's fp32 update and
# the oracle's fp64 update can store neighbouring fp32 values, an error of ulp(theta) ~ 1.2e-7 against
# steps |dtheta| >= ~1e-3 here (lr 0.01..0.1, |g| ~ 1): <= ~1e-4 per element, far less in norm; 1e-4
# (norm-relative) still fails for a missing or wrong factor.
TOL_SI = {F32: 1e-4, F64: 1e-12}
# penalty value: fp32 partial sums of <= 8192 positive terms added in fp64 (as penalty_apply_): 1e-5.
TOL_SUM = {F32: 1e-5, F64: 1e-12}


def assert_rel(x, ref, tol, what=""):
    x, ref = (
        v.detach().to("cpu", F64) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=F64) for v in (x, ref)
    )
    assert x.shape == ref.shape, what
    assert torch.isfinite(ref).all(), f"{what}: reference not finite (test bug)"
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    den = float(ref.norm())
    err = float((x - ref).norm())
    rel = err / den if den > 0 else err
    assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.1e}"


@pytest.fixture(params=BACKEND_CASES)
def case(request):
    """(backend, device) of a test case."""
    return request.param


@pytest.fixture
def device(case):
    return case[1]


@pytest.fixture
def backend(case):
    with backend_for(case) as name:
        yield name


def _arith(dtype):
    return F64 if dtype == F64 else F32


def _make(shapes, dtype, algo, *, amsgrad=False, momentum=0.9, ewc=True, si=True, wva=True, noncontig=False, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(shape, dt, pos=False):
        x = torch.randn(shape, generator=gen, dtype=F64)
        return (x.abs() if pos else x).to(dt)

    ct = _arith(dtype)
    if noncontig:  # transposed views of 2-D tensors
        params = [r(s[::-1], dtype).t() if len(s) == 2 else r(s, dtype) for s in shapes]
    else:
        params = [r(s, dtype) for s in shapes]
    t = {"params": params, "grads": [r(s, dtype) for s in shapes]}
    if algo == "sgd":
        t["exp_avg"] = [r(s, ct) for s in shapes] if momentum else []
        t["exp_avg_sq"], t["max_exp_avg_sq"] = [], []
    else:
        t["exp_avg"] = [r(s, ct) * 0.1 for s in shapes]
        t["exp_avg_sq"] = [r(s, ct, pos=True) * 0.01 for s in shapes]
        t["max_exp_avg_sq"] = [v * 1.5 + 0.001 for v in t["exp_avg_sq"]] if amsgrad else []
    t["omega"] = [r(s, F32, pos=True) for s in shapes] if ewc else []
    t["mu"] = [p.to(F64) + r(s, F64) * 0.1 for p, s in zip(params, shapes)] if ewc else []
    t["si_omega"] = [r(s, ct) for s in shapes] if si else []
    t["wva_accum"] = [r(s, F32, pos=True) for s in shapes] if wva else []
    return t


SHAPES = [(1,), (7,), (300,), (33, 17), (1000,)]
CASES = [
    ("sgd", dict(lr=0.1, momentum=0.9, dampening=0.1, weight_decay=0.01, momentum_init=False)),
    ("sgd", dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.0, momentum_init=True)),
    ("sgd", dict(lr=0.05, momentum=0.0, weight_decay=0.1)),
    ("adam", dict(lr=0.01, betas=(0.9, 0.999), weight_decay=0.05, step=3, eps=1e-8)),
    ("adamw", dict(lr=0.01, betas=(0.8, 0.99), weight_decay=0.1, step=1, eps=1e-6)),
    ("adamw", dict(lr=0.01, betas=(0.6, 0.9), weight_decay=0.0, step=7, eps=1e-8, amsgrad=True)),
]


def _run(
    backend, algo, kw, dtype, *, ewc=True, si=True, wva=True, noncontig=False, si_variant="zenke", alpha=None,
    device="cpu",
):  # fmt: skip
    kw = dict(kw)
    amsgrad = kw.pop("amsgrad", False)
    t = _make(SHAPES, dtype, algo, amsgrad=amsgrad, momentum=kw.get("momentum", 0.9), ewc=ewc, si=si, wva=wva,
              noncontig=noncontig)  # fmt: skip
    extra = dict(lam=1.5, alpha=alpha, c=0.25, si_variant=si_variant, wva_lam=0.7, inv_scale=0.5)
    ref = oracle.fused_step(
        t["params"], t["grads"], t["exp_avg"], t["exp_avg_sq"], t["max_exp_avg_sq"], algo=algo,
        omega=t["omega"], mu=t["mu"], si_omega=t["si_omega"], wva_accum=t["wva_accum"], **kw, **extra,
    )  # fmt: skip
    d = on_device(t, device)  # the same strides on the card; results copied back below
    val = ops.fused_step_(
        d["params"], d["grads"], d["exp_avg"], d["exp_avg_sq"], d["max_exp_avg_sq"], algo=algo,
        omega=d["omega"], mu=d["mu"], si_omega=d["si_omega"], wva_accum=d["wva_accum"], backend=backend, **kw, **extra,
    )  # fmt: skip
    for k in t:
        for x, y in zip(t[k], d[k]):
            if x is not y:
                x.copy_(y)
    return t, ref, val.cpu()


@pytest.mark.parametrize("algo,kw", CASES)
@pytest.mark.parametrize("dtype", [F32, F64, BF16])
def test_matches_oracle(backend, device, algo, kw, dtype):
    t, (p, m, v, vm, si, pen), val = _run(backend, algo, kw, dtype, device=device)
    ct = _arith(dtype)
    tol_state = TOL_FP64 if ct == F64 else TOL_FP32
    for i in range(len(SHAPES)):
        assert_rel(t["params"][i], p[i], TOL_STORED[dtype], f"params[{i}]")
        if m:
            assert_rel(t["exp_avg"][i], m[i], tol_state, f"exp_avg[{i}]")
        if v:
            assert_rel(t["exp_avg_sq"][i], v[i], tol_state, f"exp_avg_sq[{i}]")
        if vm:
            assert_rel(t["max_exp_avg_sq"][i], vm[i], tol_state, f"max_exp_avg_sq[{i}]")
        if dtype != BF16:  # with bf16 theta, one ulp of the stored step is ~0.4 % of it: checked below
            assert_rel(t["si_omega"][i], si[i], TOL_SI[ct], f"si_omega[{i}]")
    assert val.dtype == F64 and val.shape == ()
    assert_rel(val, pen, TOL_SUM[ct], "penalty")


@pytest.mark.parametrize("algo,kw", [CASES[0], CASES[5]])
def test_bf16_and_fp16_agree_with_the_torch_twin(backend, device, algo, kw):
    """Low-precision parameters: every backend computes the fp32 twin's values; the stored parameter
    may differ by one ulp where fp32 results differ in their last bit (operation order), and SI sees
    exactly the stored step, so it is compared through the stored parameters."""
    for dtype in (BF16, F16):
        t_ref, _, val_ref = _run("torch", algo, kw, dtype, si_variant="kutalev", alpha=0.3)
        t, _, val = _run(backend, algo, kw, dtype, si_variant="kutalev", alpha=0.3, device=device)
        for i in range(len(SHAPES)):
            assert_rel(t["params"][i], t_ref["params"][i], TOL_STORED[dtype], f"{dtype} params[{i}]")
            assert_rel(t["exp_avg"][i], t_ref["exp_avg"][i], TOL_FP32, f"{dtype} exp_avg[{i}]")
            same = t["params"][i] == t_ref["params"][i]  # where the stored step agrees, so does SI
            assert_rel(t["si_omega"][i][same], t_ref["si_omega"][i][same], TOL_FP32, f"{dtype} si[{i}]")
        assert_rel(val, val_ref, TOL_SUM[F32], "penalty")


@pytest.mark.parametrize("feature", ["none", "ewc", "si", "wva", "stab", "kutalev", "noncontig"])
def test_features_separately(backend, device, feature):
    algo, kw = CASES[3]
    flags = dict(ewc=feature in ("ewc", "stab", "kutalev"), si=feature in ("si", "kutalev"), wva=feature == "wva")
    if feature == "noncontig":
        flags = dict(ewc=True, si=True, wva=True, noncontig=True)
    t, (p, m, v, vm, si, pen), val = _run(
        backend, algo, kw, F32, **flags, si_variant="kutalev" if feature == "kutalev" else "zenke",
        alpha=0.2 if feature == "stab" else None, device=device,
    )  # fmt: skip
    for i in range(len(SHAPES)):
        assert_rel(t["params"][i], p[i], TOL_FP32, f"params[{i}]")
        assert_rel(t["exp_avg_sq"][i], v[i], TOL_FP32, f"exp_avg_sq[{i}]")
        if si:
            assert_rel(t["si_omega"][i], si[i], TOL_SI[F32], f"si[{i}]")
    assert_rel(val, pen, TOL_SUM[F32], "penalty")


def test_several_chunks_cpp():
    """Tensors spanning several C++ chunks (8192) and thread counts give identical results."""
    if why_unavailable("cpp", torch.device("cpu")):
        pytest.skip("no C++ extension")
    outs = []
    for nt in (1, 2):
        old = torch.get_num_threads()
        torch.set_num_threads(nt)
        try:
            t = _make([(20011,), (3,)], F32, "adamw", amsgrad=True)
            val = ops.fused_step_(
                t["params"], t["grads"], t["exp_avg"], t["exp_avg_sq"], t["max_exp_avg_sq"], algo="adamw", lr=0.01,
                omega=t["omega"], mu=t["mu"], lam=1.0, si_omega=t["si_omega"], backend="cpp",
            )  # fmt: skip
        finally:
            torch.set_num_threads(old)
        outs.append((val, t))
    assert torch.equal(outs[0][0], outs[1][0])
    for a, b in zip(outs[0][1]["params"], outs[1][1]["params"]):
        assert torch.equal(a, b)


_ISA_CHILD = """
import sys, torch
from ewc_fast import ops
from ewc_fast.ops._cpp_ext import ext
from tests.ops.test_fused_step_op import _make
out = {}
for name, algo, dt, kw in [
    ("adamw-ams-f32", "adamw", torch.float32, dict(lr=0.01, amsgrad=True, weight_decay=0.1, step=3)),
    ("adam-f64", "adam", torch.float64, dict(lr=0.01, weight_decay=0.05, step=2)),
    ("sgd-nesterov-bf16", "sgd", torch.bfloat16, dict(lr=0.1, momentum=0.9, nesterov=True, momentum_init=False)),
    ("sgd-f16", "sgd", torch.float16, dict(lr=0.05, momentum=0.9, dampening=0.1, weight_decay=0.01)),
]:
    ams = kw.pop("amsgrad", False)
    t = _make([(8200,), (1,), (33, 17)], dt, "sgd" if algo == "sgd" else "adam", amsgrad=ams, noncontig=True)
    val = ops.fused_step_(t["params"], t["grads"], t["exp_avg"], t["exp_avg_sq"], t["max_exp_avg_sq"], algo=algo,
                          omega=t["omega"], mu=t["mu"], lam=1.5, alpha=0.3, si_omega=t["si_omega"],
                          wva_accum=t["wva_accum"], wva_lam=0.7, inv_scale=0.5, backend="cpp", **kw)
    out[name] = (val, t)
torch.save((ext().persample_isa(), out), sys.argv[1])
"""


def test_cpp_instruction_set_variants(tmp_path):
    """The generic / AVX2 / AVX-512 builds of the step (EWC_FAST_CPP_ISA caps the choice, made once per
    process) give bit-identical results: same operations in the same order, no FMA contraction."""
    results = isa_variant_results(_ISA_CHILD, tmp_path)
    base = results[0]
    for chosen, out in results.items():
        for name, (val, t) in out.items():
            assert torch.equal(val, base[name][0]), (chosen, name)
            for k, xs in t.items():
                for x, y in zip(xs, base[name][1][k]):
                    assert torch.equal(x, y), (chosen, name, k)


# --- validation: clear errors, nothing written ------------------------------------------------------
def _snapshot(t):
    return {k: [x.clone() for x in v] for k, v in t.items()}


def _unchanged(t, snap):
    for k in t:
        for a, b in zip(t[k], snap[k]):
            assert torch.equal(a, b), f"{k} was written"


def _call(t, **kw):
    args = dict(algo="adamw", lr=0.01, omega=t["omega"], mu=t["mu"], lam=1.0, si_omega=t["si_omega"])
    args.update(kw)
    return ops.fused_step_(t["params"], t["grads"], t["exp_avg"], t["exp_avg_sq"], t["max_exp_avg_sq"], **args)


@pytest.mark.parametrize(
    "mutate,kw,err,match",
    [
        (None, dict(algo="rmsprop"), ValueError, "algo"),
        (None, dict(lr=float("nan")), ValueError, "lr"),
        (None, dict(lr=-1.0), ValueError, "lr"),
        (None, dict(betas=(1.0, 0.9)), ValueError, "betas"),
        (None, dict(step=0), ValueError, "step"),
        (None, dict(inv_scale=0.0), ValueError, "inv_scale"),
        (None, dict(si_variant="x"), ValueError, "si_variant"),
        (lambda t: t["exp_avg"].pop(), {}, ValueError, "exp_avg"),
        (lambda t: t["exp_avg_sq"].__setitem__(1, t["exp_avg_sq"][1].double()), {}, TypeError, "exp_avg_sq"),
        (lambda t: t["mu"].clear(), {}, ValueError, "omega and mu"),
        (lambda t: t["si_omega"].__setitem__(2, torch.zeros(5)), {}, ValueError, "shapes differ"),
        (lambda t: t["grads"].__setitem__(0, t["params"][0]), {}, ValueError, "share memory|overlap"),
        (lambda t: t["si_omega"].__setitem__(3, t["omega"][3]), {}, ValueError, "share memory|overlap"),
        (lambda t: t["exp_avg"].__setitem__(4, t["exp_avg_sq"][4][:]), {}, ValueError, "share memory|overlap"),
    ],
)
def test_bad_input_is_refused_before_any_write(mutate, kw, err, match):
    t = _make(SHAPES, F32, "adamw", wva=False)
    if mutate is not None:
        mutate(t)
    snap = _snapshot(t)
    with pytest.raises(err, match=match):
        _call(t, **kw)
    _unchanged(t, snap)


def test_sgd_state_lists_follow_momentum():
    t = _make(SHAPES, F32, "sgd", momentum=0.0, wva=False)
    with pytest.raises(ValueError, match="exp_avg must be 5 tensors"):
        ops.fused_step_(t["params"], t["grads"], algo="sgd", lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="nesterov"):
        ops.fused_step_(t["params"], t["grads"], algo="sgd", lr=0.1, nesterov=True)
    ops.fused_step_(t["params"], t["grads"], algo="sgd", lr=0.1)  # plain SGD: no state


def test_opcheck():
    t = _make([(3,), (4, 2)], F32, "adamw", amsgrad=True)
    args = (
        t["params"], t["grads"], t["exp_avg"], t["exp_avg_sq"], t["max_exp_avg_sq"], t["omega"], t["mu"],
        t["si_omega"], t["wva_accum"], 2, 0.01, 0.9, 0.999, 1e-8, 0.01, 0.0, False, 2, False, 1.0, None, 0.0, 1.0,
        False, 0.5, 1.0, "torch",
    )  # fmt: skip
    torch.library.opcheck(torch.ops.ewc_fast.fused_step_.default, args)
