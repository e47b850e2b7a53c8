"""Recall metrics and top-k without the (N_img, N_cap) matrix: tiles are scored, counted and dropped.

The metrics are :func:`itm_models.eval.metrics.recall`'s, with its tie rule stated as a count:

    rank(target) = #{k : s_k > s_target} + #{k : s_k == s_target and k > target}

so each tile adds its share of both counts and nothing else is kept. Two passes over one fixed tile grid
(image chunks x caption chunks): pass 1 scores only the tiles that meet the ground-truth block (caption c of image
c // cpi) to get every query's target score; pass 2 scores every tile and counts. Both passes use the SAME grid,
so a deterministic ``tile_fn`` gives targets bitwise equal to the entries counted against them, and the result is
exactly ``recall`` of the matrix assembled from those tiles (of the one-call matrix too when ``tile_fn`` is
batching-invariant, as the ``cpu`` xattn_sim backend is). Extra cost of pass 1: about
``img_chunk * cpi + cap_chunk`` pairs per image, small next to ``N_cap``.

Distributed: with ``torch.distributed`` initialised (or ``group=`` given), rank r takes the image chunks r, r+W,
r+2W, ... of the same grid, and the targets and counts are summed across ranks (all_reduce of int64 counts and of
float64 targets that are zero off a rank's own rows: exact). Every rank returns the same metrics, identical to one
process. No rank holds more than one tile of scores.

Memory per rank: O(N_img + N_cap) counters plus one tile.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from itm_kernels._common.validation import check_size

from .metrics import METRIC_KEYS, _RECALL_KEYS, _summary

__all__ = ["streaming_recall", "streaming_topk", "similarity_topk", "model_topk_sharded", "save_sims_npy",
           "xattn_tile_fn", "model_tile_fn", "grid", "world"]

TileFn = Callable[[int, int, int, int], torch.Tensor]


def world(group=None) -> tuple[int, int]:
    """(rank, world size) of ``group`` when torch.distributed is initialised, else (0, 1)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    return 0, 1


def _check_sizes(**sizes) -> list[int]:
    """The sizes as ints >= 1, else a ValueError naming the first bad one (before any tile is computed)."""
    return [check_size(name, value) for name, value in sizes.items()]


def grid(n: int, chunk: int) -> list[tuple[int, int]]:
    return [(a, min(n, a + chunk)) for a in range(0, n, chunk)]


def _all_reduce(t: torch.Tensor, group, size: int) -> torch.Tensor:
    if size == 1:
        return t
    import torch.distributed as dist
    dist.all_reduce(t, group=group)
    return t


def _check_tile(t: torch.Tensor, i0: int, c0: int, shape) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"tile_fn returned shape {tuple(t.shape)} for the tile at ({i0}, {c0}), expected {shape}")
    t = t.detach().to("cpu", torch.float64)
    fin = torch.isfinite(t)
    if not bool(fin.all()):
        bad = torch.nonzero(~fin)[0]
        raise ValueError(f"sims has a non-finite value at ({i0 + int(bad[0])}, {c0 + int(bad[1])})")
    return t


@torch.no_grad()
def streaming_recall(tile_fn: TileFn, n_img: int, captions_per_image: int = 5, *, img_chunk: int = 256,
                     cap_chunk: int = 1024, return_ranks: bool = False, group=None, progress: bool = False):
    """``metrics.recall`` of the implicit matrix ``S[i, c] = tile_fn(i0, i1, c0, c1)[i - i0, c - c0]``.

    Args:
        tile_fn: scores of images ``i0:i1`` x captions ``c0:c1`` as an (i1 - i0, c1 - c0) tensor (any device and
            floating dtype); :func:`xattn_tile_fn` and :func:`model_tile_fn` build one.
        n_img: number of images; there are ``captions_per_image * n_img`` captions, caption c of image c // cpi.
        img_chunk, cap_chunk: the tile grid (also the unit of work split across ranks).
        return_ranks: also return ``{"i2t_ranks", "t2i_ranks"}`` (0-based int64 numpy arrays).
        group: a torch.distributed process group (default: the world when initialised).

    Returns:
        The metrics dict of :func:`itm_models.eval.metrics.recall` (equal to it exactly, ties included; see the
        module docstring), on every rank; with ``return_ranks`` also the ranks.

    Raises:
        ValueError: bad sizes or chunks, a tile of the wrong shape, or a non-finite score (its position named).
    """
    for name, v in (("n_img", n_img), ("captions_per_image", captions_per_image), ("img_chunk", img_chunk),
                    ("cap_chunk", cap_chunk)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    cpi, n_cap = int(captions_per_image), int(captions_per_image) * int(n_img)
    rank, size = world(group)
    img_tiles, cap_tiles = grid(n_img, img_chunk), grid(n_cap, cap_chunk)
    mine = img_tiles[rank::size]

    # Pass 1: ground-truth scores gt[i, j] = S[i, i*cpi + j] from the tiles that meet the diagonal block.
    gt = torch.zeros(n_img, cpi, dtype=torch.float64)
    for i0, i1 in mine:
        lo, hi = i0 * cpi, i1 * cpi
        for c0, c1 in cap_tiles:
            if c1 <= lo or c0 >= hi:
                continue
            t = _check_tile(tile_fn(i0, i1, c0, c1), i0, c0, (i1 - i0, c1 - c0))
            cols = torch.arange(max(c0, lo), min(c1, hi))
            rows = cols // cpi
            gt[rows, cols % cpi] = t[rows - i0, cols - c0]
    gt = _all_reduce(gt, group, size)
    # i2t target: the best own caption, the highest index among equal best (metrics._last_argmax).
    best_j = (cpi - 1) - torch.argmax(gt.flip(1), dim=1)
    i2t_t = gt[torch.arange(n_img), best_j]
    i2t_col = torch.arange(n_img) * cpi + best_j
    t2i_t = gt.reshape(-1)
    t2i_row = torch.arange(n_cap) // cpi

    # Pass 2: count, per tile, the scores above each target plus the equal ones with a higher index.
    i2t_rank = torch.zeros(n_img, dtype=torch.long)
    t2i_rank = torch.zeros(n_cap, dtype=torch.long)
    for i0, i1 in mine:
        rows = torch.arange(i0, i1)
        for c0, c1 in cap_tiles:
            t = _check_tile(tile_fn(i0, i1, c0, c1), i0, c0, (i1 - i0, c1 - c0))
            cols = torch.arange(c0, c1)
            rt = i2t_t[i0:i1, None]
            i2t_rank[i0:i1] += ((t > rt) | ((t == rt) & (cols[None, :] > i2t_col[i0:i1, None]))).sum(1)
            ct = t2i_t[None, c0:c1]
            t2i_rank[c0:c1] += ((t > ct) | ((t == ct) & (rows[:, None] > t2i_row[None, c0:c1]))).sum(0)
    i2t_rank = _all_reduce(i2t_rank, group, size).numpy()
    t2i_rank = _all_reduce(t2i_rank, group, size).numpy()

    metrics = {**_summary(i2t_rank, "i2t"), **_summary(t2i_rank, "t2i")}
    metrics = {key: metrics[key] for key in METRIC_KEYS[:-1]}
    metrics["rsum"] = float(sum(metrics[key] for key in _RECALL_KEYS))
    if return_ranks:
        return metrics, {"i2t_ranks": i2t_rank, "t2i_ranks": t2i_rank}
    return metrics


def xattn_tile_fn(images: torch.Tensor, captions: torch.Tensor, cap_lens, **opts) -> TileFn:
    """Tiles of :func:`itm_kernels.xattn_sim` (``opts``: its keyword options) over fixed inputs."""
    from itm_kernels import xattn_sim
    lens = torch.as_tensor(cap_lens)
    img_lens = opts.pop("img_lens", None)

    def tile(i0, i1, c0, c1):
        il = None if img_lens is None else torch.as_tensor(img_lens)[i0:i1]
        return xattn_sim(images[i0:i1], captions[c0:c1], lens[c0:c1], img_lens=il, **opts)
    return tile


def model_tile_fn(model, img_embs, cap_embs, cap_lens, *, graph_inputs=None, **kwargs) -> TileFn:
    """Tiles of a model head's ``sims`` (SCAN, SGRAF, GSMN, TSHSR and their ensembles) over encoded embeddings.

    Args:
        img_embs: (N_img, K, d) (or a list, one per ensemble member); cap_embs: (N_cap, L, d) (or a list);
            cap_lens: (N_cap,).
        graph_inputs: GSMN only: ``(boxes (N_img, K, 4), image_sizes (N_img, 2) or None, parses (N_cap list))``.
        kwargs: passed to ``model.sims`` (e.g. ``backend=``).
    """
    lens = torch.as_tensor(cap_lens)

    def cut(x, a, b):
        return [e[a:b] for e in x] if isinstance(x, (list, tuple)) else x[a:b]

    def tile(i0, i1, c0, c1):
        if graph_inputs is None:
            return model.sims(cut(img_embs, i0, i1), cut(cap_embs, c0, c1), lens[c0:c1], **kwargs)
        boxes, sizes, parses = graph_inputs
        return model.sims(cut(img_embs, i0, i1), cut(cap_embs, c0, c1), lens[c0:c1], boxes[i0:i1],
                          None if sizes is None else sizes[i0:i1], None if parses is None else parses[c0:c1],
                          **kwargs)
    return tile


@torch.no_grad()
def streaming_topk(tile_fn: TileFn, n_img: int, n_cap: int, k: int, *, queries: str = "images",
                   img_chunk: int = 256, cap_chunk: int = 1024, group=None):
    """Top-k per query of the implicit matrix of ``tile_fn`` (see :func:`streaming_recall`), on any world size.

    Returns ``(values (N_q, k) float64, indices (N_q, k) int64)`` on the CPU, on every rank; ties: the higher
    index first (as :func:`itm_kernels.xattn_topk`). Distributed: each rank keeps a running top-k over its image
    chunks; the per-rank lists (W x N_q x k) are gathered and merged with the same tie rule.
    """
    from itm_kernels.xattn_topk import check_k, QUERIES
    from itm_kernels.xattn_topk.merge import merge_candidates, merge_tile
    if queries not in QUERIES:
        raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
    n_img, n_cap, img_chunk, cap_chunk = _check_sizes(n_img=n_img, n_cap=n_cap, img_chunk=img_chunk,
                                                      cap_chunk=cap_chunk)
    n_q, n_g = (n_img, n_cap) if queries == "images" else (n_cap, n_img)
    k = check_k(k, n_g)
    rank, size = world(group)
    best_v = torch.full((n_q, 0), -torch.inf, dtype=torch.float64)
    best_i = torch.full((n_q, 0), -1, dtype=torch.long)
    cap_tiles = grid(n_cap, cap_chunk)
    if queries == "images":
        vals = torch.full((n_q, k), -torch.inf, dtype=torch.float64)
        inds = torch.full((n_q, k), -1, dtype=torch.long)
        for i0, i1 in grid(n_img, img_chunk)[rank::size]:
            bv, bi = best_v[i0:i1], best_i[i0:i1]
            for c0, c1 in cap_tiles:
                t = _check_tile(tile_fn(i0, i1, c0, c1), i0, c0, (i1 - i0, c1 - c0))
                bv, bi = merge_tile(bv, bi, t, c0, k)
            vals[i0:i1], inds[i0:i1] = bv, bi
    else:
        vals, inds = best_v, best_i
        for i0, i1 in grid(n_img, img_chunk)[rank::size]:
            t = torch.cat([_check_tile(tile_fn(i0, i1, c0, c1), i0, c0, (i1 - i0, c1 - c0))
                           for c0, c1 in cap_tiles], dim=1)  # one image chunk x all captions
            vals, inds = merge_tile(vals, inds, t.t(), i0, k)
        pad = k - vals.shape[1]
        if pad:
            vals = torch.cat([vals, torch.full((n_q, pad), -torch.inf, dtype=torch.float64)], 1)
            inds = torch.cat([inds, torch.full((n_q, pad), -1, dtype=torch.long)], 1)
    if size > 1:
        import torch.distributed as dist
        all_v = [torch.empty_like(vals) for _ in range(size)]
        all_i = [torch.empty_like(inds) for _ in range(size)]
        dist.all_gather(all_v, vals, group=group)
        dist.all_gather(all_i, inds, group=group)
        vals, inds = merge_candidates(torch.cat(all_v, 1), torch.cat(all_i, 1), k)
    return vals, inds


@torch.no_grad()
def similarity_topk(model, img_embs, cap_embs, cap_lens, k: int, *, queries: str = "images", graph_inputs=None,
                    img_chunk: int = 256, cap_chunk: int = 1024, group=None, **kwargs):
    """Top-k per query for a model head (SCAN, SGRAF, GSMN, TSHSR) over encoded embeddings, without the matrix.

    ``img_embs``/``cap_embs``/``cap_lens``/``graph_inputs``/``kwargs`` as in :func:`model_tile_fn`; the rest as
    :func:`streaming_topk`.

    Paths: a model with its own ``topk`` (a single :class:`itm_models.SCAN`: ``itm_kernels.xattn_topk``, the
    in-kernel top-k on the cpu backend) and no extra ``kwargs`` but ``backend`` runs :func:`model_topk_sharded`
    (``img_chunk``/``cap_chunk`` unused); other heads stream ``model.sims`` tiles through :func:`streaming_topk`.
    Both give identical results for float32/bfloat16 scores of the cpu backend (its scores do not depend on the
    tiling); float64 scores agree to rounding (ATen mm's blocking).
    """
    _check_sizes(img_chunk=img_chunk, cap_chunk=cap_chunk)
    if (graph_inputs is None and callable(getattr(model, "topk", None)) and set(kwargs) <= {"backend"}
            and not isinstance(img_embs, (list, tuple))):
        return model_topk_sharded(model, img_embs, cap_embs, cap_lens, k, queries=queries, group=group, **kwargs)
    n_img = (img_embs[0] if isinstance(img_embs, (list, tuple)) else img_embs).shape[0]
    n_cap = (cap_embs[0] if isinstance(cap_embs, (list, tuple)) else cap_embs).shape[0]
    tile = model_tile_fn(model, img_embs, cap_embs, cap_lens, graph_inputs=graph_inputs, **kwargs)
    return streaming_topk(tile, n_img, n_cap, k, queries=queries, img_chunk=img_chunk, cap_chunk=cap_chunk,
                          group=group)


@torch.no_grad()
def model_topk_sharded(model, img_emb, cap_emb, cap_lens, k: int, *, queries: str = "images", group=None,
                       **topk_kwargs):
    """Top-k per query through ``model.topk`` (e.g. :meth:`itm_models.SCAN.topk`), the images sharded over ranks.

    Rank r of W takes the contiguous images ``[r m, (r + 1) m)``, ``m = ceil(N_img / W)``, and calls
    ``model.topk`` once on its shard against every caption (the kernel's own threads and tiles do the rest).
    ``queries="images"``: each rank's rows are complete; they are gathered. ``"captions"``: each rank has the
    top-``min(k, shard)`` images of its shard per caption (indices shifted to global ones, padded with
    ``-inf`` / ``-1``); the W lists are gathered and merged with the tie rule of
    :func:`itm_kernels.xattn_topk.merge.merge_candidates` (scores are finite: the padding sorts last).

    Returns ``(values (N_q, k) float64, indices (N_q, k) int64)`` on the CPU, on every rank. Memory per rank:
    the kernel's (``model.topk``) plus the gathered W x N_q x k candidates.
    """
    from itm_kernels.xattn_topk import QUERIES, check_k
    from itm_kernels.xattn_topk.merge import merge_candidates
    if queries not in QUERIES:
        raise ValueError(f"queries must be one of {QUERIES}, got {queries!r}")
    n_img, n_cap = img_emb.shape[0], cap_emb.shape[0]
    k = check_k(k, n_cap if queries == "images" else n_img)
    lens = torch.as_tensor(cap_lens)
    rank, size = world(group)
    m = -(-n_img // size)
    a, b = min(n_img, rank * m), min(n_img, (rank + 1) * m)
    rows = m if queries == "images" else n_cap
    vals = torch.full((rows, k), -torch.inf, dtype=torch.float64)
    inds = torch.full((rows, k), -1, dtype=torch.long)
    kr = k if queries == "images" else min(k, b - a)
    if b > a:
        v, i = model.topk(img_emb[a:b], cap_emb, lens.to(cap_emb.device), kr, queries=queries, **topk_kwargs)
        sel = slice(0, b - a) if queries == "images" else slice(None)
        vals[sel, :kr] = v.double().cpu()
        inds[sel, :kr] = i.cpu() + (0 if queries == "images" else a)
    if size == 1:
        return (vals[:n_img], inds[:n_img]) if queries == "images" else (vals, inds)
    import torch.distributed as dist
    all_v = [torch.empty_like(vals) for _ in range(size)]
    all_i = [torch.empty_like(inds) for _ in range(size)]
    dist.all_gather(all_v, vals, group=group)
    dist.all_gather(all_i, inds, group=group)
    if queries == "images":
        return torch.cat(all_v)[:n_img], torch.cat(all_i)[:n_img]
    return merge_candidates(torch.cat(all_v, 1), torch.cat(all_i, 1), k)


@torch.no_grad()
def save_sims_npy(tile_fn: TileFn, n_img: int, n_cap: int, path, *, img_chunk: int = 256, cap_chunk: int = 1024,
                  group=None) -> None:
    """Write the (N_img, N_cap) float32 matrix of ``tile_fn`` into one ``.npy`` file, shard by shard.

    Rank 0 creates the file (``np.lib.format.open_memmap``); after a barrier every rank opens it ``r+`` and writes
    the rows of its own image chunks tile by tile, so no process holds more than one tile.
    """
    n_img, n_cap, img_chunk, cap_chunk = _check_sizes(n_img=n_img, n_cap=n_cap, img_chunk=img_chunk,
                                                      cap_chunk=cap_chunk)
    rank, size = world(group)
    path = str(path)
    if rank == 0:
        np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_img, n_cap)).flush()
    if size > 1:
        import torch.distributed as dist
        dist.barrier(group=group)
    out = np.lib.format.open_memmap(path, mode="r+")
    for i0, i1 in grid(n_img, img_chunk)[rank::size]:
        for c0, c1 in grid(n_cap, cap_chunk):
            out[i0:i1, c0:c1] = tile_fn(i0, i1, c0, c1).detach().float().cpu().numpy()
    out.flush()
    del out
    if size > 1:
        import torch.distributed as dist
        dist.barrier(group=group)
