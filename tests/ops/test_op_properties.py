"""Property tests (hypothesis) of the consolidation ops on every backend against the float64 oracles
of :mod:`ewc_fast.testing.consolidation`: random shapes (sizes 1..9, 0-3 dims), dtypes, layouts
(contiguous, transposed, stride-2 slices) and tensor counts; plus aliasing (a written argument sharing
memory with another argument) always refused with every tensor unchanged. On a CUDA machine the torch
and Triton backends also run every property on CUDA tensors (ids ``torch-cuda`` / ``triton-cuda``,
marked ``cuda``; skipped at once without a card).

Fast and reproducible: ``derandomize=True`` (the examples are a function of the test), few examples,
no deadline; the Triton interpreter gets fewer and smaller ones.

Tolerances are forward-error bounds: each result is a few roundings of its *terms* (not of the
result, which may cancel), so ``|x - ref| <= tol * (sum of |terms|)`` elementwise-summed in norm, with
``tol`` = a few units of the arithmetic dtype (fp32: 2^-24 each, <= 8 roundings -> 1e-6; fp64 params
use fp64 arithmetic, 1e-6 is loose there) plus half an ulp of the stored dtype (bf16 2^-8, fp16 2^-11).
"""

from __future__ import annotations

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from ewc_fast import ops  # noqa: E402
from ewc_fast.testing import consolidation as reference  # noqa: E402
from tests.helpers import assert_unchanged, available_case, backend_cases, frozen, on_device  # noqa: E402

P = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
S = (torch.float32, torch.float64)
ARITH = 1e-6
STORED = {torch.float32: 0.0, torch.float64: 0.0, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
#: (backend, device): the CPU backends, then torch and Triton on CUDA tensors (marked ``cuda``: skipped
#: at once without a card, Triton also while TRITON_INTERPRET=1). The inputs are drawn on the CPU (same
#: generator, same examples), copied to the card with their strides, and the results compared there
#: with the same oracles and bounds: every bound is a worst case over summation orders (a count of
#: roundings), so a different reduction order on the card cannot exceed it; TF32 is off (``cuda_strict``).
BACKENDS = backend_cases(cpp_threads=None)


@pytest.fixture(params=BACKENDS)
def case(request):
    """(backend, device) of a test case, skipped with the reason when the backend cannot run there."""
    return available_case(request)


def _settings(backend):
    return settings(
        max_examples=6 if backend == "triton" else 20,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    )


@st.composite
def _layouts(draw, n_max=3, size_max=9):
    """``[(shape, layout)]`` for 1..n_max tensors; layout 'c' contiguous, 't' transposed, 's' stride-2."""
    n = draw(st.integers(1, n_max))
    out = []
    for _ in range(n):
        shape = tuple(draw(st.lists(st.integers(1, size_max), min_size=0, max_size=3)))
        layouts = ["c", "s"] + (["t"] if len(shape) == 2 else [])
        out.append((shape, draw(st.sampled_from(layouts))))
    return out


def _make(spec, dtype, g, kind="normal", scale=1.0):
    shape, layout = spec
    base = {"c": shape, "t": shape[::-1], "s": (shape[0] * 2,) + shape[1:] if shape else (2,)}[layout]
    x = torch.randn(base, generator=g) * scale if kind == "normal" else torch.rand(base, generator=g) * scale
    x = x.to(dtype)
    if layout == "t":
        return x.t()
    if layout == "s":
        return x[::2] if shape else x[0]
    return x


def _check(got, ref, terms, dtype, what, extra=0.0):
    got, ref = got.detach().to("cpu", torch.float64), ref.to("cpu", torch.float64)
    assert torch.isfinite(got).all(), f"{what}: non-finite"
    err = float((got - ref).norm())
    bound = (ARITH + STORED[dtype] + extra) * float(terms.norm()) + 1e-30
    assert err <= bound, f"{what}: error {err:.3e} > bound {bound:.3e}"


def _f64(t):
    return t.detach().to("cpu", torch.float64)


def test_penalty_apply_matches_reference(case):
    backend, device = case

    @_settings(backend)
    @given(
        specs=_layouts(size_max=5 if backend == "triton" else 9),
        pdt=st.sampled_from(P),
        sdt=st.sampled_from(S),
        seed=st.integers(0, 2**16),
        stab=st.booleans(),
    )
    def prop(specs, pdt, sdt, seed, stab):
        g = torch.Generator().manual_seed(seed)
        grads = [_make(s, pdt, g) for s in specs]
        params = [_make(s, pdt, g) for s in specs]
        omega = [_make(s, sdt, g, "pos", 3.0) for s in specs]
        mu = [_make(s, torch.float64, g) for s in specs]
        lam, alpha = 1.5, (0.1 if stab else None)
        want_g, want_v = reference.penalty_apply(grads, params, omega, mu, lam, alpha=alpha, c=0.25)
        before = [_f64(x) for x in grads]
        grads, params, omega, mu = on_device((grads, params, omega, mu), device)
        v = ops.penalty_apply_(grads, params, omega, mu, lam, alpha=alpha, c=0.25, backend=backend)
        total_terms = torch.zeros(())
        for i, (x, r, b, p, o, m) in enumerate(zip(grads, want_g, before, params, omega, mu)):
            pen = lam * _f64(o) * (_f64(p) - _f64(m)).abs()
            _check(x, r, b.abs() + pen, pdt, f"grads[{i}]")
            total_terms = total_terms + (_f64(o) * (_f64(p) - _f64(m)) ** 2).sum()
        # the value: a sum of n positive fp32 terms, worst case (n - 1) roundings of the running sum
        n = sum(x.numel() for x in grads)
        _check(
            v.reshape(1),
            torch.tensor([want_v], dtype=torch.float64),
            0.5 * lam * (total_terms + 0.25).reshape(1),
            torch.float32,
            "value",
            extra=n * 2.0**-24,
        )

    prop()


def test_consolidate_matches_reference(case):
    backend, device = case

    @_settings(backend)
    @given(
        specs=_layouts(size_max=5 if backend == "triton" else 9),
        sdt=st.sampled_from(S),
        fdt=st.sampled_from(P),
        seed=st.integers(0, 2**16),
        online=st.booleans(),
        gamma=st.sampled_from([1.0, 0.5]),
    )
    def prop(specs, sdt, fdt, seed, online, gamma):
        g = torch.Generator().manual_seed(seed)
        omega = [_make(s, sdt, g, "pos", 2.0) for s in specs]
        mu = [_make(s, torch.float64, g) for s in specs]
        fisher = [_make(s, fdt, g, "pos", 2.0) for s in specs]
        anchor = [_make(s, fdt, g) for s in specs]
        want_o, want_m, want_inc = reference.consolidate(omega, mu, fisher, anchor, gamma, online=online)
        omega, mu, fisher, anchor = on_device((omega, mu, fisher, anchor), device)
        inc = ops.consolidate_(omega, mu, fisher, anchor, gamma, online=online, backend=backend)
        for i, (o, m, ro, rm) in enumerate(zip(omega, mu, want_o, want_m)):
            # fp64 arithmetic, stored once in the state dtype (fp32: 2^-24)
            _check(o, ro, ro.abs(), torch.float32 if sdt == torch.float32 else torch.float64, f"omega[{i}]")
            _check(m, rm, rm.abs() + _f64(anchor[i]).abs(), torch.float64, f"mu[{i}]")
        # the increment: fp64 sums of positive terms (bounded by the terms' own sum)
        _check(
            inc.reshape(1),
            torch.tensor([want_inc], dtype=torch.float64),
            torch.tensor([abs(want_inc)], dtype=torch.float64),
            torch.float64,
            "increment",
        )

    prop()


def test_si_ops_match_reference(case):
    backend, device = case

    @_settings(backend)
    @given(
        specs=_layouts(size_max=5 if backend == "triton" else 9),
        pdt=st.sampled_from(P),
        sdt=st.sampled_from(S),
        seed=st.integers(0, 2**16),
        clip=st.booleans(),
    )
    def prop(specs, pdt, sdt, seed, clip):
        g = torch.Generator().manual_seed(seed)
        w = [_make(s, sdt, g) for s in specs]
        grads = [_make(s, pdt, g) for s in specs]
        params = [_make(s, pdt, g) for s in specs]
        prev = [_make(s, pdt, g) for s in specs]
        want_w, want_q = reference.si_accumulate(w, grads, params, prev)
        w0 = [_f64(x) for x in w]
        w, grads, params, prev = on_device((w, grads, params, prev), device)
        ops.si_accumulate_(w, grads, params, prev, backend=backend)
        for i in range(len(specs)):
            term = w0[i].abs() + _f64(grads[i]).abs() * (_f64(params[i]).abs() + want_q[i].abs())
            _check(w[i], want_w[i], term, sdt if sdt == torch.float32 else torch.float64, f"omega_path[{i}]")
            assert torch.equal(_f64(prev[i]), want_q[i]), f"prev_params[{i}] must be the params exactly"
        start = [_make(s, pdt, g) for s in specs]
        out = [_make(s, sdt, g) for s in specs]
        cpu = [[x.detach().cpu() for x in xs] for xs in (w, params)]  # the oracle on CPU copies
        want_w, want_s, want_o = reference.si_consolidate(*cpu, start, out, 0.1, clip=clip)
        o0 = [_f64(x) for x in out]
        start, out = on_device((start, out), device)
        ops.si_consolidate_(w, params, start, out, 0.1, clip=clip, backend=backend)
        for i in range(len(specs)):
            term = o0[i].abs() + _f64(want_w[i]).abs() + (want_o[i] - o0[i]).abs()
            _check(out[i], want_o[i], term, sdt if sdt == torch.float32 else torch.float64, f"out[{i}]")
            assert torch.equal(_f64(w[i]), want_w[i]) and torch.equal(_f64(start[i]), want_s[i])

    prop()


def test_wva_attenuate_matches_reference(case):
    backend, device = case

    @_settings(backend)
    @given(
        specs=_layouts(size_max=5 if backend == "triton" else 9),
        pdt=st.sampled_from(P),
        rdt=st.sampled_from(P),
        sdt=st.sampled_from(S),
        seed=st.integers(0, 2**16),
    )
    def prop(specs, pdt, rdt, sdt, seed):
        g = torch.Generator().manual_seed(seed)
        params = [_make(s, pdt, g) for s in specs]
        old = [_make(s, rdt, g) for s in specs]
        acc = [_make(s, sdt, g, "pos", 4.0) for s in specs]
        want = reference.wva_attenuate(params, old, acc, 0.7)
        terms = [_f64(q).abs() + (_f64(p) - _f64(q)).abs() for p, q in zip(params, old)]
        params, old, acc = on_device((params, old, acc), device)
        ops.wva_attenuate_(params, old, acc, 0.7, backend=backend)
        for i in range(len(specs)):
            _check(params[i], want[i], terms[i], pdt, f"params[{i}]")

    prop()


# --------------------------------------------------------------------------------------- aliasing
_ALIAS_CASES = {
    # op: (written lists, read lists); every list holds tensors of one dtype here so any pair can alias
    "penalty_apply_": (("grads",), ("params",)),
    "consolidate_": (("omega", "mu"), ("fisher", "anchor")),
    "si_accumulate_": (("omega_path", "prev_params"), ("grads", "params")),
    "si_consolidate_": (("omega_path", "start_params", "out"), ("params",)),
    "wva_attenuate_": (("params",), ("old_params",)),
}


def _call(op, args, backend):
    f = getattr(ops, op)
    if op == "penalty_apply_":
        return f(args["grads"], args["params"], args["omega"], args["mu"], 1.0, backend=backend)
    if op == "consolidate_":
        return f(args["omega"], args["mu"], args["fisher"], args["anchor"], backend=backend)
    if op == "si_accumulate_":
        return f(args["omega_path"], args["grads"], args["params"], args["prev_params"], backend=backend)
    if op == "si_consolidate_":
        return f(args["omega_path"], args["params"], args["start_params"], args["out"], 0.1, backend=backend)
    return f(args["params"], args["old_params"], args["accum"], 1.0, backend=backend)


@pytest.mark.parametrize("op", sorted(_ALIAS_CASES))
def test_aliasing_a_written_argument_is_refused_with_everything_unchanged(op, case):
    backend, device = case
    written, read = _ALIAS_CASES[op]
    names = list(written) + list(read)

    @_settings(backend)
    @given(data=st.data(), n=st.integers(1, 3), size=st.integers(1, 7), seed=st.integers(0, 2**16))
    def prop(data, n, size, seed):
        g = torch.Generator().manual_seed(seed)
        f64 = torch.float64  # one dtype everywhere (fp64 is allowed in every list), so any pair can alias
        args = {k: [torch.rand(size, generator=g, dtype=f64) for _ in range(n)] for k in names}
        args.update({k: [torch.rand(size, generator=g, dtype=f64) for _ in range(n)] for k in ("omega", "mu", "accum")})
        args = on_device(args, device)  # before the aliasing below (a copy would undo it)
        w = data.draw(st.sampled_from(written))
        wi = data.draw(st.integers(0, n - 1))
        other = data.draw(st.sampled_from(names))
        oi = data.draw(st.integers(0, n - 1).filter(lambda j: other != w or j != wi))
        overlap = data.draw(st.sampled_from(["same", "view"]))
        if overlap == "same":
            args[other][oi] = args[w][wi]
        else:  # overlapping views of one buffer
            buf = torch.rand(2 * size, generator=g, dtype=f64).to(device)
            args[w][wi], args[other][oi] = buf[:size], buf[size - 1 : 2 * size - 1]
        if other == w and oi == wi:
            return
        before = frozen(args)
        with pytest.raises(ValueError, match="share memory"):
            _call(op, args, backend)
        assert_unchanged(before, args)

    prop()


# ------------------------------------------------------------------------- per-sample statistics ops
def _persample_check(sq, ab, G, A, ref, n_products, what):
    """Forward-error bound: each per-sample entry is a sum of ``n_products`` fp32 products (exact
    products of fp32-exact inputs, ``n_products`` roundings of the running sum), then squared / summed:
    ``|err| <= (n_products + 4) * 2^-23 * terms``, the terms being the same statistics of |G|, |A|."""
    want_sq, want_ab = ref(G, A)
    terms_sq, terms_ab = ref(G.abs(), A.abs())
    extra = (n_products + 4) * 2.0**-23
    _check(sq, want_sq, terms_sq, torch.float64, f"{what} sq_out", extra=extra)
    _check(ab, want_ab, terms_ab, torch.float64, f"{what} abs_out", extra=extra)


def test_persample_sq_matches_reference(case):
    backend, device = case

    def ref(G, A):
        P = torch.einsum("nto,nti->noi", G.double(), A.double())
        return (P * P).sum(0), P.abs().sum(0)

    @_settings(backend)
    @given(
        dims=st.tuples(*[st.integers(1, 5 if backend == "triton" else 9)] * 4),
        dtype=st.sampled_from(P),
        odt=st.sampled_from(S),
        transposed=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def prop(dims, dtype, odt, transposed, seed):
        N, T, O, In = dims
        g = torch.Generator().manual_seed(seed)
        G = torch.randn(N, T, O, generator=g).to(dtype)
        A = torch.randn(N, In, T, generator=g).to(dtype).transpose(1, 2) if transposed else None
        A = A if A is not None else torch.randn(N, T, In, generator=g).to(dtype)
        sq = torch.zeros(O, In, dtype=odt)
        ab = torch.zeros(In, O, dtype=odt).t() if transposed else torch.zeros(O, In, dtype=odt)
        sq, ab, Gd, Ad = on_device((sq, ab, G, A), device)
        ops.persample_sq_(sq, ab, Gd, Ad, backend=backend)
        _persample_check(sq, ab, G, A, ref, T, "persample_sq_")

    prop()


def test_persample_conv_sq_matches_reference(case):
    backend, device = case
    from ewc_fast.testing.conv import reference_persample_conv_sq

    @_settings(backend)
    @given(
        d=st.sampled_from([1, 2]),
        n=st.integers(1, 3),
        c=st.integers(1, 3),
        o=st.integers(1, 3),
        k=st.integers(1, 3),
        size=st.integers(3, 6),
        stride=st.integers(1, 2),
        dtype=st.sampled_from(P),
        seed=st.integers(0, 2**16),
    )
    def prop(d, n, c, o, k, size, stride, dtype, seed):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(n, c, *[size] * d, generator=g).to(dtype)
        L = (size - k) // stride + 1
        G = torch.randn(n, o, *[L] * d, generator=g).to(dtype)
        kernel = (k,) * d

        def ref(G_, X_):
            return reference_persample_conv_sq(
                G_, X_, kernel, stride=(stride,) * d, padding=(0,) * d, dilation=(1,) * d
            )

        sq = torch.zeros(o, c, *kernel, dtype=torch.float64)
        ab = torch.zeros(o, c, *kernel, dtype=torch.float32)
        sq, ab, Gd, Xd = on_device((sq, ab, G, X), device)
        ops.persample_conv_sq_(sq, ab, Gd, Xd, stride=stride, backend=backend)
        _persample_check(sq, ab, G, X, ref, L**d, "persample_conv_sq_")

    prop()
