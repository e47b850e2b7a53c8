// itm_kernels::sgr_step_ (CPU): the per-pair part of one SGRAF graph-reasoning step, fused, in place.
//
// For every pair p (a graph of n node slots, the first m_p of them valid) the caller has already multiplied the
// nodes by [W_q^T W_k | W_g^T] in one GEMM (yu = [Y | U], (P, n, 2 s)). This kernel finishes the step:
//   logits_ij = Y_i . X_j + c . X_j            (j < m_p; c = b_q W_k, the query bias folded onto the keys)
//   A_i       = softmax_j(logits_i)
//   X'_i      = ReLU(sum_j A_ij U_j + b_g)     (i < m_p; rows i >= m_p are set to zero)
// which equals the official ReLU(W_g (softmax(Q K^T) X) + b_g) because the rows of A sum to 1 and the query-side
// terms that do not depend on j cancel in the softmax. Per pair the node rows are widened to float32 once into a
// thread-local buffer, the logits are 4 x 4 register blocks of dot products over s, the softmax is vectorised,
// and A U is an outer-product accumulation, 2 rows x 128 features at a time. Accumulation in float32 for float32
// and bfloat16 nodes (the unfused bfloat16 path rounds the logits and A U to bfloat16).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "simd_clones.h"
#include "simd_vec.h"

namespace {

using namespace itm::cpu::simd;
using VF = Vec<float>::V;
constexpr int kW = Vec<float>::N;  // 16 lanes

ITM_INLINE void widen_row(const float* src, float* dst, int64_t s) { std::memcpy(dst, src, s * sizeof(float)); }
ITM_INLINE void widen_row(const c10::BFloat16* src, float* dst, int64_t s) {
  for (int64_t k = 0; k < s; ++k) dst[k] = static_cast<float>(src[k]);
}
ITM_INLINE void narrow_row(const float* src, float* dst, int64_t s) { std::memcpy(dst, src, s * sizeof(float)); }
ITM_INLINE void narrow_row(const float* src, c10::BFloat16* dst, int64_t s) {
  for (int64_t k = 0; k < s; ++k) dst[k] = c10::BFloat16(src[k]);
}

// logits (m4 x ldl) = Y X^T for m4 = round_up(m, 4) rows of Y and X (s features, s % 16 == 0; rows >= m zero).
ITM_INLINE void block_logits(const float* Y, const float* X, int64_t m4, int64_t s, float* logits, int64_t ldl) {
  for (int64_t i0 = 0; i0 < m4; i0 += 4) {
    for (int64_t j0 = 0; j0 < m4; j0 += 4) {
      VF acc[4][4];
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) acc[a][b] = vsplat(0.0f);
      for (int64_t k = 0; k < s; k += kW) {
        VF y[4], x[4];
        for (int a = 0; a < 4; ++a) y[a] = vload(Y + (i0 + a) * s + k);
        for (int b = 0; b < 4; ++b) x[b] = vload(X + (j0 + b) * s + k);
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) acc[a][b] += y[a] * x[b];
      }
      for (int a = 0; a < 4; ++a)
        for (int b = 0; b < 4; ++b) logits[(i0 + a) * ldl + j0 + b] = hsum_tree<float>(acc[a][b]);
    }
  }
}

// out rows i, i + 1 (s features) = ReLU(sum_{j < m} A[i][j] U_j + bias); A rows have stride lda.
ITM_INLINE void attend_two_rows(const float* A, int64_t lda, const float* U, int64_t m, int64_t s,
                                const float* bias, float* out0, float* out1) {
  constexpr int kC = 8;  // 8 vectors = 128 features per pass
  for (int64_t k0 = 0; k0 < s; k0 += kC * kW) {
    const int nv = static_cast<int>(std::min<int64_t>(kC, (s - k0) / kW));
    VF acc0[kC], acc1[kC];
    for (int v = 0; v < kC; ++v) acc0[v] = acc1[v] = vsplat(0.0f);
    for (int64_t j = 0; j < m; ++j) {
      const VF a0 = vsplat(A[j]), a1 = vsplat(A[lda + j]);
      const float* u = U + j * s + k0;
      for (int v = 0; v < nv; ++v) {
        const VF uj = vload(u + v * kW);
        acc0[v] += a0 * uj;
        acc1[v] += a1 * uj;
      }
    }
    const VF zero = vsplat(0.0f);
    for (int v = 0; v < nv; ++v) {
      const VF b = vload(bias + k0 + v * kW);
      vstore(out0 + k0 + v * kW, vmax(acc0[v] + b, zero));
      vstore(out1 + k0 + v * kW, vmax(acc1[v] + b, zero));
    }
  }
}

// Row softmax of logits[i][0..m) in place (ldl >= round_up(m, 16)); padding lanes get weight 0.
ITM_INLINE void softmax_row(float* row, int64_t m) {
  const int64_t mp = (m + kW - 1) / kW * kW;
  for (int64_t j = m; j < mp; ++j) row[j] = row[0];
  VF mx = vload(row);
  for (int64_t j = kW; j < mp; j += kW) mx = vmax(mx, vload(row + j));
  const VF vm = vsplat(hmax<float>(mx));
  const auto iota = viota<float>();
  VF sum = vsplat(0.0f);
  for (int64_t j = 0; j < mp; j += kW) {
    VF e = vexp(vload(row + j) - vm);
    const auto keep = vmask_below<float>(iota, m - j);
    e = keep ? e : vsplat(0.0f);
    vstore(row + j, e);
    sum += e;
  }
  const VF inv = vsplat(1.0f / hsum<float>(sum));
  for (int64_t j = 0; j < mp; j += kW) vstore(row + j, vload(row + j) * inv);
}

// Per-thread float32 copies of one pair's rows (X, Y, U: round_up(n, 4) rows each), its logits and key terms.
struct Scratch {
  std::vector<float> x, y, u, logits, key, out;
  Scratch(int64_t n, int64_t s) {
    const int64_t n4 = (n + 3) / 4 * 4, ldl = std::max<int64_t>(16, (n4 + kW - 1) / kW * kW);
    x.resize(n4 * s);
    y.resize(n4 * s);
    u.resize(n4 * s);
    logits.resize(n4 * ldl);
    key.resize(n4);
    out.resize(2 * s);
  }
};

template <typename T>
ITM_SIMD_CLONES void sgr_pair(T* x, const T* yu, int64_t n, int64_t m, int64_t s, const float* c,
                              const float* bias, Scratch& w) {
  const int64_t m4 = (m + 3) / 4 * 4, ldl = std::max<int64_t>(16, (m4 + kW - 1) / kW * kW);
  for (int64_t j = 0; j < m; ++j) {
    widen_row(x + j * s, w.x.data() + j * s, s);
    widen_row(yu + j * 2 * s, w.y.data() + j * s, s);
    widen_row(yu + j * 2 * s + s, w.u.data() + j * s, s);
  }
  std::fill(w.x.begin() + m * s, w.x.begin() + m4 * s, 0.f);      // padding rows of the 4 x 4 blocks
  std::fill(w.y.begin() + m * s, w.y.begin() + m4 * s, 0.f);
  std::fill(w.u.begin() + m * s, w.u.begin() + m4 * s, 0.f);
  block_logits(w.y.data(), w.x.data(), m4, s, w.logits.data(), ldl);
  float* key = w.key.data();
  for (int64_t j = 0; j < m; ++j) {
    VF acc = vsplat(0.0f);
    for (int64_t k = 0; k < s; k += kW) acc += vload(c + k) * vload(w.x.data() + j * s + k);
    key[j] = hsum_tree<float>(acc);
  }
  for (int64_t i = 0; i < m4; ++i) {
    float* row = w.logits.data() + i * ldl;
    if (i >= m) {                                                    // a padding row: zero weights, never stored
      std::fill(row, row + ldl, 0.f);
      continue;
    }
    for (int64_t j = 0; j < m; ++j) row[j] += key[j];
    softmax_row(row, m);
  }
  for (int64_t i = 0; i < m; i += 2) {
    attend_two_rows(w.logits.data() + i * ldl, ldl, w.u.data(), m, s, bias, w.out.data(), w.out.data() + s);
    narrow_row(w.out.data(), x + i * s, s);
    if (i + 1 < m) narrow_row(w.out.data() + s, x + (i + 1) * s, s);
  }
  std::memset(static_cast<void*>(x + m * s), 0, (n - m) * s * sizeof(T));
}

void sgr_step_cpu(at::Tensor x, const at::Tensor& yu, const at::Tensor& c, const at::Tensor& bias,
                  const at::Tensor& node_counts) {
  TORCH_CHECK(x.device().is_cpu() && yu.device().is_cpu() && c.device().is_cpu() && bias.device().is_cpu() &&
                  node_counts.device().is_cpu(),
              "sgr_step_: every tensor must be on the CPU");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), "sgr_step_: x must be a contiguous (P, n, s) tensor, got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16,
              "sgr_step_: x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t P = x.size(0), n = x.size(1), s = x.size(2);
  TORCH_CHECK(s > 0 && s % kW == 0, "sgr_step_: the node size s must be a positive multiple of 16, got ", s);
  TORCH_CHECK(yu.scalar_type() == x.scalar_type() && yu.is_contiguous() && yu.dim() == 3 && yu.size(0) == P &&
                  yu.size(1) == n && yu.size(2) == 2 * s,
              "sgr_step_: yu must be a contiguous (", P, ", ", n, ", ", 2 * s, ") ", x.scalar_type(),
              " tensor, got ", yu.sizes(), " ", yu.scalar_type());
  auto check_vector = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 && t.size(0) == s,
                "sgr_step_: ", name, " must be a contiguous float32 (", s, ",) tensor, got ", t.sizes(), " ",
                t.scalar_type());
  };
  check_vector("c", c);
  check_vector("bias", bias);
  TORCH_CHECK(node_counts.scalar_type() == at::kLong && node_counts.dim() == 1 && node_counts.size(0) == P &&
                  node_counts.is_contiguous(),
              "sgr_step_: node_counts must be a contiguous int64 (", P, ",) tensor, got ", node_counts.sizes(), " ",
              node_counts.scalar_type());
  const int64_t* counts = node_counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(counts[p] >= 1 && counts[p] <= n, "sgr_step_: node_counts[", p, "] = ", counts[p],
                " is outside 1..", n);
  const float* cp = c.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  at::parallel_for(0, P, 8, [&](int64_t p0, int64_t p1) {
    Scratch w(n, s);
    for (int64_t p = p0; p < p1; ++p) {
      if (x.scalar_type() == at::kFloat)
        sgr_pair(x.data_ptr<float>() + p * n * s, yu.data_ptr<float>() + p * n * 2 * s, n, counts[p], s, cp, bp, w);
      else
        sgr_pair(x.data_ptr<c10::BFloat16>() + p * n * s, yu.data_ptr<c10::BFloat16>() + p * n * 2 * s, n,
                 counts[p], s, cp, bp, w);
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("sgr_step_(Tensor(a!) x, Tensor yu, Tensor c, Tensor bias, Tensor node_counts) -> ()");
}

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) { m.impl("sgr_step_", &sgr_step_cpu); }
