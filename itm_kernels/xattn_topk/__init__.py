"""``xattn_topk``: the top-k of SCAN cross-attention scores per query, without the (N_img, N_cap) matrix.

Two methods:

- ``"kernel"``: an in-kernel top-k, no score tile leaves the kernel.
  On the ``cpu`` backend (soft attention): ``cpu.py`` (csrc/xattn_topk/cpu.cpp). Every worker thread offers the
  scores of the tile it has just computed to per-query heaps of its k best. Memory O(threads x N_queries x k)
  beyond the kernel's own scratch.
  On the ``triton`` backend (soft attention, k <= ``TRITON_MAX_K`` = 16, float32/bfloat16/float16 inputs):
  ``triton.py``. Programs own a block of queries and loop over the gallery, keeping a running top-k per query
  in registers (bitonic merges of packed score/index keys). Memory O(N_queries x next_pow2(k)) int64 beyond the
  Triton xattn_sim forward's Gram tiles.
- ``"stream"`` (every other case: other backends, ``attention="hard"``, float64 or k > 16 on ``triton``, or on
  request): a driver over ``xattn_sim``. Each (query chunk x gallery chunk) tile is scored by ``xattn_sim`` on the
  chosen backend, materialised (at most ``query_chunk x gallery_chunk`` scores) and merged into a running top-k
  (``merge.merge_tile``).

``backend="auto"`` picks the backend by ``itm_kernels._common.dispatch.choose_backend`` as ``xattn_sim`` does (on a
GPU, a GPU kernel only once verified there), then the method as above.

Exactness: a score depends only on its (image, caption) pair, and the ``cpu`` backend's float32 / bfloat16 /
float16 scores are bitwise independent of batching and tiling (tested), so with it both methods give values equal
to ``torch.topk`` of the full ``xattn_sim`` matrix exactly, and the same indices. Its float64 scores come from
ATen ``mm``, whose rounding depends on the block shape: ``method="kernel"`` scores with the tiling of the one-call
matrix (same ``max_tile_bytes``, no ``query_chunk``) and is then exact too; otherwise float64 agrees to rounding.
The ``triton`` kernel computes each score with the Triton ``xattn_sim`` forward's own device function and launch
configuration: bitwise its matrix entry in the interpreter (tested); compiled, the same code under the forward's
untuned constexprs, which the autotuned forward may change (last-bit differences; not yet run on a GPU). Backends whose tiling changes the rounding (``torch``: its
GEMM blocking depends on the batch) equal the top-k of the matrix assembled from the same tiles exactly, and of the
one-call matrix to rounding.
"""
from __future__ import annotations

import numbers

import torch as _torch
from torch import Tensor

from .._common.validation import check_choice, check_xattn_args
from .limits import TRITON_MAX_K, triton_topk_supports
from .merge import empty_topk, merge_tile

__all__ = ["xattn_topk", "check_k", "check_chunk", "QUERIES", "METHODS", "TRITON_MAX_K", "triton_topk_supports"]

QUERIES = ("images", "captions")
METHODS = ("auto", "kernel", "stream")
_DEFAULT_TILE = 1 << 20  # scores per tile: 4 MiB of float32


def check_k(k, gallery: int, name: str = "k") -> int:
    """``k`` as an int in 1..gallery: TypeError for a non-int (bools, floats, tensors; numpy ints are taken),
    ValueError out of range, both naming ``name``."""
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or isinstance(k, Tensor):
        raise TypeError(f"{name} must be an int, got {type(k).__name__}")
    k = int(k)
    if k < 1 or k > gallery:
        raise ValueError(f"{name} must lie in 1..{gallery} (the gallery size), got {k}")
    return k


def check_chunk(name: str, value) -> int | None:
    """``value`` as a positive int, or None; ValueError naming ``name`` otherwise (numpy ints are taken)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or isinstance(value, Tensor) or value < 1:
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    return int(value)


@_torch.no_grad()
def xattn_topk(images: Tensor, captions: Tensor, cap_lens, k: int, *, queries: str = "images", img_lens=None,
               direction: str = "t2i", norm: str = "clipped_l2norm", lambda_softmax: float = 9.0, agg: str = "lse",
               lambda_lse: float = 6.0, backend: str = "auto", max_tile_bytes: int | None = None,
               query_chunk: int | None = None, gallery_chunk: int | None = None, method: str = "auto",
               **extra) -> tuple[Tensor, Tensor]:
    """Top-k SCAN similarities per query, streamed tile by tile.

    Args:
        images: (N_img, K, d), captions: (N_cap, L_max, d), cap_lens: (N_cap,), img_lens: optional (N_img,):
            as in :func:`itm_kernels.xattn_sim`, as are ``direction, norm, lambda_softmax, agg, lambda_lse,
            backend, max_tile_bytes`` (and ``attention`` where ``xattn_sim`` takes it).
        k: results per query, 1..gallery size (N_cap for ``queries="images"``, N_img for ``"captions"``).
        queries: "images" (the k best captions of each image, i2t retrieval) or "captions" (the k best images
            of each caption, t2i retrieval).
        query_chunk: queries per call (default all). With ``method="kernel"`` it bounds the heaps to
            ``threads x query_chunk x k`` entries (cpu) or the key state to ``query_chunk x next_pow2(k)``
            (triton); with ``"stream"`` it is one side of the materialised tile.
        gallery_chunk: ``"stream"`` only (the kernel tiles on its own): gallery items per tile, default about 1M
            scores per tile.
        method: "kernel" (an in-kernel top-k: the ``cpu`` backend with soft attention, or the ``triton`` backend
            with soft attention, k <= 16 and float32/bfloat16/float16 inputs; the backend explicit or chosen by
            "auto"), "stream" (the tile-by-tile driver, any backend), or "auto" (the kernel where it applies, else
            the stream). The results are identical on the ``cpu`` backend; on ``triton`` see the module docstring.

    Returns:
        ``(values, indices)``: (N_queries, k) scores (dtype of ``xattn_sim``'s output) in descending order and
        their (N_queries, k) int64 gallery indices. Ties: the higher index first (the order of
        ``itm_models.eval.metrics.recall``).

    Memory: "kernel" on ``cpu``: O(threads x query_chunk x k) (16 bytes per float32 entry) beyond the inputs and
    the kernel's per-call tables and per-thread tile scratch; on ``triton``: O(query_chunk x next_pow2(k)) int64
    keys plus the Triton forward's Gram tiles; "stream": O(query_chunk x (k + gallery_chunk)). Never
    N_img x N_cap. Not differentiable (ranking); runs under ``no_grad``. No host synchronisation on the
    ``triton`` kernel path.

    Raises:
        TypeError / ValueError: as ``xattn_sim``, plus ``k`` not an int in 1..gallery, a bad ``queries``, chunk or
        ``method``, or ``method="kernel"`` where it does not apply.
    """
    from .. import xattn_sim  # the function (the package rebinds it)
    checked = check_xattn_args(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg,
                               lambda_lse, backend)
    check_choice("queries", queries, QUERIES)
    check_choice("method", method, METHODS)
    query_chunk = check_chunk("query_chunk", query_chunk)
    if max_tile_bytes is not None and (isinstance(max_tile_bytes, bool) or not isinstance(max_tile_bytes, int)
                                       or max_tile_bytes <= 0):
        raise ValueError(f"max_tile_bytes must be a positive int, got {max_tile_bytes!r}")
    gallery_chunk = check_chunk("gallery_chunk", gallery_chunk)
    n_img, n_cap = images.shape[0], captions.shape[0]
    n_q, n_g = (n_img, n_cap) if queries == "images" else (n_cap, n_img)
    k = check_k(k, n_g)
    kernel = _kernel_name(method, backend, images, captions, k, extra)
    if kernel == "cpu":
        return _kernel_topk(checked, k, queries, query_chunk, max_tile_bytes)
    if kernel == "triton":
        return _triton_topk(checked, k, queries, query_chunk, extra.get("precision"))
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


def _kernel_name(method: str, backend: str, images: Tensor, captions: Tensor, k: int, extra: dict) -> str | None:
    """Which in-kernel top-k runs ("cpu", "triton") or None (the streaming driver)."""
    from .._common.dispatch import choose_backend
    from . import cpu as cpu_topk
    soft = extra.get("attention", "soft") == "soft"
    name = choose_backend(backend, images.device, op="xattn_sim", inputs=(images, captions))
    kernel = None
    if name == "cpu" and soft and cpu_topk.available():
        kernel = "cpu"
    elif name == "triton" and soft and triton_topk_supports(images.dtype, k):
        kernel = "triton"
    if method == "kernel" and kernel is None:
        raise ValueError(f"method='kernel' needs the cpu backend (got {name!r}) with the compiled xattn_topk_fwd "
                         f"(available: {cpu_topk.available()}), or the triton backend with k <= {TRITON_MAX_K} "
                         f"(got {k}) and float32/bfloat16/float16 inputs (got {images.dtype}); and attention='soft' "
                         f"(got {extra.get('attention', 'soft')!r})")
    return kernel if method != "stream" else None


def _triton_topk(checked, k: int, queries: str, query_chunk, precision) -> tuple[Tensor, Tensor]:
    from .._common.precision import resolve_precision
    from . import triton as triton_topk
    images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse, _ = checked
    opts = dict(queries=queries, direction=direction, norm=norm, lambda_softmax=lambda_softmax, agg=agg,
                lambda_lse=lambda_lse, precision=resolve_precision(precision))
    n_q = images.shape[0] if queries == "images" else captions.shape[0]
    if not query_chunk or query_chunk >= n_q:
        return triton_topk.xattn_topk(images, captions, cap_lens, img_lens, k, **opts)
    out_v, out_i = [], []
    for q0 in range(0, n_q, query_chunk):
        q1 = min(n_q, q0 + query_chunk)
        if queries == "images":
            v, i = triton_topk.xattn_topk(images[q0:q1], captions, cap_lens, img_lens[q0:q1], k, **opts)
        else:
            v, i = triton_topk.xattn_topk(images, captions[q0:q1], cap_lens[q0:q1], img_lens, k, **opts)
        out_v.append(v)
        out_i.append(i)
    return _torch.cat(out_v), _torch.cat(out_i)


def _kernel_topk(checked, k: int, queries: str, query_chunk, max_tile_bytes) -> tuple[Tensor, Tensor]:
    from . import cpu as cpu_topk
    images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse, _ = checked
    opts = dict(direction=direction, norm=norm, lambda_softmax=lambda_softmax, agg=agg, lambda_lse=lambda_lse,
                max_tile_bytes=max_tile_bytes)
    n_q = images.shape[0] if queries == "images" else captions.shape[0]
    if not query_chunk or query_chunk >= n_q:
        return cpu_topk.xattn_topk(images, captions, cap_lens, img_lens, k, queries=queries, **opts)
    out_v, out_i = [], []
    for q0 in range(0, n_q, query_chunk):
        q1 = min(n_q, q0 + query_chunk)
        if queries == "images":
            v, i = cpu_topk.xattn_topk(images[q0:q1], captions, cap_lens, img_lens[q0:q1], k, queries=queries,
                                       **opts)
        else:
            v, i = cpu_topk.xattn_topk(images, captions[q0:q1], cap_lens[q0:q1], img_lens, k, queries=queries,
                                       **opts)
        out_v.append(v)
        out_i.append(i)
    return _torch.cat(out_v), _torch.cat(out_i)
