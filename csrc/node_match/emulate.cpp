// Host emulation of the CUDA node_match kernel: runs the block code of node_match/kernel.cuh on the CPU, block
// after block, thread after thread, phase by phase, through the same plan and launch sequence as the GPU.
// Built with g++ (no GPU or CUDA runtime needed, only the CUDA headers for __half/__nv_bfloat16) by
// tools/compile_check_cuda.sh; tests/node_match/test_node_match_cuda.py compares its output with node_match_reference.
//
// What it checks beyond the math: every block runs three times with the threads of each phase in forward,
// reverse and shuffled order and the results must agree bit for bit (a phase that reads what another thread of
// the same phase writes would disagree); shared memory, thread registers and both outputs start as NaN, so a read
// of anything never written, or an output value never written, shows up in the result; under -fsanitize=address
// the shared memory buffer and every input array have their exact sizes, so an out-of-bounds index aborts.
//
// Usage: node_match_emulate IN OUT          (formats: see Header below and tests/node_match/test_node_match_cuda.py)
//        node_match_emulate --plan K L d B  (prints the launch plan of every dtype)
// IN: Header, images (n_img, K, d), captions (n_cap, L, d) in the input dtype, cap_lens (n_cap,) int64.
// OUT: region (n_img, n_cap, K, B) then word (n_img, n_cap, L, B), float64 for float64 inputs, else float32.
// Exit status: 0 ok, 1 bad input, 2 plan refused (message on stderr), 3 thread-order dependent result.
#include "common/emulate_io.h"
#include "node_match/kernel.cuh"

namespace {

using namespace itm::cuda;
using namespace itm::cuda::nm;
using namespace itm::emulate;

template <class A> void poison_states(std::vector<ThreadState<A>>& states) {
  const A nan = std::numeric_limits<A>::quiet_NaN();
  for (auto& st : states)
    for (auto& row : st.acc)
      for (auto& x : row) x = nan;
}

template <class T> struct HostRunner {
  using A = acc_t<T>;
  const NodePlan& plan;
  std::vector<int> order;
  std::vector<A> smem;
  std::vector<ThreadState<A>> states;

  HostRunner(const NodePlan& plan_, std::vector<int> order_)
      : plan(plan_), order(std::move(order_)), smem(plan_.smem_bytes / sizeof(A)), states(kThreads) {}

  void main(const NodeArgs<T>& a, int64_t blocks) {
    for (int64_t b = 0; b < blocks; ++b) {
      poison(smem);
      poison_states(states);
      HostExec<ThreadState<A>> ex{states.data(), order.data(), kThreads};
      node_match_block<T>(ex, smem.data(), a, b);
    }
  }
};

struct Header {
  char magic[8];  // "NODEMEM1"
  int32_t dtype;  // 0 float32, 1 float64, 2 float16, 3 bfloat16
  int32_t K, L, d, num_blocks, pad;
  int64_t n_img, n_cap;
  double lambda_softmax;
};
static_assert(sizeof(Header) == 56, "Header must match the test's struct format '<8s6i2qd'");

template <class T> struct Outputs {
  std::vector<acc_t<T>> region, word;
};

template <class T> Outputs<T> run_order(const NodeProblem<T>& p, const NodePlan& plan, std::vector<int> order) {
  Outputs<T> o;
  o.region.resize(size_t(p.n_img * p.n_cap) * p.K * p.num_blocks);
  o.word.resize(size_t(p.n_img * p.n_cap) * p.L * p.num_blocks);
  poison(o.region);
  poison(o.word);
  NodeProblem<T> q = p;
  q.region = o.region.data();
  q.word = o.word.data();
  HostRunner<T> run(plan, std::move(order));
  drive_node_match(q, plan, run);
  return o;
}

template <class T> int emulate(const Header& h, std::ifstream& in, const char* out_path) {
  using A = acc_t<T>;
  if (h.n_img < 0 || h.n_cap < 0 || h.K < 0 || h.L < 0 || h.d < 0) throw std::runtime_error("negative size");
  std::vector<T> images, captions;
  std::vector<int64_t> cap_lens;
  read_exact(in, images, size_t(h.n_img) * h.K * h.d);
  read_exact(in, captions, size_t(h.n_cap) * h.L * h.d);
  read_exact(in, cap_lens, size_t(h.n_cap));
  NodeProblem<T> p{images.data(), captions.data(), cap_lens.data(), nullptr, nullptr, h.n_img, h.n_cap,
                   h.K, h.L, h.d, h.num_blocks, h.lambda_softmax};
  const NodePlan plan = plan_node_match(p);
  if (plan.error) {
    std::fprintf(stderr, "plan refused: %s\n", plan.error);
    return 2;
  }
  for (int64_t c = 0; c < h.n_cap; ++c)
    if (cap_lens[c] < 1 || cap_lens[c] > h.L) {
      std::fprintf(stderr, "cap_lens must lie in 1..%d\n", h.L);
      return 1;
    }
  const std::vector<std::vector<int>> orders = thread_orders(kThreads);
  Outputs<T> results[3];
  for (int o = 0; o < 3; ++o) results[o] = run_order(p, plan, orders[o]);
  for (int o = 1; o < 3; ++o)
    if (!same_bits(results[0].region, results[o].region) || !same_bits(results[0].word, results[o].word)) {
      std::fprintf(stderr, "thread-order dependent result (order %d differs from forward): a phase races\n", o);
      return 3;
    }
  std::ofstream out(out_path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(results[0].region.data()),
            std::streamsize(results[0].region.size() * sizeof(A)));
  out.write(reinterpret_cast<const char*>(results[0].word.data()), std::streamsize(results[0].word.size() * sizeof(A)));
  const NodeShape& s = plan.shape;
  std::printf("ok: %lld x %lld pairs, tile %dx%d, %d block(s) of %d features, pass-2 chunk %d%s, smem %zu B\n",
              (long long)h.n_img, (long long)h.n_cap, s.kp, s.lp, s.B, s.db, s.chunk, s.carry ? " (carry)" : "",
              plan.smem_bytes);
  return out ? 0 : 1;
}

template <class T> void print_plan(const char* name, int K, int L, int d, int B) {
  NodeProblem<T> p{};
  p.n_img = 1000;
  p.n_cap = 5000;
  p.K = K;
  p.L = L;
  p.d = d;
  p.num_blocks = B;
  p.lambda_softmax = 10.0;
  const NodePlan plan = plan_node_match(p);
  if (plan.error) {
    std::printf("node_match %-9s K=%d L=%d d=%d B=%d: refused: %s\n", name, K, L, d, B, plan.error);
    return;
  }
  std::printf("node_match %-9s K=%d L=%d d=%d B=%d: tile %dx%d, pass-2 chunk %d%s, dynamic smem %zu B\n", name, K, L,
              d, B, plan.shape.kp, plan.shape.lp, plan.shape.chunk, plan.shape.carry ? " (carry)" : "",
              plan.smem_bytes);
}

}  // namespace

int main(int argc, char** argv) {
  return itm::emulate::emulator_main<Header>(
      argc, argv, "NODEMEM1", "a node_match", "K L d B", 4,
      [](auto tag, const char* name, const int* a) {
        print_plan<typename decltype(tag)::type>(name, a[0], a[1], a[2], a[3]);
      },
      [](auto tag, const Header& h, std::ifstream& in, const char* out) {
        return emulate<typename decltype(tag)::type>(h, in, out);
      });
}
