// itm_kernels::node_match_epilogue (CPU): the per-pair part of GSMN's node-level matching, given one tile's
// per-block scores. Python (itm_kernels/node_match.py) runs the block-score GEMMs and the Gram matrices; this
// kernel does, for each (image, caption) pair of the tile, the two attentions and the 16-block cosines in cache:
//   S = sum_b S^b, h = LeakyReLU_0.1(S)
//   regions query words:  alpha_k = softmax_t(lambda h_kt / (|h_.t| + eps)),
//                         region[k, b] = sum_t alpha_kt S^b_kt / max(|v_k,b| sqrt(alpha_k^T G_e^b alpha_k), eps)
//   words query regions:  beta_t = softmax_k(lambda h_kt / (|h_k.| + eps)),
//                         word[t, b] = sum_k beta_tk S^b_kt / max(|e_t,b| sqrt(beta_t^T G_v^b beta_t), eps)
// with G_e^b / G_v^b the per-block Gram matrices of the caption's words / the image's regions. The block axis b
// is innermost in every per-pair buffer, so each inner loop is one SIMD vector of 16 float32 lanes.
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
#include <vector>

#include "simd_clones.h"
#include "simd_vec.h"

namespace {

constexpr double kEps = 1e-8;
constexpr double kSlope = 0.1;

struct Dims {
  int64_t B, ni, K, nc, Lt;
};

using namespace itm::cpu::simd;

// out[j] = softmax_j(lam * x[j]), j < n; x and out hold at least round_up(n, Vec<T>::N) entries (the tail of x is
// overwritten with the row's first value, which changes neither the max nor, after masking, the sum).
template <typename T>
ITM_INLINE void softmax_scaled(T* x, int64_t n, T lam, T* out) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::N;
  const int64_t np = (n + W - 1) / W * W;
  for (int64_t j = n; j < np; ++j) x[j] = x[0];
  V m = vsplat<T>(x[0]);
  for (int64_t j = 0; j < np; j += W) m = vmax(m, vload(x + j));
  const V vm = vsplat<T>(lam * hmax<T>(m));
  const auto iota = viota<T>();
  V sum = vsplat<T>(T(0));
  for (int64_t j = 0; j < np; j += W) {
    V e = vexp(vload(x + j) * lam - vm);
    e = vmask_below<T>(iota, n - j) ? e : vsplat<T>(T(0));
    vstore(out + j, e);
    sum += e;
  }
  const V inv = vsplat<T>(T(1) / hsum<T>(sum));
  for (int64_t j = 0; j < np; j += W) vstore(out + j, vload(out + j) * inv);
}

// num[b] = sum_j a_j s[j, b]; quad[b] = sum_{j,u} a_j a_u g[j, u, b] over NB = NV vectors of blocks, for the
// j-th row of s at s + j * s_stride. sym: g symmetric (use the lower triangle).
template <typename T, int NV>
ITM_INLINE void weighted_sums(const T* a, int64_t n, const T* s, int64_t s_stride, const T* g, bool sym,
                              typename Vec<T>::V* num, typename Vec<T>::V* quad) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::N;
  constexpr int64_t NB = NV * W;
  for (int v = 0; v < NV; ++v) num[v] = vsplat<T>(T(0)), quad[v] = vsplat<T>(T(0));
  for (int64_t j = 0; j < n; ++j) {
    const T aj = a[j];
    const T* sj = s + j * s_stride;
    for (int v = 0; v < NV; ++v) num[v] += vload(sj + v * W) * aj;
    const T* gj = g + j * n * NB;
    if (sym) {
      for (int v = 0; v < NV; ++v) quad[v] += vload(gj + j * NB + v * W) * (aj * aj);
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = vsplat<T>(T(0));
      for (int64_t u = 0; u < j; ++u)
        for (int v = 0; v < NV; ++v) acc[v] += vload(gj + u * NB + v * W) * a[u];
      for (int v = 0; v < NV; ++v) quad[v] += acc[v] * (2 * aj);
    } else {
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = vsplat<T>(T(0));
      for (int64_t u = 0; u < n; ++u)
        for (int v = 0; v < NV; ++v) acc[v] += vload(gj + u * NB + v * W) * a[u];
      for (int v = 0; v < NV; ++v) quad[v] += acc[v] * aj;
    }
  }
}

// Output placement: pair (i, c) of the tile is row (i0 + i, cap_index[c]) of the (N_img, N_cap, ...) outputs;
// word rows t >= L up to L_out are zeroed.
struct Out {
  int64_t n_cap, L_out, i0;
  const int64_t* cap_index;
};

// NV vectors of Vec<T>::N blocks each: the block count is a multiple of the vector width (16 in GSMN: one
// AVX-512 vector of float32, two of float64).
template <typename T, int NV>
ITM_SIMD_CLONES void pair_epilogue(const T* __restrict__ sb, const T* __restrict__ gram_e,
                                   const T* __restrict__ gram_v, const T* __restrict__ img_sq,
                                   const T* __restrict__ cap_sq, const Dims& D, const Out& O, int64_t i, int64_t c,
                                   int64_t L, T lam, T* __restrict__ region, T* __restrict__ word,
                                   std::vector<T>& buf) {
  using V = typename Vec<T>::V;
  constexpr int W = Vec<T>::N;
  constexpr int64_t B = NV * W;
  const int64_t K = D.K, Lt = D.Lt;
  const int64_t Lp = (L + W - 1) / W * W, Kp = (K + W - 1) / W * W;
  buf.resize(static_cast<size_t>(K * L * B + K * L + K * Lp + L * Kp + Lp + Kp + K + L + 2 * W));
  T* s_blk = buf.data();            // (K, L, B)
  T* h = s_blk + K * L * B;         // (K, L)
  T* alpha = h + K * L;             // (K, Lp)
  T* beta_t = alpha + K * Lp;       // (L, Kp): each word's weights over the regions, contiguous
  T* tmp = beta_t + L * Kp;         // max(Lp, Kp) scratch
  T* row = tmp + Lp + Kp;           // K
  T* col = row + K;                 // L
  // gather S^b into (K, L, B); S and h
  for (int64_t b = 0; b < B; ++b) {
    const T* src = sb + (((b * D.ni + i) * K) * D.nc + c) * Lt;
    for (int64_t k = 0; k < K; ++k) {
      const T* sk = src + k * D.nc * Lt;
      T* dst = s_blk + k * L * B + b;
      for (int64_t t = 0; t < L; ++t) dst[t * B] = sk[t];
    }
  }
  for (int64_t t = 0; t < L; ++t) col[t] = 0;
  for (int64_t k = 0; k < K; ++k) {
    T rk = 0;
    for (int64_t t = 0; t < L; ++t) {
      const T* s = s_blk + (k * L + t) * B;
      V acc = vload(s);
      for (int v = 1; v < NV; ++v) acc += vload(s + v * W);
      const T total = hsum<T>(acc);
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
    softmax_scaled(tmp, L, lam, alpha + k * Lp);
  }
  for (int64_t t = 0; t < L; ++t) {  // words query the regions
    for (int64_t k = 0; k < K; ++k) tmp[k] = h[k * L + t] * row[k];
    softmax_scaled(tmp, K, lam, beta_t + t * Kp);
  }
  V num[NV], quad[NV];
  const V eps = vsplat<T>(T(kEps)), zero = vsplat<T>(T(0));
  const T* ge = gram_e + c * Lt * Lt * B;
  for (int64_t k = 0; k < K; ++k) {
    // the caption's Gram matrix is (Lt, Lt, B); its top-left (L, L) block is read with row stride Lt * B
    V nacc[NV], qacc[NV];
    for (int v = 0; v < NV; ++v) nacc[v] = zero, qacc[v] = zero;
    const T* a = alpha + k * Lp;
    for (int64_t t = 0; t < L; ++t) {
      const T at = a[t];
      const T* st = s_blk + (k * L + t) * B;
      for (int v = 0; v < NV; ++v) nacc[v] += vload(st + v * W) * at;
      const T* gt = ge + t * Lt * B;
      V acc[NV];
      for (int v = 0; v < NV; ++v) acc[v] = vload(gt + t * B + v * W) * (at * T(0.5));
      for (int64_t u = 0; u < t; ++u)
        for (int v = 0; v < NV; ++v) acc[v] += vload(gt + u * B + v * W) * a[u];
      for (int v = 0; v < NV; ++v) qacc[v] += acc[v] * (2 * at);
    }
    const T* vsq = img_sq + (i * K + k) * B;
    T* out = region + (((O.i0 + i) * O.n_cap + O.cap_index[c]) * K + k) * B;
    for (int v = 0; v < NV; ++v) {
      V q = vmax(qacc[v], zero);
      V den = vmax(vsqrt(vload(vsq + v * W)) * vsqrt(q), eps);
      vstore(out + v * W, nacc[v] / den);
    }
  }
  const T* gv = gram_v + i * K * K * B;
  for (int64_t t = 0; t < L; ++t) {
    weighted_sums<T, NV>(beta_t + t * Kp, K, s_blk + t * B, L * B, gv, true, num, quad);
    const T* esq = cap_sq + (c * Lt + t) * B;
    T* out = word + (((O.i0 + i) * O.n_cap + O.cap_index[c]) * O.L_out + t) * B;
    for (int v = 0; v < NV; ++v) {
      V q = vmax(quad[v], zero);
      V den = vmax(vsqrt(vload(esq + v * W)) * vsqrt(q), eps);
      vstore(out + v * W, num[v] / den);
    }
  }
  T* pad = word + (((O.i0 + i) * O.n_cap + O.cap_index[c]) * O.L_out + L) * B;
  std::fill(pad, pad + (O.L_out - L) * B, T(0));
}

void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu(), "node_match_epilogue: ", name, " must be a CPU tensor");
  TORCH_CHECK(t.scalar_type() == dtype, "node_match_epilogue: ", name, " must be ", dtype, ", got ",
              t.scalar_type());
  TORCH_CHECK(t.dim() == dim, "node_match_epilogue: ", name, " must have ", dim, " dimensions, got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "node_match_epilogue: ", name, " must be contiguous");
}

// Writes the tile's pairs into region (N_img, N_cap, K, B) and word (N_img, N_cap, L_out, B) at rows
// (image_offset + i, cap_index[c]). block_scores (B, ni, K, nc, Lt); cap_gram (nc, Lt, Lt, B); img_gram (ni, K, K, B);
// img_sq (ni, K, B); cap_sq (nc, Lt, B); cap_lens and cap_index (nc,) int64.
void node_match_epilogue_cpu(at::Tensor region, at::Tensor word, const at::Tensor& sb, const at::Tensor& cap_gram,
                             const at::Tensor& img_gram, const at::Tensor& img_sq, const at::Tensor& cap_sq,
                             const at::Tensor& cap_lens, const at::Tensor& cap_index, int64_t image_offset,
                             double lambda_softmax) {
  const auto dtype = sb.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, "node_match_epilogue: block_scores must be float32 "
              "or float64, got ", dtype);
  check_tensor(sb, "block_scores", dtype, 5);
  const Dims D{sb.size(0), sb.size(1), sb.size(2), sb.size(3), sb.size(4)};
  TORCH_CHECK(D.B == 16,
              "node_match_epilogue: the compiled epilogue handles 16 blocks (GSMN's num_block), got ", D.B);
  check_tensor(region, "region", dtype, 4);
  check_tensor(word, "word", dtype, 4);
  check_tensor(cap_gram, "cap_gram", dtype, 4);
  check_tensor(img_gram, "img_gram", dtype, 4);
  check_tensor(img_sq, "img_sq", dtype, 3);
  check_tensor(cap_sq, "cap_sq", dtype, 3);
  check_tensor(cap_lens, "cap_lens", at::kLong, 1);
  check_tensor(cap_index, "cap_index", at::kLong, 1);
  const int64_t n_img = region.size(0), n_cap = region.size(1), L_out = word.size(2);
  TORCH_CHECK(region.size(2) == D.K && region.size(3) == D.B, "node_match_epilogue: region must be (N_img, N_cap, ",
              D.K, ", ", D.B, "), got ", region.sizes());
  TORCH_CHECK(word.size(0) == n_img && word.size(1) == n_cap && word.size(3) == D.B && L_out >= D.Lt,
              "node_match_epilogue: word must be (N_img, N_cap, L_out >= ", D.Lt, ", ", D.B, "), got ", word.sizes());
  TORCH_CHECK(image_offset >= 0 && image_offset + D.ni <= n_img, "node_match_epilogue: images ", image_offset,
              "..", image_offset + D.ni, " exceed N_img = ", n_img);
  TORCH_CHECK(cap_gram.sizes() == at::IntArrayRef({D.nc, D.Lt, D.Lt, D.B}), "node_match_epilogue: cap_gram must be "
              "(nc, Lt, Lt, B) = (", D.nc, ", ", D.Lt, ", ", D.Lt, ", ", D.B, "), got ", cap_gram.sizes());
  TORCH_CHECK(img_gram.sizes() == at::IntArrayRef({D.ni, D.K, D.K, D.B}), "node_match_epilogue: img_gram must be "
              "(ni, K, K, B) = (", D.ni, ", ", D.K, ", ", D.K, ", ", D.B, "), got ", img_gram.sizes());
  TORCH_CHECK(img_sq.sizes() == at::IntArrayRef({D.ni, D.K, D.B}), "node_match_epilogue: img_sq must be (ni, K, B)");
  TORCH_CHECK(cap_sq.sizes() == at::IntArrayRef({D.nc, D.Lt, D.B}), "node_match_epilogue: cap_sq must be (nc, Lt, B)");
  TORCH_CHECK(cap_lens.size(0) == D.nc && cap_index.size(0) == D.nc, "node_match_epilogue: cap_lens and cap_index "
              "must have ", D.nc, " entries");
  const int64_t* lens = cap_lens.data_ptr<int64_t>();
  const int64_t* index = cap_index.data_ptr<int64_t>();
  for (int64_t c = 0; c < D.nc; ++c) {
    TORCH_CHECK(lens[c] >= 1 && lens[c] <= D.Lt, "node_match_epilogue: cap_lens[", c, "] = ", lens[c],
                " is outside 1..", D.Lt);
    TORCH_CHECK(index[c] >= 0 && index[c] < n_cap, "node_match_epilogue: cap_index[", c, "] = ", index[c],
                " is outside 0..", n_cap - 1);
  }
  TORCH_CHECK(std::isfinite(lambda_softmax) && lambda_softmax >= 0, "node_match_epilogue: lambda_softmax must be "
              "finite and >= 0, got ", lambda_softmax);
  const Out O{n_cap, L_out, image_offset, index};
  AT_DISPATCH_FLOATING_TYPES(dtype, "node_match_epilogue", [&] {
    const scalar_t* p_sb = sb.data_ptr<scalar_t>();
    const scalar_t* p_ge = cap_gram.data_ptr<scalar_t>();
    const scalar_t* p_gv = img_gram.data_ptr<scalar_t>();
    const scalar_t* p_vs = img_sq.data_ptr<scalar_t>();
    const scalar_t* p_es = cap_sq.data_ptr<scalar_t>();
    scalar_t* p_r = region.data_ptr<scalar_t>();
    scalar_t* p_w = word.data_ptr<scalar_t>();
    const auto lam = static_cast<scalar_t>(lambda_softmax);
    at::parallel_for(0, D.ni * D.nc, 4, [&](int64_t p0, int64_t p1) {
      std::vector<scalar_t> buf;
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t i = p / D.nc, c = p % D.nc;
        constexpr int W = Vec<scalar_t>::N;
        if (D.B == W)
          pair_epilogue<scalar_t, 1>(p_sb, p_ge, p_gv, p_vs, p_es, D, O, i, c, lens[c], lam, p_r, p_w, buf);
        else
          pair_epilogue<scalar_t, 2>(p_sb, p_ge, p_gv, p_vs, p_es, D, O, i, c, lens[c], lam, p_r, p_w, buf);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("node_match_epilogue_(Tensor(a!) region, Tensor(b!) word, Tensor block_scores, Tensor cap_gram, "
        "Tensor img_gram, Tensor img_sq, Tensor cap_sq, Tensor cap_lens, Tensor cap_index, int image_offset, "
        "float lambda_softmax) -> ()");
}

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) { m.impl("node_match_epilogue_", &node_match_epilogue_cpu); }
