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

namespace {

constexpr double kEps = 1e-8;
constexpr double kSlope = 0.1;

struct Dims {
  int64_t B, ni, K, nc, Lt;
};

// Softmax of lam * x over n entries (stride 1) into out.
template <typename T>
inline void softmax_scaled(const T* x, int64_t n, T lam, T* out) {
  T m = -std::numeric_limits<T>::infinity();
  for (int64_t j = 0; j < n; ++j) m = std::max(m, lam * x[j]);
  T sum = 0;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = std::exp(lam * x[j] - m);
    sum += out[j];
  }
  const T inv = T(1) / sum;
  for (int64_t j = 0; j < n; ++j) out[j] *= inv;
}

// Output placement: pair (i, c) of the tile is row (i0 + i, cap_index[c]) of the (N_img, N_cap, ...) outputs;
// word rows t >= L up to L_out are zeroed.
struct Out {
  int64_t n_cap, L_out, i0;
  const int64_t* cap_index;
};

// NB > 0: the block count as a compile-time constant (16 in GSMN: one AVX-512 vector of float32).
template <typename T, int NB>
ITM_SIMD_CLONES void pair_epilogue(const T* __restrict__ sb, const T* __restrict__ gram_e,
                                   const T* __restrict__ gram_v, const T* __restrict__ img_sq,
                                   const T* __restrict__ cap_sq, const Dims& D, const Out& O, int64_t i, int64_t c,
                                   int64_t L, T lam, T* __restrict__ region, T* __restrict__ word,
                                   std::vector<T>& buf) {
  const int64_t B = NB > 0 ? NB : D.B, K = D.K, Lt = D.Lt;
  buf.resize(static_cast<size_t>(K * L * B + 4 * K * L + K + L + 2 * B));
  T* s_blk = buf.data();            // (K, L, B)
  T* h = s_blk + K * L * B;         // (K, L)
  T* alpha = h + K * L;             // (K, L)
  T* beta_t = alpha + K * L;        // (L, K): beta transposed, each word's weights contiguous
  T* tmp = beta_t + K * L;          // (K, L) scratch
  T* row = tmp + K * L;             // K
  T* col = row + K;                 // L
  T* acc = col + L;                 // 2 B
  // gather S^b into (K, L, B); S and h
  for (int64_t b = 0; b < B; ++b) {
    const T* src = sb + (((b * D.ni + i) * K) * D.nc + c) * Lt;
    for (int64_t k = 0; k < K; ++k) {
      const T* s = src + k * D.nc * Lt;
      for (int64_t t = 0; t < L; ++t) s_blk[(k * L + t) * B + b] = s[t];
    }
  }
  for (int64_t k = 0; k < K; ++k) row[k] = 0;
  for (int64_t t = 0; t < L; ++t) col[t] = 0;
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t t = 0; t < L; ++t) {
      const T* s = s_blk + (k * L + t) * B;
      T total = 0;
      for (int64_t b = 0; b < B; ++b) total += s[b];
      const T v = total > 0 ? total : T(kSlope) * total;
      h[k * L + t] = v;
      row[k] += v * v;
      col[t] += v * v;
    }
  }
  for (int64_t k = 0; k < K; ++k) row[k] = T(1) / (std::sqrt(row[k]) + T(kEps));
  for (int64_t t = 0; t < L; ++t) col[t] = T(1) / (std::sqrt(col[t]) + T(kEps));
  // regions query the words
  for (int64_t k = 0; k < K; ++k) {
    for (int64_t t = 0; t < L; ++t) tmp[t] = h[k * L + t] * col[t];
    softmax_scaled(tmp, L, lam, alpha + k * L);
  }
  // words query the regions
  for (int64_t t = 0; t < L; ++t) {
    for (int64_t k = 0; k < K; ++k) tmp[k] = h[k * L + t] * row[k];
    softmax_scaled(tmp, K, lam, beta_t + t * K);
  }
  T* num = acc;
  T* quad = acc + B;
  for (int64_t k = 0; k < K; ++k) {
    const T* a = alpha + k * L;
    for (int64_t b = 0; b < B; ++b) num[b] = 0, quad[b] = 0;
    for (int64_t t = 0; t < L; ++t) {
      const T* s = s_blk + (k * L + t) * B;
      const T at = a[t];
      for (int64_t b = 0; b < B; ++b) num[b] += at * s[b];
      const T* g = gram_e + (c * Lt + t) * Lt * B;  // G_e[c, t, u, b]
      for (int64_t u = 0; u < L; ++u) {
        const T w = at * a[u];
        const T* gu = g + u * B;
        for (int64_t b = 0; b < B; ++b) quad[b] += w * gu[b];
      }
    }
    const T* vsq = img_sq + (i * K + k) * B;
    T* out = region + (((O.i0 + i) * O.n_cap + O.cap_index[c]) * K + k) * B;
    for (int64_t b = 0; b < B; ++b) {
      const T den = std::max(std::sqrt(vsq[b]) * std::sqrt(std::max(quad[b], T(0))), T(kEps));
      out[b] = num[b] / den;
    }
  }
  for (int64_t t = 0; t < L; ++t) {
    const T* be = beta_t + t * K;
    for (int64_t b = 0; b < B; ++b) num[b] = 0, quad[b] = 0;
    for (int64_t k = 0; k < K; ++k) {
      const T* s = s_blk + (k * L + t) * B;
      const T bk = be[k];
      for (int64_t b = 0; b < B; ++b) num[b] += bk * s[b];
      const T* g = gram_v + (i * K + k) * K * B;  // G_v[i, k, j, b], symmetric in (k, j)
      for (int64_t b = 0; b < B; ++b) quad[b] += bk * bk * g[k * B + b];
      for (int64_t j = 0; j < k; ++j) {
        const T w = 2 * bk * be[j];
        const T* gj = g + j * B;
        for (int64_t b = 0; b < B; ++b) quad[b] += w * gj[b];
      }
    }
    const T* esq = cap_sq + (c * Lt + t) * B;
    T* out = word + (((O.i0 + i) * O.n_cap + O.cap_index[c]) * O.L_out + t) * B;
    for (int64_t b = 0; b < B; ++b) {
      const T den = std::max(std::sqrt(esq[b]) * std::sqrt(std::max(quad[b], T(0))), T(kEps));
      out[b] = num[b] / den;
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
        if (D.B == 16)
          pair_epilogue<scalar_t, 16>(p_sb, p_ge, p_gv, p_vs, p_es, D, O, i, c, lens[c], lam, p_r, p_w, buf);
        else
          pair_epilogue<scalar_t, 0>(p_sb, p_ge, p_gv, p_vs, p_es, D, O, i, c, lens[c], lam, p_r, p_w, buf);
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
