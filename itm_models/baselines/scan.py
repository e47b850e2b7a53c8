"""The official SCAN evaluation loop, restated (benchmark baseline): image/caption shards, a Python loop over
captions and the official ``func_attention`` per caption (kuanghuei/SCAN ``xattn_score_t2i`` / ``xattn_score_i2t``).
Not for production use: it is what ``itm_kernels.xattn_sim`` replaces; its spec is ``itm_kernels.xattn_sim.reference``.
"""
from __future__ import annotations

import torch

from itm_kernels._common.constants import EPS, LEAKY_SLOPE

__all__ = ["official_style_sims"]


def _official_func_attention(query, context, norm, smooth):
    """One official ``func_attention`` call: query (n, Lq, d), context (n, Lc, d) -> weighted context (n, Lq, d)."""
    attn = torch.bmm(context, query.transpose(1, 2))                  # (n, Lc, Lq)
    if norm in ("clipped_l2norm", "clipped_l1norm", "clipped"):
        attn = torch.nn.functional.leaky_relu(attn, LEAKY_SLOPE)
    if norm == "softmax":
        attn = torch.softmax(attn, dim=2)
    elif norm in ("l2norm", "clipped_l2norm"):
        attn = attn / (attn.pow(2).sum(dim=2, keepdim=True).sqrt() + EPS)
    elif norm in ("l1norm", "clipped_l1norm"):
        attn = attn / (attn.abs().sum(dim=2, keepdim=True) + EPS)
    attn = torch.softmax(attn.transpose(1, 2) * smooth, dim=2)       # (n, Lq, Lc)
    return torch.bmm(attn, context)


def _official_cosine(x1, x2):
    w12 = (x1 * x2).sum(2)
    return w12 / (x1.norm(dim=2) * x2.norm(dim=2)).clamp(min=EPS)


def official_style_sims(images, captions, cap_lens, *, direction="t2i", norm="clipped_l2norm", lambda_softmax=9.0,
                        agg="lse", lambda_lse=6.0, shard_size=128, progress=False):
    """The official evaluation loop, restated: image/caption shards, a Python loop over captions, each caption
    repeated once per image and the weighted context (n_img, L, d) or (n_img, K, d) materialised per caption.

    Benchmark baseline only. Args as :func:`xattn_sim` (no ragged images); returns (N_img, N_cap) in the input
    dtype. Peak extra memory per caption: n_img_shard * max(K, L) * d values for the weighted context.
    """
    from tqdm import tqdm

    n_img, n_cap = images.shape[0], captions.shape[0]
    sims = torch.empty(n_img, n_cap, dtype=images.dtype)
    lens = [int(x) for x in cap_lens]
    for i0 in range(0, n_img, shard_size):
        im = images[i0:i0 + shard_size]
        for c in tqdm(range(n_cap), disable=not progress, desc=f"official-style shard {i0 // shard_size}"):
            cap_i = captions[c, :lens[c]].unsqueeze(0).repeat(im.shape[0], 1, 1)
            if direction == "t2i":
                query, weighted = cap_i, _official_func_attention(cap_i, im, norm, lambda_softmax)
            else:
                query, weighted = im, _official_func_attention(im, cap_i, norm, lambda_softmax)
            row = _official_cosine(query, weighted)
            if agg == "lse":
                row = torch.log(torch.exp(row * lambda_lse).sum(dim=1)) / lambda_lse
            elif agg == "max":
                row = row.max(dim=1)[0]
            elif agg == "sum":
                row = row.sum(dim=1)
            else:
                row = row.mean(dim=1)
            sims[i0:i0 + im.shape[0], c] = row
    return sims
