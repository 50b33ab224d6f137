// Run-time instruction-set choice shared by the C++ kernels (per-sample GEMMs, fused optimizer step,
// EWC penalty): the hot loops are compiled once per instruction set through `target` + `flatten`
// entry points (EWCF_TARGET_AVX2 / EWCF_TARGET_AVX512 below) and one of them is chosen per process
// from the CPU's features, capped by EWC_FAST_CPP_ISA. No -march=native: one build serves every x86-64.
#pragma once

#include <algorithm>
#include <cstdlib>
#include <string>

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__)) && !defined(__clang__)
#define EWCF_X86_MULTI 1
// `flatten` inlines the whole kernel into the target-specific function, so it is compiled (and
// vectorised) for that target; `noinline` keeps it a separate function (restrict-qualified
// arguments, one call per chunk).
#define EWCF_TARGET_AVX2 __attribute__((target("avx2,fma,f16c"), flatten, noinline))
#define EWCF_TARGET_AVX512 \
    __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"), flatten, noinline))
#endif

namespace ewcf {
namespace mk {

// 0 = generic, 1 = AVX2+FMA, 2 = AVX-512. EWC_FAST_CPP_ISA=generic|avx2|avx512 caps it (tests, benchmarks).
inline int detect_isa() {
    int isa = 0;
#ifdef EWCF_X86_MULTI
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) isa = 1;
    if (isa == 1 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512dq"))
        isa = 2;
#endif
    return isa;
}

inline int chosen_isa() {
    static const int isa = [] {
        int best = detect_isa();
        if (const char* env = std::getenv("EWC_FAST_CPP_ISA")) {
            const std::string v(env);
            int cap = v == "generic" ? 0 : v == "avx2" ? 1 : 2;
            best = std::min(best, cap);
        }
        return best;
    }();
    return isa;
}

}  // namespace mk
}  // namespace ewcf
