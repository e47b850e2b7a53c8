"""``xattn_sim``: the all-pairs SCAN cross-attention similarity, dispatched to a backend."""
from __future__ import annotations

import torch

from .ops import xattn_sim_op
from ._validation import check_xattn_args
from .backends import choose_backend


def xattn_sim(images: torch.Tensor, captions: torch.Tensor, cap_lens, *, img_lens=None, direction: str = "t2i",
              norm: str = "clipped_l2norm", lambda_softmax: float = 9.0, agg: str = "lse", lambda_lse: float = 6.0,
              backend: str = "auto", max_tile_bytes: int | None = None) -> torch.Tensor:
    """All-pairs SCAN cross-attention similarity between every image and every caption.

    Args:
        images: (N_img, K, d) region features, float32, float64, bfloat16 or float16.
        captions: (N_cap, L_max, d) word features, same dtype and device, right-padded (padding never read).
        cap_lens: (N_cap,) integer caption lengths in 1..L_max (tensor, list or array).
        img_lens: optional (N_img,) integer region counts in 1..K; default all K regions.
        direction: "t2i" (words attend to regions, aggregate over words) or "i2t" (regions attend to words,
            aggregate over regions).
        norm: the official ``raw_feature_norm``: "softmax", "l2norm", "clipped_l2norm", "l1norm",
            "clipped_l1norm", "clipped" or "no_norm"; applied to the region-word scores along the query axis.
        lambda_softmax: attention temperature lambda1 (>= 0). lambda_lse: LogSumExp temperature lambda2 (> 0
            when agg="lse").
        agg: aggregation of the per-query cosines: "lse", "mean", "max" or "sum".
        backend: "auto" (fastest available: cuda > triton on GPU; cpu > torch on CPU), "cpu", "triton",
            "cuda", "torch" or "reference".
        max_tile_bytes: cap on the scratch of one tile (default: the backend's own, tens of MiB).

    Returns:
        (N_img, N_cap) similarities; float64 for float64 inputs, float32 otherwise (bfloat16/float16 inputs are
        multiplied exactly and accumulated in float32). Row i, column c is SCAN's score of image i and caption c,
        exactly as the official ``xattn_score_t2i``/``xattn_score_i2t`` compute it, every eps included.

    Autograd: differentiable w.r.t. ``images`` and ``captions`` on every backend. The backward recomputes the
    forward tile by tile (``torch_backend.xattn_sim_backward``): it saves only the inputs, never the attention.

    Memory: the output plus a per-tile scratch bounded by ``max_tile_bytes`` (per thread on the CPU backend);
    nothing of size N_img x N_cap x K x L or N_img x N_cap x L x d is ever allocated ("reference" excepted: it is
    the readable spec and materialises everything).
    """
    (images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse, backend) = \
        check_xattn_args(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                         backend)
    if max_tile_bytes is not None and (not isinstance(max_tile_bytes, int) or max_tile_bytes <= 0):
        raise ValueError(f"max_tile_bytes must be a positive int, got {max_tile_bytes!r}")
    name = choose_backend(backend, images.device)
    return xattn_sim_op(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                        name, max_tile_bytes or 0)
