// Helpers shared by the torch-free CUDA kernel headers (csrc/xattn_sim/kernel.cuh, csrc/local_sim/kernel.cuh,
// csrc/node_match/kernel.cuh): the accumulation type per input dtype, loads that widen to it, length clamping
// (host and device, ITM_HD), and (nvcc only) the launch scaffolding every kernel uses: the block executor that runs
// one phase of the block code on every thread, the shared-memory opt-in and error-sticky launches; and ITM_UNROLL.
#pragma once
#include <cstddef>
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/constants.h"

#if defined(__CUDACC__)
#include <cuda_runtime.h>
#endif
// `#pragma unroll` on the device pass only: host compilers warn about an unknown pragma.
#if defined(__CUDA_ARCH__)
#define ITM_UNROLL _Pragma("unroll")
#else
#define ITM_UNROLL
#endif

namespace itm {
namespace cuda {

template <class T> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <class T> using acc_t = typename AccType<T>::type;

template <class A> ITM_HD A load_acc(const float* p) { return A(*p); }
template <class A> ITM_HD A load_acc(const double* p) { return A(*p); }
template <class A> ITM_HD A load_acc(const __half* p) { return A(__half2float(*p)); }
template <class A> ITM_HD A load_acc(const __nv_bfloat16* p) { return A(__bfloat162float(*p)); }

template <class X> ITM_HD X min_of(X a, X b) { return a < b ? a : b; }
template <class X> ITM_HD X max_of(X a, X b) { return a < b ? b : a; }
ITM_HD int round_up16(int x) { return (x + 15) / 16 * 16; }

// Lengths come from device memory; clamping keeps every address in bounds whatever they hold (the binding
// rejects out-of-range lengths before launching).
ITM_HD int clamp_len(int64_t len, int max_len) { return int(len < 0 ? 0 : (len > max_len ? max_len : len)); }

#if defined(__CUDACC__)

// The device side of the block code's executor: `each(f)` runs one phase, f(thread index, that thread's state), on
// every thread of the block, then a barrier. (The host emulations run the threads one after another instead.)
template <class State> struct DeviceExec {
  State& st;
  template <class F> __device__ __forceinline__ void each(F&& f) {
    f(int(threadIdx.x), st);
    __syncthreads();
  }
};

// Lets `kernel` use `bytes` of dynamic shared memory (beyond the default 48 KiB); the caller checks the device's
// cudaDevAttrMaxSharedMemoryPerBlockOptin.
template <class Args> cudaError_t allow_dynamic_smem(void (*kernel)(Args), size_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(bytes));
}

// The launches of one kernel (taking its arguments by value) on a stream, error-sticky: after the first failed
// launch the others are skipped and *err keeps that error.
template <class Args> struct KernelLauncher {
  void (*kernel)(Args);
  unsigned threads;
  size_t smem;
  cudaStream_t stream;
  cudaError_t* err;
  void operator()(const Args& a, int64_t blocks) const {
    if (*err != cudaSuccess) return;
    kernel<<<unsigned(blocks), threads, smem, stream>>>(a);
    *err = cudaGetLastError();
  }
};

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace itm
