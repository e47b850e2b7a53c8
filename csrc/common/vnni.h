// Packing of GEMM B operands for oneDNN's brgemm (through ATen's cpublas): ONE implementation for every CPU kernel
// (xattn_sim, local_sim, sgr_step, brgemm_mm).
//
// B (kdim x N) is stored in column blocks of nb: block j (columns [j nb, j nb + w), w = min(nb, N - j nb)) at
// offset j nb kdim, row-major (kdim x w) for float/double, VNNI ((kdim / 2) x w x 2: element (k, n) at
// ((k / 2) w + n) 2 + k % 2, kdim even) for bfloat16, the layout the AVX-512-BF16 microkernel reads. Rows
// [k0, k0 + kc) of a block start at offset k0 w.
#pragma once
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/simd_vec.h"

namespace itm {
namespace cpu {

template <class E> constexpr bool kVnni = std::is_same_v<E, c10::BFloat16>;

// B[k][n] = cols[n][k] for k < src_len, 0 beyond or where cols[n] is null (a padding column): the source rows
// become the columns of B.
template <class E>
ITM_INLINE void pack_cols_impl(E* out, const E* const* cols, int64_t n_cols, int64_t src_len, int64_t kdim,
                               int64_t nb) {
  constexpr int64_t kNB = 16, kKB = 64;
  for (int64_t j0 = 0; j0 < n_cols; j0 += nb) {
    const int64_t w = std::min(nb, n_cols - j0);
    E* o = out + j0 * kdim;
    for (int64_t n0 = 0; n0 < w; n0 += kNB) {
      const int64_t n1 = std::min(w, n0 + kNB);
      if constexpr (kVnni<E>) {
        const int64_t pairs = kdim / 2;
        for (int64_t p0 = 0; p0 < pairs; p0 += kKB) {
          const int64_t p1 = std::min(pairs, p0 + kKB);
          for (int64_t n = n0; n < n1; ++n) {
            const E* src = cols[j0 + n];
            for (int64_t p = p0; p < p1; ++p) {
              E* dst = o + (p * w + n) * 2;
              if (src && 2 * p + 1 < src_len) {
                std::memcpy(dst, src + 2 * p, 2 * sizeof(E));
              } else {
                dst[0] = (src && 2 * p < src_len) ? src[2 * p] : E(0);
                dst[1] = E(0);
              }
            }
          }
        }
      } else {
        for (int64_t k0 = 0; k0 < kdim; k0 += kKB) {
          const int64_t k1 = std::min(kdim, k0 + kKB);
          for (int64_t n = n0; n < n1; ++n) {
            const E* src = cols[j0 + n];
            for (int64_t k = k0; k < k1; ++k) o[k * w + n] = (src && k < src_len) ? src[k] : E(0);
          }
        }
      }
    }
  }
}

// out[2 n] = a[n], out[2 n + 1] = b[n] for n < 32 (16-bit elements).
ITM_INLINE void interleave32(const c10::BFloat16* a, const c10::BFloat16* b, c10::BFloat16* out) {
  typedef uint16_t U16x32 __attribute__((vector_size(64)));
  U16x32 x, y;
  std::memcpy(&x, a, sizeof(x));
  std::memcpy(&y, b, sizeof(y));
#if defined(__clang__) || (defined(__GNUC__) && __GNUC__ >= 12)
  const U16x32 lo = __builtin_shufflevector(x, y, 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 8, 40, 9,
                                            41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47);
  const U16x32 hi = __builtin_shufflevector(x, y, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21, 53, 22, 54, 23, 55,
                                            24, 56, 25, 57, 26, 58, 27, 59, 28, 60, 29, 61, 30, 62, 31, 63);
#else  // gcc < 12: __builtin_shuffle with index vectors (the same permutation)
  const U16x32 lo_idx = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                         8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const U16x32 hi_idx = lo_idx + 16;
  const U16x32 lo = __builtin_shuffle(x, y, lo_idx);
  const U16x32 hi = __builtin_shuffle(x, y, hi_idx);
#endif
  std::memcpy(out, &lo, sizeof(lo));
  std::memcpy(out + 32, &hi, sizeof(hi));
}

// B[k][n] = rows[k][n] for n < src_len, 0 beyond or where rows[k] is null (a padding row): the source rows are
// the rows of B (a row-major (kdim x N) matrix: rows[k] = b + k * N, src_len = N).
template <class E>
ITM_INLINE void pack_rows_impl(E* out, const E* const* rows, int64_t kdim, int64_t src_len, int64_t N, int64_t nb) {
  for (int64_t j0 = 0; j0 < N; j0 += nb) {
    const int64_t w = std::min(nb, N - j0);
    const int64_t valid = std::max<int64_t>(0, std::min(w, src_len - j0));
    E* o = out + j0 * kdim;
    if constexpr (kVnni<E>) {
      for (int64_t p = 0; p < kdim / 2; ++p) {
        const E* r0 = rows[2 * p];
        const E* r1 = rows[2 * p + 1];
        E* dst = o + p * w * 2;
        int64_t n = 0;
        if (r0 && r1)
          for (; n + 32 <= valid; n += 32) interleave32(r0 + j0 + n, r1 + j0 + n, dst + 2 * n);
        for (; n < valid; ++n) {
          dst[2 * n] = r0 ? r0[j0 + n] : E(0);
          dst[2 * n + 1] = r1 ? r1[j0 + n] : E(0);
        }
        std::fill(dst + 2 * valid, dst + 2 * w, E(0));
      }
    } else {
      for (int64_t k = 0; k < kdim; ++k) {
        E* dst = o + k * w;
        if (rows[k]) std::memcpy(dst, rows[k] + j0, valid * sizeof(E));
        else std::fill(dst, dst + valid, E(0));
        std::fill(dst + valid, dst + w, E(0));
      }
    }
  }
}

// A row-major (kdim x N) matrix b packed in column blocks of nb (kdim even for bfloat16).
template <class E> void pack_matrix(E* out, const E* b, int64_t kdim, int64_t N, int64_t nb) {
  std::vector<const E*> rows(kdim);
  for (int64_t k = 0; k < kdim; ++k) rows[k] = b + k * N;
  pack_rows_impl<E>(out, rows.data(), kdim, N, N, nb);
}

}  // namespace cpu
}  // namespace itm
