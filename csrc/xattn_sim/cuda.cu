// Torch binding of the CUDA xattn_sim kernel (csrc/xattn_sim/kernel.cuh): argument checks at the boundary,
// device guard and current stream, dtype dispatch, the Gram workspace, and the CUDA implementation of the schema
//   itm_kernels::xattn_sim_fwd(Tensor images, Tensor captions, Tensor cap_lens, Tensor img_lens, int direction,
//                              int norm, float lambda_softmax, int agg, float lambda_lse, int max_tile_bytes) -> Tensor
// defined in csrc/module.cpp. Integer enums as in csrc/xattn_sim/math.h. Built only where torch has CUDA.
//
// Only c10/cuda headers: ATen/cuda/CUDAContext.h would pull in cuBLAS/cuSPARSE headers that this file does not need.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>

#include "xattn_sim/kernel.cuh"

namespace {

constexpr const char* kOp = "xattn_sim_fwd (CUDA): ";

void check_lengths(const at::Tensor& lens, const char* name, int64_t count, const at::Tensor& images) {
  TORCH_CHECK(lens.device() == images.device(), kOp, name, " must be on ", images.device(), " like images, got ",
              lens.device());
  TORCH_CHECK(lens.scalar_type() == at::kLong, kOp, name, " must be int64, got ", lens.scalar_type());
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == count, kOp, name, " must have shape (", count, ",), got ",
              lens.sizes());
  TORCH_CHECK(lens.is_contiguous(), kOp, name, " must be contiguous");
}

template <class T>
void run_xattn(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
               const at::Tensor& img_lens, at::Tensor& out, int direction, int norm, double lambda_softmax, int agg,
               double lambda_lse, int64_t max_tile_bytes) {
  using A = itm::cuda::acc_t<T>;
  itm::cuda::XattnProblem<T> p{};
  p.images = static_cast<const T*>(images.data_ptr());
  p.captions = static_cast<const T*>(captions.data_ptr());
  p.cap_lens = cap_lens.data_ptr<int64_t>();
  p.img_lens = img_lens.data_ptr<int64_t>();
  p.out = static_cast<A*>(out.data_ptr());
  p.n_img = images.size(0);
  p.n_cap = captions.size(0);
  p.K = static_cast<int>(images.size(1));
  p.L = static_cast<int>(captions.size(1));
  p.d = static_cast<int>(images.size(2));
  p.direction = direction;
  p.norm = norm;
  p.agg = agg;
  p.lambda_softmax = lambda_softmax;
  p.lambda_lse = lambda_lse;
  p.max_workspace_bytes = static_cast<size_t>(max_tile_bytes);
  const itm::cuda::XattnPlan plan = itm::cuda::plan_xattn(p);
  TORCH_CHECK(plan.error == nullptr, kOp, plan.error, " (images ", images.sizes(), ", captions ", captions.sizes(),
              ")");
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        images.device().index()));
  TORCH_CHECK(plan.main_smem_bytes <= size_t(smem_limit) && plan.gram_smem_bytes <= size_t(smem_limit), kOp,
              "needs ", plan.main_smem_bytes, " bytes of shared memory per block for K=", p.K, ", L_max=", p.L,
              " and ", images.scalar_type(), " inputs; device ", images.device(), " allows ", smem_limit,
              "; use backend='torch' or 'triton'");
  at::Tensor workspace =
      at::empty({static_cast<int64_t>(plan.workspace_bytes)}, images.options().dtype(at::kByte));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(images.device().index()).stream();
  const cudaError_t err = itm::cuda::xattn_sim_cuda<T>(p, plan, workspace.data_ptr(), stream);
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed: ", cudaGetErrorString(err));
}

at::Tensor xattn_sim_fwd_cuda(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                              const at::Tensor& img_lens, int64_t direction, int64_t norm, double lambda_softmax,
                              int64_t agg, double lambda_lse, int64_t max_tile_bytes) {
  TORCH_CHECK(images.is_cuda() && captions.is_cuda(), kOp, "images and captions must be CUDA tensors, got ",
              images.device(), " and ", captions.device());
  TORCH_CHECK(images.device() == captions.device(), kOp, "images and captions must be on one device, got ",
              images.device(), " and ", captions.device());
  TORCH_CHECK(images.dim() == 3 && captions.dim() == 3, kOp, "images (N_img, K, d) and captions (N_cap, L_max, d) ",
              "must have 3 dimensions, got ", images.sizes(), " and ", captions.sizes());
  TORCH_CHECK(images.size(2) == captions.size(2), kOp, "images and captions must share d, got ", images.sizes(),
              " and ", captions.sizes());
  TORCH_CHECK(images.scalar_type() == captions.scalar_type(), kOp, "images and captions must share a dtype, got ",
              images.scalar_type(), " and ", captions.scalar_type());
  const at::ScalarType dtype = images.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              "images must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(images.is_contiguous() && captions.is_contiguous(), kOp, "images and captions must be contiguous");
  TORCH_CHECK(images.numel() > 0 && captions.numel() > 0, kOp, "images and captions must be non-empty, got ",
              images.sizes(), " and ", captions.sizes());
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(images.size(1) <= kIntMax && captions.size(1) <= kIntMax && images.size(2) <= kIntMax, kOp,
              "K, L_max and d must fit in int32");
  TORCH_CHECK(direction == itm::kT2I || direction == itm::kI2T, kOp, "direction must be 0 (t2i) or 1 (i2t), got ",
              direction);
  TORCH_CHECK(norm >= itm::kSoftmax && norm <= itm::kNoNorm, kOp, "norm must be in 0..6, got ", norm);
  TORCH_CHECK(agg >= itm::kLse && agg <= itm::kSum, kOp, "agg must be in 0..3, got ", agg);
  TORCH_CHECK(std::isfinite(lambda_softmax) && lambda_softmax >= 0, kOp, "lambda_softmax must be finite and >= 0, got ",
              lambda_softmax);
  TORCH_CHECK(std::isfinite(lambda_lse) && (agg != itm::kLse ? lambda_lse >= 0 : lambda_lse > 0), kOp,
              "lambda_lse must be finite and ", agg == itm::kLse ? "> 0" : ">= 0", ", got ", lambda_lse);
  TORCH_CHECK(max_tile_bytes >= 0, kOp, "max_tile_bytes must be >= 0 (0: default), got ", max_tile_bytes);

  const int64_t n_img = images.size(0), K = images.size(1), n_cap = captions.size(0), L = captions.size(1);
  check_lengths(cap_lens, "cap_lens", n_cap, images);
  check_lengths(img_lens, "img_lens", n_img, images);

  const c10::cuda::CUDAGuard guard(images.device());
  // One reduction and one host sync for both range checks; the kernel also clamps lengths, so memory stays safe
  // even where this check is skipped.
  const bool lengths_bad = at::logical_or(at::logical_or(cap_lens.lt(1), cap_lens.gt(L)).any(),
                                          at::logical_or(img_lens.lt(1), img_lens.gt(K)).any())
                               .item<bool>();
  TORCH_CHECK(!lengths_bad, kOp, "cap_lens must lie in 1..", L, " and img_lens in 1..", K);

  at::Tensor out = at::empty({n_img, n_cap}, images.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat));
  const int dir = static_cast<int>(direction), nrm = static_cast<int>(norm), ag = static_cast<int>(agg);
  switch (dtype) {
    case at::kFloat:
      run_xattn<float>(images, captions, cap_lens, img_lens, out, dir, nrm, lambda_softmax, ag, lambda_lse,
                       max_tile_bytes);
      break;
    case at::kDouble:
      run_xattn<double>(images, captions, cap_lens, img_lens, out, dir, nrm, lambda_softmax, ag, lambda_lse,
                        max_tile_bytes);
      break;
    case at::kHalf:
      run_xattn<__half>(images, captions, cap_lens, img_lens, out, dir, nrm, lambda_softmax, ag, lambda_lse,
                        max_tile_bytes);
      break;
    default:
      run_xattn<__nv_bfloat16>(images, captions, cap_lens, img_lens, out, dir, nrm, lambda_softmax, ag, lambda_lse,
                               max_tile_bytes);
      break;
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(itm_kernels, CUDA, m) { m.impl("xattn_sim_fwd", &xattn_sim_fwd_cuda); }
