// Torch-free translation unit for nvcc compile checks (tools/compile_check_cuda.sh): instantiates the launcher,
// and with it the Gram and main kernels, for every input dtype and direction.
#include "xattn_sim/kernel.cuh"

namespace itm {
namespace cuda {

#define ITM_INSTANTIATE_XATTN(T)                                                                              \
  template cudaError_t launch_xattn_sim<T, kT2I>(const XattnProblem<T>&, const XattnPlan&, void*, cudaStream_t); \
  template cudaError_t launch_xattn_sim<T, kI2T>(const XattnProblem<T>&, const XattnPlan&, void*, cudaStream_t); \
  template cudaError_t xattn_sim_cuda<T>(const XattnProblem<T>&, const XattnPlan&, void*, cudaStream_t);         \
  template XattnPlan plan_xattn<T>(const XattnProblem<T>&);

ITM_INSTANTIATE_XATTN(float)
ITM_INSTANTIATE_XATTN(double)
ITM_INSTANTIATE_XATTN(__half)
ITM_INSTANTIATE_XATTN(__nv_bfloat16)

#undef ITM_INSTANTIATE_XATTN

}  // namespace cuda
}  // namespace itm
