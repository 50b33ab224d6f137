// Helpers shared by the op families of ewc_fast._C (consolidation.cpp, persample.cpp) and module.cpp:
// pybind11 includes, dtype codes, bf16/fp16 storage types and value conversions, the OpenMP shim.
// Family-specific code lives in <family>.cpp, declared by <family>.h.
#pragma once
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace ewcf {

// dtype codes shared with ewc_fast/ops/_cpp_ext.py (DTYPE_CODES)
enum DType : int { F32 = 0, F64 = 1, BF16 = 2, F16 = 3 };

inline int openmp_max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// ------------------------------------------------------------------------------------------------
// Storage types and scalar conversions. bf16 / fp16 are stored as raw 16-bit patterns; the
// conversions below are written with selects only (no branches) so that gcc -O3 vectorises loops
// that call them. float -> bf16 / fp16 rounds to nearest, ties to even, like c10::BFloat16 / Half.
struct bf16 { uint16_t x; };
struct f16 { uint16_t x; };

inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, sizeof f); return f; }
inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, sizeof u); return u; }

inline float bf16_to_f32(uint16_t h) { return f32_from_bits(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = f32_bits(f);
    // add 0x7FFF plus the lowest kept bit: rounds half-way cases to the even neighbour; overflow
    // carries into the exponent and gives inf as it should
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return uint16_t(nan ? 0x7FC0u : rounded);  // canonical quiet NaN, as c10 does
}

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = uint32_t(h & 0x8000u) << 16;
    const uint32_t body = uint32_t(h & 0x7FFFu) << 13;  // exponent + mantissa at float positions
    const uint32_t exp = body & 0x0F800000u;             // half exponent field, shifted
    const uint32_t normal = body + 0x38000000u;          // rebias exponent by 127 - 15
    const uint32_t special = body + 0x70000000u;         // inf / NaN: exponent 31 -> 255
    // subnormal half m * 2^-24: build the normal float 2^-14 * (1 + m/1024), subtract 2^-14 (exact)
    const float sub = f32_from_bits(body + 0x38800000u) - f32_from_bits(0x38800000u);
    const uint32_t sub_bits = f32_bits(sub);
    uint32_t r = exp == 0x0F800000u ? special : normal;
    r = exp == 0u ? sub_bits : r;
    return f32_from_bits(r | sign);
}

inline uint16_t f32_to_f16(float f) {
    const uint32_t u = f32_bits(f);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    // normal range: rebias exponent (-(127-15) << 23, mod 2^32), round the 13 dropped bits to
    // nearest even; values in [65520, 65536) carry into the exponent and become inf as they should
    const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
    // below 2^-14 (half subnormals): adding 0.5f makes the FPU round to a multiple of 2^-24 (RNE)
    const uint32_t sub = f32_bits(f32_from_bits(a) + 0.5f) - 0x3F000000u;
    uint32_t r = a < 0x38800000u ? sub : normal;
    const uint32_t big = a > 0x7F800000u ? 0x7E00u : 0x7C00u;  // NaN stays (quiet) NaN, else inf
    r = a >= 0x47800000u ? big : r;
    return uint16_t(r | sign);
}

// Value conversions between the four storage types. Conversions from double to bf16 / fp16 go
// through float, exactly as c10::BFloat16(float) / c10::Half(float) do in torch's casts.
template <class T> inline float to_f32(T v);
template <> inline float to_f32<float>(float v) { return v; }
template <> inline float to_f32<double>(double v) { return float(v); }
template <> inline float to_f32<bf16>(bf16 v) { return bf16_to_f32(v.x); }
template <> inline float to_f32<f16>(f16 v) { return f16_to_f32(v.x); }

template <class T> inline double to_f64(T v) { return double(to_f32<T>(v)); }
template <> inline double to_f64<double>(double v) { return v; }

template <class T> inline T from_f32(float v);
template <> inline float from_f32<float>(float v) { return v; }
template <> inline double from_f32<double>(float v) { return double(v); }
template <> inline bf16 from_f32<bf16>(float v) { return bf16{f32_to_bf16(v)}; }
template <> inline f16 from_f32<f16>(float v) { return f16{f32_to_f16(v)}; }

template <class T> inline T from_f64(double v) { return from_f32<T>(float(v)); }
template <> inline double from_f64<double>(double v) { return v; }

// load as / store from an arithmetic type A (float or double)
template <class A, class T> inline A load_as(T v) {
    if constexpr (std::is_same_v<A, double>) return to_f64<T>(v); else return to_f32<T>(v);
}
template <class T, class A> inline T store_from(A v) {
    if constexpr (std::is_same_v<A, double>) return from_f64<T>(v); else return from_f32<T>(v);
}
// dtype cast of one value (torch's Tensor.to / copy_): raw copy when the types agree
template <class Dst, class Src> inline Dst cast_value(Src v) {
    if constexpr (std::is_same_v<Dst, Src>) return v; else return from_f64<Dst>(to_f64<Src>(v));
}

}  // namespace ewcf
