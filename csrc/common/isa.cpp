// The SIMD level of the CPU epilogues (common/isa.h): CPU detection, the ITM_KERNELS_ISA override, and the matching
// cap of oneDNN's brgemm (ONEDNN_MAX_CPU_ISA) set when this library loads.
#include "common/isa.h"

#include <cctype>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>

#include "common/simd_clones.h"

#if defined(ITM_SIMD_DISPATCH_X86)
#include <cpuid.h>
#endif
#if !defined(_WIN32)
#include <sys/utsname.h>
#endif

namespace itm {
namespace cpu {
namespace detail {
std::atomic<int> g_simd_level{-1};
}  // namespace detail

namespace {

std::mutex g_mutex;
std::string g_reason;  // guarded by g_mutex once chosen; read after g_simd_level is set
bool g_env_invalid = false;

#if defined(ITM_SIMD_DISPATCH_X86)
bool cpu_avx512() {
  __builtin_cpu_init();
  // libgcc / compiler-rt report a feature only where the OS saves its register state (XCR0).
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx2") &&
         __builtin_cpu_supports("fma");
}
bool cpu_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
// CPUID.(EAX=7, ECX=1):EAX bit 5: AVX512_BF16 (vcvtneps2bf16, vdpbf16ps).
bool cpu_avx512_bf16() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
  return (a >> 5) & 1u;
}
#endif

SimdLevel detect() {
#if defined(ITM_SIMD_DISPATCH_X86)
  if (cpu_avx512()) return SimdLevel::kAvx512;
  if (cpu_avx2()) return SimdLevel::kAvx2;
#endif
  return SimdLevel::kBaseline;
}

const char* cpu_words(SimdLevel l) {
  switch (l) {
    case SimdLevel::kAvx512: return "AVX-512 F/BW/VL/DQ";
    case SimdLevel::kAvx2: return "AVX2 + FMA, no AVX-512";
    default: return "neither AVX2 + FMA nor AVX-512";
  }
}

// -1: unset or "auto"; -2: not understood.
int parse_env(const char* v) {
  if (!v || !*v) return -1;
  std::string s(v);
  for (char& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  if (s == "auto" || s == "native") return -1;
  if (s == "avx512" || s == "avx-512" || s == "x86-64-v4") return static_cast<int>(SimdLevel::kAvx512);
  if (s == "avx2" || s == "x86-64-v3") return static_cast<int>(SimdLevel::kAvx2);
  if (s == "baseline" || s == "default" || s == "none" || s == "sse2") return static_cast<int>(SimdLevel::kBaseline);
  return -2;
}

std::string build_words() {
#if defined(ITM_SIMD_DISPATCH_X86)
  return "";
#elif defined(ITM_SIMD_NO_DISPATCH)
  return "baseline-only build (ITM_KERNELS_SIMD=baseline at build time): the epilogues run as portable code";
#elif defined(__x86_64__) || defined(_M_X64)
  return "baseline-only build (this compiler has no x86 target attributes): the epilogues run as portable code";
#else
  std::string machine = "unknown";
#if !defined(_WIN32)
  struct utsname u;
  if (uname(&u) == 0) machine = u.machine;  // what Python's platform.machine() says: aarch64, arm64, ppc64le
#endif
  return "portable build for a non-x86 host (" + machine +
         "): the epilogues run as the compiler's auto-vectorised portable code, no runtime SIMD dispatch";
#endif
}

}  // namespace

SimdLevel simd_cpu_level() {
  static const SimdLevel level = detect();
  return level;
}

const char* simd_level_name(SimdLevel l) {
  switch (l) {
    case SimdLevel::kAvx512: return "avx512";
    case SimdLevel::kAvx2: return "avx2";
    default: return "baseline";
  }
}

namespace detail {
SimdLevel choose_simd_level() {
  std::lock_guard<std::mutex> lock(g_mutex);
  const int have = g_simd_level.load();
  if (have >= 0) return static_cast<SimdLevel>(have);
  const SimdLevel cpu = simd_cpu_level();
  const char* env = std::getenv("ITM_KERNELS_ISA");
  const int want = parse_env(env);
  SimdLevel level = cpu;
  const std::string build = build_words();
  if (want == -2) g_env_invalid = true;
  if (!build.empty()) {  // one level only: the variable cannot change it, but the reason says what it asked
    g_reason = build;
    if (want == -2)
      g_reason += std::string("; ITM_KERNELS_ISA='") + env + "' ignored: expected avx512, avx2 or baseline";
    else if (want > 0)
      g_reason += std::string("; ITM_KERNELS_ISA=") + env + " cannot raise it";
    else if (want == 0)
      g_reason += std::string("; ITM_KERNELS_ISA=") + env + " (the only level of this build)";
  } else if (want == -2) {
    g_reason = std::string("cpu detection (") + cpu_words(cpu) + "); ITM_KERNELS_ISA='" + env +
               "' ignored: expected avx512, avx2 or baseline";
  } else if (want >= 0) {
    const SimdLevel w = static_cast<SimdLevel>(want);
    if (w > cpu) {
      g_reason = std::string("ITM_KERNELS_ISA=") + env + " capped at " + simd_level_name(cpu) + ": the CPU has " +
                 cpu_words(cpu);
    } else {
      level = w;
      g_reason = std::string("ITM_KERNELS_ISA=") + env + " (the CPU has " + cpu_words(cpu) + ")";
    }
  } else {
    g_reason = std::string("cpu detection (") + cpu_words(cpu) + ")";
  }
  g_simd_level.store(static_cast<int>(level));
  return level;
}
}  // namespace detail

const char* simd_reason() {
  simd_level();
  std::lock_guard<std::mutex> lock(g_mutex);
  static thread_local std::string copy;
  copy = g_reason;
  return copy.c_str();
}

bool simd_env_invalid() {
  simd_level();
  std::lock_guard<std::mutex> lock(g_mutex);
  return g_env_invalid;
}

const char* simd_dispatch() {
#if defined(ITM_SIMD_DISPATCH_X86)
  return "runtime: avx512, avx2 and baseline versions (x86 target attributes)";
#elif defined(__x86_64__) || defined(_M_X64)
  return "none: baseline only";
#else
  return "none: portable code";
#endif
}

SimdLevel set_simd_level(SimdLevel level) {
  simd_level();
  std::lock_guard<std::mutex> lock(g_mutex);
  const SimdLevel cpu = simd_cpu_level();
  const SimdLevel l = level > cpu ? cpu : level;
  const std::string build = build_words();  // kept: a one-level build's reason stays true
  g_reason = (build.empty() ? std::string() : build + "; ") + "set_simd_level(" + simd_level_name(level) +
             ") for testing" + (level > cpu ? std::string(", capped at ") + simd_level_name(cpu) : std::string());
  detail::g_simd_level.store(static_cast<int>(l));
  return l;
}

bool native_bf16_dot() {
#if defined(ITM_SIMD_DISPATCH_X86)
  static const bool cpu = cpu_avx512() && cpu_avx512_bf16();
  return cpu && simd_level() == SimdLevel::kAvx512;
#else
  return false;
#endif
}

namespace {
// ITM_KERNELS_ISA also caps oneDNN (the brgemm GEMMs), through its own variable, unless that is set already:
// avx512 -> AVX512_CORE_AMX (no cap on the AVX-512 families), avx2 -> AVX2, baseline -> AVX2 as well (brgemm has
// no kernels below AVX2; ATen's brgemm would fall back to its reference GEMM). oneDNN reads the variable once, at
// its first CPU-ISA query: a process that ran a oneDNN primitive before importing itm_kernels keeps its level.
// x86 only: oneDNN's ISA names elsewhere are others (aarch64: SVE, ...), and no kernel of ours is capped there.
struct CapOneDnn {
  CapOneDnn() {
#if defined(__x86_64__) || defined(_M_X64)
    const int want = parse_env(std::getenv("ITM_KERNELS_ISA"));
    if (want < 0 || std::getenv("ONEDNN_MAX_CPU_ISA") || std::getenv("DNNL_MAX_CPU_ISA")) return;
    if (want == static_cast<int>(SimdLevel::kAvx512)) return;
    setenv("ONEDNN_MAX_CPU_ISA", "AVX2", 0);
#endif
  }
} g_cap_onednn;
}  // namespace

}  // namespace cpu
}  // namespace itm
