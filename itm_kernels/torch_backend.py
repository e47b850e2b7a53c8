"""The "torch" backend: chunked pure-PyTorch all-pairs SCAN similarity (no compiled code needed).

Captions are sorted by length and cut into chunks of similar lengths (each chunk padded only to its own longest
caption); images are cut into chunks; each (image chunk, caption chunk) tile computes its (Ni, Nc, K, Lc) score
tensor, the attention weights and the cosines through the Gram-matrix identity |a|^2 = alpha^T G alpha, so the
weighted context is never formed. Peak extra memory: about ``TILE_TENSORS`` tile-sized tensors, each at most
``max_tile_bytes`` (default 32 MiB), plus the (N_img, N_cap) output.
"""
from __future__ import annotations

import torch

from . import reference

DEFAULT_TILE_BYTES = 32 << 20
TILE_TENSORS = 5


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _masked_softmax(x, valid, dim):
    x = x.masked_fill(~valid, float("-inf"))
    return torch.softmax(x, dim=dim)


def tile_sims(img, img_lens, cap, cap_lens, *, direction, norm, lambda_softmax, agg, lambda_lse):
    """Similarities of one tile: img (Ni, K, d), cap (Nc, Lc, d) in the compute dtype -> (Ni, Nc).

    Padding rows of ``img``/``cap`` may hold anything: they are zeroed before use.
    """
    K, Lc = img.shape[1], cap.shape[1]
    r_valid = torch.arange(K, device=img.device)[None, :] < img_lens[:, None]      # (Ni, K)
    w_valid = torch.arange(Lc, device=cap.device)[None, :] < cap_lens[:, None]     # (Nc, Lc)
    img = img * r_valid[..., None].to(img.dtype)
    cap = cap * w_valid[..., None].to(cap.dtype)
    s = torch.einsum("ikd,ctd->ickt", img, cap)                                     # (Ni, Nc, K, Lc)
    rv = r_valid[:, None, :, None]
    wv = w_valid[None, :, None, :]
    if direction == "t2i":
        s_n = reference.normalize_scores(s, wv, norm, dim=3)
        alpha = _masked_softmax(lambda_softmax * s_n, rv, dim=2)
        num = (alpha * s).sum(2)                                                    # (Ni, Nc, Lc)
        gram = torch.bmm(img, img.transpose(1, 2))                                  # (Ni, K, K)
        g_alpha = torch.einsum("ikj,icjt->ickt", gram, alpha)
        a_sq = (alpha * g_alpha).sum(2).clamp_min(0)
        q_norm = cap.norm(dim=2)[None]                                              # (1, Nc, Lc)
        valid = w_valid[None].expand(img.shape[0], -1, -1)
    else:
        s_n = reference.normalize_scores(s, rv, norm, dim=2)
        alpha = _masked_softmax(lambda_softmax * s_n, wv, dim=3)
        num = (alpha * s).sum(3)                                                    # (Ni, Nc, K)
        gram = torch.bmm(cap, cap.transpose(1, 2))                                  # (Nc, Lc, Lc)
        g_alpha = torch.einsum("ctu,icku->ickt", gram, alpha)
        a_sq = (alpha * g_alpha).sum(3).clamp_min(0)
        q_norm = img.norm(dim=2)[:, None]                                           # (Ni, 1, K)
        valid = r_valid[:, None].expand(-1, cap.shape[0], -1)
    r = num / (q_norm * a_sq.sqrt()).clamp_min(reference.EPS)
    return reference.aggregate(r, valid, agg, lambda_lse)


def caption_chunks(cap_lens: torch.Tensor, words_per_chunk: int):
    """Yield index tensors of captions sorted by length, each chunk holding about ``words_per_chunk`` words."""
    order = torch.argsort(cap_lens.cpu(), descending=True, stable=True)
    lens = cap_lens.cpu()[order].tolist()
    start = 0
    while start < len(order):
        stop, longest = start, lens[start]
        while stop < len(order) and (stop - start + 1) * longest <= max(words_per_chunk, longest):
            stop += 1
        yield order[start:stop]
        start = stop


def xattn_sim(images, captions, cap_lens, img_lens, *, direction, norm, lambda_softmax, agg, lambda_lse,
              max_tile_bytes=None):
    """Chunked all-pairs similarity; arguments already validated (see ``itm_kernels.xattn_sim``)."""
    max_tile_bytes = max_tile_bytes or DEFAULT_TILE_BYTES
    dtype = compute_dtype_for(images.dtype)
    n_img, K, _ = images.shape
    elem = torch.finfo(dtype).bits // 8
    out = torch.empty(n_img, captions.shape[0], dtype=dtype, device=images.device)
    img_chunk = max(1, min(n_img, 32))
    words_per_chunk = max(1, max_tile_bytes // (elem * img_chunk * K))
    if words_per_chunk < captions.shape[1]:
        img_chunk = max(1, max_tile_bytes // (elem * K * captions.shape[1]))
        words_per_chunk = max(1, max_tile_bytes // (elem * img_chunk * K))
    for idx in caption_chunks(cap_lens, words_per_chunk):
        idx = idx.to(images.device)
        lens = cap_lens[idx]
        cap = captions[idx, : int(lens.max())].to(dtype)
        for i0 in range(0, n_img, img_chunk):
            img = images[i0:i0 + img_chunk].to(dtype)
            out[i0:i0 + img_chunk, idx] = tile_sims(
                img, img_lens[i0:i0 + img_chunk], cap, lens, direction=direction, norm=norm,
                lambda_softmax=lambda_softmax, agg=agg, lambda_lse=lambda_lse)
    return out
