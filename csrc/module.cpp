// The Python module itm_kernels._C: build information only. The operators are reached through torch.ops.itm_kernels
// once this module is imported; each op's directory defines its own schema (TORCH_LIBRARY_FRAGMENT) beside its
// kernels: csrc/xattn_sim/, csrc/local_sim/, csrc/node_match/, csrc/sgr_step/, csrc/saf_scores/, csrc/gemm/.
#include <ATen/Parallel.h>

#include <pybind11/pybind11.h>

#include <string>

#include "common/bf16_gemm.h"
#include "common/simd_clones.h"

namespace {

// The epilogue clone the loader picks on this machine (see common/simd_clones.h).
const char* simd_level() {
#if defined(ITM_SIMD_LEVELS_X86)
  __builtin_cpu_init();
#if defined(__clang__)
  if (__builtin_cpu_supports("avx512f")) return "avx512";
#else
  if (__builtin_cpu_supports("x86-64-v4")) return "avx512";
  if (__builtin_cpu_supports("x86-64-v3")) return "avx2";
#endif
#if defined(__clang__)
  if (__builtin_cpu_supports("avx2")) return "avx2";
#endif
#endif
  return "default";
}

pybind11::dict build_info() {
  pybind11::dict info;
#if defined(ITM_WITH_CUDA)
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
#if defined(_OPENMP)
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["openmp_threads"] = at::get_num_threads();
  info["simd"] = simd_level();
  info["bf16_brgemm"] = itm::cpu::bf16_brgemm();
  info["bf16_gemm"] = itm::cpu::bf16_gemm_path();
#if defined(__clang__)
  info["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
  info["compiler"] = std::string("gcc ") + __VERSION__;
#elif defined(_MSC_VER)
  info["compiler"] = std::string("msvc ") + std::to_string(_MSC_VER);
#else
  info["compiler"] = std::string("unknown");
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "itm_kernels compiled operators (registered under torch.ops.itm_kernels)";
  m.def("build_info", &build_info, "Flags of this build: cuda, openmp, openmp_threads, simd, bf16_brgemm, compiler");
}
