"""The Gram-identity guard every op's torch backend shares (the C++ kernels: itm::kGramCancelRatio).

The fused kernels take |a|^2 = alpha^T G alpha with the context's Gram matrix G instead of forming the attended
vector a = sum_c alpha_c v_c. In float32 that quadratic form cancels when a nearly vanishes against the vectors it
is made of (e.g. two nearly opposite regions attended equally): its rounding error is about eps (sum_c alpha_c
|v_c|)^2, so a cosine can leave [-1, 1] (1.024, or 5000). Items where alpha^T G alpha < GRAM_CANCEL_RATIO
(sum_c alpha_c |v_c|)^2 are rare in real data; they are recomputed from the explicit a in float64.

The Triton kernels (``itm_kernels/xattn_sim/triton.py``, ``itm_kernels/local_sim/triton.py``) apply the same test
on the device in two launches over one grid: the main pass writes one int8 flag per program, and a fix-up pass
(the same kernel specialised with FIX=True) returns at once for unflagged programs and recomputes flagged ones from
the explicit attended vectors in float32, chunked over d; their fused backwards take |a|^2 and G alpha from the
explicit a on flagged pairs. No host sync either way.
"""
from __future__ import annotations

import torch

from .constants import GRAM_CANCEL_RATIO

# Scratch of the exact recompute (explicit attended vectors of the flagged items, float64).
EXACT_CHUNK_BYTES = 8 << 20


def cancelled(a_sq, alpha, gram):
    """Where the Gram identity cancels: alpha^T G alpha < GRAM_CANCEL_RATIO (sum_c alpha_c |v_c|)^2, |v_c| =
    sqrt(G_cc). alpha (..., C, Q) has the context axis second to last; gram (..., C, C) broadcasts against it."""
    v_norm = torch.diagonal(gram, dim1=-2, dim2=-1).clamp_min(0).sqrt()
    b = (alpha * v_norm.unsqueeze(-1)).sum(-2)
    return a_sq < GRAM_CANCEL_RATIO * b * b


def exact_attended(weights, context, d, query=None, *, max_bytes=EXACT_CHUNK_BYTES):
    """q.a and |a|^2 in float64 for a = sum_c weights_c context_c, per row: weights (n, C), context (n, C, d) or a
    callable giving rows [j0, j1) of it, query (n, d) or None (q.a returned as 0). The rare path of the guard;
    float64 (n,) results; memory in chunks of ``max_bytes``."""
    n, C = weights.shape
    step = max(1, max_bytes // (8 * C * d))
    dots, sqs = [weights.new_zeros(0, dtype=torch.float64)], [weights.new_zeros(0, dtype=torch.float64)]
    for j0 in range(0, n, step):
        j1 = min(n, j0 + step)
        ctx = context(j0, j1) if callable(context) else context[j0:j1]
        a = torch.einsum("nc,ncd->nd", weights[j0:j1].double(), ctx.double())
        dots.append(a.new_zeros(j1 - j0) if query is None else (a * query[j0:j1].double()).sum(-1))
        sqs.append((a * a).sum(-1))
    return torch.cat(dots), torch.cat(sqs)


def attended_vectors(weights, context, d, *, max_bytes=EXACT_CHUNK_BYTES):
    """The explicit a = sum_c weights_c context_c in float64, (n, d), for weights (n, C) and context as in
    :func:`exact_attended` (chunked: the (n, C, d) gather never exists whole)."""
    n, C = weights.shape
    step = max(1, max_bytes // (8 * C * d))
    out = [weights.new_zeros(0, d, dtype=torch.float64)]
    for j0 in range(0, n, step):
        j1 = min(n, j0 + step)
        ctx = context(j0, j1) if callable(context) else context[j0:j1]
        out.append(torch.einsum("nc,ncd->nd", weights[j0:j1].double(), ctx.double()))
    return torch.cat(out)
