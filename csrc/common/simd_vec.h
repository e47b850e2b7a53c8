// 64-byte GCC vector types and their helpers (load/store, splat, horizontal sum/max, masks, a vectorised exp),
// shared by the CPU epilogues. Compiled in each SIMD clone of the functions that use them (see simd_clones.h).
#pragma once
#include <cstdint>
#include <cstring>

#define ITM_INLINE inline __attribute__((always_inline))

namespace itm {
namespace cpu {
namespace simd {
// 64-byte vectors (16 floats / 8 doubles); the compiler maps them onto zmm, 2 ymm or 4 xmm registers per clone.
template <class T> struct Vec;
template <> struct Vec<float> {
  typedef float V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
  static constexpr int N = 16;
};
template <> struct Vec<double> {
  typedef double V __attribute__((vector_size(64)));
  typedef int64_t I __attribute__((vector_size(64)));
  static constexpr int N = 8;
};

template <class T> ITM_INLINE typename Vec<T>::V vload(const T* p) {
  typename Vec<T>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class T> ITM_INLINE void vstore(T* p, typename Vec<T>::V v) { std::memcpy(p, &v, sizeof(v)); }
template <class T> ITM_INLINE typename Vec<T>::V vsplat(T x) {
  typename Vec<T>::V v = {};
  return v + x;
}
template <class T> ITM_INLINE typename Vec<T>::I viota() {
  typename Vec<T>::I v;
  for (int i = 0; i < Vec<T>::N; ++i) v[i] = i;
  return v;
}
template <class T> ITM_INLINE T hsum(typename Vec<T>::V v) {
  T s = 0;
  for (int i = 0; i < Vec<T>::N; ++i) s += v[i];
  return s;
}
template <class T> ITM_INLINE T hmax(typename Vec<T>::V v) {
  T m = v[0];
  for (int i = 1; i < Vec<T>::N; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
// Sum of the lanes by halving (log2 N dependent adds instead of N - 1): for many independent sums.
template <class T> ITM_INLINE T hsum_tree(typename Vec<T>::V v) {
  typedef T H __attribute__((vector_size(32)));
  typedef T Q __attribute__((vector_size(16)));
  H lo, hi;
  std::memcpy(&lo, &v, 32);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  H s8 = lo + hi;
  Q a, b;
  std::memcpy(&a, &s8, 16);
  std::memcpy(&b, reinterpret_cast<const char*>(&s8) + 16, 16);
  Q s4 = a + b;
  T r = 0;
  for (int i = 0; i < int(16 / sizeof(T)); ++i) r += s4[i];
  return r;
}
template <class V> ITM_INLINE V vmax(V a, V b) { return a > b ? a : b; }
template <class V> ITM_INLINE V vsqrt(V a) {
  for (int i = 0; i < int(sizeof(V) / sizeof(a[0])); ++i) a[i] = __builtin_sqrt(a[i]);
  return a;
}
// Lanes i < k (k > 0; k >= the width selects all).
template <class T> ITM_INLINE typename Vec<T>::I vmask_below(typename Vec<T>::I iota, int64_t k) {
  using E = decltype(iota[0] + 0);
  const E kk = (E)(k < Vec<T>::N ? k : Vec<T>::N);
  return iota < kk;
}

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (Cody-Waite split), exp(r) by its Taylor polynomial
// (degree 7 for float, 12 for double: truncation below 1e-8 resp. 2e-16 relative on |r| <= ln2 / 2). The input
// is clamped to the normal range, so exp of a very negative number is the smallest normal instead of 0 (only
// softmax weights below 1e-37 of the largest one change). Round-to-nearest by the 1.5 * 2^mantissa shifter; the
// shifted value's low bits hold n, moved into the exponent field by one integer shift.
ITM_INLINE Vec<float>::V vexp(Vec<float>::V x) {
  using V = Vec<float>::V;
  using I = Vec<float>::I;
  const V lo = vsplat(-87.0f), hi = vsplat(88.0f), shifter = vsplat(12582912.0f);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  V t = x * 1.44269504088896341f + shifter;
  V n = t - shifter;
  V r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  V p = vsplat(1.0f / 5040.0f);
  p = p * r + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  I bits = ((I)t << 23) + (127 << 23);
  return p * (V)bits;
}

ITM_INLINE Vec<double>::V vexp(Vec<double>::V x) {
  using V = Vec<double>::V;
  using I = Vec<double>::I;
  const V lo = vsplat(-708.0), hi = vsplat(709.0), shifter = vsplat(6755399441055744.0);
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  V t = x * 1.44269504088896338700e+00 + shifter;
  V n = t - shifter;
  V r = x - n * 6.93147180369123816490e-01;
  r = r - n * 1.90821492927058770002e-10;
  static constexpr double c[13] = {1.0,
                                   1.0,
                                   1.0 / 2,
                                   1.0 / 6,
                                   1.0 / 24,
                                   1.0 / 120,
                                   1.0 / 720,
                                   1.0 / 5040,
                                   1.0 / 40320,
                                   1.0 / 362880,
                                   1.0 / 3628800,
                                   1.0 / 39916800,
                                   1.0 / 479001600};
  V p = vsplat(c[12]);
  for (int k = 11; k >= 0; --k) p = p * r + c[k];
  I bits = ((I)t << 52) + ((int64_t)1023 << 52);
  return p * (V)bits;
}

}  // namespace simd
}  // namespace cpu
}  // namespace itm
