"""``attention="hard"``: late interaction (ColBERT MaxSim / CHAN hard alignment), tiled, on every backend.

t2i: R_t = max_k cosine(e_t, v_k) over the image's valid regions, aggregated over the caption's words by ``agg``
(i2t: regions and words swap roles). cosine = x.y / max(|x| |y|, 1e-8), as in the soft path.

One implementation serves every backend (``cpu``, ``torch``, ``triton``, ``cuda``): per (image block x caption
block) tile, one GEMM of the raw features ((B_i K) x d by d x (B_c L), a tuned BLAS / cuBLAS call), a division by
the outer product of the norms, a masked max and the aggregation. The (N_img, N_cap, K, L) tensor never exists:
a tile holds at most ``max_tile_bytes`` of scores. Autograd: each tile runs under activation checkpointing, so
the backward recomputes the tile and saves only the inputs (memory as the forward).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .._common.constants import EPS
from .._common.dtypes import compute_dtype, out_dtype
from .reference import aggregate

__all__ = ["xattn_sim_hard"]

_DEFAULT_TILE_BYTES = 32 << 20


def _tile(q, q_valid, c, c_valid, agg, lambda_lse):
    """q (Bq, Lq, d), c (Bc, Lc, d), padding zeroed -> (Bc, Bq) scores, context axis maxed, query aggregated."""
    s = torch.einsum("ckd,qtd->cqkt", c, q)
    norms = c.norm(dim=-1)[:, None, :, None] * q.norm(dim=-1)[None, :, None, :]
    cos = (s / norms.clamp_min(EPS)).masked_fill(~c_valid[:, None, :, None], float("-inf"))
    return aggregate(cos.amax(dim=2), q_valid[None], agg, lambda_lse)


def xattn_sim_hard(images, captions, cap_lens, img_lens, *, direction, agg, lambda_lse, max_tile_bytes=None):
    """(N_img, K, d), (N_cap, L, d) validated inputs -> (N_img, N_cap) hard-attention similarities.

    Arithmetic in float32 for 16-bit inputs (float64 for float64); output dtype as ``xattn_sim``.
    """
    dt = compute_dtype(images.dtype)
    n_img, K, _ = images.shape
    n_cap, L, _ = captions.shape
    ar_k, ar_l = torch.arange(K, device=images.device), torch.arange(L, device=images.device)
    img_valid = ar_k[None] < (img_lens if img_lens is not None else torch.full((n_img,), K, device=images.device))[:, None]
    cap_valid = ar_l[None] < cap_lens[:, None]
    zero = torch.zeros((), dtype=dt, device=images.device)
    im = torch.where(img_valid[..., None], images.to(dt), zero)
    cap = torch.where(cap_valid[..., None], captions.to(dt), zero)
    budget = (max_tile_bytes or _DEFAULT_TILE_BYTES) // (torch.finfo(dt).bits // 8 * 3)  # s, norms, cos
    pairs = max(1, budget // max(1, K * L))
    bi = min(n_img, max(1, int(pairs ** 0.5)))
    bc = min(n_cap, max(1, pairs // bi))
    grad = torch.is_grad_enabled() and (images.requires_grad or captions.requires_grad)
    rows = []
    for i0 in range(0, n_img, bi):
        cols = []
        for c0 in range(0, n_cap, bc):
            args = (im[i0:i0 + bi], img_valid[i0:i0 + bi], cap[c0:c0 + bc], cap_valid[c0:c0 + bc])
            if direction == "t2i":
                fn = lambda a, av, b, bv: _tile(b, bv, a, av, agg, lambda_lse)  # noqa: E731  (N_i, N_c)
            else:
                fn = lambda a, av, b, bv: _tile(a, av, b, bv, agg, lambda_lse).t()  # noqa: E731
            cols.append(checkpoint(fn, *args, use_reentrant=False) if grad else fn(*args))
        rows.append(torch.cat(cols, dim=1))
    return torch.cat(rows, dim=0).to(out_dtype(images.dtype))
