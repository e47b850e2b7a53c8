"""TSHSR's plain per-pair loop (no official code exists; this is the baseline of our own head): every (image,
caption) pair scored on its own through :meth:`itm_models.tshsr.TSHSRSimilarity.forward` in eval mode, the caption
cut to its length. The oracle of ``sims`` in tests and the "per-pair loop" of the benchmarks."""
from __future__ import annotations

import torch
from torch import Tensor

from ..tshsr.head import TSHSRSimilarity

__all__ = ["per_pair_sims"]


@torch.no_grad()
def per_pair_sims(head: TSHSRSimilarity, img_emb: Tensor, cap_emb: Tensor, cap_lens) -> Tensor:
    """(N_img, K, d), (N_cap, L_max, d), (N_cap,) -> (N_img, N_cap) scores in the inputs' dtype, one pair at a
    time (eval semantics; the head's mode is restored)."""
    lens = torch.as_tensor(cap_lens).tolist()
    was_training = head.training
    head.eval()
    try:
        out = torch.empty(img_emb.shape[0], cap_emb.shape[0], dtype=img_emb.dtype, device=img_emb.device)
        for i in range(img_emb.shape[0]):
            for c, length in enumerate(lens):
                out[i, c] = head(img_emb[i:i + 1], cap_emb[c:c + 1, :length], [length])[0, 0]
    finally:
        head.train(was_training)
    return out
