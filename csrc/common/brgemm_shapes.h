// oneDNN brgemm through ATen's cpublas, with an optional count of the distinct shapes the kernels ask for (oneDNN
// JIT-compiles and caches one kernel per shape per thread for the life of the process, so a kernel that passes
// ragged shapes grows that cache without bound). Counting is off unless a test turns it on (_C._brgemm_shapes).
#pragma once
#include <ATen/native/CPUBlas.h>

#include <atomic>
#include <cstdint>

namespace itm {
namespace cpu {

extern std::atomic<bool> g_count_brgemm_shapes;
void record_brgemm_shape(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, int dtype,
                         bool vnni);
int64_t brgemm_shape_count();  // distinct shapes recorded since the last reset
void reset_brgemm_shapes(bool count);

template <class E>
inline void brgemm_counted(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add,
                           const E* A, const E* B, float* C, bool vnni) {
  if (g_count_brgemm_shapes.load(std::memory_order_relaxed))
    record_brgemm_shape(M, N, K, lda, ldb, ldc, add, static_cast<int>(sizeof(E)), vnni);
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, A, B, C, vnni);
}

}  // namespace cpu
}  // namespace itm
