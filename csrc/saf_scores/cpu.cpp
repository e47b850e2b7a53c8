// SGRAF attention filtration (SAF) and the final score on the CPU, fused, for inference:
//
// itm_kernels::saf_scores(x, node_counts, gate_w, gate_scale, gate_shift, eval_w, eval_b) -> (P,) float32: for every
// pair p (a graph of n node slots of s features, the first m_p of them valid), in one pass over its node rows
//   sigma_j = sigmoid(gate_scale * (gate_w . X_j) + gate_shift)      j < m_p  (Linear s -> 1, eval BatchNorm1d(1))
//   v       = sum_j sigma_j X_j / (sum_j sigma_j + 1e-8)              (the l1-normalised gate)
//   score   = sigmoid(eval_w . v / (|v| + 1e-8) + eval_b)              (l2norm, Linear s -> 1, sigmoid)
// with float32 accumulation. Slots j >= m_p are never read. The caller folds the gate's bias and the BatchNorm
// running statistics into gate_scale and gate_shift.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <vector>

#include "common/constants.h"
#include "common/simd_clones.h"
#include "common/simd_vec.h"

namespace {

using namespace itm::cpu::simd;
constexpr int kMaxW = Vec<float>::N;  // the widest vector's lanes: node sizes are multiples of it
constexpr float kEps = static_cast<float>(itm::kEps);
static_assert(kEps == 1e-8f, "the float32 eps of the SAF gate and l2norm");

ITM_INLINE float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

template <int W> ITM_INLINE float dot(const float* a, const float* b, int64_t s) {
  using VF = typename Vec<float, W>::V;
  constexpr int kW = Vec<float, W>::N;
  VF acc = vsplat<W>(0.0f);
  for (int64_t k = 0; k < s; k += kW) acc += vload<W>(a + k) * vload<W>(b + k);
  return hsum_tree(acc);
}

// One pair: x (m, s) valid node rows; v (s) scratch.
template <int W>
ITM_INLINE float saf_pair_impl(const float* x, int64_t m, int64_t s, const float* gate_w, float gate_scale,
                               float gate_shift, const float* eval_w, float eval_b, float* v) {
  using VF = typename Vec<float, W>::V;
  constexpr int kW = Vec<float, W>::N;
  for (int64_t k = 0; k < s; k += kW) vstore(v + k, vsplat<W>(0.0f));
  float total = 0.0f;
  for (int64_t j = 0; j < m; ++j) {
    const float* row = x + j * s;
    const float sigma = sigmoid(gate_scale * dot<W>(gate_w, row, s) + gate_shift);
    total += sigma;
    const VF vs = vsplat<W>(sigma);
    for (int64_t k = 0; k < s; k += kW) vstore(v + k, vload<W>(v + k) + vs * vload<W>(row + k));
  }
  const float inv_total = 1.0f / (total + kEps);
  VF sq = vsplat<W>(0.0f), ev = vsplat<W>(0.0f);
  for (int64_t k = 0; k < s; k += kW) {
    const VF vk = vload<W>(v + k) * vsplat<W>(inv_total);
    sq += vk * vk;
    ev += vk * vload<W>(eval_w + k);
  }
  return sigmoid(hsum_tree(ev) / (std::sqrt(hsum_tree(sq)) + kEps) + eval_b);
}
ITM_SIMD_FUNCTION(saf_pair, saf_pair_impl)

void check_vector(const char* name, const at::Tensor& t, int64_t s) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 &&
                  t.size(0) == s,
              "saf_scores: ", name, " must be a contiguous float32 (", s, ",) CPU tensor, got ", t.sizes(), " ",
              t.scalar_type(), " on ", t.device());
}

at::Tensor saf_scores_cpu(const at::Tensor& x, const at::Tensor& node_counts, const at::Tensor& gate_w,
                          double gate_scale, double gate_shift, const at::Tensor& eval_w, double eval_b) {
  TORCH_CHECK(x.device().is_cpu() && x.scalar_type() == at::kFloat && x.dim() == 3 && x.is_contiguous(),
              "saf_scores: x must be a contiguous float32 (P, n, s) CPU tensor, got ", x.sizes(), " ",
              x.scalar_type(), " on ", x.device());
  const int64_t P = x.size(0), n = x.size(1), s = x.size(2);
  TORCH_CHECK(s > 0 && s % kMaxW == 0, "saf_scores: the node size s must be a positive multiple of ", kMaxW, ", got ", s);
  TORCH_CHECK(node_counts.device().is_cpu() && node_counts.scalar_type() == at::kLong && node_counts.dim() == 1 &&
                  node_counts.size(0) == P && node_counts.is_contiguous(),
              "saf_scores: node_counts must be a contiguous int64 (", P, ",) CPU tensor, got ", node_counts.sizes(),
              " ", node_counts.scalar_type());
  check_vector("gate_w", gate_w, s);
  check_vector("eval_w", eval_w, s);
  TORCH_CHECK(std::isfinite(gate_scale) && std::isfinite(gate_shift) && std::isfinite(eval_b),
              "saf_scores: gate_scale, gate_shift and eval_b must be finite, got ", gate_scale, ", ", gate_shift,
              ", ", eval_b);
  const int64_t* counts = node_counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(counts[p] >= 1 && counts[p] <= n, "saf_scores: node_counts[", p, "] = ", counts[p],
                " is outside 1..", n);
  at::Tensor out = at::empty({P}, x.options());
  const float* xp = x.data_ptr<float>();
  const float *gw = gate_w.data_ptr<float>(), *ew = eval_w.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, P, 64, [&](int64_t p0, int64_t p1) {
    std::vector<float> v(s);
    for (int64_t p = p0; p < p1; ++p)
      op[p] = saf_pair(xp + p * n * s, counts[p], s, gw, static_cast<float>(gate_scale),
                       static_cast<float>(gate_shift), ew, static_cast<float>(eval_b), v.data());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("saf_scores(Tensor x, Tensor node_counts, Tensor gate_w, float gate_scale, float gate_shift, "
        "Tensor eval_w, float eval_b) -> Tensor");
}

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) { m.impl("saf_scores", &saf_scores_cpu); }
