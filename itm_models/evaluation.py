"""All-pairs evaluation: encode every image and caption once, score all pairs through the fused kernels."""
from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm


def image_rows(n_images: int, im_div: int, captions_per_image: int = 5) -> np.ndarray:
    """Feature rows of the distinct images: row i for 5 captions per row, row 5 i when there is a row per caption
    (the official evalrank keeps every 5th row then)."""
    return (np.arange(n_images) * captions_per_image) // im_div


@torch.no_grad()
def encode_images(model, features, rows, *, batch_size=128, device="cpu", progress=True, desc="images"):
    """Encode the feature rows ``rows`` of ``features`` ((rows, K, img_dim) array or memmap), each once.

    Returns (len(rows), K, d) float32 on ``device``. Reads ``batch_size`` rows of the memmap at a time.
    """
    out = None
    for b0 in tqdm(range(0, len(rows), batch_size), desc=f"encode {desc}", disable=not progress, leave=False):
        idx = rows[b0:b0 + batch_size]
        batch = torch.from_numpy(np.ascontiguousarray(features[idx], dtype=np.float32)).to(device)
        emb = model.encode_images(batch).float()
        if out is None:
            out = torch.empty((len(rows),) + tuple(emb.shape[1:]), dtype=torch.float32, device=device)
        out[b0:b0 + len(idx)] = emb
    return out


@torch.no_grad()
def similarity_matrix(model, dataset, *, batch_size=128, caption_chunk=1000, device=None, dtype=torch.float32,
                      captions_per_image=5, backend="auto", progress=True) -> np.ndarray:
    """All-pairs similarity matrix of a split, as the official evaluation defines it (image i = the i-th distinct
    image, caption c belongs to image c // captions_per_image).

    Args:
        model: has ``encode_images(features (B, K, img_dim)) -> (B, K, d)``, ``encode_captions(ids (B, L),
            lengths (B,)) -> (B, L, d)`` and ``sims(img_emb (N_img, K, d), cap_emb (N_cap, L, d), cap_lens)``.
        dataset: a :class:`itm_models.data.PrecompDataset` (``images`` memmap, ``im_div``, ``captions`` ids).
        caption_chunk: captions encoded and scored at a time.
        dtype: dtype in which the embeddings are scored (float32; float64 reproduces the official float64
            evaluation to rounding; bfloat16 is faster on hardware with bf16 matrix units).
    Returns:
        (N_img, N_cap) float32 numpy array on the host.

    Each image is encoded once (the official code encodes it once per caption). Peak memory: the image
    embeddings (N_img x K x d floats), one caption chunk's embeddings, the kernels' tile scratch, and the
    (N_img, N_cap) float32 result.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_cap = len(dataset.captions)
    if n_cap % captions_per_image:
        raise ValueError(f"the split has {n_cap} captions, not a multiple of captions_per_image={captions_per_image}")
    n_img = n_cap // captions_per_image
    model.eval()
    img_embs = encode_images(model, dataset.images, image_rows(n_img, dataset.im_div, captions_per_image),
                             batch_size=batch_size, device=device, progress=progress).to(dtype)
    sims = np.empty((n_img, n_cap), dtype=np.float32)
    for c0 in tqdm(range(0, n_cap, caption_chunk), desc="similarity", unit="chunk", disable=not progress):
        seqs = dataset.captions[c0:c0 + caption_chunk]
        lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        ids = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.as_tensor(s)
        cap_embs = _encode_caption_chunk(model, ids, lens, batch_size, device)
        block = model.sims(img_embs, cap_embs.to(dtype), lens.to(device))
        sims[:, c0:c0 + len(seqs)] = block.float().cpu().numpy()
    return sims


def _encode_caption_chunk(model, ids, lens, batch_size, device):
    parts = []
    longest = int(lens.max())
    for b in range(0, ids.shape[0], batch_size):
        emb = model.encode_captions(ids[b:b + batch_size].to(device), lens[b:b + batch_size].to(device)).float()
        if emb.shape[1] < longest:
            emb = torch.nn.functional.pad(emb, (0, 0, 0, longest - emb.shape[1]))
        parts.append(emb[:, :longest])
    return torch.cat(parts)
