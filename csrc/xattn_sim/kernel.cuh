// Fused all-pairs SCAN cross-attention similarity: device code and a torch-free host launcher.
//
// One thread block per (image i, block of up to `slots` captions). The block
//   1. streams V_i (K x d) and the captions' words (slots x L_max x d) through shared memory in chunks of kDk
//      features and accumulates the region x word score tile S = V_i E^T in registers (float accumulation;
//      double for double inputs), together with the squared norms of the query items;
//   2. writes S to shared memory and runs the SCAN epilogue there: the norm along the query axis, the softmax
//      over the context axis (in place: S becomes alpha), num = sum alpha s, |a|^2 = alpha^T Gram alpha (a small
//      product with the context side's Gram matrix: G_i = V_i V_i^T for t2i, H_c = E_c E_c^T for i2t, made by
//      a prologue kernel into a workspace), the cosine and the aggregation; one global write per pair.
// The per-element math is csrc/xattn_sim/math.h, shared with the CPU kernel.
//
// Every block function is written once against an executor `ex` whose `each(f)` runs f(tid, state) for every
// thread of the block and then synchronises: on the GPU, f runs on the calling thread and `each` ends with
// __syncthreads(); on the host (csrc/xattn_sim/emulate.cpp) the threads run one after another in any
// order. Control flow outside `each` is block-uniform and there are no warp-level primitives, so the host
// emulation runs the very code the GPU runs; running it in several thread orders checks that no phase reads
// what another thread of the same phase writes.
//
// Limits of this kernel: K <= kMaxRegions, L_max <= kMaxWords (see `plan_xattn`, which says why it refuses).
// This header has no torch dependency; outside nvcc only the host-side parts (no kernels, no launcher) compile.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/cuda_launch.cuh"
#include "xattn_sim/math.h"

namespace itm {
namespace cuda {

constexpr int kThreads = 256;                 // threads per block, seen as 16 x 16 for the tile products
constexpr int kMaxRegions = 64;               // K limit: rows of the score tile
constexpr int kMaxWords = 128;                // L_max limit: columns of the score tile
constexpr int kRowsPerThread = kMaxRegions / 16;
constexpr int kColsPerThread = kMaxWords / 16;
constexpr int kMaxSlots = kMaxWords / 16;      // captions per block when L_max <= 16
constexpr int kDk = 32;                        // features staged per chunk
constexpr int kHRows = 32;                     // rows of H_c staged per step of the i2t quadratic form
constexpr size_t kDefaultWorkspaceBytes = size_t(64) << 20;


// ---------------------------------------------------------------------------------------------------------
// Geometry shared by the launcher, the kernels and the host emulation.

struct TileShape {
  int kp;     // rows of the score tile: K rounded up to 16
  int lp;     // columns per caption slot: L_max rounded up to 16
  int slots;  // captions per block
  int ncols;  // slots * lp
};

ITM_HD TileShape tile_shape(int K, int L) {
  TileShape s;
  s.kp = round_up16(K);
  s.lp = round_up16(L);
  s.slots = s.lp > 0 ? kMaxWords / s.lp : 0;
  s.ncols = s.slots * s.lp;
  return s;
}

// Shared-memory layout of the main block, in accumulator elements. The score tile T (kp x ncols, odd row
// stride: conflict-free for row-per-thread and column-per-thread loops alike) overlays the staging buffers,
// which are dead once the scores sit in registers.
struct MainSmem {
  int t_stride, vs_stride, ws_stride;
  int t_off, vs_off, ws_off, aux_off, stat_f_off, stat_m_off, num_off, r_off, qn_off, total;
};

ITM_HD MainSmem main_smem_layout(const TileShape& s, int direction) {
  MainSmem m;
  m.t_stride = s.ncols + 1;
  m.vs_stride = s.kp + 1;
  m.ws_stride = s.ncols + 1;
  m.t_off = 0;
  m.vs_off = 0;
  m.ws_off = kDk * m.vs_stride;
  const int region = max_of(s.kp * m.t_stride, kDk * (m.vs_stride + m.ws_stride));
  // aux: G_i (kp x kp) for t2i, kHRows rows of the slots' H_c for i2t.
  const int aux = direction == kT2I ? s.kp * s.kp : kHRows * s.ncols;
  // Per-(row, slot) or per-column values: norm statistics, num, R.
  const int items = max_of(s.kp * s.slots, s.ncols);
  m.aux_off = region;
  m.stat_f_off = m.aux_off + aux;
  m.stat_m_off = m.stat_f_off + items;
  m.num_off = m.stat_m_off + items;
  m.r_off = m.num_off + items;
  m.qn_off = m.r_off + items;
  m.total = m.qn_off + max_of(s.kp, s.ncols);
  return m;
}

// Gram prologue: one block per (set, half of 64 rows); staging only.
ITM_HD int gram_smem_elems(int P) { return kDk * ((kMaxRegions + 1) + (P + 1)); }

// ---------------------------------------------------------------------------------------------------------
// Kernel arguments (trivially copyable, passed by value).

template <class T> struct GramArgs {
  const T* x;              // (n_total, R, d) features of the context sets
  const int64_t* lens;     // (n_total,) valid rows
  acc_t<T>* gram;          // (nsets, P, P) output, zero outside the valid rows/columns
  int64_t set0, nsets;     // the sets of this launch
  int R, P, d, halves;     // rows stored per set, padded rows (multiple of 16, <= 128), features, ceil(P / 64)
};

template <class T> struct MainArgs {
  const T* images;         // (N_img, K, d)
  const T* captions;       // (N_cap, L, d)
  const int64_t* img_lens;
  const int64_t* cap_lens;
  acc_t<T>* out;           // (N_img, ld_out)
  const acc_t<T>* gram;    // t2i: (n_img, kp, kp) for images img0..; i2t: (n_cap, lp, lp) for captions cap0..
  int64_t ld_out;
  int64_t img0, n_img;     // images of this launch
  int64_t cap0, n_cap;     // captions of this launch
  int K, L, d;
  int norm, agg;
  acc_t<T> lambda_softmax, lambda_lse;
  TileShape shape;
};

// Per-thread state that lives across phases (registers on the GPU).
template <class A> struct ThreadState {
  A acc[kRowsPerThread][kColsPerThread];
  A sq;  // squared norm of the thread's query item
};

template <class A> ITM_HD void zero_state(ThreadState<A>& st) {
  ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r)
    ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c) st.acc[r][c] = A(0);
  st.sq = A(0);
}

// ---------------------------------------------------------------------------------------------------------
// Staging and the register-tiled product. Thread tid owns rows ty + 16 r and columns tx + 16 c of a tile.

// Rows of an operand: row x of the tile is row `pos` of segment `seg` (x = seg * seg_rows + pos), present
// when seg < nseg and pos < len[seg]; absent rows read as zero, so padding is never loaded.
template <class T> struct Operand {
  const T* base;
  int64_t seg_stride;  // elements between the first rows of consecutive segments
  int seg_rows;
  int nseg;
  int len[kMaxSlots];
};

// dst[kk * stride + x] = feature d0 + kk of operand row x, for x < n, kk < kDk. Thread tid always loads
// feature kk = tid % kDk (consecutive threads read consecutive addresses) of rows x = tid / kDk + kRowStep * i;
// the segment of x is tracked incrementally (kRowStep <= 16 <= seg_rows, so it advances by at most one).
constexpr int kRowStep = kThreads / kDk;
static_assert(kThreads % kDk == 0 && kRowStep <= 16, "stage_operand assumes kRowStep <= 16");

template <class T, class A>
ITM_HD void stage_operand(int tid, const Operand<T>& op, int n, int d, int d0, A* dst, int stride) {
  const int kk = tid % kDk;
  const bool feature_ok = d0 + kk < d;
  int x = tid / kDk;
  int seg = x / op.seg_rows, pos = x - seg * op.seg_rows;
  int len = seg < op.nseg ? op.len[seg] : 0;
  for (; x < n; x += kRowStep) {
    A v = A(0);
    if (feature_ok && pos < len) v = load_acc<A>(op.base + seg * op.seg_stride + int64_t(pos) * d + d0 + kk);
    dst[kk * stride + x] = v;
    pos += kRowStep;
    if (pos >= op.seg_rows) {
      pos -= op.seg_rows;
      ++seg;
      len = seg < op.nseg ? op.len[seg] : 0;
    }
  }
}

template <class A, int MT>
ITM_HD void accumulate_chunk_mt(int tid, ThreadState<A>& st, const A* vs, int vs_stride, const A* ws,
                                int ws_stride, int nt) {
  const int tx = tid % 16, ty = tid / 16;
  for (int kk = 0; kk < kDk; ++kk) {
    A a[MT], b[kColsPerThread];
    ITM_UNROLL for (int r = 0; r < MT; ++r) a[r] = vs[kk * vs_stride + ty + 16 * r];
    ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c) b[c] = c < nt ? ws[kk * ws_stride + tx + 16 * c] : A(0);
    ITM_UNROLL for (int r = 0; r < MT; ++r)
      ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c) st.acc[r][c] += a[r] * b[c];
  }
}

// acc[r][c] += sum_kk vs[kk][ty + 16 r] * ws[kk][tx + 16 c] for r < mt, c < nt.
template <class A>
ITM_HD void accumulate_chunk(int tid, ThreadState<A>& st, const A* vs, int vs_stride, const A* ws, int ws_stride,
                             int mt, int nt) {
  switch (mt) {
    case 1: accumulate_chunk_mt<A, 1>(tid, st, vs, vs_stride, ws, ws_stride, nt); break;
    case 2: accumulate_chunk_mt<A, 2>(tid, st, vs, vs_stride, ws, ws_stride, nt); break;
    case 3: accumulate_chunk_mt<A, 3>(tid, st, vs, vs_stride, ws, ws_stride, nt); break;
    default: accumulate_chunk_mt<A, 4>(tid, st, vs, vs_stride, ws, ws_stride, nt); break;
  }
}

// Score tile: stream `rows` (m x d) and `cols` (n x d) through vs/ws and leave rows . cols in st.acc. With
// query_on_rows = 0/1 the thread tid < n (< m) also accumulates the squared norm of column (row) tid into st.sq;
// with -1 it does not.
template <class T, class A, class Exec>
ITM_HD void tile_product(Exec& ex, const Operand<T>& rows, int m, const Operand<T>& cols, int n, int d, A* vs,
                         int vs_stride, A* ws, int ws_stride, int query_on_rows) {
  const int mt = m / 16, nt = n / 16;
  for (int d0 = 0; d0 < d; d0 += kDk) {
    ex.each([&](int tid, ThreadState<A>& st) {
      if (d0 == 0) zero_state(st);
      stage_operand(tid, rows, m, d, d0, vs, vs_stride);
      stage_operand(tid, cols, n, d, d0, ws, ws_stride);
    });
    ex.each([&](int tid, ThreadState<A>& st) {
      accumulate_chunk(tid, st, vs, vs_stride, ws, ws_stride, mt, nt);
      if (query_on_rows == 0 && tid < n) {
        for (int kk = 0; kk < kDk; ++kk) { const A w = ws[kk * ws_stride + tid]; st.sq += w * w; }
      } else if (query_on_rows == 1 && tid < m) {
        for (int kk = 0; kk < kDk; ++kk) { const A v = vs[kk * vs_stride + tid]; st.sq += v * v; }
      }
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Gram prologue block: gram[n][r][c] = x_r . x_c over the valid rows of set set0 + n, rows 64 h .. 64 h + 63.

template <class T, class Exec>
ITM_HD void gram_block(Exec& ex, acc_t<T>* smem, const GramArgs<T>& g, int64_t block) {
  using A = acc_t<T>;
  const int64_t n = block / g.halves;
  const int h = int(block - n * g.halves);
  const int64_t set = g.set0 + n;
  const int len = clamp_len(g.lens[set], g.R);
  const int row0 = h * kMaxRegions;
  const int m = min_of(kMaxRegions, g.P - row0);
  const T* first = g.x + set * g.R * int64_t(g.d);

  Operand<T> rows{};
  rows.base = first + int64_t(row0) * g.d;
  rows.seg_stride = 0;
  rows.seg_rows = kMaxRegions;
  rows.nseg = 1;
  rows.len[0] = max_of(0, len - row0);
  Operand<T> cols{};
  cols.base = first;
  cols.seg_stride = 0;
  cols.seg_rows = g.P;
  cols.nseg = 1;
  cols.len[0] = len;

  A* vs = smem;
  const int vs_stride = kMaxRegions + 1;
  A* ws = smem + kDk * vs_stride;
  const int ws_stride = g.P + 1;
  tile_product(ex, rows, m, cols, g.P, g.d, vs, vs_stride, ws, ws_stride, -1);

  A* out = g.gram + n * int64_t(g.P) * g.P;
  const int mt = m / 16, nt = g.P / 16;
  ex.each([&](int tid, ThreadState<A>& st) {
    const int tx = tid % 16, ty = tid / 16;
    ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r)
      ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c)
        if (r < mt && c < nt) out[int64_t(row0 + ty + 16 * r) * g.P + tx + 16 * c] = st.acc[r][c];
  });
}

// ---------------------------------------------------------------------------------------------------------
// Main block.

ITM_HD bool norm_has_stat(int norm) {
  return norm == kSoftmax || norm == kL2Norm || norm == kClippedL2Norm || norm == kL1Norm || norm == kClippedL1Norm;
}

// Statistic of one query-axis row of scores: (factor, max) such that normed(s) = normed_score(s, ...).
template <class A> struct NormStat { A factor, max; };

template <class A> ITM_HD NormStat<A> query_axis_stat(const A* s, int stride, int n, int norm) {
  NormStat<A> out{A(1), A(0)};
  if (norm == kSoftmax) {
    A m = A(-INFINITY);
    for (int q = 0; q < n; ++q) m = max_of(m, s[q * stride]);
    A sum = A(0);
    for (int q = 0; q < n; ++q) sum += std::exp(s[q * stride] - m);
    out.factor = A(1) / sum;
    out.max = m;
  } else if (norm_has_stat(norm)) {
    A acc = A(0);
    for (int q = 0; q < n; ++q) acc += norm_stat_term(pre_norm(s[q * stride], norm), norm);
    out.factor = norm_factor(acc, norm);
  }
  return out;
}

template <class A> ITM_HD A normed_score(A s, int norm, const NormStat<A>& st) {
  if (norm == kSoftmax) return softmax_normed(s, st.max, st.factor);
  return pre_norm(s, norm) * st.factor;
}

// Softmax over the context axis of lambda * normed(s) for one query item, in place: s[c * stride] becomes
// alpha_c for c < n and 0 for n <= c < n_pad. stat(c) gives the norm statistic of context item c. Returns
// num = sum_c alpha_c s_c.
template <class A, class Stat>
ITM_HD A context_softmax_inplace(A* s, int stride, int n, int n_pad, int norm, A lambda, Stat stat) {
  A m = A(-INFINITY);
  for (int c = 0; c < n; ++c) m = max_of(m, lambda * normed_score(s[c * stride], norm, stat(c)));
  A sum = A(0), num = A(0);
  for (int c = 0; c < n; ++c) {
    const A raw = s[c * stride];
    const A e = std::exp(lambda * normed_score(raw, norm, stat(c)) - m);
    sum += e;
    num += e * raw;
    s[c * stride] = e;
  }
  const A inv = A(1) / sum;
  for (int c = 0; c < n; ++c) s[c * stride] *= inv;
  for (int c = n; c < n_pad; ++c) s[c * stride] = A(0);
  return num * inv;
}

// tile[ty + 16 r][tx + 16 c] *= acc[r][c]: the thread's own cells, so no other thread reads or writes them.
template <class A>
ITM_HD void scale_tile_cells(int tid, const ThreadState<A>& st, A* tile, int ts, int mt, int nt) {
  const int tx = tid % 16, ty = tid / 16;
  ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r)
    ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c)
      if (r < mt && c < nt) tile[(ty + 16 * r) * ts + tx + 16 * c] *= st.acc[r][c];
}

template <class T, int DIR, class Exec>
ITM_HD void xattn_main_block(Exec& ex, acc_t<T>* smem, const MainArgs<T>& a, int64_t block) {
  using A = acc_t<T>;
  const TileShape sh = a.shape;
  const MainSmem lay = main_smem_layout(sh, DIR);
  const int64_t i_local = block % a.n_img;
  const int64_t cblk = block / a.n_img;
  const int64_t img = a.img0 + i_local;
  const int64_t cbase = a.cap0 + cblk * sh.slots;
  const int nslots = int(min_of<int64_t>(sh.slots, a.cap0 + a.n_cap - cbase));
  const int nk = clamp_len(a.img_lens[img], a.K);
  const int kp = sh.kp, lp = sh.lp, ncols = sh.ncols, ts = lay.t_stride;
  const int mt = kp / 16, nt = ncols / 16;

  Operand<T> rows{};
  rows.base = a.images + img * a.K * int64_t(a.d);
  rows.seg_stride = 0;
  rows.seg_rows = kp;
  rows.nseg = 1;
  rows.len[0] = nk;
  Operand<T> cols{};
  cols.base = a.captions + cbase * a.L * int64_t(a.d);
  cols.seg_stride = a.L * int64_t(a.d);
  cols.seg_rows = lp;
  cols.nseg = nslots;
  for (int j = 0; j < kMaxSlots; ++j) cols.len[j] = j < nslots ? clamp_len(a.cap_lens[cbase + j], a.L) : 0;

  A* tile = smem + lay.t_off;
  A* aux = smem + lay.aux_off;
  A* stat_f = smem + lay.stat_f_off;
  A* stat_m = smem + lay.stat_m_off;
  A* num = smem + lay.num_off;
  A* rbuf = smem + lay.r_off;
  A* qn = smem + lay.qn_off;
  const int norm = a.norm;
  const A lambda = a.lambda_softmax;

  // 1. Scores (and the query items' norms) into the tile.
  tile_product(ex, rows, kp, cols, ncols, a.d, smem + lay.vs_off, lay.vs_stride, smem + lay.ws_off, lay.ws_stride,
               DIR == kT2I ? 0 : 1);
  const A* gram = DIR == kT2I ? a.gram + i_local * int64_t(kp) * kp : nullptr;
  ex.each([&](int tid, ThreadState<A>& st) {
    const int tx = tid % 16, ty = tid / 16;
    ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r)
      ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c)
        if (r < mt && c < nt) tile[(ty + 16 * r) * ts + tx + 16 * c] = st.acc[r][c];
    if (tid < (DIR == kT2I ? ncols : kp)) qn[tid] = std::sqrt(st.sq);
    if (DIR == kT2I)
      for (int idx = tid; idx < kp * kp; idx += kThreads) aux[idx] = gram[idx];
  });

  if (DIR == kT2I) {
    // 2. Norm along the words of each (region, caption) row: stats per item j * kp + k.
    if (norm_has_stat(norm)) {
      ex.each([&](int tid, ThreadState<A>&) {
        for (int item = tid; item < kp * sh.slots; item += kThreads) {
          const int j = item / kp, k = item - j * kp;
          if (k >= nk || j >= nslots) continue;
          const NormStat<A> s = query_axis_stat(tile + k * ts + j * lp, 1, cols.len[j], norm);
          stat_f[item] = s.factor;
          stat_m[item] = s.max;
        }
      });
    }
    // 3. Per word: softmax over the regions, num; the tile becomes alpha (zero outside the valid pairs).
    ex.each([&](int tid, ThreadState<A>&) {
      for (int col = tid; col < ncols; col += kThreads) {
        const int j = col / lp, t = col - j * lp;
        A* s = tile + col;
        if (j >= nslots || t >= cols.len[j]) {
          for (int k = 0; k < kp; ++k) s[k * ts] = A(0);
          continue;
        }
        const bool has_stat = norm_has_stat(norm);
        auto stat = [&](int k) {
          return has_stat ? NormStat<A>{stat_f[j * kp + k], stat_m[j * kp + k]} : NormStat<A>{A(1), A(0)};
        };
        num[col] = context_softmax_inplace(s, ts, nk, kp, norm, lambda, stat);
      }
    });
    // 4. (G alpha) for the thread's cells, then alpha * (G alpha) in place.
    ex.each([&](int tid, ThreadState<A>& st) {
      const int tx = tid % 16, ty = tid / 16;
      zero_state(st);
      for (int k2 = 0; k2 < kp; ++k2) {
        A g[kRowsPerThread], al[kColsPerThread];
        ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r) g[r] = r < mt ? aux[(ty + 16 * r) * kp + k2] : A(0);
        ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c) al[c] = c < nt ? tile[k2 * ts + tx + 16 * c] : A(0);
        ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r)
          ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c) st.acc[r][c] += g[r] * al[c];
      }
    });
    ex.each([&](int tid, ThreadState<A>& st) { scale_tile_cells(tid, st, tile, ts, mt, nt); });
    // 5. Per word: |a|^2 = column sum, cosine.
    ex.each([&](int tid, ThreadState<A>&) {
      for (int col = tid; col < ncols; col += kThreads) {
        const int j = col / lp, t = col - j * lp;
        if (j >= nslots || t >= cols.len[j]) continue;
        A a_sq = A(0);
        for (int k = 0; k < nk; ++k) a_sq += tile[k * ts + col];
        rbuf[col] = cosine_from_gram(num[col], qn[col], a_sq);
      }
    });
    // 6. Per caption: aggregate over its words.
    ex.each([&](int tid, ThreadState<A>&) {
      if (tid >= nslots) return;
      Aggregator<A> agg(a.agg, a.lambda_lse);
      for (int t = 0; t < cols.len[tid]; ++t) agg.push(rbuf[tid * lp + t]);
      a.out[img * a.ld_out + cbase + tid] = agg.result();
    });
  } else {
    // 2. Norm along the regions of each word column.
    if (norm_has_stat(norm)) {
      ex.each([&](int tid, ThreadState<A>&) {
        for (int col = tid; col < ncols; col += kThreads) {
          const int j = col / lp, t = col - j * lp;
          if (j >= nslots || t >= cols.len[j]) continue;
          const NormStat<A> s = query_axis_stat(tile + col, ts, nk, norm);
          stat_f[col] = s.factor;
          stat_m[col] = s.max;
        }
      });
    }
    // 3. Per (region, caption): softmax over the caption's words, num; the tile becomes alpha.
    ex.each([&](int tid, ThreadState<A>& st) {
      zero_state(st);
      for (int item = tid; item < kp * sh.slots; item += kThreads) {
        const int j = item / kp, k = item - j * kp;
        A* s = tile + k * ts + j * lp;
        if (k >= nk || j >= nslots) {
          for (int t = 0; t < lp; ++t) s[t] = A(0);
          continue;
        }
        const bool has_stat = norm_has_stat(norm);
        auto stat = [&](int t) {
          return has_stat ? NormStat<A>{stat_f[j * lp + t], stat_m[j * lp + t]} : NormStat<A>{A(1), A(0)};
        };
        num[item] = context_softmax_inplace(s, 1, cols.len[j], lp, norm, lambda, stat);
      }
    });
    // 4. (alpha H_c) for the thread's cells, kHRows rows of H at a time; then alpha * (alpha H_c) in place.
    const A* hbase = a.gram + (cbase - a.cap0) * int64_t(lp) * lp;
    for (int t0 = 0; t0 < lp; t0 += kHRows) {
      const int th = min_of(kHRows, lp - t0);
      ex.each([&](int tid, ThreadState<A>&) {
        for (int idx = tid; idx < th * ncols; idx += kThreads) {
          const int tl = idx / ncols, col = idx - tl * ncols;
          const int j = col / lp, cc = col - j * lp;
          aux[idx] = j < nslots ? hbase[(j * int64_t(lp) + t0 + tl) * lp + cc] : A(0);
        }
      });
      ex.each([&](int tid, ThreadState<A>& st) {
        const int tx = tid % 16, ty = tid / 16;
        // Column tx + 16 c lies in slot (16 c) / lp whatever tx is, since lp is a multiple of 16.
        for (int tl = 0; tl < th; ++tl) {
          ITM_UNROLL for (int c = 0; c < kColsPerThread; ++c) {
            if (c >= nt) continue;
            const A hv = aux[tl * ncols + tx + 16 * c];
            const int at = (16 * c / lp) * lp + t0 + tl;
            ITM_UNROLL for (int r = 0; r < kRowsPerThread; ++r)
              if (r < mt) st.acc[r][c] += tile[(ty + 16 * r) * ts + at] * hv;
          }
        }
      });
    }
    ex.each([&](int tid, ThreadState<A>& st) { scale_tile_cells(tid, st, tile, ts, mt, nt); });
    // 5. Per (region, caption): |a|^2 = row sum over the caption's words, cosine.
    ex.each([&](int tid, ThreadState<A>&) {
      for (int item = tid; item < kp * sh.slots; item += kThreads) {
        const int j = item / kp, k = item - j * kp;
        if (k >= nk || j >= nslots) continue;
        const A* p = tile + k * ts + j * lp;
        A a_sq = A(0);
        for (int t = 0; t < cols.len[j]; ++t) a_sq += p[t];
        rbuf[item] = cosine_from_gram(num[item], qn[k], a_sq);
      }
    });
    // 6. Per caption: aggregate over the image's regions.
    ex.each([&](int tid, ThreadState<A>&) {
      if (tid >= nslots) return;
      Aggregator<A> agg(a.agg, a.lambda_lse);
      for (int k = 0; k < nk; ++k) agg.push(rbuf[tid * kp + k]);
      a.out[img * a.ld_out + cbase + tid] = agg.result();
    });
  }
}

// ---------------------------------------------------------------------------------------------------------
// Plan: tile shape, context chunking, workspace and shared memory; shared by the launcher and the emulation.

template <class T> struct XattnProblem {
  const T* images;          // (n_img, K, d), contiguous
  const T* captions;        // (n_cap, L, d), contiguous
  const int64_t* cap_lens;  // (n_cap,) in 1..L, device memory
  const int64_t* img_lens;  // (n_img,) in 1..K, device memory
  acc_t<T>* out;            // (n_img, n_cap), contiguous
  int64_t n_img, n_cap;
  int K, L, d;
  int direction, norm, agg;
  double lambda_softmax, lambda_lse;
  size_t max_workspace_bytes;  // cap on the Gram workspace; 0: kDefaultWorkspaceBytes
};

struct XattnPlan {
  const char* error;       // nullptr when the problem is supported
  TileShape shape;
  int P;                   // Gram size of the context sets: kp (t2i) or lp (i2t)
  int halves;              // Gram blocks per set
  int64_t ctx_chunk;       // context sets (images for t2i, captions for i2t) per launch pair
  size_t workspace_bytes;  // (ctx_chunk, P, P) accumulator elements
  size_t main_smem_bytes, gram_smem_bytes;
};

template <class T> XattnPlan plan_xattn(const XattnProblem<T>& p) {
  using A = acc_t<T>;
  XattnPlan plan{};
  if (p.direction != kT2I && p.direction != kI2T) {
    plan.error = "direction must be 0 (t2i) or 1 (i2t)";
    return plan;
  }
  if (p.norm < kSoftmax || p.norm > kNoNorm) {
    plan.error = "norm must be in 0..6 (see csrc/xattn_sim/math.h)";
    return plan;
  }
  if (p.agg < kLse || p.agg > kSum) {
    plan.error = "agg must be in 0..3 (see csrc/xattn_sim/math.h)";
    return plan;
  }
  if (p.n_img < 1 || p.n_cap < 1 || p.K < 1 || p.L < 1 || p.d < 1) {
    plan.error = "images and captions must be non-empty";
    return plan;
  }
  if (p.K > kMaxRegions) {
    plan.error = "the CUDA kernel supports at most 64 regions per image (K); use backend='torch' or 'triton'";
    return plan;
  }
  if (p.L > kMaxWords) {
    plan.error = "the CUDA kernel supports captions of at most 128 words (L_max); use backend='torch' or 'triton'";
    return plan;
  }
  plan.shape = tile_shape(p.K, p.L);
  const bool t2i = p.direction == kT2I;
  plan.P = t2i ? plan.shape.kp : plan.shape.lp;
  plan.halves = (plan.P + kMaxRegions - 1) / kMaxRegions;
  const size_t per_set = size_t(plan.P) * plan.P * sizeof(A);
  const size_t budget = p.max_workspace_bytes ? p.max_workspace_bytes : kDefaultWorkspaceBytes;
  const int64_t n_ctx = t2i ? p.n_img : p.n_cap;
  int64_t chunk = int64_t(budget / per_set);
  if (!t2i) chunk = chunk / plan.shape.slots * plan.shape.slots;  // whole caption blocks per launch
  chunk = max_of<int64_t>(chunk, t2i ? 1 : plan.shape.slots);
  plan.ctx_chunk = min_of(chunk, n_ctx);
  plan.workspace_bytes = size_t(plan.ctx_chunk) * per_set;
  const int64_t cap_blocks = ((t2i ? p.n_cap : plan.ctx_chunk) + plan.shape.slots - 1) / plan.shape.slots;
  const int64_t img_blocks = t2i ? plan.ctx_chunk : p.n_img;
  if (img_blocks * cap_blocks > int64_t(0x7fffffff) || plan.ctx_chunk * plan.halves > int64_t(0x7fffffff)) {
    plan.error = "too many (image, caption block) pairs for one launch; split the inputs";
    return plan;
  }
  plan.main_smem_bytes = size_t(main_smem_layout(plan.shape, p.direction).total) * sizeof(A);
  plan.gram_smem_bytes = size_t(gram_smem_elems(plan.P)) * sizeof(A);
  return plan;
}

// Issues the launches of a planned problem through `run.gram(GramArgs, blocks)` and `run.main(MainArgs,
// blocks)`: per chunk of context sets, the Gram prologue into `workspace`, then the main blocks over that chunk
// against every query set. Launches on one stream run in order, so chunks can share the workspace.
template <class T, class Runner>
void drive_xattn(const XattnProblem<T>& p, const XattnPlan& plan, acc_t<T>* workspace, Runner& run) {
  using A = acc_t<T>;
  const bool t2i = p.direction == kT2I;
  const int64_t n_ctx = t2i ? p.n_img : p.n_cap;
  for (int64_t c0 = 0; c0 < n_ctx; c0 += plan.ctx_chunk) {
    const int64_t cn = min_of(plan.ctx_chunk, n_ctx - c0);
    GramArgs<T> g{};
    g.x = t2i ? p.images : p.captions;
    g.lens = t2i ? p.img_lens : p.cap_lens;
    g.gram = workspace;
    g.set0 = c0;
    g.nsets = cn;
    g.R = t2i ? p.K : p.L;
    g.P = plan.P;
    g.d = p.d;
    g.halves = plan.halves;
    run.gram(g, cn * plan.halves);

    MainArgs<T> m{};
    m.images = p.images;
    m.captions = p.captions;
    m.img_lens = p.img_lens;
    m.cap_lens = p.cap_lens;
    m.out = p.out;
    m.gram = workspace;
    m.ld_out = p.n_cap;
    m.img0 = t2i ? c0 : 0;
    m.n_img = t2i ? cn : p.n_img;
    m.cap0 = t2i ? 0 : c0;
    m.n_cap = t2i ? p.n_cap : cn;
    m.K = p.K;
    m.L = p.L;
    m.d = p.d;
    m.norm = p.norm;
    m.agg = p.agg;
    m.lambda_softmax = A(p.lambda_softmax);
    m.lambda_lse = A(p.lambda_lse);
    m.shape = plan.shape;
    const int64_t cap_blocks = (m.n_cap + plan.shape.slots - 1) / plan.shape.slots;
    run.main(m, m.n_img * cap_blocks);
  }
}

// ---------------------------------------------------------------------------------------------------------
// Kernels and the launcher (nvcc only).
#if defined(__CUDACC__)

template <class T> __global__ void __launch_bounds__(kThreads) xattn_gram_kernel(const GramArgs<T> g) {
  extern __shared__ __align__(16) unsigned char itm_smem[];
  ThreadState<acc_t<T>> st;
  DeviceExec<ThreadState<acc_t<T>>> ex{st};
  gram_block<T>(ex, reinterpret_cast<acc_t<T>*>(itm_smem), g, int64_t(blockIdx.x));
}

template <class T, int DIR> __global__ void __launch_bounds__(kThreads, 1) xattn_main_kernel(const MainArgs<T> m) {
  extern __shared__ __align__(16) unsigned char itm_smem[];
  ThreadState<acc_t<T>> st;
  DeviceExec<ThreadState<acc_t<T>>> ex{st};
  xattn_main_block<T, DIR>(ex, reinterpret_cast<acc_t<T>*>(itm_smem), m, int64_t(blockIdx.x));
}

template <class T, int DIR> struct DeviceRunner {
  KernelLauncher<GramArgs<T>> gram;
  KernelLauncher<MainArgs<T>> main;
};

// Launches the similarity of a problem that `plan_xattn` accepted (plan.error == nullptr) on `stream`.
// `workspace` must hold plan.workspace_bytes bytes of device memory, aligned for acc_t<T>, and stay alive until
// the stream has run the launches. Returns the first launch error, if any.
template <class T, int DIR>
cudaError_t launch_xattn_sim(const XattnProblem<T>& p, const XattnPlan& plan, void* workspace, cudaStream_t stream) {
  cudaError_t err = allow_dynamic_smem(xattn_gram_kernel<T>, plan.gram_smem_bytes);
  if (err != cudaSuccess) return err;
  err = allow_dynamic_smem(xattn_main_kernel<T, DIR>, plan.main_smem_bytes);
  if (err != cudaSuccess) return err;
  DeviceRunner<T, DIR> run{{xattn_gram_kernel<T>, kThreads, plan.gram_smem_bytes, stream, &err},
                           {xattn_main_kernel<T, DIR>, kThreads, plan.main_smem_bytes, stream, &err}};
  drive_xattn(p, plan, static_cast<acc_t<T>*>(workspace), run);
  return err;
}

template <class T>
cudaError_t xattn_sim_cuda(const XattnProblem<T>& p, const XattnPlan& plan, void* workspace, cudaStream_t stream) {
  return p.direction == kT2I ? launch_xattn_sim<T, kT2I>(p, plan, workspace, stream)
                             : launch_xattn_sim<T, kI2T>(p, plan, workspace, stream);
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace itm
