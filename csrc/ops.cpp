// Schemas of the itm_kernels operators and the Python module itm_kernels._C (build information only; the
// operators are reached through torch.ops.itm_kernels once this module is imported).
// Device implementations: csrc/cpu/xattn_sim_cpu.cpp (CPU), csrc/cuda/xattn_sim_cuda.cu (CUDA, when built).
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>

#include <pybind11/pybind11.h>

#include <string>

namespace itm {
namespace cpu {
const char* simd_level();
const char* bf16_gemm_path();
bool bf16_brgemm();
}  // namespace cpu
}  // namespace itm

// direction: 0 t2i, 1 i2t; norm: 0 softmax, 1 l2norm, 2 clipped_l2norm, 3 l1norm, 4 clipped_l1norm, 5 clipped,
// 6 no_norm; agg: 0 lse, 1 mean, 2 max, 3 sum (the enums of csrc/xattn_math.h). max_tile_bytes: 0 = default.
// Returns (N_img, N_cap): float64 for float64 inputs, float32 otherwise.
TORCH_LIBRARY(itm_kernels, m) {
  m.def("xattn_sim_fwd(Tensor images, Tensor captions, Tensor cap_lens, Tensor img_lens, int direction, int norm, "
        "float lambda_softmax, int agg, float lambda_lse, int max_tile_bytes) -> Tensor");
}

namespace {

// Shape and dtype only, for tracing (FakeTensor / torch.compile / opcheck); no checks beyond the ranks.
at::Tensor xattn_sim_fwd_meta(const at::Tensor& images, const at::Tensor& captions, const at::Tensor&,
                              const at::Tensor&, int64_t, int64_t, double, int64_t, double, int64_t) {
  TORCH_CHECK(images.dim() == 3 && captions.dim() == 3, "xattn_sim_fwd: images and captions must be 3-D");
  const auto dtype = images.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return at::empty({images.size(0), captions.size(0)}, images.options().dtype(dtype));
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
  info["simd"] = itm::cpu::simd_level();
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

TORCH_LIBRARY_IMPL(itm_kernels, Meta, m) { m.impl("xattn_sim_fwd", &xattn_sim_fwd_meta); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "itm_kernels compiled operators (registered under torch.ops.itm_kernels)";
  m.def("build_info", &build_info, "Flags of this build: cuda, openmp, openmp_threads, simd, bf16_brgemm, compiler");
}
