// Torch-free translation unit for nvcc compile checks (tools/compile_check_cuda.sh): instantiates the node_match
// launcher, and with it the kernel, for every input dtype. Kept apart from compile_check.cu so that each file's
// kernel count is reported on its own. setup.py leaves both out of the extension (names ending in compile_check.cu).
#include "node_match/kernel.cuh"

namespace itm {
namespace cuda {
namespace nm {

#define ITM_INSTANTIATE_NODE_MATCH(T)                                                          \
  template cudaError_t node_match_cuda<T>(const NodeProblem<T>&, const NodePlan&, cudaStream_t); \
  template NodePlan plan_node_match<T>(const NodeProblem<T>&);

ITM_INSTANTIATE_NODE_MATCH(float)
ITM_INSTANTIATE_NODE_MATCH(double)
ITM_INSTANTIATE_NODE_MATCH(__half)
ITM_INSTANTIATE_NODE_MATCH(__nv_bfloat16)

#undef ITM_INSTANTIATE_NODE_MATCH

}  // namespace nm
}  // namespace cuda
}  // namespace itm
