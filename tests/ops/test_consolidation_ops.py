"""Consolidation ops (penalty_apply_, consolidate_, si_accumulate_, si_consolidate_, wva_attenuate_)
on every backend against the float64 oracles in :mod:`ewc_fast.testing.consolidation`.

Backends: "torch"; "cpp" with torch.set_num_threads(1) and (2); "triton" on CPU tensors in the
Triton interpreter (tests/conftest.py sets TRITON_INTERPRET=1), run when
``ewc_fast.kernels.consolidation`` imports and defines the op, skipped with the reason otherwise;
"torch-cuda" and "triton-cuda" on CUDA tensors (marked ``cuda``; skipped without a card, and Triton
also while TRITON_INTERPRET=1: on the card the kernels must be compiled, not interpreted). The same
tolerances hold on CUDA: the Triton kernels compile with ``enable_fp_fusion=False`` and ``tl.div_rn``,
so every elementwise result is rounded exactly as on the CPU; only the order of the partial sums differs.

Results are compared per tensor by relative norm error ||x - ref|| / ||ref|| (NaN/inf never pass);
each tolerance below says where it comes from.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import ewc_fast
from ewc_fast import ops
from ewc_fast.ops.backends import why_unavailable
from ewc_fast.testing import consolidation as reference
from tests.helpers import BACKEND_CASES, backend_for, isa_variant_results, on_device

F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
PARAM_DTYPES = (F32, F64, BF16, F16)
STATE_DTYPES = (F32, F64)

# --- tolerances ---------------------------------------------------------------------------------
# fp32 arithmetic (penalty, si_*, wva): each result is a handful (<= ~6) of fp32 roundings of
# well-conditioned random data, each <= 2^-24 ~ 6e-8 relative -> a few ulp; 1e-6 leaves ~3x margin.
TOL_FP32 = 1e-6
# fp64 arithmetic stored in fp64 (consolidate with fp64 state): a few fp64 ulp (1.1e-16 each); 1e-12
# is loose yet fails for any step done in fp32.
TOL_FP64 = 1e-12
# consolidate's c increment: fp64 arithmetic, but (mu - mu') cancels where F << Omega, so single
# terms lose up to ~|mu|/|mu - mu'| ulps; the sum of positive terms stays well within 1e-10.
TOL_INC = 1e-10
# penalty value: fp32 partial sums of up to 8192 positive terms (cpp: 16 lanes of <= 512 terms,
# triton: per-block tree, torch: cascade sum) added in fp64. Random rounding errors grow like
# sqrt(terms) * 2^-24 ~ 1.5e-6 at worst here; 1e-5 still rejects any wrong term.
TOL_SUM = 1e-5
# bf16 / fp16 destinations (grads, params): on top of the fp32 arithmetic, the stored result is
# rounded once to nearest: half an ulp is <= 2^-8 relative for bf16 (8-bit significand) and
# <= 2^-11 for fp16 (11-bit significand).
TOL_STORED = {F32: TOL_FP32, F64: TOL_FP32, BF16: 2.0**-8 + TOL_FP32, F16: 2.0**-11 + TOL_FP32}
# the cancellation case (10 merged tasks, theta within 1e-4 of mu): value and gradient must match
# the per-task float64 sum to 1e-5 relative.
TOL_CANCEL = 1e-5


def assert_rel(x, ref, tol, what=""):
    """Finite, and ||x - ref|| / ||ref|| <= tol (absolute when ref is all zero)."""
    x, ref = (
        v.detach().to("cpu", F64) if isinstance(v, torch.Tensor) else torch.tensor(v, dtype=F64) for v in (x, ref)
    )  # Python floats straight to fp64 (as_tensor would round to fp32)
    assert x.shape == ref.shape, f"{what}: shape {tuple(x.shape)} != reference {tuple(ref.shape)}"
    assert torch.isfinite(ref).all(), f"{what}: reference is not finite (test bug)"
    assert torch.isfinite(x).all(), f"{what}: non-finite values"
    err = float((x - ref).norm())
    den = float(ref.norm())
    rel = err / den if den > 0 else err
    assert rel <= tol, f"{what}: relative error {rel:.3e} > {tol:.1e}"


def assert_all_rel(xs, refs, tol, what):
    assert len(xs) == len(refs)
    for i, (x, r) in enumerate(zip(xs, refs)):
        assert_rel(x, r, tol, f"{what}[{i}] {tuple(x.shape)} {x.dtype}")


# --- backends -----------------------------------------------------------------------------------
def _triton_missing(fn: str, device: str = "cpu") -> str | None:
    reason = why_unavailable("triton", torch.device(device))
    if reason:
        return reason
    try:
        mod = importlib.import_module("ewc_fast.kernels.consolidation")
    except Exception as exc:  # noqa: BLE001 - any import failure means "not there yet"
        return f"ewc_fast.kernels.consolidation does not import ({type(exc).__name__}: {exc})"
    if not callable(getattr(mod, fn, None)):
        return f"ewc_fast.kernels.consolidation does not define {fn}() yet"
    return None


@pytest.fixture(params=BACKEND_CASES)
def case(request):
    """(backend, device) of a test case."""
    return request.param


@pytest.fixture
def device(case):
    """Device the case's tensors live on."""
    return case[1]


@pytest.fixture
def backend(case):
    """Backend name; cpp-1t / cpp-2t run the C++ kernels with 1 / 2 torch (= OpenMP) threads. Triton
    kernels that are missing are skipped per op by :func:`need`."""
    with backend_for(case, skip_unavailable=False) as name:
        yield name


def need(backend: str, device: str, fn: str) -> None:
    """Skip a triton case whose kernel is not there (yet) or cannot run on ``device`` in this process."""
    if backend == "triton":
        reason = _triton_missing(fn, device)
        if reason:
            pytest.skip(reason)


# --- inputs -------------------------------------------------------------------------------------
# (shape, layout): "c" contiguous, "t" a transposed view, "s" a stride-2 slice. Sizes are awkward on
# purpose (1, 7, non-multiples of any block); 20011 spans three C++ chunks of 8192 (not on the slow Triton
# interpreter).
SPECS = [((1,), "c"), ((7,), "c"), ((1000,), "c"), ((4097,), "c"), ((33, 65), "c"), ((33, 65), "t"), ((500,), "s")]
BIG = [((20011,), "c")]
# on the card also: many full BLOCK chunks plus a ragged tail (every CUDA_CONFIG BLOCK is a power of two
# <= 8192), a large transposed view and a large stride-2 slice (a separate, unaligned-path launch)
CUDA_BIG = [(((1 << 18) + 3,), "c"), ((129, 515), "t"), ((70001,), "s")]


def specs_for(backend, device="cpu"):
    if device != "cpu":
        return SPECS + BIG + CUDA_BIG
    return SPECS if backend == "triton" else SPECS + BIG


class Maker:
    """Random tensors with a given layout (the view is taken after the dtype cast, so it stays one)."""

    def __init__(self, seed: int, device="cpu"):
        self.g = torch.Generator().manual_seed(seed)
        self.device = torch.device(device)

    def __call__(self, spec, dtype, kind="normal", zero_frac=0.0, scale=1.0):
        shape, layout = spec
        base_shape = {"c": shape, "t": shape[::-1], "s": (shape[0] * 2,) + tuple(shape[1:])}[layout]
        if kind == "normal":
            x = torch.randn(base_shape, generator=self.g) * scale
        else:  # "pos": importances in [0, scale)
            x = torch.rand(base_shape, generator=self.g) * scale
        if zero_frac:
            x = torch.where(torch.rand(base_shape, generator=self.g) < zero_frac, torch.zeros_like(x), x)
        x = x.to(device=self.device, dtype=dtype)  # drawn on the CPU: the same values on every device
        view = {"c": x, "t": x.t() if x.dim() == 2 else x, "s": x[::2]}[layout]
        assert layout == "c" or not view.is_contiguous()
        return view

    def zero_mask(self, spec, frac):
        return self(spec, F32, kind="pos") < frac


def clones(ts):
    return [t.clone() for t in ts]


def assert_unchanged(after, before, what):
    for i, (a, b) in enumerate(zip(after, before)):
        assert torch.equal(a, b), f"{what}[{i}] was modified"


DTYPE_COMBOS = [(p, s) for p in PARAM_DTYPES for s in STATE_DTYPES]
combo_ids = [f"p{str(p)[6:]}-s{str(s)[6:]}" for p, s in DTYPE_COMBOS]


# ================================================================================= penalty_apply_
@pytest.mark.parametrize("pd,sd", DTYPE_COMBOS, ids=combo_ids)
@pytest.mark.parametrize("alpha", [None, 0.3], ids=["plain", "stabilised"])
def test_penalty_apply(backend, device, pd, sd, alpha):
    need(backend, device, "penalty_apply")
    mk = Maker(1, device)
    specs = specs_for(backend, device)
    grads = [mk(s, pd) for s in specs]
    params = [mk(s, pd) for s in specs]
    omega = [mk(s, sd, "pos", zero_frac=0.1, scale=2.0) for s in specs]  # includes Omega = 0
    mu = [mk(s, sd) for s in specs]
    lam, c, gs = 0.7, 1.25, 0.5
    ref_g, ref_v = reference.penalty_apply(grads, params, omega, mu, lam, alpha=alpha, c=c, grad_scale=gs)
    keep = clones(params), clones(omega), clones(mu)

    value = ops.penalty_apply_(grads, params, omega, mu, lam, alpha=alpha, c=c, grad_scale=gs, backend=backend)

    assert value.dtype == F64 and value.dim() == 0
    assert_rel(value, ref_v, TOL_SUM, "value")
    assert_all_rel(grads, ref_g, TOL_STORED[pd], "grads")
    assert_unchanged(params, keep[0], "params")
    assert_unchanged(omega, keep[1], "omega")
    assert_unchanged(mu, keep[2], "mu")


# =================================================================================== consolidate_
@pytest.mark.parametrize("pd,sd", DTYPE_COMBOS, ids=combo_ids)
@pytest.mark.parametrize(
    "gamma,online", [(1.0, False), (0.7, False), (0.7, True)], ids=["separate", "separate-gamma0.7", "online-gamma0.7"]
)
def test_consolidate(backend, device, pd, sd, gamma, online):
    need(backend, device, "consolidate")
    mk = Maker(2, device)
    specs = specs_for(backend, device)
    omega, mu, fisher, anchor = [], [], [], []
    for s in specs:
        both_zero = mk.zero_mask(s, 0.1)  # Omega = F = 0 there: mu' must be the anchor, finite
        o = mk(s, sd, "pos", zero_frac=0.1, scale=5.0)
        f = mk(s, pd, "pos", zero_frac=0.1, scale=5.0)
        o.masked_fill_(both_zero, 0.0)  # in place: keeps the view's layout
        f.masked_fill_(both_zero, 0.0)
        omega.append(o)
        fisher.append(f)
        mu.append(mk(s, sd))
        anchor.append(mk(s, pd))
    ref_o, ref_m, ref_inc = reference.consolidate(omega, mu, fisher, anchor, gamma, online=online)
    keep = clones(fisher), clones(anchor)

    inc = ops.consolidate_(omega, mu, fisher, anchor, gamma, online=online, backend=backend)

    tol = TOL_FP64 if sd == F64 else TOL_FP32  # fp64 arithmetic, one rounding to the state dtype
    assert inc.dtype == F64 and inc.dim() == 0
    if online:
        assert float(inc) == 0.0
    else:
        assert_rel(inc, ref_inc, TOL_INC, "increment")
    assert_all_rel(omega, ref_o, tol, "omega")
    assert_all_rel(mu, ref_m, tol, "mu")
    for m, a, o in zip(mu, anchor, omega):  # Omega' == 0 -> mu' is the anchor itself
        z = o == 0
        assert torch.equal(m[z], a[z].to(sd))
    assert_unchanged(fisher, keep[0], "fisher")
    assert_unchanged(anchor, keep[1], "anchor")


def test_consolidate_signed_omega(backend, device):
    """Signed importances (unclipped SI): mu' = anchor only where Omega' == 0 exactly (the contract);
    a negative Omega' merges with the ordinary formula."""
    need(backend, device, "consolidate")
    omega = [torch.tensor([2.0, -1.0, 3.0, 0.0, -2.0], dtype=F64, device=device)]
    mu = [torch.tensor([1.0, 2.0, -1.0, 5.0, 0.5], dtype=F64, device=device)]
    fisher = [torch.tensor([-3.0, -0.5, -3.0, 0.0, 1.0], dtype=F32, device=device)]
    anchor = [torch.tensor([0.5, 1.0, 2.0, -1.0, 4.0], dtype=F32, device=device)]
    ref_o, ref_m, ref_inc = reference.consolidate(omega, mu, fisher, anchor, 1.0)
    inc = ops.consolidate_(omega, mu, fisher, anchor, 1.0, backend=backend)
    assert_all_rel(omega, ref_o, TOL_FP64, "omega")
    assert_all_rel(mu, ref_m, TOL_FP64, "mu")
    assert_rel(inc, ref_inc, TOL_INC, "increment")


# ================================================================================= si_accumulate_
@pytest.mark.parametrize("pd,sd", DTYPE_COMBOS, ids=combo_ids)
def test_si_accumulate(backend, device, pd, sd):
    need(backend, device, "si_accumulate")
    mk = Maker(3, device)
    specs = specs_for(backend, device)
    w = [mk(s, sd) for s in specs]
    grads = [mk(s, pd) for s in specs]
    params = [mk(s, pd) for s in specs]
    prev = [mk(s, pd) for s in specs]
    ref_w, ref_prev = reference.si_accumulate(w, grads, params, prev)
    keep = clones(grads), clones(params)

    ops.si_accumulate_(w, grads, params, prev, backend=backend)

    assert_all_rel(w, ref_w, TOL_FP32, "omega_path")
    for q, p in zip(prev, params):  # a copy: exact
        assert torch.equal(q, p)
    assert_all_rel(prev, ref_prev, 0.0, "prev_params")
    assert_unchanged(grads, keep[0], "grads")
    assert_unchanged(params, keep[1], "params")


# ================================================================================ si_consolidate_
@pytest.mark.parametrize("pd,sd", DTYPE_COMBOS, ids=combo_ids)
@pytest.mark.parametrize("clip", [True, False], ids=["clip", "noclip"])
def test_si_consolidate(backend, device, pd, sd, clip):
    need(backend, device, "si_consolidate")
    mk = Maker(4, device)
    specs = specs_for(backend, device)
    w = [mk(s, sd) for s in specs]  # signed: clipping matters
    params = [mk(s, pd) for s in specs]
    start = [mk(s, pd) for s in specs]
    out = [mk(s, sd, scale=0.3) for s in specs]
    xi = 0.1
    ref_w, ref_start, ref_out = reference.si_consolidate(w, params, start, out, xi, clip=clip)
    keep = clones(params)

    ops.si_consolidate_(w, params, start, out, xi, clip=clip, backend=backend)

    assert_all_rel(out, ref_out, TOL_FP32, "out")
    if clip:
        assert all(bool((o >= 0).all()) for o in out)
    for x in w:
        assert torch.equal(x, torch.zeros_like(x))
    for s, p in zip(start, params):
        assert torch.equal(s, p)
    assert_all_rel(start, ref_start, 0.0, "start_params")
    assert_all_rel(w, ref_w, 0.0, "omega_path")
    assert_unchanged(params, keep, "params")


# ================================================================================= wva_attenuate_
@pytest.mark.parametrize("pd,sd", DTYPE_COMBOS, ids=combo_ids)
def test_wva_attenuate(backend, device, pd, sd):
    need(backend, device, "wva_attenuate")
    mk = Maker(5, device)
    specs = specs_for(backend, device)
    params = [mk(s, pd) for s in specs]
    old = [mk(s, pd) for s in specs]
    accum = [mk(s, sd, "pos", zero_frac=0.1, scale=3.0) for s in specs]
    lam = 0.8
    ref_p = reference.wva_attenuate(params, old, accum, lam)
    keep = clones(old), clones(accum)

    ops.wva_attenuate_(params, old, accum, lam, backend=backend)

    assert_all_rel(params, ref_p, TOL_STORED[pd], "params")
    assert_unchanged(old, keep[0], "old_params")
    assert_unchanged(accum, keep[1], "accum")


# ============================================================ fp64 parameters: fp64 arithmetic
# The four elementwise ops compute in fp64 for fp64 parameters (consolidate_ always does). Against
# the fp64 oracle this leaves a few fp64 roundings per element (TOL_FP64); the penalty value is
# then an fp64 sum of <= 20011 positive terms (per-chunk partials, fp64 across chunks), whose
# relative error is bounded by terms * 2^-53 ~ 2e-12 and is far smaller for the lane / tree /
# cascade orders the backends use; 1e-12 still fails for any term or partial sum taken in fp32.
TOL_SUM64 = 1e-12


@pytest.mark.parametrize("sd", STATE_DTYPES, ids=["s32", "s64"])
@pytest.mark.parametrize("alpha", [None, 0.3], ids=["plain", "stabilised"])
def test_penalty_apply_fp64_params(backend, device, sd, alpha):
    """fp64 params: gradient and value in fp64, and theta - mu formed in fp64 even for an fp32 mu
    (the params are never rounded to fp32)."""
    need(backend, device, "penalty_apply")
    mk = Maker(11, device)
    specs = specs_for(backend, device)
    grads = [mk(s, F64) for s in specs]
    params = [mk(s, F64) for s in specs]
    omega = [mk(s, sd, "pos", zero_frac=0.1, scale=2.0) for s in specs]
    mu = [mk(s, sd) for s in specs]
    ref_g, ref_v = reference.penalty_apply(grads, params, omega, mu, 0.7, alpha=alpha, c=1.25, grad_scale=0.5)
    value = ops.penalty_apply_(grads, params, omega, mu, 0.7, alpha=alpha, c=1.25, grad_scale=0.5, backend=backend)
    assert_rel(value, ref_v, TOL_SUM64, "value")
    assert_all_rel(grads, ref_g, TOL_FP64, "grads")


def test_si_ops_fp64_params(backend, device):
    """fp64 params (and fp64 state): the SI path integral and its consolidation in fp64. A step far
    below fp32 resolution (1e-9 on weights of order 1) must still be seen."""
    need(backend, device, "si_accumulate")
    need(backend, device, "si_consolidate")
    mk = Maker(12, device)
    specs = specs_for(backend, device)
    w = [mk(s, F64) for s in specs]
    grads = [mk(s, F64) for s in specs]
    params = [mk(s, F64) for s in specs]
    prev = [p - 1e-9 * mk(s, F64) for p, s in zip(params, specs)]
    ref_w, _ = reference.si_accumulate(w, grads, params, prev)
    ops.si_accumulate_(w, grads, params, prev, backend=backend)
    assert_all_rel(w, ref_w, TOL_FP64, "omega_path")

    start = [mk(s, F64) for s in specs]
    out = [mk(s, F64, scale=0.3) for s in specs]
    ref_w, _, ref_out = reference.si_consolidate(w, params, start, out, 0.1, clip=False)
    ops.si_consolidate_(w, params, start, out, 0.1, clip=False, backend=backend)
    assert_all_rel(out, ref_out, TOL_FP64, "out")


@pytest.mark.parametrize("sd", STATE_DTYPES, ids=["s32", "s64"])
def test_wva_attenuate_fp64_params(backend, device, sd):
    """fp64 params are attenuated in fp64: where A = 0 and theta == theta_old they stay bit for bit
    (fp32 arithmetic turned 0.1 into 0.10000000149), elsewhere they match the fp64 oracle."""
    need(backend, device, "wva_attenuate")
    mk = Maker(13, device)
    specs = specs_for(backend, device)
    params = [mk(s, F64) for s in specs]
    old = [mk(s, F64) for s in specs]
    accum = [mk(s, sd, "pos", zero_frac=0.3, scale=3.0) for s in specs]
    ref_p = reference.wva_attenuate(params, old, accum, 0.8)
    ops.wva_attenuate_(params, old, accum, 0.8, backend=backend)
    assert_all_rel(params, ref_p, TOL_FP64, "params")

    p = [torch.tensor([0.1, -1.0 / 3.0, 1e-300, 2.0**0.5], dtype=F64, device=device)]
    keep = clones(p)
    ops.wva_attenuate_(p, clones(p), [torch.zeros(4, dtype=sd, device=device)], 0.8, backend=backend)
    assert torch.equal(p[0], keep[0]), p[0].tolist()


# ====================================================================== mixed dtypes in one call
def test_mixed_dtypes_one_call(backend, device):
    """Several dtype groups (and mismatched dtypes inside one parameter) in a single call of each op,
    plus an empty tensor."""
    for fn in ("penalty_apply", "consolidate", "si_accumulate", "si_consolidate", "wva_attenuate"):
        need(backend, device, fn)
    mk = Maker(6, device)
    specs = [((7,), "c"), ((1000,), "c"), ((33, 65), "t"), ((0,), "c"), ((300,), "s")]
    pds = [BF16, F32, F16, F32, F64]
    sds = [F64, F32, F32, F64, F64]
    alt = [F32, BF16, F64, F16, F16]  # a second param-like dtype for the read-only inputs

    # penalty_apply_: omega and mu dtypes differ within a parameter
    grads = [mk(s, p) for s, p in zip(specs, pds)]
    params = [mk(s, p) for s, p in zip(specs, pds)]
    omega = [mk(s, d, "pos") for s, d in zip(specs, sds)]
    mu = [mk(s, F64 if d == F32 else F32) for s, d in zip(specs, sds)]
    ref_g, ref_v = reference.penalty_apply(grads, params, omega, mu, 1.5, grad_scale=2.0)
    v = ops.penalty_apply_(grads, params, omega, mu, 1.5, grad_scale=2.0, backend=backend)
    assert_rel(v, ref_v, TOL_SUM, "penalty value")
    for i, (g, r) in enumerate(zip(grads, ref_g)):
        assert_rel(g, r, TOL_STORED[g.dtype], f"grads[{i}]")

    # consolidate_: fisher and anchor of different dtypes
    omega = [mk(s, d, "pos") for s, d in zip(specs, sds)]
    mu = [mk(s, d) for s, d in zip(specs, sds)]
    fisher = [mk(s, p, "pos") for s, p in zip(specs, pds)]
    anchor = [mk(s, a) for s, a in zip(specs, alt)]
    ref_o, ref_m, ref_inc = reference.consolidate(omega, mu, fisher, anchor, 0.9)
    inc = ops.consolidate_(omega, mu, fisher, anchor, 0.9, backend=backend)
    assert_rel(inc, ref_inc, TOL_INC, "increment")
    assert_all_rel(omega, ref_o, TOL_FP32, "omega")
    assert_all_rel(mu, ref_m, TOL_FP32, "mu")

    # si_accumulate_: grads in another dtype than params / prev
    w = [mk(s, d) for s, d in zip(specs, sds)]
    grads = [mk(s, a) for s, a in zip(specs, alt)]
    params = [mk(s, p) for s, p in zip(specs, pds)]
    prev = [mk(s, p) for s, p in zip(specs, pds)]
    ref_w, _ = reference.si_accumulate(w, grads, params, prev)
    ops.si_accumulate_(w, grads, params, prev, backend=backend)
    assert_all_rel(w, ref_w, TOL_FP32, "omega_path")
    assert all(torch.equal(q, p) for q, p in zip(prev, params))

    # si_consolidate_: start_params in another dtype than params (start <- theta is a cast)
    w = [mk(s, d) for s, d in zip(specs, sds)]
    params = [mk(s, p) for s, p in zip(specs, pds)]
    start = [mk(s, a) for s, a in zip(specs, alt)]
    out = [mk(s, F32 if d == F64 else F64) for s, d in zip(specs, sds)]
    ref_w, _, ref_out = reference.si_consolidate(w, params, start, out, 0.5)
    ops.si_consolidate_(w, params, start, out, 0.5, backend=backend)
    assert_all_rel(out, ref_out, TOL_FP32, "out")
    assert all(torch.equal(s, p.to(s.dtype)) for s, p in zip(start, params))

    # wva_attenuate_: old_params in another dtype than params
    params = [mk(s, p) for s, p in zip(specs, pds)]
    old = [mk(s, a) for s, a in zip(specs, alt)]
    accum = [mk(s, d, "pos") for s, d in zip(specs, sds)]
    ref_p = reference.wva_attenuate(params, old, accum, 0.25)
    ops.wva_attenuate_(params, old, accum, 0.25, backend=backend)
    for i, (p, r) in enumerate(zip(params, ref_p)):
        assert_rel(p, r, TOL_STORED[p.dtype], f"params[{i}]")


# ========================================================================== the cancellation case
def _cancellation_setup(seed=7, n_tasks=10, gamma=1.0):
    """10 tasks with nearby random anchors (base + 3e-3 noise), Fisher up to 1e5 per task (Omega up
    to 1e6), some zero; returns (shapes, tasks with decay folded into F, per-task raw (F, anchor))."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(1000,), (33, 65), (7,)]
    base = [torch.randn(s, generator=g) for s in shapes]
    raw = []
    for _ in range(n_tasks):
        fisher = [torch.rand(s, generator=g) * 1e5 * (torch.rand(s, generator=g) > 0.1) for s in shapes]
        anchor = [b + 3e-3 * torch.randn(s, generator=g) for b, s in zip(base, shapes)]
        raw.append((fisher, anchor))
    # decay: after all merges task K is weighted by gamma^(n_tasks-1-K)
    tasks = [([f.double() * gamma ** (n_tasks - 1 - k) for f in F], A) for k, (F, A) in enumerate(raw)]
    return shapes, tasks, raw, g


@pytest.mark.parametrize("omega_dtype", [F32, F64], ids=["omega32", "omega64"])
@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_cancellation_merged_penalty(backend, device, gamma, omega_dtype):
    """Merged (Omega, mu, c) with mu in float64 reproduces the per-task float64 penalty to 1e-5 at
    theta within 1e-4 of mu, with fp32 params, after 10 consolidate_ calls.

    mu must be float64: stored in fp32 it would carry an error of ~2^-24 |mu| ~ 6e-8 into
    theta - mu ~ 1e-4, i.e. ~1e-3 relative in the gradient."""
    need(backend, device, "consolidate")
    need(backend, device, "penalty_apply")
    shapes, tasks, raw, g = _cancellation_setup(gamma=gamma)
    omega = [torch.zeros(s, dtype=omega_dtype, device=device) for s in shapes]
    mu = [torch.zeros(s, dtype=F64, device=device) for s in shapes]
    c = 0.0
    for fisher, anchor in raw:
        inc = ops.consolidate_(omega, mu, on_device(fisher, device), on_device(anchor, device), gamma, backend=backend)
        c = gamma * c + float(inc)
    theta = [(m + (torch.rand(m.shape, generator=g, dtype=F64).to(device) * 2 - 1) * 1e-4).float() for m in mu]
    grads = [torch.zeros(s, device=device) for s in shapes]
    lam = 3.0
    value = ops.penalty_apply_(grads, theta, omega, mu, lam, c=c, backend=backend)
    ref_v, ref_g = reference.naive_penalty_sum(theta, tasks, lam)
    assert_rel(value, ref_v, TOL_CANCEL, "penalty value")
    assert_all_rel(grads, ref_g, TOL_CANCEL, "penalty gradient")


def test_expanded_sigma_form_cancels():
    """Why (Omega, mu, c) is stored: the seed's expanded form theta^2 sum F - 2 theta sum F theta* +
    sum F theta*^2 in fp32 misses the 1e-5 tolerance on the same case (value and gradient)."""
    shapes, tasks, raw, g = _cancellation_setup()
    # the merged mu in float64, directly from the definition
    omega = [sum(f[i].double() for f, _ in tasks) for i in range(len(shapes))]
    mu = [
        sum(f[i].double() * a[i].double() for f, a in tasks) / torch.where(o > 0, o, 1.0) for i, o in enumerate(omega)
    ]
    theta = [(m + (torch.rand(m.shape, generator=g, dtype=F64) * 2 - 1) * 1e-4).float() for m in mu]
    ref_v, ref_g = reference.naive_penalty_sum(theta, tasks, 3.0)
    v, grads = reference.expanded_penalty_fp32(theta, tasks, 3.0)
    rel_v = abs(v - ref_v) / abs(ref_v)
    rel_g = float(
        torch.cat([(x.double() - r).flatten() for x, r in zip(grads, ref_g)]).norm()
        / torch.cat([r.flatten() for r in ref_g]).norm()
    )
    assert rel_v > 10 * TOL_CANCEL, rel_v
    assert rel_g > 10 * TOL_CANCEL, rel_g


# =========================================================== cpp: 1 and 2 threads bit-identical
@pytest.mark.parametrize(
    "pd,sd", [(F32, F32), (BF16, F64), (F16, F32), (F64, F64)], ids=["f32", "bf16-f64", "f16", "f64"]
)
def test_cpp_thread_count_bit_identical(pd, sd):
    reason = why_unavailable("cpp", torch.device("cpu"))
    if reason:
        pytest.skip(reason)
    mk = Maker(8)
    specs = [((50000,), "c"), ((8193,), "c"), ((7,), "c"), ((33, 65), "t")]
    inputs = {
        "penalty": [
            [mk(s, pd) for s in specs],
            [mk(s, pd) for s in specs],
            [mk(s, sd, "pos") for s in specs],
            [mk(s, sd) for s in specs],
        ],
        "consolidate": [
            [mk(s, sd, "pos") for s in specs],
            [mk(s, sd) for s in specs],
            [mk(s, pd, "pos") for s in specs],
            [mk(s, pd) for s in specs],
        ],
        "si_acc": [
            [mk(s, sd) for s in specs],
            [mk(s, pd) for s in specs],
            [mk(s, pd) for s in specs],
            [mk(s, pd) for s in specs],
        ],
        "si_cons": [
            [mk(s, sd) for s in specs],
            [mk(s, pd) for s in specs],
            [mk(s, pd) for s in specs],
            [mk(s, sd) for s in specs],
        ],
        "wva": [[mk(s, pd) for s in specs], [mk(s, pd) for s in specs], [mk(s, sd, "pos") for s in specs]],
    }

    def run(nthreads):
        old = torch.get_num_threads()
        torch.set_num_threads(nthreads)
        try:
            x = {k: [clones(t) for t in v] for k, v in inputs.items()}
            r = [
                ops.penalty_apply_(*x["penalty"], 0.9, alpha=0.2, backend="cpp"),
                ops.penalty_apply_(*x["penalty"], 0.9, backend="cpp"),
                ops.consolidate_(*x["consolidate"], 0.8, backend="cpp"),
            ]
            ops.si_accumulate_(*x["si_acc"], backend="cpp")
            ops.si_consolidate_(*x["si_cons"], 0.1, backend="cpp")
            ops.wva_attenuate_(*x["wva"], 0.5, backend="cpp")
            return r, x
        finally:
            torch.set_num_threads(old)

    r1, x1 = run(1)
    r2, x2 = run(2)
    for a, b in zip(r1, r2):
        assert a.item() == b.item()  # bitwise equal doubles
    for k in x1:
        for l1, l2 in zip(x1[k], x2[k]):
            for a, b in zip(l1, l2):
                assert torch.equal(a, b), k


_ISA_CHILD = """
import sys, torch
from ewc_fast import ops
from ewc_fast.ops._cpp_ext import ext
from tests.ops.test_consolidation_ops import Maker
F32, F64, BF16, F16 = torch.float32, torch.float64, torch.bfloat16, torch.float16
mk = Maker(11)
specs = [((8200,), "c"), ((1,), "c"), ((33, 65), "t")]
out = {}
for pd, sd in [(F32, F32), (BF16, F64), (F16, F32), (F64, F64)]:
    for alpha in (None, 0.2):
        g = [mk(s, pd) for s in specs]
        args = (g, [mk(s, pd) for s in specs], [mk(s, sd, "pos") for s in specs], [mk(s, sd) for s in specs])
        val = ops.penalty_apply_(*args, 0.9, alpha=alpha, grad_scale=0.5, backend="cpp")
        out[(str(pd), alpha)] = (val, [x.clone() for x in g])
torch.save((ext().persample_isa(), out), sys.argv[1])
"""


def test_cpp_penalty_instruction_set_variants(tmp_path):
    """penalty_apply_'s generic / AVX2 / AVX-512 builds (EWC_FAST_CPP_ISA caps the choice, made once per
    process) give bit-identical gradients and sums: same operations and lane order, no FMA contraction."""
    results = isa_variant_results(_ISA_CHILD, tmp_path)
    for chosen, out in results.items():
        for key, (val, g) in out.items():
            assert val.item() == results[0][key][0].item(), (chosen, key)  # bitwise equal doubles
            for a, b in zip(g, results[0][key][1]):
                assert torch.equal(a, b), (chosen, key)


# ================================================================================= torch.compile
def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "this torch has no torch.compile"
    try:
        import torch._dynamo as dynamo

        if not dynamo.is_dynamo_supported():
            return "torch.compile (dynamo) is not supported on this Python/platform"
    except Exception as exc:  # noqa: BLE001
        return f"torch._dynamo does not import ({type(exc).__name__}: {exc})"
    return None


def test_torch_compile_fullgraph():
    """penalty_apply_ traces without graph breaks (custom op + fake impl) and computes the same."""
    reason = _compile_unavailable()
    if reason:
        pytest.skip(reason)
    backend = "cpp" if why_unavailable("cpp", torch.device("cpu")) is None else "torch"

    def step(grads, params, omega, mu):
        return ops.penalty_apply_(grads, params, omega, mu, 0.5, alpha=0.1, c=1.0, backend=backend)

    mk = Maker(9)
    specs = [((5,), "c"), ((3, 4), "c")]
    params = [mk(s, F32) for s in specs]
    omega = [mk(s, F32, "pos") for s in specs]
    mu = [mk(s, F64) for s in specs]
    g_eager = [torch.zeros_like(p) for p in params]
    v_eager = step(g_eager, params, omega, mu)
    compiled = torch.compile(step, fullgraph=True)
    g_comp = [torch.zeros_like(p) for p in params]
    v_comp = compiled(g_comp, params, omega, mu)
    assert v_comp.dtype == F64
    assert v_comp.item() == v_eager.item()
    for a, b in zip(g_comp, g_eager):
        assert torch.equal(a, b)


# ==================================================================================== validation
def _pen_args(n=2, dtype=F32):
    return (
        [torch.zeros(4, dtype=dtype) for _ in range(n)],
        [torch.zeros(4, dtype=dtype) for _ in range(n)],
        [torch.zeros(4) for _ in range(n)],
        [torch.zeros(4) for _ in range(n)],
    )


def test_validation_errors():
    g, p, o, m = _pen_args()
    with pytest.raises(ValueError, match="length"):
        ops.penalty_apply_(g, p[:1], o, m, 1.0)
    with pytest.raises(ValueError, match="shape"):
        ops.penalty_apply_(g, [torch.zeros(4), torch.zeros(5)], o, m, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        ops.penalty_apply_(g, p, [torch.zeros(4, dtype=BF16)] * 2, m, 1.0)  # state must be fp32/fp64
    with pytest.raises(TypeError, match="dtype"):
        ops.penalty_apply_([torch.zeros(4, dtype=torch.int32)] * 2, p, o, m, 1.0)
    with pytest.raises(TypeError, match="dtype"):
        ops.penalty_apply_([torch.zeros(4, dtype=F64)] * 2, p, o, m, 1.0)  # grad dtype != param dtype
    with pytest.raises(ValueError, match="lam"):
        ops.penalty_apply_(g, p, o, m, -1.0)
    with pytest.raises(ValueError, match="lam"):
        ops.wva_attenuate_(p, p, o, -0.5)
    for gamma in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="gamma"):
            ops.consolidate_(o, m, p, p, gamma)
    for xi in (0.0, -1.0):
        with pytest.raises(ValueError, match="xi"):
            ops.si_consolidate_(o, p, p, m, xi)
    with pytest.raises(ValueError, match="length"):
        ops.si_accumulate_(o, g, p, p[:1])


def test_backend_errors():
    g, p, o, m = _pen_args()
    with pytest.raises(ValueError, match="unknown backend"):
        ops.penalty_apply_(g, p, o, m, 1.0, backend="cuda-magic")
    with pytest.raises(ValueError, match="unknown backend"):
        ops.consolidate_(o, m, p, p, 1.0, backend="nope")
    meta = [torch.empty(4, device="meta") for _ in range(2)]
    with pytest.raises(ewc_fast.BackendUnavailable, match="CPU"):
        ops.penalty_apply_(meta, meta, meta, meta, 1.0, backend="cpp")
    with pytest.raises(ewc_fast.BackendUnavailable):
        ops.wva_attenuate_(meta, meta, meta, 1.0, backend="cpp")
    with pytest.raises(ewc_fast.BackendUnavailable):
        ops.si_consolidate_(meta, meta, meta, meta, 0.1, backend="triton")


def test_empty_lists(backend, device):
    """A model without parameters (empty lists) and zero-element tensors are no-ops."""
    for fn in ("penalty_apply", "consolidate", "si_accumulate", "si_consolidate", "wva_attenuate"):
        need(backend, device, fn)
    v = ops.penalty_apply_([], [], [], [], 2.0, c=3.0, backend=backend)
    assert v.dtype == F64 and float(v) == 3.0  # (lam/2) * (0 + c)
    assert float(ops.consolidate_([], [], [], [], 0.5, backend=backend)) == 0.0
    ops.si_accumulate_([], [], [], [], backend=backend)
    ops.si_consolidate_([], [], [], [], 0.1, backend=backend)
    ops.wva_attenuate_([], [], [], 1.0, backend=backend)
    e = [torch.zeros(0, device=device)]
    assert float(ops.penalty_apply_([torch.zeros(0, device=device)], e, e, e, 2.0, backend=backend)) == 0.0
    assert float(ops.consolidate_(clones(e), clones(e), e, e, backend=backend)) == 0.0


def test_cpp_half_conversions_match_torch():
    """The C++ kernels' own bf16/fp16 conversions (round to nearest even) agree bit for bit with
    torch's casts: every fp16 pattern -> fp32, and fp32 -> bf16/fp16 on random bit patterns plus
    ties, subnormals, overflow, inf and NaN."""
    if why_unavailable("cpp", torch.device("cpu")):
        pytest.skip(why_unavailable("cpp", torch.device("cpu")))
    from ewc_fast.ops._cpp_ext import ext

    C = ext()
    every = torch.arange(65536, dtype=torch.int32)
    got = torch.tensor(C._f16_bits_to_f32(every.tolist()), dtype=F32)
    want = every.to(torch.int16).view(F16).float()
    assert torch.equal(got.isnan(), want.isnan())
    assert torch.equal(got[~got.isnan()].view(torch.int32), want[~want.isnan()].view(torch.int32))

    g = torch.Generator().manual_seed(10)
    bits = torch.randint(-(2**31), 2**31 - 1, (20000,), generator=g, dtype=torch.int64).to(torch.int32)
    special = torch.tensor(
        [
            0.0,
            -0.0,
            65504.0,
            65519.99,
            65520.0,
            65536.0,
            2.0**-24,
            2.0**-25,
            3 * 2.0**-26,
            2.0**-14,
            1.0 + 2.0**-11,
            1.0 + 3 * 2.0**-11,
            1.0 + 2.0**-8,
            1.0 + 3 * 2.0**-8,
            3.4e38,
            float("inf"),
            -float("inf"),
            float("nan"),
        ],
        dtype=F32,
    )
    x = torch.cat([bits.view(F32), special, torch.randn(20000, generator=g) * 1e-5])
    x = x[~x.isnan()].tolist() + [float("nan")]  # NaN payloads do not survive the trip through Python
    xt = torch.tensor(x, dtype=F32)
    for dt, fn in ((BF16, C._f32_to_bf16_bits), (F16, C._f32_to_f16_bits)):
        got = torch.tensor(fn(x), dtype=torch.int32).to(torch.int16).view(dt)
        want = xt.to(dt)
        assert torch.equal(got.float().isnan(), want.float().isnan()), dt
        ok = ~want.float().isnan()
        assert torch.equal(got[ok].view(torch.int16), want[ok].view(torch.int16)), dt
