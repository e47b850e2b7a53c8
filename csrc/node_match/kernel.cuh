// GSMN node-level matching (itm_kernels::node_match_cuda): device code and a torch-free host launcher.
//
// Semantics: itm_kernels/node_match/ (`node_match_reference` is the spec). For image i (regions v_k, k < K),
// caption c (words e_t, t < len_c) and feature block b (num_blocks = B equal slices of d, db = d / B features):
//   S_kt = v_k . e_t,  h_kt = LeakyReLU_0.1(S_kt)  (0 for t >= len_c)
//   regions query words:  alpha_kt = softmax_{t < len}(lambda h_kt / (|h_.t| + 1e-8)),  |h_.t|^2 = sum_k h_kt^2
//                         region[i, c, k, b] = cos(v_k,b, sum_t alpha_kt e_t,b)
//   words query regions:  beta_tk  = softmax_{k < K}(lambda h_kt / (|h_k.| + 1e-8)),   |h_k.|^2 = sum_t h_kt^2
//                         word[i, c, t, b]   = cos(e_t,b, sum_k beta_tk v_k,b)   (0 for len <= t < L_max)
//   cos(x, y) = x.y / max(|x| |y|, 1e-8).
//
// One thread block (256 threads, seen as 16 x 16) per (image, caption) pair:
//   pass 1  streams V_i (K x d) and the caption's words (len x d) through shared memory in chunks of kDk = 32
//           features and accumulates the score tile S (K x L) in registers (4 x 8 cells per thread); padding words
//           (t >= len) are never read;
//   epilogue in shared memory: h, the two l2 norms, beta (softmax over the regions per word) into its own tile,
//           then alpha (softmax over the words per region) in place of h;
//   pass 2  streams V_i and E_c again, one chunk of at most kDk features at a time, chunks aligned to the feature
//           blocks (whole blocks when db <= kDk, otherwise pieces of one block). Per chunk it forms the attended
//           contexts explicitly, ctx_v = alpha E (K x chunk) and ctx_t = beta^T V (L x chunk), in shared memory,
//           and reduces, per (row, block), x.ctx, |ctx|^2 and |x|^2 over the chunk's features; a block that spans
//           several chunks (db > kDk) carries its partial sums in shared memory. When a block is complete its
//           cosine is written to global memory: one write per output value, the word rows len..L_max-1 get 0.
// Why explicit contexts rather than the Gram form of the CPU kernel (|ctx_b|^2 = alpha^T G^b alpha): it needs no
// per-image / per-caption Gram workspace nor a prologue launch, holds only K x L (not K x L x B) values per pair,
// works for every num_blocks, and does not cancel for narrow blocks (see GRAM_MIN_BLOCK_WIDTH in node_match.py).
// Its cost is a second pass over V_i and E_c (L2-resident) and 2 K L d extra FMAs per pair (3 K L d in all).
// Accumulation is float32 for float32/float16/bfloat16 inputs, float64 for float64 inputs.
//
// Limits: K <= kMaxRegions = 64, L_max <= kMaxWords = 128, any num_blocks >= 1 dividing d (see plan_node_match,
// which says why it refuses). Dynamic shared memory (node_smem_layout): 4 or 8 bytes x (64 + 69 (kp + lp) +
// 2 kp (lp + 1)), kp / lp = K / L_max rounded up to 16; float32: 35008 B at K = 36, L_max = 32 and 119296 B at the
// limits. float64 doubles it (238592 B at the limits, more than any GPU allows: with K = 64 it fits L_max <= 112 on
// H100's 227 KiB, L_max <= 80 on A100's 163 KiB); the binding refuses what the device cannot hold.
//
// Every block function is written once against an executor `ex` whose `each(f)` runs f(tid, state) for every
// thread of the block and then synchronises: on the GPU f runs on the calling thread and `each` ends with
// __syncthreads(); on the host (csrc/node_match/emulate.cpp) the threads run one after another in any order.
// Control flow outside `each` is block-uniform and there are no warp-level primitives, so the host emulation runs
// the very code the GPU runs. This header has no torch dependency; outside nvcc only the host-side parts (no
// kernel, no launcher) compile. Everything lives in itm::cuda::nm, apart from the xattn_sim kernel's names.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_launch.cuh"
#include "xattn_sim/math.h"

namespace itm {
namespace cuda {
namespace nm {

constexpr int kThreads = 256;                    // threads per block, seen as 16 x 16 for the tile products
constexpr int kMaxRegions = 64;                  // K limit: rows of the score tile
constexpr int kMaxWords = 128;                   // L_max limit: columns of the score tile
constexpr int kRegionTiles = kMaxRegions / 16;   // score rows per thread
constexpr int kWordTiles = kMaxWords / 16;       // score columns per thread (and word rows of ctx_t)
constexpr int kDk = 32;                          // features staged per chunk
constexpr int kFeatTiles = kDk / 16;             // context columns per thread
constexpr int64_t kMaxBlocksPerLaunch = 0x7fffffff;


// ---------------------------------------------------------------------------------------------------------
// Geometry shared by the launcher, the kernel and the host emulation.

struct NodeShape {
  int K, L, d, B, db;  // regions, words per caption (L_max), features, blocks, features per block
  int kp, lp;          // K and L rounded up to 16: rows and columns of the score tile
  int chunk;           // features per pass-2 chunk: whole blocks when db <= kDk, else kDk (pieces of one block)
  bool carry;          // db > kDk: a block spans several chunks and carries its partial sums
};

ITM_HD NodeShape node_shape(int K, int L, int d, int B) {
  NodeShape s{};
  s.K = K;
  s.L = L;
  s.d = d;
  s.B = B;
  s.db = B > 0 ? d / B : 0;
  s.kp = round_up16(K);
  s.lp = round_up16(L);
  s.carry = s.db > kDk;
  s.chunk = s.carry || s.db < 1 ? kDk : (kDk / s.db) * s.db;
  return s;
}

// Features of the pass-2 chunk that starts at feature d0 (chunks never straddle a block boundary).
ITM_HD int chunk_len(const NodeShape& s, int d0) {
  if (!s.carry) return min_of(s.chunk, s.d - d0);
  return min_of(kDk, (d0 / s.db + 1) * s.db - d0);
}

// Shared-memory layout, in accumulator elements. Odd strides keep the row-per-thread and column-per-thread loops
// free of bank conflicts.
struct NodeSmem {
  int vs_stride, es_stride, h_stride, c_stride;
  int vs_off;     // vs[kk * vs_stride + k]: feature d0 + kk of region k (kDk x kp)
  int es_off;     // es[kk * es_stride + t]: feature d0 + kk of word t (kDk x lp)
  int h_off;      // h[k * h_stride + t]: h, then alpha (kp x lp)
  int beta_off;   // beta[k * h_stride + t] (kp x lp)
  int cv_off;     // cv[k * c_stride + kk]: region contexts alpha E of the chunk (kp x kDk)
  int ct_off;     // ct[t * c_stride + kk]: word contexts beta^T V of the chunk (lp x kDk)
  int rnorm_off;  // |h_k.| + eps (kp)
  int cnorm_off;  // |h_.t| + eps (lp)
  int acc_off;    // partial sums carried across chunks: x.ctx, |ctx|^2, |x|^2 for kp region + lp word rows
  int total;
};

ITM_HD NodeSmem node_smem_layout(const NodeShape& s) {
  NodeSmem m{};
  m.vs_stride = s.kp + 1;
  m.es_stride = s.lp + 1;
  m.h_stride = s.lp + 1;
  m.c_stride = kDk + 1;
  m.vs_off = 0;
  m.es_off = m.vs_off + kDk * m.vs_stride;
  m.h_off = m.es_off + kDk * m.es_stride;
  m.beta_off = m.h_off + s.kp * m.h_stride;
  m.cv_off = m.beta_off + s.kp * m.h_stride;
  m.ct_off = m.cv_off + s.kp * m.c_stride;
  m.rnorm_off = m.ct_off + s.lp * m.c_stride;
  m.cnorm_off = m.rnorm_off + s.kp;
  m.acc_off = m.cnorm_off + s.lp;
  m.total = m.acc_off + 3 * (s.kp + s.lp);
  return m;
}

// ---------------------------------------------------------------------------------------------------------
// Kernel arguments (trivially copyable, passed by value) and per-thread state.

template <class T> struct NodeArgs {
  const T* images;        // (n_img, K, d)
  const T* captions;      // (n_cap, L, d)
  const int64_t* cap_lens;  // (n_cap,)
  acc_t<T>* region;       // (n_img, n_cap, K, B)
  acc_t<T>* word;         // (n_img, n_cap, L, B)
  int64_t n_cap;
  int64_t pair0;          // pair of blockIdx.x == 0; pair p = image (p / n_cap), caption (p % n_cap)
  acc_t<T> lambda;
  NodeShape shape;
};

// Score accumulators, live across the phases of pass 1 (registers on the GPU).
template <class A> struct ThreadState {
  A acc[kRegionTiles][kWordTiles];
};

template <class A> ITM_HD void zero_state(ThreadState<A>& st) {
  ITM_UNROLL for (int r = 0; r < kRegionTiles; ++r)
    ITM_UNROLL for (int c = 0; c < kWordTiles; ++c) st.acc[r][c] = A(0);
}

// ---------------------------------------------------------------------------------------------------------
// Block-level building blocks (each is the body of one phase, run by thread tid).

// dst[kk * stride + x] = feature d0 + kk of row x of `base` (row stride d) for x < valid and kk < nf; zero for
// valid <= x < n or nf <= kk < kDk (rows beyond `valid` are never read). Consecutive threads read consecutive
// features of a row.
template <class T, class A>
ITM_HD void stage_rows(int tid, const T* base, int valid, int n, int d, int d0, int nf, A* dst, int stride) {
  for (int idx = tid; idx < n * kDk; idx += kThreads) {
    const int x = idx / kDk, kk = idx - x * kDk;
    dst[kk * stride + x] = (x < valid && kk < nf) ? load_acc<A>(base + int64_t(x) * d + d0 + kk) : A(0);
  }
}

// acc[r][c] += sum_kk vs[kk][ty + 16 r] * es[kk][tx + 16 c] for r < MT, c < nt.
template <class A, int MT>
ITM_HD void score_chunk_mt(int tid, ThreadState<A>& st, const A* vs, int vs_stride, const A* es, int es_stride,
                           int nt) {
  const int tx = tid % 16, ty = tid / 16;
  for (int kk = 0; kk < kDk; ++kk) {
    A a[MT], b[kWordTiles];
    ITM_UNROLL for (int r = 0; r < MT; ++r) a[r] = vs[kk * vs_stride + ty + 16 * r];
    ITM_UNROLL for (int c = 0; c < kWordTiles; ++c) b[c] = c < nt ? es[kk * es_stride + tx + 16 * c] : A(0);
    ITM_UNROLL for (int r = 0; r < MT; ++r)
      ITM_UNROLL for (int c = 0; c < kWordTiles; ++c) st.acc[r][c] += a[r] * b[c];
  }
}

template <class A>
ITM_HD void score_chunk(int tid, ThreadState<A>& st, const A* vs, int vs_stride, const A* es, int es_stride, int mt,
                        int nt) {
  switch (mt) {
    case 1: score_chunk_mt<A, 1>(tid, st, vs, vs_stride, es, es_stride, nt); break;
    case 2: score_chunk_mt<A, 2>(tid, st, vs, vs_stride, es, es_stride, nt); break;
    case 3: score_chunk_mt<A, 3>(tid, st, vs, vs_stride, es, es_stride, nt); break;
    default: score_chunk_mt<A, 4>(tid, st, vs, vs_stride, es, es_stride, nt); break;
  }
}

// out[i * os] = softmax_{i < n}(lambda x[i * xs] / norm[i]), and 0 for n <= i < n_pad. In place (out == x,
// os == xs) is allowed: entry i is read before it is written.
template <class A>
ITM_HD void scaled_softmax(const A* x, int xs, const A* norm, int n, int n_pad, A lambda, A* out, int os) {
  A m = A(-INFINITY);
  for (int i = 0; i < n; ++i) m = max_of(m, lambda * (x[i * xs] / norm[i]));
  A sum = A(0);
  for (int i = 0; i < n; ++i) {
    const A e = std::exp(lambda * (x[i * xs] / norm[i]) - m);
    out[i * os] = e;
    sum += e;
  }
  const A inv = A(1) / sum;
  for (int i = 0; i < n; ++i) out[i * os] *= inv;
  for (int i = n; i < n_pad; ++i) out[i * os] = A(0);
}

// Contexts of one chunk for the thread's cells: cv[k][f] = sum_{t < len} alpha[k][t] es[f][t] for k = ty + 16 r
// (r < mt), ct[t][f] = sum_{k < K} beta[k][t] vs[f][k] for t = ty + 16 r (r < nt); f = tx + 16 c (c < kFeatTiles).
template <class A>
ITM_HD void chunk_contexts(int tid, const A* alpha, const A* beta, int hs, const A* vs, int vs_stride, const A* es,
                           int es_stride, A* cv, A* ct, int cs, int K, int len, int mt, int nt) {
  const int tx = tid % 16, ty = tid / 16;
  A cr[kRegionTiles][kFeatTiles];
  ITM_UNROLL for (int r = 0; r < kRegionTiles; ++r)
    ITM_UNROLL for (int c = 0; c < kFeatTiles; ++c) cr[r][c] = A(0);
  for (int t = 0; t < len; ++t) {
    A a[kRegionTiles], b[kFeatTiles];
    ITM_UNROLL for (int r = 0; r < kRegionTiles; ++r) a[r] = r < mt ? alpha[(ty + 16 * r) * hs + t] : A(0);
    ITM_UNROLL for (int c = 0; c < kFeatTiles; ++c) b[c] = es[(tx + 16 * c) * es_stride + t];
    ITM_UNROLL for (int r = 0; r < kRegionTiles; ++r)
      ITM_UNROLL for (int c = 0; c < kFeatTiles; ++c) cr[r][c] += a[r] * b[c];
  }
  ITM_UNROLL for (int r = 0; r < kRegionTiles; ++r)
    ITM_UNROLL for (int c = 0; c < kFeatTiles; ++c)
      if (r < mt) cv[(ty + 16 * r) * cs + tx + 16 * c] = cr[r][c];

  A cw[kWordTiles][kFeatTiles];
  ITM_UNROLL for (int r = 0; r < kWordTiles; ++r)
    ITM_UNROLL for (int c = 0; c < kFeatTiles; ++c) cw[r][c] = A(0);
  for (int k = 0; k < K; ++k) {
    A a[kWordTiles], b[kFeatTiles];
    ITM_UNROLL for (int r = 0; r < kWordTiles; ++r) a[r] = r < nt ? beta[k * hs + ty + 16 * r] : A(0);
    ITM_UNROLL for (int c = 0; c < kFeatTiles; ++c) b[c] = vs[(tx + 16 * c) * vs_stride + k];
    ITM_UNROLL for (int r = 0; r < kWordTiles; ++r)
      ITM_UNROLL for (int c = 0; c < kFeatTiles; ++c) cw[r][c] += a[r] * b[c];
  }
  ITM_UNROLL for (int r = 0; r < kWordTiles; ++r)
    ITM_UNROLL for (int c = 0; c < kFeatTiles; ++c)
      if (r < nt) ct[(ty + 16 * r) * cs + tx + 16 * c] = cw[r][c];
}

// Partial sums of one (row, block) over the chunk features [lo, hi): q.ctx, |ctx|^2, |q|^2 with q[f] at
// q[f * q_stride] and ctx[f] at c[f].
template <class A> struct BlockSums { A dot, csq, qsq; };

template <class A> ITM_HD BlockSums<A> block_sums(const A* q, int q_stride, const A* c, int lo, int hi) {
  BlockSums<A> s{A(0), A(0), A(0)};
  for (int f = lo; f < hi; ++f) {
    const A x = q[f * q_stride], y = c[f];
    s.dot += x * y;
    s.csq += y * y;
    s.qsq += x * x;
  }
  return s;
}

// ---------------------------------------------------------------------------------------------------------
// The block of one (image, caption) pair.

template <class T, class Exec>
ITM_HD void node_match_block(Exec& ex, acc_t<T>* smem, const NodeArgs<T>& a, int64_t block) {
  using A = acc_t<T>;
  const NodeShape sh = a.shape;
  const NodeSmem lay = node_smem_layout(sh);
  const int64_t pair = a.pair0 + block;
  const int64_t img = pair / a.n_cap, cap = pair - img * a.n_cap;
  const int K = sh.K, L = sh.L, d = sh.d, B = sh.B, db = sh.db, kp = sh.kp, lp = sh.lp;
  const int mt = kp / 16, nt = lp / 16;
  const int len = clamp_len(a.cap_lens[cap], L);
  const T* v = a.images + img * K * int64_t(d);
  const T* e = a.captions + cap * L * int64_t(d);
  A* region_out = a.region + pair * K * int64_t(B);
  A* word_out = a.word + pair * L * int64_t(B);

  A* vs = smem + lay.vs_off;
  A* es = smem + lay.es_off;
  A* h = smem + lay.h_off;  // h, then alpha
  A* beta = smem + lay.beta_off;
  A* cv = smem + lay.cv_off;
  A* ct = smem + lay.ct_off;
  A* rnorm = smem + lay.rnorm_off;
  A* cnorm = smem + lay.cnorm_off;
  A* acc_dot = smem + lay.acc_off;
  A* acc_csq = acc_dot + (kp + lp);
  A* acc_qsq = acc_csq + (kp + lp);
  const int vss = lay.vs_stride, ess = lay.es_stride, hs = lay.h_stride, cs = lay.c_stride;
  const A lambda = a.lambda;

  // Pass 1: the score tile S = V E^T in registers.
  for (int d0 = 0; d0 < d; d0 += kDk) {
    const int nf = min_of(kDk, d - d0);
    ex.each([&](int tid, ThreadState<A>& st) {
      if (d0 == 0) zero_state(st);
      stage_rows(tid, v, K, kp, d, d0, nf, vs, vss);
      stage_rows(tid, e, len, lp, d, d0, nf, es, ess);
    });
    ex.each([&](int tid, ThreadState<A>& st) { score_chunk(tid, st, vs, vss, es, ess, mt, nt); });
  }
  // h = LeakyReLU(S) on the valid cells, 0 elsewhere.
  ex.each([&](int tid, ThreadState<A>& st) {
    const int tx = tid % 16, ty = tid / 16;
    ITM_UNROLL for (int r = 0; r < kRegionTiles; ++r)
      ITM_UNROLL for (int c = 0; c < kWordTiles; ++c) {
        const int k = ty + 16 * r, t = tx + 16 * c;
        if (r < mt && c < nt) h[k * hs + t] = (k < K && t < len) ? leaky_relu(st.acc[r][c]) : A(0);
      }
  });
  // l2 norms of h along the words (per region) and along the regions (per word); zero the carried sums.
  ex.each([&](int tid, ThreadState<A>&) {
    for (int item = tid; item < kp + lp; item += kThreads) {
      A sq = A(0);
      if (item < kp) {
        for (int t = 0; t < len; ++t) sq += h[item * hs + t] * h[item * hs + t];
        rnorm[item] = std::sqrt(sq) + A(kEps);
      } else {
        const int t = item - kp;
        for (int k = 0; k < K; ++k) sq += h[k * hs + t] * h[k * hs + t];
        cnorm[t] = std::sqrt(sq) + A(kEps);
      }
    }
    for (int i = tid; i < 3 * (kp + lp); i += kThreads) acc_dot[i] = A(0);
  });
  // Words query regions: beta[k][t] = softmax over the regions k < K, per valid word t (0 elsewhere).
  ex.each([&](int tid, ThreadState<A>&) {
    for (int t = tid; t < lp; t += kThreads) {
      if (t < len) {
        scaled_softmax(h + t, hs, rnorm, K, kp, lambda, beta + t, hs);
      } else {
        for (int k = 0; k < kp; ++k) beta[k * hs + t] = A(0);
      }
    }
  });
  // Regions query words: alpha[k][t] = softmax over the words t < len, per region k < K; in place of h.
  ex.each([&](int tid, ThreadState<A>&) {
    for (int k = tid; k < kp; k += kThreads) {
      if (k < K) {
        scaled_softmax(h + k * hs, 1, cnorm, len, lp, lambda, h + k * hs, 1);
      } else {
        for (int t = 0; t < lp; ++t) h[k * hs + t] = A(0);
      }
    }
  });

  // Pass 2: per chunk, the attended contexts and the per-block cosines.
  for (int d0 = 0; d0 < d; d0 += chunk_len(sh, d0)) {
    const int nf = chunk_len(sh, d0);
    const int b0 = d0 / db;
    const int nb = sh.carry ? 1 : nf / db;  // blocks in this chunk
    const bool done = !sh.carry || d0 + nf == (b0 + 1) * db;
    ex.each([&](int tid, ThreadState<A>&) {
      stage_rows(tid, v, K, kp, d, d0, nf, vs, vss);
      stage_rows(tid, e, len, lp, d, d0, nf, es, ess);
    });
    ex.each([&](int tid, ThreadState<A>&) {
      chunk_contexts(tid, h, beta, hs, vs, vss, es, ess, cv, ct, cs, K, len, mt, nt);
    });
    ex.each([&](int tid, ThreadState<A>&) {
      for (int item = tid; item < (K + L) * nb; item += kThreads) {
        const int row = item / nb, j = item - row * nb;
        const int lo = sh.carry ? 0 : j * db, hi = sh.carry ? nf : lo + db;
        const bool is_region = row < K;
        const int t = row - K;
        A* out = is_region ? region_out + int64_t(row) * B + b0 + j : word_out + int64_t(t) * B + b0 + j;
        if (!is_region && t >= len) {
          if (done) *out = A(0);
          continue;
        }
        BlockSums<A> s = is_region ? block_sums(vs + row, vss, cv + row * cs, lo, hi)
                                   : block_sums(es + t, ess, ct + t * cs, lo, hi);
        if (sh.carry) {  // nb == 1: item `row` is this thread's alone in this phase
          const int slot = is_region ? row : kp + t;
          s.dot += acc_dot[slot];
          s.csq += acc_csq[slot];
          s.qsq += acc_qsq[slot];
          acc_dot[slot] = done ? A(0) : s.dot;
          acc_csq[slot] = done ? A(0) : s.csq;
          acc_qsq[slot] = done ? A(0) : s.qsq;
        }
        if (done) *out = cosine_from_gram(s.dot, std::sqrt(s.qsq), s.csq);
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Plan: validation of the problem, geometry and shared memory; shared by the launcher and the emulation.

template <class T> struct NodeProblem {
  const T* images;          // (n_img, K, d), contiguous
  const T* captions;        // (n_cap, L, d), contiguous
  const int64_t* cap_lens;  // (n_cap,) in 1..L
  acc_t<T>* region;         // (n_img, n_cap, K, B), contiguous
  acc_t<T>* word;           // (n_img, n_cap, L, B), contiguous
  int64_t n_img, n_cap;
  int K, L, d, num_blocks;
  double lambda_softmax;
};

struct NodePlan {
  const char* error;  // nullptr when the problem is supported
  NodeShape shape;
  int64_t pairs;      // n_img * n_cap thread blocks, in launches of at most kMaxBlocksPerLaunch
  size_t smem_bytes;  // dynamic shared memory per block
};

template <class T> NodePlan plan_node_match(const NodeProblem<T>& p) {
  using A = acc_t<T>;
  NodePlan plan{};
  if (p.n_img < 1 || p.n_cap < 1 || p.K < 1 || p.L < 1 || p.d < 1) {
    plan.error = "images and captions must be non-empty";
    return plan;
  }
  if (p.num_blocks < 1 || p.d % p.num_blocks != 0) {
    plan.error = "num_blocks must be >= 1 and divide d";
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
  if (p.n_img > INT64_MAX / p.n_cap / (int64_t(p.K) + p.L) / p.num_blocks) {
    plan.error = "too many (image, caption) pairs: split the inputs";
    return plan;
  }
  plan.shape = node_shape(p.K, p.L, p.d, p.num_blocks);
  plan.pairs = p.n_img * p.n_cap;
  plan.smem_bytes = size_t(node_smem_layout(plan.shape).total) * sizeof(A);
  return plan;
}

// Issues the launches of a planned problem through `run.main(NodeArgs, blocks)`: one block per pair, at most
// kMaxBlocksPerLaunch per launch.
template <class T, class Runner> void drive_node_match(const NodeProblem<T>& p, const NodePlan& plan, Runner& run) {
  using A = acc_t<T>;
  for (int64_t p0 = 0; p0 < plan.pairs; p0 += kMaxBlocksPerLaunch) {
    NodeArgs<T> a{};
    a.images = p.images;
    a.captions = p.captions;
    a.cap_lens = p.cap_lens;
    a.region = p.region;
    a.word = p.word;
    a.n_cap = p.n_cap;
    a.pair0 = p0;
    a.lambda = A(p.lambda_softmax);
    a.shape = plan.shape;
    run.main(a, min_of(kMaxBlocksPerLaunch, plan.pairs - p0));
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernel and launcher (nvcc only).
#if defined(__CUDACC__)

// Float accumulation fits 64 registers without spills (compile check), so 4 blocks of 256 threads can share an SM
// where shared memory allows (K = 36, L_max = 32: 34 KiB per block); float64 gets 128 (2 blocks per SM).
template <class T> struct MinBlocksPerSm { static constexpr int value = 4; };
template <> struct MinBlocksPerSm<double> { static constexpr int value = 2; };

template <class T>
__global__ void __launch_bounds__(kThreads, MinBlocksPerSm<T>::value) node_match_kernel(const NodeArgs<T> a) {
  extern __shared__ __align__(16) unsigned char itm_nm_smem[];
  ThreadState<acc_t<T>> st;
  DeviceExec<ThreadState<acc_t<T>>> ex{st};
  node_match_block<T>(ex, reinterpret_cast<acc_t<T>*>(itm_nm_smem), a, int64_t(blockIdx.x));
}

template <class T> struct DeviceRunner {
  KernelLauncher<NodeArgs<T>> main;
};

// Launches a problem that `plan_node_match` accepted (plan.error == nullptr) on `stream`; the caller checks that
// plan.smem_bytes fits the device (cudaDevAttrMaxSharedMemoryPerBlockOptin). Returns the first launch error.
template <class T> cudaError_t node_match_cuda(const NodeProblem<T>& p, const NodePlan& plan, cudaStream_t stream) {
  cudaError_t err = allow_dynamic_smem(node_match_kernel<T>, plan.smem_bytes);
  if (err != cudaSuccess) return err;
  DeviceRunner<T> run{{node_match_kernel<T>, kThreads, plan.smem_bytes, stream, &err}};
  drive_node_match(p, plan, run);
  return err;
}

#endif  // __CUDACC__

}  // namespace nm
}  // namespace cuda
}  // namespace itm
