// persample_conv_sq: sq += sum_n (dW_n)^2 and ab += sum_n |dW_n| for a convolution, where
//
//     dW_n[g*Og + o, c, k] = sum_l G[n, g*Og + o, l] * X[n, g*Cg + c, l*stride + k*dilation - padding]
//
// (per spatial dim; X is zero outside its extent), without forming the unfolded input or the
// N x O x (Cg*K) per-sample gradients. X is (N, C, S0, S1, S2) and G is (N, O, L0, L1, L2) with any
// element strides (1-D / 2-D convolutions arrive with leading size-1 spatial dims); dtype
// fp32/fp64/bf16/fp16; outputs are contiguous (O, Cg*K0*K1*K2) fp32 or fp64 (the weight's layout,
// column j = c*Kp + tap). Arithmetic in fp32 (fp64 for fp64 inputs).
//
// Design: an implicit GEMM per sample and group, on the micro-kernel of csrc/microkernel.h.
//  * Per sample, dW_n of group g is G_ng (Og x Lp) times the implicit im2col matrix (Lp x Cg*Kp) of
//    X_ng: a GEMM whose reduction dimension is the Lp output positions. The (Og, Cg*Kp) output of
//    each group is cut into BO x BI macro tiles; a work item is (group, macro tile, sample split),
//    scheduled dynamically over OpenMP threads. Items of different tiles write disjoint outputs.
//    With fewer tiles than 4 x threads the samples are split into per-split slabs, reduced in a
//    fixed order (deterministic for a given thread count), as in csrc/persample.cpp.
//  * For each sample, positions are taken KC at a time. The KC x BO slice of G_n and the KC x BI
//    slice of the implicit im2col matrix are packed into MR- / NR-wide panels (converted to the
//    accumulation type, zero where the tap falls into the padding). The im2col panel is gathered
//    straight from X: positions are walked in runs along the last spatial dim, and for each
//    column (c, tap) the in-range part of a run is found arithmetically, so the inner copy loop has
//    no bounds test. Only a KC x BI tile of the unfolded input exists at any time.
//  * The MR x NR register micro-tile accumulates over the positions; at the sample's last block,
//    tile^2 and |tile| go into the item's BO x BI accumulators (EPI_SQ / EPI_ABS / EPI_SQABS).
//  * Compiled three times on x86-64 (AVX-512, AVX2+FMA, SSE2) through `target` + `flatten` entry
//    points and chosen at run time (EWC_FAST_CPP_ISA caps it), like persample_sq.
#include "persample_conv.h"
#include "microkernel.h"

#include <algorithm>
#include <stdexcept>
#include <vector>

namespace ewcf {
namespace persample_conv_detail {

using namespace mk;

#ifndef EWCF_PSC_BO
#define EWCF_PSC_BO 96
#endif
#ifndef EWCF_PSC_BI
#define EWCF_PSC_BI 128
#endif

struct ConvProblem {
    const void* X;
    const void* G;
    i64 N, groups, Cg, Og, O;
    i64 S[3], L[3], K[3], st[3], pd[3], dl[3];
    i64 sXn, sXc, sX[3];  // element strides of X (n, c, spatial)
    i64 sGn, sGo, sG[3];  // element strides of G (n, o, spatial)
    i64 Lp, Kp, J;        // output positions, taps, columns per group (Cg * Kp)
    bool do_sq, do_abs;
    void* sq;
    int sq_code;
    void* ab;
    int ab_code;
    i64 splits;
    void* slabs;  // splits x (do_sq + do_abs) x O x J accumulators (Acc) when splits > 1
};

// floor / ceil division for a possibly negative numerator and a positive divisor
inline i64 floor_div(i64 a, i64 b) { return a >= 0 ? a / b : -((-a + b - 1) / b); }
inline i64 ceil_div(i64 a, i64 b) { return -floor_div(-a, b); }

// A run of output positions with fixed (l0, l1) and l2 in [a, b), starting at block row t.
struct Run {
    i64 t, l0, l1, a, b;
};

template <typename Acc>
inline void flush(const ConvProblem& pb, int which, i64 split, i64 row0, i64 j0, const Acc* loc, i64 ldc, i64 rows,
                  i64 cols) {
    if (pb.splits > 1) {
        const int nout = int(pb.do_sq) + int(pb.do_abs);
        const int slot = (which == 1 && pb.do_sq) ? 1 : 0;
        Acc* dst = static_cast<Acc*>(pb.slabs) + (split * nout + slot) * pb.O * pb.J + row0 * pb.J + j0;
        for (i64 r = 0; r < rows; ++r)
            for (i64 c = 0; c < cols; ++c) dst[r * pb.J + c] = loc[r * ldc + c];
        return;
    }
    void* out = which == 0 ? pb.sq : pb.ab;
    const int code = which == 0 ? pb.sq_code : pb.ab_code;
    if (code == F64)
        add_tile(static_cast<double*>(out) + row0 * pb.J + j0, pb.J, loc, ldc, rows, cols);
    else
        add_tile(static_cast<float*>(out) + row0 * pb.J + j0, pb.J, loc, ldc, rows, cols);
}

template <typename In, typename Acc, typename V, int MR, int NRV>
struct Kernel {
    static constexpr int W = int(sizeof(V) / sizeof(Acc));
    static constexpr int NR = NRV * W;
    static constexpr i64 BO = EWCF_PSC_BO;
    static constexpr i64 BI = EWCF_PSC_BI;
    static constexpr i64 KC = sizeof(Acc) == 4 ? EWCF_PS_KC : EWCF_PS_KC / 2;
    static_assert(BO % MR == 0 && BI % NR == 0, "macro tile must hold whole micro tiles");

    static size_t scratch_bytes() {
        // pg (KC x BO) + pa (KC x BI) + loc0 + loc1 + spill (BO x BI), column table (4 x BI), runs (KC)
        return sizeof(Acc) * size_t(KC * BO + KC * BI + 3 * BO * BI) + sizeof(i64) * size_t(4 * BI) +
               sizeof(Run) * size_t(KC) + 64 * 8;
    }

    // Runs of the positions [t0, t0 + kc): consecutive positions sharing (l0, l1).
    static i64 runs(const ConvProblem& pb, i64 t0, i64 kc, Run* out) {
        const i64 L1 = pb.L[1], L2 = pb.L[2];
        i64 nr = 0, t = 0;
        while (t < kc) {
            const i64 pos = t0 + t;
            const i64 l2 = pos % L2, r = pos / L2;
            const i64 len = std::min(L2 - l2, kc - t);
            out[nr++] = Run{t, r / L1, r % L1, l2, l2 + len};
            t += len;
        }
        return nr;
    }

    // pg[(p*kc + t)*MR + m] = G[n, row0 + p*MR + m, position t0 + t] (zero for rows >= bo)
    static void pack_g(const ConvProblem& pb, Acc* __restrict pg, const In* Gn, i64 row0, i64 bo, i64 kc,
                       const Run* rs, i64 nr) {
        const i64 np = (bo + MR - 1) / MR;
        for (i64 p = 0; p < np; ++p) {
            for (int m = 0; m < MR; ++m) {
                Acc* dst = pg + p * kc * MR + m;
                const i64 o = p * MR + m;
                if (o >= bo) {
                    for (i64 t = 0; t < kc; ++t) dst[t * MR] = Acc(0);
                    continue;
                }
                const In* row = Gn + (row0 + o) * pb.sGo;
                for (i64 q = 0; q < nr; ++q) {
                    const Run& r = rs[q];
                    const In* src = row + r.l0 * pb.sG[0] + r.l1 * pb.sG[1];
                    Acc* d = dst + r.t * MR;
                    const i64 s2 = pb.sG[2];
                    for (i64 l2 = r.a; l2 < r.b; ++l2) d[(l2 - r.a) * MR] = load_as<Acc>(src + l2 * s2);
                }
            }
        }
    }

    // pa[(p*kc + t)*NR + jj] = X[n, chan(j), position t0 + t shifted by tap(j)] (zero in the padding or
    // for columns >= bj), j = p*NR + jj; tab holds per column: channel offset, kd0, kd1, kd2.
    static void pack_x(const ConvProblem& pb, Acc* __restrict pa, const In* Xn, const i64* tab, i64 bj, i64 kc,
                       const Run* rs, i64 nr) {
        const i64 np = (bj + NR - 1) / NR;
        const i64 st0 = pb.st[0], st1 = pb.st[1], st2 = pb.st[2];
        const i64 S0 = pb.S[0], S1 = pb.S[1], S2 = pb.S[2];
        const i64 s2 = pb.sX[2];
        for (i64 p = 0; p < np; ++p) {
            for (int jj = 0; jj < NR; ++jj) {
                Acc* dst = pa + p * kc * NR + jj;
                const i64 j = p * NR + jj;
                if (j >= bj) {
                    for (i64 t = 0; t < kc; ++t) dst[t * NR] = Acc(0);
                    continue;
                }
                const i64* tj = tab + 4 * j;
                const i64 kd2 = tj[3];
                // l2 range with 0 <= l2*st2 + kd2 < S2
                const i64 va_all = std::max<i64>(0, ceil_div(-kd2, st2));
                const i64 vb_all = S2 - 1 - kd2 < 0 ? 0 : floor_div(S2 - 1 - kd2, st2) + 1;
                for (i64 q = 0; q < nr; ++q) {
                    const Run& r = rs[q];
                    Acc* d = dst + r.t * NR;
                    const i64 i0 = r.l0 * st0 + tj[1], i1 = r.l1 * st1 + tj[2];
                    const bool row_ok = i0 >= 0 && i0 < S0 && i1 >= 0 && i1 < S1;
                    const i64 va = row_ok ? std::min(r.b, std::max(r.a, va_all)) : r.b;
                    const i64 vb = row_ok ? std::max(va, std::min(r.b, vb_all)) : r.b;
                    for (i64 l2 = r.a; l2 < va; ++l2) d[(l2 - r.a) * NR] = Acc(0);
                    if (vb > va) {
                        const In* src = Xn + tj[0] + i0 * pb.sX[0] + i1 * pb.sX[1] + kd2 * s2;
                        const i64 step = st2 * s2;
                        for (i64 l2 = va; l2 < vb; ++l2) d[(l2 - r.a) * NR] = load_as<Acc>(src + l2 * step);
                    }
                    for (i64 l2 = vb; l2 < r.b; ++l2) d[(l2 - r.a) * NR] = Acc(0);
                }
            }
        }
    }

    template <int EPI>
    static void fused(const ConvProblem& pb, Acc* pg, Acc* pa, Acc* l0, Acc* l1, Acc* pl, const i64* tab, Run* rs,
                      i64 g, i64 o0, i64 bo, i64 bj, i64 n0, i64 n1) {
        const In* X = static_cast<const In*>(pb.X);
        const In* G = static_cast<const In*>(pb.G);
        const i64 mo = (bo + MR - 1) / MR, ni = (bj + NR - 1) / NR, ldc = ni * NR;
        const i64 nkb = (pb.Lp + KC - 1) / KC;
        const i64 row0 = g * pb.Og + o0;
        for (i64 n = n0; n < n1; ++n) {
            const In* Xn = X + n * pb.sXn;
            const In* Gn = G + n * pb.sGn;
            for (i64 kb = 0; kb < nkb; ++kb) {
                const i64 t0 = kb * KC, kc = std::min(KC, pb.Lp - t0);
                const i64 nr = runs(pb, t0, kc, rs);
                pack_g(pb, pg, Gn, row0, bo, kc, rs, nr);
                pack_x(pb, pa, Xn, tab, bj, kc, rs, nr);
                const bool first = kb == 0, last = kb == nkb - 1;
                for (i64 c = 0; c < ni; ++c)
                    for (i64 r = 0; r < mo; ++r) {
                        const i64 off = r * MR * ldc + c * NR;
                        micro<V, Acc, MR, NRV, EPI>(kc, pg + r * kc * MR, pa + c * kc * NR, l0 + off, l1 + off,
                                                    pl + off, ldc, first, last);
                    }
            }
        }
    }

    // One work item: group g, macro tile (ob, ib) of the group's (Og, J) block, samples [n0, n1).
    static void item(const ConvProblem& pb, Scratch& scratch, i64 g, i64 ob, i64 ib, i64 n0, i64 n1, i64 split) {
        char* base = static_cast<char*>(scratch.get(scratch_bytes()));
        auto carve = [&base](size_t bytes) {
            char* p = base;
            base += (bytes + 63) / 64 * 64;
            return p;
        };
        Acc* pg = reinterpret_cast<Acc*>(carve(sizeof(Acc) * KC * BO));
        Acc* pa = reinterpret_cast<Acc*>(carve(sizeof(Acc) * KC * BI));
        Acc* l0 = reinterpret_cast<Acc*>(carve(sizeof(Acc) * BO * BI));
        Acc* l1 = reinterpret_cast<Acc*>(carve(sizeof(Acc) * BO * BI));
        Acc* pl = reinterpret_cast<Acc*>(carve(sizeof(Acc) * BO * BI));
        i64* tab = reinterpret_cast<i64*>(carve(sizeof(i64) * 4 * BI));
        Run* rs = reinterpret_cast<Run*>(carve(sizeof(Run) * KC));
        const i64 o0 = ob * BO, bo = std::min(BO, pb.Og - o0);
        const i64 j0 = ib * BI, bj = std::min(BI, pb.J - j0);
        const i64 ldc = (bj + NR - 1) / NR * NR, rows = (bo + MR - 1) / MR * MR;
        for (i64 j = 0; j < bj; ++j) {  // column j0 + j = c*Kp + tap, tap = (k0*K1 + k1)*K2 + k2
            const i64 col = j0 + j, c = col / pb.Kp, tap = col % pb.Kp;
            const i64 k2 = tap % pb.K[2], k1 = (tap / pb.K[2]) % pb.K[1], k0 = tap / (pb.K[2] * pb.K[1]);
            tab[4 * j + 0] = (g * pb.Cg + c) * pb.sXc;
            tab[4 * j + 1] = k0 * pb.dl[0] - pb.pd[0];
            tab[4 * j + 2] = k1 * pb.dl[1] - pb.pd[1];
            tab[4 * j + 3] = k2 * pb.dl[2] - pb.pd[2];
        }
        std::fill(l0, l0 + rows * ldc, Acc(0));
        std::fill(l1, l1 + rows * ldc, Acc(0));
        if (pb.do_sq && pb.do_abs)
            fused<EPI_SQABS>(pb, pg, pa, l0, l1, pl, tab, rs, g, o0, bo, bj, n0, n1);
        else if (pb.do_sq)
            fused<EPI_SQ>(pb, pg, pa, l0, l1, pl, tab, rs, g, o0, bo, bj, n0, n1);
        else
            fused<EPI_ABS>(pb, pg, pa, l0, l1, pl, tab, rs, g, o0, bo, bj, n0, n1);
        const i64 row0 = g * pb.Og + o0;
        if (pb.do_sq) flush<Acc>(pb, 0, split, row0, j0, l0, ldc, bo, bj);
        if (pb.do_abs) flush<Acc>(pb, 1, split, row0, j0, l1, ldc, bo, bj);
    }
};

using ItemFn = void (*)(const ConvProblem&, Scratch&, i64, i64, i64, i64, i64, i64);

template <typename In>
__attribute__((flatten)) void item_generic(const ConvProblem& pb, Scratch& s, i64 g, i64 ob, i64 ib, i64 n0, i64 n1,
                                           i64 sp) {
    using Acc = typename AccOf<In>::type;
    Kernel<In, Acc, typename Vecs<Acc>::V16, 6, 2>::item(pb, s, g, ob, ib, n0, n1, sp);
}
template <typename In> size_t scratch_generic() {
    using Acc = typename AccOf<In>::type;
    return Kernel<In, Acc, typename Vecs<Acc>::V16, 6, 2>::scratch_bytes();
}

#ifdef EWCF_X86_MULTI
template <typename In>
__attribute__((target("avx2,fma,f16c"), flatten)) void item_avx2(const ConvProblem& pb, Scratch& s, i64 g, i64 ob,
                                                                 i64 ib, i64 n0, i64 n1, i64 sp) {
    using Acc = typename AccOf<In>::type;
    Kernel<In, Acc, typename Vecs<Acc>::V32, 6, 2>::item(pb, s, g, ob, ib, n0, n1, sp);
}
template <typename In> size_t scratch_avx2() {
    using Acc = typename AccOf<In>::type;
    return Kernel<In, Acc, typename Vecs<Acc>::V32, 6, 2>::scratch_bytes();
}
template <typename In>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"), flatten)) void item_avx512(
    const ConvProblem& pb, Scratch& s, i64 g, i64 ob, i64 ib, i64 n0, i64 n1, i64 sp) {
    using Acc = typename AccOf<In>::type;
    Kernel<In, Acc, typename Vecs<Acc>::V64, 12, 2>::item(pb, s, g, ob, ib, n0, n1, sp);
}
template <typename In> size_t scratch_avx512() {
    using Acc = typename AccOf<In>::type;
    return Kernel<In, Acc, typename Vecs<Acc>::V64, 12, 2>::scratch_bytes();
}
#endif

template <typename In>
void pick(int isa, ItemFn& fn, size_t& scratch) {
#ifdef EWCF_X86_MULTI
    if (isa == 2) { fn = &item_avx512<In>; scratch = scratch_avx512<In>(); return; }
    if (isa == 1) { fn = &item_avx2<In>; scratch = scratch_avx2<In>(); return; }
#endif
    (void)isa;
    fn = &item_generic<In>;
    scratch = scratch_generic<In>();
}

template <typename Acc>
void reduce_slabs(const ConvProblem& pb, int nthreads) {
    const int nout = int(pb.do_sq) + int(pb.do_abs);
    const i64 P = pb.O * pb.J;
    const Acc* slabs = static_cast<const Acc*>(pb.slabs);
    for (int which = 0; which < 2; ++which) {
        if ((which == 0 && !pb.do_sq) || (which == 1 && !pb.do_abs)) continue;
        const int slot = (which == 1 && pb.do_sq) ? 1 : 0;
        void* out = which == 0 ? pb.sq : pb.ab;
        const bool f64 = (which == 0 ? pb.sq_code : pb.ab_code) == F64;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 e = 0; e < P; ++e) {
            Acc s = 0;
            for (i64 sp = 0; sp < pb.splits; ++sp) s += slabs[(sp * nout + slot) * P + e];
            if (f64) static_cast<double*>(out)[e] += double(s);
            else static_cast<float*>(out)[e] = float(Acc(static_cast<float*>(out)[e]) + s);
        }
    }
}

void run(ConvProblem& pb, int in_code, int nthreads) {
    if (pb.N <= 0 || pb.Lp <= 0 || pb.Og <= 0 || pb.J <= 0 || pb.groups <= 0) return;
    nthreads = std::max(1, nthreads);
    const int isa = chosen_isa();
    ItemFn fn = nullptr;
    size_t scratch = 0;
    switch (in_code) {
        case F32: pick<float>(isa, fn, scratch); break;
        case F64: pick<double>(isa, fn, scratch); break;
        case BF16: pick<bf16>(isa, fn, scratch); break;
        case F16: pick<f16>(isa, fn, scratch); break;
        default: throw std::invalid_argument("persample_conv_sq: unsupported input dtype code");
    }
    const bool acc64 = in_code == F64;
    const i64 BO = EWCF_PSC_BO, BI = EWCF_PSC_BI;
    const i64 nob = (pb.Og + BO - 1) / BO, nib = (pb.J + BI - 1) / BI, per_group = nob * nib;
    const i64 tiles = pb.groups * per_group;
    const i64 want = 4 * i64(nthreads);
    pb.splits = (nthreads == 1 || tiles >= want) ? 1 : std::min(pb.N, (want + tiles - 1) / tiles);
    void* slabs = nullptr;
    if (pb.splits > 1) {
        const size_t bytes = size_t(pb.splits) * size_t(int(pb.do_sq) + int(pb.do_abs)) * size_t(pb.O * pb.J) *
                             (acc64 ? sizeof(double) : sizeof(float));
        slabs = std::malloc(bytes);
        if (!slabs) throw std::bad_alloc();
    }
    pb.slabs = slabs;
    const i64 items = tiles * pb.splits;
    bool failed = false;
#pragma omp parallel num_threads(nthreads)
    {
        Scratch s;
        try {
            s.get(scratch);
        } catch (...) {
#pragma omp atomic write
            failed = true;
        }
#pragma omp for schedule(dynamic, 1)
        for (i64 w = 0; w < items; ++w) {
            bool stop;
#pragma omp atomic read
            stop = failed;
            if (stop) continue;
            const i64 sp = w / tiles, tile = w % tiles;
            const i64 g = tile / per_group, rest = tile % per_group;
            const i64 ob = rest / nib, ib = rest % nib;
            const i64 n0 = pb.N * sp / pb.splits, n1 = pb.N * (sp + 1) / pb.splits;
            fn(pb, s, g, ob, ib, n0, n1, sp);
        }
    }
    if (!failed && pb.splits > 1) {
        if (acc64) reduce_slabs<double>(pb, nthreads);
        else reduce_slabs<float>(pb, nthreads);
    }
    std::free(slabs);
    if (failed) throw std::bad_alloc();
}

}  // namespace persample_conv_detail

void init_persample_conv(py::module_& m) {
    using V = std::vector<int64_t>;
    m.def(
        "persample_conv_sq",
        [](uintptr_t sq, int sq_code, uintptr_t ab, int ab_code, uintptr_t X, uintptr_t G, int in_code, int64_t N,
           int64_t groups, int64_t Cg, int64_t Og, const V& S, const V& L, const V& K, const V& stride, const V& pad,
           const V& dil, const V& sX, const V& sG, int nthreads) {
            for (const V* v : {&S, &L, &K, &stride, &pad, &dil})
                if (v->size() != 3) throw std::invalid_argument("persample_conv_sq: spatial lists must have 3 entries");
            if (sX.size() != 5 || sG.size() != 5)
                throw std::invalid_argument("persample_conv_sq: stride lists must have 5 entries (n, c, s0, s1, s2)");
            persample_conv_detail::ConvProblem pb{};
            pb.X = reinterpret_cast<const void*>(X);
            pb.G = reinterpret_cast<const void*>(G);
            pb.N = N; pb.groups = groups; pb.Cg = Cg; pb.Og = Og; pb.O = groups * Og;
            pb.Lp = 1; pb.Kp = 1;
            for (int d = 0; d < 3; ++d) {
                pb.S[d] = S[d]; pb.L[d] = L[d]; pb.K[d] = K[d];
                pb.st[d] = stride[d]; pb.pd[d] = pad[d]; pb.dl[d] = dil[d];
                pb.sX[d] = sX[2 + d]; pb.sG[d] = sG[2 + d];
                pb.Lp *= L[d]; pb.Kp *= K[d];
                if (stride[d] < 1 || dil[d] < 1 || pad[d] < 0 || K[d] < 1)
                    throw std::invalid_argument("persample_conv_sq: stride, dilation, kernel >= 1 and padding >= 0");
            }
            pb.sXn = sX[0]; pb.sXc = sX[1]; pb.sGn = sG[0]; pb.sGo = sG[1];
            pb.J = Cg * pb.Kp;
            pb.sq = reinterpret_cast<void*>(sq);
            pb.ab = reinterpret_cast<void*>(ab);
            pb.do_sq = sq != 0;
            pb.do_abs = ab != 0;
            pb.sq_code = sq_code;
            pb.ab_code = ab_code;
            if (!pb.do_sq && !pb.do_abs) throw std::invalid_argument("persample_conv_sq: no output given");
            if ((pb.do_sq && sq_code != F32 && sq_code != F64) || (pb.do_abs && ab_code != F32 && ab_code != F64))
                throw std::invalid_argument("persample_conv_sq: outputs must be float32 or float64");
            py::gil_scoped_release nogil;
            persample_conv_detail::run(pb, in_code, nthreads);
        },
        "sq += sum_n dW_n^2 and ab += sum_n |dW_n| of a convolution (raw pointers; 0 = output absent).\n"
        "Args: sq, sq_code, ab, ab_code, X, G, in_code, N, groups, Cg, Og, then 3-entry lists S (input extent),\n"
        "L (output extent), K (kernel), stride, padding (leading zero padding), dilation, then 5-entry element\n"
        "stride lists of X (n, c, s0, s1, s2) and G (n, o, l0, l1, l2), nthreads. Outputs contiguous (O, Cg*K).",
        py::arg("sq"), py::arg("sq_code"), py::arg("ab"), py::arg("ab_code"), py::arg("X"), py::arg("G"),
        py::arg("in_code"), py::arg("N"), py::arg("groups"), py::arg("Cg"), py::arg("Og"), py::arg("S"), py::arg("L"),
        py::arg("K"), py::arg("stride"), py::arg("pad"), py::arg("dil"), py::arg("sX"), py::arg("sG"),
        py::arg("nthreads"));
}

}  // namespace ewcf
