// Host emulation of the CUDA xattn_sim kernels: runs the block code of xattn_sim/kernel.cuh on the CPU, block
// after block, thread after thread, phase by phase, through the same plan and launch sequence as the GPU.
// Built with g++ (no GPU or CUDA runtime needed, only the CUDA headers for __half/__nv_bfloat16) by
// tools/compile_check_cuda.sh; tests/xattn_sim/test_xattn_sim_cuda.py compares its output with the reference.
//
// What it checks beyond the math: every block runs three times with the threads of each phase in forward,
// reverse and shuffled order and the results must agree bit for bit (a phase that reads what another thread of
// the same phase writes would disagree); shared memory, thread registers, the workspace and the output start
// as NaN, so a read of anything never written shows up in the result; under -fsanitize=address every shared
// memory buffer and input array has its exact size, so an out-of-bounds index aborts.
//
// Usage: xattn_sim_emulate IN OUT      (formats: see read_problem below and tests/xattn_sim/test_xattn_sim_cuda.py)
//        xattn_sim_emulate --plan K L d  (prints the launch plan of every dtype and direction)
#include "common/emulate_io.h"
#include "xattn_sim/kernel.cuh"

namespace {

using namespace itm::cuda;
using namespace itm::emulate;

template <class A> void poison_states(std::vector<ThreadState<A>>& states) {
  const A nan = std::numeric_limits<A>::quiet_NaN();
  for (auto& st : states) {
    for (auto& row : st.acc)
      for (auto& x : row) x = nan;
    st.sq = nan;
  }
}

template <class T, int DIR> struct HostRunner {
  using A = acc_t<T>;
  const XattnPlan& plan;
  std::vector<int> order;
  std::vector<A> smem;
  std::vector<ThreadState<A>> states;

  HostRunner(const XattnPlan& plan_, std::vector<int> order_)
      : plan(plan_), order(std::move(order_)), states(kThreads) {}

  template <class Block> void run_blocks(size_t smem_bytes, int64_t blocks, Block&& block) {
    smem.assign(smem_bytes / sizeof(A), A(0));
    for (int64_t b = 0; b < blocks; ++b) {
      poison(smem);
      poison_states(states);
      HostExec<ThreadState<A>> ex{states.data(), order.data(), kThreads};
      block(ex, b);
    }
  }
  void gram(const GramArgs<T>& g, int64_t blocks) {
    run_blocks(plan.gram_smem_bytes, blocks, [&](HostExec<ThreadState<A>>& ex, int64_t b) { gram_block<T>(ex, smem.data(), g, b); });
  }
  void main(const MainArgs<T>& m, int64_t blocks) {
    run_blocks(plan.main_smem_bytes, blocks,
               [&](HostExec<ThreadState<A>>& ex, int64_t b) { xattn_main_block<T, DIR>(ex, smem.data(), m, b); });
  }
};

struct Header {
  char magic[8];  // "XATTNEM1"
  int32_t dtype;  // 0 float32, 1 float64, 2 float16, 3 bfloat16
  int32_t direction, norm, agg, K, L, d, pad;
  int64_t n_img, n_cap, max_workspace_bytes;
  double lambda_softmax, lambda_lse;
};

template <class T, int DIR>
std::vector<acc_t<T>> run_order(const XattnProblem<T>& p, const XattnPlan& plan, std::vector<int> order) {
  using A = acc_t<T>;
  std::vector<A> out(size_t(p.n_img * p.n_cap)), workspace(plan.workspace_bytes / sizeof(A));
  poison(out);
  poison(workspace);
  XattnProblem<T> q = p;
  q.out = out.data();
  HostRunner<T, DIR> run(plan, std::move(order));
  drive_xattn(q, plan, workspace.data(), run);
  return out;
}

template <class T> int emulate(const Header& h, std::ifstream& in, const char* out_path) {
  using A = acc_t<T>;
  std::vector<T> images, captions;
  std::vector<int64_t> cap_lens, img_lens;
  read_exact(in, images, size_t(h.n_img) * h.K * h.d);
  read_exact(in, captions, size_t(h.n_cap) * h.L * h.d);
  read_exact(in, cap_lens, size_t(h.n_cap));
  read_exact(in, img_lens, size_t(h.n_img));
  XattnProblem<T> p{images.data(), captions.data(), cap_lens.data(), img_lens.data(), nullptr, h.n_img, h.n_cap,
                    h.K, h.L, h.d, h.direction, h.norm, h.agg, h.lambda_softmax, h.lambda_lse,
                    size_t(h.max_workspace_bytes)};
  const XattnPlan plan = plan_xattn(p);
  if (plan.error) {
    std::fprintf(stderr, "plan refused: %s\n", plan.error);
    return 2;
  }
  const std::vector<std::vector<int>> orders = thread_orders(kThreads);
  std::vector<A> results[3];
  for (int o = 0; o < 3; ++o)
    results[o] = h.direction == itm::kT2I ? run_order<T, itm::kT2I>(p, plan, orders[o])
                                          : run_order<T, itm::kI2T>(p, plan, orders[o]);
  for (int o = 1; o < 3; ++o)
    if (!same_bits(results[0], results[o])) {
      std::fprintf(stderr, "thread-order dependent result (order %d differs from forward): a phase races\n", o);
      return 3;
    }
  std::ofstream out(out_path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(results[0].data()), std::streamsize(results[0].size() * sizeof(A)));
  std::printf("ok: %lld x %lld, %lld context chunk(s), tile %dx%d (%d caption(s) of %d), main smem %zu B, "
              "gram smem %zu B, workspace %zu B\n",
              (long long)h.n_img, (long long)h.n_cap,
              (long long)(((h.direction == itm::kT2I ? h.n_img : h.n_cap) + plan.ctx_chunk - 1) / plan.ctx_chunk),
              plan.shape.kp, plan.shape.ncols, plan.shape.slots, plan.shape.lp, plan.main_smem_bytes,
              plan.gram_smem_bytes, plan.workspace_bytes);
  return out ? 0 : 1;
}

template <class T> void print_plan(const char* name, int K, int L, int d) {
  for (int dir = 0; dir < 2; ++dir) {
    XattnProblem<T> p{};
    p.n_img = 1000;
    p.n_cap = 5000;
    p.K = K;
    p.L = L;
    p.d = d;
    p.direction = dir;
    const XattnPlan plan = plan_xattn(p);
    if (plan.error) {
      std::printf("%-9s %s: refused: %s\n", name, dir ? "i2t" : "t2i", plan.error);
      continue;
    }
    std::printf("%-9s %s: K=%d L=%d d=%d tile %dx%d (%d caption(s) per block), dynamic smem main %zu B, gram %zu B\n",
                name, dir ? "i2t" : "t2i", K, L, d, plan.shape.kp, plan.shape.ncols, plan.shape.slots,
                plan.main_smem_bytes, plan.gram_smem_bytes);
  }
}

}  // namespace

int main(int argc, char** argv) {
  return itm::emulate::emulator_main<Header>(
      argc, argv, "XATTNEM1", "an xattn", "K L d", 3,
      [](auto tag, const char* name, const int* a) { print_plan<typename decltype(tag)::type>(name, a[0], a[1], a[2]); },
      [](auto tag, const Header& h, std::ifstream& in, const char* out) {
        return emulate<typename decltype(tag)::type>(h, in, out);
      });
}
