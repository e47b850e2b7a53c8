"""GSMN's graph inputs: box geometry (visual graph), word affinities and dependency parses (textual graph), and the
box values the released evaluation actually feeds (``official_eval_boxes``).

Facts: ``shared/reference/SEMANTICS.md`` (GSMN) and the golden README's GSMN section.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from itm_kernels._common.constants import EPS

KERNEL_EPS = 1e-14             # added to the squared precisions of the Gaussian kernels (official)


# --------------------------------------------------------------------------------------------------------------
# Boxes
# --------------------------------------------------------------------------------------------------------------

def check_boxes(boxes, n_img: int, n_regions: int, device=None) -> Tensor:
    """boxes (N_img, K, 4) x1, y1, x2, y2, finite, x2 >= x1 and y2 >= y1; returned as a floating tensor."""
    if not isinstance(boxes, Tensor):
        if isinstance(boxes, np.ndarray):
            boxes = torch.from_numpy(boxes)
        else:
            raise TypeError(f"boxes must be a torch.Tensor or numpy array of shape (N_img, K, 4), got "
                            f"{type(boxes).__name__}")
    if not boxes.dtype.is_floating_point:
        boxes = boxes.to(torch.float32)
    if boxes.dim() != 3 or boxes.shape != (n_img, n_regions, 4):
        raise ValueError(f"boxes must have shape (N_img, K, 4) = ({n_img}, {n_regions}, 4), got {tuple(boxes.shape)}")
    if device is not None:
        boxes = boxes.to(device)
    if not torch.isfinite(boxes).all():
        raise ValueError("boxes must be finite (found NaN or inf)")
    bad = (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1])
    if bad.any():
        i, k = bad.nonzero()[0].tolist()
        raise ValueError(f"boxes must be (x1, y1, x2, y2) with x2 >= x1 and y2 >= y1; boxes[{i}, {k}] = "
                         f"{boxes[i, k].tolist()}")
    return boxes


def check_image_sizes(image_sizes, n_img: int, device=None) -> Tensor:
    """image_sizes (N_img, 2) = (width, height) per image, all > 0; returned as a float64 tensor."""
    if isinstance(image_sizes, np.ndarray) and image_sizes.dtype.names:
        image_sizes = np.stack([image_sizes["image_w"], image_sizes["image_h"]], axis=1)
    try:
        sizes = torch.as_tensor(np.asarray(image_sizes) if not isinstance(image_sizes, Tensor) else image_sizes)
    except (TypeError, ValueError) as e:
        raise TypeError(f"image_sizes must be numeric (N_img, 2) = (width, height) per image: {e}") from None
    if sizes.dim() != 2 or sizes.shape != (n_img, 2):
        raise ValueError(f"image_sizes must have shape (N_img, 2) = ({n_img}, 2) holding (width, height), got "
                         f"{tuple(sizes.shape)}")
    sizes = sizes.to(device=device, dtype=torch.float64)
    if not torch.isfinite(sizes).all() or (sizes <= 0).any():
        i = int(((sizes <= 0) | ~torch.isfinite(sizes)).any(1).nonzero()[0])
        raise ValueError(f"image_sizes must be finite and > 0, got image_sizes[{i}] = {sizes[i].tolist()}")
    return sizes


def normalize_boxes(boxes: Tensor, image_sizes) -> Tensor:
    """Pixel boxes (N_img, K, 4) divided once by their own image's (w, h, w, h); a new tensor in the boxes' dtype
    (each value the correctly rounded quotient, as the official first division)."""
    sizes = check_image_sizes(image_sizes, boxes.shape[0], boxes.device)
    scale = torch.stack([sizes[:, 0], sizes[:, 1], sizes[:, 0], sizes[:, 1]], dim=1)[:, None, :]   # (N, 1, 4)
    return (boxes.to(torch.float64) / scale).to(boxes.dtype)


def pseudo_coordinates(boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Polar coordinates between box centres, as the official ``_compute_pseudo``: (rho, theta), each
    (N_img, K, K), with centre = (x1, y1) + 0.5 (x2 - x1, y2 - y1), delta = centre_i - centre_j,
    rho = |delta|, theta = atan2(delta_x, delta_y) (x first). Computed in the boxes' dtype."""
    centre = boxes[..., :2] + 0.5 * (boxes[..., 2:] - boxes[..., :2])                          # (N, K, 2)
    delta = centre[:, :, None, :] - centre[:, None, :, :]                                      # (N, K, K, 2)
    rho = torch.sqrt(delta[..., 0] ** 2 + delta[..., 1] ** 2)
    theta = torch.atan2(delta[..., 0], delta[..., 1])
    return rho, theta


def gaussian_kernel_weights(rho: Tensor, theta: Tensor, mean_rho: Tensor, mean_theta: Tensor,
                            precision_rho: Tensor, precision_theta: Tensor) -> Tensor:
    """w_k(i, j) of the visual graph, (N_img, K, K, n_kernels): the product of a Gaussian in rho and one in the
    wrapped angle, NaN set to 0, normalised over the kernels (official ``get_gaussian_weights``). Parameters are
    (n_kernels, 1) or (n_kernels,)."""
    mr, mt = mean_rho.reshape(-1), mean_theta.reshape(-1)
    pr, pt = precision_rho.reshape(-1), precision_theta.reshape(-1)
    w_rho = torch.exp(-0.5 * (rho[..., None] - mr) ** 2 / (KERNEL_EPS + pr ** 2))
    first = torch.abs(theta[..., None] - mt)
    second = torch.abs(2 * math.pi - first)
    w_theta = torch.exp(-0.5 * torch.minimum(first, second) ** 2 / (KERNEL_EPS + pt ** 2))
    w = w_rho * w_theta
    w = torch.where(torch.isnan(w), torch.zeros((), dtype=w.dtype, device=w.device), w)
    return w / w.sum(dim=-1, keepdim=True)


# --------------------------------------------------------------------------------------------------------------
# The boxes of the released evaluation
# --------------------------------------------------------------------------------------------------------------

def official_division_counts(n_captions: int, *, captions_per_image: int = 5, batch_size: int = 64,
                             box_dtype="float32") -> np.ndarray:
    """How many times the released evaluation has divided caption c's image boxes in place when it copies them,
    (n_captions,) int64.

    ``encode_data`` iterates the loader twice and each fetch divides the image's boxes in place. A float32 box file
    is shared with the batch tensor until ``collate_fn`` stacks it, so caption c = 5k + r in a batch ending
    (exclusive) at e gets 5 + min(5, e - 5k) divisions; a float64 file is copied at fetch time: 6 + r.
    """
    if batch_size < 1 or captions_per_image < 1 or n_captions < 1:
        raise ValueError(f"n_captions, captions_per_image and batch_size must be >= 1, got {n_captions}, "
                         f"{captions_per_image}, {batch_size}")
    c = np.arange(n_captions)
    k = c // captions_per_image
    if np.dtype(box_dtype) == np.float64:
        return (captions_per_image + 1 + c % captions_per_image).astype(np.int64)
    if np.dtype(box_dtype) != np.float32:
        raise ValueError(f"box_dtype must be float32 or float64 (the box file's dtype), got {box_dtype!r}")
    end = np.minimum(n_captions, (c // batch_size + 1) * batch_size)
    return (captions_per_image + np.minimum(captions_per_image, end - captions_per_image * k)).astype(np.int64)


def _divide_repeatedly(boxes: np.ndarray, size: np.ndarray, times: int, box_dtype) -> np.ndarray:
    """Pixel boxes (K, 4) of one image divided ``times`` times by (w, h, w, h), in the box file's dtype, each
    division rounded to that dtype (float32 division of a float32 by an integer is correctly rounded, as the
    official float64-then-assign path is); result as float32."""
    dt = np.dtype(box_dtype)
    out = boxes.astype(dt).copy()
    scale = np.array([size[0], size[1], size[0], size[1]], dtype=np.float64)
    for _ in range(times):
        out = (out.astype(np.float64) / scale).astype(dt)
    return out.astype(np.float32)


def official_eval_boxes(boxes, image_sizes, *, batch_size: int = 64, captions_per_image: int = 5,
                        box_dtype="float32", fold5: bool = False) -> Tensor:
    """The box rows the released GSMN evaluation feeds its visual graph, bit for bit, for reproducing its numbers.

    The released loader divides each image's boxes by (w, h, w, h) IN PLACE on every fetch (so repeatedly, see
    :func:`official_division_counts`), and its non-fold5 path (Flickr30K 1K, COCO 5K, validation) scores image k
    with the boxes of caption k, i.e. of image k // 5; the fold5 path (COCO 1K) uses row 5k, image k's own boxes.
    Use :func:`normalize_boxes` (divided once, each image its own) for correct geometry.

    Args:
        boxes: (N_img, K, 4) pixel boxes x1, y1, x2, y2 as the box file holds them.
        image_sizes: (N_img, 2) (width, height), or the structured array with ``image_w`` / ``image_h``.
        batch_size: the evaluation loader's batch size (the checkpoint's ``opt.batch_size``: 64 Flickr30K, 32 COCO).
        captions_per_image: 5.
        box_dtype: the box file's dtype, "float32" (shared with the batch until it is stacked) or "float64"
            (copied at fetch).
        fold5: the COCO 1K path.

    Returns:
        (N_img, K, 4) float32: row k as fed to ``shard_xattn`` for image k.
    """
    b = np.asarray(boxes.detach().cpu() if isinstance(boxes, Tensor) else boxes)
    if b.ndim != 3 or b.shape[2] != 4:
        raise ValueError(f"boxes must have shape (N_img, K, 4), got {b.shape}")
    check_boxes(torch.tensor(b), b.shape[0], b.shape[1])                          # finite, x2 >= x1, y2 >= y1
    sizes = check_image_sizes(image_sizes, b.shape[0]).numpy()
    n_img = b.shape[0]
    counts = official_division_counts(n_img * captions_per_image, captions_per_image=captions_per_image,
                                      batch_size=batch_size, box_dtype=box_dtype)
    out = np.empty(b.shape, dtype=np.float32)
    for k in range(n_img):
        row = captions_per_image * k if fold5 else k
        src = row // captions_per_image
        out[k] = _divide_repeatedly(b[src], sizes[src], int(counts[row]), box_dtype)
    return torch.from_numpy(out)


# --------------------------------------------------------------------------------------------------------------
# Textual graph
# --------------------------------------------------------------------------------------------------------------

def check_parses(parses, cap_lens: Sequence[int]) -> list[np.ndarray]:
    """Parses as (n_edges, 2) int64 arrays of [governor, dependent], CoreNLP layout (1-based tokens, first edge =
    ROOT edge); a stacked (N_cap, E, 2) array padded with [-1, -1] rows is accepted too. Indices must lie in 0..cap_len (index cap_len occurs in the released data, where the parser saw one
    token more than the caption has rows; edges touching an index >= cap_len are dropped, as the released code
    does)."""
    if isinstance(parses, (str, bytes)) or not isinstance(parses, Sequence) and not isinstance(parses, np.ndarray):
        raise TypeError(f"parses must be a sequence of N_cap edge lists, got {type(parses).__name__}")
    if len(parses) != len(cap_lens):
        raise ValueError(f"parses must hold one edge list per caption ({len(cap_lens)}), got {len(parses)}")
    out = []
    for c, (edges, n) in enumerate(zip(parses, cap_lens)):
        try:
            a = np.asarray(edges)
        except ValueError as e:                     # ragged edge lists
            raise ValueError(f"parses[{c}] must be a list of integer [governor, dependent] pairs: {e}") from None
        if a.size == 0:
            a = np.zeros((0, 2), dtype=np.int64)
        if a.ndim != 2 or a.shape[1] != 2 or not (np.issubdtype(a.dtype, np.integer) or
                                                   (np.issubdtype(a.dtype, np.floating) and
                                                    np.all(a == np.round(a)))):
            raise ValueError(f"parses[{c}] must be a list of integer [governor, dependent] pairs, got shape "
                             f"{a.shape} dtype {a.dtype}")
        a = a.astype(np.int64)
        a = a[~(a == -1).all(axis=1)] if a.size else a          # [-1, -1] rows pad a stacked (N, E, 2) array
        if a.size and (a.min() < 0 or a.max() > n):
            raise ValueError(f"parses[{c}] has token indices in {a.min()}..{a.max()}, outside 0..{n} "
                             f"(caption length {n})")
        out.append(a)
    return out


def sparse_adjacency(edges: np.ndarray, n_words: int) -> np.ndarray:
    """The official ``build_sparse_graph``: (n_words, n_words) float32, symmetric 0/1 over the parse edges (the first
    edge, ROOT, skipped; edges touching an index >= n_words skipped) plus the identity."""
    adj = np.zeros((n_words, n_words), dtype=np.float32)
    for g, d in edges[1:]:
        if g < n_words and d < n_words:
            adj[g, d] = 1.0
            adj[d, g] = 1.0
    return adj + np.eye(n_words, dtype=np.float32)


def word_affinity(words: Tensor, lambda_softmax: float) -> Tensor:
    """softmax_j'(lambda e_j . e_j') over one caption's real words: (L, d) -> (L, L) (official ``intra_relation``)."""
    return torch.softmax(lambda_softmax * (words @ words.t()), dim=1)


def textual_kernel_weights(affinity: Tensor, params: Tensor, adjacency: Tensor | None = None) -> Tensor:
    """w_k(j, j') of the textual graph, (L, L, n_kernels): the affinity (masked by the parse adjacency and
    l2-normalised over neighbours for the sparse graph) times p_k, normalised over the neighbours j'."""
    if adjacency is not None:
        masked = adjacency * affinity
        affinity = masked / (masked.square().sum(dim=1, keepdim=True).sqrt() + EPS)
    w = affinity[..., None] * params.reshape(-1)
    return w / w.sum(dim=1, keepdim=True)
