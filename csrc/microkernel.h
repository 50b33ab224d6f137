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
#pragma GCC unroll 16
    for (int m = 0; m < MR; ++m) {
#pragma GCC unroll 4
        for (int v = 0; v < NRV; ++v) {
            const V x = acc[m][v];
            V* p0 = reinterpret_cast<V*>(c0 + m * ldc + v * W);
            V* p1 = reinterpret_cast<V*>(c1 + m * ldc + v * W);
            if (EPI == EPI_ADD) *p0 += x;
            if (EPI == EPI_SQABS || EPI == EPI_SQ) *p0 += x * x;
            if (EPI == EPI_SQABS || EPI == EPI_ABS) *p1 += vabs(x);
        }
    }
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
