// SGRAF graph reasoning (SGR) on the CPU, fused, for inference:
//
// itm_kernels::sgr_step_: one whole SGR step in place, for every pair p (a graph of n node slots, the first m_p of
// them valid). Per chunk of pairs (about 256 valid node rows, copied together; padding slots never multiplied) one
// single-threaded GEMM [Y | U] = X [W_q^T W_k | W_g^T] into a float32 scratch that stays in L2, then per pair:
//   logits_ij = (Y_i + c) . X_j               (j < m_p; c = b_q W_k, the query bias folded onto the keys)
//   A_i       = softmax_j(logits_i)
//   X'_i      = ReLU(sum_j A_ij U_j + b_g)     (i < m_p; rows i >= m_p are set to zero)
// which equals the official ReLU(W_g (softmax(Q K^T) X) + b_g) because the rows of A sum to 1 and the query-side
// terms that do not depend on j cancel in the softmax. The pair's node rows are widened to float32 once, the
// logits are 4 x 4 (AVX-512) or 2 x 4 register blocks of dot products over s, the softmax is vectorised, and A U is
// an outer-product accumulation, 2 rows x 8 vectors (AVX-512) or 4 vectors of features at a time. Everything accumulates in float32 (bfloat16 nodes: the GEMM
// multiplies bfloat16 with a float32 result; only X' is rounded back to bfloat16).
//
// itm_kernels::sgr_global_attend: the last step's attention of the global node (node 0) over its pair's nodes,
// z0 = sum_j softmax_j(y0 . X_j) X_j in float32 (the caller forms y0 = X_0 W_q^T W_k + c and applies W_g).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/bf16.h"
#include "common/bf16_gemm.h"  // bf16_gemm_path(): "brgemm-vnni" where bf16 brgemm reads VNNI-packed B
#include "common/simd_clones.h"
#include "common/simd_vec.h"
#include "common/vnni.h"

namespace {

using namespace itm::cpu::simd;
constexpr int kMaxW = Vec<float>::N;  // the widest vector's lanes (16): node sizes and logits rows are multiples
constexpr int64_t kChunkRows = 256;
constexpr int64_t kNb = 64;  // GEMM column block

// float32 rows as they are; bfloat16 rows widened 16 at a time and stored back rounded to nearest even (NaN kept
// quiet), as c10::BFloat16 does (common/bf16.h); s % 16 == 0.
template <int W> ITM_INLINE void widen_row(const float* src, float* dst, int64_t s) { std::memcpy(dst, src, s * sizeof(float)); }
template <int W> ITM_INLINE void widen_row(const c10::BFloat16* src, float* dst, int64_t s) {
  constexpr int kW = Vec<float, W>::N;
  for (int64_t k = 0; k < s; k += kW) vstore(dst + k, widen_bf16<W>(src + k));
}
template <int W> ITM_INLINE void narrow_row(const float* src, float* dst, int64_t s) { std::memcpy(dst, src, s * sizeof(float)); }
template <int W> ITM_INLINE void narrow_row(const float* src, c10::BFloat16* dst, int64_t s) {
  constexpr int kW = Vec<float, W>::N;
  for (int64_t k = 0; k < s; k += kW) narrow_bf16<W>(dst + k, vload<W>(src + k));
}

// logits (m4 x ldl) = Y X^T for m4 = round_up(m, 4) rows of Y and X (s features, s % 16 == 0; rows >= m zero).
// Blocks of BA x 4 dot products: 16 accumulators in 32 zmm, 8 in 16 ymm / xmm.
template <int W>
ITM_INLINE void block_logits(const float* Y, const float* X, int64_t m4, int64_t s, float* logits, int64_t ldl) {
  using VF = typename Vec<float, W>::V;
  constexpr int kW = Vec<float, W>::N;
  constexpr int BA = W == 64 ? 4 : 2;
  for (int64_t i0 = 0; i0 < m4; i0 += BA) {
    for (int64_t j0 = 0; j0 < m4; j0 += 4) {
      VF acc[BA][4];
      for (int a = 0; a < BA; ++a)
        for (int b = 0; b < 4; ++b) acc[a][b] = vsplat<W>(0.0f);
      for (int64_t k = 0; k < s; k += kW) {
        VF y[BA], x[4];
        for (int a = 0; a < BA; ++a) y[a] = vload<W>(Y + (i0 + a) * s + k);
        for (int b = 0; b < 4; ++b) x[b] = vload<W>(X + (j0 + b) * s + k);
        for (int a = 0; a < BA; ++a)
          for (int b = 0; b < 4; ++b) acc[a][b] += y[a] * x[b];
      }
      for (int a = 0; a < BA; ++a)
        for (int b = 0; b < 4; ++b) logits[(i0 + a) * ldl + j0 + b] = hsum_tree(acc[a][b]);
    }
  }
}

// out rows i, i + 1 (s features) = ReLU(sum_{j < m} A[i][j] U_j + bias); A rows have stride lda, U rows ldu.
template <int W>
ITM_INLINE void attend_two_rows(const float* A, int64_t lda, const float* U, int64_t ldu, int64_t m, int64_t s,
                                const float* bias, float* out0, float* out1) {
  using VF = typename Vec<float, W>::V;
  constexpr int kW = Vec<float, W>::N;
  constexpr int kC = W == 64 ? 8 : 4;  // vectors per pass: 2 kC accumulators (16 of 32 zmm; 8 of 16 ymm / xmm)
  for (int64_t k0 = 0; k0 < s; k0 += kC * kW) {
    const int nv = static_cast<int>(std::min<int64_t>(kC, (s - k0) / kW));
    VF acc0[kC], acc1[kC];
    for (int v = 0; v < kC; ++v) acc0[v] = acc1[v] = vsplat<W>(0.0f);
    for (int64_t j = 0; j < m; ++j) {
      const VF a0 = vsplat<W>(A[j]), a1 = vsplat<W>(A[lda + j]);
      const float* u = U + j * ldu + k0;
      for (int v = 0; v < nv; ++v) {
        const VF uj = vload<W>(u + v * kW);
        acc0[v] += a0 * uj;
        acc1[v] += a1 * uj;
      }
    }
    const VF zero = vsplat<W>(0.0f);
    for (int v = 0; v < nv; ++v) {
      const VF b = vload<W>(bias + k0 + v * kW);
      vstore(out0 + k0 + v * kW, vmax(acc0[v] + b, zero));
      vstore(out1 + k0 + v * kW, vmax(acc1[v] + b, zero));
    }
  }
}

// Row softmax of logits[i][0..m) in place (ldl >= round_up(m, 16)); padding lanes get weight 0.
template <int W> ITM_INLINE void softmax_row(float* row, int64_t m) {
  using VF = typename Vec<float, W>::V;
  constexpr int kW = Vec<float, W>::N;
  const int64_t mp = (m + kW - 1) / kW * kW;
  for (int64_t j = m; j < mp; ++j) row[j] = row[0];
  VF mx = vload<W>(row);
  for (int64_t j = kW; j < mp; j += kW) mx = vmax(mx, vload<W>(row + j));
  const VF vm = vsplat<W>(hmax(mx));
  const auto iota = viota<W, float>();
  VF sum = vsplat<W>(0.0f);
  for (int64_t j = 0; j < mp; j += kW) {
    VF e = vexp(vload<W>(row + j) - vm);
    const auto keep = vmask_below(iota, m - j);
    e = keep ? e : vsplat<W>(0.0f);
    vstore(row + j, e);
    sum += e;
  }
  const VF inv = vsplat<W>(1.0f / hsum(sum));
  for (int64_t j = 0; j < mp; j += kW) vstore(row + j, vload<W>(row + j) * inv);
}

// Per-thread scratch: float32 copies of one pair's X and Y + c rows (round_up(n, 4) rows each, for the 4 x 4
// blocks), its logits, two output rows, and the [Y | U] GEMM result of a chunk of pairs.
struct Scratch {
  std::vector<float> x, y, logits, out, yu;
  Scratch(int64_t n, int64_t s, int64_t chunk_rows) {
    const int64_t n4 = (n + 3) / 4 * 4, ldl = std::max<int64_t>(16, (n4 + kMaxW - 1) / kMaxW * kMaxW);
    x.resize(n4 * s);
    y.resize(n4 * s);
    logits.resize(n4 * ldl);
    out.resize(2 * s);
    yu.resize(chunk_rows * 2 * s);
  }
};

// One pair: x (n, s) nodes in place, yu (n, 2 s) float32 [Y | U] of its nodes.
template <int W, typename T>
ITM_INLINE void sgr_pair_impl(T* x, const float* yu, int64_t n, int64_t m, int64_t s, const float* c,
                              const float* bias, Scratch& w) {
  constexpr int kW = Vec<float, W>::N;
  const int64_t m4 = (m + 3) / 4 * 4, ldl = std::max<int64_t>(16, (m4 + kMaxW - 1) / kMaxW * kMaxW);
  for (int64_t j = 0; j < m; ++j) {
    widen_row<W>(x + j * s, w.x.data() + j * s, s);
    float* y = w.y.data() + j * s;
    const float* yj = yu + j * 2 * s;
    for (int64_t k = 0; k < s; k += kW) vstore(y + k, vload<W>(yj + k) + vload<W>(c + k));   // (Y_i + c) . X_j
  }
  std::fill(w.x.begin() + m * s, w.x.begin() + m4 * s, 0.f);      // padding rows of the 4 x 4 blocks
  std::fill(w.y.begin() + m * s, w.y.begin() + m4 * s, 0.f);
  block_logits<W>(w.y.data(), w.x.data(), m4, s, w.logits.data(), ldl);
  for (int64_t i = 0; i < m4; ++i) {
    float* row = w.logits.data() + i * ldl;
    if (i >= m) {                                                    // a padding row: zero weights, never stored
      std::fill(row, row + ldl, 0.f);
      continue;
    }
    softmax_row<W>(row, m);
  }
  for (int64_t i = 0; i < m; i += 2) {
    // An odd last row pairs with the zero row m (its softmax row is all zero); only row i is stored.
    attend_two_rows<W>(w.logits.data() + i * ldl, ldl, yu + s, 2 * s, m, s, bias, w.out.data(), w.out.data() + s);
    narrow_row<W>(w.out.data(), x + i * s, s);
    if (i + 1 < m) narrow_row<W>(w.out.data() + s, x + (i + 1) * s, s);
  }
  std::memset(static_cast<void*>(x + m * s), 0, (n - m) * s * sizeof(T));
}
ITM_SIMD_FUNCTION(sgr_pair, sgr_pair_impl)

// [W_q^T W_k | W_g^T] (s, 2 s) packed for brgemm in column blocks of kNb: float32 row-major (s x kNb) blocks;
// bfloat16 VNNI (s/2 x kNb x 2) blocks, the layout oneDNN's AVX-512-BF16 microkernel reads.
template <typename T> std::vector<T> pack_pg(const T* pg, int64_t s) {
  std::vector<T> out(s * 2 * s);
  itm::cpu::pack_matrix<T>(out.data(), pg, s, 2 * s, kNb);
  return out;
}

// yu (rows, 2 s) float32 = x (rows, s) @ pg, single-threaded, one brgemm per column block.
template <typename T>
void chunk_gemm(const T* x, const T* packed, int64_t rows, int64_t s, float* yu) {
  constexpr bool vnni = std::is_same_v<T, c10::BFloat16>;
  for (int64_t j0 = 0; j0 < 2 * s; j0 += kNb)
    at::native::cpublas::brgemm(rows, kNb, s, s, kNb, 2 * s, false, x, packed + j0 * s, yu + j0, vnni);
}

// z0 = sum_{j < m} softmax_j(y0 . X_j) X_j: the last step's attention of the global node over its pair's nodes.
template <int W, typename T>
ITM_INLINE void global_attend_pair_impl(const T* x, const float* y0, int64_t m, int64_t s, float* z0,
                                        std::vector<float>& rows, std::vector<float>& logits) {
  using VF = typename Vec<float, W>::V;
  constexpr int kW = Vec<float, W>::N;
  const float* X = nullptr;
  if constexpr (std::is_same_v<T, float>) {
    X = x;
  } else {
    for (int64_t j = 0; j < m; ++j) widen_row<W>(x + j * s, rows.data() + j * s, s);
    X = rows.data();
  }
  for (int64_t j = 0; j < m; ++j) {
    VF acc = vsplat<W>(0.0f);
    for (int64_t k = 0; k < s; k += kW) acc += vload<W>(y0 + k) * vload<W>(X + j * s + k);
    logits[j] = hsum_tree(acc);
  }
  softmax_row<W>(logits.data(), m);
  for (int64_t k = 0; k < s; k += kW) {
    VF acc = vsplat<W>(0.0f);
    for (int64_t j = 0; j < m; ++j) acc += vsplat<W>(logits[j]) * vload<W>(X + j * s + k);
    vstore(z0 + k, acc);
  }
}
ITM_SIMD_FUNCTION(global_attend_pair, global_attend_pair_impl)

void check_nodes(const char* op, const at::Tensor& x, const at::Tensor& node_counts) {
  TORCH_CHECK(x.device().is_cpu() && node_counts.device().is_cpu(), op, ": every tensor must be on the CPU");
  TORCH_CHECK(x.dim() == 3 && x.is_contiguous(), op, ": x must be a contiguous (P, n, s) tensor, got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, op,
              ": x must be float32 or bfloat16, got ", x.scalar_type());
  const int64_t P = x.size(0), n = x.size(1), s = x.size(2);
  TORCH_CHECK(P >= 1 && n >= 1, op, ": x must hold at least one pair (P >= 1) of at least one node (n >= 1), got "
              "shape ", x.sizes());
  TORCH_CHECK(s > 0 && s % kNb == 0, op, ": the node size s must be a positive multiple of 64, got ", s);
  TORCH_CHECK(node_counts.scalar_type() == at::kLong && node_counts.dim() == 1 && node_counts.size(0) == P &&
                  node_counts.is_contiguous(),
              op, ": node_counts must be a contiguous int64 (", P, ",) tensor, got ", node_counts.sizes(), " ",
              node_counts.scalar_type());
  const int64_t* counts = node_counts.data_ptr<int64_t>();
  for (int64_t p = 0; p < P; ++p)
    TORCH_CHECK(counts[p] >= 1 && counts[p] <= n, op, ": node_counts[", p, "] = ", counts[p], " is outside 1..",
                n);
}

at::Tensor sgr_global_attend_cpu(const at::Tensor& x, const at::Tensor& y0, const at::Tensor& node_counts) {
  check_nodes("sgr_global_attend", x, node_counts);
  const int64_t P = x.size(0), n = x.size(1), s = x.size(2);
  TORCH_CHECK(y0.device().is_cpu() && y0.scalar_type() == at::kFloat && y0.is_contiguous() && y0.dim() == 2 &&
                  y0.size(0) == P && y0.size(1) == s,
              "sgr_global_attend: y0 must be a contiguous float32 (", P, ", ", s, ") CPU tensor, got ", y0.sizes(),
              " ", y0.scalar_type());
  at::Tensor z0 = at::empty({P, s}, y0.options());
  const int64_t* counts = node_counts.data_ptr<int64_t>();
  const float* yp = y0.data_ptr<float>();
  float* zp = z0.data_ptr<float>();
  at::parallel_for(0, P, 16, [&](int64_t p0, int64_t p1) {
    std::vector<float> rows(n * s), logits((n + kMaxW - 1) / kMaxW * kMaxW);
    for (int64_t p = p0; p < p1; ++p) {
      if (x.scalar_type() == at::kFloat)
        global_attend_pair(x.data_ptr<float>() + p * n * s, yp + p * s, counts[p], s, zp + p * s, rows, logits);
      else
        global_attend_pair(x.data_ptr<c10::BFloat16>() + p * n * s, yp + p * s, counts[p], s, zp + p * s, rows,
                           logits);
    }
  });
  return z0;
}

void sgr_step_cpu(at::Tensor x, const at::Tensor& pg, const at::Tensor& c, const at::Tensor& bias,
                  const at::Tensor& node_counts) {
  check_nodes("sgr_step_", x, node_counts);
  const int64_t P = x.size(0), n = x.size(1), s = x.size(2);
  TORCH_CHECK(pg.device().is_cpu() && c.device().is_cpu() && bias.device().is_cpu(),
              "sgr_step_: every tensor must be on the CPU");
  TORCH_CHECK(pg.scalar_type() == x.scalar_type() && pg.is_contiguous() && pg.dim() == 2 && pg.size(0) == s &&
                  pg.size(1) == 2 * s,
              "sgr_step_: pg must be a contiguous (", s, ", ", 2 * s, ") ", x.scalar_type(), " tensor, got ",
              pg.sizes(), " ", pg.scalar_type());
  auto check_vector = [&](const char* name, const at::Tensor& t) {
    TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.dim() == 1 && t.size(0) == s,
                "sgr_step_: ", name, " must be a contiguous float32 (", s, ",) tensor, got ", t.sizes(), " ",
                t.scalar_type());
  };
  check_vector("c", c);
  check_vector("bias", bias);
  const int64_t* counts = node_counts.data_ptr<int64_t>();
  const float* cp = c.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  // Chunks of consecutive pairs with about 256 valid node rows in all, so that [Y | U] (256 x 2 s float32, 512 KiB
  // at s = 256) stays in L2; only valid rows enter the GEMM (bucketed node slots beyond a pair's count are skipped).
  std::vector<int64_t> starts{0}, rows_before(P + 1, 0);
  for (int64_t p = 0, rows = 0; p < P; ++p) {
    if (rows > 0 && rows + counts[p] > kChunkRows) {
      starts.push_back(p);
      rows = 0;
    }
    rows += counts[p];
    rows_before[p + 1] = rows_before[p] + counts[p];
  }
  starts.push_back(P);
  const int64_t max_rows = std::max<int64_t>(kChunkRows, n);
  auto run = [&](auto* xp, const auto& packed) {
    using T = std::remove_pointer_t<decltype(xp)>;
    at::parallel_for(0, static_cast<int64_t>(starts.size()) - 1, 1, [&](int64_t c0, int64_t c1) {
      Scratch w(n, s, max_rows);
      std::vector<T> stage(max_rows * s);
      for (int64_t q = c0; q < c1; ++q) {
        const int64_t p0 = starts[q], p1 = starts[q + 1], base = rows_before[p0];
        for (int64_t p = p0; p < p1; ++p)            // the chunk's valid rows, contiguous
          std::memcpy(stage.data() + (rows_before[p] - base) * s, xp + p * n * s, counts[p] * s * sizeof(T));
        chunk_gemm(stage.data(), packed.data(), rows_before[p1] - base, s, w.yu.data());
        for (int64_t p = p0; p < p1; ++p)
          sgr_pair(xp + p * n * s, w.yu.data() + (rows_before[p] - base) * 2 * s, n, counts[p], s, cp, bp, w);
      }
      if (x.scalar_type() == at::kBFloat16) at::native::cpublas::brgemm_release(true);
    });
  };
  if (x.scalar_type() == at::kFloat) {
    run(x.data_ptr<float>(), pack_pg(pg.data_ptr<float>(), s));
  } else {
    TORCH_CHECK(std::strcmp(itm::cpu::bf16_gemm_path(), "brgemm-vnni") == 0,
                "sgr_step_: bfloat16 needs the brgemm-vnni GEMM path (an AVX-512-BF16 CPU); this machine has ",
                itm::cpu::bf16_gemm_path());
    run(x.data_ptr<c10::BFloat16>(), pack_pg(pg.data_ptr<c10::BFloat16>(), s));
  }
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("sgr_step_(Tensor(a!) x, Tensor pg, Tensor c, Tensor bias, Tensor node_counts) -> ()");
  m.def("sgr_global_attend(Tensor x, Tensor y0, Tensor node_counts) -> Tensor");
}

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) {
  m.impl("sgr_step_", &sgr_step_cpu);
  m.impl("sgr_global_attend", &sgr_global_attend_cpu);
}
