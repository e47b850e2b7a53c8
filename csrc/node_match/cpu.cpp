// itm_kernels::node_match_fused_ (CPU): GSMN's node-level matching for every (image, caption) pair of a caption
// range, fused: per pair, the 16 per-block score tiles S^b_kt = v_k,b . e_t,b (a register-tiled product over the
// block-interleaved layouts (K, d/16, 16) and (L, d/16, 16), so the 16 blocks are the 16 lanes of one vector),
// then in cache:
//   S = sum_b S^b, h = LeakyReLU_0.1(S)
//   regions query words:  alpha_k = softmax_t(lambda h_kt / (|h_.t| + eps)),
//                         region[k, b] = sum_t alpha_kt S^b_kt / max(|v_k,b| sqrt(alpha_k^T G_e^b alpha_k), eps)
//   words query regions:  beta_t = softmax_k(lambda h_kt / (|h_k.| + eps)),
//                         word[t, b] = sum_k beta_tk S^b_kt / max(|e_t,b| sqrt(beta_t^T G_v^b beta_t), eps)
// with G_e^b / G_v^b the per-block Gram matrices of the caption's words / the image's regions (computed once per
// caption / image by the caller). Nothing of size pairs x K x L x 16 is ever written to memory.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "common/constants.h"
#include "common/simd_clones.h"
#include "common/simd_vec.h"

namespace {

using itm::kEps;
constexpr double kSlope = itm::kLeakySlope;

struct Dims {
  int64_t B, ni, K, nc, Lt, Kp, Lp, db;
};

// Register tile of the block-score product: TK regions x TT words, NV vectors of 16 blocks each.
template <typename T> struct ScoreTile;
template <> struct ScoreTile<float> { static constexpr int TK = 4, TT = 4; };
template <> struct ScoreTile<double> { static constexpr int TK = 2, TT = 4; };

using namespace itm::cpu::simd;

// out[j] = softmax_j(lam * x[j]), j < n; x and out hold at least round_up(n, Vec<T>::N) entries (the tail of x is
// overwritten with the row's first value, which changes neither the max nor, after masking, the sum).
template <int VB, typename T>
ITM_INLINE void softmax_scaled(T* x, int64_t n, T lam, T* out) {
  using V = typename Vec<T, VB>::V;
  constexpr int W = Vec<T, VB>::N;
  const int64_t np = (n + W - 1) / W * W;
  for (int64_t j = n; j < np; ++j) x[j] = x[0];
  V m = vsplat<VB, T>(x[0]);
  for (int64_t j = 0; j < np; j += W) m = vmax(m, vload<VB>(x + j));
  const V vm = vsplat<VB>(lam * hmax(m));
  const auto iota = viota<VB, T>();
  V sum = vsplat<VB, T>(T(0));
  for (int64_t j = 0; j < np; j += W) {
    V e = vexp(vload<VB>(x + j) * lam - vm);
    e = vmask_below(iota, n - j) ? e : vsplat<VB, T>(T(0));
    vstore(out + j, e);
    sum += e;
  }
  const V inv = vsplat<VB, T>(T(1) / hsum(sum));
  for (int64_t j = 0; j < np; j += W) vstore(out + j, vload<VB>(out + j) * inv);
}

// acc[v] = sum_{u < n} g[u * NB + v * W] * a[u]: four independent FMA chains (one chain is latency-bound).
template <int VB, typename T, int NV>
ITM_INLINE void weighted_rows(const T* g, const T* a, int64_t n, typename Vec<T, VB>::V* acc) {
  using V = typename Vec<T, VB>::V;
  constexpr int W = Vec<T, VB>::N;
  constexpr int64_t NB = NV * W;
  constexpr int R = NV <= 2 ? 4 : 2;  // chains: R NV accumulators stay in registers
  V c[R][NV];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < NV; ++v) c[r][v] = vsplat<VB>(T(0));
  int64_t u = 0;
  for (; u + R <= n; u += R)
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < NV; ++v) c[r][v] += vload<VB>(g + (u + r) * NB + v * W) * a[u + r];
  for (; u < n; ++u)
    for (int v = 0; v < NV; ++v) c[0][v] += vload<VB>(g + u * NB + v * W) * a[u];
  for (int v = 0; v < NV; ++v) {
    if constexpr (R == 4) acc[v] += (c[0][v] + c[1][v]) + (c[2][v] + c[3][v]);
    else acc[v] += c[0][v] + c[1][v];
  }
}

// num[b] = sum_j a_j s[j, b]; quad[b] = sum_{j,u} a_j a_u g[j, u, b] over NB = NV vectors of blocks, for the
// j-th row of s at s + j * s_stride. sym: g symmetric (use the lower triangle).
template <int VB, typename T, int NV>
ITM_INLINE void weighted_sums(const T* a, int64_t n, const T* s, int64_t s_stride, const T* g, bool sym,
                              typename Vec<T, VB>::V* num, typename Vec<T, VB>::V* quad) {
  using V = typename Vec<T, VB>::V;
  constexpr int W = Vec<T, VB>::N;
  constexpr int64_t NB = NV * W;
  for (int v = 0; v < NV; ++v) num[v] = vsplat<VB, T>(T(0)), quad[v] = vsplat<VB, T>(T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T aj = a[j];
    const T* sj = s + j * s_stride;
    for (int v = 0; v < NV; ++v) num[v] += vload<VB>(sj + v * W) * aj;
    const T* gj = g + j * n * NB;
    if (sym) {
      for (int v = 0; v < NV; ++v) quad[v] += vload<VB>(gj + j * NB + v * W) * (aj * aj);
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = vsplat<VB, T>(T(0));
      weighted_rows<VB, T, NV>(gj, a, j, acc);
      for (int v = 0; v < NV; ++v) quad[v] += acc[v] * (2 * aj);
    } else {
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = vsplat<VB, T>(T(0));
      weighted_rows<VB, T, NV>(gj, a, n, acc);
      for (int v = 0; v < NV; ++v) quad[v] += acc[v] * aj;
    }
  }
}

// s[k, t, :] = sum_e v[k, e, :] * e[t, e, :] and S[k, t] = sum_b s[k, t, b] for k < K, t < L (lanes = blocks); v (Kp, db, NB), e (Lp, db, NB) with
// Kp, Lp multiples of the register tile (zero rows beyond K, L).
// The register tile is TK x TT of ScoreTile<T> at 64-byte vectors and shrinks (to divisors of it, so that Kp and
// Lp stay multiples) until its TK TT NV accumulators fit: 16 of 32 zmm, 8 of 16 ymm / xmm.
template <int VB, typename T, int NV>
ITM_INLINE void block_scores(const T* vi, const T* ec, int64_t K, int64_t L, int64_t Kp, int64_t Lp, int64_t db,
                             T* s_blk, T* s_sum) {
  using V = typename Vec<T, VB>::V;
  constexpr int W = Vec<T, VB>::N;
  constexpr int64_t NB = NV * W;
  constexpr int kAcc = VB == 64 ? 16 : 8;
  constexpr int TT = std::min(ScoreTile<T>::TT, std::max(1, kAcc / NV));
  constexpr int TK = std::min(ScoreTile<T>::TK, std::max(1, kAcc / (NV * TT)));
  static_assert(ScoreTile<T>::TK % TK == 0 && ScoreTile<T>::TT % TT == 0, "tiles divide the padded sizes");
  const int64_t row = db * NB;
  for (int64_t k0 = 0; k0 < Kp; k0 += TK) {
    for (int64_t t0 = 0; t0 < Lp; t0 += TT) {
      V acc[TK][TT][NV];
      for (int r = 0; r < TK; ++r)
        for (int q = 0; q < TT; ++q)
          for (int v = 0; v < NV; ++v) acc[r][q][v] = vsplat<VB, T>(T(0));
      const T* a0 = vi + k0 * row;
      const T* b0 = ec + t0 * row;
      for (int64_t e = 0; e < db; ++e) {
        V a[TK][NV], b[TT][NV];
        for (int r = 0; r < TK; ++r)
          for (int v = 0; v < NV; ++v) a[r][v] = vload<VB>(a0 + r * row + e * NB + v * W);
        for (int q = 0; q < TT; ++q)
          for (int v = 0; v < NV; ++v) b[q][v] = vload<VB>(b0 + q * row + e * NB + v * W);
        for (int r = 0; r < TK; ++r)
          for (int q = 0; q < TT; ++q)
            for (int v = 0; v < NV; ++v) acc[r][q][v] += a[r][v] * b[q][v];
      }
      for (int r = 0; r < TK && k0 + r < K; ++r)
        for (int q = 0; q < TT && t0 + q < L; ++q)
        {
          V total = acc[r][q][0];
          for (int v = 0; v < NV; ++v) vstore(s_blk + ((k0 + r) * L + t0 + q) * NB + v * W, acc[r][q][v]);
          for (int v = 1; v < NV; ++v) total += acc[r][q][v];
          s_sum[(k0 + r) * L + t0 + q] = hsum_tree(total);  // S = sum over the blocks, from the registers
        }
    }
  }
}

// Output placement: pair (i, c) of the tile is row (i0 + i, cap_index[c]) of the (N_img, N_cap, ...) outputs;
// word rows t >= L up to L_out are zeroed.
struct Out {
  int64_t n_cap, L_out, i0;
  const int64_t* cap_index;
};

// Gram guard (kGramCancelRatio) of one pair: a block cosine whose |ctx_b|^2 = w^T G^b w (q, as the kernel took it)
// cancelled (q < ratio (sum_j w_j |x_j,b|)^2) is recomputed from the explicit block context in float64. `alpha`
// (K rows of stride Lw) and `beta_t` (L rows of stride Kw) are the pair's attention weights; q_reg (K, B) and
// q_word (L, B) the quadratic forms; out_reg / out_word the pair's output rows. Rare; K L B per pair otherwise.
template <typename T>
__attribute__((noinline)) void gram_guard_pair(const T* vi, const T* ec, const T* vsq, const T* esq, int64_t K,
                                               int64_t L, int64_t db, int64_t B, const T* alpha, int64_t Lw,
                                               const T* beta_t, int64_t Kw, const T* q_reg, const T* q_word,
                                               T* out_reg, T* out_word) {
  const T ratio = static_cast<T>(itm::kGramCancelRatio);
  // the block cosine of query row x (stride B over e) with sum_j w_j ctx row j, in float64
  auto exact = [&](const T* x, const T* w, const T* ctx, int64_t n, int64_t b) {
    double dot = 0, xx = 0, aa = 0;
    for (int64_t e = 0; e < db; ++e) {
      double a = 0;
      for (int64_t j = 0; j < n; ++j) a += static_cast<double>(w[j]) * static_cast<double>(ctx[(j * db + e) * B + b]);
      const double xe = static_cast<double>(x[e * B + b]);
      dot += a * xe, xx += xe * xe, aa += a * a;
    }
    const double den = std::sqrt(xx) * std::sqrt(aa);
    return static_cast<T>(dot / (den > kEps ? den : kEps));
  };
  for (int64_t k = 0; k < K; ++k)
    for (int64_t b = 0; b < B; ++b) {
      T scale = 0;
      for (int64_t t = 0; t < L; ++t) scale += alpha[k * Lw + t] * std::sqrt(esq[t * B + b]);
      if (q_reg[k * B + b] < ratio * scale * scale)
        out_reg[k * B + b] = exact(vi + k * db * B, alpha + k * Lw, ec, L, b);
    }
  for (int64_t t = 0; t < L; ++t)
    for (int64_t b = 0; b < B; ++b) {
      T scale = 0;
      for (int64_t k = 0; k < K; ++k) scale += beta_t[t * Kw + k] * std::sqrt(vsq[k * B + b]);
      if (q_word[t * B + b] < ratio * scale * scale)
        out_word[t * B + b] = exact(ec + t * db * B, beta_t + t * Kw, vi, K, b);
    }
}

// NV64 64-byte vectors of blocks (Vec<T>::N each): the block count is a multiple of the widest vector (16 in GSMN:
// one 64-byte vector of float32, two of float64), NV = NV64 * 64 / VB vectors at this level's width VB.
template <int VB, typename T, int NV64>
ITM_INLINE void pair_epilogue_impl(std::integral_constant<int, NV64>, const T* __restrict__ vi,
                                   const T* __restrict__ ec, const T* __restrict__ gram_e,
                                   const T* __restrict__ gram_v, const T* __restrict__ img_sq,
                                   const T* __restrict__ cap_sq, const Dims& D, const Out& O, int64_t i, int64_t c,
                                   int64_t L, T lam, T* __restrict__ region, T* __restrict__ word,
                                   std::vector<T>& buf) {
  constexpr int NV = NV64 * (kMaxVecBytes / VB);
  using V = typename Vec<T, VB>::V;
  constexpr int W = Vec<T, VB>::N;
  constexpr int64_t B = NV * W;
  static_assert(B == NV64 * Vec<T>::N, "the block layout does not depend on the level");
  const int64_t K = D.K, Lt = D.Lt, Kp = D.Kp, Lp = D.Lp;
  const int64_t Lw = (L + W - 1) / W * W, Kw = (K + W - 1) / W * W;
  const size_t n_main = static_cast<size_t>(K * L * B + K * L + K * Lw + L * Kw + Lw + Kw + K + L + 2 * W);
  buf.resize(n_main + static_cast<size_t>((K + L) * B));
  T* q_reg = buf.data() + n_main;   // (K, B) and (L, B): the quadratic forms, for the Gram guard
  T* q_word = q_reg + K * B;
  T* s_blk = buf.data();            // (K, L, B)
  T* h = s_blk + K * L * B;         // (K, L)
  T* alpha = h + K * L;             // (K, Lw)
  T* beta_t = alpha + K * Lw;       // (L, Kw): each word's weights over the regions, contiguous
  T* tmp = beta_t + L * Kw;         // max(Lw, Kw) scratch
  T* row = tmp + Lw + Kw;           // K
  T* col = row + K;                 // L
  block_scores<VB, T, NV>(vi, ec, K, L, Kp, Lp, D.db, s_blk, h);
  for (int64_t t = 0; t < L; ++t) col[t] = 0;
  for (int64_t k = 0; k < K; ++k) {
    T rk = 0;
    for (int64_t t = 0; t < L; ++t) {
      const T total = h[k * L + t];
      const T x = total > 0 ? total : T(kSlope) * total;
      h[k * L + t] = x;
      rk += x * x;
      col[t] += x * x;
    }
    row[k] = T(1) / (std::sqrt(rk) + T(kEps));
  }
  for (int64_t t = 0; t < L; ++t) col[t] = T(1) / (std::sqrt(col[t]) + T(kEps));
  for (int64_t k = 0; k < K; ++k) {  // regions query the words
    for (int64_t t = 0; t < L; ++t) tmp[t] = h[k * L + t] * col[t];
    softmax_scaled<VB>(tmp, L, lam, alpha + k * Lw);
  }
  for (int64_t t = 0; t < L; ++t) {  // words query the regions
    for (int64_t k = 0; k < K; ++k) tmp[k] = h[k * L + t] * row[k];
    softmax_scaled<VB>(tmp, K, lam, beta_t + t * Kw);
  }
  V num[NV], quad[NV];
  const V eps = vsplat<VB, T>(T(kEps)), zero = vsplat<VB, T>(T(0));
  const T* ge = gram_e + c * Lt * Lt * B;
  for (int64_t k = 0; k < K; ++k) {
    // the caption's Gram matrix is (Lt, Lt, B); its top-left (L, L) block is read with row stride Lt * B
    V nacc[NV], qacc[NV];
    for (int v = 0; v < NV; ++v) nacc[v] = zero, qacc[v] = zero;
    const T* a = alpha + k * Lw;
    for (int64_t t = 0; t < L; ++t) {
      const T at = a[t];
      const T* st = s_blk + (k * L + t) * B;
      for (int v = 0; v < NV; ++v) nacc[v] += vload<VB>(st + v * W) * at;
      const T* gt = ge + t * Lt * B;
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = vload<VB>(gt + t * B + v * W) * (at * T(0.5));
      weighted_rows<VB, T, NV>(gt, a, t, acc);
      for (int v = 0; v < NV; ++v) qacc[v] += acc[v] * (2 * at);
    }
    const T* vsq = img_sq + (i * K + k) * B;
    T* out = region + (((O.i0 + i) * O.n_cap + O.cap_index[c]) * K + k) * B;
    for (int v = 0; v < NV; ++v) {
      V q = vmax(qacc[v], zero);
      vstore(q_reg + k * B + v * W, q);
      V den = vmax(vsqrt(vload<VB>(vsq + v * W)) * vsqrt(q), eps);
      vstore(out + v * W, nacc[v] / den);
    }
  }
  const T* gv = gram_v + i * K * K * B;
  for (int64_t t = 0; t < L; ++t) {
    weighted_sums<VB, T, NV>(beta_t + t * Kw, K, s_blk + t * B, L * B, gv, true, num, quad);
    const T* esq = cap_sq + (c * Lt + t) * B;
    T* out = word + (((O.i0 + i) * O.n_cap + O.cap_index[c]) * O.L_out + t) * B;
    for (int v = 0; v < NV; ++v) {
      V q = vmax(quad[v], zero);
      vstore(q_word + t * B + v * W, q);
      V den = vmax(vsqrt(vload<VB>(esq + v * W)) * vsqrt(q), eps);
      vstore(out + v * W, num[v] / den);
    }
  }
  gram_guard_pair<T>(vi, ec, img_sq + i * K * B, cap_sq + c * Lt * B, K, L, D.db, B, alpha, Lw, beta_t, Kw, q_reg,
                     q_word, region + ((O.i0 + i) * O.n_cap + O.cap_index[c]) * K * B,
                     word + ((O.i0 + i) * O.n_cap + O.cap_index[c]) * O.L_out * B);
  T* pad = word + (((O.i0 + i) * O.n_cap + O.cap_index[c]) * O.L_out + L) * B;
  std::fill(pad, pad + (O.L_out - L) * B, T(0));
}
ITM_SIMD_FUNCTION(pair_epilogue, pair_epilogue_impl)

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "node_match_fused: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "node_match_fused: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "node_match_fused: ", name, " must have ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "node_match_fused: ", name, " must be contiguous");
}

// Writes every (image i, caption c) pair of a caption range into region (N_img, N_cap, K, B) and word
// (N_img, N_cap, L_out, B) at rows (i, cap_index[c]). img_blk (N_img, Kp, db, B), cap_blk (nc, Lp, db, B):
// block-interleaved features (feature b * db + e at [.., e, b]), zero rows beyond K / Lt; img_gram (N_img, K, K, B);
// img_sq (N_img, K, B); cap_gram (nc, Lt, Lt, B); cap_sq (nc, Lt, B); cap_lens, cap_index (nc,) int64.
void node_match_fused_cpu(at::Tensor region, at::Tensor word, const at::Tensor& img_blk, const at::Tensor& cap_blk,
                          const at::Tensor& img_gram, const at::Tensor& img_sq, const at::Tensor& cap_gram,
                          const at::Tensor& cap_sq, const at::Tensor& cap_lens, const at::Tensor& cap_index,
                          double lambda_softmax) {
  const auto dtype = img_blk.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "node_match_fused: img_blk must be float32 or float64, "
              "got ", dtype);
  check_tensor(img_blk, "img_blk", dtype, 4);
  check_tensor(cap_blk, "cap_blk", dtype, 4);
  check_tensor(region, "region", dtype, 4);
  check_tensor(word, "word", dtype, 4);
  check_tensor(cap_gram, "cap_gram", dtype, 4);
  check_tensor(img_gram, "img_gram", dtype, 4);
  check_tensor(img_sq, "img_sq", dtype, 3);
  check_tensor(cap_sq, "cap_sq", dtype, 3);
  check_tensor(cap_lens, "cap_lens", at::kLong, 1);
  check_tensor(cap_index, "cap_index", at::kLong, 1);
  const int64_t n_img = img_blk.size(0), db = img_blk.size(2), B = img_blk.size(3);
  const int64_t K = img_gram.size(1), nc = cap_blk.size(0), Lt = cap_gram.size(1);
  const Dims D{B, n_img, K, nc, Lt, img_blk.size(1), cap_blk.size(1), db};
  TORCH_CHECK(B == 16, "node_match_fused: the compiled kernel handles 16 blocks (GSMN's num_block), got ", B);
  TORCH_CHECK(cap_blk.size(2) == db && cap_blk.size(3) == B, "node_match_fused: cap_blk must be (nc, Lp, ", db,
              ", ", B, "), got ", cap_blk.sizes());
  constexpr int TK = 4, TT = 4;  // a multiple of both dtypes' register tiles
  TORCH_CHECK(D.Kp >= K && D.Kp % TK == 0 && D.Lp >= Lt && D.Lp % TT == 0, "node_match_fused: img_blk / cap_blk "
              "rows must be padded to multiples of 4 covering K = ", K, " and Lt = ", Lt, ", got ", D.Kp, " and ",
              D.Lp);
  const int64_t n_cap = region.size(1), L_out = word.size(2);
  TORCH_CHECK(region.size(0) == n_img && region.size(2) == K && region.size(3) == B, "node_match_fused: region "
              "must be (", n_img, ", N_cap, ", K, ", ", B, "), got ", region.sizes());
  TORCH_CHECK(word.size(0) == n_img && word.size(1) == n_cap && word.size(3) == B && L_out >= Lt,
              "node_match_fused: word must be (", n_img, ", ", n_cap, ", L_out >= ", Lt, ", ", B, "), got ",
              word.sizes());
  TORCH_CHECK(img_gram.sizes() == at::IntArrayRef({n_img, K, K, B}), "node_match_fused: img_gram must be "
              "(N_img, K, K, B) = (", n_img, ", ", K, ", ", K, ", ", B, "), got ", img_gram.sizes());
  TORCH_CHECK(cap_gram.sizes() == at::IntArrayRef({nc, Lt, Lt, B}), "node_match_fused: cap_gram must be "
              "(nc, Lt, Lt, B) = (", nc, ", ", Lt, ", ", Lt, ", ", B, "), got ", cap_gram.sizes());
  TORCH_CHECK(img_sq.sizes() == at::IntArrayRef({n_img, K, B}), "node_match_fused: img_sq must be (N_img, K, B)");
  TORCH_CHECK(cap_sq.sizes() == at::IntArrayRef({nc, Lt, B}), "node_match_fused: cap_sq must be (nc, Lt, B)");
  TORCH_CHECK(cap_lens.size(0) == nc && cap_index.size(0) == nc, "node_match_fused: cap_lens and cap_index must "
              "have ", nc, " entries");
  const int64_t* lens = cap_lens.data_ptr<int64_t>();
  const int64_t* index = cap_index.data_ptr<int64_t>();
  std::vector<int64_t> first_at(n_cap, -1);  // duplicates would make two threads write one output slice
  for (int64_t c = 0; c < nc; ++c) {
    TORCH_CHECK(lens[c] >= 1 && lens[c] <= Lt, "node_match_fused: cap_lens[", c, "] = ", lens[c],
                " is outside 1..", Lt);
    TORCH_CHECK(index[c] >= 0 && index[c] < n_cap, "node_match_fused: cap_index[", c, "] = ", index[c],
                " is outside 0..", n_cap - 1);
    TORCH_CHECK(first_at[index[c]] < 0, "node_match_fused: cap_index must not repeat an entry: cap_index[",
                first_at[index[c]] < 0 ? c : first_at[index[c]], "] = cap_index[", c, "] = ", index[c]);
    first_at[index[c]] = c;
  }
  TORCH_CHECK(std::isfinite(lambda_softmax) && lambda_softmax >= 0, "node_match_fused: lambda_softmax must be "
              "finite and >= 0, got ", lambda_softmax);
  TORCH_CHECK(lambda_softmax <= (dtype == at::kDouble ? itm::kLambdaMaxF64 : itm::kLambdaMaxF32),
              "node_match_fused: lambda_softmax must be <= ", (dtype == at::kDouble ? itm::kLambdaMaxF64 :
              itm::kLambdaMaxF32), " for ", dtype, " inputs, got ", lambda_softmax);
  const Out O{n_cap, L_out, 0, index};
  // Work items: (image, group of up to kGroup captions); within one, the image's features stay in L1/L2 while the
  // group's captions (kGroup x Lp x d values) stay in L2.
  constexpr int64_t kGroup = 8;
  const int64_t groups = (nc + kGroup - 1) / kGroup;
  AT_DISPATCH_FLOATING_TYPES(dtype, "node_match_fused", [&] {
    const scalar_t* p_v = img_blk.data_ptr<scalar_t>();
    const scalar_t* p_e = cap_blk.data_ptr<scalar_t>();
    const scalar_t* p_ge = cap_gram.data_ptr<scalar_t>();
    const scalar_t* p_gv = img_gram.data_ptr<scalar_t>();
    const scalar_t* p_vs = img_sq.data_ptr<scalar_t>();
    const scalar_t* p_es = cap_sq.data_ptr<scalar_t>();
    scalar_t* p_r = region.data_ptr<scalar_t>();
    scalar_t* p_w = word.data_ptr<scalar_t>();
    const auto lam = static_cast<scalar_t>(lambda_softmax);
    const int64_t v_stride = D.Kp * db * B, e_stride = D.Lp * db * B;
    at::parallel_for(0, groups * n_img, 1, [&](int64_t w0, int64_t w1) {
      std::vector<scalar_t> buf;
      for (int64_t w = w0; w < w1; ++w) {
        const int64_t g = w / n_img, i = w % n_img;
        for (int64_t c = g * kGroup; c < std::min(nc, (g + 1) * kGroup); ++c) {
          const scalar_t* vi = p_v + i * v_stride;
          const scalar_t* ec = p_e + c * e_stride;
          if constexpr (std::is_same_v<scalar_t, float>)
            pair_epilogue(std::integral_constant<int, 1>{}, vi, ec, p_ge, p_gv, p_vs, p_es, D, O, i, c, lens[c], lam, p_r, p_w, buf);
          else
            pair_epilogue(std::integral_constant<int, 2>{}, vi, ec, p_ge, p_gv, p_vs, p_es, D, O, i, c, lens[c], lam, p_r, p_w, buf);
        }
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("node_match_fused_(Tensor(a!) region, Tensor(b!) word, Tensor img_blk, Tensor cap_blk, Tensor img_gram, "
        "Tensor img_sq, Tensor cap_gram, Tensor cap_sq, Tensor cap_lens, Tensor cap_index, float lambda_softmax) "
        "-> ()");
}

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) { m.impl("node_match_fused_", &node_match_fused_cpu); }
