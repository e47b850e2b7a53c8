// SIMD code paths of the CPU epilogues: AVX-512 (F/BW/VL/DQ), AVX2 + FMA and baseline versions of each SIMD
// function, compiled from ONE body with per-function target attributes (gcc >= 8, clang >= 7; no target_clones,
// which gcc < 12 lacks for these targets and which cannot be forced from outside), and chosen per call by
// simd_level() (common/isa.h: CPU detection capped by ITM_KERNELS_ISA).
//
//   ITM_SIMD_FUNCTION(name, impl)  defines name(args...) = impl<W>(args...) at the level in use, W its register
//                                  width in bytes (kVecBytes: 64 zmm, 32 ymm, 16 xmm). Bodies build their vectors
//                                  and size their register blocks from W (common/simd_vec.h says why they must).
// impl must be an ITM_INLINE (always_inline) function template whose first template parameter is `int W` and whose
// arguments deduce the rest: it is inlined into each version and compiled for that version's target; everything
// it calls that is not inlined runs as baseline code. Non-x86 hosts, compilers without x86 target attributes and
// builds with -DITM_SIMD_NO_DISPATCH (setup.py: ITM_KERNELS_SIMD=baseline) get the baseline version alone.
#pragma once
#include <type_traits>
#include <utility>

#include "common/isa.h"
#include "common/simd_vec.h"

#if !defined(ITM_SIMD_NO_DISPATCH) && (defined(__x86_64__) || defined(_M_X64)) && \
    (defined(__GNUC__) || defined(__clang__))
#define ITM_SIMD_DISPATCH_X86 1
#define ITM_TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))
#define ITM_TARGET_AVX2 __attribute__((target("avx2,fma")))
#endif

namespace itm {
namespace cpu {
// The register width, in bytes, that the SIMD bodies use at each level.
template <SimdLevel L> constexpr int kVecBytes = L == SimdLevel::kAvx512 ? 64 : (L == SimdLevel::kAvx2 ? 32 : 16);
}  // namespace cpu
}  // namespace itm

#if defined(ITM_SIMD_DISPATCH_X86)
#define ITM_SIMD_FUNCTION(name, impl)                                                                                \
  template <class... A> ITM_TARGET_AVX512 decltype(auto) name##_avx512(A&&... a) {                                 \
    return impl<::itm::cpu::kVecBytes<::itm::cpu::SimdLevel::kAvx512>>(std::forward<A>(a)...);                     \
  }                                                                                                                \
  template <class... A> ITM_TARGET_AVX2 decltype(auto) name##_avx2(A&&... a) {                                     \
    return impl<::itm::cpu::kVecBytes<::itm::cpu::SimdLevel::kAvx2>>(std::forward<A>(a)...);                       \
  }                                                                                                                \
  template <class... A> decltype(auto) name##_baseline(A&&... a) {                                                 \
    return impl<::itm::cpu::kVecBytes<::itm::cpu::SimdLevel::kBaseline>>(std::forward<A>(a)...);                   \
  }                                                                                                                \
  template <class... A> inline decltype(auto) name(A&&... a) {                                                     \
    switch (::itm::cpu::simd_level()) {                                                                            \
      case ::itm::cpu::SimdLevel::kAvx512: return name##_avx512(std::forward<A>(a)...);                            \
      case ::itm::cpu::SimdLevel::kAvx2: return name##_avx2(std::forward<A>(a)...);                                \
      default: return name##_baseline(std::forward<A>(a)...);                                                      \
    }                                                                                                              \
  }
#else
#define ITM_SIMD_FUNCTION(name, impl)                                                                                \
  template <class... A> inline decltype(auto) name(A&&... a) {                                                     \
    return impl<::itm::cpu::kVecBytes<::itm::cpu::SimdLevel::kBaseline>>(std::forward<A>(a)...);                   \
  }
#endif
