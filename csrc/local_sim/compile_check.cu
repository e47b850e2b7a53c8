// Torch-free translation unit for nvcc compile checks (tools/compile_check_cuda.sh): instantiates the local_sim
// launcher, and with it the kernel, for every input dtype. Kept apart from the other check files so that each
// file's kernel count is reported on its own. setup.py leaves it out of the extension (name ends in compile_check.cu).
#include "local_sim/kernel.cuh"

namespace itm {
namespace cuda {
namespace ls {

#define ITM_INSTANTIATE_LOCAL_SIM(T)                                                             \
  template cudaError_t local_sim_cuda<T>(const LocalProblem<T>&, const LocalPlan&, cudaStream_t); \
  template LocalPlan plan_local_sim<T>(const LocalProblem<T>&);

ITM_INSTANTIATE_LOCAL_SIM(float)
ITM_INSTANTIATE_LOCAL_SIM(double)
ITM_INSTANTIATE_LOCAL_SIM(__half)
ITM_INSTANTIATE_LOCAL_SIM(__nv_bfloat16)

#undef ITM_INSTANTIATE_LOCAL_SIM

}  // namespace ls
}  // namespace cuda
}  // namespace itm
