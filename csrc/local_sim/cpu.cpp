// itm_kernels::local_sim_cpu_ (CPU): SGRAF's local similarity vectors of every (image, caption, word), fused.
//
// For image i (regions v_k, k < K), caption c and word t < cap_lens[c] (itm_kernels/local_sim/ has the spec):
//   s_kt = v_k . e_t,  h = LeakyReLU_0.1(s),  n_kt = h_kt / (|h_k.|_caption + 1e-8),  alpha_t = softmax_k(lambda n_kt)
//   a^_t = sum_k alpha_tk v_k / (|a_t| + 1e-8)   with |a_t|^2 = alpha_t^T G alpha_t, G = V V^T (given per image)
//   out_t = l2norm(W (a^_t - e_t)^2 + b),  rows t >= cap_lens[c] zero.
//
// Work items: a caption block (whole captions, at most `W` real words packed back to back) x a range of images.
// Per item the block's words are packed once as the B operand of the score GEMM; per group of `g` images one GEMM
// S = V E^T (g K x words); then per image, on the small (K x words) tile in cache: LeakyReLU, the per-caption l2
// norms, the softmax over the regions and |a|^2 by the Gram matrix, giving P = alpha / (|a| + eps) (words x K);
// then over chunks of `kc` features: A = P V (one GEMM, float scratch), X = (A - E)^2 in the GEMM input dtype (one
// fused pass), Y += X W^T (one GEMM accumulating over the chunks); finally bias, the row l2norm and the store into
// `out` (any row strides, float32 / float64 / bfloat16, cast once), padding rows zeroed. Nothing of size
// (pairs x words x d) exists: per thread, one scratch (default budget 2 MiB: 1.4 MiB in bfloat16 at d = 1024).
//
// GEMMs: oneDNN brgemm through ATen's cpublas, single-threaded per work item (float32, and bfloat16 with the B
// operands packed in the VNNI layout: pairs of features interleaved, float32 accumulation), at::mm for float64.
// Where brgemm has no bfloat16 VNNI path (checked once at load), bfloat16 runs as float32 products of the same
// values. Row counts are split into a multiple of 16 plus a tail, which bounds the number of distinct brgemm shapes
// (each JIT kernel is ~20 KiB, cached per thread for the life of the process; measured: the resident set settles
// 9 MiB above the first call per thread over 600 calls of random shapes). The element-wise parts use GCC vectors of
// the level's register width compiled for AVX-512 / AVX2 / baseline (simd_clones.h, chosen per call); bfloat16 rounding of (A - E)^2
// uses AVX512-BF16's vcvtneps2bf16 where the core has it and the AVX-512 level is in use.
//
// Measured on one Zen 5 core (60 images x 300 captions, d = 1024, s = 256, K = 36, lengths 8..20): bfloat16
// 409 GFLOP/s = 0.87 of a bare bfloat16 torch.mm (4096 x 1024) @ (1024 x 256) (the GEMMs run at ~510 GFLOP/s and
// take 80% of the time; the (A - E)^2 pass 7%, the output rows 6%, the attention epilogue 3%); float32 218 GFLOP/s
// (brgemm's AVX-512 float32 kernels, 2.3x MKL's sgemm on this AMD core).
#include <ATen/MemoryOverlap.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include "common/simd_clones.h"  // ITM_SIMD_DISPATCH_X86

#if defined(ITM_SIMD_DISPATCH_X86)
#include <immintrin.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/bf16.h"
#include "common/bf16_gemm.h"
#include "common/brgemm_shapes.h"
#include "common/constants.h"
#include "common/simd_vec.h"
#include "common/vnni.h"

namespace itm {
namespace cpu {
namespace {
using namespace simd;
using bf16 = c10::BFloat16;

using itm::kEps;
constexpr double kSlope = itm::kLeakySlope;
constexpr int64_t kRowQuantum = 16;  // word rows of a tile are padded to this (score GEMM columns)

// Accumulation / epilogue type of an input dtype.
template <class E> using Acc = std::conditional_t<std::is_same_v<E, double>, double, float>;

enum OutKind { kOutF32 = 0, kOutF64 = 1, kOutBf16 = 2 };

// ------------------------------------------------------------------------------------------------------------------
// Vector loads/stores in the input and output dtypes.
template <int VB> ITM_INLINE typename Vec<float, VB>::V vload_as(const float* p) { return vload<VB>(p); }
template <int VB> ITM_INLINE typename Vec<double, VB>::V vload_as(const double* p) { return vload<VB>(p); }
template <int VB> ITM_INLINE typename Vec<float, VB>::V vload_as(const bf16* p) { return widen_bf16<VB>(p); }
template <int VB> ITM_INLINE void vstore_as(bf16* p, typename Vec<float, VB>::V v) { narrow_bf16<VB>(p, v); }
template <int VB> ITM_INLINE void vstore_as(float* p, typename Vec<float, VB>::V v) { vstore(p, v); }
template <int VB> ITM_INLINE void vstore_as(double* p, typename Vec<double, VB>::V v) { vstore(p, v); }
template <int VB> ITM_INLINE void vstore_as(double* p, typename Vec<float, VB>::V v) {
  typedef typename VecOf<double, 2 * VB>::V F64;
  F64 w = __builtin_convertvector(v, F64);
  std::memcpy(p, &w, sizeof(w));
}

// ------------------------------------------------------------------------------------------------------------------
// Packed B operands: the layout of common/vnni.h (column blocks of nb; VNNI pairs for bfloat16).
template <int VB, class... A> ITM_INLINE void pack_cols_simd(A&&... a) { pack_cols_impl(std::forward<A>(a)...); }
template <int VB, class... A> ITM_INLINE void pack_rows_simd(A&&... a) { pack_rows_impl(std::forward<A>(a)...); }
ITM_SIMD_FUNCTION(pack_cols, pack_cols_simd)
ITM_SIMD_FUNCTION(pack_rows, pack_rows_simd)

// C (M x N, ldc) (+)= A (M x Kd, lda) B (Kd x N, row stride N; VNNI for bfloat16). brgemm is called on a multiple
// of 16 rows plus a tail, so that the per-shape kernels stay few whatever the ragged row counts.
ITM_INLINE void kernel(int64_t M, int64_t N, int64_t Kd, const float* A, int64_t lda, const float* B, float* C,
                       int64_t ldc, bool add) {
  const int64_t main = M / kRowQuantum * kRowQuantum;
  if (main) brgemm_counted(main, N, Kd, lda, N, ldc, add, A, B, C, false);
  if (M > main)
    brgemm_counted(M - main, N, Kd, lda, N, ldc, add, A + main * lda, B, C + main * ldc, false);
}
ITM_INLINE void kernel(int64_t M, int64_t N, int64_t Kd, const bf16* A, int64_t lda, const bf16* B, float* C,
                       int64_t ldc, bool add) {
  const int64_t main = M / kRowQuantum * kRowQuantum;
  if (main) brgemm_counted(main, N, Kd, lda, N, ldc, add, A, B, C, true);
  if (M > main)
    brgemm_counted(M - main, N, Kd, lda, N, ldc, add, A + main * lda, B, C + main * ldc, true);
}
void kernel(int64_t M, int64_t N, int64_t Kd, const double* A, int64_t lda, const double* B, double* C, int64_t ldc,
            bool add) {
  const auto opts = at::TensorOptions().dtype(at::kDouble);
  at::Tensor a = at::from_blob(const_cast<double*>(A), {M, Kd}, {lda, 1}, opts);
  at::Tensor b = at::from_blob(const_cast<double*>(B), {Kd, N}, {N, 1}, opts);
  at::Tensor c = at::from_blob(C, {M, N}, {ldc, 1}, opts);
  if (add) c.addmm_(a, b);
  else at::mm_out(c, a, b);
}

// C[:, 0 : n1 - n0] (+)= A (M x kc, lda; A points at feature k0) @ B[k0 : k0 + kc, n0 : n1], B packed (kdim x N) in
// blocks of nb columns; n0 is a multiple of nb.
template <class E, class T>
ITM_INLINE void gemm_packed(int64_t M, const E* A, int64_t lda, const E* B, int64_t kdim, int64_t N, int64_t nb,
                            int64_t n0, int64_t n1, int64_t k0, int64_t kc, T* C, int64_t ldc, bool add) {
  for (int64_t j0 = n0; j0 < n1; j0 += nb) {
    const int64_t w = std::min(nb, N - j0);
    kernel(M, w, kc, A, lda, B + j0 * kdim + k0 * w, C + (j0 - n0), ldc, add);
  }
}

// Whether brgemm multiplies bfloat16 with B in the VNNI layout of pack_cols (the one probe, common/bf16_gemm.h).
// ITM_CPU_BF16_VNNI=0 turns the path off (testing).
bool vnni_ok() {
  static const bool ok = [] {
    const char* env = std::getenv("ITM_CPU_BF16_VNNI");
    if (env && std::strcmp(env, "0") == 0) return false;
    return bf16_gemm_kind() == Bf16Gemm::kVnni;
  }();
  return ok;
}

// ------------------------------------------------------------------------------------------------------------------
// Element-wise parts.

// On the scores S (K x ld, words along a row; columns [0, round_up(W, N)) readable and finite) of one image:
// LeakyReLU, the l2 norm of each region's row over each caption's words, the softmax over the regions of
// lambda * normalised score, |a_t|^2 = alpha_t^T G alpha_t; writes Pt[t * K2 + k] = alpha_kt / (|a_t| + eps) for
// t < W (columns K..K2 zero). S is overwritten.
template <int VB, class T, class E>
ITM_INLINE void attention_impl(T* S, int64_t ld, int64_t K, int64_t K2, int64_t W, const int64_t* seg_off,
                               const int64_t* seg_len, int64_t nseg, const T* G, T lam, E* Pt) {
  using V = typename Vec<T, VB>::V;
  constexpr int N = Vec<T, VB>::N;
  const int64_t Wv = (W + N - 1) / N * N;
  const V zero = vsplat<VB, T>(T(0));
  for (int64_t k = 0; k < K; ++k) {
    T* row = S + k * ld;
    for (int64_t j = 0; j < Wv; j += N) {
      const V x = vload<VB>(row + j);
      vstore(row + j, x > zero ? x : x * T(kSlope));
    }
    for (int64_t q = 0; q < nseg; ++q) {
      T* h = row + seg_off[q];
      const int64_t n = seg_len[q];
      T sq = 0;
      for (int64_t t = 0; t < n; ++t) sq += h[t] * h[t];
      const T f = lam / (std::sqrt(sq) + T(kEps));
      for (int64_t t = 0; t < n; ++t) h[t] *= f;
    }
  }
  for (int64_t j = 0; j < Wv; j += N) {
    V m = vload<VB>(S + j);
    for (int64_t k = 1; k < K; ++k) m = vmax(m, vload<VB>(S + k * ld + j));
    V sum = zero;
    for (int64_t k = 0; k < K; ++k) {
      const V e = vexp(vload<VB>(S + k * ld + j) - m);
      vstore(S + k * ld + j, e);
      sum += e;
    }
    const V r = vsplat<VB, T>(T(1)) / sum;
    V a2 = zero;
    for (int64_t k = 0; k < K; ++k) {  // alpha and alpha^T G alpha (G symmetric: lower triangle twice + diagonal)
      const V ak = vload<VB>(S + k * ld + j) * r;
      vstore(S + k * ld + j, ak);
      const T* g = G + k * K;
      V off = zero;
      for (int64_t k2 = 0; k2 < k; ++k2) off += vload<VB>(S + k2 * ld + j) * g[k2];
      a2 += ak * (ak * g[k] + off + off);
    }
    const V inv = vsplat<VB, T>(T(1)) / (vsqrt(vmax(a2, zero)) + T(kEps));
    const int64_t nt = std::min<int64_t>(N, W - j);
    for (int64_t k = 0; k < K; ++k) {  // transposed store: the vector converted at once, then its lanes
      E p[N];
      vstore_as<VB>(p, vload<VB>(S + k * ld + j) * inv);
      for (int64_t l = 0; l < nt; ++l) Pt[(j + l) * K2 + k] = p[l];
    }
    for (int64_t k = K; k < K2; ++k)
      for (int64_t l = 0; l < nt; ++l) Pt[(j + l) * K2 + k] = E(0);
  }
}

// Gram guard (kGramCancelRatio): words whose |a_t|^2 = alpha_t^T G alpha_t cancelled (|a_t| < sqrt(ratio) sum_k
// alpha_kt |v_k|; |a_t| is read back from Pt = alpha / (|a| + eps) at the largest alpha) get their a^_t from the
// explicit a_t in float64: `words` lists them, `rows` holds their a^ (d each). Rare; K per word otherwise.
template <class T> struct GuardRows {
  std::vector<int64_t> words;
  std::vector<T> rows;
};

template <class T, class E>
void gram_guard_words(const T* alpha, int64_t ld, int64_t K, int64_t K2, int64_t W, const T* G, const E* const* v,
                      int64_t d, const E* Pt, GuardRows<T>& g) {
  g.words.clear();
  g.rows.clear();
  const T ratio = static_cast<T>(kGramCancelRatio);
  for (int64_t t = 0; t < W; ++t) {
    T b = 0, top = 0;
    int64_t kt = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T a = alpha[k * ld + t], gk = G[k * K + k];
      b += a * std::sqrt(gk > T(0) ? gk : T(0));
      if (a > top) top = a, kt = k;
    }
    if (!(top > T(0))) continue;
    const T norm = top / static_cast<T>(Pt[t * K2 + kt]) - T(kEps);  // |a_t| as the kernel took it
    if (norm * norm >= ratio * b * b) continue;
    std::vector<double> acc(d, 0.0);
    for (int64_t k = 0; k < K; ++k) {
      const double a = static_cast<double>(alpha[k * ld + t]);
      for (int64_t j = 0; j < d; ++j) acc[j] += a * static_cast<double>(static_cast<T>(v[k][j]));
    }
    double n2 = 0;
    for (int64_t j = 0; j < d; ++j) n2 += acc[j] * acc[j];
    const double f = 1.0 / (std::sqrt(n2) + kEps);
    g.words.push_back(t);
    for (int64_t j = 0; j < d; ++j) g.rows.push_back(static_cast<T>(acc[j] * f));
  }
}

// Overwrite the guarded words' rows of A (features [k0, k0 + kc), row stride lda) with their exact a^.
template <class T> void gram_guard_patch(T* A, int64_t lda, int64_t k0, int64_t kc, int64_t d, const GuardRows<T>& g) {
  for (size_t n = 0; n < g.words.size(); ++n)
    for (int64_t j = 0; j < kc; ++j) A[g.words[n] * lda + j] = k0 + j < d ? g.rows[n * d + k0 + j] : T(0);
}

// X[t, j] = (A[t, j] - e_t[k0 + j])^2 in the GEMM input dtype, j < kc, t < W (features >= d: e = 0).
template <int VB, class T, class E>
ITM_INLINE void diff_sq_impl(const T* A, int64_t lda, const E* const* rows, int64_t k0, int64_t kc, int64_t d, E* X,
                             int64_t ldx, int64_t W) {
  using V = typename Vec<T, VB>::V;
  constexpr int N = Vec<T, VB>::N;
  const int64_t ne = std::max<int64_t>(0, std::min(kc, d - k0));
  for (int64_t t = 0; t < W; ++t) {
    const E* e = rows[t] + k0;
    const T* a = A + t * lda;
    E* x = X + t * ldx;
    int64_t j = 0;
    for (; j + N <= ne; j += N) {
      const V v = vload<VB>(a + j) - vload_as<VB>(e + j);
      vstore_as<VB>(x + j, v * v);
    }
    for (; j < ne; ++j) {
      const T v = a[j] - widen(e[j]);
      x[j] = E(v * v);
    }
    for (; j < kc; ++j) x[j] = E(a[j] * a[j]);
  }
}

// out row t = (Y[t] + b) / (|Y[t] + b| + eps), cast into the row at rows[t] (s entries, contiguous).
template <int VB, class T>
ITM_INLINE void store_rows_impl(T* Y, int64_t ldy, int64_t W, const T* b, int64_t s, void* const* rows, int kind) {
  using V = typename Vec<T, VB>::V;
  constexpr int N = Vec<T, VB>::N;
  const int64_t sv = s / N * N;
  for (int64_t t = 0; t < W; ++t) {
    T* y = Y + t * ldy;
    V acc = vsplat<VB, T>(T(0));
    for (int64_t j = 0; j < sv; j += N) {
      const V v = vload<VB>(y + j) + vload<VB>(b + j);
      vstore(y + j, v);
      acc += v * v;
    }
    T sq = hsum(acc);
    for (int64_t j = sv; j < s; ++j) {
      y[j] += b[j];
      sq += y[j] * y[j];
    }
    const T f = T(1) / (std::sqrt(sq) + T(kEps));
    if (kind == kOutBf16) {
      bf16* o = static_cast<bf16*>(rows[t]);
      int64_t j = 0;
      if constexpr (std::is_same_v<T, float>)
        for (; j < sv; j += N) vstore_as<VB>(o + j, vload<VB>(y + j) * f);
      for (; j < s; ++j) o[j] = bf16(static_cast<float>(y[j] * f));
    } else if (kind == kOutF32) {
      float* o = static_cast<float*>(rows[t]);
      int64_t j = 0;
      if constexpr (std::is_same_v<T, float>)
        for (; j < sv; j += N) vstore(o + j, vload<VB>(y + j) * f);
      for (; j < s; ++j) o[j] = static_cast<float>(y[j] * f);
    } else {
      double* o = static_cast<double*>(rows[t]);
      int64_t j = 0;
      for (; j < sv; j += N) vstore_as<VB>(o + j, vload<VB>(y + j) * f);
      for (; j < s; ++j) o[j] = static_cast<double>(y[j] * f);
    }
  }
}

#if defined(ITM_SIMD_DISPATCH_X86)
#define ITM_LS_NATIVE_BF16 1
// diff_sq for bfloat16 on cores with AVX512-BF16: vcvtneps2bf16 rounds 16 floats to nearest-even in one instruction
// (as c10::BFloat16 except that float denormals, irrelevant here, become zero).
__attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16"))) void diff_sq_avx512bf16(
    const float* A, int64_t lda, const bf16* const* rows, int64_t k0, int64_t kc, int64_t d, bf16* X, int64_t ldx,
    int64_t W) {
  const int64_t ne = std::max<int64_t>(0, std::min(kc, d - k0));
  for (int64_t t = 0; t < W; ++t) {
    const bf16* e = rows[t] + k0;
    const float* a = A + t * lda;
    bf16* x = X + t * ldx;
    int64_t j = 0;
    // Intrinsics only: clang rejects calls that pass 64-byte vectors between this AVX-512 function and the
    // untargeted helpers of simd_vec.h / bf16.h (a calling-convention mismatch), even where they are inlined.
    for (; j + 16 <= ne; j += 16) {
      const __m256i eh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(e + j));
      // Exact widening. The maskz forms (all lanes kept) because gcc 12 warns that the unmasked ones' undefined
      // pass-through operand may be used uninitialised.
      const __m512i wide = _mm512_maskz_cvtepu16_epi32(static_cast<__mmask16>(0xffff), eh);
      const __m512 ev = _mm512_castsi512_ps(_mm512_maskz_slli_epi32(static_cast<__mmask16>(0xffff), wide, 16));
      const __m512 v = _mm512_sub_ps(_mm512_loadu_ps(a + j), ev);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(x + j), (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(v, v)));
    }
    for (; j < ne; ++j) {
      const float v = a[j] - static_cast<float>(e[j]);
      x[j] = bf16(v * v);
    }
    for (; j < kc; ++j) x[j] = bf16(a[j] * a[j]);
  }
}

bool native_bf16() {
  static const bool ok = [] {
    const char* env = std::getenv("ITM_CPU_LS_NATIVE_BF16");
    return !(env && std::strcmp(env, "0") == 0);
  }();
  return ok && native_bf16_dot();  // AVX512-BF16 and the AVX-512 level in use (not forced lower)
}
#endif

ITM_SIMD_FUNCTION(attention, attention_impl)
ITM_SIMD_FUNCTION(diff_sq, diff_sq_impl)

ITM_INLINE void diff_sq_any(const float* A, int64_t lda, const bf16* const* rows, int64_t k0, int64_t kc, int64_t d,
                            bf16* X, int64_t ldx, int64_t W) {
#if defined(ITM_LS_NATIVE_BF16)
  if (native_bf16()) return diff_sq_avx512bf16(A, lda, rows, k0, kc, d, X, ldx, W);
#endif
  diff_sq(A, lda, rows, k0, kc, d, X, ldx, W);
}
template <class T, class E>
ITM_INLINE void diff_sq_any(const T* A, int64_t lda, const E* const* rows, int64_t k0, int64_t kc, int64_t d, E* X,
                            int64_t ldx, int64_t W) {
  diff_sq(A, lda, rows, k0, kc, d, X, ldx, W);
}
ITM_SIMD_FUNCTION(store_rows, store_rows_impl)

// ------------------------------------------------------------------------------------------------------------------
// Orchestration.
template <class E> struct Problem {
  using T = Acc<E>;
  const E* img;   // (NI, K, d)
  const E* cap;   // (NC, L, d)
  const E* wpk;   // W^T packed (d2 x s)
  const T* gram;  // (NI, K, K)
  const T* bias;  // (s,)
  const int64_t* lens;
  int64_t NI, K, NC, L, d, s;
  int64_t d2, K2;  // feature and region counts padded to even for the VNNI layout (bfloat16)
  T lam;
  char* out;
  int out_kind;
  int64_t out_elem, os0, os1, os2;  // strides of out in elements
  // Tiling.
  int64_t W, g, kc, nb;
  std::vector<int64_t> cap_block;  // caption block boundaries
};

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// Bytes of one thread's scratch, by part (each rounded to 64 bytes).
template <class E> struct ScratchPlan {
  int64_t Et, Vr, S, Pt, Vp, A, X, Y, cols, orow, vrows, seg;
  int64_t total() const { return Et + Vr + S + Pt + Vp + A + X + Y + cols + orow + vrows + seg + 64; }
};

template <class E> ScratchPlan<E> scratch_plan(const Problem<E>& P, int64_t W, int64_t g, int64_t kc) {
  using T = Acc<E>;
  auto r = [](int64_t bytes) { return round_up(bytes, 64); };
  const int64_t Wp = round_up(W, kRowQuantum), e = sizeof(E), t = sizeof(T);
  ScratchPlan<E> z;
  z.Et = r(P.d2 * Wp * e);
  z.Vr = P.d2 != P.d ? r(g * P.K * P.d2 * e) : 0;
  z.S = r(g * P.K * Wp * t);
  z.Pt = r(Wp * P.K2 * e);
  z.Vp = r(P.K2 * P.d2 * e);
  z.A = r(Wp * kc * t);
  z.X = r(Wp * kc * e);
  z.Y = r(Wp * P.s * t);
  z.cols = r(Wp * (int64_t)sizeof(void*));
  z.orow = r(Wp * (int64_t)sizeof(void*));
  z.vrows = r(P.K2 * (int64_t)sizeof(void*));
  z.seg = r(2 * Wp * (int64_t)sizeof(int64_t));
  return z;
}

template <class E> struct Scratch {
  using T = Acc<E>;
  at::Tensor buf;
  E *Et, *Vr, *Pt, *Vp, *X;
  T *S, *A, *Y;
  const E** cols;
  void** orow;
  const E** vrows;
  int64_t *seg_off, *seg_len;
};

template <class E> void alloc_scratch(const Problem<E>& P, Scratch<E>& s) {
  using T = Acc<E>;
  const ScratchPlan<E> z = scratch_plan(P, P.W, P.g, P.kc);
  s.buf = at::empty({z.total()}, at::TensorOptions().dtype(at::kByte));
  char* p = reinterpret_cast<char*>(s.buf.data_ptr());
  p += (64 - reinterpret_cast<uintptr_t>(p) % 64) % 64;
  auto take = [&](int64_t bytes) {
    char* q = p;
    p += bytes;
    return q;
  };
  s.Et = reinterpret_cast<E*>(take(z.Et));
  s.Vr = reinterpret_cast<E*>(take(z.Vr));
  s.S = reinterpret_cast<T*>(take(z.S));
  s.Pt = reinterpret_cast<E*>(take(z.Pt));
  s.Vp = reinterpret_cast<E*>(take(z.Vp));
  s.A = reinterpret_cast<T*>(take(z.A));
  s.X = reinterpret_cast<E*>(take(z.X));
  s.Y = reinterpret_cast<T*>(take(z.Y));
  s.cols = reinterpret_cast<const E**>(take(z.cols));
  s.orow = reinterpret_cast<void**>(take(z.orow));
  s.vrows = reinterpret_cast<const E**>(take(z.vrows));
  s.seg_off = reinterpret_cast<int64_t*>(take(z.seg));
  s.seg_len = s.seg_off + round_up(P.W, kRowQuantum);
}

// One work item: caption block b against images [i0, i1).
template <class E> void run_item(const Problem<E>& P, int64_t b, int64_t i0, int64_t i1, Scratch<E>& s) {
  const int64_t K = P.K, K2 = P.K2, d = P.d, d2 = P.d2, L = P.L, nb = P.nb;
  const int64_t c0 = P.cap_block[b], c1 = P.cap_block[b + 1], nseg = c1 - c0;
  int64_t W = 0;
  for (int64_t c = c0; c < c1; ++c) {
    s.seg_off[c - c0] = W;
    s.seg_len[c - c0] = P.lens[c];
    for (int64_t t = 0; t < P.lens[c]; ++t) s.cols[W++] = P.cap + (c * L + t) * d;
  }
  const int64_t Wp = round_up(W, kRowQuantum);
  for (int64_t n = W; n < Wp; ++n) s.cols[n] = nullptr;
  pack_cols(s.Et, s.cols, Wp, d, d2, nb);  // B of the scores: (d2 x Wp), padding columns zero
  for (int64_t k = 0; k < K2; ++k) s.vrows[k] = nullptr;
  for (int64_t g0 = i0; g0 < i1; g0 += P.g) {
    const int64_t gi = std::min(P.g, i1 - g0);
    const E* a = P.img + g0 * K * d;
    int64_t lda = d;
    if (d2 != d) {  // odd d in bfloat16: the rows padded with a zero feature
      for (int64_t r = 0; r < gi * K; ++r) {
        std::memcpy(s.Vr + r * d2, a + r * d, d * sizeof(E));
        s.Vr[r * d2 + d] = E(0);
      }
      a = s.Vr;
      lda = d2;
    }
    for (int64_t k0 = 0; k0 < d2; k0 += P.kc)
      gemm_packed(gi * K, a + k0, lda, s.Et, d2, Wp, nb, 0, Wp, k0, std::min(P.kc, d2 - k0), s.S, Wp, k0 > 0);
    for (int64_t i = g0; i < g0 + gi; ++i) {
      attention(s.S + (i - g0) * K * Wp, Wp, K, K2, W, s.seg_off, s.seg_len, nseg, P.gram + i * K * K, P.lam, s.Pt);
      for (int64_t k = 0; k < K; ++k) s.vrows[k] = P.img + (i * K + k) * d;
      thread_local GuardRows<Acc<E>> guard;
      gram_guard_words(s.S + (i - g0) * K * Wp, Wp, K, K2, W, P.gram + i * K * K, s.vrows, d, s.Pt, guard);
      pack_rows(s.Vp, s.vrows, K2, d, d2, nb);  // B of the attended vectors: V_i (K2 x d2)
      for (int64_t k0 = 0; k0 < d2; k0 += P.kc) {
        const int64_t kc = std::min(P.kc, d2 - k0);
        gemm_packed(W, s.Pt, K2, s.Vp, K2, d2, nb, k0, k0 + kc, 0, K2, s.A, kc, false);
        if (!guard.words.empty()) gram_guard_patch(s.A, kc, k0, kc, d, guard);
        diff_sq_any(s.A, kc, s.cols, k0, kc, d, s.X, kc, W);
        gemm_packed(W, s.X, kc, P.wpk, d2, P.s, nb, 0, P.s, k0, kc, s.Y, P.s, k0 > 0);
      }
      char* out_i = P.out + i * P.os0 * P.out_elem;
      for (int64_t c = c0; c < c1; ++c) {
        char* out_c = out_i + c * P.os1 * P.out_elem;
        const int64_t o = s.seg_off[c - c0];
        for (int64_t t = 0; t < P.lens[c]; ++t) s.orow[o + t] = out_c + t * P.os2 * P.out_elem;
        for (int64_t t = P.lens[c]; t < L; ++t) std::memset(out_c + t * P.os2 * P.out_elem, 0, P.s * P.out_elem);
      }
      store_rows(s.Y, P.s, W, P.bias, P.s, s.orow, P.out_kind);
    }
  }
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  if (!v || !*v) return fallback;
  char* end = nullptr;
  const long long x = std::strtoll(v, &end, 10);
  return (end && *end == '\0' && x > 0) ? static_cast<int64_t>(x) : fallback;
}

// Default tile: caption blocks of up to 256 words, score GEMMs over groups of 4 images, feature chunks of 256, within
// a 2 MiB scratch per thread (bfloat16 at d = 1024, s = 256: 1.4 MiB; float32 shrinks to 128 words). Measured on
// one Zen 5 core (60 x 300, d = 1024, s = 256, lengths 8..20): bfloat16 256 words x 256 features 409 GFLOP/s,
// 128 x 256 400, 128 x 128 382, 512 x 128 380, 256 x 64 384; groups of 2..8 images within 3%; float32 flat at
// 211-216 from 64 to 256 words. Although the 256-word scratch exceeds the 1 MiB L2, its parts are live at
// different times (the packed words during the score GEMM; A, X and Y per image).
// ITM_CPU_LS_WORDS / _GROUP / _KC override them (tuning only).
constexpr int64_t kDefaultWords = 256;
constexpr int64_t kDefaultGroup = 4;
constexpr int64_t kDefaultChunk = 256;
constexpr int64_t kBlock = 64;  // columns per packed B block
constexpr int64_t kDefaultTileBytes = 2 << 20;

template <class E> void choose_tiles(Problem<E>& P, int64_t max_tile_bytes) {
  int64_t longest = 1;
  for (int64_t c = 0; c < P.NC; ++c) longest = std::max(longest, P.lens[c]);
  P.nb = kBlock;
  int64_t W = std::max(longest, env_int("ITM_CPU_LS_WORDS", kDefaultWords));
  int64_t g = std::min(P.NI, env_int("ITM_CPU_LS_GROUP", kDefaultGroup));
  int64_t kc = round_up(std::min(env_int("ITM_CPU_LS_KC", kDefaultChunk), P.d2), P.nb);
  const int64_t budget = max_tile_bytes > 0 ? max_tile_bytes : kDefaultTileBytes;
  while (scratch_plan(P, W, g, kc).total() > budget) {
    if (W > std::max<int64_t>(longest, 128)) W = std::max<int64_t>({longest, 128, W / 2});
    else if (g > 1) g /= 2;
    else if (kc > P.nb) kc = std::max(P.nb, round_up(kc / 2, P.nb));
    else if (W > longest) W = std::max(longest, W / 2);
    else break;  // one caption, one image, one chunk: over the budget only for very long captions
  }
  P.W = W;
  P.g = std::max<int64_t>(1, g);
  P.kc = kc;
  // Caption blocks of about equal size: as few as W allows, more (of >= 64 words) when blocks x image groups would
  // give the threads fewer than 4 items each; each block is filled up to `target` words (at least one caption).
  int64_t total = 0;
  for (int64_t c = 0; c < P.NC; ++c) total += P.lens[c];
  int64_t n_blocks = (total + W - 1) / W;
  const int64_t threads = at::get_num_threads();
  const int64_t groups = (P.NI + P.g - 1) / P.g;
  if (threads > 1 && n_blocks * groups < 4 * threads)
    n_blocks = std::max(n_blocks, std::min((4 * threads + groups - 1) / groups, (total + 63) / 64));
  const int64_t target = std::max<int64_t>(1, (total + n_blocks - 1) / n_blocks);
  P.cap_block.assign(1, 0);
  int64_t words = 0;
  for (int64_t c = 0; c < P.NC; ++c) {
    if (words > 0 && words + P.lens[c] > target) {
      P.cap_block.push_back(c);
      words = 0;
    }
    words += P.lens[c];
  }
  P.cap_block.push_back(P.NC);
}

template <class E> void run_all(Problem<E>& P) {
  const int64_t n_blocks = static_cast<int64_t>(P.cap_block.size()) - 1;
  const int64_t threads = std::max(1, at::get_num_threads());
  // Enough items for dynamic balancing (16 per thread): the images are split when there are few caption blocks
  // (each part packs its block's words again), in multiples of the score group where possible.
  const int64_t want = threads > 1 ? 16 * threads : 1;
  const int64_t splits = std::min((P.NI + P.g - 1) / P.g, std::max<int64_t>(1, (want + n_blocks - 1) / n_blocks));
  const int64_t groups = (P.NI + P.g - 1) / P.g;
  std::vector<int64_t> items;  // (block, i0, i1) triples
  for (int64_t b = 0; b < n_blocks; ++b)
    for (int64_t q = 0; q < splits; ++q) {
      const int64_t lo = std::min(P.NI, groups * q / splits * P.g);
      const int64_t hi = std::min(P.NI, groups * (q + 1) / splits * P.g);
      if (hi > lo) items.insert(items.end(), {b, lo, hi});
    }
  const int64_t n_items = static_cast<int64_t>(items.size()) / 3;
  int64_t words = 0;
  for (int64_t c = 0; c < P.NC; ++c) words += P.lens[c];
  // Waking a thread costs about as much as a few MFLOP: small problems (tests) run on the calling thread.
  const double flops = 2.0 * P.NI * words * P.d * (P.s + 2 * P.K);
  const int64_t use = std::max<int64_t>(1, std::min<int64_t>({threads, static_cast<int64_t>(flops / 4e6) + 1,
                                                              n_items}));
  std::atomic<int64_t> next{0};
  at::parallel_for(0, use, 1, [&](int64_t, int64_t) {
    Scratch<E> s;
    alloc_scratch(P, s);
    for (int64_t j = next.fetch_add(1); j < n_items; j = next.fetch_add(1))
      run_item(P, items[3 * j], items[3 * j + 1], items[3 * j + 2], s);
    if constexpr (!std::is_same_v<E, double>) at::native::cpublas::brgemm_release(kVnni<E>);
  });
}

template <class E>
void local_sim_typed(at::Tensor& out, const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                     const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gram, double lambda_softmax,
                     int64_t max_tile_bytes) {
  using T = Acc<E>;
  Problem<E> P;
  P.img = images.data_ptr<E>();
  P.cap = captions.data_ptr<E>();
  P.gram = gram.data_ptr<T>();
  P.bias = bias.data_ptr<T>();
  P.lens = cap_lens.data_ptr<int64_t>();
  P.NI = images.size(0);
  P.K = images.size(1);
  P.d = images.size(2);
  P.NC = captions.size(0);
  P.L = captions.size(1);
  P.s = weight.size(0);
  P.d2 = kVnni<E> ? round_up(P.d, 2) : P.d;
  P.K2 = kVnni<E> ? round_up(P.K, 2) : P.K;
  P.lam = static_cast<T>(lambda_softmax);
  P.out = static_cast<char*>(out.data_ptr());
  P.out_kind = out.scalar_type() == at::kFloat ? kOutF32 : out.scalar_type() == at::kDouble ? kOutF64 : kOutBf16;
  P.out_elem = out.element_size();
  P.os0 = out.stride(0);
  P.os1 = out.stride(1);
  P.os2 = out.stride(2);
  choose_tiles(P, max_tile_bytes);
  // W^T packed once per call: (d2 x s) in blocks of nb columns.
  at::Tensor wpk = at::empty({P.d2 * P.s}, images.options());
  std::vector<const E*> wrows(P.s);
  for (int64_t n = 0; n < P.s; ++n) wrows[n] = weight.data_ptr<E>() + n * P.d;
  pack_cols(wpk.data_ptr<E>(), wrows.data(), P.s, P.d, P.d2, P.nb);
  P.wpk = wpk.data_ptr<E>();
  run_all(P);
}

void check_input(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "local_sim_cpu_: ", name, " must be a CPU tensor, got one on ", t.device());
  TORCH_CHECK(t.dim() == dim, "local_sim_cpu_: ", name, " must have ", dim, " dimensions, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "local_sim_cpu_: ", name, " must be contiguous");
}

void check_dtype(const at::Tensor& t, const char* name, at::ScalarType want) {
  TORCH_CHECK(t.scalar_type() == want, "local_sim_cpu_: ", name, " must be ", want, ", got ", t.scalar_type());
}

// out (N_img, N_cap, L, s): float32, float64 or bfloat16, any strides with the last one 1; every row written.
// images (N_img, K, d), captions (N_cap, L, d): float32, bfloat16 or float64, contiguous; cap_lens (N_cap,) int64 in
// 1..L; weight (s, d) in the features' dtype; bias (s,) and gram (N_img, K, K) (= V V^T per image) in float32
// (float64 for float64 features). max_tile_bytes: per-thread scratch budget, 0 = default (2 MiB).
void local_sim_cpu_(at::Tensor out, const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                    const at::Tensor& weight, const at::Tensor& bias, const at::Tensor& gram, double lambda_softmax,
                    int64_t max_tile_bytes) {
  check_input(images, "images", 3);
  check_input(captions, "captions", 3);
  check_input(cap_lens, "cap_lens", 1);
  check_input(weight, "weight", 2);
  check_input(bias, "bias", 1);
  check_input(gram, "gram", 3);
  const auto dtype = images.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kDouble, "local_sim_cpu_: images must "
              "be float32, bfloat16 or float64, got ", dtype, " (float16 runs on the torch path)");
  const auto acc = dtype == at::kDouble ? at::kDouble : at::kFloat;
  check_dtype(captions, "captions", dtype);
  check_dtype(weight, "weight", dtype);
  check_dtype(bias, "bias", acc);
  check_dtype(gram, "gram", acc);
  check_dtype(cap_lens, "cap_lens", at::kLong);
  const int64_t NI = images.size(0), K = images.size(1), d = images.size(2);
  const int64_t NC = captions.size(0), L = captions.size(1), s = weight.size(0);
  TORCH_CHECK(K >= 1 && d >= 1, "local_sim_cpu_: images must be (N_img, K >= 1, d >= 1), got ", images.sizes());
  TORCH_CHECK(captions.size(2) == d, "local_sim_cpu_: captions must be (N_cap, L, d = ", d, "), got ",
              captions.sizes());
  TORCH_CHECK(s >= 1 && weight.size(1) == d, "local_sim_cpu_: weight must be (s >= 1, d = ", d, "), got ",
              weight.sizes());
  TORCH_CHECK(bias.size(0) == s, "local_sim_cpu_: bias must be (s = ", s, ",), got ", bias.sizes());
  TORCH_CHECK(gram.sizes() == at::IntArrayRef({NI, K, K}), "local_sim_cpu_: gram must be (N_img, K, K) = (", NI, ", ",
              K, ", ", K, "), got ", gram.sizes());
  TORCH_CHECK(cap_lens.size(0) == NC, "local_sim_cpu_: cap_lens must have N_cap = ", NC, " entries, got ",
              cap_lens.size(0));
  TORCH_CHECK(out.device().is_cpu(), "local_sim_cpu_: out must be a CPU tensor, got one on ", out.device());
  const auto out_dtype = out.scalar_type();
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kDouble || out_dtype == at::kBFloat16,
              "local_sim_cpu_: out must be float32, float64 or bfloat16, got ", out_dtype);
  TORCH_CHECK(out.dim() == 4 && out.sizes() == at::IntArrayRef({NI, NC, L, s}), "local_sim_cpu_: out must be "
              "(N_img, N_cap, L, s) = (", NI, ", ", NC, ", ", L, ", ", s, "), got ", out.sizes());
  TORCH_CHECK(out.stride(3) == 1 || s == 1, "local_sim_cpu_: out's rows must be contiguous (last stride 1), got "
              "strides ", out.strides());
  TORCH_CHECK(at::has_internal_overlap(out) != at::MemOverlap::Yes, "local_sim_cpu_: out must not have elements "
              "sharing memory (an expanded tensor), got strides ", out.strides());
  TORCH_CHECK(std::isfinite(lambda_softmax) && lambda_softmax >= 0, "local_sim_cpu_: lambda_softmax must be finite "
              "and >= 0, got ", lambda_softmax);
  TORCH_CHECK(lambda_softmax <= (images.scalar_type() == at::kDouble ? kLambdaMaxF64 : kLambdaMaxF32),
              "local_sim_cpu_: lambda_softmax must be <= ", (images.scalar_type() == at::kDouble ? kLambdaMaxF64 :
              kLambdaMaxF32), " for ", images.scalar_type(), " inputs, got ", lambda_softmax);
  TORCH_CHECK(max_tile_bytes >= 0, "local_sim_cpu_: max_tile_bytes must be >= 0 (0: default), got ", max_tile_bytes);
  const int64_t* lens = cap_lens.data_ptr<int64_t>();
  for (int64_t c = 0; c < NC; ++c)
    TORCH_CHECK(lens[c] >= 1 && lens[c] <= L, "local_sim_cpu_: cap_lens[", c, "] = ", lens[c], " is outside 1..", L);
  if (NI == 0 || NC == 0) return;
  switch (dtype) {
    case at::kDouble:
      local_sim_typed<double>(out, images, captions, cap_lens, weight, bias, gram, lambda_softmax, max_tile_bytes);
      break;
    case at::kBFloat16:
      if (vnni_ok())
        local_sim_typed<bf16>(out, images, captions, cap_lens, weight, bias, gram, lambda_softmax, max_tile_bytes);
      else  // no bfloat16 brgemm with the VNNI layout here: float32 products of the same (exactly widened) inputs
        local_sim_typed<float>(out, images.to(at::kFloat), captions.to(at::kFloat), cap_lens, weight.to(at::kFloat),
                               bias, gram, lambda_softmax, max_tile_bytes);
      break;
    default:
      local_sim_typed<float>(out, images, captions, cap_lens, weight, bias, gram, lambda_softmax, max_tile_bytes);
  }
}

}  // namespace
}  // namespace cpu
}  // namespace itm

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("local_sim_cpu_(Tensor(a!) out, Tensor images, Tensor captions, Tensor cap_lens, Tensor weight, "
        "Tensor bias, Tensor gram, float lambda_softmax, int max_tile_bytes) -> ()");
}

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) { m.impl("local_sim_cpu_", &itm::cpu::local_sim_cpu_); }
