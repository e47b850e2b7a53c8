// Torch binding of the CUDA local_sim kernel (csrc/local_sim/kernel.cuh): the schema
//   itm_kernels::local_sim_cuda(Tensor images, Tensor captions, Tensor cap_lens, Tensor weight, Tensor bias,
//                               float lambda_softmax) -> Tensor
// (defined here, so it exists only in CUDA builds), argument checks at the boundary, device guard and current
// stream, dtype dispatch, and its CUDA and Meta implementations.
//   images (N_img, K, d), captions (N_cap, L_max, d): CUDA, contiguous, one dtype among float32, float64, float16,
//   bfloat16; cap_lens (N_cap,) int64 on the same device, in 1..L_max; weight (S, d) and bias (S,): floating point,
//   on the same device, any layout (converted to the dtype of images and made contiguous here); K <= 64,
//   L_max <= 128, S <= 1024; lambda_softmax finite and >= 0.
//   Returns (N_img, N_cap, L_max, S): float64 for float64 inputs, float32 otherwise; zero for words beyond each
//   caption's length. No autograd.
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

#include "local_sim/kernel.cuh"

namespace {

constexpr const char* kOp = "local_sim_cuda: ";

template <class T> itm::cuda::ls::LocalProblem<T> problem_for(const at::Tensor& images, const at::Tensor& captions,
                                                             const at::Tensor& weight, double lambda_softmax) {
  itm::cuda::ls::LocalProblem<T> p{};
  p.n_img = images.size(0);
  p.n_cap = captions.size(0);
  p.K = static_cast<int>(images.size(1));
  p.L = static_cast<int>(captions.size(1));
  p.d = static_cast<int>(images.size(2));
  p.S = static_cast<int>(weight.size(0));
  p.lambda_softmax = lambda_softmax;
  return p;
}

template <class T> itm::cuda::ls::LocalPlan plan_for(const at::Tensor& images, const at::Tensor& captions,
                                                     const at::Tensor& weight, double lambda_softmax) {
  return itm::cuda::ls::plan_local_sim(problem_for<T>(images, captions, weight, lambda_softmax));
}

template <class T>
void run_local_sim(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                   const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out, double lambda_softmax,
                   const itm::cuda::ls::LocalPlan& plan) {
  using A = itm::cuda::acc_t<T>;
  itm::cuda::ls::LocalProblem<T> p = problem_for<T>(images, captions, weight, lambda_softmax);
  p.images = static_cast<const T*>(images.data_ptr());
  p.captions = static_cast<const T*>(captions.data_ptr());
  p.cap_lens = cap_lens.data_ptr<int64_t>();
  p.weight = static_cast<const T*>(weight.data_ptr());
  p.bias = static_cast<const T*>(bias.data_ptr());
  p.out = static_cast<A*>(out.data_ptr());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(images.device().index()).stream();
  const cudaError_t err = itm::cuda::ls::local_sim_cuda<T>(p, plan, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed: ", cudaGetErrorString(err));
}

void check_inputs(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                  const at::Tensor& weight, const at::Tensor& bias, double lambda_softmax) {
  TORCH_CHECK(images.is_cuda(), kOp, "images must be a CUDA tensor, got ", images.device());
  TORCH_CHECK(captions.device() == images.device(), kOp, "captions must be on ", images.device(),
              " like images, got ", captions.device());
  TORCH_CHECK(images.dim() == 3, kOp, "images must have shape (N_img, K, d), got ", images.sizes());
  TORCH_CHECK(captions.dim() == 3, kOp, "captions must have shape (N_cap, L_max, d), got ", captions.sizes());
  TORCH_CHECK(captions.size(2) == images.size(2), kOp, "captions must share d with images, got images ",
              images.sizes(), " and captions ", captions.sizes());
  const at::ScalarType dtype = images.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16, kOp,
              "images must be float32, float64, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(captions.scalar_type() == dtype, kOp, "captions must have the dtype of images (", dtype, "), got ",
              captions.scalar_type());
  TORCH_CHECK(images.is_contiguous(), kOp, "images must be contiguous");
  TORCH_CHECK(captions.is_contiguous(), kOp, "captions must be contiguous");
  TORCH_CHECK(images.numel() > 0, kOp, "images must be non-empty, got ", images.sizes());
  TORCH_CHECK(captions.numel() > 0, kOp, "captions must be non-empty, got ", captions.sizes());
  constexpr int64_t kIntMax = std::numeric_limits<int>::max();
  TORCH_CHECK(images.size(2) <= kIntMax, kOp, "d must fit in int32, got ", images.size(2));
  TORCH_CHECK(images.size(1) <= itm::cuda::ls::kMaxRegions, kOp, "the CUDA kernel supports at most ",
              itm::cuda::ls::kMaxRegions, " regions per image: images has K=", images.size(1),
              "; use backend='torch'");
  TORCH_CHECK(captions.size(1) <= itm::cuda::ls::kMaxWords, kOp, "the CUDA kernel supports captions of at most ",
              itm::cuda::ls::kMaxWords, " words: captions has L_max=", captions.size(1), "; use backend='torch'");
  TORCH_CHECK(weight.device() == images.device() && bias.device() == images.device(), kOp,
              "weight and bias must be on ", images.device(), " like images, got ", weight.device(), " and ",
              bias.device());
  TORCH_CHECK(at::isFloatingType(weight.scalar_type()) && at::isFloatingType(bias.scalar_type()), kOp,
              "weight and bias must be floating point, got ", weight.scalar_type(), " and ", bias.scalar_type());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == images.size(2) && weight.size(0) >= 1, kOp,
              "weight must have shape (sim_dim, d=", images.size(2), "), got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == weight.size(0), kOp, "bias must have shape (", weight.size(0),
              ",) like the rows of weight, got ", bias.sizes());
  TORCH_CHECK(weight.size(0) <= itm::cuda::ls::kMaxSimDim, kOp, "the CUDA kernel supports at most ",
              itm::cuda::ls::kMaxSimDim, " outputs per word: weight has sim_dim=", weight.size(0),
              "; use backend='torch'");
  TORCH_CHECK(std::isfinite(lambda_softmax) && lambda_softmax >= 0, kOp,
              "lambda_softmax must be finite and >= 0, got ", lambda_softmax);
  TORCH_CHECK(cap_lens.device() == images.device(), kOp, "cap_lens must be on ", images.device(),
              " like images, got ", cap_lens.device());
  TORCH_CHECK(cap_lens.scalar_type() == at::kLong, kOp, "cap_lens must be int64, got ", cap_lens.scalar_type());
  TORCH_CHECK(cap_lens.dim() == 1 && cap_lens.size(0) == captions.size(0), kOp, "cap_lens must have shape (",
              captions.size(0), ",), got ", cap_lens.sizes());
  TORCH_CHECK(cap_lens.is_contiguous(), kOp, "cap_lens must be contiguous");
}

at::Tensor local_sim_cuda_impl(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                               const at::Tensor& weight_in, const at::Tensor& bias_in, double lambda_softmax) {
  check_inputs(images, captions, cap_lens, weight_in, bias_in, lambda_softmax);
  const at::ScalarType dtype = images.scalar_type();
  const int64_t n_img = images.size(0), K = images.size(1), n_cap = captions.size(0), L = captions.size(1);
  const int64_t S = weight_in.size(0);

  itm::cuda::ls::LocalPlan plan{};
  switch (dtype) {
    case at::kFloat: plan = plan_for<float>(images, captions, weight_in, lambda_softmax); break;
    case at::kDouble: plan = plan_for<double>(images, captions, weight_in, lambda_softmax); break;
    case at::kHalf: plan = plan_for<__half>(images, captions, weight_in, lambda_softmax); break;
    default: plan = plan_for<__nv_bfloat16>(images, captions, weight_in, lambda_softmax); break;
  }
  TORCH_CHECK(plan.error == nullptr, kOp, plan.error, " (images ", images.sizes(), ", captions ", captions.sizes(),
              ", weight ", weight_in.sizes(), ")");

  const c10::cuda::CUDAGuard guard(images.device());
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        images.device().index()));
  TORCH_CHECK(plan.smem_bytes <= size_t(smem_limit), kOp, "needs ", plan.smem_bytes,
              " bytes of shared memory per block for K=", K, ", L_max=", L, ", sim_dim=", S, " and ", dtype,
              " inputs; device ", images.device(), " allows ", smem_limit, "; use backend='torch'");
  // One reduction and one host sync for the range check; the kernel also clamps lengths, so memory stays safe.
  const bool lengths_bad = at::logical_or(cap_lens.lt(1), cap_lens.gt(L)).any().item<bool>();
  TORCH_CHECK(!lengths_bad, kOp, "cap_lens must lie in 1..", L);

  // The kernel reads W and b in the input dtype (widened to the accumulation type on load).
  const at::Tensor weight = weight_in.to(dtype).contiguous();
  const at::Tensor bias = bias_in.to(dtype).contiguous();
  const auto out_opts = images.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  // The kernel writes every element (zeros for the words beyond each caption's length).
  at::Tensor out = at::empty({n_img, n_cap, L, S}, out_opts);
  switch (dtype) {
    case at::kFloat: run_local_sim<float>(images, captions, cap_lens, weight, bias, out, lambda_softmax, plan); break;
    case at::kDouble:
      run_local_sim<double>(images, captions, cap_lens, weight, bias, out, lambda_softmax, plan);
      break;
    case at::kHalf: run_local_sim<__half>(images, captions, cap_lens, weight, bias, out, lambda_softmax, plan); break;
    default:
      run_local_sim<__nv_bfloat16>(images, captions, cap_lens, weight, bias, out, lambda_softmax, plan);
      break;
  }
  return out;
}

// Shapes and dtypes only, for tracing (FakeTensor / torch.compile / opcheck); no checks beyond the ranks.
at::Tensor local_sim_cuda_meta(const at::Tensor& images, const at::Tensor& captions, const at::Tensor&,
                               const at::Tensor& weight, const at::Tensor&, double) {
  TORCH_CHECK(images.dim() == 3 && captions.dim() == 3 && weight.dim() == 2, kOp,
              "images and captions must be 3-D and weight 2-D");
  const auto opts = images.options().dtype(images.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return at::empty({images.size(0), captions.size(0), captions.size(1), weight.size(0)}, opts);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("local_sim_cuda(Tensor images, Tensor captions, Tensor cap_lens, Tensor weight, Tensor bias, "
        "float lambda_softmax) -> Tensor");
}

TORCH_LIBRARY_IMPL(itm_kernels, CUDA, m) { m.impl("local_sim_cuda", &local_sim_cuda_impl); }
TORCH_LIBRARY_IMPL(itm_kernels, Meta, m) { m.impl("local_sim_cuda", &local_sim_cuda_meta); }
