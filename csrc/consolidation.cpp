// Consolidation kernels (penalty_apply, consolidate, si_accumulate, si_consolidate, wva_attenuate).
//
// Contract: docs/ARCHITECTURE.md ("Op contracts"); numerics match ewc_fast/ops/consolidation/_torch.py.
// Every entry point takes, per tensor role, a list of raw data pointers of contiguous CPU buffers,
// one list of element counts (shared by the roles), one dtype code per role (the Python side groups
// tensors so that a call sees one dtype combination), scalars and a thread count. The work of all
// tensors is cut into fixed chunks (plan_chunks below) and one OpenMP loop runs over them; sums
// are formed per chunk and added in chunk order, so results do not depend on the thread count.
// Inputs are trusted (the op layer validated them); only list lengths are checked here.
// Two code-generation settings for this file (GCC; other compilers ignore them):
// * no-trapping-math: the selects in the bf16/fp16 conversions and in consolidate's omega' == 0
//   case stay branch-free (if-converted, hence vectorised) only when the compiler may evaluate
//   floating-point operations speculatively. It changes no computed value (it only gives up on
//   trapping FP exceptions, which nothing here enables).
// * fp-contract=off: no fused multiply-add contraction (possible with EWC_FAST_NATIVE=1), so every
//   operation rounds exactly as in the torch and Triton twins.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math", "fp-contract=off")
#endif
#include <optional>

#include "consolidation.h"
#include "isa.h"

namespace ewcf {
namespace {

using Ptrs = std::vector<uintptr_t>;
using Numels = std::vector<int64_t>;

// Arithmetic type of the elementwise ops on a parameter of storage type P: double for fp64
// parameters (rounding them through fp32 would lose their precision at every call), else float.
template <class P> using arith_t = std::conditional_t<std::is_same_v<P, double>, double, float>;
// double if either type is double, else float (torch's promotion of two floating dtypes, restricted
// to the pairs that occur: a parameter-like type and a state type)
template <class X, class Y>
using promote_t = std::conditional_t<std::is_same_v<X, double> || std::is_same_v<Y, double>, double, float>;

void check_sizes(const char* op, const Numels& numels, std::initializer_list<const Ptrs*> lists) {
    for (const Ptrs* l : lists)
        if (l->size() != numels.size())
            throw std::invalid_argument(std::string(op) + ": pointer lists and numels differ in length");
}

// ------------------------------------------------------------------------------------------------
// Multi-tensor work split: every tensor is cut into fixed-size chunks (boundaries independent of
// the thread count, so per-chunk partial sums are reproducible); one parallel loop runs over the
// chunks of all tensors.
constexpr int64_t kChunk = 8192;

struct Chunk {
    int32_t tensor;
    int64_t begin;
    int64_t len;
};

std::vector<Chunk> plan_chunks(const std::vector<int64_t>& numels, int64_t chunk = kChunk) {
    std::vector<Chunk> out;
    for (size_t t = 0; t < numels.size(); ++t)
        for (int64_t b = 0; b < numels[t]; b += chunk)
            out.push_back(Chunk{int32_t(t), b, std::min(chunk, numels[t] - b)});
    return out;
}

template <class T> T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Run f(chunk_index, chunk) for every chunk on `nthreads` OpenMP threads (static schedule).
template <class F> void parallel_chunks(const std::vector<Chunk>& chunks, int nthreads, const F& f) {
    const int64_t n = int64_t(chunks.size());
    if (nthreads < 1) nthreads = 1;
#ifdef _OPENMP
#pragma omp parallel for schedule(static) num_threads(nthreads) if (n > 1 && nthreads > 1)
#endif
    for (int64_t c = 0; c < n; ++c) f(c, chunks[size_t(c)]);
}

// Call f(type_tag<T>{}) with T the storage type of a dtype code.
template <class T> struct type_tag { using type = T; };

template <class F> void dispatch_param(int code, const F& f) {
    switch (code) {
        case F32: f(type_tag<float>{}); break;
        case F64: f(type_tag<double>{}); break;
        case BF16: f(type_tag<bf16>{}); break;
        case F16: f(type_tag<f16>{}); break;
        default: throw std::invalid_argument("ewc_fast._C: unknown dtype code " + std::to_string(code));
    }
}

template <class F> void dispatch_state(int code, const F& f) {
    switch (code) {
        case F32: f(type_tag<float>{}); break;
        case F64: f(type_tag<double>{}); break;
        default: throw std::invalid_argument("ewc_fast._C: state dtype code must be float32/float64, got " + std::to_string(code));
    }
}

// Sum of lane accumulators in a fixed pairwise order.
template <class A, int L> inline A fold_lanes(A (&acc)[L]) {
    for (int w = L / 2; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
}

// ------------------------------------------------------------------------------ penalty_apply
// A = arith_t<P> (the grad has the param's dtype). W = A(omega) (or W / (1 + alpha*lam*W));
// d = A(theta - mu) with the difference taken in promote(param, mu); grad += (grad_scale*lam) * (W*d)
// in A; returns W*d*d in A.
template <class P, class O, class M, bool STAB>
inline arith_t<P> penalty_elem(P* __restrict__ g, const P* __restrict__ p, const O* __restrict__ o,
                               const M* __restrict__ mu, int64_t i, arith_t<P> scale, arith_t<P> al) {
    using A = arith_t<P>;
    using D = promote_t<P, M>;
    A w = load_as<A>(o[i]);
    if constexpr (STAB) w = w / (A(1) + al * w);
    const D diff = load_as<D>(p[i]) - load_as<D>(mu[i]);
    const A d = A(diff);
    const A wd = w * d;
    const A step = scale * wd;
    g[i] = store_from<P>(load_as<A>(g[i]) + step);
    return wd * d;
}

// Partial sum of one chunk in A (fp32, or fp64 for fp64 params): 16 independent lane accumulators
// (vectorised, and shorter accumulation chains than one running sum), folded pairwise, plus the
// scalar tail.
template <class P, class O, class M, bool STAB>
inline arith_t<P> penalty_chunk(P* __restrict__ g, const P* __restrict__ p, const O* __restrict__ o,
                                const M* __restrict__ mu, int64_t n, arith_t<P> scale, arith_t<P> al) {
    using A = arith_t<P>;
    constexpr int L = 16;
    A acc[L] = {};
    const int64_t nb = n - n % L;
    for (int64_t b = 0; b < nb; b += L) {
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[l] += penalty_elem<P, O, M, STAB>(g, p, o, mu, b + l, scale, al);
    }
    A tail = A(0);
    for (int64_t i = nb; i < n; ++i) tail += penalty_elem<P, O, M, STAB>(g, p, o, mu, i, scale, al);
    return fold_lanes(acc) + tail;
}

// One entry point per instruction set (csrc/isa.h), chosen once per process; fp-contract=off and the
// explicit lane order make them agree bit for bit (tests/ops/test_consolidation_ops.py).
#define EWCF_PEN_PARAMS                                                                               \
    P *__restrict__ g, const P *__restrict__ p, const O *__restrict__ o, const M *__restrict__ mu, int64_t n, \
        arith_t<P> scale, arith_t<P> al
template <class P, class O, class M, bool STAB>
__attribute__((flatten, noinline)) arith_t<P> penalty_chunk_generic(EWCF_PEN_PARAMS) {
    return penalty_chunk<P, O, M, STAB>(g, p, o, mu, n, scale, al);
}
#ifdef EWCF_X86_MULTI
template <class P, class O, class M, bool STAB>
EWCF_TARGET_AVX2 arith_t<P> penalty_chunk_avx2(EWCF_PEN_PARAMS) {
    return penalty_chunk<P, O, M, STAB>(g, p, o, mu, n, scale, al);
}
template <class P, class O, class M, bool STAB>
EWCF_TARGET_AVX512 arith_t<P> penalty_chunk_avx512(EWCF_PEN_PARAMS) {
    return penalty_chunk<P, O, M, STAB>(g, p, o, mu, n, scale, al);
}
#endif
template <class P, class O, class M, bool STAB>
auto pick_penalty_chunk() -> arith_t<P> (*)(EWCF_PEN_PARAMS) {
#ifdef EWCF_X86_MULTI
    const int isa = mk::chosen_isa();
    if (isa == 2) return &penalty_chunk_avx512<P, O, M, STAB>;
    if (isa == 1) return &penalty_chunk_avx2<P, O, M, STAB>;
#endif
    return &penalty_chunk_generic<P, O, M, STAB>;
}
#undef EWCF_PEN_PARAMS

template <class P, class O, class M>
double penalty_run(const Ptrs& g, const Ptrs& p, const Ptrs& o, const Ptrs& mu, const std::vector<Chunk>& chunks,
                   arith_t<P> scale, bool stab, arith_t<P> al, int nthreads) {
    std::vector<double> part(chunks.size(), 0.0);
    const auto chunk_stab = pick_penalty_chunk<P, O, M, true>();
    const auto chunk_plain = pick_penalty_chunk<P, O, M, false>();
    parallel_chunks(chunks, nthreads, [&](int64_t c, const Chunk& ch) {
        const size_t t = size_t(ch.tensor);
        P* gp = as_ptr<P>(g[t]) + ch.begin;
        const P* pp = as_ptr<const P>(p[t]) + ch.begin;
        const O* op = as_ptr<const O>(o[t]) + ch.begin;
        const M* mp = as_ptr<const M>(mu[t]) + ch.begin;
        part[size_t(c)] = double((stab ? chunk_stab : chunk_plain)(gp, pp, op, mp, ch.len, scale, al));
    });
    double s = 0.0;
    for (double x : part) s += x;  // fp64, in chunk order
    return s;
}

double penalty_apply(const Ptrs& grads, const Ptrs& params, const Ptrs& omega, const Ptrs& mu, const Numels& numels,
                     int p_dt, int o_dt, int m_dt, double lam, std::optional<double> alpha, double grad_scale,
                     int nthreads) {
    check_sizes("penalty_apply", numels, {&grads, &params, &omega, &mu});
    const std::vector<Chunk> chunks = plan_chunks(numels);
    // scalars enter the arithmetic in its type (fp32 scalars in fp32 arithmetic, as Python scalars do
    // in torch's fp32 kernels)
    const double scale = grad_scale * lam;
    const bool stab = alpha.has_value();
    const double al = stab ? *alpha * lam : 0.0;
    double result = 0.0;
    py::gil_scoped_release nogil;
    dispatch_param(p_dt, [&](auto pt) {
        dispatch_state(o_dt, [&](auto ot) {
            dispatch_state(m_dt, [&](auto mt) {
                using P = typename decltype(pt)::type;
                using O = typename decltype(ot)::type;
                using M = typename decltype(mt)::type;
                using A = arith_t<P>;
                result = penalty_run<P, O, M>(grads, params, omega, mu, chunks, A(scale), stab, A(al), nthreads);
            });
        });
    });
    return result;
}

// ------------------------------------------------------- per-ISA entry points of the other loops
// consolidate / si_accumulate / si_consolidate / wva_attenuate run their chunk kernel K::run through
// one of three non-inlined entry points, compiled for the generic target, AVX2+FMA or AVX-512
// (csrc/isa.h), chosen once per process (`flatten` expands K::run, and the loop, inside each). The
// arithmetic is the same in each (no FMA contraction, no reassociation: the lane order of a sum is
// explicit), so the variants agree bit for bit (tests/ops/test_consolidation_isa.py).
template <class K, class... Args> __attribute__((flatten, noinline)) auto isa_generic(Args... args) {
    return K::run(args...);
}
#ifdef EWCF_X86_MULTI
template <class K, class... Args> EWCF_TARGET_AVX2 auto isa_avx2(Args... args) { return K::run(args...); }
template <class K, class... Args> EWCF_TARGET_AVX512 auto isa_avx512(Args... args) { return K::run(args...); }
#endif
template <class K, class... Args> auto pick_isa() {
#ifdef EWCF_X86_MULTI
    const int isa = mk::chosen_isa();
    if (isa == 2) return &isa_avx512<K, Args...>;
    if (isa == 1) return &isa_avx2<K, Args...>;
#endif
    return &isa_generic<K, Args...>;
}

// -------------------------------------------------------------------------------- consolidate
// fp64: omega' = gamma*omega + F; mu' = (gamma*omega*mu + F*a)/omega' (a where omega' == 0) or
// mu' = a (online); returns sum gamma*omega*(mu-mu')^2 + F*(a-mu')^2 (0 when online).
template <class O, class M, class R, bool ONLINE>
inline double consolidate_elem(O* __restrict__ o, M* __restrict__ mu, const R* __restrict__ f,
                               const R* __restrict__ a, int64_t i, double gamma) {
    const double go = gamma * to_f64<O>(o[i]);
    const double fi = to_f64<R>(f[i]);
    const double ai = to_f64<R>(a[i]);
    const double on = go + fi;
    o[i] = from_f64<O>(on);
    if constexpr (ONLINE) {
        mu[i] = from_f64<M>(ai);
        return 0.0;
    } else {
        const double mi = to_f64<M>(mu[i]);
        const bool nz = on != 0.0;
        const double den = nz ? on : 1.0;
        const double merged = (go * mi + fi * ai) / den;
        const double mn = nz ? merged : ai;
        mu[i] = from_f64<M>(mn);
        const double dm = mi - mn;
        const double da = ai - mn;
        return go * (dm * dm) + fi * (da * da);
    }
}

template <class O, class M, class R, bool ONLINE>
double consolidate_chunk(O* __restrict__ o, M* __restrict__ mu, const R* __restrict__ f, const R* __restrict__ a,
                         int64_t n, double gamma) {
    constexpr int L = 8;
    double acc[L] = {};
    const int64_t nb = n - n % L;
    for (int64_t b = 0; b < nb; b += L) {
#pragma omp simd
        for (int l = 0; l < L; ++l) acc[l] += consolidate_elem<O, M, R, ONLINE>(o, mu, f, a, b + l, gamma);
    }
    double tail = 0.0;
    for (int64_t i = nb; i < n; ++i) tail += consolidate_elem<O, M, R, ONLINE>(o, mu, f, a, i, gamma);
    return fold_lanes(acc) + tail;
}

template <class O, class M, class R, bool ONLINE> struct ConsolidateK {
    static double run(O* o, M* mu, const R* f, const R* a, int64_t n, double gamma) {
        return consolidate_chunk<O, M, R, ONLINE>(o, mu, f, a, n, gamma);
    }
};

template <class O, class M, class R>
double consolidate_run(const Ptrs& o, const Ptrs& mu, const Ptrs& f, const Ptrs& a, const std::vector<Chunk>& chunks,
                       double gamma, bool online, int nthreads) {
    std::vector<double> part(chunks.size(), 0.0);
    const auto chunk_online = pick_isa<ConsolidateK<O, M, R, true>, O*, M*, const R*, const R*, int64_t, double>();
    const auto chunk_merge = pick_isa<ConsolidateK<O, M, R, false>, O*, M*, const R*, const R*, int64_t, double>();
    parallel_chunks(chunks, nthreads, [&](int64_t c, const Chunk& ch) {
        const size_t t = size_t(ch.tensor);
        O* op = as_ptr<O>(o[t]) + ch.begin;
        M* mp = as_ptr<M>(mu[t]) + ch.begin;
        const R* fp = as_ptr<const R>(f[t]) + ch.begin;
        const R* ap = as_ptr<const R>(a[t]) + ch.begin;
        part[size_t(c)] = (online ? chunk_online : chunk_merge)(op, mp, fp, ap, ch.len, gamma);
    });
    double s = 0.0;
    for (double x : part) s += x;
    return s;
}

// fisher and anchor share one dtype code (the Python side casts mixed pairs to float64, which is
// exact and leaves the fp64 arithmetic unchanged)
double consolidate(const Ptrs& omega, const Ptrs& mu, const Ptrs& fisher, const Ptrs& anchor, const Numels& numels,
                   int o_dt, int m_dt, int r_dt, double gamma, bool online, int nthreads) {
    check_sizes("consolidate", numels, {&omega, &mu, &fisher, &anchor});
    const std::vector<Chunk> chunks = plan_chunks(numels);
    double result = 0.0;
    py::gil_scoped_release nogil;
    dispatch_state(o_dt, [&](auto ot) {
        dispatch_state(m_dt, [&](auto mt) {
            dispatch_param(r_dt, [&](auto rt) {
                using O = typename decltype(ot)::type;
                using M = typename decltype(mt)::type;
                using R = typename decltype(rt)::type;
                result = consolidate_run<O, M, R>(omega, mu, fisher, anchor, chunks, gamma, online, nthreads);
            });
        });
    });
    return result;
}

// ------------------------------------------------------------------------------ si_accumulate
// omega_path -= A(g) * (A(theta) - A(prev)) (the product in the arithmetic type A: fp64 for fp64
// params, else fp32; the subtraction in promote(state, A), rounded once to the state type);
// prev <- theta (cast to prev's dtype).
template <class S, class Q, class R, class A>
void si_accumulate_chunk(S* __restrict__ w, const R* __restrict__ g, const R* __restrict__ p, Q* __restrict__ q,
                         int64_t n) {
    using W = promote_t<S, A>;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const A prod = load_as<A>(g[i]) * (load_as<A>(p[i]) - load_as<A>(q[i]));
        w[i] = S(W(w[i]) - W(prod));
        q[i] = cast_value<Q, R>(p[i]);
    }
}

template <class S, class Q, class R, class A> struct SiAccumulateK {
    static void run(S* w, const R* g, const R* p, Q* q, int64_t n) { si_accumulate_chunk<S, Q, R, A>(w, g, p, q, n); }
};

// grads and params share a dtype code R; R is either prev's dtype or float64 (mixed groups are cast
// to float64 on the Python side, which is exact). Since R no longer tells the params' own dtype,
// fp64_math says whether they are fp64 (then R is float64 too): the arithmetic is fp64 then, else fp32.
void si_accumulate(const Ptrs& omega_path, const Ptrs& grads, const Ptrs& params, const Ptrs& prev, const Numels& numels,
                   int s_dt, int q_dt, int r_dt, bool fp64_math, int nthreads) {
    check_sizes("si_accumulate", numels, {&omega_path, &grads, &params, &prev});
    if (r_dt != q_dt && r_dt != F64)
        throw std::invalid_argument("si_accumulate: grads/params dtype must equal prev_params dtype or be float64");
    if (fp64_math && r_dt != F64)
        throw std::invalid_argument("si_accumulate: fp64_math needs float64 grads/params");
    const std::vector<Chunk> chunks = plan_chunks(numels);
    py::gil_scoped_release nogil;
    dispatch_state(s_dt, [&](auto st) {
        dispatch_param(q_dt, [&](auto qt) {
            using S = typename decltype(st)::type;
            using Q = typename decltype(qt)::type;
            auto run = [&](auto rt, auto at) {
                using R = typename decltype(rt)::type;
                using A = typename decltype(at)::type;
                const auto chunk = pick_isa<SiAccumulateK<S, Q, R, A>, S*, const R*, const R*, Q*, int64_t>();
                parallel_chunks(chunks, nthreads, [&](int64_t, const Chunk& ch) {
                    const size_t t = size_t(ch.tensor);
                    chunk(as_ptr<S>(omega_path[t]) + ch.begin, as_ptr<const R>(grads[t]) + ch.begin,
                          as_ptr<const R>(params[t]) + ch.begin, as_ptr<Q>(prev[t]) + ch.begin, ch.len);
                });
            };
            if (fp64_math) run(type_tag<double>{}, type_tag<double>{});
            else if (r_dt == q_dt) run(type_tag<Q>{}, type_tag<float>{});
            else run(type_tag<double>{}, type_tag<float>{});
        });
    });
}

// ----------------------------------------------------------------------------- si_consolidate
// In the arithmetic type A (fp64 for fp64 params, else fp32):
// out = A(out) + A(w) / ((A(theta) - A(start))^2 + xi), max(., 0) if clip; w <- 0; start <- theta.
template <class S, class U, class Q, class R, class A, bool CLIP>
void si_consolidate_chunk(S* __restrict__ w, const R* __restrict__ p, Q* __restrict__ st, U* __restrict__ out,
                          int64_t n, A xi) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const A delta = load_as<A>(p[i]) - load_as<A>(st[i]);
        A val = load_as<A>(out[i]) + load_as<A>(w[i]) / (delta * delta + xi);
        if constexpr (CLIP) val = val < A(0) ? A(0) : val;  // NaN stays NaN, as torch's clamp_min
        out[i] = store_from<U>(val);
        w[i] = S(0);
        st[i] = cast_value<Q, R>(p[i]);
    }
}

template <class S, class U, class Q, class R, class A, bool CLIP> struct SiConsolidateK {
    static void run(S* w, const R* p, Q* st, U* out, int64_t n, A xi) {
        si_consolidate_chunk<S, U, Q, R, A, CLIP>(w, p, st, out, n, xi);
    }
};

// params have dtype code R: start's dtype, or float64 (mixed groups cast on the Python side, exact);
// fp64_math says whether the params themselves are fp64 (then R is float64): fp64 arithmetic, else fp32.
void si_consolidate(const Ptrs& omega_path, const Ptrs& params, const Ptrs& start, const Ptrs& out, const Numels& numels,
                    int s_dt, int u_dt, int q_dt, int r_dt, double xi, bool clip, bool fp64_math, int nthreads) {
    check_sizes("si_consolidate", numels, {&omega_path, &params, &start, &out});
    if (r_dt != q_dt && r_dt != F64)
        throw std::invalid_argument("si_consolidate: params dtype must equal start_params dtype or be float64");
    if (fp64_math && r_dt != F64)
        throw std::invalid_argument("si_consolidate: fp64_math needs float64 params");
    const std::vector<Chunk> chunks = plan_chunks(numels);
    py::gil_scoped_release nogil;
    dispatch_state(s_dt, [&](auto st) {
        dispatch_state(u_dt, [&](auto ut) {
            dispatch_param(q_dt, [&](auto qt) {
                using S = typename decltype(st)::type;
                using U = typename decltype(ut)::type;
                using Q = typename decltype(qt)::type;
                auto run = [&](auto rt, auto at) {
                    using R = typename decltype(rt)::type;
                    using A = typename decltype(at)::type;
                    const A xia = A(xi);  // fp32 in fp32 arithmetic, as torch rounds a Python scalar
                    using Clip = SiConsolidateK<S, U, Q, R, A, true>;
                    using Raw = SiConsolidateK<S, U, Q, R, A, false>;
                    const auto chunk_clip = pick_isa<Clip, S*, const R*, Q*, U*, int64_t, A>();
                    const auto chunk_raw = pick_isa<Raw, S*, const R*, Q*, U*, int64_t, A>();
                    parallel_chunks(chunks, nthreads, [&](int64_t, const Chunk& ch) {
                        const size_t t = size_t(ch.tensor);
                        S* wp = as_ptr<S>(omega_path[t]) + ch.begin;
                        const R* pp = as_ptr<const R>(params[t]) + ch.begin;
                        Q* sp = as_ptr<Q>(start[t]) + ch.begin;
                        U* op = as_ptr<U>(out[t]) + ch.begin;
                        (clip ? chunk_clip : chunk_raw)(wp, pp, sp, op, ch.len, xia);
                    });
                };
                if (fp64_math) run(type_tag<double>{}, type_tag<double>{});
                else if (r_dt == q_dt) run(type_tag<Q>{}, type_tag<float>{});
                else run(type_tag<double>{}, type_tag<float>{});
            });
        });
    });
}

// ------------------------------------------------------------------------------ wva_attenuate
// theta <- old + (theta - old) / (1 + lam*A) in arith_t<P> (fp64 for fp64 params, else fp32), stored
// in the param dtype. (An fp64 parameter must not pass through fp32: that would round it at every
// step, even where A = 0.)
template <class P, class R, class AC>
void wva_chunk(P* __restrict__ p, const R* __restrict__ old, const AC* __restrict__ acc, int64_t n,
               arith_t<P> lam) {
    using A = arith_t<P>;
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
        const A q = load_as<A>(old[i]);
        const A v = q + (load_as<A>(p[i]) - q) / (A(1) + lam * load_as<A>(acc[i]));
        p[i] = store_from<P>(v);
    }
}

template <class P, class R, class AC> struct WvaK {
    static void run(P* p, const R* old, const AC* acc, int64_t n, arith_t<P> lam) {
        wva_chunk<P, R, AC>(p, old, acc, n, lam);
    }
};

// old_params has params' dtype or float64 (mixed groups cast to float64 on the Python side: exact)
void wva_attenuate(const Ptrs& params, const Ptrs& old, const Ptrs& accum, const Numels& numels, int p_dt, int r_dt,
                   int a_dt, double lam, int nthreads) {
    check_sizes("wva_attenuate", numels, {&params, &old, &accum});
    if (r_dt != p_dt && r_dt != F64)
        throw std::invalid_argument("wva_attenuate: old_params dtype must equal params dtype or be float64");
    const std::vector<Chunk> chunks = plan_chunks(numels);
    py::gil_scoped_release nogil;
    dispatch_param(p_dt, [&](auto pt) {
        dispatch_state(a_dt, [&](auto at) {
            using P = typename decltype(pt)::type;
            using AC = typename decltype(at)::type;
            const arith_t<P> lama = arith_t<P>(lam);  // fp32 in fp32 arithmetic, as torch rounds a Python scalar
            auto run = [&](auto rt) {
                using R = typename decltype(rt)::type;
                const auto chunk = pick_isa<WvaK<P, R, AC>, P*, const R*, const AC*, int64_t, arith_t<P>>();
                parallel_chunks(chunks, nthreads, [&](int64_t, const Chunk& ch) {
                    const size_t t = size_t(ch.tensor);
                    chunk(as_ptr<P>(params[t]) + ch.begin, as_ptr<const R>(old[t]) + ch.begin,
                          as_ptr<const AC>(accum[t]) + ch.begin, ch.len, lama);
                });
            };
            if (r_dt == p_dt) run(type_tag<P>{}); else run(type_tag<double>{});
        });
    });
}

// Round-trip helpers exposed for tests of the conversions.
std::vector<uint16_t> to_bf16_bits(const std::vector<float>& v) {
    std::vector<uint16_t> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = f32_to_bf16(v[i]);
    return r;
}
std::vector<uint16_t> to_f16_bits(const std::vector<float>& v) {
    std::vector<uint16_t> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = f32_to_f16(v[i]);
    return r;
}
std::vector<float> from_f16_bits(const std::vector<uint16_t>& v) {
    std::vector<float> r(v.size());
    for (size_t i = 0; i < v.size(); ++i) r[i] = f16_to_f32(v[i]);
    return r;
}

}  // namespace

void init_consolidation(py::module_& m) {
    using namespace py::literals;
    m.def("penalty_apply", &penalty_apply,
          "grad += grad_scale*lam*W*(theta-mu) in place; returns sum W*(theta-mu)^2 (per chunk in the "
          "arithmetic type: fp64 for fp64 params, else fp32; fp64 across chunks)",
          "grads"_a, "params"_a, "omega"_a, "mu"_a, "numels"_a, "param_dtype"_a, "omega_dtype"_a, "mu_dtype"_a,
          "lam"_a, "alpha"_a, "grad_scale"_a, "nthreads"_a);
    m.def("consolidate", &consolidate,
          "merge (fisher, anchor) into (omega, mu) in place, fp64; returns the c increment",
          "omega"_a, "mu"_a, "fisher"_a, "anchor"_a, "numels"_a, "omega_dtype"_a, "mu_dtype"_a, "input_dtype"_a,
          "gamma"_a, "online"_a, "nthreads"_a);
    m.def("si_accumulate", &si_accumulate, "omega_path -= g*(theta-prev); prev <- theta",
          "omega_path"_a, "grads"_a, "params"_a, "prev_params"_a, "numels"_a, "state_dtype"_a, "prev_dtype"_a,
          "input_dtype"_a, "fp64_math"_a, "nthreads"_a);
    m.def("si_consolidate", &si_consolidate,
          "out += omega_path/((theta-start)^2+xi) (clip at 0); omega_path <- 0; start <- theta",
          "omega_path"_a, "params"_a, "start_params"_a, "out"_a, "numels"_a, "state_dtype"_a, "out_dtype"_a,
          "start_dtype"_a, "param_dtype"_a, "xi"_a, "clip"_a, "fp64_math"_a, "nthreads"_a);
    m.def("wva_attenuate", &wva_attenuate, "theta <- old + (theta-old)/(1+lam*A)",
          "params"_a, "old_params"_a, "accum"_a, "numels"_a, "param_dtype"_a, "old_dtype"_a, "accum_dtype"_a,
          "lam"_a, "nthreads"_a);
    m.def("_f32_to_bf16_bits", &to_bf16_bits, "test hook: float -> bf16 bit patterns (RNE)");
    m.def("_f32_to_f16_bits", &to_f16_bits, "test hook: float -> fp16 bit patterns (RNE)");
    m.def("_f16_bits_to_f32", &from_f16_bits, "test hook: fp16 bit patterns -> float");
}

}  // namespace ewcf
