"""Retrieval metrics of the official SCAN / SGRAF / GSMN evaluation (``evaluation.i2t`` / ``evaluation.t2i``).

Protocol (``shared/reference/SEMANTICS.md``, "Evaluation protocol"): ``sims`` is an (N_img, N_cap) score matrix,
rows images, columns captions, ``N_cap = captions_per_image * N_img``, and caption ``c`` belongs to image
``c // captions_per_image``.

- i2t rank of image ``i``: the best (smallest) 0-based rank, in the descending order of row ``i``, among the
  image's own captions.
- t2i rank of caption ``c``: the 0-based rank of image ``c // captions_per_image`` in the descending order of
  column ``c``.
- ``R@K = 100 * mean(rank < K)`` for K = 1, 5, 10; ``medr = floor(median(rank)) + 1``; ``meanr = mean(rank) + 1``;
  ``rsum`` = the six recalls summed.

Ties. The official code ranks with ``np.argsort(d)[::-1]``: among equal scores, the item with the HIGHER index comes
first. We use exactly that order, stated as a count:

    rank(target) = #{k : s_k > s_target} + #{k : s_k == s_target and k > target}

which equals the position of ``target`` in ``np.argsort(d, kind="stable")[::-1]``. (NumPy's default argsort is not
stable, so with ties the official result depends on NumPy's sort internals; for untied scores, which is every
float score matrix in practice, all agree.) ``top1`` is ``inds[0]`` of that order: the highest index among the
maximal scores.

Ranks are counted, never sorted: one streaming pass over the matrix in row blocks of about
``_BLOCK_ELEMENTS`` entries compares every score with its row's and its column's target, so memory stays at a few
blocks of booleans whatever the size, and COCO 5K (5,000 x 25,000) takes well under a second on 2 cores.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["recall", "recall_fold5", "ensemble_sims", "format_metrics_table", "METRIC_KEYS"]

METRIC_KEYS = (
    "i2t_r1", "i2t_r5", "i2t_r10", "i2t_medr", "i2t_meanr",
    "t2i_r1", "t2i_r5", "t2i_r10", "t2i_medr", "t2i_meanr",
    "rsum",
)
_RECALL_KEYS = ("i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10")

# About 16M scores per block: 64 MB of float32 input and 16 MB per boolean mask.
_BLOCK_ELEMENTS = 1 << 24


def _as_score_matrix(sims, name: str = "sims") -> np.ndarray:
    """Return ``sims`` as a 2-D floating numpy array (a view when possible), after type and shape checks."""
    if isinstance(sims, torch.Tensor):
        t = sims.detach()
        if t.dtype in (torch.float16, torch.bfloat16):
            t = t.float()  # exact: every half / bfloat16 value is a float32
        sims = t.cpu().numpy()
    arr = np.asarray(sims)
    if arr.dtype == np.float16:
        arr = arr.astype(np.float32)
    elif arr.dtype.kind in "iub":
        arr = arr.astype(np.float64)
    elif arr.dtype.kind != "f":
        raise ValueError(f"{name} must hold real numbers, got dtype {arr.dtype}")
    if arr.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N_img, N_cap), got ndim={arr.ndim} with shape {tuple(arr.shape)}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: shape {tuple(arr.shape)}")
    return arr


def _check_cpi(arr: np.ndarray, captions_per_image, name: str = "sims") -> int:
    if isinstance(captions_per_image, bool) or not isinstance(captions_per_image, (int, np.integer)):
        raise ValueError(f"captions_per_image must be a positive int, got {captions_per_image!r}")
    cpi = int(captions_per_image)
    if cpi < 1:
        raise ValueError(f"captions_per_image must be a positive int, got {cpi}")
    n_img, n_cap = arr.shape
    if n_cap != cpi * n_img:
        raise ValueError(
            f"{name} has shape ({n_img}, {n_cap}): N_cap must equal captions_per_image * N_img = "
            f"{cpi} * {n_img} = {cpi * n_img} (rows are images, columns captions)"
        )
    return cpi


def _last_argmax(x: np.ndarray, axis: int) -> np.ndarray:
    """Index of the maximum along ``axis``; among ties the highest index (``argsort(...)[::-1][0]``)."""
    n = x.shape[axis]
    rev = x[:, ::-1] if axis == 1 else x[::-1, :]
    return (n - 1) - np.argmax(rev, axis=axis)


def _ranks(arr: np.ndarray, cpi: int, with_top1: bool):
    """Core pass: 0-based i2t ranks (N_img,), t2i ranks (N_cap,), and optionally the top-1 indices, all int64."""
    n_img, n_cap = arr.shape
    img_idx = np.arange(n_img)

    # Ground-truth block: gt[i, j] = sims[i, i*cpi + j].
    gt_cols = img_idx[:, None] * cpi + np.arange(cpi)[None, :]
    gt = arr[img_idx[:, None], gt_cols]
    if not np.isfinite(gt).all():
        bad = np.argwhere(~np.isfinite(gt))[0]
        raise ValueError(f"sims has a non-finite value at ({bad[0]}, {gt_cols[bad[0], bad[1]]})")
    # i2t: the best own caption is the largest (score, index) pair; its rank is the minimum over the captions.
    best_j = _last_argmax(gt, axis=1)
    i2t_target = gt[img_idx, best_j]
    i2t_col = img_idx * cpi + best_j
    # t2i: caption c's target is sims[c // cpi, c].
    t2i_target = gt.reshape(-1)

    i2t_above = np.zeros(n_img, dtype=np.int64)
    i2t_equal = np.zeros(n_img, dtype=np.int64)
    t2i_above = np.zeros(n_cap, dtype=np.int64)
    t2i_equal = np.zeros(n_cap, dtype=np.int64)
    if with_top1:
        i2t_top1 = np.empty(n_img, dtype=np.int64)
        t2i_best = np.full(n_cap, -np.inf, dtype=arr.dtype)
        t2i_top1 = np.zeros(n_cap, dtype=np.int64)

    rows_per_block = max(1, _BLOCK_ELEMENTS // n_cap)
    for r0 in range(0, n_img, rows_per_block):
        r1 = min(n_img, r0 + rows_per_block)
        block = np.asarray(arr[r0:r1])
        finite = np.isfinite(block)
        if not finite.all():
            bad = np.argwhere(~finite)[0]
            raise ValueError(f"sims has a non-finite value at ({r0 + bad[0]}, {bad[1]})")
        row_t = i2t_target[r0:r1, None]
        i2t_above[r0:r1] = np.count_nonzero(block > row_t, axis=1)
        i2t_equal[r0:r1] = np.count_nonzero(block == row_t, axis=1)
        col_t = t2i_target[None, :]
        t2i_above += np.count_nonzero(block > col_t, axis=0)
        t2i_equal += np.count_nonzero(block == col_t, axis=0)
        if with_top1:
            i2t_top1[r0:r1] = _last_argmax(block, axis=1)
            local = _last_argmax(block, axis=0)
            local_max = block[local, np.arange(n_cap)]
            take = local_max >= t2i_best  # later rows win ties
            t2i_best[take] = local_max[take]
            t2i_top1[take] = r0 + local[take]

    # Ties beyond the target itself are rare; resolve them exactly on the few affected rows / columns.
    i2t_ranks = i2t_above
    tied_rows = np.flatnonzero(i2t_equal > 1)
    for c0 in range(0, tied_rows.size, rows_per_block):  # bounded memory if many rows tie
        rows = tied_rows[c0:c0 + rows_per_block]
        vals = np.asarray(arr[rows])
        later = np.arange(n_cap)[None, :] > i2t_col[rows, None]
        i2t_ranks[rows] += np.count_nonzero((vals == i2t_target[rows, None]) & later, axis=1)
    t2i_ranks = t2i_above
    tied_cols = np.flatnonzero(t2i_equal > 1)
    cols_per_block = max(1, _BLOCK_ELEMENTS // n_img)
    for c0 in range(0, tied_cols.size, cols_per_block):
        cols = tied_cols[c0:c0 + cols_per_block]
        vals = np.asarray(arr[:, cols])
        later = img_idx[:, None] > (cols // cpi)[None, :]
        t2i_ranks[cols] += np.count_nonzero((vals == t2i_target[None, cols]) & later, axis=0)

    if with_top1:
        return i2t_ranks, t2i_ranks, i2t_top1, t2i_top1
    return i2t_ranks, t2i_ranks, None, None


def _summary(ranks: np.ndarray, prefix: str) -> dict:
    """R@1/5/10, medr, meanr from 0-based ranks, with the official arithmetic (so values match bit for bit)."""
    r = ranks.astype(np.float64)
    n = len(r)
    out = {}
    for k in (1, 5, 10):
        out[f"{prefix}_r{k}"] = float(100.0 * np.count_nonzero(r < k) / n)
    out[f"{prefix}_medr"] = float(np.floor(np.median(r)) + 1)
    out[f"{prefix}_meanr"] = float(r.mean() + 1)
    return out


def recall(sims, captions_per_image: int = 5, return_ranks: bool = False):
    """Image-to-text and text-to-image retrieval metrics of the official SCAN evaluation.

    Args:
        sims: (N_img, N_cap) scores, numpy array or torch tensor (any floating dtype; integers are accepted and
            read as float64), rows images, columns captions, ``N_cap == captions_per_image * N_img``; caption
            ``c`` belongs to image ``c // captions_per_image``. All values must be finite. A ``np.memmap`` is
            read block by block, never copied whole.
        captions_per_image: captions per image (5 for Flickr30K and COCO).
        return_ranks: also return the per-query ranks and top-1 indices.

    Returns:
        ``metrics``: dict of Python floats with keys ``i2t_r1, i2t_r5, i2t_r10, i2t_medr, i2t_meanr, t2i_r1,
        t2i_r5, t2i_r10, t2i_medr, t2i_meanr, rsum`` (recalls in percent; medr/meanr 1-based).
        With ``return_ranks=True``: ``(metrics, ranks)`` where ``ranks`` holds int64 numpy arrays
        ``i2t_ranks`` (N_img,) and ``t2i_ranks`` (N_cap,) (0-based), ``i2t_top1`` (N_img,) (the top caption of
        each image) and ``t2i_top1`` (N_cap,) (the top image of each caption).

    Ties follow the official ``np.argsort(d)[::-1]`` order made deterministic: an equal score with a higher
    index ranks first (see the module docstring). Memory: O(N_cap) plus one block of about 16M scores.

    Raises:
        ValueError: wrong ndim, empty input, ``N_cap != captions_per_image * N_img``, non-real dtype or a
            non-finite value (the message names the argument and, for values, the position).
    """
    arr = _as_score_matrix(sims)
    cpi = _check_cpi(arr, captions_per_image)
    i2t_ranks, t2i_ranks, i2t_top1, t2i_top1 = _ranks(arr, cpi, with_top1=return_ranks)
    metrics = {**_summary(i2t_ranks, "i2t"), **_summary(t2i_ranks, "t2i")}
    metrics = {k: metrics[k] for k in METRIC_KEYS[:-1]}
    metrics["rsum"] = float(sum(metrics[k] for k in _RECALL_KEYS))
    if not return_ranks:
        return metrics
    return metrics, {"i2t_ranks": i2t_ranks, "i2t_top1": i2t_top1, "t2i_ranks": t2i_ranks, "t2i_top1": t2i_top1}


def recall_fold5(sims, captions_per_image: int = 5, n_folds: int = 5, return_folds: bool = False):
    """COCO 1K protocol: metrics on ``n_folds`` disjoint diagonal blocks, averaged over the folds.

    Fold ``f`` is ``sims[f*m:(f+1)*m, f*m*cpi:(f+1)*m*cpi]`` with ``m = N_img // n_folds`` (COCO 5K with the
    defaults: 5 folds of 1,000 images x 5,000 captions). Every metric, medr and meanr included, is the mean over
    folds, as the official fold5 branch averages them; ``rsum`` is the sum of the six averaged recalls (the
    official printout mislabels it).

    Args:
        sims: (N_img, N_cap) scores as in :func:`recall`; ``N_img`` must be divisible by ``n_folds``.
        captions_per_image: captions per image.
        n_folds: number of folds (5 for COCO 1K).
        return_folds: also return the list of per-fold metric dicts.

    Returns:
        dict of Python floats with the keys of :func:`recall`; with ``return_folds=True``,
        ``(averaged, [fold_0_metrics, ...])``.
    """
    arr = _as_score_matrix(sims)
    cpi = _check_cpi(arr, captions_per_image)
    if isinstance(n_folds, bool) or not isinstance(n_folds, (int, np.integer)) or n_folds < 1:
        raise ValueError(f"n_folds must be a positive int, got {n_folds!r}")
    n_img = arr.shape[0]
    if n_img % n_folds:
        raise ValueError(f"sims has {n_img} image rows, which n_folds={n_folds} does not divide")
    m = n_img // n_folds
    folds = [recall(arr[f * m:(f + 1) * m, f * m * cpi:(f + 1) * m * cpi], cpi) for f in range(n_folds)]
    mean = {k: float(np.mean([fold[k] for fold in folds])) for k in METRIC_KEYS[:-1]}
    mean["rsum"] = float(sum(mean[k] for k in _RECALL_KEYS))
    return (mean, folds) if return_folds else mean


def ensemble_sims(list_of_sims: Sequence):
    """Element-wise mean of several score matrices (the SGRAF SAF+SGR ensemble: ``(sims_saf + sims_sgr) / 2``).

    Args:
        list_of_sims: non-empty sequence of (N_img, N_cap) numpy arrays or torch tensors of one shape.

    Returns:
        The mean, as a numpy array (float64 if any input is float64, else float32) when the first input is
        numpy, or as a torch tensor on the first input's device when it is a tensor.
    """
    items = list(list_of_sims)
    if not items:
        raise ValueError("list_of_sims is empty")
    if isinstance(items[0], torch.Tensor):
        ts = [torch.as_tensor(s).to(items[0].device) for s in items]
        shapes = {tuple(t.shape) for t in ts}
        if len(shapes) != 1:
            raise ValueError(f"list_of_sims has mismatched shapes {sorted(shapes)}")
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
        total = torch.zeros(ts[0].shape, dtype=dtype, device=ts[0].device)
        for t in ts:
            total += t.to(dtype)
        return total / len(ts)
    arrs = [np.asarray(s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else s) for s in items]
    shapes = {a.shape for a in arrs}
    if len(shapes) != 1:
        raise ValueError(f"list_of_sims has mismatched shapes {sorted(shapes)}")
    dtype = np.float64 if any(a.dtype == np.float64 for a in arrs) else np.float32
    total = np.zeros(arrs[0].shape, dtype=dtype)
    for a in arrs:
        total += a.astype(dtype, copy=False)
    return total / len(arrs)


def format_metrics_table(metrics: dict, title: str | None = None) -> str:
    """Render a metrics dict (from :func:`recall` / :func:`recall_fold5`) as a fixed-width text table.

    Example::

        direction      R@1     R@5    R@10    medr    meanr
        i2t          20.00   40.00   50.00     9.0    10.80
        t2i          10.00   52.00  100.00     5.0     5.18
        rsum 272.00
    """
    missing = [k for k in METRIC_KEYS if k not in metrics]
    if missing:
        raise ValueError(f"metrics is missing keys {missing}")
    lines = [] if title is None else [title]
    lines.append(f"{'direction':<10}{'R@1':>8}{'R@5':>8}{'R@10':>8}{'medr':>8}{'meanr':>9}")
    for d in ("i2t", "t2i"):
        lines.append(
            f"{d:<10}{metrics[d + '_r1']:>8.2f}{metrics[d + '_r5']:>8.2f}{metrics[d + '_r10']:>8.2f}"
            f"{metrics[d + '_medr']:>8.1f}{metrics[d + '_meanr']:>9.2f}"
        )
    lines.append(f"rsum {metrics['rsum']:.2f}")
    return "\n".join(lines)
