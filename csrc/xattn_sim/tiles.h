// Internal hook into the CPU tile loop of xattn_sim (csrc/xattn_sim/cpu.cpp) for ops that reduce the scores as
// they are produced (csrc/xattn_topk/cpu.cpp): the loop of xattn_sim_fwd runs unchanged (same tables, same tiling,
// same GEMMs and epilogue, hence the same bits as its output), but each finished tile of scores is handed to a
// TileSink on the worker thread that computed it instead of being written into an (N_img, N_cap) output.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace itm {
namespace cpu {

template <class T> struct TileSink {
  virtual ~TileSink() = default;
  // The finished scores of images [i0, i1) x captions [c0, c1): scores[(i - i0) * ld + (c - c0)], readable during
  // the call only. Called concurrently from the worker threads; `slot` lies in [0, at::get_num_threads()) as read
  // at the start of the run and is the calling worker's own for the whole run (state indexed by it needs no lock).
  virtual void consume(int64_t slot, const T* scores, int64_t ld, int64_t i0, int64_t i1, int64_t c0,
                       int64_t c1) = 0;
};

// Runs the tiles of xattn_sim_fwd on inputs that the caller has checked as xattn_sim_fwd checks them (CPU,
// contiguous, same dtype and d, int64 lengths in range, option codes in range) with N_img, N_cap >= 1.
// float64 inputs feed sink64 (T = double); float32, bfloat16 and float16 (converted to float32 once) feed sink32.
// Every (image, caption) pair is delivered exactly once. Memory: the per-call tables and per-worker tile scratch
// of xattn_sim_fwd, no (N_img, N_cap) output.
void xattn_sim_tiles(const at::Tensor& images, const at::Tensor& captions, const at::Tensor& cap_lens,
                     const at::Tensor& img_lens, int64_t direction, int64_t norm, double lambda_softmax, int64_t agg,
                     double lambda_lse, int64_t max_tile_bytes, TileSink<float>* sink32, TileSink<double>* sink64);

}  // namespace cpu
}  // namespace itm
