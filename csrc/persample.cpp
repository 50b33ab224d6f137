// persample_sq: sq_out += sum_n (G_n^T A_n)^2, abs_out += sum_n |G_n^T A_n| without forming N x O x I.
//
// G is (N, T, O), A is (N, T, I), any element strides, dtype fp32/fp64/bf16/fp16; outputs are
// contiguous (O, I) fp32 or fp64. Arithmetic in fp32 (fp64 for fp64 inputs).
//
// Design (a GEMM-shaped kernel, BLIS style):
//  * The (O, I) output is cut into macro tiles of BO x BI. A work item is (macro tile, sample split).
//    OpenMP distributes work items dynamically; items of different tiles write disjoint outputs, so
//    with one split no synchronisation is needed. When there are too few tiles for the threads,
//    samples are split and each split writes its own (O, I) slab, reduced in a fixed order at the
//    end (deterministic; only happens when O*I is small, so the slabs are small).
//  * T > 1 (fused): for every sample, the T x BO slice of G_n and the T x BI slice of A_n are packed
//    (converted to the accumulation type, zero padded) into MR- / NR-wide panels, KC rows of T at a
//    time. An MR x NR register micro-tile accumulates G_n^T A_n over T with FMAs; when the T loop
//    is done, tile^2 and |tile| are added to the work item's BO x BI accumulators. Per sample
//    nothing larger than a macro tile exists (a BO x BI spill buffer is used only when T > KC).
//  * T == 1: P_n is an outer product, so sum_n P_n^2 = (G^2)^T (A^2) and sum_n |P_n| = |G|^T |A|: the
//    same micro-kernel runs a plain GEMM whose K dimension is the samples (packing squares or takes
//    absolute values on the fly).
//  * The micro-kernel uses GCC/Clang vector extensions. It is compiled three times on x86-64
//    (AVX-512, AVX2+FMA, baseline SSE2) through `target` + `flatten` entry points and chosen at
//    run time, so the default build (no -march=native) still gets wide FMAs.
#include "persample.h"
#include "microkernel.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>


namespace ewcf {
namespace persample_detail {

using namespace mk;  // micro-kernel, loading, vector types, ISA choice (csrc/microkernel.h)


// Pack an nk x nf block (row stride sk, feature stride sf, in elements) into panels of R features:
// dst[(p*nk + k)*R + j] = xform(src[k*sk + (p*R + j)*sf]), zero where p*R + j >= nf.
template <int R, int XF, typename In, typename Acc>
inline void pack(Acc* __restrict dst, const In* src, i64 nk, i64 sk, i64 nf, i64 sf) {
    const i64 np = (nf + R - 1) / R;
    for (i64 k = 0; k < nk; ++k) {
        const In* row = src + k * sk;
        for (i64 p = 0; p < np; ++p) {
            Acc* d = dst + (p * nk + k) * R;
            const i64 f0 = p * R;
            if (f0 + R <= nf) {
                if (sf == 1) {
                    for (int j = 0; j < R; ++j) d[j] = xform<XF>(load_as<Acc>(row + f0 + j));
                } else {
                    for (int j = 0; j < R; ++j) d[j] = xform<XF>(load_as<Acc>(row + (f0 + j) * sf));
                }
            } else {
                for (int j = 0; j < R; ++j)
                    d[j] = (f0 + j < nf) ? xform<XF>(load_as<Acc>(row + (f0 + j) * sf)) : Acc(0);
            }
        }
    }
}

// Macro-tile sizes (compile-time knobs for tuning experiments). BO must be a multiple of 12, BI of 32.
#ifndef EWCF_PS_BO
#define EWCF_PS_BO 96
#endif
#ifndef EWCF_PS_BI
#define EWCF_PS_BI 128
#endif


// ------------------------------------------------------------------------------------ the problem
struct Problem {
    const void* G;
    const void* A;
    i64 N, T, O, I;
    i64 sGn, sGt, sGo, sAn, sAt, sAi;  // element strides
    bool do_sq, do_abs;
    void* sq;     // contiguous (O, I) output or nullptr
    int sq_code;  // F32 / F64
    void* ab;
    int ab_code;
    i64 splits;
    void* slabs;  // splits x (do_sq + do_abs) x O x I accumulators (Acc) when splits > 1
};

struct Blocking {
    i64 BO, BI, KC;
};


template <typename Acc>
inline void flush_tile(const Problem& pb, int which, i64 split, i64 o0, i64 i0, const Acc* loc, i64 ldc,
                       i64 rows, i64 cols) {
    if (pb.splits > 1) {
        const int nout = int(pb.do_sq) + int(pb.do_abs);
        const int slot = (which == 1 && pb.do_sq) ? 1 : 0;
        Acc* slab = static_cast<Acc*>(pb.slabs) + (split * nout + slot) * pb.O * pb.I;
        Acc* dst = slab + o0 * pb.I + i0;
        for (i64 r = 0; r < rows; ++r)
            for (i64 c = 0; c < cols; ++c) dst[r * pb.I + c] = loc[r * ldc + c];
        return;
    }
    void* out = which == 0 ? pb.sq : pb.ab;
    const int code = which == 0 ? pb.sq_code : pb.ab_code;
    if (code == F64)
        add_tile(static_cast<double*>(out) + o0 * pb.I + i0, pb.I, loc, ldc, rows, cols);
    else
        add_tile(static_cast<float*>(out) + o0 * pb.I + i0, pb.I, loc, ldc, rows, cols);
}

// One instruction-set flavour of the kernel: V is the vector type, MR x (NRV vectors) the register tile.
template <typename In, typename Acc, typename V, int MR, int NRV>
struct Kernel {
    static constexpr int W = int(sizeof(V) / sizeof(Acc));
    static constexpr int NR = NRV * W;
    static constexpr i64 BO = EWCF_PS_BO;  // multiple of MR (12 or 6)
    static constexpr i64 BI = EWCF_PS_BI;  // multiple of NR
    static constexpr i64 KC = sizeof(Acc) == 4 ? EWCF_PS_KC : EWCF_PS_KC / 2;  // rows of T (or samples) per block
    static_assert(BO % MR == 0 && BI % NR == 0, "macro tile must hold whole micro tiles");

    static size_t scratch_bytes() {
        // pg (KC x BO) + pa (KC x BI) + loc0 + loc1 + spill (BO x BI each)
        return sizeof(Acc) * size_t(KC * BO + KC * BI + 3 * BO * BI) + 64 * 5;
    }

    template <int EPI>
    static void fused(const Problem& pb, Acc* pg, Acc* pa, Acc* l0, Acc* l1, Acc* pl, i64 o0, i64 bo, i64 i0,
                      i64 bi, i64 n0, i64 n1) {
        const In* G = static_cast<const In*>(pb.G);
        const In* A = static_cast<const In*>(pb.A);
        const i64 mo = (bo + MR - 1) / MR, ni = (bi + NR - 1) / NR, ldc = ni * NR;
        const i64 nkb = (pb.T + KC - 1) / KC;
        for (i64 n = n0; n < n1; ++n) {
            for (i64 kb = 0; kb < nkb; ++kb) {
                const i64 t0 = kb * KC, kc = std::min(KC, pb.T - t0);
                pack<MR, XF_ID>(pg, G + n * pb.sGn + t0 * pb.sGt + o0 * pb.sGo, kc, pb.sGt, bo, pb.sGo);
                pack<NR, XF_ID>(pa, A + n * pb.sAn + t0 * pb.sAt + i0 * pb.sAi, kc, pb.sAt, bi, pb.sAi);
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

    template <int XF>
    static void gemm(const Problem& pb, Acc* pg, Acc* pa, Acc* loc, i64 o0, i64 bo, i64 i0, i64 bi, i64 n0,
                     i64 n1) {
        const In* G = static_cast<const In*>(pb.G);
        const In* A = static_cast<const In*>(pb.A);
        const i64 mo = (bo + MR - 1) / MR, ni = (bi + NR - 1) / NR, ldc = ni * NR;
        for (i64 k0 = n0; k0 < n1; k0 += KC) {
            const i64 kc = std::min(KC, n1 - k0);
            pack<MR, XF>(pg, G + k0 * pb.sGn + o0 * pb.sGo, kc, pb.sGn, bo, pb.sGo);
            pack<NR, XF>(pa, A + k0 * pb.sAn + i0 * pb.sAi, kc, pb.sAn, bi, pb.sAi);
            for (i64 c = 0; c < ni; ++c)
                for (i64 r = 0; r < mo; ++r) {
                    const i64 off = r * MR * ldc + c * NR;
                    micro<V, Acc, MR, NRV, EPI_ADD>(kc, pg + r * kc * MR, pa + c * kc * NR, loc + off, loc + off,
                                                    loc + off, ldc, true, true);
                }
        }
    }

    // One work item: macro tile (ob, ib), samples [n0, n1), sample split `split`.
    static void item(const Problem& pb, Scratch& scratch, i64 ob, i64 ib, i64 n0, i64 n1, i64 split) {
        char* base = static_cast<char*>(scratch.get(scratch_bytes()));
        auto carve = [&base](i64 count) {
            Acc* p = reinterpret_cast<Acc*>(base);
            base += (sizeof(Acc) * size_t(count) + 63) / 64 * 64;
            return p;
        };
        Acc* pg = carve(KC * BO);
        Acc* pa = carve(KC * BI);
        Acc* l0 = carve(BO * BI);
        Acc* l1 = carve(BO * BI);
        Acc* pl = carve(BO * BI);
        const i64 o0 = ob * BO, bo = std::min(BO, pb.O - o0);
        const i64 i0 = ib * BI, bi = std::min(BI, pb.I - i0);
        const i64 ldc = (bi + NR - 1) / NR * NR, rows = (bo + MR - 1) / MR * MR;
        std::fill(l0, l0 + rows * ldc, Acc(0));
        std::fill(l1, l1 + rows * ldc, Acc(0));
        if (pb.T == 1) {
            if (pb.do_sq) gemm<XF_SQ>(pb, pg, pa, l0, o0, bo, i0, bi, n0, n1);
            if (pb.do_abs) gemm<XF_ABS>(pb, pg, pa, l1, o0, bo, i0, bi, n0, n1);
        } else if (pb.do_sq && pb.do_abs) {
            fused<EPI_SQABS>(pb, pg, pa, l0, l1, pl, o0, bo, i0, bi, n0, n1);
        } else if (pb.do_sq) {
            fused<EPI_SQ>(pb, pg, pa, l0, l1, pl, o0, bo, i0, bi, n0, n1);
        } else {
            fused<EPI_ABS>(pb, pg, pa, l0, l1, pl, o0, bo, i0, bi, n0, n1);
        }
        if (pb.do_sq) flush_tile<Acc>(pb, 0, split, o0, i0, l0, ldc, bo, bi);
        if (pb.do_abs) flush_tile<Acc>(pb, 1, split, o0, i0, l1, ldc, bo, bi);
    }
};

using ItemFn = void (*)(const Problem&, Scratch&, i64, i64, i64, i64, i64);


template <typename In>
__attribute__((flatten)) void item_generic(const Problem& pb, Scratch& s, i64 ob, i64 ib, i64 n0, i64 n1, i64 sp) {
    using Acc = typename AccOf<In>::type;
    Kernel<In, Acc, typename Vecs<Acc>::V16, 6, 2>::item(pb, s, ob, ib, n0, n1, sp);
}
template <typename In> size_t scratch_generic() {
    using Acc = typename AccOf<In>::type;
    return Kernel<In, Acc, typename Vecs<Acc>::V16, 6, 2>::scratch_bytes();
}

#ifdef EWCF_X86_MULTI
template <typename In>
__attribute__((target("avx2,fma,f16c"), flatten)) void item_avx2(const Problem& pb, Scratch& s, i64 ob, i64 ib,
                                                                 i64 n0, i64 n1, i64 sp) {
    using Acc = typename AccOf<In>::type;
    Kernel<In, Acc, typename Vecs<Acc>::V32, 6, 2>::item(pb, s, ob, ib, n0, n1, sp);
}
template <typename In> size_t scratch_avx2() {
    using Acc = typename AccOf<In>::type;
    return Kernel<In, Acc, typename Vecs<Acc>::V32, 6, 2>::scratch_bytes();
}
template <typename In>
__attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"), flatten)) void item_avx512(
    const Problem& pb, Scratch& s, i64 ob, i64 ib, i64 n0, i64 n1, i64 sp) {
    using Acc = typename AccOf<In>::type;
    Kernel<In, Acc, typename Vecs<Acc>::V64, 12, 2>::item(pb, s, ob, ib, n0, n1, sp);
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

constexpr i64 kBO = EWCF_PS_BO, kBI = EWCF_PS_BI;

void run(Problem& pb, int in_code, int nthreads) {
    if (pb.N <= 0 || pb.T <= 0 || pb.O <= 0 || pb.I <= 0) return;
    nthreads = std::max(1, nthreads);
    const int isa = chosen_isa();
    ItemFn fn = nullptr;
    size_t scratch = 0;
    switch (in_code) {
        case F32: pick<float>(isa, fn, scratch); break;
        case F64: pick<double>(isa, fn, scratch); break;
        case BF16: pick<bf16>(isa, fn, scratch); break;
        case F16: pick<f16>(isa, fn, scratch); break;
        default: throw std::invalid_argument("persample_sq: unsupported input dtype code");
    }
    const bool acc64 = in_code == F64;
    const i64 nob = (pb.O + kBO - 1) / kBO, nib = (pb.I + kBI - 1) / kBI, tiles = nob * nib;
    pb.splits = sample_splits(pb.N, tiles, nthreads);
    Slabs slabs(pb.splits, int(pb.do_sq) + int(pb.do_abs), pb.O * pb.I, acc64 ? sizeof(double) : sizeof(float));
    pb.slabs = slabs.mem;
    run_items(tiles * pb.splits, scratch, nthreads, [&](Scratch& s, i64 w) {
        const i64 sp = w / tiles, tile = w % tiles;
        fn(pb, s, tile / nib, tile % nib, pb.N * sp / pb.splits, pb.N * (sp + 1) / pb.splits, sp);
    });
    if (pb.splits > 1) {
        void* sq = pb.do_sq ? pb.sq : nullptr;
        void* ab = pb.do_abs ? pb.ab : nullptr;
        if (acc64) reduce_slabs<double>(pb.slabs, pb.splits, pb.O * pb.I, sq, pb.sq_code, ab, pb.ab_code, nthreads);
        else reduce_slabs<float>(pb.slabs, pb.splits, pb.O * pb.I, sq, pb.sq_code, ab, pb.ab_code, nthreads);
    }
}

}  // namespace persample_detail

void init_persample(py::module_& m) {
    m.def(
        "persample_sq",
        [](uintptr_t sq, int sq_code, uintptr_t ab, int ab_code, uintptr_t G, uintptr_t A, int in_code, int64_t N,
           int64_t T, int64_t O, int64_t I, int64_t sGn, int64_t sGt, int64_t sGo, int64_t sAn, int64_t sAt,
           int64_t sAi, int nthreads) {
            persample_detail::Problem pb{};
            pb.G = reinterpret_cast<const void*>(G);
            pb.A = reinterpret_cast<const void*>(A);
            pb.N = N; pb.T = T; pb.O = O; pb.I = I;
            pb.sGn = sGn; pb.sGt = sGt; pb.sGo = sGo;
            pb.sAn = sAn; pb.sAt = sAt; pb.sAi = sAi;
            pb.sq = reinterpret_cast<void*>(sq);
            pb.ab = reinterpret_cast<void*>(ab);
            pb.do_sq = sq != 0;
            pb.do_abs = ab != 0;
            pb.sq_code = sq_code;
            pb.ab_code = ab_code;
            if (!pb.do_sq && !pb.do_abs) throw std::invalid_argument("persample_sq: no output given");
            if ((pb.do_sq && sq_code != F32 && sq_code != F64) || (pb.do_abs && ab_code != F32 && ab_code != F64))
                throw std::invalid_argument("persample_sq: outputs must be float32 or float64");
            py::gil_scoped_release nogil;
            persample_detail::run(pb, in_code, nthreads);
        },
        "sq += sum_n (G_n^T A_n)^2 and ab += sum_n |G_n^T A_n| (raw pointers; 0 = output absent).\n"
        "Args: sq, sq_code, ab, ab_code, G, A, in_code, N, T, O, I, G strides (n, t, o), A strides (n, t, i) in\n"
        "elements, nthreads. Outputs contiguous (O, I); accumulation in fp32 (fp64 for fp64 inputs).",
        py::arg("sq"), py::arg("sq_code"), py::arg("ab"), py::arg("ab_code"), py::arg("G"), py::arg("A"),
        py::arg("in_code"), py::arg("N"), py::arg("T"), py::arg("O"), py::arg("I"), py::arg("sGn"), py::arg("sGt"),
        py::arg("sGo"), py::arg("sAn"), py::arg("sAt"), py::arg("sAi"), py::arg("nthreads"));
    m.def("persample_isa", &persample_detail::chosen_isa,
          "instruction set used by persample_sq: 0 generic, 1 AVX2+FMA, 2 AVX-512");
}

}  // namespace ewcf
