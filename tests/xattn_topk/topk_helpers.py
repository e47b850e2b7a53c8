"""Shared by the xattn_topk tests: the top-k oracle and seeded inputs with poisoned padding and exact ties."""
from __future__ import annotations

import numpy as np
import torch


def ref_topk(full: torch.Tensor, k: int):
    """Top-k per row: value descending, then index descending (the official argsort(d)[::-1] order)."""
    a = full.double().numpy()
    idx = np.broadcast_to(np.arange(a.shape[1]), a.shape)
    order = np.stack([np.lexsort((-idx[r], -a[r])) for r in range(a.shape[0])])[:, :k]
    return torch.from_numpy(np.take_along_axis(a, order, 1)), torch.from_numpy(order)


def make(n_img, n_cap, K, L, d, seed, dup):
    g = torch.Generator().manual_seed(seed)
    im = torch.randn(n_img, K, d, generator=g)
    cap = torch.randn(n_cap, L, d, generator=g)
    lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    lens[0] = L
    if dup and n_cap > 1:  # exact ties: repeated captions / images score identically
        cap[1::2] = cap[0]
        lens[1::2] = lens[0]
    if dup and n_img > 1:
        im[-1] = im[0]
    for c in range(n_cap):  # poison the padding
        cap[c, lens[c]:] = float("nan") if c % 2 else float("inf")
    return im, cap, lens


def poison_images(im, img_lens, seed):
    """Ragged region counts with NaN / -Inf in the padding regions."""
    for i in range(im.shape[0]):
        im[i, int(img_lens[i]):] = float("nan") if (i + seed) % 2 else -float("inf")
    return im
