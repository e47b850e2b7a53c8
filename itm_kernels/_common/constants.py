"""The constants every op and backend shares: ONE definition each (C++: csrc/common/constants.h has EPS and
LEAKY_SLOPE as itm::kEps / itm::kLeakySlope; Triton kernels take ``tl.constexpr`` copies of these values)."""
from __future__ import annotations

import torch

# The official eps: l2norm/l1norm add it to the norm; cosines clamp |x| |y| to it.
EPS = 1e-8
# Gram-identity guard (C++: itm::kGramCancelRatio): |a|^2 = alpha^T G alpha cancels in float32 when the attended
# context nearly vanishes; an item with alpha^T G alpha < GRAM_CANCEL_RATIO (sum_k alpha_k |v_k|)^2 is recomputed
# from the explicit context (float64 on the torch backends).
GRAM_CANCEL_RATIO = 1e-3
# LeakyReLU slope of SCAN's clipped norms, SGRAF's and GSMN's attention.
LEAKY_SLOPE = 0.1

# SCAN's options, in the order the compiled kernels encode them (csrc/xattn_sim/math.h: Norm, Agg, Direction).
NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm")
AGGS = ("lse", "mean", "max", "sum")
DIRECTIONS = ("t2i", "i2t")

# Input dtypes every op takes.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# The ``backend`` argument of every op.
BACKENDS = ("auto", "cpu", "triton", "cuda", "torch", "reference")
