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
// Design: an implicit GEMM per sample and group, on the micro-kernels of csrc/microkernel.h.
//  * Per sample, dW_n of group g is G_ng (Og x Lp) times the implicit im2col matrix (Lp x Cg*Kp) of
//    X_ng: a GEMM whose reduction dimension is the Lp output positions. Work items cover an output
//    tile of a group and are scheduled dynamically over OpenMP threads; items of different tiles
//    write disjoint outputs. With fewer tiles than 4 x threads the samples are split into per-split
//    slabs, reduced in a fixed order (deterministic for a given thread count), as in persample.cpp.
//  * In-place path (fp32/fp64, >= NR channels and >= MR output channels per group): nothing is
//    packed. Columns are (channel block of NR, tap); the MR x NR register tile broadcasts G's MR
//    channels and loads X's NR channels where they lie (channels-last), position by position along
//    the tap's runs: the output positions whose tapped input lies inside X, so padding is skipped
//    rather than multiplied (micro_runs). At the sample's end tile^2 / |tile| go into the item's
//    accumulators (EPI_SQ / EPI_ABS / EPI_SQABS); samples are taken a few at a time, innermost, so the
//    accumulators of a tile stay in L1. An item holds whole channel blocks with all their taps, so its
//    flush writes contiguous ranges of the (O, Cg, Kp) output rows.
//  * Packed path (other dtypes, or fewer channels than a register tile): positions are taken KC at a
//    time; the KC x BO slice of G_n and the KC x BI slice of the implicit im2col matrix are packed into
//    MR- / NR-wide panels (accumulation type, zero in the padding), gathered straight from X in runs
//    of consecutive channels of one tap. Only a KC x BI tile of the unfolded input exists at a time.
//  * Channels-first (channel-strided) X or G, packed and in-place paths: the kernel copies a block of
//    samples channels-last into one reused buffer, runs every item on the block and adds the tiles into
//    the outputs after each block (run_blocked), instead of a full-size copy of each tensor.
//  * Depthwise in-place path (one channel per group in and out, fp32/fp64, >= NR channels): channels in
//    the vector lanes, one running sum per tap (depthwise_item). Other groups of <= 2 output channels:
//    the direct path, dot products over the positions.
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
    // in-place path (see Kernel::inplace_item): per tap t, runs truns[tstart[t] .. tstart[t+1])
    bool inplace;
    bool depthwise;  // the depthwise in-place path (Kernel::depthwise_item)
    const StridedRun* truns;
    const i64* tstart;
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
    // row by row: the output columns of consecutive internal columns are Kp apart within one row
    for (i64 r = 0; r < rows; ++r) {
        Out* o = out + (row0 + r) * pb.J;
        const Acc* s = loc + r * ldc;
        i64 ch = j0 % pb.Cg, tap = j0 / pb.Cg;  // out_col(j0 + c), stepped without divisions
        for (i64 c = 0; c < cols; ++c) {
            Out& e = o[ch * pb.Kp + tap];
            e = Out(Wide(e) + Wide(s[c]));
            if (++ch == pb.Cg) ch = 0, ++tap;
        }
    }
}

template <typename Acc>
inline void flush(const ConvProblem& pb, int which, i64 split, i64 row0, i64 j0, const Acc* loc, i64 ldc, i64 rows,
                  i64 cols) {
    if (pb.splits > 1) {
        const int nout = int(pb.do_sq) + int(pb.do_abs);
        const int slot = (which == 1 && pb.do_sq) ? 1 : 0;
        Acc* dst = static_cast<Acc*>(pb.slabs) + (split * nout + slot) * pb.O * pb.J + row0 * pb.J;
        for (i64 r = 0; r < rows; ++r) {
            i64 ch = j0 % pb.Cg, tap = j0 / pb.Cg;  // out_col(j0 + c), stepped without divisions
            for (i64 c = 0; c < cols; ++c) {
                dst[r * pb.J + ch * pb.Kp + tap] = loc[r * ldc + c];
                if (++ch == pb.Cg) ch = 0, ++tap;
            }
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

// Bytes of G and X (a few samples' worth) the in-place path keeps in L2 at a time.
constexpr i64 kInplaceL2 = 512 * 1024;

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

    // In-place path (fp32 / fp64 inputs, channels-last X and G, Cg >= NR, Og >= MR): no packing. Column
    // block b of an item is (channel block, tap), NR consecutive channels; for each sample the MR x NR
    // register tile reads G's MR channels (broadcast) and X's NR channels (vector loads) where they lie,
    // position by position along the tap's runs (positions whose tapped input is inside X: the padding
    // is skipped, not multiplied). A block that would run past the last channel (row) is shifted back to
    // end at it and its leading columns (rows), duplicates of the previous block's, are dropped at the
    // flush. Item: group g, row tile ob (BO rows), channel blocks [cb0, cb1) with all their taps, so that
    // its flush writes whole (channel, tap) ranges of the output rows.
    template <int EPI>
    static void inplace_item(const ConvProblem& pb, char* base, i64 g, i64 ob, i64 cb0, i64 cb1, i64 n0, i64 n1,
                             i64 split) {
        const i64 nb = (cb1 - cb0) * pb.Kp, ldc = nb * NR;
        const i64 o0 = ob * BO, bo = std::min(BO, pb.Og - o0), mo = (bo + MR - 1) / MR;
        Acc* l0 = reinterpret_cast<Acc*>(base);
        Acc* l1 = l0 + (mo * MR * ldc + 15) / 16 * 16;
        std::fill(l0, l0 + mo * MR * ldc, Acc(0));
        std::fill(l1, l1 + mo * MR * ldc, Acc(0));
        const Acc* X = static_cast<const Acc*>(pb.X);
        const Acc* G = static_cast<const Acc*>(pb.G);
        const i64 sx = pb.st[2] * pb.sX[2], sg = pb.sG[2];
        // Samples are taken NB at a time, with the samples innermost: a register tile's accumulators then
        // stay in L1 across the NB epilogues (which matter when a sample has few positions), while the NB
        // samples' G rows and X stay in L2 (~kInplaceL2 bytes).
        const i64 per_sample = i64(sizeof(Acc)) * (pb.Lp * bo + pb.S[0] * pb.S[1] * pb.S[2] * pb.Cg);
        const i64 NB = std::max<i64>(1, std::min<i64>(n1 - n0, kInplaceL2 / std::max<i64>(1, per_sample)));
        for (i64 nb0 = n0; nb0 < n1; nb0 += NB) {
            const i64 nb1 = std::min(n1, nb0 + NB);
            for (i64 b = 0; b < nb; ++b) {
                const i64 tap = b % pb.Kp, cs = std::min((cb0 + b / pb.Kp) * NR, pb.Cg - NR);
                const StridedRun* rs = pb.truns + pb.tstart[tap];
                const i64 nr = pb.tstart[tap + 1] - pb.tstart[tap];
                if (nr == 0) continue;  // the tap only meets padding: these dW entries are 0
                for (i64 r = 0; r < mo; ++r) {
                    const i64 os = std::min(o0 + r * MR, pb.Og - MR);
                    const i64 off = r * MR * ldc + b * NR;
                    for (i64 n = nb0; n < nb1; ++n)
                        micro_runs<V, Acc, MR, NRV, EPI>(rs, nr, G + n * pb.sGn + g * pb.Og + os, sg,
                                                         X + n * pb.sXn + g * pb.Cg + cs, sx, l0 + off, l1 + off, ldc);
                }
            }
        }
        for (Acc* l : {l0, l1}) {
            if ((l == l0 && !pb.do_sq) || (l == l1 && !pb.do_abs)) continue;
            for (i64 b = 0; b < nb; ++b) {
                const i64 c = (cb0 + b / pb.Kp) * NR, dc = c - std::min(c, pb.Cg - NR);
                const i64 cols = std::min<i64>(NR, pb.Cg - c);
                for (i64 r = 0; r < mo; ++r) {  // move a shifted block's own rows / columns to its start
                    const i64 orow = o0 + r * MR, dr = orow - std::min(orow, pb.Og - MR);
                    if (dr == 0 && dc == 0) continue;
                    Acc* t = l + r * MR * ldc + b * NR;
                    for (i64 rr = 0; rr < std::min<i64>(MR, o0 + bo - orow); ++rr)
                        for (i64 cc = 0; cc < cols; ++cc) t[rr * ldc + cc] = t[(rr + dr) * ldc + cc + dc];
                }
                flush<Acc>(pb, l == l0 ? 0 : 1, split, g * pb.Og + o0, (b % pb.Kp) * pb.Cg + c, l + b * NR, ldc, bo,
                           cols);
            }
        }
    }

    // Depthwise in-place path (one input and one output channel per group, fp32 / fp64, channels-last,
    // at least NR channels): the vector lanes are channels. Item: channel block cb of NR channels (the
    // last one shifted back to end at the last channel). For each sample and tap, NR running sums
    // acc[c] += G[pos, c] * X[pos shifted by the tap, c] along the tap's runs, then acc^2 / |acc| into a
    // Kp x NR accumulator; flushed transposed into the (C, 1, Kp) output.
    template <int EPI>
    static void depthwise_item(const ConvProblem& pb, char* base, i64 cb, i64 n0, i64 n1, i64 split) {
        const i64 C = pb.groups, Kp = pb.Kp;
        const i64 c = cb * NR, cs = std::min(c, C - NR), cols = std::min<i64>(NR, C - c), dc = c - cs;
        Acc* l0 = reinterpret_cast<Acc*>(base);
        Acc* l1 = l0 + Kp * NR;
        Acc* tr = l1 + Kp * NR;
        std::fill(l0, l0 + 2 * Kp * NR, Acc(0));
        const Acc* X = static_cast<const Acc*>(pb.X);
        const Acc* G = static_cast<const Acc*>(pb.G);
        const i64 sx = pb.st[2] * pb.sX[2], sg = pb.sG[2];
        for (i64 n = n0; n < n1; ++n) {
            const Acc* Xn = X + n * pb.sXn + cs;
            const Acc* Gn = G + n * pb.sGn + cs;
            for (i64 tap = 0; tap < Kp; ++tap) {
                const StridedRun* rs = pb.truns + pb.tstart[tap];
                const i64 nr = pb.tstart[tap + 1] - pb.tstart[tap];
                if (nr == 0) continue;  // the tap only meets padding: these dW entries are 0
                V acc[1][NRV];
#pragma GCC unroll 4
                for (int v = 0; v < NRV; ++v) acc[0][v] = V{};
                for (i64 q = 0; q < nr; ++q) {
                    const Acc* __restrict gp = Gn + rs[q].g;
                    const Acc* __restrict xp = Xn + rs[q].x;
                    for (i64 k = rs[q].len; k > 0; --k, gp += sg, xp += sx) {
#pragma GCC unroll 4
                        for (int v = 0; v < NRV; ++v) {
                            V a, b;
                            std::memcpy(&a, gp + v * W, sizeof(V));
                            std::memcpy(&b, xp + v * W, sizeof(V));
                            acc[0][v] += a * b;
                        }
                    }
                }
                epilogue<V, Acc, 1, NRV, EPI>(acc, l0 + tap * NR, l1 + tap * NR, NR);
            }
        }
        for (int which = 0; which < 2; ++which) {
            if ((which == 0 && !pb.do_sq) || (which == 1 && !pb.do_abs)) continue;
            const Acc* l = which == 0 ? l0 : l1;
            for (i64 j = 0; j < cols; ++j)  // channel-major, as the output: tr[j, tap]
                for (i64 tap = 0; tap < Kp; ++tap) tr[j * Kp + tap] = l[tap * NR + dc + j];
            flush<Acc>(pb, which, split, c, 0, tr, Kp, cols, Kp);
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
        if constexpr (std::is_same_v<In, Acc>) {
            if (pb.depthwise) {
                if (pb.do_sq && pb.do_abs) depthwise_item<EPI_SQABS>(pb, base, g, n0, n1, split);
                else if (pb.do_sq) depthwise_item<EPI_SQ>(pb, base, g, n0, n1, split);
                else depthwise_item<EPI_ABS>(pb, base, g, n0, n1, split);
                return;
            }
        }
        if (ob < 0) return direct_item(pb, base, g, n0, n1, split);
        if constexpr (std::is_same_v<In, Acc>) {
            if (pb.inplace) {
                if (pb.do_sq && pb.do_abs) inplace_item<EPI_SQABS>(pb, base, g, ob, ib0, ib1, n0, n1, split);
                else if (pb.do_sq) inplace_item<EPI_SQ>(pb, base, g, ob, ib0, ib1, n0, n1, split);
                else inplace_item<EPI_ABS>(pb, base, g, ob, ib0, ib1, n0, n1, split);
                return;
            }
        }
        if (pb.do_sq && pb.do_abs) gemm_item<EPI_SQABS>(pb, base, g, ob, ib0, ib1, n0, n1, split);
        else if (pb.do_sq) gemm_item<EPI_SQ>(pb, base, g, ob, ib0, ib1, n0, n1, split);
        else gemm_item<EPI_ABS>(pb, base, g, ob, ib0, ib1, n0, n1, split);
    }
};

using ItemFn = void (*)(const ConvProblem&, Scratch&, size_t, i64, i64, i64, i64, i64, i64, i64);
using ScratchFn = size_t (*)(i64, i64);
using TileFn = i64 (*)();

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
    }                                                                                                          \
    template <typename In> i64 NAME##_nr() {                                                                   \
        using Acc = typename AccOf<In>::type;                                                                  \
        return Kernel<In, Acc, typename Vecs<Acc>::VEC, MR, 2>::NR;                                            \
    }                                                                                                          \
    template <typename In> i64 NAME##_mr() { return MR; }

EWCF_PSC_ENTRY(item_generic, __attribute__((flatten)), V16, 6)
#ifdef EWCF_X86_MULTI
EWCF_PSC_ENTRY(item_avx2, __attribute__((target("avx2,fma,f16c"), flatten)), V32, 6)
EWCF_PSC_ENTRY(item_avx512, __attribute__((target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c"), flatten)),
               V64, 8)
#endif
#undef EWCF_PSC_ENTRY

template <typename In>
void pick(int isa, ItemFn& fn, ScratchFn& scratch, i64& mr, i64& nr) {
#ifdef EWCF_X86_MULTI
    if (isa == 2) {
        fn = &item_avx512<In>, scratch = &item_avx512_scratch<In>, mr = item_avx512_mr<In>(), nr = item_avx512_nr<In>();
        return;
    }
    if (isa == 1) {
        fn = &item_avx2<In>, scratch = &item_avx2_scratch<In>, mr = item_avx2_mr<In>(), nr = item_avx2_nr<In>();
        return;
    }
#endif
    (void)isa;
    fn = &item_generic<In>, scratch = &item_generic_scratch<In>, mr = item_generic_mr<In>(), nr = item_generic_nr<In>();
}

// Runs of the in-place path: for every tap, the output positions whose tapped input lies inside X, as
// runs along the last spatial dim (merged when one continues the other with the same strides, e.g. all
// positions of a 1x1 stride-1 convolution). Offsets are elements from the sample's (group's) first
// element of G and X.
void tap_runs(const ConvProblem& pb, std::vector<StridedRun>& runs, std::vector<i64>& start) {
    const i64 sg = pb.sG[2], sx = pb.st[2] * pb.sX[2];
    start.assign(size_t(pb.Kp + 1), 0);
    for (i64 tap = 0; tap < pb.Kp; ++tap) {
        start[size_t(tap)] = i64(runs.size());
        const i64 k2 = tap % pb.K[2], k1 = (tap / pb.K[2]) % pb.K[1], k0 = tap / (pb.K[2] * pb.K[1]);
        const i64 kd0 = k0 * pb.dl[0] - pb.pd[0], kd1 = k1 * pb.dl[1] - pb.pd[1], kd2 = k2 * pb.dl[2] - pb.pd[2];
        const i64 lo = std::max<i64>(0, ceil_div(-kd2, pb.st[2]));
        const i64 hi = pb.S[2] - 1 - kd2 < 0 ? 0 : std::min(pb.L[2], floor_div(pb.S[2] - 1 - kd2, pb.st[2]) + 1);
        if (hi <= lo) continue;
        for (i64 l0 = 0; l0 < pb.L[0]; ++l0) {
            const i64 i0 = l0 * pb.st[0] + kd0;
            if (i0 < 0 || i0 >= pb.S[0]) continue;
            for (i64 l1 = 0; l1 < pb.L[1]; ++l1) {
                const i64 i1 = l1 * pb.st[1] + kd1;
                if (i1 < 0 || i1 >= pb.S[1]) continue;
                const StridedRun r{l0 * pb.sG[0] + l1 * pb.sG[1] + lo * sg,
                                   i0 * pb.sX[0] + i1 * pb.sX[1] + (lo * pb.st[2] + kd2) * pb.sX[2], hi - lo};
                if (i64(runs.size()) > start[size_t(tap)]) {
                    StridedRun& p = runs.back();
                    if (p.g + p.len * sg == r.g && p.x + p.len * sx == r.x) {
                        p.len += r.len;
                        continue;
                    }
                }
                runs.push_back(r);
            }
        }
    }
    start[size_t(pb.Kp)] = i64(runs.size());
}

// Groups with at most this many output channels take the direct path (depthwise convolutions).
#ifndef EWCF_PSC_DIRECT_OG
#define EWCF_PSC_DIRECT_OG 2
#endif
// Accumulator bytes (3 BO x BI tiles per column tile) an item of the GEMM path may hold.
constexpr size_t kItemBudget = 768 * 1024;

// How a problem is cut into work items (see run()).
struct Plan {
    ItemFn fn = nullptr;
    bool direct = false;
    i64 nib = 0, tpg = 1, ngrp = 1, per_group = 1, tiles = 0;
    size_t scratch = 0;
    std::vector<StridedRun> truns;
    std::vector<i64> tstart;

    // work item `tile` of the plan on samples [n0, n1), split sp
    void item(const ConvProblem& pb, Scratch& s, i64 tile, i64 n0, i64 n1, i64 sp) const {
        const i64 g = tile / per_group, rest = tile % per_group;
        if (direct) return fn(pb, s, scratch, g, -1, 0, 0, n0, n1, sp);  // also the depthwise path
        const i64 ob = rest / ngrp, grp = rest % ngrp;
        fn(pb, s, scratch, g, ob, grp * tpg, std::min(nib, (grp + 1) * tpg), n0, n1, sp);
    }
};

// The depthwise in-place path applies: one input and one output channel per group, fp32 / fp64, at least
// NR channels (the layout is checked separately: channels-last, or copied so by run_blocked).
inline bool depthwise_ok(const ConvProblem& pb, int in_code, i64 nr) {
    return pb.Og == 1 && pb.Cg == 1 && pb.groups >= nr && (in_code == F32 || in_code == F64);
}

// Chooses the path (direct / depthwise / in-place / GEMM) and the work items; sets pb.inplace, pb.truns, pb.tstart.
void make_plan(ConvProblem& pb, int in_code, Plan& plan) {
    const int isa = chosen_isa();
    ScratchFn scratch_fn = nullptr;
    i64 mr = 0, nr = 0;
    switch (in_code) {
        case F32: pick<float>(isa, plan.fn, scratch_fn, mr, nr); break;
        case F64: pick<double>(isa, plan.fn, scratch_fn, mr, nr); break;
        case BF16: pick<bf16>(isa, plan.fn, scratch_fn, mr, nr); break;
        case F16: pick<f16>(isa, plan.fn, scratch_fn, mr, nr); break;
        default: throw std::invalid_argument("persample_conv_sq: unsupported input dtype code");
    }
    const i64 BO = EWCF_PSC_BO, BI = EWCF_PSC_BI;
    plan.direct = pb.Og <= EWCF_PSC_DIRECT_OG;
    // the in-place path's accumulators hold all taps of a channel block: not for very large kernels
    pb.inplace = !plan.direct && (in_code == F32 || in_code == F64) && pb.sXc == 1 && pb.sGo == 1 && pb.Cg >= nr &&
                 pb.Og >= mr && pb.Kp * nr <= 2048;
    pb.depthwise = depthwise_ok(pb, in_code, nr) && pb.sXc == 1 && pb.sGo == 1;
    if (pb.inplace || pb.depthwise) {
        tap_runs(pb, plan.truns, plan.tstart);
        pb.truns = plan.truns.data();
        pb.tstart = plan.tstart.data();
    }
    // Column tiles of an item: BI columns (GEMM path), or one block of NR channels with all its taps
    // (in-place path, 2 accumulators of BO x Kp*NR).
    const i64 acc_bytes = in_code == F64 ? sizeof(double) : sizeof(float);
    const i64 nob = (pb.Og + BO - 1) / BO;
    plan.nib = pb.inplace ? (pb.Cg + nr - 1) / nr : (pb.J + BI - 1) / BI;
    const i64 tile_bytes = pb.inplace ? 2 * BO * pb.Kp * nr * acc_bytes : 3 * BO * BI * acc_bytes;
    plan.tpg = plan.direct ? 1 : std::max<i64>(1, std::min<i64>(plan.nib, i64(kItemBudget) / tile_bytes));
    plan.ngrp = (plan.nib + plan.tpg - 1) / plan.tpg;
    plan.per_group = plan.direct ? 1 : nob * plan.ngrp;
    plan.tiles = pb.depthwise ? (pb.groups + nr - 1) / nr : pb.groups * plan.per_group;
    plan.scratch = std::max(scratch_fn(plan.tpg, plan.direct ? pb.Og * pb.J : 0),
                            pb.inplace     ? size_t(plan.tpg * tile_bytes) + 128
                            : pb.depthwise ? size_t(3 * pb.Kp * nr * acc_bytes) + 128
                                           : size_t(0));
}

// NR of the chosen instruction set for an input dtype
inline i64 nr_of(int in_code) {
    ItemFn fn;
    ScratchFn sf;
    i64 mr = 0, nr = 0;
    const int isa = chosen_isa();
    if (in_code == F64) pick<double>(isa, fn, sf, mr, nr);
    else pick<float>(isa, fn, sf, mr, nr);
    return nr;
}

// Samples [n0, n0 + nb) of X (N, C, S0, S1, S2) with any element strides, copied channels-last into dst
// (nb, S0, S1, S2, C), 16 channels at a time (reads run along the positions, writes are 16-channel
// runs). Called inside a parallel region (work-shared loop with its closing barrier).
template <typename T>
void to_channels_last(const T* src, i64 n0, i64 nb, i64 C, const i64* S, i64 sn, i64 sc, const i64* ss, T* dst) {
    const i64 P = S[0] * S[1] * S[2], ncb = (C + 15) / 16;
#pragma omp for schedule(static)
    for (i64 w = 0; w < nb * ncb; ++w) {
        const i64 n = w / ncb, c0 = (w % ncb) * 16, cn = std::min<i64>(16, C - c0);
        const T* s = src + (n0 + n) * sn + c0 * sc;
        T* d = dst + n * P * C + c0;
        for (i64 a = 0; a < S[0]; ++a)
            for (i64 b = 0; b < S[1]; ++b) {
                const T* r = s + a * ss[0] + b * ss[1];
                T* dd = d + (a * S[1] + b) * S[2] * C;
                for (i64 e = 0; e < S[2]; ++e, dd += C)
                    for (i64 c = 0; c < cn; ++c) dd[c] = r[c * sc + e * ss[2]];
            }
    }
}

template <typename T>
void to_channels_last_xg(const ConvProblem& pb, const ConvProblem& q, i64 n0, i64 nb) {
    to_channels_last(static_cast<const T*>(pb.X), n0, nb, pb.groups * pb.Cg, pb.S, pb.sXn, pb.sXc, pb.sX,
                     static_cast<T*>(const_cast<void*>(q.X)));
    to_channels_last(static_cast<const T*>(pb.G), n0, nb, pb.O, pb.L, pb.sGn, pb.sGo, pb.sG,
                     static_cast<T*>(const_cast<void*>(q.G)));
}

// Channels-first (or otherwise channel-strided) X or G on the packed / in-place paths: the samples are
// taken NB at a time, copied channels-last into one buffer (a few MiB, reused: no page faults, stays
// in cache for the items) and every work item runs on them, its tiles added into the outputs after
// each block. Everything is allocated before the first write, so a failed allocation leaves the
// outputs untouched. No sample splits (the threads share the items of each block).
void run_blocked(const ConvProblem& pb, int in_code, int nthreads) {
    const i64 elem = in_code == F64 ? 8 : in_code == F32 ? 4 : 2, acc_bytes = in_code == F64 ? 8 : 4;
    const i64 C = pb.groups * pb.Cg, Sx = pb.S[0] * pb.S[1] * pb.S[2];
    const i64 per_sample = (C * Sx + pb.O * pb.Lp) * elem;
    // enough samples that adding the tiles into the outputs once per block stays small next to the copy
    const i64 out_bytes = pb.O * pb.J * acc_bytes * (i64(pb.do_sq) + i64(pb.do_abs));
    const i64 want = std::max<i64>(8 * out_bytes, 2 << 20);
    const i64 NB = std::max<i64>(1, std::min<i64>(pb.N, (want + per_sample - 1) / per_sample));
    char* buf = static_cast<char*>(std::aligned_alloc(64, size_t((NB * per_sample + 63) / 64 * 64)));
    if (!buf) throw std::bad_alloc();
    ConvProblem q = pb;
    q.X = buf;
    q.G = buf + NB * C * Sx * elem;
    q.N = NB;
    q.sXc = 1, q.sX[2] = C, q.sX[1] = C * pb.S[2], q.sX[0] = C * pb.S[1] * pb.S[2], q.sXn = C * Sx;
    q.sGo = 1, q.sG[2] = pb.O, q.sG[1] = pb.O * pb.L[2], q.sG[0] = pb.O * pb.L[1] * pb.L[2], q.sGn = pb.O * pb.Lp;
    q.splits = 1;
    q.slabs = nullptr;
    Plan plan;
    try {
        make_plan(q, in_code, plan);
    } catch (...) {
        std::free(buf);
        throw;
    }
    bool failed = false;
#pragma omp parallel num_threads(nthreads)
    {
        Scratch s;
        try {
            s.get(plan.scratch);
        } catch (...) {
#pragma omp atomic write
            failed = true;
        }
#pragma omp barrier
        bool stop;
#pragma omp atomic read
        stop = failed;
        for (i64 n0 = 0; !stop && n0 < pb.N; n0 += NB) {
            const i64 nb = std::min(NB, pb.N - n0);
            if (elem == 8) to_channels_last_xg<uint64_t>(pb, q, n0, nb);
            else if (elem == 4) to_channels_last_xg<uint32_t>(pb, q, n0, nb);
            else to_channels_last_xg<uint16_t>(pb, q, n0, nb);
#pragma omp for schedule(dynamic, 1)
            for (i64 w = 0; w < plan.tiles; ++w) plan.item(q, s, w, 0, nb, 0);
        }
    }
    std::free(buf);
    if (failed) throw std::bad_alloc();
}

void run(ConvProblem& pb, int in_code, int nthreads) {
    if (pb.N <= 0 || pb.Lp <= 0 || pb.Og <= 0 || pb.J <= 0 || pb.groups <= 0) return;
    nthreads = std::max(1, nthreads);
    // the packed and in-place paths read runs of consecutive channels: copy them channels-last in blocks
    const bool direct = pb.Og <= EWCF_PSC_DIRECT_OG;
    const bool cl_path = !direct || depthwise_ok(pb, in_code, nr_of(in_code));
    if (cl_path && ((pb.sXc != 1 && pb.groups * pb.Cg > 1) || (pb.sGo != 1 && pb.O > 1)))
        return run_blocked(pb, in_code, nthreads);
    Plan plan;
    make_plan(pb, in_code, plan);
    const bool acc64 = in_code == F64;
    pb.splits = sample_splits(pb.N, plan.tiles, nthreads);
    Slabs slabs(pb.splits, int(pb.do_sq) + int(pb.do_abs), pb.O * pb.J, acc64 ? sizeof(double) : sizeof(float));
    pb.slabs = slabs.mem;
    run_items(plan.tiles * pb.splits, plan.scratch, nthreads, [&](Scratch& s, i64 w) {
        const i64 sp = w / plan.tiles;
        plan.item(pb, s, w % plan.tiles, pb.N * sp / pb.splits, pb.N * (sp + 1) / pb.splits, sp);
    });
    if (pb.splits > 1) {
        void* sq = pb.do_sq ? pb.sq : nullptr;
        void* ab = pb.do_abs ? pb.ab : nullptr;
        if (acc64) reduce_slabs<double>(pb.slabs, pb.splits, pb.O * pb.J, sq, pb.sq_code, ab, pb.ab_code, nthreads);
        else reduce_slabs<float>(pb.slabs, pb.splits, pb.O * pb.J, sq, pb.sq_code, ab, pb.ab_code, nthreads);
    }
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
