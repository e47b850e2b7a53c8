"""``local_sim(..., direction="i2t")``: the image-to-text stream of TSHSR (``itm_models.tshsr``): every REGION
attends over the caption's words (SCAN's i2t ``func_attention`` semantics, ``shared/reference/SEMANTICS.md``).

For every image i, caption c and region k (words t < cap_len[c] only)::

    s_kt    = v_k . e_t
    n_kt    = l2norm_k(LeakyReLU_0.1(s_kt))             over the query axis: the image's regions, eps 1e-8
    alpha_k = softmax_t(lambda_softmax * n_kt)          over the caption's words
    a_k     = sum_t alpha_kt e_t,  a^_k = a_k / (|a_k| + 1e-8)
    y_k     = W (a^_k - v_k)^2 + b,  out_k = y_k / (|y_k| + 1e-8)

Result (N_img, N_cap, K, s); every row is valid (no padding rows: all K regions are real).

Exact delegation to the t2i kernels of every backend: within one caption-length bucket (captions of length l)
every word is valid, so the bucket's captions[:, :l] act as "images" (l "regions"), the images act as "captions"
(K "words", all valid), and the t2i op computes precisely the formulas above (its l2norm runs over its "words" =
the regions, its softmax over its "regions" = the words). Autograd is the t2i op's. Cost: one t2i call per
distinct caption length (at most L_max calls), the same FLOPs as t2i; memory: the output plus one bucket's
(N_cap_l, N_img, K, s) result before it is scattered.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._common.constants import EPS, LEAKY_SLOPE


def local_sim_i2t_reference(images: Tensor, captions: Tensor, cap_lens, weight: Tensor, bias: Tensor, *,
                            lambda_softmax: float = 9.0, compute_dtype=None) -> Tensor:
    """The readable i2t spec (materialises every (pair, region, d) attended vector; small inputs only).

    Args as :func:`itm_kernels.local_sim.local_sim`. Returns (N_img, N_cap, K, s) in ``compute_dtype`` (default
    the input dtype). Padding words are never read (replaced by zeros and masked out of the softmax).
    """
    dtype = compute_dtype or images.dtype
    v, e = images.to(dtype), captions.to(dtype)
    w, b = weight.to(dtype), bias.to(dtype)
    cap_lens = torch.as_tensor(cap_lens, device=images.device).long()
    valid = torch.arange(e.shape[1], device=e.device)[None, :] < cap_lens[:, None]        # (Nc, L)
    zero = torch.zeros((), dtype=dtype, device=e.device)
    e = torch.where(valid[..., None], e, zero)
    s = torch.einsum("ikd,ctd->ickt", v, e)                                                 # (Ni, Nc, K, L)
    h = torch.nn.functional.leaky_relu(s, LEAKY_SLOPE)
    sq = h.pow(2).sum(dim=2, keepdim=True)                                                  # over the regions
    pad = ~valid[None, :, None, :]
    usable = ~pad & (sq > 0)                                                                # no sqrt'(0) anywhere
    n = h / (torch.where(usable, sq, 1.0).sqrt() * usable + EPS)
    logits = torch.where(valid[None, :, None, :], lambda_softmax * n,
                         torch.tensor(float("-inf"), dtype=dtype, device=e.device))
    alpha = torch.softmax(logits, dim=3)                                                    # over the words
    a = torch.einsum("ickt,ctd->ickd", alpha, e)                                            # (Ni, Nc, K, d)
    a_hat = a / (a.norm(dim=3, keepdim=True) + EPS)
    y = torch.matmul((a_hat - v[:, None]).pow(2), w.t()) + b                                # (Ni, Nc, K, s)
    return y / (y.norm(dim=3, keepdim=True) + EPS)


def local_sim_i2t(t2i, images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor, bias: Tensor,
                  **kwargs) -> Tensor:
    """i2t by length buckets over the t2i op ``t2i`` (a callable with local_sim's signature); see module doc."""
    n_img, k = images.shape[0], images.shape[1]
    region_lens = torch.full((n_img,), k, dtype=torch.long, device=images.device)
    parts, order = [], []
    for length in torch.unique(cap_lens).tolist():
        idx = (cap_lens == length).nonzero().squeeze(1)
        words = captions.index_select(0, idx)[:, :length]                                   # (n_l, l, d)
        out = t2i(words, images, region_lens, weight, bias, **kwargs)                       # (n_l, N_img, K, s)
        parts.append(out.transpose(0, 1))
        order.append(idx)
    out = torch.cat(parts, dim=1)                                                           # (N_img, N_cap, K, s)
    inv = torch.argsort(torch.cat(order))
    return out.index_select(1, inv)
