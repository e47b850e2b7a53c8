// Helpers shared by the torch-free CUDA kernel headers (xattn_sim_kernel.cuh, node_match_kernel.cuh): the
// accumulation type per input dtype, loads that widen to it, and length clamping. Host and device (ITM_HD).
#pragma once
#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../xattn_math.h"

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

}  // namespace cuda
}  // namespace itm
