"""``xattn_topk``: the top-k of SCAN cross-attention scores per query, without the (N_img, N_cap) matrix.

What this version is: a streaming driver over the fused ``xattn_sim`` kernels. Each (query chunk x gallery chunk)
tile is scored by ``xattn_sim`` on the chosen backend and merged into a running top-k (``merge.merge_tile``); no
C++ in-tile top-k yet (the tile is materialised, at most ``query_chunk x gallery_chunk`` scores).

Exactness: a score depends only on its (image, caption) pair, and the ``cpu`` backend is bitwise independent of
batching (tested), so on it the values equal ``torch.topk`` of the full ``xattn_sim`` matrix exactly. Backends
whose tiling changes the rounding (``torch``: its GEMM blocking depends on the batch) equal the top-k of the
matrix assembled from the same tiles exactly, and of the one-call matrix to rounding.
"""
from __future__ import annotations

import torch as _torch
from torch import Tensor

from .._common.validation import check_choice, check_xattn_args
from .merge import empty_topk, merge_tile

__all__ = ["xattn_topk", "check_k", "check_chunk", "QUERIES"]

QUERIES = ("images", "captions")
_DEFAULT_TILE = 1 << 20  # scores per tile: 4 MiB of float32


def check_k(k, gallery: int, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    if k < 1 or k > gallery:
        raise ValueError(f"{name} must lie in 1..{gallery} (the gallery size), got {k}")
    return k


def check_chunk(name: str, value) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return value


@_torch.no_grad()
def xattn_topk(images: Tensor, captions: Tensor, cap_lens, k: int, *, queries: str = "images", img_lens=None,
               direction: str = "t2i", norm: str = "clipped_l2norm", lambda_softmax: float = 9.0, agg: str = "lse",
               lambda_lse: float = 6.0, backend: str = "auto", max_tile_bytes: int | None = None,
               query_chunk: int | None = None, gallery_chunk: int | None = None,
               **extra) -> tuple[Tensor, Tensor]:
    """Top-k SCAN similarities per query, streamed tile by tile.

    Args:
        images: (N_img, K, d), captions: (N_cap, L_max, d), cap_lens: (N_cap,), img_lens: optional (N_img,):
            as in :func:`itm_kernels.xattn_sim`, as are ``direction, norm, lambda_softmax, agg, lambda_lse,
            backend, max_tile_bytes`` (and ``attention`` where ``xattn_sim`` takes it).
        k: results per query, 1..gallery size (N_cap for ``queries="images"``, N_img for ``"captions"``).
        queries: "images" (the k best captions of each image, i2t retrieval) or "captions" (the k best images
            of each caption, t2i retrieval).
        query_chunk, gallery_chunk: tile shape (queries x gallery items); default all queries and a gallery chunk
            of about 1M scores per tile.

    Returns:
        ``(values, indices)``: (N_queries, k) scores (dtype of ``xattn_sim``'s output) in descending order and
        their (N_queries, k) int64 gallery indices. Ties: the higher index first (the order of
        ``itm_models.eval.metrics.recall``).

    Memory: O(query_chunk x (k + gallery_chunk)) beyond the inputs and the kernels' tile scratch; never
    N_img x N_cap. Not differentiable (ranking); runs under ``no_grad``.

    Raises:
        TypeError / ValueError: as ``xattn_sim``, plus ``k`` not an int in 1..gallery, a bad ``queries`` or chunk.
    """
    from .. import xattn_sim  # the function (the package rebinds it)
    check_xattn_args(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                     backend)
    check_choice("queries", queries, QUERIES)
    query_chunk = check_chunk("query_chunk", query_chunk)
    gallery_chunk = check_chunk("gallery_chunk", gallery_chunk)
    n_img, n_cap = images.shape[0], captions.shape[0]
    n_q, n_g = (n_img, n_cap) if queries == "images" else (n_cap, n_img)
    k = check_k(k, n_g)
    qc = query_chunk or n_q
    gc = gallery_chunk or max(1, min(n_g, _DEFAULT_TILE // max(1, qc)))
    cap_lens_t = _torch.as_tensor(cap_lens, device=images.device) if not isinstance(cap_lens, Tensor) else cap_lens
    il = None if img_lens is None else _torch.as_tensor(img_lens, device=images.device)
    opts = dict(direction=direction, norm=norm, lambda_softmax=lambda_softmax, agg=agg, lambda_lse=lambda_lse,
                backend=backend, max_tile_bytes=max_tile_bytes, **extra)

    def tile(i0, i1, c0, c1):
        return xattn_sim(images[i0:i1], captions[c0:c1], cap_lens_t[c0:c1],
                         img_lens=None if il is None else il[i0:i1], **opts)

    out_v, out_i = [], []
    for q0 in range(0, n_q, qc):
        q1 = min(n_q, q0 + qc)
        best_v = best_i = None
        for g0 in range(0, n_g, gc):
            g1 = min(n_g, g0 + gc)
            t = tile(q0, q1, g0, g1) if queries == "images" else tile(g0, g1, q0, q1).t()
            if best_v is None:
                best_v, best_i = empty_topk(q1 - q0, t.dtype, t.device)
            best_v, best_i = merge_tile(best_v, best_i, t, g0, k)
        out_v.append(best_v)
        out_i.append(best_i)
    return _torch.cat(out_v), _torch.cat(out_i)
