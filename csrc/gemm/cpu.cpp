// itm_kernels::brgemm_mm (CPU): C = A B with a float32 result through oneDNN's brgemm microkernel (the one the
// fused kernels use), parallel over chunks of rows.
//
// Why a GEMM of our own: on CPUs where PyTorch's float32 torch.mm runs MKL's AVX2 code (AMD), oneDNN's AVX-512
// brgemm multiplies about 2x faster (measured 223 vs 97 GFLOP/s on one Zen core). The benchmarks use it as the
// bare-GEMM yardstick (the faster of the two), and the SGRAF global branch multiplies with it.
//   A: (M, K) float32 or bfloat16, unit column stride, any row stride;  B: (K, N) same dtype, contiguous;
//   bfloat16 needs an even K and the brgemm-vnni path (an AVX-512-BF16 CPU).
// B is packed once per call into column blocks of 64 (bfloat16: VNNI pairs of rows), K x N elements of scratch.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <torch/library.h>

#include <algorithm>
#include <mutex>
#include <set>
#include <tuple>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/bf16_gemm.h"
#include "common/brgemm_shapes.h"
#include "common/isa.h"
#include "common/vnni.h"

// ------------------------------------------------------------------------------------------------------------------
// The ONE bfloat16 GEMM probe (common/bf16_gemm.h), run once per process on first use.
namespace itm {
namespace cpu {
namespace {

// Whether brgemm multiplies bf16 with B in the VNNI layout of common/vnni.h (oneDNN's AVX-512-BF16 ukernel),
// checked on a small exact product with a 16-row main part and a 3-row tail (the row split the local_sim kernel
// uses; the 3-row call alone is the shape the xattn_sim kernel's probe checked); else whether oneDNN's own packing
// works (AMX machines); else bfloat16 runs as float32 products.
Bf16Gemm probe_bf16_gemm() {
  using bf16 = c10::BFloat16;
  constexpr int64_t M = 19, Mmain = 16, N = 5, Kd = 8;
  std::vector<bf16> a(M * Kd), b(N * Kd), packed(Kd * N), plain(Kd * N);
  std::vector<float> ref(M * N, 0.f), c(M * N, -1.f);
  for (int64_t i = 0; i < M * Kd; ++i) a[i] = static_cast<float>((i * 7) % 11 - 5);
  for (int64_t i = 0; i < N * Kd; ++i) b[i] = static_cast<float>((i * 5) % 13 - 6) * 0.5f;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n)
      for (int64_t k = 0; k < Kd; ++k)
        ref[m * N + n] += static_cast<float>(a[m * Kd + k]) * static_cast<float>(b[n * Kd + k]);
  std::vector<const bf16*> cols(N);
  for (int64_t n = 0; n < N; ++n) cols[n] = b.data() + n * Kd;
  auto product = [&]() {
    at::native::cpublas::brgemm(Mmain, N, Kd, Kd, N, N, false, a.data(), packed.data(), c.data(), true);
    at::native::cpublas::brgemm(M - Mmain, N, Kd, Kd, N, N, false, a.data() + Mmain * Kd, packed.data(),
                                c.data() + Mmain * N, true);
    at::native::cpublas::brgemm_release(true);
    return c == ref;
  };
  try {
    pack_cols_impl<bf16>(packed.data(), cols.data(), N, Kd, Kd, N);
    if (product()) return Bf16Gemm::kVnni;
  } catch (...) {
  }
  try {
    if (at::native::cpublas::could_pack(at::kBFloat16)) {
      for (int64_t k = 0; k < Kd; ++k)
        for (int64_t n = 0; n < N; ++n) plain[k * N + n] = b[n * Kd + k];
      at::native::cpublas::pack(Kd, N, N, N, at::kBFloat16, at::kBFloat16, plain.data(), packed.data());
      std::fill(c.begin(), c.end(), -1.f);
      if (product()) return Bf16Gemm::kOneDnnPack;
    }
  } catch (...) {
  }
  return Bf16Gemm::kPlain;
}

}  // namespace

// kPlain wherever the CPU has no AVX512-BF16 or the SIMD level in use is below AVX-512 (ITM_KERNELS_ISA): every
// bfloat16 product then runs as float32 products of the exactly widened values, never an emulated bf16 GEMM.
Bf16Gemm bf16_gemm_kind() {
  if (!native_bf16_dot()) return Bf16Gemm::kPlain;
  static const Bf16Gemm kind = probe_bf16_gemm();
  return kind;
}

const char* bf16_gemm_path() {
  switch (bf16_gemm_kind()) {
    case Bf16Gemm::kVnni: return "brgemm-vnni";
    case Bf16Gemm::kOneDnnPack: return "brgemm-onednn-pack";
    default: return "gemm-fp32-accumulate";
  }
}

bool bf16_brgemm() { return bf16_gemm_kind() != Bf16Gemm::kPlain; }

// The brgemm shape count of common/brgemm_shapes.h.
std::atomic<bool> g_count_brgemm_shapes{false};
namespace {
using ShapeKey = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, bool, int, bool>;
std::mutex g_shapes_mutex;
std::set<ShapeKey> g_shapes;
}  // namespace

void record_brgemm_shape(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, int dtype,
                         bool vnni) {
  std::lock_guard<std::mutex> lock(g_shapes_mutex);
  g_shapes.emplace(M, N, K, lda, ldb, ldc, add, dtype, vnni);
}

int64_t brgemm_shape_count() {
  std::lock_guard<std::mutex> lock(g_shapes_mutex);
  return static_cast<int64_t>(g_shapes.size());
}

void reset_brgemm_shapes(bool count) {
  std::lock_guard<std::mutex> lock(g_shapes_mutex);
  g_shapes.clear();
  g_count_brgemm_shapes.store(count);
}

}  // namespace cpu
}  // namespace itm

namespace {

constexpr int64_t kNb = 64;         // column block of the packed B
constexpr int64_t kRowChunk = 256;  // rows per brgemm call
constexpr int64_t kF32Chunk = 256;  // float32: inner-axis chunk summed separately

// Block j0 (width w = min(kNb, N - j0)) at offset j0 * K: float32 (K x w) row-major; bfloat16 (K/2 x w x 2)
// (common/vnni.h).
template <typename T>
std::vector<T> pack_columns(const T* b, int64_t K, int64_t N) {
  std::vector<T> out(K * N);
  itm::cpu::pack_matrix<T>(out.data(), b, K, N, kNb);
  return out;
}

template <typename T>
void run(const T* a, int64_t lda, const T* b, int64_t M, int64_t K, int64_t N, float* c) {
  const std::vector<T> packed = pack_columns(b, K, N);
  constexpr bool vnni = std::is_same_v<T, c10::BFloat16>;
  at::parallel_for(0, (M + kRowChunk - 1) / kRowChunk, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> partial(vnni ? 0 : kRowChunk * kNb);
    for (int64_t q = c0; q < c1; ++q) {
      const int64_t r0 = q * kRowChunk, rows = std::min(kRowChunk, M - r0);
      for (int64_t j0 = 0; j0 < N; j0 += kNb) {
        const int64_t w = std::min(kNb, N - j0);
        const T* blk = packed.data() + j0 * K;
        float* out = c + r0 * N + j0;
        if (vnni || K <= kF32Chunk) {
          at::native::cpublas::brgemm(rows, w, K, lda, w, N, false, a + r0 * lda, blk, out, vnni);
          continue;
        }
        // float32: the microkernel sums the whole inner axis in one register chain per output; partial products
        // over chunks of kF32Chunk summed afterwards keep the rounding near MKL's (3x lower at K = 1024).
        for (int64_t k0 = 0; k0 < K; k0 += kF32Chunk) {
          const int64_t kc = std::min(kF32Chunk, K - k0);
          float* dst = k0 ? partial.data() : out;
          const int64_t ldd = k0 ? w : N;
          at::native::cpublas::brgemm(rows, w, kc, lda, w, ldd, false, a + r0 * lda + k0, blk + k0 * w, dst, false);
          if (k0)
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t n = 0; n < w; ++n) out[r * N + n] += partial[r * w + n];
        }
      }
    }
    if (vnni) at::native::cpublas::brgemm_release(true);
  });
}

at::Tensor brgemm_mm_cpu(const at::Tensor& a, const at::Tensor& b) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), "brgemm_mm: a and b must be CPU tensors");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16,
              "brgemm_mm: a must be float32 or bfloat16, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), "brgemm_mm: b must have a's dtype ", a.scalar_type(), ", got ",
              b.scalar_type());
  TORCH_CHECK(a.dim() == 2 && a.stride(1) == 1 && a.stride(0) >= std::max<int64_t>(1, a.size(1)),
              "brgemm_mm: a must be a 2-D tensor with unit column stride, got shape ", a.sizes(), " strides ",
              a.strides());
  TORCH_CHECK(b.dim() == 2 && b.is_contiguous() && b.size(0) == a.size(1),
              "brgemm_mm: b must be a contiguous (", a.size(1), ", N) tensor, got ", b.sizes());
  const int64_t M = a.size(0), K = a.size(1), N = b.size(1);
  TORCH_CHECK(M > 0 && K > 0 && N > 0, "brgemm_mm: empty operands (M = ", M, ", K = ", K, ", N = ", N, ")");
  at::Tensor c = at::empty({M, N}, a.options().dtype(at::kFloat));
  if (a.scalar_type() == at::kFloat) {
    run(a.data_ptr<float>(), a.stride(0), b.data_ptr<float>(), M, K, N, c.data_ptr<float>());
  } else if (K % 2 != 0 || std::strcmp(itm::cpu::bf16_gemm_path(), "brgemm-vnni") != 0) {
    // No native bfloat16 dot product (or an odd K the VNNI layout cannot pair): widen to float32 here (exact)
    // and run the float32 brgemm, never ATen's bfloat16 mm (a scalar fallback on AVX2 CPUs, 40-60x slower).
    const at::Tensor af = a.to(at::kFloat), bf = b.to(at::kFloat);
    run(af.data_ptr<float>(), af.stride(0), bf.data_ptr<float>(), M, K, N, c.data_ptr<float>());
  } else {
    run(a.data_ptr<c10::BFloat16>(), a.stride(0), b.data_ptr<c10::BFloat16>(), M, K, N, c.data_ptr<float>());
  }
  return c;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) { m.def("brgemm_mm(Tensor a, Tensor b) -> Tensor"); }

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) { m.impl("brgemm_mm", &brgemm_mm_cpu); }
