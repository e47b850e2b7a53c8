// bfloat16 <-> float32 conversions for the CPU kernels: ONE widening and ONE narrowing, used by every kernel that
// reads or writes bfloat16 (xattn_sim, local_sim, sgr_step). Exact widening (the 16 bits shifted into the high half
// of a float32); narrowing rounds to nearest even with NaN kept quiet (0x7fc0), bit for bit as c10::BFloat16(float).
// ITM_INLINE, so that each SIMD clone of a caller (simd_clones.h) compiles them for its own target.
#pragma once
#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#include "common/simd_vec.h"

namespace itm {
namespace cpu {
namespace simd {

// W / 4 bfloat16 values widened to one float32 vector of W bytes.
template <int W> ITM_INLINE typename Vec<float, W>::V widen_bf16(const c10::BFloat16* p) {
  typedef typename VecOf<uint16_t, W / 2>::V U16;
  typedef typename VecOf<uint32_t, W>::V U32;
  U16 h;
  std::memcpy(&h, p, sizeof(h));
  const U32 u = __builtin_convertvector(h, U32) << 16;
  typename Vec<float, W>::V v;
  std::memcpy(&v, &u, sizeof(v));
  return v;
}

// One float32 vector of W bytes rounded to W / 4 bfloat16 values (round to nearest even, NaN -> 0x7fc0).
template <int W> ITM_INLINE void narrow_bf16(c10::BFloat16* p, typename Vec<float, W>::V v) {
  typedef typename VecOf<uint16_t, W / 2>::V U16;
  typedef typename VecOf<uint32_t, W>::V U32;
  U32 u;
  std::memcpy(&u, &v, sizeof(u));
  U32 r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const U32 nan = (U32)(v != v);
  r = (r & ~nan) | (0x7fc0u & nan);
  const U16 h = __builtin_convertvector(r, U16);
  std::memcpy(p, &h, sizeof(h));
}

// Scalar widening: bfloat16 -> float, every other type unchanged.
template <class T> ITM_INLINE T widen(T x) { return x; }
ITM_INLINE float widen(c10::BFloat16 x) { return static_cast<float>(x); }

}  // namespace simd
}  // namespace cpu
}  // namespace itm
