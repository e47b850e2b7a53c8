// SGRAF local similarity vectors (itm_kernels::local_sim_cuda): device code and a torch-free host launcher.
//
// Semantics: itm_kernels/local_sim/ (`local_sim_reference` is the spec). For image i (regions v_k, k < K),
// caption c (words e_t, t < len_c), W (S x d) and b (S):
//   s_kt = v_k . e_t,  h_kt = LeakyReLU_0.1(s_kt),  n_kt = h_kt / (sqrt(sum_{t' < len} h_kt'^2) + 1e-8)
//   alpha_t = softmax_{k < K}(lambda n_kt),  a_t = sum_k alpha_tk v_k,  a^_t = a_t / (|a_t| + 1e-8)
//   y_t = W (a^_t - e_t)^2 + b,  out[i, c, t] = y_t / (|y_t| + 1e-8)  for t < len_c, 0 for len_c <= t < L_max.
//
// One thread block (256 threads) per (image, caption) pair; the attended vectors never leave shared memory.
//   pass 1  streams V_i (K x d) and the caption's words (len x d, rounded up to 16 rows) through shared memory in
//           chunks of kDk = 32 features and accumulates the score tile S (K x len) in registers (threads seen as
//           16 x 16, 4 x 8 cells each); padding words (t >= len) are never read;
//   epilogue in shared memory: h = LeakyReLU(S), the per-region l2 norms over the words, alpha (softmax over the
//           regions per word) in place of h;
//   then per tile of kWordTile = 32 words (t0 = 0, 32, ... < len):
//   pass 2  streams V_i again; per chunk each thread forms 4 entries of a = alpha^T V_chunk (words x features) and
//           accumulates their squares: |a_t|^2 exactly as the reference defines it (no Gram identity, no
//           cancellation, no per-image workspace), K d FMAs per word (a Gram matrix would cost K^2 d per pair);
//   pass 3  per tile of kColTile = 256 outputs (one tile when S <= 256) streams V_i, the tile's words and the W
//           rows of the output tile (kDk features of each): recomputes the chunk of a, forms (a / (|a| + eps) - e)^2
//           in shared memory and accumulates its product with W^T into the (32 x 256) output tile held in registers
//           (threads seen as 8 word groups x 32 output groups, 4 words x 8 outputs each; a warp owns 4 word rows,
//           so it skips the FMAs of rows beyond the caption: short captions cost in proportion to their length);
//   epilogue adds b, reduces |y_t|^2 through shared memory and writes the normalised rows (one coalesced write per
//           output value). With S > 256 the earlier output tiles are written unnormalised and rescaled by the block
//           once |y_t| is complete (it reads back its own writes after a barrier).
// Rows len..L_max-1 of the output get 0. Accumulation is float32 for float32/float16/bfloat16 inputs, float64 for
// float64; W and b are read in the input dtype (the binding converts them) and widened on load.
// FLOPs per pair: 2 K len d (scores) + 2 K len d (pass 2) + 2 K len d per output tile (pass 3) + 2 len d S
// (projection): at K = 36, S = 256 the attention (both passes) is 28% of the projection. The score tile rounds len
// up to 16 words; the attention and projection FMAs run for the valid words only.
//
// Limits: K <= kMaxRegions = 64, L_max <= kMaxWords = 128, S <= kMaxSimDim = 1024, any d >= 1 (see
// plan_local_sim, which says why it refuses). Dynamic shared memory (local_smem_layout), with kp = K rounded up to
// 16, lp = L_max rounded up to 16, sp = min(S rounded up to 32, 256), in 4-byte (8-byte for float64) elements:
//   32 (kp + 1) + 32 (max(lp, sp) + 1) + kp (lp + 1) + kp + 2176
// float32: 54400 B at K = 36, L_max = 32, S = 256 (SGRAF), 83200 B at the limits (K = 64, L_max = 128, S >= 256);
// float64 doubles it (166400 B at the limits: fits A100's 163 KiB opt-in and H100's 227 KiB); the binding refuses
// what the device cannot hold.
//
// Every block function is written once against an executor `ex` whose `each(f)` runs f(tid, state) for every
// thread of the block and then synchronises: on the GPU f runs on the calling thread and `each` ends with
// __syncthreads(); on the host (csrc/local_sim/emulate.cpp) the threads run one after another in any order.
// Control flow outside `each` is block-uniform and there are no warp-level primitives, so the host emulation runs
// the very code the GPU runs. This header has no torch dependency; outside nvcc only the host-side parts (no
// kernel, no launcher) compile. Everything lives in itm::cuda::ls.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_launch.cuh"
#include "xattn_sim/math.h"

namespace itm {
namespace cuda {
namespace ls {

constexpr int kThreads = 256;                     // threads per block
constexpr int kMaxRegions = 64;                   // K limit: rows of the score tile
constexpr int kMaxWords = 128;                    // L_max limit: columns of the score tile
constexpr int kMaxSimDim = 1024;                  // S limit (SGRAF: 256); S > 256 runs in output tiles
constexpr int kRegionTiles = kMaxRegions / 16;    // score rows per thread (16 x 16 threads)
constexpr int kScoreWordTiles = kMaxWords / 16;   // score columns per thread
constexpr int kDk = 32;                           // features staged per chunk
constexpr int kWordTile = 32;                     // words per tile of passes 2 and 3
constexpr int kWordGroups = 8;                    // projection: threads along the words
constexpr int kRowsPerThread = kWordTile / kWordGroups;        // 4 word rows per thread
constexpr int kColGroups = kThreads / kWordGroups;             // 32 threads along the outputs (one warp)
constexpr int kColTile = 256;                     // outputs per pass-3 tile
constexpr int kColsPerThread = kColTile / kColGroups;          // 8 outputs per thread
constexpr int kFeatGroups = kThreads / kWordTile;              // attention: 8 feature groups of 32 threads
constexpr int kFeatsPerThread = kDk / kFeatGroups;             // 4 features of a chunk per thread
constexpr int64_t kMaxBlocksPerLaunch = 0x7fffffff;

static_assert(kWordGroups * kColGroups == kThreads && kFeatGroups * kWordTile == kThreads, "thread layout");
static_assert(kColGroups == 32, "a warp owns whole word rows of the output tile");

// ---------------------------------------------------------------------------------------------------------
// Geometry shared by the launcher, the kernel and the host emulation.

struct LocalShape {
  int K, L, d, S;  // regions, words per caption (L_max), features, outputs (sim_dim)
  int kp, lp;      // K and L rounded up to 16
  int sp;          // W rows staged per chunk: min(S rounded up to 32, kColTile)
};

ITM_HD LocalShape local_shape(int K, int L, int d, int S) {
  LocalShape s{};
  s.K = K;
  s.L = L;
  s.d = d;
  s.S = S;
  s.kp = round_up16(K);
  s.lp = round_up16(L);
  s.sp = min_of((S + 31) / 32 * 32, kColTile);
  return s;
}

// Shared-memory layout, in accumulator elements. Odd strides keep the staging writes (consecutive threads,
// consecutive features of one row) and the column reads free of bank conflicts.
struct LocalSmem {
  int vs_stride, es_stride, ws_stride, h_stride, ds_stride, part_stride;
  int vs_off;     // vs[kk * vs_stride + k]: feature d0 + kk of region k (kDk x kp)
  int stage_off;  // pass 1: es[kk * es_stride + t], feature d0 + kk of word t (kDk x lp);
                  // pass 3: ws[kk * ws_stride + j], feature d0 + kk of W row s0 + j (kDk x sp); same storage
  int h_off;      // h[k * h_stride + t]: h, then alpha (kp x lp)
  int rnorm_off;  // |h_k.| + eps per region (kp)
  int ds_off;     // ds[kk * ds_stride + w]: words of the tile, then (a^ - e)^2 (kDk x kWordTile)
  int inv_off;    // 1 / (|a_t| + eps) per word of the tile (kWordTile)
  int part_off;   // part[w * part_stride + g]: per-thread partial sums of |a|^2 (8) or |y|^2 (32) per word
  int rowsq_off;  // |y_t|^2 over the output tiles so far, then 1 / (|y_t| + eps) (kWordTile)
  int total;
};

ITM_HD LocalSmem local_smem_layout(const LocalShape& s) {
  LocalSmem m{};
  m.vs_stride = s.kp + 1;
  m.es_stride = s.lp + 1;
  m.ws_stride = s.sp + 1;
  m.h_stride = s.lp + 1;
  m.ds_stride = kWordTile + 1;
  m.part_stride = kColGroups + 1;
  m.vs_off = 0;
  m.stage_off = m.vs_off + kDk * m.vs_stride;
  m.h_off = m.stage_off + kDk * max_of(m.es_stride, m.ws_stride);
  m.rnorm_off = m.h_off + s.kp * m.h_stride;
  m.ds_off = m.rnorm_off + s.kp;
  m.inv_off = m.ds_off + kDk * m.ds_stride;
  m.part_off = m.inv_off + kWordTile;
  m.rowsq_off = m.part_off + kWordTile * m.part_stride;
  m.total = m.rowsq_off + kWordTile;
  return m;
}

// ---------------------------------------------------------------------------------------------------------
// Kernel arguments (trivially copyable, passed by value) and per-thread state.

template <class T> struct LocalArgs {
  const T* images;          // (n_img, K, d)
  const T* captions;        // (n_cap, L, d)
  const int64_t* cap_lens;  // (n_cap,)
  const T* weight;          // (S, d)
  const T* bias;            // (S,)
  acc_t<T>* out;            // (n_img, n_cap, L, S)
  int64_t n_cap;
  int64_t pair0;            // pair of block 0; pair p = image (p / n_cap), caption (p % n_cap)
  acc_t<T> lambda;
  LocalShape shape;
  LocalSmem lay;            // local_smem_layout(shape), computed on the host: read from the parameter space, the
                            // offsets need no registers (computed in the kernel, sm_90 spilled 8 bytes)
};

// Register tiles, live across phases (registers on the GPU): the score tile of pass 1, the output tile of pass 3
// (never live at the same time) and the partial |a|^2 of pass 2.
template <class A> struct ThreadState {
  A score[kRegionTiles][kScoreWordTiles];
  A y[kRowsPerThread][kColsPerThread];
  A asq;
};

// ---------------------------------------------------------------------------------------------------------
// Block-level building blocks (each is the body of one phase, run by thread tid).

// dst[kk * stride + x] = feature d0 + kk of row x of `base` (row stride d) for x < valid and kk < nf; zero for
// valid <= x < n or nf <= kk < kDk (rows at or beyond `valid` are never read). Consecutive threads read
// consecutive features of a row.
template <class T, class A>
ITM_HD void stage(int tid, const T* base, int valid, int n, int d, int d0, int nf, A* dst, int stride) {
  for (int idx = tid; idx < n * kDk; idx += kThreads) {
    const int x = idx / kDk, kk = idx - x * kDk;
    dst[kk * stride + x] = (x < valid && kk < nf) ? load_acc<A>(base + int64_t(x) * d + d0 + kk) : A(0);
  }
}

// score[r][c] += sum_{kk < nf} vs[kk][ty + 16 r] * es[kk][tx + 16 c] for r < MT, c < nt.
template <class A, int MT>
ITM_HD void score_chunk_mt(int tid, ThreadState<A>& st, const A* vs, int vss, const A* es, int ess, int nf, int nt) {
  const int tx = tid % 16, ty = tid / 16;
  for (int kk = 0; kk < nf; ++kk) {
    A a[MT], b[kScoreWordTiles];
    ITM_UNROLL for (int r = 0; r < MT; ++r) a[r] = vs[kk * vss + ty + 16 * r];
    ITM_UNROLL for (int c = 0; c < kScoreWordTiles; ++c) b[c] = c < nt ? es[kk * ess + tx + 16 * c] : A(0);
    ITM_UNROLL for (int c = 0; c < kScoreWordTiles; ++c)
      if (c < nt) {
        ITM_UNROLL for (int r = 0; r < MT; ++r) st.score[r][c] += a[r] * b[c];
      }
  }
}

template <class A>
ITM_HD void score_chunk(int tid, ThreadState<A>& st, const A* vs, int vss, const A* es, int ess, int nf, int mt,
                        int nt) {
  switch (mt) {
    case 1: score_chunk_mt<A, 1>(tid, st, vs, vss, es, ess, nf, nt); break;
    case 2: score_chunk_mt<A, 2>(tid, st, vs, vss, es, ess, nf, nt); break;
    case 3: score_chunk_mt<A, 3>(tid, st, vs, vss, es, ess, nf, nt); break;
    default: score_chunk_mt<A, 4>(tid, st, vs, vss, es, ess, nf, nt); break;
  }
}

// Attended vector entries of one chunk: a[j] = sum_{k < K} alpha[k][t] vs[g + 8 j][k] for the thread's word t
// and features g + 8 j (j < kFeatsPerThread). Within a warp t varies and the features do not: alpha reads are
// consecutive, vs reads broadcast.
template <class A>
ITM_HD void attend(const A* alpha, int hs, int t, const A* vs, int vss, int g, int K, A (&a)[kFeatsPerThread]) {
  ITM_UNROLL for (int j = 0; j < kFeatsPerThread; ++j) a[j] = A(0);
  for (int k = 0; k < K; ++k) {
    const A w = alpha[k * hs + t];
    ITM_UNROLL for (int j = 0; j < kFeatsPerThread; ++j) a[j] += w * vs[(g + kFeatGroups * j) * vss + k];
  }
}

// y[r][c] += sum_{kk < nf} ds[kk][wy + 8 r] * ws[kk][cx + 32 c] for r < nr, c < CT. A warp shares wy, so nr is
// warp-uniform and the ds reads broadcast; the ws reads are consecutive.
template <class A, int CT>
ITM_HD void project_ct(int tid, ThreadState<A>& st, const A* ds, int dss, const A* ws, int wss, int nf, int nr) {
  const int wy = tid / kColGroups, cx = tid % kColGroups;
  for (int kk = 0; kk < nf; ++kk) {
    A a[kRowsPerThread], b[CT];
    ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r) a[r] = ds[kk * dss + wy + kWordGroups * r];
    ITM_UNROLL for (int c = 0; c < CT; ++c) b[c] = ws[kk * wss + cx + kColGroups * c];
    ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r)
      if (r < nr) {
        ITM_UNROLL for (int c = 0; c < CT; ++c) st.y[r][c] += a[r] * b[c];
      }
  }
}

template <class A>
ITM_HD void project(int tid, ThreadState<A>& st, const A* ds, int dss, const A* ws, int wss, int nf, int nr,
                    int ct) {
  switch (ct) {
    case 1: project_ct<A, 1>(tid, st, ds, dss, ws, wss, nf, nr); break;
    case 2: project_ct<A, 2>(tid, st, ds, dss, ws, wss, nf, nr); break;
    case 3: project_ct<A, 3>(tid, st, ds, dss, ws, wss, nf, nr); break;
    case 4: project_ct<A, 4>(tid, st, ds, dss, ws, wss, nf, nr); break;
    case 5: project_ct<A, 5>(tid, st, ds, dss, ws, wss, nf, nr); break;
    case 6: project_ct<A, 6>(tid, st, ds, dss, ws, wss, nf, nr); break;
    case 7: project_ct<A, 7>(tid, st, ds, dss, ws, wss, nf, nr); break;
    default: project_ct<A, 8>(tid, st, ds, dss, ws, wss, nf, nr); break;
  }
}

// ---------------------------------------------------------------------------------------------------------
// The block of one (image, caption) pair.

template <class T, class Exec>
ITM_HD void local_sim_block(Exec& ex, acc_t<T>* smem, const LocalArgs<T>& a, int64_t block) {
  using A = acc_t<T>;
  const LocalShape sh = a.shape;
  const LocalSmem& lay = a.lay;
  const int64_t pair = a.pair0 + block;
  const int64_t img = pair / a.n_cap, cap = pair - img * a.n_cap;
  const int K = sh.K, L = sh.L, d = sh.d, S = sh.S, kp = sh.kp;
  const int len = clamp_len(a.cap_lens[cap], L);
  const int mt = kp / 16, nt = round_up16(len) / 16;  // score tiles: regions, words of this caption
  const T* v = a.images + img * K * int64_t(d);
  const T* e = a.captions + cap * L * int64_t(d);
  A* out = a.out + pair * L * int64_t(S);

  A* vs = smem + lay.vs_off;
  A* es = smem + lay.stage_off;
  A* ws = smem + lay.stage_off;
  A* h = smem + lay.h_off;  // h, then alpha
  A* rnorm = smem + lay.rnorm_off;
  A* ds = smem + lay.ds_off;
  A* inv = smem + lay.inv_off;
  A* part = smem + lay.part_off;
  A* rowsq = smem + lay.rowsq_off;
  const int vss = lay.vs_stride, ess = lay.es_stride, wss = lay.ws_stride, hs = lay.h_stride;
  const int dss = lay.ds_stride, ps = lay.part_stride;
  const A lambda = a.lambda;

  // Pass 1: the score tile S = V E^T (K x len) in registers.
  for (int d0 = 0; d0 < d; d0 += kDk) {
    const int nf = min_of(kDk, d - d0);
    ex.each([&](int tid, ThreadState<A>& st) {
      if (d0 == 0) {
        ITM_UNROLL for (int r = 0; r < kRegionTiles; ++r)
          ITM_UNROLL for (int c = 0; c < kScoreWordTiles; ++c) st.score[r][c] = A(0);
      }
      stage(tid, v, K, kp, d, d0, nf, vs, vss);
      stage(tid, e, len, 16 * nt, d, d0, nf, es, ess);
    });
    ex.each([&](int tid, ThreadState<A>& st) { score_chunk(tid, st, vs, vss, es, ess, nf, mt, nt); });
  }
  // h = LeakyReLU(S) on the valid cells (0 on the padding cells of the tile); the output rows beyond len get 0.
  ex.each([&](int tid, ThreadState<A>& st) {
    const int tx = tid % 16, ty = tid / 16;
    ITM_UNROLL for (int r = 0; r < kRegionTiles; ++r)
      ITM_UNROLL for (int c = 0; c < kScoreWordTiles; ++c) {
        const int k = ty + 16 * r, t = tx + 16 * c;
        if (r < mt && c < nt) h[k * hs + t] = (k < K && t < len) ? leaky_relu(st.score[r][c]) : A(0);
      }
    for (int64_t idx = tid; idx < int64_t(L - len) * S; idx += kThreads) out[int64_t(len) * S + idx] = A(0);
  });
  // Per-region l2 norm of h over the caption's words.
  ex.each([&](int tid, ThreadState<A>&) {
    for (int k = tid; k < K; k += kThreads) {
      A sq = A(0);
      for (int t = 0; t < len; ++t) sq += h[k * hs + t] * h[k * hs + t];
      rnorm[k] = std::sqrt(sq) + A(kEps);
    }
  });
  // alpha[k][t] = softmax over the regions k < K of lambda h[k][t] / rnorm[k], per word t < len; in place of h.
  ex.each([&](int tid, ThreadState<A>&) {
    for (int t = tid; t < len; t += kThreads) {
      A m = A(-INFINITY);
      for (int k = 0; k < K; ++k) m = max_of(m, lambda * (h[k * hs + t] / rnorm[k]));
      A sum = A(0);
      for (int k = 0; k < K; ++k) {
        const A x = std::exp(lambda * (h[k * hs + t] / rnorm[k]) - m);
        h[k * hs + t] = x;
        sum += x;
      }
      const A r = A(1) / sum;
      for (int k = 0; k < K; ++k) h[k * hs + t] *= r;
    }
  });

  for (int t0 = 0; t0 < len; t0 += kWordTile) {
    const int tl = min_of(kWordTile, len - t0);  // words of this tile

    // Pass 2: |a_t|^2 of the tile's words; thread (w = tid % 32, g = tid / 32) owns word t0 + w, features g + 8 j.
    for (int d0 = 0; d0 < d; d0 += kDk) {
      const int nf = min_of(kDk, d - d0);
      ex.each([&](int tid, ThreadState<A>& st) {
        if (d0 == 0) st.asq = A(0);
        stage(tid, v, K, K, d, d0, nf, vs, vss);
      });
      ex.each([&](int tid, ThreadState<A>& st) {
        const int w = tid % kWordTile, g = tid / kWordTile;
        if (w >= tl) return;
        A at[kFeatsPerThread];
        attend(h, hs, t0 + w, vs, vss, g, K, at);
        ITM_UNROLL for (int j = 0; j < kFeatsPerThread; ++j)
          if (g + kFeatGroups * j < nf) st.asq += at[j] * at[j];
      });
    }
    ex.each([&](int tid, ThreadState<A>& st) { part[(tid % kWordTile) * ps + tid / kWordTile] = st.asq; });
    ex.each([&](int tid, ThreadState<A>&) {
      for (int w = tid; w < kWordTile; w += kThreads) {
        A sq = A(0);
        for (int g = 0; g < kFeatGroups; ++g) sq += part[w * ps + g];
        inv[w] = A(1) / (std::sqrt(sq) + A(kEps));
        rowsq[w] = A(0);
      }
    });

    // Pass 3, per output tile [s0, s0 + ns): y = W (a^ - e)^2 + b for the tile's words.
    for (int s0 = 0; s0 < S; s0 += kColTile) {
      const int ns = min_of(kColTile, S - s0);
      const int ct = (ns + kColGroups - 1) / kColGroups;  // outputs per thread
      const bool last = s0 + kColTile >= S;
      for (int d0 = 0; d0 < d; d0 += kDk) {
        const int nf = min_of(kDk, d - d0);
        ex.each([&](int tid, ThreadState<A>& st) {
          if (d0 == 0) {
            ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r)
              ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c) st.y[r][c] = A(0);
          }
          stage(tid, v, K, K, d, d0, nf, vs, vss);
          stage(tid, e + int64_t(t0) * d, tl, kWordTile, d, d0, nf, ds, dss);
          stage(tid, a.weight + int64_t(s0) * d, ns, kColGroups * ct, d, d0, nf, ws, wss);
        });
        // ds[f][w] = (a_t / (|a_t| + eps) - e_t)^2 for the chunk (it held e_t); zero rows and features stay zero.
        ex.each([&](int tid, ThreadState<A>&) {
          const int w = tid % kWordTile, g = tid / kWordTile;
          if (w >= tl) return;
          A at[kFeatsPerThread];
          attend(h, hs, t0 + w, vs, vss, g, K, at);
          ITM_UNROLL for (int j = 0; j < kFeatsPerThread; ++j) {
            const int f = g + kFeatGroups * j;
            if (f < nf) {
              const A x = at[j] * inv[w] - ds[f * dss + w];
              ds[f * dss + w] = x * x;
            }
          }
        });
        ex.each([&](int tid, ThreadState<A>& st) {
          const int wy = tid / kColGroups;
          const int nr = tl > wy ? min_of(kRowsPerThread, (tl - wy + kWordGroups - 1) / kWordGroups) : 0;
          project(tid, st, ds, dss, ws, wss, nf, nr, ct);
        });
      }
      // + b, and the partial |y|^2 of each row over this thread's outputs.
      ex.each([&](int tid, ThreadState<A>& st) {
        const int wy = tid / kColGroups, cx = tid % kColGroups;
        ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r) {
          A sq = A(0);
          ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c) {
            const int j = cx + kColGroups * c;
            if (c < ct && j < ns) {
              st.y[r][c] += load_acc<A>(a.bias + s0 + j);
              sq += st.y[r][c] * st.y[r][c];
            }
          }
          part[(wy + kWordGroups * r) * ps + cx] = sq;
        }
      });
      ex.each([&](int tid, ThreadState<A>&) {
        for (int w = tid; w < tl; w += kThreads) {
          A sq = rowsq[w];
          for (int x = 0; x < kColGroups; ++x) sq += part[w * ps + x];
          rowsq[w] = last ? A(1) / (std::sqrt(sq) + A(kEps)) : sq;
        }
      });
      // Store: normalised when this is the last output tile, otherwise raw (rescaled below).
      ex.each([&](int tid, ThreadState<A>& st) {
        const int wy = tid / kColGroups, cx = tid % kColGroups;
        ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r) {
          const int w = wy + kWordGroups * r;
          if (w >= tl) continue;
          const A scale = last ? rowsq[w] : A(1);
          A* row = out + int64_t(t0 + w) * S + s0;
          ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c) {
            const int j = cx + kColGroups * c;
            if (c < ct && j < ns) row[j] = st.y[r][c] * scale;
          }
        }
      });
    }
    if (S > kColTile) {  // rescale the raw outputs of the earlier tiles of this word tile
      const int raw = (S - 1) / kColTile * kColTile;
      ex.each([&](int tid, ThreadState<A>&) {
        for (int idx = tid; idx < tl * raw; idx += kThreads) {
          const int w = idx / raw, j = idx - w * raw;
          out[int64_t(t0 + w) * S + j] *= rowsq[w];
        }
      });
    }
  }
}

// ---------------------------------------------------------------------------------------------------------
// Plan: validation of the problem, geometry and shared memory; shared by the launcher and the emulation.

template <class T> struct LocalProblem {
  const T* images;          // (n_img, K, d), contiguous
  const T* captions;        // (n_cap, L, d), contiguous
  const int64_t* cap_lens;  // (n_cap,) in 1..L
  const T* weight;          // (S, d), contiguous
  const T* bias;            // (S,)
  acc_t<T>* out;            // (n_img, n_cap, L, S), contiguous
  int64_t n_img, n_cap;
  int K, L, d, S;
  double lambda_softmax;
};

struct LocalPlan {
  const char* error;  // nullptr when the problem is supported
  LocalShape shape;
  int64_t pairs;      // n_img * n_cap thread blocks, in launches of at most kMaxBlocksPerLaunch
  size_t smem_bytes;  // dynamic shared memory per block
};

template <class T> LocalPlan plan_local_sim(const LocalProblem<T>& p) {
  using A = acc_t<T>;
  LocalPlan plan{};
  if (p.n_img < 1 || p.n_cap < 1 || p.K < 1 || p.L < 1 || p.d < 1 || p.S < 1) {
    plan.error = "images, captions and weight must be non-empty";
    return plan;
  }
  if (!std::isfinite(p.lambda_softmax) || p.lambda_softmax < 0) {
    plan.error = "lambda_softmax must be finite and >= 0";
    return plan;
  }
  if (p.K > kMaxRegions) {
    plan.error = "the CUDA kernel supports at most 64 regions per image (K); use backend='torch'";
    return plan;
  }
  if (p.L > kMaxWords) {
    plan.error = "the CUDA kernel supports captions of at most 128 words (L_max); use backend='torch'";
    return plan;
  }
  if (p.S > kMaxSimDim) {
    plan.error = "the CUDA kernel supports at most 1024 outputs per word (sim_dim, rows of weight); use "
                 "backend='torch'";
    return plan;
  }
  if (p.n_img > INT64_MAX / p.n_cap / p.L / p.S) {
    plan.error = "too many (image, caption) pairs: split the inputs";
    return plan;
  }
  plan.shape = local_shape(p.K, p.L, p.d, p.S);
  plan.pairs = p.n_img * p.n_cap;
  plan.smem_bytes = size_t(local_smem_layout(plan.shape).total) * sizeof(A);
  return plan;
}

// Issues the launches of a planned problem through `run.main(LocalArgs, blocks)`: one block per pair, at most
// kMaxBlocksPerLaunch per launch.
template <class T, class Runner> void drive_local_sim(const LocalProblem<T>& p, const LocalPlan& plan, Runner& run) {
  using A = acc_t<T>;
  for (int64_t p0 = 0; p0 < plan.pairs; p0 += kMaxBlocksPerLaunch) {
    LocalArgs<T> a{};
    a.images = p.images;
    a.captions = p.captions;
    a.cap_lens = p.cap_lens;
    a.weight = p.weight;
    a.bias = p.bias;
    a.out = p.out;
    a.n_cap = p.n_cap;
    a.pair0 = p0;
    a.lambda = A(p.lambda_softmax);
    a.shape = plan.shape;
    a.lay = local_smem_layout(plan.shape);
    run.main(a, min_of(kMaxBlocksPerLaunch, plan.pairs - p0));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernel and launcher (nvcc only).
#if defined(__CUDACC__)

// Minimum resident blocks per SM for __launch_bounds__. Float accumulation gets 128 registers (2 blocks of 256
// threads per SM; SGRAF shapes need 53 KiB of shared memory each): with nvcc 13.0 it uses all of them without
// spills, while a cap of 80 (3 blocks) spilled a few bytes whatever the unrolling. float64 gets up to 255 (uses
// about 230, one block per SM). tools/compile_check_cuda.sh prints the counts.
template <class T> struct MinBlocksPerSm { static constexpr int value = 2; };
template <> struct MinBlocksPerSm<double> { static constexpr int value = 1; };

template <class T>
__global__ void __launch_bounds__(kThreads, MinBlocksPerSm<T>::value) local_sim_kernel(const LocalArgs<T> a) {
  extern __shared__ __align__(16) unsigned char itm_ls_smem[];
  ThreadState<acc_t<T>> st;
  DeviceExec<ThreadState<acc_t<T>>> ex{st};
  local_sim_block<T>(ex, reinterpret_cast<acc_t<T>*>(itm_ls_smem), a, int64_t(blockIdx.x));
}

template <class T> struct DeviceRunner {
  KernelLauncher<LocalArgs<T>> main;
};

// Launches a problem that `plan_local_sim` accepted (plan.error == nullptr) on `stream`; the caller checks that
// plan.smem_bytes fits the device (cudaDevAttrMaxSharedMemoryPerBlockOptin). Returns the first launch error.
template <class T> cudaError_t local_sim_cuda(const LocalProblem<T>& p, const LocalPlan& plan, cudaStream_t stream) {
  cudaError_t err = allow_dynamic_smem(local_sim_kernel<T>, plan.smem_bytes);
  if (err != cudaSuccess) return err;
  DeviceRunner<T> run{{local_sim_kernel<T>, kThreads, plan.smem_bytes, stream, &err}};
  drive_local_sim(p, plan, run);
  return err;
}

#endif  // __CUDACC__

}  // namespace ls
}  // namespace cuda
}  // namespace itm
