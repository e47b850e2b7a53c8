"""SCAN evaluation helper: :func:`encode_and_score` (encode every image and caption once, score all pairs)."""
from __future__ import annotations

import numpy as np
import torch

from .model import SCAN, SCANEnsemble

__all__ = ["encode_and_score"]


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


@torch.no_grad()
def encode_and_score(model: SCAN | SCANEnsemble, images, ids: torch.Tensor, lengths, *, batch_size: int = 128,
                     caption_chunk: int = 1000, sims_dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None, backend: str | None = None) -> torch.Tensor:
    """Encode every image and caption once (in batches, no grad, eval mode) and score all pairs.

    Args:
        model: :class:`SCAN` or :class:`SCANEnsemble` (mean of the members' matrices).
        images: (N_img, K, img_dim) features: tensor, numpy array or memory map (copied one batch at a time).
        ids: (N_cap, L_max) token ids; lengths: (N_cap,) lengths.
        batch_size: items per encoder batch.
        caption_chunk: captions per ``xattn_sim`` call (bounds the peak memory of the embeddings in flight).
        sims_dtype: dtype of the embeddings fed to the similarity (``torch.float64`` reproduces the official
            float64 evaluation); default: the model's dtype.
        device: where to run (default: the model's device).
        backend: ``xattn_sim`` backend (default: the model's).

    Returns:
        (N_img, N_cap) scores on the CPU (float64 if ``sims_dtype`` is float64, else float32).
    """
    if isinstance(model, SCANEnsemble):
        total = None
        for m in model.models:
            s = encode_and_score(m, images, ids, lengths, batch_size=batch_size, caption_chunk=caption_chunk,
                                 sims_dtype=sims_dtype, device=device, backend=backend)
            total = s if total is None else total + s
        return total / len(model.models)
    if batch_size < 1 or caption_chunk < 1:
        raise ValueError(f"batch_size and caption_chunk must be positive, got {batch_size}, {caption_chunk}")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    was_training = model.training
    model.eval()
    try:
        lens = torch.as_tensor(lengths).to(torch.long).cpu()
        n_img = len(images)
        img_embs = []
        for a, b in _batches(n_img, batch_size):
            chunk = images[a:b]
            chunk = torch.as_tensor(np.asarray(chunk)) if not isinstance(chunk, torch.Tensor) else chunk
            img_embs.append(model.encode_images(chunk.to(device=device, dtype=param.dtype)))
        img_emb = torch.cat(img_embs)
        if sims_dtype is not None:
            img_emb = img_emb.to(sims_dtype)
        l_max = int(lens.max())
        ids = ids[:, :l_max]
        cap_embs = []
        for a, b in _batches(ids.shape[0], batch_size):
            cap_embs.append(model.encode_captions(ids[a:b].to(device), lens[a:b]))
        cap_emb = torch.cat(cap_embs)
        if sims_dtype is not None:
            cap_emb = cap_emb.to(sims_dtype)
        cols = []
        for a, b in _batches(cap_emb.shape[0], caption_chunk):
            cols.append(model.sims(img_emb, cap_emb[a:b], lens[a:b].to(device), backend=backend).cpu())
        return torch.cat(cols, dim=1)
    finally:
        model.train(was_training)
