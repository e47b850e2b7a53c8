// CPU kernel of itm_kernels::xattn_sim_fwd: all-pairs SCAN cross-attention similarity.
//
// Both directions run one loop skeleton on a tile of "context rows x query columns":
//   t2i: rows = the regions of a block of images (A operand: the image rows, read in place),
//        columns = the words of a block of captions packed back to back (B operand, packed once per job);
//   i2t: rows = the words of a block of captions (A operand: gathered per tile),
//        columns = the regions of a block of images (B operand, packed once per job).
// A single-threaded GEMM (oneDNN brgemm through ATen's cpublas for float32 and bfloat16, ATen mm for float64)
// writes the score tile S into per-thread scratch; the epilogue then runs on the hot tile:
//   1. per row and column group (the query set): LeakyReLU for the clipped norms, the norm statistic over the
//      group's valid columns, Z = lambda_softmax * normed score;
//   2. per row group (the context set) and column: softmax of Z over the group's valid rows (kept unnormalised,
//      e = exp(Z - max)), num = sum e s, a2 = e^T Gram e with the group's Gram matrix (G = V V^T per image for
//      t2i, H = E E^T per caption for i2t), R = cosine_from_gram(num / sum e, |q|, a2 / (sum e)^2);
//   3. per (row group, column group): the aggregation of R over the group's valid columns.
// The attended vectors never exist; padding rows/columns are computed by the GEMM only where an image has fewer
// than K valid regions and are never read. The epilogue is written with GCC vector types of the level's register
// width (64 / 32 / 16 bytes) and compiled for AVX-512, AVX2+FMA and baseline, chosen per call by the SIMD level (common/simd_clones.h, ITM_KERNELS_ISA).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/bf16.h"
#include "common/bf16_gemm.h"
#include "common/brgemm_shapes.h"
#include "common/simd_clones.h"
#include "common/simd_vec.h"
#include "common/vnni.h"
#include "xattn_sim/math.h"
#include "xattn_sim/tiles.h"

namespace itm {
namespace cpu {
namespace {
using namespace simd;

// Columns per attend_cols block, in vectors: its 4 * NV accumulators (max, sum, num, a2) stay in registers with room
// for the loads (32 zmm at 64 bytes; 16 ymm / xmm at 32 and 16 bytes).
template <int W> constexpr int kAttendBlock = W == 64 ? 4 : 2;

template <class V, class T> ITM_INLINE V vpre(V x, bool clip) {
  return clip ? (x > T(0) ? x : x * T(kLeakySlope)) : x;
}

// ------------------------------------------------------------------------------------------------------------------
// The epilogue of one tile.
template <class T> struct TileArgs {
  const T* S;            // (rows, ld) scores; columns [0, qpad) readable
  T* Z;                  // (rows, ld) scratch
  int64_t ld, qpad;      // qpad = columns rounded up to the vector width; ld >= qpad + width
  int64_t n_rg;          // row groups (context sets)
  const int64_t* rg_off; // first row of each group
  const int64_t* rg_len; // valid rows of each group
  const T* const* gram;  // per row group: its Gram matrix (rg_len x rg_len used, row stride gram_ld)
  const int64_t* gram_ld;
  int64_t n_cg;          // column groups (query sets)
  const int64_t* cg_off; // first column of each group
  const int64_t* cg_len; // valid columns of each group
  const T* qnorm;        // |q| per column, qpad entries readable
  T* aux;                // 5 * ld scratch: sum, num, a2, R, b (sum_r e_r |v_r|, the Gram guard's scale)
  T* stat;               // one value per row of the largest row group
  T* out;                // out[g * out_sg + h * out_sh]
  int64_t out_sg, out_sh;
  int norm, agg;
  T lambda_softmax, lambda_lse;
  // Inputs, for the exact recompute of the queries where the Gram identity cancels (kGramCancelRatio):
  const char* ctx;             // row r of row group g at ctx + (rg_off[g] + r) * row_bytes
  const void* const* qrows;    // the query item of column q
  int64_t row_bytes, d;
  int in_kind;                 // 0 float32, 1 bfloat16, 2 float64
};

template <class E> double as_f64(const void* p, int64_t k) {
  if constexpr (std::is_same<E, c10::BFloat16>::value)
    return static_cast<double>(static_cast<float>(static_cast<const E*>(p)[k]));
  else
    return static_cast<double>(static_cast<const E*>(p)[k]);
}

// Cosine of query column q with the context of rows [0, rn) (weights e, sum e = `sum`), in d-space in float64:
// the rare path for queries whose attended vector nearly vanishes (alpha^T G alpha cancels in float32).
template <class T, class E>
double exact_cosine_typed(const TileArgs<T>& a, const T* Z, int64_t r0, int64_t rn, int64_t q, T sum) {
  thread_local std::vector<double> acc;
  acc.assign(a.d, 0.0);
  for (int64_t r = 0; r < rn; ++r) {
    const double w = static_cast<double>(Z[r * a.ld + q]) / static_cast<double>(sum);
    const void* v = a.ctx + (r0 + r) * a.row_bytes;
    for (int64_t k = 0; k < a.d; ++k) acc[k] += w * as_f64<E>(v, k);
  }
  double dot = 0, aa = 0, qq = 0;
  for (int64_t k = 0; k < a.d; ++k) {
    const double x = as_f64<E>(a.qrows[q], k);
    dot += acc[k] * x;
    aa += acc[k] * acc[k];
    qq += x * x;
  }
  const double denom = std::sqrt(qq) * std::sqrt(aa);
  return dot / (denom > kEps ? denom : kEps);
}

template <class T>
__attribute__((noinline)) T exact_cosine(const TileArgs<T>& a, const T* Z, int64_t r0, int64_t rn, int64_t q,
                                         T sum) {
  switch (a.in_kind) {
    case 1: return static_cast<T>(exact_cosine_typed<T, c10::BFloat16>(a, Z, r0, rn, q, sum));
    case 2: return static_cast<T>(exact_cosine_typed<T, double>(a, Z, r0, rn, q, sum));
    default: return static_cast<T>(exact_cosine_typed<T, float>(a, Z, r0, rn, q, sum));
  }
}

// Step 1 for the rows [0, rn) of a row group: Z = lambda * normed(pre(S)) per column group. Column groups are
// processed one after another, each over all rows (the per-row statistics of a group go to `stat`, and the
// sqrt/divide that turns them into factors runs vectorised over the rows). Windows of the vector width run past a
// group's end: those lanes are masked out of the statistics, and their stores are overwritten by the next group
// (groups are processed left to right) or land in the row's slack (ld >= qpad + width).
template <int W, class T, int kKind>
ITM_INLINE void norm_group(const T* S, T* Z, int64_t ld, int64_t rn, const TileArgs<T>& a, bool clip, T* stat) {
  using V = typename Vec<T, W>::V;
  using I = typename Vec<T, W>::I;
  constexpr int N = Vec<T, W>::N;
  const I iota = viota<W, T>();
  const V zero = {};
  const T lam = a.lambda_softmax;
  for (int64_t h = 0; h < a.n_cg; ++h) {
    const T* sp = S + a.cg_off[h];
    T* zp = Z + a.cg_off[h];
    const int64_t n = a.cg_len[h];
    if (kKind == 3) {  // clipped / no_norm
      for (int64_t r = 0; r < rn; ++r)
        for (int64_t j = 0; j < n; j += N) vstore(zp + r * ld + j, vpre<V, T>(vload<W>(sp + r * ld + j), clip) * lam);
    } else if (kKind == 1 || kKind == 2) {  // l2 / l1
      for (int64_t r = 0; r < rn; ++r) {
        V acc = zero;
        for (int64_t j = 0; j < n; j += N) {
          V p = vpre<V, T>(vload<W>(sp + r * ld + j), clip);
          V term = kKind == 1 ? p * p : (p < T(0) ? -p : p);
          acc += vmask_below(iota, n - j) ? term : zero;
        }
        stat[r] = hsum(acc);
      }
      for (int64_t r = 0; r < rn; ++r) stat[r] = lam * norm_factor<T>(stat[r], kKind == 1 ? kL2Norm : kL1Norm);
      for (int64_t r = 0; r < rn; ++r) {
        const T f = stat[r];
        for (int64_t j = 0; j < n; j += N) vstore(zp + r * ld + j, vpre<V, T>(vload<W>(sp + r * ld + j), clip) * f);
      }
    } else {  // softmax over the group's columns
      const V ninf = vsplat<W, T>(-std::numeric_limits<T>::infinity());
      for (int64_t r = 0; r < rn; ++r) {
        V mx = ninf;
        for (int64_t j = 0; j < n; j += N)
          mx = vmax(mx, vmask_below(iota, n - j) ? vload<W>(sp + r * ld + j) : ninf);
        const V vm = vsplat<W>(hmax(mx));
        V acc = zero;
        for (int64_t j = 0; j < n; j += N) {
          V e = vexp(vload<W>(sp + r * ld + j) - vm);
          e = vmask_below(iota, n - j) ? e : zero;
          acc += e;
          vstore(zp + r * ld + j, e);
        }
        stat[r] = hsum(acc);
      }
      for (int64_t r = 0; r < rn; ++r) stat[r] = lam / stat[r];
      for (int64_t r = 0; r < rn; ++r) {
        const T f = stat[r];
        for (int64_t j = 0; j < n; j += N) vstore(zp + r * ld + j, vload<W>(zp + r * ld + j) * f);
      }
    }
  }
}

// Step 2 on NV vectors of columns starting at c, for the rows [0, rn) of a row group (S, Z point at its first
// row): e = exp(Z - max) (stored back into Z), sum e, num = sum e s, a2 = e^T G e (G symmetric: the strict lower
// triangle twice plus the diagonal).
template <int W, class T, int NV>
ITM_INLINE void attend_cols(const T* S, T* Z, int64_t ld, int64_t c, int64_t rn, const T* G, int64_t ldg,
                            T* sum_out, T* num_out, T* a2_out) {
  using V = typename Vec<T, W>::V;
  constexpr int N = Vec<T, W>::N;
  V m[NV], sum[NV], num[NV], a2[NV];
  for (int v = 0; v < NV; ++v) m[v] = vsplat<W, T>(-std::numeric_limits<T>::infinity());
  for (int64_t r = 0; r < rn; ++r)
    for (int v = 0; v < NV; ++v) m[v] = vmax(m[v], vload<W>(Z + r * ld + c + v * N));
  for (int v = 0; v < NV; ++v) sum[v] = num[v] = a2[v] = V{};
  for (int64_t r = 0; r < rn; ++r) {
    for (int v = 0; v < NV; ++v) {
      T* zp = Z + r * ld + c + v * N;
      V e = vexp(vload<W>(zp) - m[v]);
      vstore(zp, e);
      sum[v] += e;
      num[v] += e * vload<W>(S + r * ld + c + v * N);
    }
  }
  for (int64_t r = 0; r < rn; ++r) {
    const T* g = G + r * ldg;
    V acc[NV];
    for (int v = 0; v < NV; ++v) acc[v] = V{};
    for (int64_t r2 = 0; r2 < r; ++r2) {
      const T grr2 = g[r2];
      for (int v = 0; v < NV; ++v) acc[v] += grr2 * vload<W>(Z + r2 * ld + c + v * N);
    }
    const T gd = g[r];
    for (int v = 0; v < NV; ++v) {
      V er = vload<W>(Z + r * ld + c + v * N);
      a2[v] += er * (acc[v] * T(2) + er * gd);
    }
  }
  for (int v = 0; v < NV; ++v) {
    vstore(sum_out + c + v * N, sum[v]);
    vstore(num_out + c + v * N, num[v]);
    vstore(a2_out + c + v * N, a2[v]);
  }
}

// Aggregation of r[0, n) (r readable up to the next multiple of the vector width).
template <int W, class T> ITM_INLINE T aggregate_span(const T* r, int64_t n, int agg, T lambda_lse) {
  using V = typename Vec<T, W>::V;
  using I = typename Vec<T, W>::I;
  constexpr int N = Vec<T, W>::N;
  const I iota = viota<W, T>();
  const V zero = {};
  const V ninf = vsplat<W, T>(-std::numeric_limits<T>::infinity());
  if (agg == kMean || agg == kSum) {
    V acc = zero;
    for (int64_t j = 0; j < n; j += N) {
      acc += vmask_below(iota, n - j) ? vload<W>(r + j) : zero;
    }
    const T s = hsum(acc);
    return agg == kMean ? s / T(n) : s;
  }
  V mx = ninf;
  for (int64_t j = 0; j < n; j += N) {
    mx = vmax(mx, vmask_below(iota, n - j) ? vload<W>(r + j) : ninf);
  }
  const T top = hmax(mx);
  if (agg == kMax) return top;
  V acc = zero;
  const V vt = vsplat<W>(top);
  for (int64_t j = 0; j < n; j += N) {
    V e = vexp((vload<W>(r + j) - vt) * lambda_lse);
    acc += vmask_below(iota, n - j) ? e : zero;
  }
  return top + std::log(hsum(acc)) / lambda_lse;
}

template <int W, class T, int kKind> ITM_INLINE void tile_epilogue_impl(const TileArgs<T>& a) {
  constexpr int N = Vec<T, W>::N;
  constexpr int NV = kAttendBlock<W>;
  const bool clip = norm_clips(a.norm);
  T* sum = a.aux;
  T* num = a.aux + a.ld;
  T* a2 = a.aux + 2 * a.ld;
  T* R = a.aux + 3 * a.ld;
  T* b = a.aux + 4 * a.ld;
  const T ratio = static_cast<T>(kGramCancelRatio);
  for (int64_t g = 0; g < a.n_rg; ++g) {
    const int64_t r0 = a.rg_off[g], rn = a.rg_len[g];
    const T* S = a.S + r0 * a.ld;
    T* Z = a.Z + r0 * a.ld;
    norm_group<W, T, kKind>(S, Z, a.ld, rn, a, clip, a.stat);
    int64_t c = 0;
    for (; c + NV * N <= a.qpad; c += NV * N)
      attend_cols<W, T, NV>(S, Z, a.ld, c, rn, a.gram[g], a.gram_ld[g], sum, num, a2);
    for (; c < a.qpad; c += N) attend_cols<W, T, 1>(S, Z, a.ld, c, rn, a.gram[g], a.gram_ld[g], sum, num, a2);
    const T* qn = a.qnorm;
    for (int64_t q = 0; q < a.qpad; ++q) {
      const T inv = T(1) / sum[q];
      R[q] = cosine_from_gram<T>(num[q] * inv, qn[q], a2[q] * inv * inv);
    }
    // Gram guard: b = sum_r e_r |v_r| (|v_r| = sqrt(G_rr)); queries with a2 < ratio * b^2 are recomputed exactly.
    for (int64_t q = 0; q < a.qpad; ++q) b[q] = T(0);
    const T* G = a.gram[g];
    for (int64_t r = 0; r < rn; ++r) {
      const T gr = G[r * a.gram_ld[g] + r];
      const T vr = std::sqrt(gr > T(0) ? gr : T(0));
      const T* zr = Z + r * a.ld;
      for (int64_t q = 0; q < a.qpad; ++q) b[q] += zr[q] * vr;
    }
    for (int64_t h = 0; h < a.n_cg; ++h)
      for (int64_t q = a.cg_off[h], q1 = a.cg_off[h] + a.cg_len[h]; q < q1; ++q)
        if (a2[q] < ratio * b[q] * b[q]) R[q] = exact_cosine<T>(a, Z, r0, rn, q, sum[q]);
    for (int64_t h = 0; h < a.n_cg; ++h)
      a.out[g * a.out_sg + h * a.out_sh] = aggregate_span<W, T>(R + a.cg_off[h], a.cg_len[h], a.agg, a.lambda_lse);
  }
}

template <int W, class T> ITM_INLINE void tile_epilogue_dispatch(const TileArgs<T>& a) {
  switch (a.norm) {
    case kSoftmax: tile_epilogue_impl<W, T, 0>(a); break;
    case kL2Norm:
    case kClippedL2Norm: tile_epilogue_impl<W, T, 1>(a); break;
    case kL1Norm:
    case kClippedL1Norm: tile_epilogue_impl<W, T, 2>(a); break;
    default: tile_epilogue_impl<W, T, 3>(a); break;
  }
}

ITM_SIMD_FUNCTION(tile_epilogue, tile_epilogue_dispatch)

// ------------------------------------------------------------------------------------------------------------------
// Per-call tables: Gram matrices of the context sets and norms of the query items, from the inputs (bfloat16
// widened to float exactly). Each dot product keeps 4 vectors of partial sums (64 float / 32 double lanes).
template <int W, class T, std::enable_if_t<std::is_floating_point_v<T>, int> = 0>
ITM_INLINE typename Vec<T, W>::V vload_as(const T* p) {
  return vload<W>(p);
}
template <int W> ITM_INLINE typename Vec<float, W>::V vload_as(const c10::BFloat16* p) { return widen_bf16<W>(p); }

template <int W, class T, class in_t> ITM_INLINE T dot_rows(const in_t* x, const in_t* y, int64_t d) {
  using V = typename Vec<T, W>::V;
  constexpr int N = Vec<T, W>::N;
  V acc[4] = {V{}, V{}, V{}, V{}};
  int64_t k = 0;
  for (; k + 4 * N <= d; k += 4 * N)
    for (int v = 0; v < 4; ++v) acc[v] += vload_as<W>(x + k + v * N) * vload_as<W>(y + k + v * N);
  for (; k + N <= d; k += N) acc[0] += vload_as<W>(x + k) * vload_as<W>(y + k);
  T s = hsum((acc[0] + acc[1]) + (acc[2] + acc[3]));
  for (; k < d; ++k) s += widen(x[k]) * widen(y[k]);
  return s;
}

// G[r * ldg + r2] = x_r . x_r2 for r2 <= r < n (the lower triangle the epilogue reads); rows of length d.
template <int W, class T, class in_t>
ITM_INLINE void lower_gram_impl(const in_t* x, int64_t n, int64_t d, T* G, int64_t ldg) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t r2 = 0; r2 <= r; ++r2) G[r * ldg + r2] = dot_rows<W, T>(x + r * d, x + r2 * d, d);
}

template <int W, class T, class in_t> ITM_INLINE void row_norms_impl(const in_t* x, int64_t n, int64_t d, T* out) {
  for (int64_t r = 0; r < n; ++r) out[r] = std::sqrt(dot_rows<W, T>(x + r * d, x + r * d, d));
}

ITM_SIMD_FUNCTION(lower_gram, lower_gram_impl)
ITM_SIMD_FUNCTION(row_norms, row_norms_impl)

// ------------------------------------------------------------------------------------------------------------------
// Tile GEMMs: C (M x N, ldc) = A (M x d, lda) B, with B packed once per job from N source rows of length d.
// Shapes are quantised (rows: kRowQuantum-multiples plus a tail; columns: rounded up to kColQuantum with zero
// padding columns; ldc fixed per call), so that the brgemm kernels oneDNN caches per shape stay bounded over many
// ragged calls (tests/xattn_sim/test_xattn_sim_cpu.py::test_brgemm_shapes_stay_bounded).
constexpr int64_t kRowQuantum = 16;
constexpr int64_t kColQuantum = 16;
int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

enum class GemmKind { kF32, kBf16Vnni, kBf16OneDnnPack, kBf16Plain, kF64 };

// out[k * ldo + n] = cols[n][k]: the N source rows become the N columns of a (kd x N) row-major matrix.
template <class E> void pack_transposed(const E* const* cols, int64_t n_cols, int64_t kd, E* out, int64_t ldo) {
  constexpr int64_t kNB = 16, kKB = 128;
  for (int64_t n0 = 0; n0 < n_cols; n0 += kNB) {
    const int64_t n1 = std::min(n_cols, n0 + kNB);
    for (int64_t k0 = 0; k0 < kd; k0 += kKB) {
      const int64_t k1 = std::min(kd, k0 + kKB);
      for (int64_t n = n0; n < n1; ++n) {
        const E* src = cols[n];
        if (src)
          for (int64_t k = k0; k < k1; ++k) out[k * ldo + n] = src[k];
        else  // a padding column (the column count rounded up to kColQuantum)
          for (int64_t k = k0; k < k1; ++k) out[k * ldo + n] = E(0);
      }
    }
  }
}

// VNNI layout for bf16 dot products (common/vnni.h): the 2 * (d / 2) leading features of each column; the odd last
// feature (if any) goes to tail[n] in float and is added by a rank-1 update after the GEMM.
void pack_vnni(const c10::BFloat16* const* cols, int64_t n_cols, int64_t d, c10::BFloat16* out, float* tail) {
  pack_cols_impl<c10::BFloat16>(out, cols, n_cols, d, d - d % 2, n_cols);
  if (d % 2)
    for (int64_t n = 0; n < n_cols; ++n) tail[n] = cols[n] ? static_cast<float>(cols[n][d - 1]) : 0.f;
}

// The bf16 tile GEMM of this CPU (probed once, csrc/gemm/cpu.cpp).
GemmKind bf16_kind() {
  switch (bf16_gemm_kind()) {
    case Bf16Gemm::kVnni: return GemmKind::kBf16Vnni;
    case Bf16Gemm::kOneDnnPack: return GemmKind::kBf16OneDnnPack;
    default: return GemmKind::kBf16Plain;
  }
}

// Per-thread buffer of a job's packed B operand.
struct PackedB {
  GemmKind kind;
  int64_t n = 0, d = 0;
  int64_t nb = 0;           // kF32 / kBf16Vnni: columns per block; block j (width w_j = min(nb, n - j nb)) is packed
                            // contiguously at offset j * nb * (rows) with row stride w_j
  void* data = nullptr;     // kF32: float (d x n); bf16 VNNI/oneDNN: bf16 (2*(d/2) x n); kBf16Plain: never packed;
                            // kF64: double rows (n x d)
  float* tail = nullptr;    // bf16 VNNI/oneDNN with odd d: the last feature of each column
  void* tmp = nullptr;      // kBf16OneDnnPack: plain staging (d x n) bf16
};

// cols: n_cols pointers, n_cols a multiple of kColQuantum, null for the padding columns (packed as zeros).
void pack_b(PackedB& p, const void* const* cols, int64_t n_cols, int64_t d) {
  p.n = n_cols;
  p.d = d;
  switch (p.kind) {
    case GemmKind::kF32:
      for (int64_t j0 = 0; j0 < n_cols; j0 += p.nb) {
        const int64_t w = std::min(p.nb, n_cols - j0);
        pack_transposed(reinterpret_cast<const float* const*>(cols) + j0, w, d, static_cast<float*>(p.data) + j0 * d,
                        w);
      }
      break;
    case GemmKind::kBf16Vnni:
      for (int64_t j0 = 0; j0 < n_cols; j0 += p.nb) {
        const int64_t w = std::min(p.nb, n_cols - j0);
        pack_vnni(reinterpret_cast<const c10::BFloat16* const*>(cols) + j0, w, d,
                  static_cast<c10::BFloat16*>(p.data) + j0 * (d - d % 2), p.tail + j0);
      }
      break;
    case GemmKind::kBf16OneDnnPack: {
      auto c = reinterpret_cast<const c10::BFloat16* const*>(cols);
      const int64_t de = d - d % 2;
      pack_transposed(c, n_cols, de, static_cast<c10::BFloat16*>(p.tmp), n_cols);
      if (de > 0)
        at::native::cpublas::pack(de, n_cols, n_cols, n_cols, at::kBFloat16, at::kBFloat16, p.tmp, p.data);
      if (d % 2)
        for (int64_t n = 0; n < n_cols; ++n) p.tail[n] = c[n] ? static_cast<float>(c[n][d - 1]) : 0.f;
      break;
    }
    case GemmKind::kBf16Plain:  // never packed: xattn_sim_fwd_cpu widens such inputs to float32 first
      TORCH_INTERNAL_ASSERT(false, "xattn_sim: kBf16Plain reached pack_b");
      break;
    case GemmKind::kF64: {
      auto c = reinterpret_cast<const double* const*>(cols);
      double* out = static_cast<double*>(p.data);
      for (int64_t n = 0; n < n_cols; ++n)
        if (c[n]) std::memcpy(out + n * d, c[n], d * sizeof(double));
        else std::fill(out + n * d, out + (n + 1) * d, 0.0);
      break;
    }
  }
}

// Elements of in_t that pack_b needs for n columns rounded up to kColQuantum (plus the float tail and the staging
// buffer).
int64_t packed_b_elems(GemmKind kind, int64_t n, int64_t d) {
  n = round_up(n, kColQuantum);
  return (kind == GemmKind::kF64 ? n * d : (d + 1) * n);
}

// float32: the brgemm microkernel accumulates each output along the whole feature axis in one register chain
// (max error 1.0e-6 on the golden scores at d = 1024, vs 2.2e-7 for MKL's sgemm, enough to break the 1e-6 golden
// tolerance). Chunks of kF32Chunk features are multiplied into separate buffers and summed (max error 1.8e-7).
constexpr int64_t kF32Chunk = 128;

// brgemm on M rows as a multiple of kRowQuantum plus a tail, so that ragged row counts (i2t: the words of a caption
// block) make few distinct shapes: oneDNN caches one JIT kernel per shape per thread for the life of the process.
template <class E>
void brgemm_rows(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const E* A,
                 const E* B, float* C, bool vnni) {
  const int64_t main = M / kRowQuantum * kRowQuantum;
  if (main) brgemm_counted(main, N, K, lda, ldb, ldc, add, A, B, C, vnni);
  if (M > main) brgemm_counted(M - main, N, K, lda, ldb, ldc, add, A + main * lda, B, C + main * ldc, vnni);
}

void gemm_tile(const PackedB& p, const void* A, int64_t lda, int64_t M, float* C, int64_t ldc, float* tmp) {
  const int64_t N = p.n, d = p.d;
  if (p.kind == GemmKind::kF32) {
    auto a = static_cast<const float*>(A);
    for (int64_t j0 = 0; j0 < N; j0 += p.nb) {
      const int64_t w = std::min(p.nb, N - j0);
      const float* b = static_cast<const float*>(p.data) + j0 * d;
      for (int64_t k0 = 0; k0 < d; k0 += kF32Chunk) {
        const int64_t kc = std::min(kF32Chunk, d - k0);
        brgemm_rows(M, w, kc, lda, w, ldc, false, a + k0, b + k0 * w, (k0 ? tmp : C) + j0, false);
        if (k0)
          for (int64_t m = 0; m < M; ++m) {
            float* c = C + m * ldc + j0;
            const float* t = tmp + m * ldc + j0;
            for (int64_t n = 0; n < w; ++n) c[n] += t[n];
          }
      }
    }
    return;
  }
  auto a = static_cast<const c10::BFloat16*>(A);
  const int64_t de = d - d % 2;
  if (de == 0) {
    for (int64_t m = 0; m < M; ++m) std::fill(C + m * ldc, C + m * ldc + N, 0.f);
  } else if (p.kind == GemmKind::kBf16Vnni) {
    for (int64_t j0 = 0; j0 < N; j0 += p.nb) {
      const int64_t w = std::min(p.nb, N - j0);
      brgemm_rows(M, w, de, lda, w, ldc, false, a, static_cast<const c10::BFloat16*>(p.data) + j0 * de, C + j0,
                  true);
    }
  } else {
    brgemm_rows(M, N, de, lda, N, ldc, false, a, static_cast<const c10::BFloat16*>(p.data), C, true);
  }
  if (d % 2) {
    for (int64_t m = 0; m < M; ++m) {
      const float am = static_cast<float>(a[m * lda + d - 1]);
      float* c = C + m * ldc;
      for (int64_t n = 0; n < N; ++n) c[n] += am * p.tail[n];
    }
  }
}

void gemm_tile(const PackedB& p, const void* A, int64_t lda, int64_t M, double* C, int64_t ldc, double*) {
  auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor c = at::from_blob(C, {M, p.n}, {ldc, 1}, opts);
  at::Tensor a = at::from_blob(const_cast<void*>(A), {M, p.d}, {lda, 1}, opts);
  at::Tensor b = at::from_blob(p.data, {p.n, p.d}, {p.d, 1}, opts);
  at::mm_out(c, a, b.t());
}

// ------------------------------------------------------------------------------------------------------------------
// Orchestration.
template <class T> struct Problem {
  const void* img;  // (NI, K, d) in the GEMM input dtype
  const void* cap;  // (NC, L, d)
  int64_t elem;     // bytes per input element
  int64_t NI, K, NC, L, d;
  const int64_t* cap_lens;
  const int64_t* img_lens;
  int direction, norm, agg;
  T lambda_softmax, lambda_lse;
  GemmKind kind;
  std::vector<int64_t> word_off;  // packed word offsets, NC + 1
  const T* gram;                  // t2i: (NI, K, K) region Gram matrices; i2t: packed caption Gram matrices
  std::vector<int64_t> gram_off;  // i2t: offset of caption c's (L_c x L_c) Gram matrix
  const T* qnorm;                 // t2i: packed word norms; i2t: (NI * K) region norms; both with slack
  T* out;                         // (NI, NC), or null when the tiles go to `sink`
  TileSink<T>* sink = nullptr;    // xattn_sim_tiles: receives every finished tile instead of `out`
  // Tiling.
  int64_t ni;                     // images per tile
  std::vector<int64_t> cap_block; // caption block boundaries (captions), blocks of at most w_max words
  int64_t w_max;                  // most words in a caption block
  int64_t w_tile;                 // the caption-block word budget (>= w_max): t2i tiles' row stride is set by it
};

struct Job {
  int64_t b, a_begin, a_end;  // packed operand block, range of blocks of the other operand
};

constexpr int64_t kSlack = 16;  // elements readable past the end of the per-column tables (the widest vector)

template <class T> int64_t tile_ld(int64_t cols) {
  constexpr int64_t N = Vec<T>::N;
  return (cols + N - 1) / N * N + N;
}

template <class T> struct Scratch {
  at::Tensor buf;
  PackedB pb;
  const void** cols = nullptr;
  void* a_rows = nullptr;  // i2t: gathered caption words
  T* S = nullptr;
  T* Z = nullptr;
  T* aux = nullptr;
  T* stat = nullptr;
  std::vector<int64_t> rg_off, rg_len, gram_ld, cg_off, cg_len;
  std::vector<const T*> gram;
  int64_t slot = 0;         // the worker's TileSink slot
  std::vector<T> tile_out;  // sink mode: the scores of one tile, (images, w_max)
};

// Default tile: 8 images (288 region rows at K = 36) x caption blocks of up to 384 words. Measured on 2 Zen 4
// cores (d = 1024): 4..16 images x 96..768 words stay within 10% of each other; 8 x 384 was the best for float32
// and bfloat16 in both directions. ITM_CPU_TILE_IMAGES / ITM_CPU_TILE_WORDS override them (tuning only).
constexpr int64_t kDefaultImages = 8;
constexpr int64_t kDefaultWords = 384;
constexpr int64_t kDefaultTileBytes = 4 << 20;
constexpr int64_t kGemmBlock = 64;

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  long long x = std::strtoll(v, &end, 10);
  return (end && *end == '\0' && x > 0) ? static_cast<int64_t>(x) : fallback;
}

// Byte sizes of the parts of one thread's scratch for tiles of `ni` images and caption blocks of `w` words.
struct ScratchSizes {
  int64_t packed, staging, tail, cols, a_rows, tile;  // tile: S, Z (rows x ld each), 5 x ld aux, rows + slack stat
  static int64_t round(int64_t x) { return (x + 63) / 64 * 64; }
  int64_t total() const {
    return round(packed) + round(staging) + round(tail) + round(cols) + round(a_rows) + round(tile) + 64;
  }
};

template <class T> ScratchSizes scratch_sizes(const Problem<T>& P, int64_t ni, int64_t w, int64_t* rows_out = nullptr,
                                              int64_t* ld_out = nullptr) {
  const bool t2i = P.direction == kT2I;
  const int64_t b_cols = t2i ? w : ni * P.K;
  const int64_t rows = t2i ? ni * P.K : w;
  const int64_t ld = tile_ld<T>(b_cols);
  ScratchSizes z;
  z.packed = packed_b_elems(P.kind, b_cols, P.d) * P.elem;
  z.staging = P.kind == GemmKind::kBf16OneDnnPack ? z.packed : 0;
  z.tail = b_cols * (int64_t)sizeof(float);
  z.cols = round_up(b_cols, kColQuantum) * (int64_t)sizeof(void*);
  z.a_rows = t2i ? 0 : w * P.d * P.elem;
  z.tile = ((2 * rows + 5) * ld + rows + kSlack) * (int64_t)sizeof(T);
  if (rows_out) *rows_out = rows;
  if (ld_out) *ld_out = ld;
  return z;
}

template <class T> void alloc_scratch(const Problem<T>& P, Scratch<T>& s) {
  int64_t rows = 0, ld = 0;
  const ScratchSizes z = scratch_sizes(P, P.ni, P.direction == kT2I ? P.w_tile : P.w_max, &rows, &ld);
  s.buf = at::empty({z.total()}, at::TensorOptions().dtype(at::kByte));
  char* p = reinterpret_cast<char*>(s.buf.data_ptr());
  std::memset(p, 0, z.total());  // padding lanes of the tiles then hold finite values
  p += (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64;
  s.pb.kind = P.kind;
  s.pb.nb = env_int("ITM_CPU_GEMM_NB", kGemmBlock);
  s.pb.data = p;
  p += ScratchSizes::round(z.packed);
  s.pb.tmp = z.staging ? p : nullptr;
  p += ScratchSizes::round(z.staging);
  s.pb.tail = reinterpret_cast<float*>(p);
  p += ScratchSizes::round(z.tail);
  s.cols = reinterpret_cast<const void**>(p);
  p += ScratchSizes::round(z.cols);
  s.a_rows = z.a_rows ? p : nullptr;
  p += ScratchSizes::round(z.a_rows);
  s.S = reinterpret_cast<T*>(p);
  s.Z = s.S + rows * ld;
  s.aux = s.Z + rows * ld;
  s.stat = s.aux + 5 * ld;
}

// The epilogue of the tile of images [i0, i1) x captions [c0, c1): into the (NI, NC) output, or (sink mode) into
// the worker's tile buffer, images x captions with row stride w_max, handed to the sink.
template <class T>
void finish_tile(const Problem<T>& P, Scratch<T>& s, TileArgs<T>& a, int64_t i0, int64_t i1, int64_t c0, int64_t c1) {
  if (!P.sink) {
    a.out = P.out + i0 * P.NC + c0;
    tile_epilogue(a);
    return;
  }
  const bool t2i = P.direction == kT2I;  // t2i row groups are images, i2t row groups are captions
  a.out = s.tile_out.data();
  a.out_sg = t2i ? P.w_max : 1;
  a.out_sh = t2i ? 1 : P.w_max;
  tile_epilogue(a);
  P.sink->consume(s.slot, s.tile_out.data(), P.w_max, i0, i1, c0, c1);
}

template <class T> void run_job(const Problem<T>& P, const Job& job, Scratch<T>& s) {
  const int64_t K = P.K, d = P.d, NC = P.NC;
  const char* img = static_cast<const char*>(P.img);
  const char* cap = static_cast<const char*>(P.cap);
  const int64_t row_bytes = d * P.elem;
  TileArgs<T> a;
  a.norm = P.norm;
  a.agg = P.agg;
  a.lambda_softmax = P.lambda_softmax;
  a.lambda_lse = P.lambda_lse;
  a.aux = s.aux;
  a.stat = s.stat;
  a.qrows = s.cols;
  a.row_bytes = row_bytes;
  a.d = d;
  a.in_kind = P.kind == GemmKind::kF64 ? 2 : (P.kind == GemmKind::kF32 ? 0 : 1);
  if (P.direction == kT2I) {
    // Columns: the words of caption block b; rows: the regions of each image block in [a_begin, a_end).
    const int64_t c0 = P.cap_block[job.b], c1 = P.cap_block[job.b + 1];
    const int64_t w0 = P.word_off[c0], W = P.word_off[c1] - w0;
    s.cg_off.clear();
    s.cg_len.clear();
    for (int64_t c = c0; c < c1; ++c) {
      s.cg_off.push_back(P.word_off[c] - w0);
      s.cg_len.push_back(P.cap_lens[c]);
      for (int64_t t = 0; t < P.cap_lens[c]; ++t) s.cols[P.word_off[c] - w0 + t] = cap + (c * P.L + t) * row_bytes;
    }
    for (int64_t q = W; q < round_up(W, kColQuantum); ++q) s.cols[q] = nullptr;
    pack_b(s.pb, s.cols, round_up(W, kColQuantum), d);
    a.ld = tile_ld<T>(P.w_tile);  // W <= w_tile: a row stride from a few values (384 words unless over budget)
    a.qpad = (W + Vec<T>::N - 1) / Vec<T>::N * Vec<T>::N;
    a.n_cg = c1 - c0;
    a.cg_off = s.cg_off.data();
    a.cg_len = s.cg_len.data();
    a.qnorm = P.qnorm + w0;
    a.out_sg = NC;
    a.out_sh = 1;
    for (int64_t ib = job.a_begin; ib < job.a_end; ++ib) {
      const int64_t i0 = ib * P.ni, i1 = std::min(P.NI, i0 + P.ni);
      gemm_tile(s.pb, img + i0 * K * row_bytes, d, (i1 - i0) * K, s.S, a.ld, s.Z);
      s.rg_off.clear();
      s.rg_len.clear();
      s.gram.clear();
      s.gram_ld.clear();
      for (int64_t i = i0; i < i1; ++i) {
        s.rg_off.push_back((i - i0) * K);
        s.rg_len.push_back(P.img_lens[i]);
        s.gram.push_back(P.gram + i * K * K);
        s.gram_ld.push_back(K);
      }
      a.S = s.S;
      a.Z = s.Z;
      a.n_rg = i1 - i0;
      a.rg_off = s.rg_off.data();
      a.rg_len = s.rg_len.data();
      a.gram = s.gram.data();
      a.gram_ld = s.gram_ld.data();
      a.ctx = img + i0 * K * row_bytes;
      finish_tile(P, s, a, i0, i1, c0, c1);
    }
  } else {
    // Columns: the regions of image block b; rows: the words of each caption block in [a_begin, a_end).
    const int64_t i0 = job.b * P.ni, i1 = std::min(P.NI, i0 + P.ni);
    const int64_t Q = (i1 - i0) * K;
    s.cg_off.clear();
    s.cg_len.clear();
    for (int64_t i = i0; i < i1; ++i) {
      s.cg_off.push_back((i - i0) * K);
      s.cg_len.push_back(P.img_lens[i]);
    }
    for (int64_t q = 0; q < Q; ++q) s.cols[q] = img + (i0 * K + q) * row_bytes;
    for (int64_t q = Q; q < round_up(Q, kColQuantum); ++q) s.cols[q] = nullptr;
    pack_b(s.pb, s.cols, round_up(Q, kColQuantum), d);
    a.ld = tile_ld<T>(P.ni * K);  // one row stride per call (Q <= ni K)
    a.qpad = (Q + Vec<T>::N - 1) / Vec<T>::N * Vec<T>::N;
    a.n_cg = i1 - i0;
    a.cg_off = s.cg_off.data();
    a.cg_len = s.cg_len.data();
    a.qnorm = P.qnorm + i0 * K;
    a.out_sg = 1;
    a.out_sh = NC;
    char* rows = static_cast<char*>(s.a_rows);
    for (int64_t cb = job.a_begin; cb < job.a_end; ++cb) {
      const int64_t c0 = P.cap_block[cb], c1 = P.cap_block[cb + 1];
      const int64_t w0 = P.word_off[c0], W = P.word_off[c1] - w0;
      s.rg_off.clear();
      s.rg_len.clear();
      s.gram.clear();
      s.gram_ld.clear();
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t o = P.word_off[c] - w0;
        std::memcpy(rows + o * row_bytes, cap + c * P.L * row_bytes, P.cap_lens[c] * row_bytes);
        s.rg_off.push_back(o);
        s.rg_len.push_back(P.cap_lens[c]);
        s.gram.push_back(P.gram + P.gram_off[c]);
        s.gram_ld.push_back(P.cap_lens[c]);
      }
      gemm_tile(s.pb, rows, d, W, s.S, a.ld, s.Z);
      a.S = s.S;
      a.Z = s.Z;
      a.n_rg = c1 - c0;
      a.rg_off = s.rg_off.data();
      a.rg_len = s.rg_len.data();
      a.gram = s.gram.data();
      a.gram_ld = s.gram_ld.data();
      a.ctx = rows;
      finish_tile(P, s, a, i0, i1, c0, c1);
    }
  }
}

template <class T> void choose_tiles(Problem<T>& P, int64_t max_tile_bytes) {
  int64_t longest = 1;
  for (int64_t c = 0; c < P.NC; ++c) longest = std::max(longest, P.cap_lens[c]);
  int64_t ni = std::min(P.NI, env_int("ITM_CPU_TILE_IMAGES", kDefaultImages));
  int64_t w = std::max(longest, env_int("ITM_CPU_TILE_WORDS", kDefaultWords));
  const int64_t budget = max_tile_bytes > 0 ? max_tile_bytes : kDefaultTileBytes;
  while (scratch_sizes(P, ni, w).total() > budget && (ni > 1 || w > longest)) {
    // Shrink the block whose packed copy dominates the scratch first: the caption block for t2i, the image
    // block for i2t.
    const bool shrink_words = (w > longest) && (P.direction == kT2I ? true : ni == 1);
    if (shrink_words)
      w = std::max(longest, w / 2);
    else
      ni = std::max<int64_t>(1, ni / 2);
  }
  P.ni = std::max<int64_t>(1, ni);
  P.w_tile = w;
  P.cap_block.assign(1, 0);
  P.w_max = 0;
  int64_t words = 0;
  for (int64_t c = 0; c < P.NC; ++c) {
    if (words > 0 && words + P.cap_lens[c] > w) {
      P.cap_block.push_back(c);
      P.w_max = std::max(P.w_max, words);
      words = 0;
    }
    words += P.cap_lens[c];
  }
  P.cap_block.push_back(P.NC);
  P.w_max = std::max(P.w_max, words);
}

// Threads worth using for `flops` of work split into `items` pieces: waking a thread costs about as much as a
// few MFLOP, and the tables and the tiles of small problems (tests, tiny batches) run on the calling thread.
int64_t threads_for(double flops, int64_t items) {
  constexpr double kFlopsPerThread = 4e6;
  const int64_t by_work = static_cast<int64_t>(flops / kFlopsPerThread) + 1;
  return std::max<int64_t>(1, std::min<int64_t>({static_cast<int64_t>(at::get_num_threads()), by_work, items}));
}

// Runs f(i) for i in [0, n) on up to `threads` threads, items handed out one at a time.
template <class F> void parallel_items(int64_t n, int64_t threads, const F& f) {
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1); i < n; i = next.fetch_add(1)) f(i);
  });
}

template <class T> void run_all(Problem<T>& P) {
  const int64_t n_img_blocks = (P.NI + P.ni - 1) / P.ni;
  const int64_t n_cap_blocks = static_cast<int64_t>(P.cap_block.size()) - 1;
  const bool t2i = P.direction == kT2I;
  const int64_t n_b = t2i ? n_cap_blocks : n_img_blocks;
  const int64_t n_a = t2i ? n_img_blocks : n_cap_blocks;
  const int64_t threads = std::max(1, at::get_num_threads());
  // Enough jobs for dynamic balancing: the inner range is split when there are few packed blocks (each part
  // re-packs its block). Cutting the streamed operand into last-level-cache-sized ranges swept by both threads
  // together was measured to change nothing (bfloat16 t2i, 1000 x 5000: 15.3 s CPU time either way).
  const int64_t splits = std::min(n_a, std::max<int64_t>(1, (4 * threads + n_b - 1) / n_b));
  std::vector<Job> jobs;
  for (int64_t b = 0; b < n_b; ++b)
    for (int64_t s = 0; s < splits; ++s) {
      const int64_t lo = n_a * s / splits, hi = n_a * (s + 1) / splits;
      if (hi > lo) jobs.push_back({b, lo, hi});
    }
  const int64_t n_jobs = static_cast<int64_t>(jobs.size());
  const double flops = 2.0 * P.NI * P.K * P.word_off[P.NC] * P.d;
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads_for(flops, n_jobs), 1, [&](int64_t slot, int64_t) {
    Scratch<T> s;
    alloc_scratch(P, s);
    s.slot = slot;
    if (P.sink) s.tile_out.assign(P.ni * P.w_max, T(0));
    for (int64_t j = next.fetch_add(1); j < n_jobs; j = next.fetch_add(1)) run_job(P, jobs[j], s);
    if (P.kind == GemmKind::kBf16Vnni || P.kind == GemmKind::kBf16OneDnnPack)
      at::native::cpublas::brgemm_release(true);
  });
}

// The Gram matrices of the context sets and the norms of the query items (valid rows only).
template <class T, class in_t> void compute_tables(Problem<T>& P, T* gram, T* qnorm) {
  const in_t* img = static_cast<const in_t*>(P.img);
  const in_t* cap = static_cast<const in_t*>(P.cap);
  const int64_t K = P.K, L = P.L, d = P.d;
  const bool t2i = P.direction == kT2I;
  const double flops =
      2.0 * d * (t2i ? P.NI * K * K / 2.0 + P.word_off[P.NC] : P.NI * K + P.gram_off[P.NC] / 2.0);
  // Items: images first, then captions, in chunks of 16.
  const int64_t img_chunks = (P.NI + 15) / 16, cap_chunks = (P.NC + 15) / 16;
  parallel_items(img_chunks + cap_chunks, threads_for(flops, img_chunks + cap_chunks), [&](int64_t item) {
    if (item < img_chunks) {
      for (int64_t i = item * 16; i < std::min(P.NI, item * 16 + 16); ++i) {
        const in_t* v = img + i * K * d;
        if (t2i) lower_gram(v, P.img_lens[i], d, gram + i * K * K, K);
        else row_norms(v, P.img_lens[i], d, qnorm + i * K);
      }
    } else {
      for (int64_t c = (item - img_chunks) * 16; c < std::min(P.NC, (item - img_chunks) * 16 + 16); ++c) {
        const in_t* e = cap + c * L * d;
        if (t2i) row_norms(e, P.cap_lens[c], d, qnorm + P.word_off[c]);
        else lower_gram(e, P.cap_lens[c], d, gram + P.gram_off[c], P.cap_lens[c]);
      }
    }
  });
}

template <class T>
at::Tensor xattn_sim_typed(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                           const at::Tensor& img_lens, int64_t direction, int64_t norm, double lambda_softmax,
                           int64_t agg, double lambda_lse, int64_t max_tile_bytes, GemmKind kind,
                           TileSink<T>* sink = nullptr) {
  const at::ScalarType acc = std::is_same<T, double>::value ? at::kDouble : at::kFloat;
  Problem<T> P;
  P.img = images.data_ptr();
  P.cap = captions.data_ptr();
  P.elem = images.element_size();
  P.NI = images.size(0);
  P.K = images.size(1);
  P.NC = captions.size(0);
  P.L = captions.size(1);
  P.d = images.size(2);
  P.cap_lens = cap_lens.data_ptr<int64_t>();
  P.img_lens = img_lens.data_ptr<int64_t>();
  P.direction = static_cast<int>(direction);
  P.norm = static_cast<int>(norm);
  P.agg = static_cast<int>(agg);
  P.lambda_softmax = static_cast<T>(lambda_softmax);
  P.lambda_lse = static_cast<T>(lambda_lse);
  P.kind = kind;
  at::Tensor out;
  if (sink) {
    P.out = nullptr;
    P.sink = sink;
  } else {
    out = at::empty({P.NI, P.NC}, images.options().dtype(acc));
    P.out = out.data_ptr<T>();
  }
  P.word_off.assign(P.NC + 1, 0);
  for (int64_t c = 0; c < P.NC; ++c) P.word_off[c + 1] = P.word_off[c] + P.cap_lens[c];
  const int64_t words = P.word_off[P.NC];
  // Tables: t2i: G_i = V_i V_i^T (N_img, K, K) and packed word norms; i2t: H_c = E_c E_c^T packed per caption
  // and region norms (N_img * K). Entries of padding rows are never written nor read, except the query norms
  // of padding regions, which are zero.
  const bool t2i = P.direction == kT2I;
  if (!t2i) {
    P.gram_off.assign(P.NC + 1, 0);
    for (int64_t c = 0; c < P.NC; ++c) P.gram_off[c + 1] = P.gram_off[c] + P.cap_lens[c] * P.cap_lens[c];
  }
  const int64_t n_gram = t2i ? P.NI * P.K * P.K : P.gram_off[P.NC];
  const int64_t n_qnorm = (t2i ? words : P.NI * P.K) + kSlack;
  at::Tensor tables = at::empty({n_gram + n_qnorm}, images.options().dtype(acc));
  T* gram = tables.data_ptr<T>();
  T* qnorm = gram + n_gram;
  std::fill(qnorm, qnorm + n_qnorm, T(0));
  if constexpr (std::is_same<T, double>::value)
    compute_tables<T, double>(P, gram, qnorm);
  else if (kind == GemmKind::kF32)
    compute_tables<T, float>(P, gram, qnorm);
  else
    compute_tables<T, c10::BFloat16>(P, gram, qnorm);
  P.gram = gram;
  P.qnorm = qnorm;
  choose_tiles(P, max_tile_bytes);
  run_all(P);
  return out;
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_lengths(const at::Tensor& lens, const char* name, int64_t count, int64_t max_len) {
  TORCH_CHECK(lens.device().is_cpu(), "xattn_sim_fwd: ", name, " must be a CPU tensor");
  TORCH_CHECK(lens.scalar_type() == at::kLong, "xattn_sim_fwd: ", name, " must be int64, got ", lens.scalar_type());
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == count, "xattn_sim_fwd: ", name, " must have shape (", count,
              ",), got ", lens.sizes());
  TORCH_CHECK(lens.is_contiguous(), "xattn_sim_fwd: ", name, " must be contiguous");
  const int64_t* p = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(p[i] >= 1 && p[i] <= max_len, "xattn_sim_fwd: ", name, "[", i, "] = ", p[i], " is outside 1..",
                max_len);
}

at::Tensor xattn_sim_fwd_cpu(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                             const at::Tensor& img_lens, int64_t direction, int64_t norm, double lambda_softmax,
                             int64_t agg, double lambda_lse, int64_t max_tile_bytes) {
  TORCH_CHECK(images.dim() == 3, "xattn_sim_fwd: images must be (N_img, K, d), got ", images.sizes());
  TORCH_CHECK(captions.dim() == 3, "xattn_sim_fwd: captions must be (N_cap, L_max, d), got ", captions.sizes());
  TORCH_CHECK(images.device().is_cpu() && captions.device().is_cpu(), "xattn_sim_fwd: CPU tensors expected");
  TORCH_CHECK(images.size(2) == captions.size(2), "xattn_sim_fwd: images d = ", images.size(2),
              " but captions d = ", captions.size(2));
  TORCH_CHECK(images.size(2) >= 1, "xattn_sim_fwd: the feature size d must be at least 1");
  TORCH_CHECK(images.scalar_type() == captions.scalar_type(), "xattn_sim_fwd: images are ", images.scalar_type(),
              " but captions are ", captions.scalar_type());
  TORCH_CHECK(is_float_dtype(images.scalar_type()), "xattn_sim_fwd: float16, bfloat16, float32 or float64 "
              "features expected, got ", images.scalar_type());
  TORCH_CHECK(images.is_contiguous() && captions.is_contiguous(), "xattn_sim_fwd: images and captions must be "
              "contiguous");
  TORCH_CHECK(direction == kT2I || direction == kI2T, "xattn_sim_fwd: direction must be 0 (t2i) or 1 (i2t), got ",
              direction);
  TORCH_CHECK(norm >= kSoftmax && norm <= kNoNorm, "xattn_sim_fwd: norm must be in 0..6, got ", norm);
  TORCH_CHECK(agg >= kLse && agg <= kSum, "xattn_sim_fwd: agg must be in 0..3, got ", agg);
  TORCH_CHECK(std::isfinite(lambda_softmax) && lambda_softmax >= 0, "xattn_sim_fwd: lambda_softmax must be finite "
              "and >= 0, got ", lambda_softmax);
  TORCH_CHECK(std::isfinite(lambda_lse), "xattn_sim_fwd: lambda_lse must be finite, got ", lambda_lse);
  TORCH_CHECK(agg != kLse || lambda_lse > 0, "xattn_sim_fwd: lambda_lse must be > 0 for LogSumExp, got ",
              lambda_lse);
  TORCH_CHECK(max_tile_bytes >= 0, "xattn_sim_fwd: max_tile_bytes must be >= 0 (0: default), got ", max_tile_bytes);
  {
    const bool wide = images.scalar_type() == at::kDouble;
    const double hi = wide ? itm::kLambdaMaxF64 : itm::kLambdaMaxF32, lo = wide ? itm::kLambdaMinF64 : itm::kLambdaMinF32;
    TORCH_CHECK(lambda_softmax <= hi, "xattn_sim_fwd: lambda_softmax must be <= ", hi, " for ", images.scalar_type(),
                " inputs, got ", lambda_softmax);
    TORCH_CHECK(agg != kLse || (lambda_lse >= lo && lambda_lse <= hi), "xattn_sim_fwd: lambda_lse must lie in ", lo,
                "..", hi, " for ", images.scalar_type(), " inputs, got ", lambda_lse);
  }
  const int64_t NI = images.size(0), K = images.size(1), NC = captions.size(0), L = captions.size(1);
  check_lengths(cap_lens, "cap_lens", NC, L);
  check_lengths(img_lens, "img_lens", NI, K);
  const bool f64 = images.scalar_type() == at::kDouble;
  if (NI == 0 || NC == 0) return at::empty({NI, NC}, images.options().dtype(f64 ? at::kDouble : at::kFloat));
  switch (images.scalar_type()) {
    case at::kDouble:
      return xattn_sim_typed<double>(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg,
                                     lambda_lse, max_tile_bytes, GemmKind::kF64);
    case at::kBFloat16:
      if (bf16_kind() == GemmKind::kBf16Plain)  // no native bf16 dot product (or forced below AVX-512): widened
        // once, exactly, to float32 (peak memory + 2x the bfloat16 inputs) and run through the float32 brgemm
        return xattn_sim_typed<float>(images.to(at::kFloat), captions.to(at::kFloat), cap_lens, img_lens, direction,
                                      norm, lambda_softmax, agg, lambda_lse, max_tile_bytes, GemmKind::kF32);
      return xattn_sim_typed<float>(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg,
                                    lambda_lse, max_tile_bytes, bf16_kind());
    case at::kHalf:  // float16 products are exact in float32: convert once
      return xattn_sim_typed<float>(images.to(at::kFloat), captions.to(at::kFloat), cap_lens, img_lens, direction,
                                    norm, lambda_softmax, agg, lambda_lse, max_tile_bytes, GemmKind::kF32);
    default:
      return xattn_sim_typed<float>(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg,
                                    lambda_lse, max_tile_bytes, GemmKind::kF32);
  }
}

}  // namespace

void xattn_sim_tiles(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                     const at::Tensor& img_lens, int64_t direction, int64_t norm, double lambda_softmax, int64_t agg,
                     double lambda_lse, int64_t max_tile_bytes, TileSink<float>* sink32, TileSink<double>* sink64) {
  TORCH_CHECK(images.scalar_type() == at::kDouble ? sink64 != nullptr : sink32 != nullptr,
              "xattn_sim_tiles: no sink for ", images.scalar_type(), " inputs");
  TORCH_CHECK(images.size(0) >= 1 && captions.size(0) >= 1, "xattn_sim_tiles: empty images or captions");
  switch (images.scalar_type()) {
    case at::kDouble:
      xattn_sim_typed<double>(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                              max_tile_bytes, GemmKind::kF64, sink64);
      break;
    case at::kBFloat16:
      xattn_sim_typed<float>(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                             max_tile_bytes, bf16_kind(), sink32);
      break;
    case at::kHalf:
      xattn_sim_typed<float>(images.to(at::kFloat), captions.to(at::kFloat), cap_lens, img_lens, direction, norm,
                             lambda_softmax, agg, lambda_lse, max_tile_bytes, GemmKind::kF32, sink32);
      break;
    default:
      xattn_sim_typed<float>(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                             max_tile_bytes, GemmKind::kF32, sink32);
  }
}

}  // namespace cpu
}  // namespace itm

// The schema of itm_kernels::xattn_sim_fwd (its CUDA implementation: csrc/xattn_sim/cuda.cu, when built).
// direction: 0 t2i, 1 i2t; norm: 0 softmax, 1 l2norm, 2 clipped_l2norm, 3 l1norm, 4 clipped_l1norm, 5 clipped,
// 6 no_norm; agg: 0 lse, 1 mean, 2 max, 3 sum (the enums of csrc/xattn_sim/math.h). max_tile_bytes: 0 = default.
// Returns (N_img, N_cap): float64 for float64 inputs, float32 otherwise.
TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("xattn_sim_fwd(Tensor images, Tensor captions, Tensor cap_lens, Tensor img_lens, int direction, int norm, "
        "float lambda_softmax, int agg, float lambda_lse, int max_tile_bytes) -> Tensor");
}

namespace {

// Shape and dtype only, for tracing (FakeTensor / torch.compile / opcheck); no checks beyond the ranks.
at::Tensor xattn_sim_fwd_meta(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                              const at::Tensor& img_lens, int64_t, int64_t, double, int64_t, double, int64_t) {
  TORCH_CHECK(images.dim() == 3 && captions.dim() == 3, "xattn_sim_fwd: images and captions must be 3-D");
  // A lengths tensor on the meta device next to real features would otherwise route here and skip every check.
  TORCH_CHECK(captions.device() == images.device() && cap_lens.device() == images.device() &&
                  img_lens.device() == images.device(),
              "xattn_sim_fwd: images, captions, cap_lens and img_lens must be on one device, got ", images.device(),
              ", ", captions.device(), ", ", cap_lens.device(), ", ", img_lens.device());
  const auto dtype = images.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({images.size(0), captions.size(0)}, images.options().dtype(dtype));
}

}  // namespace

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) { m.impl("xattn_sim_fwd", &itm::cpu::xattn_sim_fwd_cpu); }
TORCH_LIBRARY_IMPL(itm_kernels, Meta, m) { m.impl("xattn_sim_fwd", &xattn_sim_fwd_meta); }
