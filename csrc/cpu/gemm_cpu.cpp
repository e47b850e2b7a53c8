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
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace itm {
namespace cpu {
const char* bf16_gemm_path();  // csrc/cpu/xattn_sim_cpu.cpp
}  // namespace cpu
}  // namespace itm

namespace {

constexpr int64_t kNb = 64;         // column block of the packed B
constexpr int64_t kRowChunk = 256;  // rows per brgemm call
constexpr int64_t kF32Chunk = 256;  // float32: inner-axis chunk summed separately

// Block j0 (width w = min(kNb, N - j0)) at offset j0 * K: float32 (K x w) row-major; bfloat16 (K/2 x w x 2).
template <typename T>
std::vector<T> pack_columns(const T* b, int64_t K, int64_t N) {
  std::vector<T> out(K * N);
  for (int64_t j0 = 0; j0 < N; j0 += kNb) {
    const int64_t w = std::min(kNb, N - j0);
    T* blk = out.data() + j0 * K;
    if constexpr (std::is_same_v<T, float>) {
      for (int64_t k = 0; k < K; ++k) std::memcpy(blk + k * w, b + k * N + j0, w * sizeof(float));
    } else {
      for (int64_t k2 = 0; k2 < K / 2; ++k2)
        for (int64_t n = 0; n < w; ++n)
          for (int r = 0; r < 2; ++r) blk[(k2 * w + n) * 2 + r] = b[(2 * k2 + r) * N + j0 + n];
    }
  }
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
  } else {
    TORCH_CHECK(K % 2 == 0, "brgemm_mm: bfloat16 needs an even inner size, got K = ", K);
    TORCH_CHECK(std::strcmp(itm::cpu::bf16_gemm_path(), "brgemm-vnni") == 0,
                "brgemm_mm: bfloat16 needs the brgemm-vnni GEMM path (an AVX-512-BF16 CPU); this machine has ",
                itm::cpu::bf16_gemm_path());
    run(a.data_ptr<c10::BFloat16>(), a.stride(0), b.data_ptr<c10::BFloat16>(), M, K, N, c.data_ptr<float>());
  }
  return c;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) { m.def("brgemm_mm(Tensor a, Tensor b) -> Tensor"); }

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) { m.impl("brgemm_mm", &brgemm_mm_cpu); }
