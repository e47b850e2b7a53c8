// The SIMD level the CPU epilogues run at, and why: chosen ONCE per process (csrc/common/isa.cpp) from what the CPU
// and this build support, capped by the ITM_KERNELS_ISA environment variable (avx512 | avx2 | baseline), read at
// the first kernel call or build_info(). Every SIMD function (common/simd_clones.h) dispatches on simd_level().
#pragma once
#include <atomic>

namespace itm {
namespace cpu {

// Ordered: a level runs on every CPU that runs a higher one.
enum class SimdLevel : int {
  kBaseline = 0,  // the portable code (x86-64 baseline: SSE2; aarch64: NEON), every build has it
  kAvx2 = 1,      // AVX2 + FMA (x86-64-v3's vector part)
  kAvx512 = 2,    // AVX-512 F/BW/VL/DQ (x86-64-v4's vector part)
};

namespace detail {
extern std::atomic<int> g_simd_level;  // -1 until chosen
SimdLevel choose_simd_level();
}  // namespace detail

// The level in use (one relaxed load after the first call).
inline SimdLevel simd_level() {
  const int v = detail::g_simd_level.load(std::memory_order_relaxed);
  return v >= 0 ? static_cast<SimdLevel>(v) : detail::choose_simd_level();
}

SimdLevel simd_cpu_level();            // the highest level this CPU and this build can run
const char* simd_level_name(SimdLevel);  // "avx512", "avx2", "baseline"
const char* simd_reason();             // why simd_level() is what it is (CPU detection, ITM_KERNELS_ISA, build)
const char* simd_dispatch();           // how this build picks the level: "runtime (x86 target attributes)", ...
bool simd_env_invalid();               // ITM_KERNELS_ISA set to something else than avx512 | avx2 | baseline

// Tests only: run the epilogues at `level` from now on (capped at simd_cpu_level()); returns the level set.
SimdLevel set_simd_level(SimdLevel level);

// AVX512-BF16 (vdpbf16ps) present and the level in use is AVX-512: bfloat16 products may run natively; otherwise
// every bfloat16 product of the kernels runs as float32 products of the exactly widened values.
bool native_bf16_dot();

}  // namespace cpu
}  // namespace itm
