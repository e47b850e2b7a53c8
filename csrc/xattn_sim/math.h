// Per-element and per-row math of the SCAN similarity epilogue, shared by the CPU and CUDA kernels.
// Torch-free: this header compiles alone under g++ and nvcc, so the CPU tests exercise the math the GPU runs.
#pragma once

#include <cmath>

#include "common/constants.h"

namespace itm {

// The official `raw_feature_norm` values, in the order the Python layer encodes them.
enum Norm : int { kSoftmax = 0, kL2Norm = 1, kClippedL2Norm = 2, kL1Norm = 3, kClippedL1Norm = 4, kClipped = 5, kNoNorm = 6 };
enum Agg : int { kLse = 0, kMean = 1, kMax = 2, kSum = 3 };
enum Direction : int { kT2I = 0, kI2T = 1 };

ITM_HD bool norm_clips(int norm) { return norm == kClippedL2Norm || norm == kClippedL1Norm || norm == kClipped; }

template <class T> ITM_HD T leaky_relu(T x) { return x > T(0) ? x : T(kLeakySlope) * x; }

// Value of one score before the query-axis reduction: LeakyReLU for the clipped norms, identity otherwise.
template <class T> ITM_HD T pre_norm(T s, int norm) { return norm_clips(norm) ? leaky_relu(s) : s; }

// Contribution of one pre-normed score to the query-axis statistic: sum of squares (l2), of |x| (l1), or
// nothing. Softmax uses max/sum-exp instead (see softmax_* below).
template <class T> ITM_HD T norm_stat_term(T x, int norm) {
  if (norm == kL2Norm || norm == kClippedL2Norm) return x * x;
  if (norm == kL1Norm || norm == kClippedL1Norm) return x < T(0) ? -x : x;
  return T(0);
}

// Multiplier that turns the accumulated statistic into the normalising factor (x_normed = x * factor).
template <class T> ITM_HD T norm_factor(T stat, int norm) {
  if (norm == kL2Norm || norm == kClippedL2Norm) return T(1) / (std::sqrt(stat) + T(kEps));
  if (norm == kL1Norm || norm == kClippedL1Norm) return T(1) / (stat + T(kEps));
  return T(1);
}

// Softmax along the query axis (norm == kSoftmax): x_normed = exp(x - max) / sum_exp.
template <class T> ITM_HD T softmax_normed(T x, T row_max, T inv_sum_exp) { return std::exp(x - row_max) * inv_sum_exp; }

// Cosine of a query item with its attended context from the Gram identity: dot = sum alpha s, |a|^2 = alpha^T G alpha.
template <class T> ITM_HD T cosine_from_gram(T dot, T query_norm, T attended_sq_norm) {
  T denom = query_norm * std::sqrt(attended_sq_norm > T(0) ? attended_sq_norm : T(0));
  return dot / (denom > T(kEps) ? denom : T(kEps));
}

// Streaming aggregation of the per-query cosines R over the query axis.
template <class T> struct Aggregator {
  int agg;
  T lambda_lse;
  T acc;   // lse: sum exp(lambda (R - m)); mean/sum: sum R; max: max R
  T m;     // lse: running max of R
  int count;

  ITM_HD Aggregator(int agg_, T lambda_lse_) : agg(agg_), lambda_lse(lambda_lse_), acc(T(0)), m(-INFINITY), count(0) {}

  ITM_HD void push(T r) {
    ++count;
    if (agg == kLse) {
      if (r > m) { acc = acc * std::exp(lambda_lse * (m - r)) + T(1); m = r; }
      else { acc += std::exp(lambda_lse * (r - m)); }
    } else if (agg == kMax) {
      acc = count == 1 ? r : (r > acc ? r : acc);
    } else {
      acc += r;
    }
  }

  ITM_HD T result() const {
    if (agg == kLse) return m + std::log(acc) / lambda_lse;
    if (agg == kMean) return acc / T(count);
    return acc;
  }
};

}  // namespace itm
