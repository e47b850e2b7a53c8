// The Python module itm_kernels._C: build information only. The operators are reached through torch.ops.itm_kernels
// once this module is imported; each op's directory defines its own schema (TORCH_LIBRARY_FRAGMENT) beside its
// kernels: csrc/xattn_sim/, csrc/local_sim/, csrc/node_match/, csrc/sgr_step/, csrc/saf_scores/, csrc/gemm/.
#include <ATen/Parallel.h>

#include <pybind11/pybind11.h>

#include <cstdlib>
#include <string>
#include <stdexcept>

#include "common/bf16_gemm.h"
#include "common/brgemm_shapes.h"
#include "common/isa.h"

namespace {

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
  // The OpenMP ABI this build calls: clang's code calls LLVM's libomp (__kmpc_*); torch's Linux wheels use gcc's
  // libgomp, so a clang build runs its kernels on a second thread pool (OMP_NUM_THREADS caps both).
#if defined(_OPENMP) && defined(__clang__)
  info["openmp_runtime"] = "libomp";
#elif defined(_OPENMP) && defined(__GNUC__)
  info["openmp_runtime"] = "libgomp";
#else
  info["openmp_runtime"] = pybind11::none();
#endif
  info["openmp_threads"] = at::get_num_threads();
  using namespace itm::cpu;
  info["simd"] = simd_level_name(simd_level());       // the level the epilogues run at now
  info["simd_reason"] = std::string(simd_reason());  // why: CPU detection, ITM_KERNELS_ISA, or the build
  info["simd_cpu"] = simd_level_name(simd_cpu_level());
  info["simd_dispatch"] = simd_dispatch();
  info["simd_env_invalid"] = simd_env_invalid();
  info["native_bf16"] = native_bf16_dot();
  const char* onednn = std::getenv("ONEDNN_MAX_CPU_ISA");
  info["onednn_max_cpu_isa"] = onednn ? pybind11::object(pybind11::str(onednn)) : pybind11::object(pybind11::none());
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

// Tests only: run the epilogues at `name` (avx512 | avx2 | baseline) from now on, capped at what the CPU and the build
// support; returns the level set. oneDNN's own level (ONEDNN_MAX_CPU_ISA) cannot change after its first use.
std::string set_simd_level(const std::string& name) {
  using itm::cpu::SimdLevel;
  SimdLevel level;
  if (name == "avx512") level = SimdLevel::kAvx512;
  else if (name == "avx2") level = SimdLevel::kAvx2;
  else if (name == "baseline") level = SimdLevel::kBaseline;
  else throw std::invalid_argument("_set_simd_level: expected 'avx512', 'avx2' or 'baseline', got '" + name + "'");
  return itm::cpu::simd_level_name(itm::cpu::set_simd_level(level));
}

// Tests only: the number of distinct brgemm shapes xattn_sim and local_sim asked for since the last reset; with
// `reset`, clears the record and turns counting on (`count`) or off.
int64_t brgemm_shapes(bool reset, bool count) {
  const int64_t n = itm::cpu::brgemm_shape_count();
  if (reset) itm::cpu::reset_brgemm_shapes(count);
  return n;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "itm_kernels compiled operators (registered under torch.ops.itm_kernels)";
  m.def("build_info", &build_info,
        "Flags of this build: cuda, openmp, openmp_runtime, openmp_threads, simd (+ simd_reason, simd_cpu, "
        "simd_dispatch), native_bf16, bf16_brgemm, bf16_gemm, onednn_max_cpu_isa, compiler");
  m.def("_brgemm_shapes", &brgemm_shapes, pybind11::arg("reset") = false, pybind11::arg("count") = true,
        "Tests only: distinct brgemm shapes of xattn_sim and local_sim since the last reset (counting is off until "
        "_brgemm_shapes(reset=True) turns it on)");
  m.def("_set_simd_level", &set_simd_level, "Tests only: force the epilogues' SIMD level (capped); returns it");
}
