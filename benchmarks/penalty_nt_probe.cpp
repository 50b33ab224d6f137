// Probe: does the fused EWC penalty loop (csrc/consolidation.cpp, penalty_chunk) gain from
// non-temporal (streaming) stores of the gradient on large tensors?
//
// Standalone copy of the fp32-parameter / fp32-Omega / fp64-mu instance of penalty_chunk (the
// benchmark's dtypes), compiled for AVX-512 like the extension's run-time-dispatched build, in three
// variants timed interleaved on one thread:
//   * "cached":  the extension's loop (g[i] = g[i] + step, ordinary stores);
//   * "nt":      the same arithmetic and lane order, 512 results at a time into an L1 buffer, then
//                streamed to g with _mm512_stream_si512 (bit-identical g and sum, checked);
//   * "copy":    a plain fp32 copy (what the benchmark's same-run copy bandwidth measures).
// Build and run (1 thread, shared machine: run under nice):
//   g++ -O3 -std=c++17 -fno-trapping-math -ffp-contract=off -o /tmp/pnt benchmarks/penalty_nt_probe.cpp
//   nice -n 10 /tmp/pnt 10000000 7 && nice -n 10 /tmp/pnt 100000000 5
// Output: median ms per variant, GB/s on the bytes model (penalty 24 B/param, copy 8 B/param) and
// the penalty's percentage of the copy bandwidth. Outcome: benchmarks/ANALYSIS_CPU.md (issue 16).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define TGT __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"), flatten, noinline))

static inline float elem(float* __restrict__ dst, const float* __restrict__ g, const float* __restrict__ p,
                         const float* __restrict__ o, const double* __restrict__ mu, int64_t i, int64_t j,
                         float scale) {
    const float w = o[i];
    const double diff = double(p[i]) - mu[i];
    const float d = float(diff);
    const float wd = w * d;
    dst[j] = g[i] + scale * wd;
    return wd * d;
}

static inline float fold(float (&acc)[16]) {
    for (int w = 8; w > 0; w /= 2)
        for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
    return acc[0];
}

TGT float chunk_cached(float* __restrict__ g, const float* __restrict__ p, const float* __restrict__ o,
                       const double* __restrict__ mu, int64_t n, float scale) {
    float acc[16] = {};
    const int64_t nb = n - n % 16;
    for (int64_t b = 0; b < nb; b += 16) {
#pragma omp simd
        for (int l = 0; l < 16; ++l) acc[l] += elem(g, g, p, o, mu, b + l, b + l, scale);
    }
    float tail = 0.f;
    for (int64_t i = nb; i < n; ++i) tail += elem(g, g, p, o, mu, i, i, scale);
    return fold(acc) + tail;
}

// Same lane order; g written through an aligned L1 buffer and streamed (g 64-byte aligned, n % 512 == 0
// here: the probe's chunks are 8192 elements from an aligned base, like the extension's).
TGT float chunk_nt(float* __restrict__ g, const float* __restrict__ p, const float* __restrict__ o,
                   const double* __restrict__ mu, int64_t n, float scale) {
    constexpr int64_t B = 512;
    alignas(64) float buf[B];
    float acc[16] = {};
    for (int64_t blk = 0; blk < n; blk += B) {
        for (int64_t b = 0; b < B; b += 16) {
#pragma omp simd
            for (int l = 0; l < 16; ++l) acc[l] += elem(buf, g, p, o, mu, blk + b + l, b + l, scale);
        }
        for (int64_t b = 0; b < B; b += 16)
            _mm512_stream_si512(reinterpret_cast<__m512i*>(g + blk + b),
                                _mm512_load_si512(reinterpret_cast<const __m512i*>(buf + b)));
    }
    return fold(acc);
}

TGT void copy(float* __restrict__ d, const float* __restrict__ s, int64_t n) {
    for (int64_t i = 0; i < n; ++i) d[i] = s[i];
}

template <class F> static double run(const F& f, int64_t n, float scale, float* g, const float* p, const float* o,
                                     const double* mu, double* sum) {
    auto t0 = std::chrono::steady_clock::now();
    double s = 0;
    for (int64_t b = 0; b < n; b += 8192) s += double(f(g + b, p + b, o + b, mu + b, std::min<int64_t>(8192, n - b), scale));
    _mm_sfence();
    *sum = s;
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
}

int main(int argc, char** argv) {
    const int64_t n = argc > 1 ? int64_t(atof(argv[1])) : 10000000;
    const int reps = argc > 2 ? atoi(argv[2]) : 7;
    auto al = [](size_t bytes) { return aligned_alloc(64, (bytes + 63) / 64 * 64); };
    float* g = static_cast<float*>(al(n * 4));
    float* g2 = static_cast<float*>(al(n * 4));
    float* p = static_cast<float*>(al(n * 4));
    float* o = static_cast<float*>(al(n * 4));
    double* mu = static_cast<double*>(al(n * 8));
    float* src = static_cast<float*>(al(n * 4));
    float* dst = static_cast<float*>(al(n * 4));
    uint32_t st = 12345;
    auto rnd = [&] { st = st * 1664525u + 1013904223u; return float(st >> 8) / float(1 << 24); };
    for (int64_t i = 0; i < n; ++i) {
        g[i] = g2[i] = rnd() - 0.5f;
        p[i] = rnd();
        o[i] = rnd();
        mu[i] = double(p[i]) + 0.01 * (rnd() - 0.5);
        src[i] = rnd();
    }
    // bit-identity of one call (same inputs)
    double s1, s2;
    run(chunk_cached, n, 0.5f, g, p, o, mu, &s1);
    run(chunk_nt, n, 0.5f, g2, p, o, mu, &s2);
    if (s1 != s2 || memcmp(g, g2, n * 4) != 0) {
        printf("MISMATCH\n");
        return 1;
    }
    std::vector<double> tc, tn, tk;
    for (int r = 0; r < reps + 1; ++r) {  // interleaved; the first round is a warm-up
        double s;
        auto t0 = std::chrono::steady_clock::now();
        copy(dst, src, n);
        double c = std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
        double a = run(chunk_cached, n, 1e-9f, g, p, o, mu, &s);
        double b = run(chunk_nt, n, 1e-9f, g2, p, o, mu, &s);
        if (r) tk.push_back(c), tc.push_back(a), tn.push_back(b);
    }
    auto med = [](std::vector<double> v) { std::sort(v.begin(), v.end()); return v[v.size() / 2]; };
    const double k = med(tk), c = med(tc), nt = med(tn);
    const double cbw = 8.0 * n / k / 1e6, pbw = 24.0 * n / c / 1e6, nbw = 24.0 * n / nt / 1e6;
    printf("n=%lld reps=%d  copy %.2f ms (%.1f GB/s)  cached %.2f ms (%.1f GB/s, %.0f%% of copy)  "
           "nt %.2f ms (%.1f GB/s, %.0f%% of copy)  nt/cached time %.3f\n",
           (long long)n, reps, k, cbw, c, pbw, 100 * pbw / cbw, nt, nbw, 100 * nbw / cbw, nt / c);
    return 0;
}
