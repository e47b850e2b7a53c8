"""Running top-k over a stream of score tiles, with one documented tie order.

Tie order (the whole library's): among equal scores the HIGHER gallery index comes first. This is the order of
the official evaluation's ``np.argsort(d)[::-1]`` made deterministic, the same rule that
``itm_models.eval.metrics.recall`` documents, so ``topk`` indices and recall ranks agree.

Memory: one merge holds the (Q, k + G) candidates of a tile of G gallery items: O(Q x (k + G)).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["merge_tile", "merge_candidates", "empty_topk"]


def empty_topk(n_queries: int, dtype: torch.dtype, device) -> tuple[Tensor, Tensor]:
    """The running state before any tile: (Q, 0) values and (Q, 0) int64 indices."""
    return (torch.empty((n_queries, 0), dtype=dtype, device=device),
            torch.empty((n_queries, 0), dtype=torch.long, device=device))


def merge_tile(best_v: Tensor, best_i: Tensor, tile: Tensor, first_index: int, k: int) -> tuple[Tensor, Tensor]:
    """Merge a tile of scores into the running top-k.

    Args:
        best_v, best_i: (Q, k') running values (descending, ties by descending index) and their int64 indices,
            all indices below ``first_index``.
        tile: (Q, G) scores of gallery items ``first_index .. first_index + G - 1``.
        k: how many to keep.

    Returns:
        The new (Q, min(k, k' + G)) values and indices, in the tie order of the module docstring.

    Every tile index exceeds every running index, so the candidates laid out as [tile reversed, running] are
    already in descending-index order among equal values; one stable descending sort by value gives the order.
    """
    g = tile.shape[1]
    idx = torch.arange(first_index + g - 1, first_index - 1, -1, device=tile.device, dtype=torch.long)
    cand_v = torch.cat([tile.flip(1).to(best_v.dtype), best_v], dim=1)
    cand_i = torch.cat([idx.expand(tile.shape[0], g), best_i], dim=1)
    v, order = torch.sort(cand_v, dim=1, descending=True, stable=True)
    keep = min(k, v.shape[1])
    return v[:, :keep].contiguous(), cand_i.gather(1, order[:, :keep])


def merge_candidates(values: Tensor, indices: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k of arbitrary (Q, M) candidates (e.g. the per-rank top-k lists side by side), same tie order.

    Sorts by index descending, then stably by value descending.
    """
    io = torch.argsort(indices, dim=1, descending=True, stable=True)
    v, i = values.gather(1, io), indices.gather(1, io)
    vo = torch.argsort(v, dim=1, descending=True, stable=True)[:, :k]
    return v.gather(1, vo), i.gather(1, vo)
