// GCC vector types of W bytes and their helpers (load/store, splat, horizontal sum/max, masks, a vectorised exp),
// shared by the CPU epilogues. Compiled in each SIMD version of the functions that use them (see simd_clones.h).
//
// W is the register width of the version in use: 64 bytes (zmm) for AVX-512, 32 (ymm) for AVX2 and 16 (xmm) for the
// baseline (kVecBytes<level>). A vector wider than the target's registers is not split into registers by GCC: it
// lives in memory and every operation goes through the stack (measured: the AVX2 xattn epilogue on 64-byte vectors
// ran 7x slower than on 32-byte ones), so every SIMD body takes W from its level and never uses a wider vector.
// Helpers take W explicitly where nothing deduces it (vload<W>, vsplat<W, T>, viota<W, T>) and deduce the vector
// type otherwise (hsum, hmax, hsum_tree, vmask_below, vexp).
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#define ITM_INLINE inline __attribute__((always_inline))

namespace itm {
namespace cpu {
namespace simd {
constexpr int kMaxVecBytes = 64;

// A vector of B bytes of T (a namespace-scope typedef: GCC drops a dependent vector_size on a local one).
template <class T, int B> struct VecOf {
  typedef T V __attribute__((vector_size(B)));
};

template <class T, int W = kMaxVecBytes> struct Vec {
  static_assert(W == 16 || W == 32 || W == 64, "vector width");
  typedef typename VecOf<T, W>::V V;
  typedef typename VecOf<std::conditional_t<sizeof(T) == 4, int32_t, int64_t>, W>::V I;
  static constexpr int N = W / static_cast<int>(sizeof(T));
};

// The element type and the lane count of a vector type V.
template <class V> using elem_t = std::remove_cv_t<std::remove_reference_t<decltype(std::declval<V&>()[0])>>;
template <class V> constexpr int lanes = static_cast<int>(sizeof(V) / sizeof(elem_t<V>));

template <int W = kMaxVecBytes, class T> ITM_INLINE typename Vec<T, W>::V vload(const T* p) {
  typename Vec<T, W>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <class V> ITM_INLINE void vstore(elem_t<V>* p, V v) { std::memcpy(p, &v, sizeof(v)); }
template <int W, class T> ITM_INLINE typename Vec<T, W>::V vsplat(T x) {
  typename Vec<T, W>::V v = {};
  return v + x;
}
template <int W, class T> ITM_INLINE typename Vec<T, W>::I viota() {
  typename Vec<T, W>::I v;
  for (int i = 0; i < Vec<T, W>::N; ++i) v[i] = i;
  return v;
}
template <class V> ITM_INLINE elem_t<V> hsum(V v) {
  elem_t<V> s = 0;
  for (int i = 0; i < lanes<V>; ++i) s += v[i];
  return s;
}
template <class V> ITM_INLINE elem_t<V> hmax(V v) {
  elem_t<V> m = v[0];
  for (int i = 1; i < lanes<V>; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
// Sum of the lanes by halving down to 16 bytes (log2 N dependent adds instead of N - 1): for many independent sums.
template <class V> ITM_INLINE elem_t<V> hsum_tree(V v) {
  using E = elem_t<V>;
  if constexpr (sizeof(V) > 16) {
    typedef typename Vec<E, static_cast<int>(sizeof(V) / 2)>::V H;
    H lo, hi;
    std::memcpy(&lo, &v, sizeof(H));
    std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof(H), sizeof(H));
    return hsum_tree(lo + hi);
  } else {
    E r = 0;
    for (int i = 0; i < lanes<V>; ++i) r += v[i];
    return r;
  }
}
template <class V> ITM_INLINE V vmax(V a, V b) { return a > b ? a : b; }
template <class V> ITM_INLINE V vsqrt(V a) {
  for (int i = 0; i < lanes<V>; ++i) a[i] = __builtin_sqrt(a[i]);
  return a;
}
// Lanes i < k (k > 0; k >= the width selects all), for an iota of viota<W, T>().
template <class I> ITM_INLINE I vmask_below(I iota, int64_t k) {
  using E = elem_t<I>;
  const E kk = static_cast<E>(k < lanes<I> ? k : lanes<I>);
  return iota < kk;
}

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (Cody-Waite split), exp(r) by its Taylor polynomial
// (degree 7 for float, 12 for double: truncation below 1e-8 resp. 2e-16 relative on |r| <= ln2 / 2). The input
// is clamped to the normal range, so exp of a very negative number is the smallest normal instead of 0 (only
// softmax weights below 1e-37 of the largest one change). Round-to-nearest by the 1.5 * 2^mantissa shifter; the
// shifted value's low bits hold n, moved into the exponent field by one integer shift.
template <class V> ITM_INLINE V vexp(V x) {
  using E = elem_t<V>;
  constexpr int W = static_cast<int>(sizeof(V));
  using I = typename Vec<E, W>::I;
  if constexpr (sizeof(E) == 4) {
    const V lo = vsplat<W>(-87.0f), hi = vsplat<W>(88.0f), shifter = vsplat<W>(12582912.0f);
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    V t = x * 1.44269504088896341f + shifter;
    V n = t - shifter;
    V r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    V p = vsplat<W>(1.0f / 5040.0f);
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    I bits = ((I)t << 23) + (127 << 23);
    return p * (V)bits;
  } else {
    const V lo = vsplat<W>(-708.0), hi = vsplat<W>(709.0), shifter = vsplat<W>(6755399441055744.0);
    x = x < lo ? lo : x;
    x = x > hi ? hi : x;
    V t = x * 1.44269504088896338700e+00 + shifter;
    V n = t - shifter;
    V r = x - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    constexpr double c[13] = {1.0,
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
    V p = vsplat<W>(c[12]);
    for (int k = 11; k >= 0; --k) p = p * r + c[k];
    I bits = ((I)t << 52) + ((int64_t)1023 << 52);
    return p * (V)bits;
  }
}

}  // namespace simd
}  // namespace cpu
}  // namespace itm
