// Scaffolding shared by the host emulations of the CUDA kernels (csrc/xattn_sim/emulate.cpp,
// csrc/local_sim/emulate.cpp, csrc/node_match/emulate.cpp; built with g++ by tools/compile_check_cuda.sh): the host
// executor that runs the threads of one phase one after another in a given order, NaN poisoning, the three thread
// orders every block runs in, bitwise comparison, input reading, and main() (the --plan mode and the IN OUT mode
// with the header's magic and dtype dispatch).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <fstream>
#include <limits>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

namespace itm {
namespace emulate {

// The host side of the block code's executor: each(f) runs f(tid, state) for the block's threads in `order`.
template <class State> struct HostExec {
  State* states;
  const int* order;
  int threads;
  template <class F> void each(F&& f) {
    for (int i = 0; i < threads; ++i) f(order[i], states[order[i]]);
  }
};

template <class A> void poison(std::vector<A>& v) {
  std::fill(v.begin(), v.end(), std::numeric_limits<A>::quiet_NaN());
}

// The orders every block's threads run in: forward, reverse and shuffled (a fixed seed).
inline std::vector<std::vector<int>> thread_orders(int threads) {
  std::vector<int> forward(threads);
  std::iota(forward.begin(), forward.end(), 0);
  std::vector<int> reverse(forward.rbegin(), forward.rend());
  std::vector<int> shuffled = forward;
  std::shuffle(shuffled.begin(), shuffled.end(), std::mt19937(12345));
  return {forward, reverse, shuffled};
}

template <class A> bool same_bits(const std::vector<A>& x, const std::vector<A>& y) {
  return x.size() == y.size() && std::memcmp(x.data(), y.data(), x.size() * sizeof(A)) == 0;
}

template <class T> void read_exact(std::ifstream& in, std::vector<T>& v, size_t n) {
  v.resize(n);
  in.read(reinterpret_cast<char*>(v.data()), std::streamsize(n * sizeof(T)));
  if (!in) throw std::runtime_error("input file too short");
}

template <class T> struct Tag { using type = T; };

// main() of an emulator. "--plan N1 .. Nn" (n_plan integers): plan(Tag<T>, dtype name, ints) for every dtype.
// "IN OUT": reads a Header (its first 8 bytes `magic`, then int32 dtype: 0 float32, 1 float64, 2 float16,
// 3 bfloat16) and returns emulate(Tag<T>, header, stream, OUT).
template <class Header, class Plan, class Emulate>
int emulator_main(int argc, char** argv, const char* magic, const char* what, const char* plan_usage, int n_plan,
                  Plan&& plan, Emulate&& emulate) {
  if (argc == 2 + n_plan && std::string(argv[1]) == "--plan") {
    std::vector<int> a(n_plan);
    for (int i = 0; i < n_plan; ++i) a[i] = std::atoi(argv[2 + i]);
    plan(Tag<float>{}, "float32", a.data());
    plan(Tag<double>{}, "float64", a.data());
    plan(Tag<__half>{}, "float16", a.data());
    plan(Tag<__nv_bfloat16>{}, "bfloat16", a.data());
    return 0;
  }
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT | --plan %s\n", argv[0], plan_usage);
    return 1;
  }
  try {
    std::ifstream in(argv[1], std::ios::binary);
    Header h;
    in.read(reinterpret_cast<char*>(&h), sizeof(h));
    if (!in || std::memcmp(h.magic, magic, 8) != 0) {
      std::fprintf(stderr, "%s: not %s emulation input\n", argv[1], what);
      return 1;
    }
    switch (h.dtype) {
      case 0: return emulate(Tag<float>{}, h, in, argv[2]);
      case 1: return emulate(Tag<double>{}, h, in, argv[2]);
      case 2: return emulate(Tag<__half>{}, h, in, argv[2]);
      case 3: return emulate(Tag<__nv_bfloat16>{}, h, in, argv[2]);
      default: std::fprintf(stderr, "unknown dtype code %d\n", h.dtype); return 1;
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
}

}  // namespace emulate
}  // namespace itm
