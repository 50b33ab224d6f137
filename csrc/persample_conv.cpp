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
#include <cstring>
#include <stdexcept>
#include <type_traits>
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

// Columns jj .. jj+len-1 of a panel: one tap (offsets kd0..kd2 = k*dilation - padding), consecutive
// channels starting at element offset coff of X.
struct Seg {
    i64 jj, len, coff, kd0, kd1, kd2;
};

// Output column of internal column j: the kernel orders columns tap-major (j = tap*Cg + c, so that
// consecutive columns are consecutive channels, contiguous in a channels-last input); the weight's
// layout is channel-major (c*Kp + tap).
inline i64 out_col(const ConvProblem& pb, i64 j) { return (j % pb.Cg) * pb.Kp + j / pb.Cg; }

template <typename Out, typename Acc>
inline void add_permuted(const ConvProblem& pb, Out* out, i64 row0, i64 j0, const Acc* loc, i64 ldc, i64 rows,
                         i64 cols) {
    using Wide = decltype(Out() + Acc());  // fp64 outputs or fp64 accumulators add in fp64
    for (i64 c = 0; c < cols; ++c) {
        Out* o = out + row0 * pb.J + out_col(pb, j0 + c);
        for (i64 r = 0; r < rows; ++r) o[r * pb.J] = Out(Wide(o[r * pb.J]) + Wide(loc[r * ldc + c]));
    }
}

template <typename Acc>
inline void flush(const ConvProblem& pb, int which, i64 split, i64 row0, i64 j0, const Acc* loc, i64 ldc, i64 rows,
                  i64 cols) {
    if (pb.splits > 1) {
        const int nout = int(pb.do_sq) + int(pb.do_abs);
        const int slot = (which == 1 && pb.do_sq) ? 1 : 0;
        Acc* dst = static_cast<Acc*>(pb.slabs) + (split * nout + slot) * pb.O * pb.J + row0 * pb.J;
        for (i64 c = 0; c < cols; ++c) {
            const i64 oc = out_col(pb, j0 + c);
            for (i64 r = 0; r < rows; ++r) dst[r * pb.J + oc] = loc[r * ldc + c];
        }
        return;
    }
    void* out = which == 0 ? pb.sq : pb.ab;
    const int code = which == 0 ? pb.sq_code : pb.ab_code;
    if (code == F64)
        add_permuted(pb, static_cast<double*>(out), row0, j0, loc, ldc, rows, cols);
    else
        add_permuted(pb, static_cast<float*>(out), row0, j0, loc, ldc, rows, cols);
}

// Dot product of a run: sum_i g[i*sg] * x[i*sx], i < n; vectorised for unit strides when In == Acc.
template <typename V, typename Acc, typename In>
inline Acc dot_run(const In* g, i64 sg, const In* x, i64 sx, i64 n) {
    Acc s = 0;
    i64 i = 0;
    if constexpr (std::is_same_v<In, Acc>) {
        if (sg == 1 && sx == 1) {
            constexpr int W = int(sizeof(V) / sizeof(Acc));
            V acc{};
            for (; i + W <= n; i += W) {
                V a, b;
                std::memcpy(&a, g + i, sizeof(V));
                std::memcpy(&b, x + i, sizeof(V));
                acc += a * b;
            }
            for (int w = 0; w < W; ++w) s += acc[w];
        }
    }
    for (; i < n; ++i) s += load_as<Acc>(g + i * sg) * load_as<Acc>(x + i * sx);
    return s;
}

template <typename In, typename Acc, typename V, int MR, int NRV>
struct Kernel {
    static constexpr int W = int(sizeof(V) / sizeof(Acc));
    static constexpr int NR = NRV * W;
    static constexpr i64 BO = EWCF_PSC_BO;
    static constexpr i64 BI = EWCF_PSC_BI;
    static constexpr i64 KC = sizeof(Acc) == 4 ? EWCF_PS_KC : EWCF_PS_KC / 2;
    static_assert(BO % MR == 0 && BI % NR == 0, "macro tile must hold whole micro tiles");

    // Scratch of one thread for items of `tpg` column tiles (GEMM path) or Og x J accumulators (direct).
    static size_t scratch_bytes(i64 tpg, i64 direct_elems) {
        // pg (KC x BO) + pa (KC x BI) + (loc0 + loc1 + spill) per column tile, column tables, runs
        const size_t gemm = sizeof(Acc) * size_t(KC * BO + KC * BI + 3 * BO * BI * tpg) +
                            (sizeof(Seg) + sizeof(i64)) * size_t(BI * tpg) + sizeof(Run) * size_t(KC) + 64 * 8;
        return std::max(gemm, sizeof(Acc) * size_t(2 * direct_elems) + 64 * 2);
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

    // pg[(p*kc + t)*MR + m] = G[n, row0 + p*MR + m, position t0 + t] (zero for rows >= bo). Position-major:
    // each position's MR channels are one contiguous copy when G is channels-last (sGo == 1).
    static void pack_g(const ConvProblem& pb, Acc* __restrict pg, const In* Gn, i64 row0, i64 bo, i64 kc,
                       const Run* rs, i64 nr) {
        const i64 np = (bo + MR - 1) / MR;
        const i64 so = pb.sGo, s2 = pb.sG[2];
        for (i64 p = 0; p < np; ++p) {
            const i64 mv = std::min<i64>(MR, bo - p * MR);
            const In* base = Gn + (row0 + p * MR) * so;
            for (i64 q = 0; q < nr; ++q) {
                const Run& r = rs[q];
                const In* src = base + r.l0 * pb.sG[0] + r.l1 * pb.sG[1];
                Acc* d = pg + (p * kc + r.t) * MR;
                for (i64 l2 = r.a; l2 < r.b; ++l2, d += MR) {
                    const In* e = src + l2 * s2;
                    if (so == 1) {
                        for (i64 m = 0; m < mv; ++m) d[m] = load_as<Acc>(e + m);
                    } else {
                        for (i64 m = 0; m < mv; ++m) d[m] = load_as<Acc>(e + m * so);
                    }
                    for (i64 m = mv; m < MR; ++m) d[m] = Acc(0);
                }
            }
        }
    }

    // in-range l2 interval of column table entry tj for a run: 0 <= l2*st2 + kd2 < S2 (empty if the row
    // (l0, l1) falls into the padding)
    static inline void valid_l2(const ConvProblem& pb, const i64* tj, const Run& r, i64& va, i64& vb, i64& i0,
                                i64& i1) {
        const i64 kd2 = tj[3], st2 = pb.st[2], S2 = pb.S[2];
        i0 = r.l0 * pb.st[0] + tj[1];
        i1 = r.l1 * pb.st[1] + tj[2];
        const bool row_ok = i0 >= 0 && i0 < pb.S[0] && i1 >= 0 && i1 < pb.S[1];
        const i64 lo = std::max<i64>(0, ceil_div(-kd2, st2));
        const i64 hi = S2 - 1 - kd2 < 0 ? 0 : floor_div(S2 - 1 - kd2, st2) + 1;
        va = row_ok ? std::min(r.b, std::max(r.a, lo)) : r.b;
        vb = row_ok ? std::max(va, std::min(r.b, hi)) : r.b;
    }

    // pa[(p*kc + t)*NR + jj] = X[n, chan(j), position t0 + t shifted by tap(j)] (zero in the padding or
    // for columns >= bj), j = p*NR + jj. Position-major over the panel's segments (columns of one tap and
    // consecutive channels, see segments()): one contiguous copy per segment and position when X is
    // channels-last (sXc == 1), a strided gather otherwise.
    static void pack_x(const ConvProblem& pb, Acc* __restrict pa, const In* Xn, const Seg* segs, const i64* nseg,
                       i64 bj, i64 kc, const Run* rs, i64 nr) {
        const i64 np = (bj + NR - 1) / NR;
        const i64 sc = pb.sXc, s0 = pb.sX[0], s1 = pb.sX[1], s2 = pb.sX[2];
        const i64 st0 = pb.st[0], st1 = pb.st[1], st2 = pb.st[2];
        const i64 S0 = pb.S[0], S1 = pb.S[1], S2 = pb.S[2];
        for (i64 p = 0; p < np; ++p) {
            const i64 cv = std::min<i64>(NR, bj - p * NR);  // valid columns of this panel
            const Seg* sp = segs + p * NR;
            const i64 ns = nseg[p];
            for (i64 q = 0; q < nr; ++q) {
                const Run& r = rs[q];
                Acc* d = pa + (p * kc + r.t) * NR;
                for (i64 l2 = r.a; l2 < r.b; ++l2, d += NR) {
                    for (i64 k = 0; k < ns; ++k) {
                        const Seg& g = sp[k];
                        const i64 i0 = r.l0 * st0 + g.kd0, i1 = r.l1 * st1 + g.kd1, i2 = l2 * st2 + g.kd2;
                        Acc* dd = d + g.jj;
                        if (i0 < 0 || i0 >= S0 || i1 < 0 || i1 >= S1 || i2 < 0 || i2 >= S2) {
                            for (i64 c = 0; c < g.len; ++c) dd[c] = Acc(0);
                            continue;
                        }
                        const In* src = Xn + g.coff + i0 * s0 + i1 * s1 + i2 * s2;
                        if (sc == 1) {
                            for (i64 c = 0; c < g.len; ++c) dd[c] = load_as<Acc>(src + c);
                        } else {
                            for (i64 c = 0; c < g.len; ++c) dd[c] = load_as<Acc>(src + c * sc);
                        }
                    }
                    for (i64 c = cv; c < NR; ++c) d[c] = Acc(0);
                }
            }
        }
    }

    // Segments of a column tile [j0, j0 + bj): per panel of NR columns, maximal runs of columns with one
    // tap and consecutive channels; segs[p*NR + k] is panel p's k-th, nseg[p] their number.
    static void segments(const ConvProblem& pb, Seg* segs, i64* nseg, i64 g, i64 j0, i64 bj) {
        const i64 np = (bj + NR - 1) / NR;
        for (i64 p = 0; p < np; ++p) {
            const i64 cv = std::min<i64>(NR, bj - p * NR);
            i64 ns = 0, jj = 0;
            while (jj < cv) {
                const i64 j = j0 + p * NR + jj, tap = j / pb.Cg, c = j % pb.Cg;
                const i64 len = std::min(cv - jj, pb.Cg - c);
                i64 t[4];
                column(pb, g, j, t);
                segs[p * NR + ns++] = Seg{jj, len, t[0], t[1], t[2], t[3]};
                (void)tap;
                jj += len;
            }
            nseg[p] = ns;
        }
    }

    // internal column col = tap*Cg + c of group g, tap = (k0*K1 + k1)*K2 + k2: channel offset and
    // k_d*dil_d - pad_d per spatial dim
    static void column(const ConvProblem& pb, i64 g, i64 col, i64* t) {
        const i64 c = col % pb.Cg, tap = col / pb.Cg;
        const i64 k2 = tap % pb.K[2], k1 = (tap / pb.K[2]) % pb.K[1], k0 = tap / (pb.K[2] * pb.K[1]);
        t[0] = (g * pb.Cg + c) * pb.sXc;
        t[1] = k0 * pb.dl[0] - pb.pd[0];
        t[2] = k1 * pb.dl[1] - pb.pd[1];
        t[3] = k2 * pb.dl[2] - pb.pd[2];
    }


    // GEMM path. One work item: group g, row tile ob of the group's Og rows, column tiles [ib0, ib1) of
    // its J columns, samples [n0, n1). The G panel of a sample's position block is packed once and used
    // for all the item's column tiles (each with its own accumulators).
    template <int EPI>
    static void gemm_item(const ConvProblem& pb, char* base, i64 g, i64 ob, i64 ib0, i64 ib1, i64 n0, i64 n1,
                          i64 split) {
        auto carve = [&base](size_t bytes) {
            char* p = base;
            base += (bytes + 63) / 64 * 64;
            return p;
        };
        const i64 tiles = ib1 - ib0;
        Acc* pg = reinterpret_cast<Acc*>(carve(sizeof(Acc) * KC * BO));
        Acc* pa = reinterpret_cast<Acc*>(carve(sizeof(Acc) * KC * BI));
        Acc* l0 = reinterpret_cast<Acc*>(carve(sizeof(Acc) * BO * BI * tiles));
        Acc* l1 = reinterpret_cast<Acc*>(carve(sizeof(Acc) * BO * BI * tiles));
        Acc* pl = reinterpret_cast<Acc*>(carve(sizeof(Acc) * BO * BI * tiles));
        Seg* segs = reinterpret_cast<Seg*>(carve(sizeof(Seg) * BI * tiles));
        i64* nseg = reinterpret_cast<i64*>(carve(sizeof(i64) * BI * tiles));
        Run* rs = reinterpret_cast<Run*>(carve(sizeof(Run) * KC));
        const i64 o0 = ob * BO, bo = std::min(BO, pb.Og - o0);
        const i64 mo = (bo + MR - 1) / MR;
        const i64 row0 = g * pb.Og + o0;
        for (i64 q = 0; q < tiles; ++q) {
            const i64 j0 = (ib0 + q) * BI, bj = std::min(BI, pb.J - j0);
            segments(pb, segs + BI * q, nseg + BI * q, g, j0, bj);
        }
        std::fill(l0, l0 + BO * BI * tiles, Acc(0));
        std::fill(l1, l1 + BO * BI * tiles, Acc(0));
        const In* X = static_cast<const In*>(pb.X);
        const In* G = static_cast<const In*>(pb.G);
        const i64 nkb = (pb.Lp + KC - 1) / KC;
        for (i64 n = n0; n < n1; ++n) {
            const In* Xn = X + n * pb.sXn;
            const In* Gn = G + n * pb.sGn;
            for (i64 kb = 0; kb < nkb; ++kb) {
                const i64 t0 = kb * KC, kc = std::min(KC, pb.Lp - t0);
                const i64 nr = runs(pb, t0, kc, rs);
                pack_g(pb, pg, Gn, row0, bo, kc, rs, nr);
                const bool first = kb == 0, last = kb == nkb - 1;
                for (i64 q = 0; q < tiles; ++q) {
                    const i64 j0 = (ib0 + q) * BI, bj = std::min(BI, pb.J - j0);
                    const i64 ni = (bj + NR - 1) / NR, ldc = ni * NR;
                    pack_x(pb, pa, Xn, segs + BI * q, nseg + BI * q, bj, kc, rs, nr);
                    Acc* a0 = l0 + BO * BI * q;
                    Acc* a1 = l1 + BO * BI * q;
                    Acc* sp = pl + BO * BI * q;
                    for (i64 c = 0; c < ni; ++c)
                        for (i64 r = 0; r < mo; ++r) {
                            const i64 off = r * MR * ldc + c * NR;
                            micro<V, Acc, MR, NRV, EPI>(kc, pg + r * kc * MR, pa + c * kc * NR, a0 + off, a1 + off,
                                                        sp + off, ldc, first, last);
                        }
                }
            }
        }
        for (i64 q = 0; q < tiles; ++q) {
            const i64 j0 = (ib0 + q) * BI, bj = std::min(BI, pb.J - j0);
            const i64 ldc = (bj + NR - 1) / NR * NR;
            if (pb.do_sq) flush<Acc>(pb, 0, split, row0, j0, l0 + BO * BI * q, ldc, bo, bj);
            if (pb.do_abs) flush<Acc>(pb, 1, split, row0, j0, l1 + BO * BI * q, ldc, bo, bj);
        }
    }

    // Direct path (few output channels per group, e.g. depthwise): every (o, c, tap) entry of dW_n is a
    // dot product over the output positions, taken run by run (vectorised along the last spatial dim
    // for unit strides), then squared / |.|-ed into Og x J accumulators.
    static void direct_item(const ConvProblem& pb, char* base, i64 g, i64 n0, i64 n1, i64 split) {
        const i64 OJ = pb.Og * pb.J;
        Acc* l0 = reinterpret_cast<Acc*>(base);
        Acc* l1 = l0 + (OJ + 15) / 16 * 16;
        std::fill(l0, l0 + OJ, Acc(0));
        std::fill(l1, l1 + OJ, Acc(0));
        const In* X = static_cast<const In*>(pb.X);
        const In* G = static_cast<const In*>(pb.G);
        const i64 sx2 = pb.st[2] * pb.sX[2], sg2 = pb.sG[2];
        for (i64 n = n0; n < n1; ++n) {
            const In* Xn = X + n * pb.sXn;
            const In* Gn = G + n * pb.sGn;
            for (i64 j = 0; j < pb.J; ++j) {
                i64 tj[4];
                column(pb, g, j, tj);
                for (i64 o = 0; o < pb.Og; ++o) {
                    const In* grow = Gn + (g * pb.Og + o) * pb.sGo;
                    Acc s = 0;
                    for (i64 l0i = 0; l0i < pb.L[0]; ++l0i)
                        for (i64 l1i = 0; l1i < pb.L[1]; ++l1i) {
                            const Run r{0, l0i, l1i, 0, pb.L[2]};
                            i64 va, vb, i0, i1;
                            valid_l2(pb, tj, r, va, vb, i0, i1);
                            if (vb <= va) continue;
                            const In* gp = grow + l0i * pb.sG[0] + l1i * pb.sG[1] + va * sg2;
                            const In* xp = Xn + tj[0] + i0 * pb.sX[0] + i1 * pb.sX[1] + tj[3] * pb.sX[2] + va * sx2;
                            s += dot_run<V, Acc, In>(gp, sg2, xp, sx2, vb - va);
                        }
                    l0[o * pb.J + j] += s * s;
                    l1[o * pb.J + j] += std::fabs(s);
                }
            }
        }
        if (pb.do_sq) flush<Acc>(pb, 0, split, g * pb.Og, 0, l0, pb.J, pb.Og, pb.J);
        if (pb.do_abs) flush<Acc>(pb, 1, split, g * pb.Og, 0, l1, pb.J, pb.Og, pb.J);
    }

    // Work item w of the plan (see run()): direct (ob < 0) or GEMM.
    static void item(const ConvProblem& pb, Scratch& scratch, size_t bytes, i64 g, i64 ob, i64 ib0, i64 ib1, i64 n0,
                     i64 n1, i64 split) {
        char* base = static_cast<char*>(scratch.get(bytes));
        if (ob < 0) return direct_item(pb, base, g, n0, n1, split);
        if (pb.do_sq && pb.do_abs) gemm_item<EPI_SQABS>(pb, base, g, ob, ib0, ib1, n0, n1, split);
        else if (pb.do_sq) gemm_item<EPI_SQ>(pb, base, g, ob, ib0, ib1, n0, n1, split);
        else gemm_item<EPI_ABS>(pb, base, g, ob, ib0, ib1, n0, n1, split);
    }
};

using ItemFn = void (*)(const ConvProblem&, Scratch&, size_t, i64, i64, i64, i64, i64, i64, i64);
using ScratchFn = size_t (*)(i64, i64);

#define EWCF_PSC_ENTRY(NAME, TARGET, VEC, MR)                                                                   \
    template <typename In>                                                                                     \
    TARGET void NAME(const ConvProblem& pb, Scratch& s, size_t bytes, i64 g, i64 ob, i64 ib0, i64 ib1, i64 n0,  \
                     i64 n1, i64 sp) {                                                                         \
        using Acc = typename AccOf<In>::type;                                                                  \
        Kernel<In, Acc, typename Vecs<Acc>::VEC, MR, 2>::item(pb, s, bytes, g, ob, ib0, ib1, n0, n1, sp);      \
    }                                                                                                          \
    template <typename In> size_t NAME##_scratch(i64 tpg, i64 direct) {                                        \
        using Acc = typename AccOf<In>::type;                                                                  \
        return Kernel<In, Acc, typename Vecs<Acc>::VEC, MR, 2>::scratch_bytes(tpg, direct);                    \
    }

EWCF_PSC_ENTRY(item_generic, __attribute__((flatten)), V16, 6)
#ifdef EWCF_X86_MULTI
EWCF_PSC_ENTRY(item_avx2, __attribute__((target("avx2,fma,f16c"), flatten)), V32, 6)
EWCF_PSC_ENTRY(item_avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"), flatten)),
               V64, 12)
#endif
#undef EWCF_PSC_ENTRY

template <typename In>
void pick(int isa, ItemFn& fn, ScratchFn& scratch) {
#ifdef EWCF_X86_MULTI
    if (isa == 2) { fn = &item_avx512<In>; scratch = &item_avx512_scratch<In>; return; }
    if (isa == 1) { fn = &item_avx2<In>; scratch = &item_avx2_scratch<In>; return; }
#endif
    (void)isa;
    fn = &item_generic<In>;
    scratch = &item_generic_scratch<In>;
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

// Groups with at most this many output channels take the direct path (depthwise convolutions).
#ifndef EWCF_PSC_DIRECT_OG
#define EWCF_PSC_DIRECT_OG 2
#endif
// Accumulator bytes (3 BO x BI tiles per column tile) an item of the GEMM path may hold.
constexpr size_t kItemBudget = 768 * 1024;

void run(ConvProblem& pb, int in_code, int nthreads) {
    if (pb.N <= 0 || pb.Lp <= 0 || pb.Og <= 0 || pb.J <= 0 || pb.groups <= 0) return;
    nthreads = std::max(1, nthreads);
    const int isa = chosen_isa();
    ItemFn fn = nullptr;
    ScratchFn scratch_fn = nullptr;
    switch (in_code) {
        case F32: pick<float>(isa, fn, scratch_fn); break;
        case F64: pick<double>(isa, fn, scratch_fn); break;
        case BF16: pick<bf16>(isa, fn, scratch_fn); break;
        case F16: pick<f16>(isa, fn, scratch_fn); break;
        default: throw std::invalid_argument("persample_conv_sq: unsupported input dtype code");
    }
    const bool acc64 = in_code == F64;
    const i64 BO = EWCF_PSC_BO, BI = EWCF_PSC_BI;
    const bool direct = pb.Og <= EWCF_PSC_DIRECT_OG;
    const i64 nob = (pb.Og + BO - 1) / BO, nib = (pb.J + BI - 1) / BI;
    const i64 tile_bytes = 3 * BO * BI * i64(acc64 ? sizeof(double) : sizeof(float));
    const i64 tpg = direct ? 1 : std::max<i64>(1, std::min<i64>(nib, i64(kItemBudget) / tile_bytes));
    const i64 ngrp = (nib + tpg - 1) / tpg;
    const i64 per_group = direct ? 1 : nob * ngrp;
    const i64 tiles = pb.groups * per_group;
    const size_t scratch = scratch_fn(tpg, direct ? pb.Og * pb.J : 0);
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
            const i64 n0 = pb.N * sp / pb.splits, n1 = pb.N * (sp + 1) / pb.splits;
            if (direct) {
                fn(pb, s, scratch, g, -1, 0, 0, n0, n1, sp);
            } else {
                const i64 ob = rest / ngrp, grp = rest % ngrp;
                fn(pb, s, scratch, g, ob, grp * tpg, std::min(nib, (grp + 1) * tpg), n0, n1, sp);
            }
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
