"""The in-kernel CPU top-k: ``torch.ops.itm_kernels.xattn_topk_fwd`` (csrc/xattn_topk/cpu.cpp).

Algorithm. The scores come from the ``cpu`` xattn_sim kernel's own tile loop (csrc/xattn_sim/tiles.h: same
tables, tiling, GEMMs and epilogue), so each score is bitwise the entry of ``xattn_sim(backend="cpu")``'s matrix.
Each OpenMP worker scores a tile (a few images x a block of captions) into its thread scratch and offers every
score to a per-query bounded heap of its k best (score, index) pairs; a tile is never written anywhere else. At
the end the per-thread heaps of each query (at most threads x k candidates) are merged and sorted.

Order: descending score, NaN first (as ``torch.topk``), among equal scores the higher gallery index first (the
tie rule of ``itm_models.eval.metrics.recall`` and of ``merge.merge_tile``).

Memory beyond the inputs and the ``cpu`` xattn_sim kernel's per-call tables (Gram matrices, query norms) and
per-thread tile scratch (``max_tile_bytes``, default 4 MiB): per worker thread ``N_queries x k`` (score, index)
pairs (16 bytes each for float32 scores), plus the (N_queries, k) outputs. No query_chunk x gallery_chunk tile.
"""
from __future__ import annotations

import torch

from .._common.dispatch import has_cpu_kernels
from ..xattn_sim.cpu import AGG_CODES, DIRECTION_CODES, NORM_CODES

__all__ = ["available", "xattn_topk"]


def available() -> bool:
    """Whether the compiled extension has the in-kernel top-k (an older build may lack it)."""
    return has_cpu_kernels() and hasattr(torch.ops.itm_kernels, "xattn_topk_fwd")


def xattn_topk(images, captions, cap_lens, img_lens, k: int, *, queries: str, direction: str, norm: str,
               lambda_softmax: float, agg: str, lambda_lse: float, max_tile_bytes=None):
    """Top-k per query on the CPU kernel; arguments already validated (see ``itm_kernels.xattn_topk``).

    Args:
        images: (N_img, K, d) contiguous CPU tensor, float32/float64/bfloat16/float16; captions: (N_cap, L_max, d),
            same dtype; cap_lens: (N_cap,) and img_lens: (N_img,) integer lengths.
        k: 1..gallery size; queries: "images" (rows) or "captions" (columns).
    Returns:
        (values (N_q, k) float64 for float64 inputs, float32 otherwise; indices (N_q, k) int64).
    """
    if not available():
        raise RuntimeError("the in-kernel cpu top-k needs the compiled extension itm_kernels._C with "
                           "xattn_topk_fwd (pip install --no-build-isolation -e .)")
    return torch.ops.itm_kernels.xattn_topk_fwd(
        images.contiguous(), captions.contiguous(), cap_lens.to(torch.long).contiguous(),
        img_lens.to(torch.long).contiguous(), int(k), queries == "images", DIRECTION_CODES[direction],
        NORM_CODES[norm], float(lambda_softmax), AGG_CODES[agg], float(lambda_lse), int(max_tile_bytes or 0))
