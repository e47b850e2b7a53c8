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

}  // namespace itm
