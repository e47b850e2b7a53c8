// Constants and the host/device qualifier shared by every kernel (CPU and CUDA). Torch-free; compiles alone under
// g++ and nvcc. The Python side has the same values in itm_kernels/_common/constants.py (EPS, LEAKY_SLOPE).
#pragma once

#if defined(__CUDACC__)
#define ITM_HD __host__ __device__ __forceinline__
#else
#define ITM_HD inline
#endif

namespace itm {

constexpr double kEps = 1e-8;          // l2norm/l1norm add it to the norm; cosine clamps |x||y| to it
constexpr double kLeakySlope = 0.1;    // LeakyReLU of the clipped norms, SGRAF and GSMN
// Gram-identity guard: |a|^2 = alpha^T G alpha cancels when the attended context nearly vanishes. A query whose
// q = alpha^T G alpha is below kGramCancelRatio * (sum_k alpha_k |v_k|)^2 is recomputed exactly in d-space
// (float64). Same value as GRAM_CANCEL_RATIO in itm_kernels/_common/constants.py.
constexpr double kGramCancelRatio = 1e-3;
// Usable temperatures (lambda_softmax, lambda_lse) per compute type: sqrt(max) and sqrt(smallest normal) of float32
// / float64, as itm_kernels._common.validation.lambda_range; beyond them a forward or backward overflows.
constexpr double kLambdaMaxF32 = 1.844674352395373e+19, kLambdaMinF32 = 1.0842021724855044e-19;
constexpr double kLambdaMaxF64 = 1.3407807929942596e+154, kLambdaMinF64 = 1.4916681462400413e-154;

}  // namespace itm
