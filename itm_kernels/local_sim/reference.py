"""The specification of ``local_sim``: SGRAF's local similarity vectors, written for readability (see
``itm_kernels.local_sim`` for the math)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common.constants import EPS, LEAKY_SLOPE

DEFAULT_LAMBDA_SOFTMAX = 9.0


def local_sim_reference(images: Tensor, captions: Tensor, cap_lens, weight: Tensor, bias: Tensor, *,
                        lambda_softmax: float = DEFAULT_LAMBDA_SOFTMAX, compute_dtype=None) -> Tensor:
    """The readable spec: materialises every (pair, word, d) attended vector. Small inputs only.

    Args as :func:`local_sim`; ``compute_dtype`` (default: the input dtype) is the dtype of ALL the arithmetic,
    so that tests can measure the error PyTorch itself makes in a low precision. Differentiable by autograd.
    Returns (N_img, N_cap, L_max, s) in ``compute_dtype``, zero beyond each caption's length.
    """
    dtype = compute_dtype or images.dtype
    v, e = images.to(dtype), captions.to(dtype)
    w, b = weight.to(dtype), bias.to(dtype)
    cap_lens = torch.as_tensor(cap_lens, device=images.device).long()
    valid = torch.arange(e.shape[1], device=e.device)[None, :] < cap_lens[:, None]        # (Nc, L)
    zero = torch.zeros((), dtype=dtype, device=e.device)
    e = torch.where(valid[..., None], e, zero)                                              # padding never read
    s = torch.einsum("ikd,ctd->ickt", v, e)                                                 # (Ni, Nc, K, L)
    h = torch.where(valid[None, :, None, :], torch.nn.functional.leaky_relu(s, LEAKY_SLOPE), zero)
    sq = h.pow(2).sum(dim=3, keepdim=True)
    n = h / (torch.where(sq > 0, sq, 1.0).sqrt() * (sq > 0) + EPS)  # over the words; sqrt'(0) never taken
    alpha = torch.softmax(lambda_softmax * n, dim=2)                                        # over the regions
    a = torch.einsum("ickt,ikd->ictd", alpha, v)                                            # (Ni, Nc, L, d)
    a_hat = a / (a.norm(dim=3, keepdim=True) + EPS)
    y = torch.matmul((a_hat - e[None]).pow(2), w.t()) + b                                   # (Ni, Nc, L, s)
    out = y / (y.norm(dim=3, keepdim=True) + EPS)
    return torch.where(valid[None, :, :, None], out, zero)
