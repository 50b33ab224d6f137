// Fused optimizer step: per element, one read of theta, g, the optimizer state, Omega, mu, SI's
// omega and WVA's A, and one write of theta, the state and SI's omega.
//
// Loop structure (step_chunk): one pass; each chunk is walked in groups of 16 elements, each group one
// vectorised loop over every stream (penalty, optimizer update, WVA, SI) after a software prefetch of
// every stream a few KiB ahead. Nothing is re-read: main-memory traffic is one read of each input
// and one write of each output.
//
// Numerics follow ewc_fast/ops/fused_step/_torch.py operation by operation (torch.optim's
// single-tensor formulas: lerp for the first moment, mul + addcmul for the second, addcdiv for the
// step); the arithmetic type A is double for fp64 parameters, else float, and so is the optimizer
// state. Read-only Omega and A arrive in A, mu in double (the Python side converts them when they are
// stored otherwise: exact, and what the torch twin's arithmetic sees). Work is cut into fixed chunks
// (boundaries independent of the thread count); the penalty sum is formed per chunk (16 lanes, folded
// pairwise) and added in fp64 in chunk order, so results do not depend on the thread count.
// Same code-generation settings as consolidation.cpp (no FMA contraction, no trapping math), plus
// no-math-errno: std::sqrt may then be a vector square root instead of a libm call that sets errno
// for negative inputs (nothing reads errno; the value is the same correctly rounded square root).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off", "no-math-errno")
#endif
#include <cmath>

#include "fused_step.h"
#include "isa.h"

namespace ewcf {
namespace {

using Ptrs = std::vector<uintptr_t>;
using Numels = std::vector<int64_t>;

template <class P> using arith_t = std::conditional_t<std::is_same_v<P, double>, double, float>;

constexpr int64_t kChunk = 8192;

struct Chunk {
    int32_t tensor;
    int64_t begin;
    int64_t len;
};

std::vector<Chunk> plan(const Numels& numels) {
    std::vector<Chunk> out;
    for (size_t t = 0; t < numels.size(); ++t)
        for (int64_t b = 0; b < numels[t]; b += kChunk)
            out.push_back(Chunk{int32_t(t), b, std::min(kChunk, numels[t] - b)});
    return out;
}

template <class T> T* at(const Ptrs& l, size_t t, int64_t begin) {
    return l.empty() ? nullptr : reinterpret_cast<T*>(l[t]) + begin;
}

// Scalars of one call, in the arithmetic type A (fp32 scalars in fp32 arithmetic, as torch's fp32
// kernels see Python scalars). The run-time choices that only select between values are A-typed
// flags (1 or 0) compared with 0 inside the element loop: GCC 12 vectorises such a select, while a
// select on a loaded bool leaves the whole fused loop scalar ("relevant stmt not supported").
template <class A> struct Hyper {
    A lr, beta1, beta2, eps, wd, damp1, step_size, bc2_sqrt, decay, lerp_w, lerp_w1, addcmul_w;
    A pen, al, wva_lam, inv_scale;
    A f_l2, f_decay, f_mom_init, f_nesterov, f_stab, f_si_total;  // flags: 1 or 0
};

// SIK: 0 no SI, 1 fp32 SI omega, 2 fp64 SI omega.
template <int SIK> using si_t = std::conditional_t<SIK == 2, double, float>;

template <class A, int L> inline A fold(A (&acc)[L]) {
    for (int w = L / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
}

// Template flags: everything that decides which memory is touched (ADAM, EWC, SIK, ST2 = amsgrad for
// Adam / momentum for SGD, WVA), so that the element loop has no conditional load or store and
// vectorises; value-only choices (stabilised W, weight decay, nesterov, ...) are selects on the
// A-typed flags of Hyper. One element, every step of the module comment; `pen_out` receives W*d^2.
template <class P, bool ADAM, bool EWC, int SIK, bool ST2, bool WVA>
inline void step_elem(P* __restrict__ p, const P* __restrict__ gr, arith_t<P>* __restrict__ m,
                      arith_t<P>* __restrict__ v, arith_t<P>* __restrict__ vmax, const arith_t<P>* __restrict__ om,
                      const double* __restrict__ mu, si_t<SIK>* __restrict__ si, const arith_t<P>* __restrict__ acc,
                      int64_t i, const Hyper<arith_t<P>>& h, arith_t<P>& pen_out) {
    using A = arith_t<P>;
    const A th = load_as<A>(p[i]);
    const A g = load_as<A>(gr[i]) * h.inv_scale;
    A gt = g;
    if constexpr (EWC) {  // g + pen*W*d with d = A(theta - mu), the difference in fp64
        const A d = A(to_f64<P>(p[i]) - mu[i]);
        A w = om[i];
        const A ws = w / (A(1) + h.al * w);
        w = h.f_stab > A(0) ? ws : w;
        const A wd = w * d;
        pen_out = wd * d;
        gt = g + h.pen * wd;
    }
    A gg = gt;
    A nw;
    if constexpr (!ADAM) {
        gg = h.f_l2 > A(0) ? gg + h.wd * th : gg;
        if constexpr (ST2) {
            const A upd = m[i] * h.beta1 + h.damp1 * gg;
            const A buf = h.f_mom_init > A(0) ? gg : upd;
            m[i] = buf;
            gg = h.f_nesterov > A(0) ? gg + h.beta1 * buf : buf;
        }
        nw = th + (-h.lr) * gg;
    } else {
        const A base = h.f_decay > A(0) ? th * h.decay : th;  // AdamW's decoupled decay
        gg = h.f_l2 > A(0) ? gg + h.wd * th : gg;             // Adam's L2 term
        const A mo = m[i];
        const A diff = gg - mo;
        const A mn = h.lerp_w < A(0.5) ? mo + h.lerp_w * diff : gg - diff * h.lerp_w1;
        m[i] = mn;
        const A vn = v[i] * h.beta2 + h.addcmul_w * gg * gg;
        v[i] = vn;
        A vx = vn;
        if constexpr (ST2) {
            const A vo = vmax[i];
            vx = vo > vn ? vo : vn;
            vx = (vo != vo || vn != vn) ? vo + vn : vx;  // torch.maximum propagates NaN
            vmax[i] = vx;
        }
        const A denom = std::sqrt(vx) / h.bc2_sqrt + h.eps;
        nw = base + (-h.step_size) * mn / denom;
    }
    P stored = store_from<P>(nw);
    if constexpr (WVA) {
        const A nc = load_as<A>(stored);
        stored = store_from<P>(th + (nc - th) / (A(1) + h.wva_lam * acc[i]));
    }
    if constexpr (SIK != 0) {
        using S = si_t<SIK>;
        // subtract in promote(S, A), rounded once to S (torch's in-place type promotion)
        using Q = std::conditional_t<std::is_same_v<S, double> || std::is_same_v<A, double>, double, float>;
        const A gsi = h.f_si_total > A(0) ? gt : g;
        const A prod = gsi * (load_as<A>(stored) - th);
        si[i] = S(Q(si[i]) - Q(prod));
    }
    p[i] = stored;
}

// One chunk in a single pass: groups of L = 16 elements, each one vectorised loop over every stream,
// preceded by a software prefetch of every stream kAhead elements further on (one per cache line:
// with 7 to 11 streams the hardware prefetcher alone leaves the core short of lines in flight). The
// penalty terms W*d^2 of a group go to 16 lane accumulators (element b + l to lane l), folded
// pairwise at the end; the ragged tail (< 16 elements, a tensor's last chunk only) is added in order
// to `tail`. Expanded inside non-inlined per-ISA entry points so that the restrict qualifiers of its
// pointer arguments hold (every operand is a distinct buffer: the op layer refuses overlapping
// in-place operands). A prefetch past the end of a buffer is harmless (a hint; it never faults).
constexpr int64_t kAhead = 512;  // elements: 2 KiB ahead per fp32 stream

// On x86 the prefetch is an asm statement: GCC's vectoriser would otherwise vectorise the group loop
// itself and drop __builtin_prefetch calls from it (it keeps no prefetch in a vectorised loop).
inline void prefetch_line(const char* a) {
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    asm volatile("prefetcht0 %0" : : "m"(*a));
#else
    __builtin_prefetch(a, 0, 3);
#endif
}

template <class T> inline void prefetch_group(const T* q) {
    constexpr int kBytes = int(16 * sizeof(T));
    for (int off = 0; off < kBytes; off += 64) prefetch_line(reinterpret_cast<const char*>(q + kAhead) + off);
}

#define EWCF_CHUNK_PARAMS                                                                                      \
    P *__restrict__ pp, const P *__restrict__ gp, arith_t<P> *__restrict__ mp, arith_t<P> *__restrict__ vp,    \
        arith_t<P> *__restrict__ vmp, const arith_t<P> *__restrict__ op, const double *__restrict__ mup,       \
        si_t<SIK> *__restrict__ sp, const arith_t<P> *__restrict__ ap, int64_t n, const Hyper<arith_t<P>> &hr
#define EWCF_CHUNK_ARGS pp, gp, mp, vp, vmp, op, mup, sp, ap, n, hr

template <class P, bool ADAM, bool EWC, int SIK, bool ST2, bool WVA>
inline arith_t<P> step_chunk(EWCF_CHUNK_PARAMS) {
    using A = arith_t<P>;
    const Hyper<A> h = hr;  // a local copy: no aliasing with the buffers
    constexpr int L = 16;
    A lanes[L] = {};
    A tail = A(0);
    const int64_t nb = n - n % L;
    for (int64_t b = 0; b < nb; b += L) {
        prefetch_group(pp + b);
        prefetch_group(gp + b);
        if (mp) prefetch_group(mp + b);
        if (vp) prefetch_group(vp + b);
        if (vmp) prefetch_group(vmp + b);
        if constexpr (EWC) {
            prefetch_group(op + b);
            prefetch_group(mup + b);
        }
        if constexpr (SIK != 0) prefetch_group(sp + b);
        if constexpr (WVA) prefetch_group(ap + b);
        A pen[L];
#pragma omp simd
        for (int l = 0; l < L; ++l)
            step_elem<P, ADAM, EWC, SIK, ST2, WVA>(pp + b, gp + b, mp ? mp + b : nullptr, vp ? vp + b : nullptr,
                                                   vmp ? vmp + b : nullptr, EWC ? op + b : nullptr,
                                                   EWC ? mup + b : nullptr, SIK ? sp + b : nullptr,
                                                   WVA ? ap + b : nullptr, l, h, pen[l]);
        if constexpr (EWC)
            for (int l = 0; l < L; ++l) lanes[l] += pen[l];
    }
    for (int64_t i = nb; i < n; ++i) {
        A pen = A(0);
        step_elem<P, ADAM, EWC, SIK, ST2, WVA>(pp, gp, mp, vp, vmp, op, mup, sp, ap, i, h, pen);
        if constexpr (EWC) tail += pen;
    }
    return fold(lanes) + tail;
}

// One entry point per instruction set (csrc/isa.h), chosen once per process. The arithmetic is the
// same in each: fp-contract=off (above) keeps FMA out, and the penalty sum's lane order is explicit, so
// the variants agree bit for bit (tests/ops/test_fused_step_op.py::test_cpp_instruction_set_variants).
template <class P, bool ADAM, bool EWC, int SIK, bool ST2, bool WVA>
using chunk_fn = arith_t<P> (*)(EWCF_CHUNK_PARAMS);

template <class P, bool ADAM, bool EWC, int SIK, bool ST2, bool WVA>
__attribute__((flatten, noinline)) arith_t<P> step_chunk_generic(EWCF_CHUNK_PARAMS) {
    return step_chunk<P, ADAM, EWC, SIK, ST2, WVA>(EWCF_CHUNK_ARGS);
}
#ifdef EWCF_X86_MULTI
template <class P, bool ADAM, bool EWC, int SIK, bool ST2, bool WVA>
EWCF_TARGET_AVX2 arith_t<P> step_chunk_avx2(EWCF_CHUNK_PARAMS) {
    return step_chunk<P, ADAM, EWC, SIK, ST2, WVA>(EWCF_CHUNK_ARGS);
}
template <class P, bool ADAM, bool EWC, int SIK, bool ST2, bool WVA>
EWCF_TARGET_AVX512 arith_t<P> step_chunk_avx512(EWCF_CHUNK_PARAMS) {
    return step_chunk<P, ADAM, EWC, SIK, ST2, WVA>(EWCF_CHUNK_ARGS);
}
#endif
#undef EWCF_CHUNK_ARGS
#undef EWCF_CHUNK_PARAMS

template <class P, bool ADAM, bool EWC, int SIK, bool ST2, bool WVA>
chunk_fn<P, ADAM, EWC, SIK, ST2, WVA> pick_chunk() {
#ifdef EWCF_X86_MULTI
    const int isa = mk::chosen_isa();
    if (isa == 2) return &step_chunk_avx512<P, ADAM, EWC, SIK, ST2, WVA>;
    if (isa == 1) return &step_chunk_avx2<P, ADAM, EWC, SIK, ST2, WVA>;
#endif
    return &step_chunk_generic<P, ADAM, EWC, SIK, ST2, WVA>;
}

template <class P, bool ADAM, bool EWC, int SIK, bool ST2, bool WVA>
double run(const Ptrs& p, const Ptrs& g, const Ptrs& m, const Ptrs& v, const Ptrs& vm, const Ptrs& om, const Ptrs& mu,
           const Ptrs& si, const Ptrs& acc, const std::vector<Chunk>& chunks, const Hyper<arith_t<P>>& h,
           int nthreads) {
    using A = arith_t<P>;
    using S = si_t<SIK>;
    std::vector<double> part(chunks.size(), 0.0);
    const int64_t n = int64_t(chunks.size());
    if (nthreads < 1) nthreads = 1;
    const auto step_chunk_isa = pick_chunk<P, ADAM, EWC, SIK, ST2, WVA>();
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n > 1 && nthreads > 1)
#endif
    for (int64_t c = 0; c < n; ++c) {
        const Chunk& ch = chunks[size_t(c)];
        const size_t t = size_t(ch.tensor);
        part[size_t(c)] = double(step_chunk_isa(
            at<P>(p, t, ch.begin), at<const P>(g, t, ch.begin), at<A>(m, t, ch.begin), at<A>(v, t, ch.begin),
            at<A>(vm, t, ch.begin), at<const A>(om, t, ch.begin), at<const double>(mu, t, ch.begin),
            at<S>(si, t, ch.begin), at<const A>(acc, t, ch.begin), ch.len, h));
    }
    double s = 0.0;
    for (double x : part) s += x;
    return s;
}

template <class P, bool ADAM, bool EWC, int SIK>
double dispatch_state(bool st2, bool wva, const Ptrs& p, const Ptrs& g, const Ptrs& m, const Ptrs& v, const Ptrs& vm,
                      const Ptrs& om, const Ptrs& mu, const Ptrs& si, const Ptrs& acc, const std::vector<Chunk>& chunks,
                      const Hyper<arith_t<P>>& h, int nt) {
    if (st2) {
        if (wva) return run<P, ADAM, EWC, SIK, true, true>(p, g, m, v, vm, om, mu, si, acc, chunks, h, nt);
        return run<P, ADAM, EWC, SIK, true, false>(p, g, m, v, vm, om, mu, si, acc, chunks, h, nt);
    }
    if (wva) return run<P, ADAM, EWC, SIK, false, true>(p, g, m, v, vm, om, mu, si, acc, chunks, h, nt);
    return run<P, ADAM, EWC, SIK, false, false>(p, g, m, v, vm, om, mu, si, acc, chunks, h, nt);
}

template <class P>
double dispatch(bool adam, bool ewc, int sik, bool st2, bool wva, const Ptrs& p, const Ptrs& g, const Ptrs& m,
                const Ptrs& v, const Ptrs& vm, const Ptrs& om, const Ptrs& mu, const Ptrs& si, const Ptrs& acc,
                const std::vector<Chunk>& chunks, const Hyper<arith_t<P>>& h, int nt) {
#define EWCF_RUN(AD, EW, SK) return dispatch_state<P, AD, EW, SK>(st2, wva, p, g, m, v, vm, om, mu, si, acc, chunks, h, nt)
#define EWCF_SI(AD, EW) \
    if (sik == 0) EWCF_RUN(AD, EW, 0); \
    if (sik == 1) EWCF_RUN(AD, EW, 1); \
    EWCF_RUN(AD, EW, 2)
    if (adam) {
        if (ewc) { EWCF_SI(true, true); } else { EWCF_SI(true, false); }
    } else {
        if (ewc) { EWCF_SI(false, true); } else { EWCF_SI(false, false); }
    }
#undef EWCF_SI
#undef EWCF_RUN
}

template <class A> Hyper<A> make_hyper(const py::dict& d) {
    auto f = [&](const char* k) { return d[k].cast<double>(); };
    auto b = [&](const char* k) { return d[k].cast<bool>(); };
    Hyper<A> h;
    h.lr = A(f("lr"));
    h.beta1 = A(f("beta1"));
    h.beta2 = A(f("beta2"));
    h.eps = A(f("eps"));
    h.wd = A(f("weight_decay"));
    h.damp1 = A(1.0 - f("dampening"));
    h.step_size = A(f("step_size"));
    h.bc2_sqrt = A(f("bc2_sqrt"));
    h.decay = A(f("decay"));
    h.lerp_w = A(1.0 - f("beta1"));
    h.lerp_w1 = A(1) - h.lerp_w;  // torch's lerp: (1 - weight) in the tensor's type
    h.addcmul_w = A(1.0 - f("beta2"));
    h.pen = A(f("pen_scale") * f("lam"));
    h.al = A(f("al"));
    h.wva_lam = A(f("wva_lam"));
    h.inv_scale = A(f("inv_scale"));
    const bool has_wd = f("weight_decay") != 0.0;
    const int algo = d["algo"].cast<int>();
    auto flag = [](bool x) { return x ? A(1) : A(0); };
    h.f_l2 = flag(has_wd && algo != 2);   // SGD / Adam: g + wd*theta
    h.f_decay = flag(has_wd && algo == 2);  // AdamW: theta*(1 - lr*wd)
    h.f_mom_init = flag(b("momentum_init"));
    h.f_nesterov = flag(b("nesterov"));
    h.f_stab = flag(b("stab"));
    h.f_si_total = flag(b("si_total"));
    return h;
}

// params, grads: parameter dtype p_dt; m, v, vmax: state in the arithmetic type (empty when unused);
// omega (arithmetic type) and mu (fp64): empty without EWC; si: si_dt (0 fp32 / 1 fp64), empty without
// SI; acc: arithmetic type, empty without WVA. h: the scalars (see make_hyper). Returns sum W*d^2.
double fused_step(const Ptrs& p, const Ptrs& g, const Ptrs& m, const Ptrs& v, const Ptrs& vm, const Ptrs& om,
                  const Ptrs& mu, const Ptrs& si, const Ptrs& acc, const Numels& numels, int p_dt, int si_dt,
                  const py::dict& hd, int nthreads) {
    const size_t n = numels.size();
    for (const Ptrs* l : {&p, &g})
        if (l->size() != n) throw std::invalid_argument("fused_step: pointer lists and numels differ in length");
    for (const Ptrs* l : {&m, &v, &vm, &om, &mu, &si, &acc})
        if (!l->empty() && l->size() != n)
            throw std::invalid_argument("fused_step: optional pointer lists must be empty or match numels");
    const bool adam = hd["algo"].cast<int>() != 0;
    const bool ewc = !om.empty();
    const int sik = si.empty() ? 0 : (si_dt == F64 ? 2 : 1);
    const bool st2 = adam ? !vm.empty() : !m.empty();  // amsgrad / momentum
    const bool wva = !acc.empty();
    const std::vector<Chunk> chunks = plan(numels);
    double result = 0.0;
    switch (p_dt) {
        case F32: { auto h = make_hyper<float>(hd); py::gil_scoped_release nogil;
            result = dispatch<float>(adam, ewc, sik, st2, wva, p, g, m, v, vm, om, mu, si, acc, chunks, h, nthreads); break; }
        case F64: { auto h = make_hyper<double>(hd); py::gil_scoped_release nogil;
            result = dispatch<double>(adam, ewc, sik, st2, wva, p, g, m, v, vm, om, mu, si, acc, chunks, h, nthreads); break; }
        case BF16: { auto h = make_hyper<float>(hd); py::gil_scoped_release nogil;
            result = dispatch<bf16>(adam, ewc, sik, st2, wva, p, g, m, v, vm, om, mu, si, acc, chunks, h, nthreads); break; }
        case F16: { auto h = make_hyper<float>(hd); py::gil_scoped_release nogil;
            result = dispatch<f16>(adam, ewc, sik, st2, wva, p, g, m, v, vm, om, mu, si, acc, chunks, h, nthreads); break; }
        default: throw std::invalid_argument("fused_step: unknown parameter dtype code " + std::to_string(p_dt));
    }
    return result;
}

}  // namespace

void init_fused_step(py::module_& m) {
    m.def("fused_step", &fused_step, "fused optimizer step (SGD/Adam/AdamW + EWC + SI + WVA); returns sum W*d^2",
          py::arg("params"), py::arg("grads"), py::arg("exp_avg"), py::arg("exp_avg_sq"), py::arg("max_exp_avg_sq"),
          py::arg("omega"), py::arg("mu"), py::arg("si_omega"), py::arg("wva_accum"), py::arg("numels"),
          py::arg("p_dtype"), py::arg("si_dtype"), py::arg("h"), py::arg("nthreads"));
}

}  // namespace ewcf
