"""The specification of ``node_match``: GSMN's node-level matching vectors, written for readability (see
``itm_kernels.node_match`` for the math)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common.constants import EPS, LEAKY_SLOPE

DEFAULT_LAMBDA_SOFTMAX = 20.0          # Flickr30K (COCO: 10)
DEFAULT_NUM_BLOCKS = 16


def _norm(x: Tensor, dim: int, keepdim: bool = True) -> Tensor:
    """The l2 norm over ``dim``, with gradient 0 (not NaN) where it is 0 (an all-zero word or region vector)."""
    sq = x.pow(2).sum(dim=dim, keepdim=keepdim)
    pos = sq > 0
    return torch.where(pos, torch.where(pos, sq, 1.0).sqrt(), 0.0)


def node_match_reference(images: Tensor, captions: Tensor, cap_lens, *, lambda_softmax: float = DEFAULT_LAMBDA_SOFTMAX,
                         num_blocks: int = DEFAULT_NUM_BLOCKS, compute_dtype=None) -> tuple[Tensor, Tensor]:
    """The readable spec: materialises every attended context (pairs x (K + L) x d). Small inputs only.

    Args as :func:`node_match`; ``compute_dtype`` (default: the input dtype) is the dtype of all the arithmetic.
    Differentiable by autograd. Returns (region_match (N_img, N_cap, K, B), word_match (N_img, N_cap, L_max, B))
    in ``compute_dtype``, word rows beyond each caption's length zero.
    """
    dtype = compute_dtype or images.dtype
    v, e = images.to(dtype), captions.to(dtype)
    n_img, K, d = v.shape
    L = e.shape[1]
    cap_lens = torch.as_tensor(cap_lens, device=v.device).long()
    valid = torch.arange(L, device=v.device)[None, :] < cap_lens[:, None]                 # (Nc, L)
    zero = torch.zeros((), dtype=dtype, device=v.device)
    e = torch.where(valid[..., None], e, zero)
    s = torch.einsum("ikd,ctd->ickt", v, e)                                                 # (Ni, Nc, K, L)
    h = torch.nn.functional.leaky_relu(s, LEAKY_SLOPE)
    word_ok = valid[None, :, None, :]
    h = torch.where(word_ok, h, zero)
    # regions query the words: l2 over the regions, softmax over the caption's words
    n_v = h / (_norm(h, dim=2) + EPS)
    alpha = torch.softmax(torch.where(word_ok, lambda_softmax * n_v, float("-inf")), dim=3)
    ctx_v = torch.einsum("ickt,ctd->ickd", alpha, e)                                        # (Ni, Nc, K, d)
    # words query the regions: l2 over the words, softmax over the regions
    n_t = h / (_norm(h, dim=3) + EPS)
    beta = torch.softmax(lambda_softmax * n_t, dim=2)
    ctx_t = torch.einsum("ickt,ikd->ictd", beta, v)                                         # (Ni, Nc, L, d)

    def blocks(x):
        return x.reshape(*x.shape[:-1], num_blocks, d // num_blocks)

    def cos(x, y):
        return (x * y).sum(-1) / (_norm(x, -1, keepdim=False) * _norm(y, -1, keepdim=False)).clamp_min(EPS)

    region = cos(blocks(v)[:, None], blocks(ctx_v))                                         # (Ni, Nc, K, B)
    word = cos(blocks(e)[None], blocks(ctx_t))                                              # (Ni, Nc, L, B)
    return region, torch.where(valid[None, :, :, None], word, zero)
