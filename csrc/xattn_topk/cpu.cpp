// CPU kernel of itm_kernels::xattn_topk_fwd: the k best SCAN scores per query without the (N_img, N_cap) matrix.
//
// The scores come from xattn_sim's own tile loop (csrc/xattn_sim/tiles.h): same tables, tiling, GEMMs and
// epilogue, so every score is bitwise the entry of xattn_sim_fwd's matrix. Each worker thread keeps, per query, a
// bounded heap of its k best (score, gallery index) pairs, fed from the tile it has just finished (the tile is a
// few KiB of thread scratch: images of the tile x captions of the tile). At the end the per-thread heaps of each
// query (at most threads x k candidates) are merged and sorted.
//
// Order ("better"): a higher score first; NaN above every number (as torch.topk and torch.sort); among equal
// scores (and among NaNs) the HIGHER gallery index first: the tie rule of itm_models.eval.metrics.recall and of
// the streaming driver (itm_kernels/xattn_topk/merge.py).
//
// Memory beyond the inputs and xattn_sim's per-call tables and per-thread tile scratch: per worker thread that
// ran a tile, N_queries x k (score, index) pairs; the (N_queries, k) outputs.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <tuple>
#include <vector>

#include "xattn_sim/math.h"
#include "xattn_sim/tiles.h"

namespace itm {
namespace cpu {
namespace {

template <class T> struct Entry {
  T v;
  int64_t i;
};

// Whether (va, ia) ranks before (vb, ib).
template <class T> inline bool better(T va, int64_t ia, T vb, int64_t ib) {
  const bool na = std::isnan(va), nb = std::isnan(vb);
  if (na || nb) return na && (!nb || ia > ib);
  return va > vb || (va == vb && ia > ib);
}

template <class T> struct Better {
  bool operator()(const Entry<T>& a, const Entry<T>& b) const { return better(a.v, a.i, b.v, b.i); }
};

// Per query a heap of at most k entries with the worst at the front (std heap functions under Better<T>).
template <class T> struct Heaps {
  int64_t k;
  std::vector<Entry<T>> e;  // query q: e[q * k, q * k + n[q])
  std::vector<int64_t> n;

  Heaps(int64_t n_queries, int64_t k_) : k(k_), e(n_queries * k_), n(n_queries, 0) {}

  inline void offer(int64_t q, T v, int64_t i) {
    Entry<T>* h = e.data() + q * k;
    int64_t& m = n[q];
    if (m < k) {
      h[m++] = {v, i};
      std::push_heap(h, h + m, Better<T>());
    } else if (better(v, i, h[0].v, h[0].i)) {
      replace_worst(h, {v, i});
    }
  }

  // Replaces the front (the worst of a full heap) by x and sifts it down.
  inline void replace_worst(Entry<T>* h, Entry<T> x) {
    int64_t p = 0;
    for (;;) {
      int64_t c = 2 * p + 1;
      if (c >= k) break;
      if (c + 1 < k && better(h[c].v, h[c].i, h[c + 1].v, h[c + 1].i)) ++c;  // the worse child
      if (!better(x.v, x.i, h[c].v, h[c].i)) break;
      h[p] = h[c];
      p = c;
    }
    h[p] = x;
  }
};

template <class T> struct TopkSink final : TileSink<T> {
  int64_t n_q, k;
  bool queries_images;
  std::vector<std::unique_ptr<Heaps<T>>> slots;

  TopkSink(int64_t n_q_, int64_t k_, bool qi, int64_t n_slots) : n_q(n_q_), k(k_), queries_images(qi),
                                                                   slots(std::max<int64_t>(1, n_slots)) {}

  void consume(int64_t slot, const T* scores, int64_t ld, int64_t i0, int64_t i1, int64_t c0,
               int64_t c1) override {
    TORCH_CHECK(slot >= 0 && slot < static_cast<int64_t>(slots.size()), "xattn_topk_fwd: worker slot ", slot,
                " outside 0..", slots.size() - 1);
    auto& hp = slots[slot];
    if (!hp) hp = std::make_unique<Heaps<T>>(n_q, k);
    Heaps<T>& h = *hp;
    for (int64_t i = i0; i < i1; ++i) {
      const T* row = scores + (i - i0) * ld;
      if (queries_images)
        for (int64_t c = c0; c < c1; ++c) h.offer(i, row[c - c0], c);
      else
        for (int64_t c = c0; c < c1; ++c) h.offer(c, row[c - c0], i);
    }
  }

  // (values, indices) of shape (n_q, k), best first.
  void finish(T* values, int64_t* indices) {
    std::vector<const Heaps<T>*> used;
    for (auto& s : slots)
      if (s) used.push_back(s.get());
    at::parallel_for(0, n_q, 64, [&](int64_t q0, int64_t q1) {
      std::vector<Entry<T>> cand;
      for (int64_t q = q0; q < q1; ++q) {
        cand.clear();
        for (const Heaps<T>* h : used) cand.insert(cand.end(), h->e.begin() + q * k, h->e.begin() + q * k + h->n[q]);
        TORCH_CHECK(static_cast<int64_t>(cand.size()) >= k, "xattn_topk_fwd: internal error: query ", q, " saw ",
                    cand.size(), " gallery items, fewer than k = ", k);
        std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), Better<T>());
        for (int64_t j = 0; j < k; ++j) {
          values[q * k + j] = cand[j].v;
          indices[q * k + j] = cand[j].i;
        }
      }
    });
  }
};

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_lengths(const at::Tensor& lens, const char* name, int64_t count, int64_t max_len) {
  TORCH_CHECK(lens.device().is_cpu(), "xattn_topk_fwd: ", name, " must be a CPU tensor");
  TORCH_CHECK(lens.scalar_type() == at::kLong, "xattn_topk_fwd: ", name, " must be int64, got ", lens.scalar_type());
  TORCH_CHECK(lens.dim() == 1 && lens.size(0) == count, "xattn_topk_fwd: ", name, " must have shape (", count,
              ",), got ", lens.sizes());
  TORCH_CHECK(lens.is_contiguous(), "xattn_topk_fwd: ", name, " must be contiguous");
  const int64_t* p = lens.data_ptr<int64_t>();
  for (int64_t i = 0; i < count; ++i)
    TORCH_CHECK(p[i] >= 1 && p[i] <= max_len, "xattn_topk_fwd: ", name, "[", i, "] = ", p[i], " is outside 1..",
                max_len);
}

template <class T>
std::tuple<at::Tensor, at::Tensor> run_topk(const at::Tensor& images, const at::Tensor& captions,
                                            const at::Tensor& cap_lens, const at::Tensor& img_lens, int64_t k,
                                            bool queries_images, int64_t direction, int64_t norm,
                                            double lambda_softmax, int64_t agg, double lambda_lse,
                                            int64_t max_tile_bytes) {
  const int64_t n_q = queries_images ? images.size(0) : captions.size(0);
  const auto vdtype = std::is_same<T, double>::value ? at::kDouble : at::kFloat;
  at::Tensor values = at::empty({n_q, k}, images.options().dtype(vdtype));
  at::Tensor indices = at::empty({n_q, k}, images.options().dtype(at::kLong));
  if (n_q == 0) return {values, indices};
  TopkSink<T> sink(n_q, k, queries_images, at::get_num_threads());
  TileSink<float>* s32 = nullptr;
  TileSink<double>* s64 = nullptr;
  if constexpr (std::is_same<T, double>::value)
    s64 = &sink;
  else
    s32 = &sink;
  xattn_sim_tiles(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                  max_tile_bytes, s32, s64);
  sink.finish(values.data_ptr<T>(), indices.data_ptr<int64_t>());
  return {values, indices};
}

std::tuple<at::Tensor, at::Tensor> xattn_topk_fwd_cpu(const at::Tensor& images, const at::Tensor& captions,
                                                      const at::Tensor& cap_lens, const at::Tensor& img_lens,
                                                      int64_t k, bool queries_images, int64_t direction,
                                                      int64_t norm, double lambda_softmax, int64_t agg,
                                                      double lambda_lse, int64_t max_tile_bytes) {
  TORCH_CHECK(images.dim() == 3, "xattn_topk_fwd: images must be (N_img, K, d), got ", images.sizes());
  TORCH_CHECK(captions.dim() == 3, "xattn_topk_fwd: captions must be (N_cap, L_max, d), got ", captions.sizes());
  TORCH_CHECK(images.device().is_cpu() && captions.device().is_cpu(), "xattn_topk_fwd: CPU tensors expected");
  TORCH_CHECK(images.size(2) == captions.size(2), "xattn_topk_fwd: images d = ", images.size(2),
              " but captions d = ", captions.size(2));
  TORCH_CHECK(images.size(2) >= 1, "xattn_topk_fwd: the feature size d must be at least 1");
  TORCH_CHECK(images.size(1) >= 1 && captions.size(1) >= 1, "xattn_topk_fwd: K and L_max must be at least 1, got ",
              images.size(1), " and ", captions.size(1));
  TORCH_CHECK(images.scalar_type() == captions.scalar_type(), "xattn_topk_fwd: images are ", images.scalar_type(),
              " but captions are ", captions.scalar_type());
  TORCH_CHECK(is_float_dtype(images.scalar_type()), "xattn_topk_fwd: float16, bfloat16, float32 or float64 "
              "features expected, got ", images.scalar_type());
  TORCH_CHECK(images.is_contiguous() && captions.is_contiguous(), "xattn_topk_fwd: images and captions must be "
              "contiguous");
  TORCH_CHECK(direction == kT2I || direction == kI2T, "xattn_topk_fwd: direction must be 0 (t2i) or 1 (i2t), got ",
              direction);
  TORCH_CHECK(norm >= kSoftmax && norm <= kNoNorm, "xattn_topk_fwd: norm must be in 0..6, got ", norm);
  TORCH_CHECK(agg >= kLse && agg <= kSum, "xattn_topk_fwd: agg must be in 0..3, got ", agg);
  TORCH_CHECK(std::isfinite(lambda_softmax) && lambda_softmax >= 0, "xattn_topk_fwd: lambda_softmax must be finite "
              "and >= 0, got ", lambda_softmax);
  TORCH_CHECK(std::isfinite(lambda_lse), "xattn_topk_fwd: lambda_lse must be finite, got ", lambda_lse);
  TORCH_CHECK(agg != kLse || lambda_lse > 0, "xattn_topk_fwd: lambda_lse must be > 0 for LogSumExp, got ",
              lambda_lse);
  TORCH_CHECK(max_tile_bytes >= 0, "xattn_topk_fwd: max_tile_bytes must be >= 0 (0: default), got ",
              max_tile_bytes);
  const int64_t NI = images.size(0), K = images.size(1), NC = captions.size(0), L = captions.size(1);
  check_lengths(cap_lens, "cap_lens", NC, L);
  check_lengths(img_lens, "img_lens", NI, K);
  const int64_t n_g = queries_images ? NC : NI;
  TORCH_CHECK(k >= 1 && k <= n_g, "xattn_topk_fwd: k must lie in 1..", n_g, " (the gallery: ",
              queries_images ? "N_cap" : "N_img", "), got ", k);
  if (images.scalar_type() == at::kDouble)
    return run_topk<double>(images, captions, cap_lens, img_lens, k, queries_images, direction, norm, lambda_softmax,
                            agg, lambda_lse, max_tile_bytes);
  return run_topk<float>(images, captions, cap_lens, img_lens, k, queries_images, direction, norm, lambda_softmax,
                         agg, lambda_lse, max_tile_bytes);
}

}  // namespace
}  // namespace cpu
}  // namespace itm

// The schema of itm_kernels::xattn_topk_fwd. queries_images: true for the k best captions of each image (rows of
// the score matrix), false for the k best images of each caption (its columns). The options and their codes are
// xattn_sim_fwd's (csrc/xattn_sim/cpu.cpp). Returns (values (N_q, k): float64 for float64 inputs, float32
// otherwise; indices (N_q, k) int64), best first, ties by the higher index first.
TORCH_LIBRARY_FRAGMENT(itm_kernels, m) {
  m.def("xattn_topk_fwd(Tensor images, Tensor captions, Tensor cap_lens, Tensor img_lens, int k, bool queries_images, "
        "int direction, int norm, float lambda_softmax, int agg, float lambda_lse, int max_tile_bytes) "
        "-> (Tensor, Tensor)");
}

namespace {

// Shapes and dtypes only, for tracing (FakeTensor / opcheck).
std::tuple<at::Tensor, at::Tensor> xattn_topk_fwd_meta(const at::Tensor& images, const at::Tensor& captions,
                                                       const at::Tensor& cap_lens, const at::Tensor& img_lens,
                                                       int64_t k, bool queries_images, int64_t, int64_t, double,
                                                       int64_t, double, int64_t) {
  TORCH_CHECK(images.dim() == 3 && captions.dim() == 3, "xattn_topk_fwd: images and captions must be 3-D");
  TORCH_CHECK(captions.device() == images.device() && cap_lens.device() == images.device() &&
                  img_lens.device() == images.device(),
              "xattn_topk_fwd: images, captions, cap_lens and img_lens must be on one device");
  const int64_t n_q = queries_images ? images.size(0) : captions.size(0);
  const auto dtype = images.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  return {at::empty({n_q, k}, images.options().dtype(dtype)), at::empty({n_q, k}, images.options().dtype(at::kLong))};
}

}  // namespace

TORCH_LIBRARY_IMPL(itm_kernels, CPU, m) { m.impl("xattn_topk_fwd", &itm::cpu::xattn_topk_fwd_cpu); }
TORCH_LIBRARY_IMPL(itm_kernels, Meta, m) { m.impl("xattn_topk_fwd", &xattn_topk_fwd_meta); }
