// Torch binding of the CUDA node_match kernel (csrc/node_match/kernel.cuh): the schema
//   itm_kernels::node_match_cuda(Tensor images, Tensor captions, Tensor cap_lens, float lambda_softmax,
//                                int num_blocks) -> (Tensor region, Tensor word)
// (defined here, so it exists only in CUDA builds), argument checks at the boundary, device guard and current
// stream, dtype dispatch, and its CUDA and Meta implementations.
//   images (N_img, K, d), captions (N_cap, L_max, d): CUDA, contiguous, one dtype among float32, float64, float16,
//   bfloat16; cap_lens (N_cap,) int64 on the same device, in 1..L_max; K <= 64, L_max <= 128; num_blocks >= 1
//   divides d; lambda_softmax finite and >= 0.
//   Returns region (N_img, N_cap, K, num_blocks) and word (N_img, N_cap, L_max, num_blocks) (zero for words beyond
//   each caption's length): float64 for float64 inputs, float32 otherwise. No autograd.
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
#include <tuple>

#include "node_match/kernel.cuh"

namespace {

constexpr const char* kOp = "node_match_cuda: ";

template <class T>
void run_node_match(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                    at::Tensor& region, at::Tensor& word, double lambda_softmax, int64_t num_blocks,
                    const itm::cuda::nm::NodePlan& plan) {
  using A = itm::cuda::acc_t<T>;
  itm::cuda::nm::NodeProblem<T> p{};
  p.images = static_cast<const T*>(images.data_ptr());
  p.captions = static_cast<const T*>(captions.data_ptr());
  p.cap_lens = cap_lens.data_ptr<int64_t>();
  p.region = static_cast<A*>(region.data_ptr());
  p.word = static_cast<A*>(word.data_ptr());
  p.n_img = images.size(0);
  p.n_cap = captions.size(0);
  p.K = static_cast<int>(images.size(1));
  p.L = static_cast<int>(captions.size(1));
  p.d = static_cast<int>(images.size(2));
  p.num_blocks = static_cast<int>(num_blocks);
  p.lambda_softmax = lambda_softmax;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(images.device().index()).stream();
  const cudaError_t err = itm::cuda::nm::node_match_cuda<T>(p, plan, stream);
  TORCH_CHECK(err == cudaSuccess, kOp, "kernel launch failed: ", cudaGetErrorString(err));
}

template <class T> itm::cuda::nm::NodePlan plan_for(const at::Tensor& images, const at::Tensor& captions,
                                                   double lambda_softmax, int64_t num_blocks) {
  itm::cuda::nm::NodeProblem<T> p{};
  p.n_img = images.size(0);
  p.n_cap = captions.size(0);
  p.K = static_cast<int>(images.size(1));
  p.L = static_cast<int>(captions.size(1));
  p.d = static_cast<int>(images.size(2));
  p.num_blocks = static_cast<int>(num_blocks);
  p.lambda_softmax = lambda_softmax;
  return itm::cuda::nm::plan_node_match(p);
}

void check_inputs(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                  double lambda_softmax, int64_t num_blocks) {
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
  TORCH_CHECK(images.size(1) <= itm::cuda::nm::kMaxRegions, kOp, "the CUDA kernel supports at most ",
              itm::cuda::nm::kMaxRegions, " regions per image: images has K=", images.size(1),
              "; use backend='torch'");
  TORCH_CHECK(captions.size(1) <= itm::cuda::nm::kMaxWords, kOp, "the CUDA kernel supports captions of at most ",
              itm::cuda::nm::kMaxWords, " words: captions has L_max=", captions.size(1), "; use backend='torch'");
  TORCH_CHECK(num_blocks >= 1 && num_blocks <= images.size(2) && images.size(2) % num_blocks == 0, kOp,
              "num_blocks must be a positive divisor of d=", images.size(2), ", got ", num_blocks);
  TORCH_CHECK(std::isfinite(lambda_softmax) && lambda_softmax >= 0, kOp,
              "lambda_softmax must be finite and >= 0, got ", lambda_softmax);
  TORCH_CHECK(cap_lens.device() == images.device(), kOp, "cap_lens must be on ", images.device(),
              " like images, got ", cap_lens.device());
  TORCH_CHECK(cap_lens.scalar_type() == at::kLong, kOp, "cap_lens must be int64, got ", cap_lens.scalar_type());
  TORCH_CHECK(cap_lens.dim() == 1 && cap_lens.size(0) == captions.size(0), kOp, "cap_lens must have shape (",
              captions.size(0), ",), got ", cap_lens.sizes());
  TORCH_CHECK(cap_lens.is_contiguous(), kOp, "cap_lens must be contiguous");
}

std::tuple<at::Tensor, at::Tensor> node_match_cuda_impl(const at::Tensor& images, const at::Tensor& captions,
                                                        const at::Tensor& cap_lens, double lambda_softmax,
                                                        int64_t num_blocks) {
  check_inputs(images, captions, cap_lens, lambda_softmax, num_blocks);
  const at::ScalarType dtype = images.scalar_type();
  const int64_t n_img = images.size(0), K = images.size(1), n_cap = captions.size(0), L = captions.size(1);

  itm::cuda::nm::NodePlan plan{};
  switch (dtype) {
    case at::kFloat: plan = plan_for<float>(images, captions, lambda_softmax, num_blocks); break;
    case at::kDouble: plan = plan_for<double>(images, captions, lambda_softmax, num_blocks); break;
    case at::kHalf: plan = plan_for<__half>(images, captions, lambda_softmax, num_blocks); break;
    default: plan = plan_for<__nv_bfloat16>(images, captions, lambda_softmax, num_blocks); break;
  }
  TORCH_CHECK(plan.error == nullptr, kOp, plan.error, " (images ", images.sizes(), ", captions ", captions.sizes(),
              ", num_blocks ", num_blocks, ")");

  const c10::cuda::CUDAGuard guard(images.device());
  int smem_limit = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                        images.device().index()));
  TORCH_CHECK(plan.smem_bytes <= size_t(smem_limit), kOp, "needs ", plan.smem_bytes,
              " bytes of shared memory per block for K=", K, ", L_max=", L, " and ", dtype, " inputs; device ",
              images.device(), " allows ", smem_limit, "; use backend='torch'");
  // One reduction and one host sync for the range check; the kernel also clamps lengths, so memory stays safe.
  const bool lengths_bad = at::logical_or(cap_lens.lt(1), cap_lens.gt(L)).any().item<bool>();
  TORCH_CHECK(!lengths_bad, kOp, "cap_lens must lie in 1..", L);

  const auto out_opts = images.options().dtype(dtype == at::kDouble ? at::kDouble : at::kFloat);
  // The kernel writes every element of both outputs (zeros for the words beyond each caption's length).
  at::Tensor region = at::empty({n_img, n_cap, K, num_blocks}, out_opts);
  at::Tensor word = at::empty({n_img, n_cap, L, num_blocks}, out_opts);
  switch (dtype) {
    case at::kFloat:
      run_node_match<float>(images, captions, cap_lens, region, word, lambda_softmax, num_blocks, plan);
      break;
    case at::kDouble:
      run_node_match<double>(images, captions, cap_lens, region, word, lambda_softmax, num_blocks, plan);
      break;
    case at::kHalf:
      run_node_match<__half>(images, captions, cap_lens, region, word, lambda_softmax, num_blocks, plan);
      break;
    default:
      run_node_match<__nv_bfloat16>(images, captions, cap_lens, region, word, lambda_softmax, num_blocks, plan);
      break;
  }
  return {region, word};
}

// Shapes and dtypes only, for tracing (FakeTensor / torch.compile / opcheck); no checks beyond the ranks.
std::tuple<at::Tensor, at::Tensor> node_match_cuda_meta(const at::Tensor& images, const at::Tensor& captions,
                                                        const at::Tensor&, double, int64_t num_blocks) {
  TORCH_CHECK(images.dim() == 3 && captions.dim() == 3, kOp, "images and captions must be 3-D");
  const auto opts = images.options().dtype(images.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  return {at::empty({images.size(0), captions.size(0), images.size(1), num_blocks}, opts),
          at::empty({images.size(0), captions.size(0), captions.size(1), num_blocks}, opts)};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("node_match_cuda(Tensor images, Tensor captions, Tensor cap_lens, float lambda_softmax, int num_blocks) "
        "-> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(itm_kernels, CUDA, m) { m.impl("node_match_cuda", &node_match_cuda_impl); }
TORCH_LIBRARY_IMPL(itm_kernels, Meta, m) { m.impl("node_match_cuda", &node_match_cuda_meta); }
