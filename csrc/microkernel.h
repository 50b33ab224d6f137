// Building blocks shared by the GEMM-shaped per-sample kernels (csrc/persample.cpp for Linear layers,
// csrc/persample_conv.cpp for convolutions): element loading in the accumulation type, the MR x NR
// register micro-kernel (GCC vector extensions) with its square / |.| epilogues, per-thread scratch,
// tile flushing and the vector types; the run-time instruction-set choice (AVX-512 / AVX2+FMA / SSE2) is
// csrc/isa.h.
// Everything here is inline and only expanded inside the target-specific `flatten` entry points of
// the including .cpp, so each family compiles it once per instruction set.
#pragma once
#include "common.h"
#include "isa.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>

// The vector types below appear in (always inlined) helpers compiled for the baseline target; they are
// only ever expanded inside the target-specific `flatten` entry points, so no vector crosses an ABI.
#pragma GCC diagnostic ignored "-Wpsabi"

#ifndef EWCF_PS_KC
#define EWCF_PS_KC 128
#endif

namespace ewcf {
namespace mk {

using i64 = int64_t;

// ------------------------------------------------------------------------------- element loading
// bf16 / f16 storage types and bf16_to_f32 come from common.h. The half decoder below is a second,
// multiply-based form of common.h's f16_to_f32 (the two agree bit for bit on all 65536 patterns; both
// are tested against torch's cast): the packing loops were tuned with this one.
//
// IEEE half -> float, exact for normals, subnormals, inf and nan. Placing the 15 exponent+mantissa
// bits at the float's exponent position and multiplying by 2^112 rebiases the exponent (15 -> 127);
// half subnormals land on float subnormals and the multiplication is exact.
// Branch-free so that the packing loops vectorise.
inline float f16_to_f32_scaled(uint16_t h) {
    const uint32_t em = uint32_t(h & 0x7fffu);
    const float mag = f32_from_bits(em << 13) * 0x1p112f;
    const uint32_t special = (em << 13) | 0x7f800000u;  // inf / nan (payload kept)
    const uint32_t u = em >= 0x7c00u ? special : f32_bits(mag);
    return f32_from_bits(u | (uint32_t(h & 0x8000u) << 16));
}

template <typename Acc> inline Acc load_as(const float* p) { return Acc(*p); }
template <typename Acc> inline Acc load_as(const double* p) { return Acc(*p); }
template <typename Acc> inline Acc load_as(const bf16* p) { return Acc(bf16_to_f32(p->x)); }
template <typename Acc> inline Acc load_as(const f16* p) { return Acc(f16_to_f32_scaled(p->x)); }

enum Xform : int { XF_ID = 0, XF_SQ = 1, XF_ABS = 2 };

template <int XF, typename Acc> inline Acc xform(Acc v) {
    if (XF == XF_SQ) return v * v;
    if (XF == XF_ABS) return std::fabs(v);
    return v;
}

// ----------------------------------------------------------------------------------- micro-kernel
enum Epilogue : int { EPI_ADD = 0, EPI_SQABS = 1, EPI_SQ = 2, EPI_ABS = 3 };

template <typename V> struct VecInfo;

template <typename V> inline V vabs(V x) {
    // clear the sign bits (keeps nan as nan)
    using IV = typename VecInfo<V>::IV;
    return (V)((IV)x & VecInfo<V>::abs_mask());
}

// Epilogue of a finished register tile: c0 += acc (EPI_ADD) or acc^2 (EPI_SQ / EPI_SQABS), c1 += |acc|
// (EPI_ABS / EPI_SQABS); row stride ldc (elements).
template <typename V, typename Acc, int MR, int NRV, int EPI>
inline void epilogue(const V (&acc)[MR][NRV], Acc* c0, Acc* c1, i64 ldc) {
    constexpr int W = int(sizeof(V) / sizeof(Acc));
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
        for (int v = 0; v < NRV; ++v) {
            const V x = acc[m][v];
            Acc* p0 = c0 + m * ldc + v * W;
            Acc* p1 = c1 + m * ldc + v * W;
            V a0, a1;
            if (EPI != EPI_ABS) std::memcpy(&a0, p0, sizeof(V));
            if (EPI == EPI_SQABS || EPI == EPI_ABS) std::memcpy(&a1, p1, sizeof(V));
            if (EPI == EPI_ADD) a0 += x;
            if (EPI == EPI_SQABS || EPI == EPI_SQ) a0 += x * x;
            if (EPI == EPI_SQABS || EPI == EPI_ABS) a1 += vabs(x);
            if (EPI != EPI_ABS) std::memcpy(p0, &a0, sizeof(V));
            if (EPI == EPI_SQABS || EPI == EPI_ABS) std::memcpy(p1, &a1, sizeof(V));
        }
    }
}

// acc(MR x NR) = sum_k pg[k, 0:MR]^T pa[k, 0:NR]; pg/pa are packed panels (MR resp. NR per k).
// first: start from zero, else from the spill tile `pl`. last: apply the epilogue to c0/c1
// (row stride ldc), else store to `pl`. All pointers are 64-byte aligned, ldc a multiple of NR.
template <typename V, typename Acc, int MR, int NRV, int EPI>
inline void micro(i64 kc, const Acc* __restrict pg, const Acc* __restrict pa, Acc* c0, Acc* c1, Acc* pl, i64 ldc,
                  bool first, bool last) {
    constexpr int W = int(sizeof(V) / sizeof(Acc));
    constexpr int NR = NRV * W;
    V acc[MR][NRV];
    if (first) {
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
            for (int v = 0; v < NRV; ++v) acc[m][v] = V{};
    } else {
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
            for (int v = 0; v < NRV; ++v) acc[m][v] = *reinterpret_cast<const V*>(pl + m * ldc + v * W);
    }
    for (i64 k = 0; k < kc; ++k) {
        V b[NRV];
#pragma GCC unroll 4
        for (int v = 0; v < NRV; ++v) b[v] = *reinterpret_cast<const V*>(pa + k * NR + v * W);
        const Acc* g = pg + k * MR;
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m) {
            const Acc gm = g[m];
#pragma GCC unroll 4
            for (int v = 0; v < NRV; ++v) acc[m][v] += gm * b[v];
        }
    }
    if (!last) {
#pragma GCC unroll 16
        for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
            for (int v = 0; v < NRV; ++v) *reinterpret_cast<V*>(pl + m * ldc + v * W) = acc[m][v];
        return;
    }
    epilogue<V, Acc, MR, NRV, EPI>(acc, c0, c1, ldc);
}

// A run of reduction steps read in place (no packing): k = 0 .. len-1 takes MR broadcasts at g + k*sg
// and NR consecutive values at x + k*sx, both element offsets from the bases handed to micro_runs.
struct StridedRun {
    i64 g, x, len;
};

// acc(MR x NR) = sum over the runs r, k < r.len of gb[r.g + k*sg + 0:MR]^T xb[r.x + k*sx + 0:NR], then the
// epilogue into c0 / c1 (row stride ldc). Operands are read where they lie (unaligned vector loads of
// the NR consecutive x values, scalar broadcasts of the MR consecutive g values): the implicit-GEMM form
// of a weight gradient on channels-last tensors, where a position's channels are contiguous.
template <typename V, typename Acc, int MR, int NRV, int EPI>
inline void micro_runs(const StridedRun* rs, i64 nr, const Acc* gb, i64 sg, const Acc* xb, i64 sx, Acc* c0, Acc* c1,
                       i64 ldc) {
    constexpr int W = int(sizeof(V) / sizeof(Acc));
    V acc[MR][NRV];
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
        for (int v = 0; v < NRV; ++v) acc[m][v] = V{};
    for (i64 q = 0; q < nr; ++q) {
        const Acc* __restrict gp = gb + rs[q].g;
        const Acc* __restrict xp = xb + rs[q].x;
        for (i64 k = rs[q].len; k > 0; --k, gp += sg, xp += sx) {
            V b[NRV];
#pragma GCC unroll 4
            for (int v = 0; v < NRV; ++v) std::memcpy(&b[v], xp + v * W, sizeof(V));
#pragma GCC unroll 16
            for (int m = 0; m < MR; ++m) {
                const Acc gm = gp[m];
#pragma GCC unroll 4
                for (int v = 0; v < NRV; ++v) acc[m][v] += gm * b[v];
            }
        }
    }
    epilogue<V, Acc, MR, NRV, EPI>(acc, c0, c1, ldc);
}

// Per-thread scratch, 64-byte aligned.
struct Scratch {
    void* mem = nullptr;
    ~Scratch() { std::free(mem); }
    void* get(size_t bytes) {
        if (!mem) {
            bytes = (bytes + 63) / 64 * 64;
            mem = std::aligned_alloc(64, bytes);
            if (!mem) throw std::bad_alloc();
        }
        return mem;
    }
};

// ------------------------------------------------------------------ work items over OpenMP threads
// The per-sample kernels cut their outputs into tiles; a work item is (tile, sample split). With fewer
// tiles than 4 per thread the samples are split, each split writing its own slab of the outputs,
// reduced in a fixed order afterwards (deterministic for a given thread count).
inline i64 sample_splits(i64 n, i64 tiles, int nthreads) {
    const i64 want = 4 * i64(nthreads);
    return (nthreads == 1 || tiles >= want) ? 1 : std::min(n, (want + tiles - 1) / tiles);
}

// splits x (outputs present) x P accumulators, or none for one split; freed with the object.
struct Slabs {
    void* mem = nullptr;
    Slabs(i64 splits, int nout, i64 P, size_t acc_bytes) {
        if (splits > 1) {
            mem = std::malloc(size_t(splits) * size_t(nout) * size_t(P) * acc_bytes);
            if (!mem) throw std::bad_alloc();
        }
    }
    Slabs(const Slabs&) = delete;
    Slabs& operator=(const Slabs&) = delete;
    ~Slabs() { std::free(mem); }
};

// sq[e] += sum_sp slab(sp, sq)[e], ab[e] += sum_sp slab(sp, ab)[e] (split order, then one rounding into
// the fp32 / fp64 output); a null output is absent and has no slab.
template <typename Acc>
void reduce_slabs(const void* slabs_mem, i64 splits, i64 P, void* sq, int sq_code, void* ab, int ab_code,
                  int nthreads) {
    const int nout = int(sq != nullptr) + int(ab != nullptr);
    const Acc* slabs = static_cast<const Acc*>(slabs_mem);
    for (int which = 0; which < 2; ++which) {
        void* out = which == 0 ? sq : ab;
        if (!out) continue;
        const int slot = (which == 1 && sq) ? 1 : 0;
        const bool f64 = (which == 0 ? sq_code : ab_code) == F64;
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (i64 e = 0; e < P; ++e) {
            Acc s = 0;
            for (i64 sp = 0; sp < splits; ++sp) s += slabs[(sp * nout + slot) * P + e];
            if (f64) static_cast<double*>(out)[e] += double(s);
            else static_cast<float*>(out)[e] = float(Acc(static_cast<float*>(out)[e]) + s);
        }
    }
}

// body(scratch, w) for every work item w < items, scheduled dynamically over `nthreads` OpenMP threads,
// each with its own Scratch of `bytes`. Every thread allocates before any item runs: if one cannot, no
// item runs (outputs untouched) and std::bad_alloc is thrown.
template <typename Body>
void run_items(i64 items, size_t bytes, int nthreads, const Body& body) {
    bool failed = false;
#pragma omp parallel num_threads(nthreads)
    {
        Scratch s;
        try {
            s.get(bytes);
        } catch (...) {
#pragma omp atomic write
            failed = true;
        }
#pragma omp barrier
        bool stop;
#pragma omp atomic read
        stop = failed;
        if (!stop) {
#pragma omp for schedule(dynamic, 1)
            for (i64 w = 0; w < items; ++w) body(s, w);
        }
    }
    if (failed) throw std::bad_alloc();
}

template <typename Acc, typename Out>
inline void add_tile(Out* out, i64 ld_out, const Acc* loc, i64 ldc, i64 rows, i64 cols) {
    using Wide = decltype(Out() + Acc());  // fp64 outputs or fp64 accumulators add in fp64
    for (i64 r = 0; r < rows; ++r) {
        Out* o = out + r * ld_out;
        const Acc* s = loc + r * ldc;
        for (i64 c = 0; c < cols; ++c) o[c] = Out(Wide(o[c]) + Wide(s[c]));
    }
}

template <typename T> struct AccOf { using type = float; };
template <> struct AccOf<double> { using type = double; };

// vector types (64, 32 and 16 bytes) and their integer twins for |x|
#define EWCF_VEC(NAME, ELEM, IELEM, BYTES, MASK)                                       \
    typedef ELEM NAME __attribute__((vector_size(BYTES)));                             \
    typedef IELEM NAME##_i __attribute__((vector_size(BYTES)));                        \
    template <> struct VecInfo<NAME> {                                                 \
        using IV = NAME##_i;                                                           \
        static inline IV abs_mask() { return IV{} + IELEM(MASK); }                     \
    };
EWCF_VEC(vf64b, float, int32_t, 64, 0x7fffffff)
EWCF_VEC(vd64b, double, int64_t, 64, 0x7fffffffffffffffLL)
EWCF_VEC(vf32b, float, int32_t, 32, 0x7fffffff)
EWCF_VEC(vd32b, double, int64_t, 32, 0x7fffffffffffffffLL)
EWCF_VEC(vf16b, float, int32_t, 16, 0x7fffffff)
EWCF_VEC(vd16b, double, int64_t, 16, 0x7fffffffffffffffLL)
#undef EWCF_VEC

template <typename Acc> struct Vecs;
template <> struct Vecs<float> { using V64 = vf64b; using V32 = vf32b; using V16 = vf16b; };
template <> struct Vecs<double> { using V64 = vd64b; using V32 = vd32b; using V16 = vd16b; };

}  // namespace mk
}  // namespace ewcf
