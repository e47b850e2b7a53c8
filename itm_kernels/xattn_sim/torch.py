"""The "torch" backend: chunked pure-PyTorch all-pairs SCAN similarity (no compiled code needed).

Captions are sorted by length and cut into chunks of similar lengths (each chunk padded only to its own longest
caption); images are cut into chunks; each (image chunk, caption chunk) tile computes its (Ni, Nc, K, Lc) score
tensor, the attention weights and the cosines through the Gram-matrix identity |a|^2 = alpha^T G alpha, so the
weighted context is never formed, except for the rare queries where alpha^T G alpha cancels (the attended vector
nearly vanishes; ``itm_kernels._common.gram_guard``): their q.a and |a|^2 are recomputed from the explicit vector in
float64. Padding is selected out with ``where`` (NaN/Inf there never propagate). Peak extra memory: about ``TILE_TENSORS`` tile-sized tensors, each at most
``max_tile_bytes`` (default 32 MiB), plus the (N_img, N_cap) output.
"""
from __future__ import annotations

import torch

from .._common.gram_guard import cancelled, exact_attended
from .._common.dtypes import compute_dtype as compute_dtype_for
from . import reference

DEFAULT_TILE_BYTES = 32 << 20
TILE_TENSORS = 5


def _masked_softmax(x, valid, dim):
    return torch.softmax(x.masked_fill(~valid, float("-inf")), dim=dim)


def _tile_inputs(img, img_lens, cap, cap_lens, direction):
    """Zero the padding (selected out, so NaN/Inf there never propagate) and lay the tile out as context x query for ``attend_forward``.

    Returns (img, cap, s (Ni, Nc, C, Q), q_valid (., ., 1, Q), c_valid (., ., C, 1), gram (., ., C, C),
    q_norm (., ., Q)): for t2i context = regions, query = words; for i2t the reverse.
    """
    K, Lc = img.shape[1], cap.shape[1]
    r_valid = torch.arange(K, device=img.device)[None, :] < img_lens[:, None]      # (Ni, K)
    w_valid = torch.arange(Lc, device=cap.device)[None, :] < cap_lens[:, None]     # (Nc, Lc)
    zero = torch.zeros((), dtype=img.dtype, device=img.device)
    img = torch.where(r_valid[..., None], img, zero)        # select, never multiply: padding may hold NaN/Inf
    cap = torch.where(w_valid[..., None], cap, zero)
    s = torch.einsum("ikd,ctd->ickt", img, cap)                                     # (Ni, Nc, K, Lc)
    if direction == "t2i":
        return (img, cap, s, w_valid[None, :, None, :], r_valid[:, None, :, None],
                torch.bmm(img, img.transpose(1, 2))[:, None], cap.norm(dim=2)[None])
    return (img, cap, s.transpose(2, 3), r_valid[:, None, None, :], w_valid[None, :, :, None],
            torch.bmm(cap, cap.transpose(1, 2))[None], img.norm(dim=2)[:, None])


def _features(img, cap, direction):
    """(context, query, t2i) of a tile, for the Gram guard's exact recompute."""
    return (img, cap, True) if direction == "t2i" else (cap, img, False)


def _per_image(gram, alpha) -> bool:
    # gram is (Ni, 1, C, C) for t2i (one per image) and (1, Nc, C, C) for i2t (one per caption); when a tile has
    # one image and one caption both read alike, and the two einsums below then agree.
    return gram.shape[0] == alpha.shape[0] and gram.shape[1] == 1


def _gram_times(gram, alpha):
    """gram @ alpha for gram (Ni, 1, C, C) (one per image) or (1, Nc, C, C) (one per caption), alpha
    (Ni, Nc, C, Q): one product per image or caption rather than Ni x Nc tiny ones."""
    if _per_image(gram, alpha):
        return torch.einsum("ikj,icjq->ickq", gram[:, 0], alpha)
    return torch.einsum("ckj,icjq->ickq", gram[0], alpha)


def _gram_grad(gram, left, alpha):
    """sum over Q of left alpha^T, reduced to gram's layout: (Ni, 1, C, C) or (1, Nc, C, C)."""
    if _per_image(gram, alpha):
        return torch.einsum("icjq,ickq->ijk", left, alpha)[:, None]
    return torch.einsum("icjq,ickq->cjk", left, alpha)[None]


def attend_forward(s, q_valid, c_valid, gram, q_norm, *, norm, lambda_softmax, features=None):
    """Cosines R (Ni, Nc, Q) of each query item with its attended context, from the score tile s (Ni, Nc, C, Q).

    Uses q.a = sum_c alpha s and |a|^2 = alpha^T gram alpha. Where that cancels (``cancelled``), q.a and |a|^2 are
    recomputed from the explicit attended vector in float64, given ``features`` = (context, query, t2i) of
    ``_tile_inputs``. Returns R and the intermediates the backward needs.
    """
    x = reference.normalize_scores(s, q_valid, norm, dim=3)
    alpha = _masked_softmax(lambda_softmax * x, c_valid, dim=2)
    num = (alpha * s).sum(2)
    g_alpha = _gram_times(gram, alpha)
    a_sq = (alpha * g_alpha).sum(2)
    if features is not None:
        num, a_sq = _guard(num, a_sq, alpha, gram, q_valid, *features)
    # Clamping |a|^2 at the smallest normal number changes nothing (the denominator is then clamped to eps
    # anyway) and keeps the gradient finite where rounding makes |a|^2 <= 0.
    a_norm = a_sq.clamp_min(torch.finfo(a_sq.dtype).tiny).sqrt()
    denom = q_norm * a_norm
    r = num / denom.clamp_min(reference.EPS)
    return r, dict(alpha=alpha, num=num, g_alpha=g_alpha, a_sq=a_sq, a_norm=a_norm, denom=denom)


def _guard(num, a_sq, alpha, gram, q_valid, context, query, t2i):
    """Replace q.a and |a|^2 of the valid queries where the Gram identity cancels by their exact values."""
    bad = cancelled(a_sq, alpha, gram) & q_valid[:, :, 0]
    if not bool(bad.any()):
        return num, a_sq
    i, c, q = bad.nonzero(as_tuple=True)
    weights = alpha.permute(0, 1, 3, 2)[i, c, q]                                     # (n, C)
    ctx_rows, q_rows = (i, c) if t2i else (c, i)
    dot, sq = exact_attended(weights, lambda j0, j1: context[ctx_rows[j0:j1]], context.shape[-1],
                             query[q_rows, q])
    return num.index_put((i, c, q), dot.to(num.dtype)), a_sq.index_put((i, c, q), sq.to(a_sq.dtype))


def aggregate_weights(r, valid, agg, lambda_lse):
    """d aggregate(r) / d r over the last axis (PyTorch's subgradient: ties of max share the gradient equally)."""
    if agg == "lse":
        return _masked_softmax(lambda_lse * r, valid, dim=-1)
    v = valid.to(r.dtype)
    if agg == "mean":
        return v / v.sum(-1, keepdim=True)
    if agg == "sum":
        return v
    top = r.masked_fill(~valid, float("-inf")).amax(-1, keepdim=True)
    hit = (r == top) & valid
    return hit.to(r.dtype) / hit.sum(-1, keepdim=True).to(r.dtype)


def attend_backward(g_r, s, q_valid, c_valid, gram, q_norm, saved, *, norm, lambda_softmax):
    """Back-propagate g_r (Ni, Nc, Q) through ``attend_forward``: returns (g_s, g_gram, g_q_norm), same layouts."""
    alpha, num, g_alpha = saved["alpha"], saved["num"], saved["g_alpha"]
    a_sq, a_norm, denom = saved["a_sq"], saved["a_norm"], saved["denom"]
    denom_c = denom.clamp_min(reference.EPS)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    g_num = g_r / denom_c
    g_denom = torch.where(denom >= reference.EPS, -g_r * num / denom_c ** 2, zero)
    g_q_norm = g_denom * a_norm
    g_a_sq = torch.where(a_sq >= torch.finfo(a_sq.dtype).tiny, g_denom * q_norm / (2 * a_norm), zero)
    g_alpha_total = g_num[:, :, None] * s + 2 * g_a_sq[:, :, None] * g_alpha
    g_gram = _gram_grad(gram, alpha * g_a_sq[:, :, None], alpha)
    g_s = g_num[:, :, None] * alpha
    g_z = alpha * (g_alpha_total - (alpha * g_alpha_total).sum(2, keepdim=True))
    g_n = lambda_softmax * g_z
    x = torch.where(q_valid, reference.normalize_scores(s, q_valid, "clipped" if norm.startswith("clipped") else
                                                        "no_norm", dim=3), zero)
    if norm in ("l2norm", "clipped_l2norm"):
        r = x.pow(2).sum(3, keepdim=True).sqrt()
        f = 1 / (r + reference.EPS)
        r_safe = torch.where(r > 0, r, torch.ones_like(r))
        g_x = f * g_n - f ** 2 * (g_n * x).sum(3, keepdim=True) * x / r_safe
    elif norm in ("l1norm", "clipped_l1norm"):
        f = 1 / (x.abs().sum(3, keepdim=True) + reference.EPS)
        g_x = f * g_n - f ** 2 * (g_n * x).sum(3, keepdim=True) * x.sign()
    elif norm == "softmax":
        n = reference.normalize_scores(s, q_valid, "softmax", dim=3)
        g_x = n * (g_n - (n * g_n).sum(3, keepdim=True))
    else:
        g_x = g_n
    g_x = torch.where(q_valid, g_x, zero)
    if norm.startswith("clipped"):
        g_x = g_x * torch.where(s > 0, torch.ones_like(s), torch.full_like(s, reference.LEAKY_SLOPE))
    return g_s + g_x, g_gram, g_q_norm


def tile_sims(img, img_lens, cap, cap_lens, *, direction, norm, lambda_softmax, agg, lambda_lse):
    """Similarities of one tile: img (Ni, K, d), cap (Nc, Lc, d) in the compute dtype -> (Ni, Nc).

    Padding rows of ``img``/``cap`` may hold anything: they are zeroed before use.
    """
    img, cap, s, q_valid, c_valid, gram, q_norm = _tile_inputs(img, img_lens, cap, cap_lens, direction)
    r, _ = attend_forward(s, q_valid, c_valid, gram, q_norm, norm=norm, lambda_softmax=lambda_softmax,
                          features=_features(img, cap, direction))
    return reference.aggregate(r, q_valid[:, :, 0].expand_as(r), agg, lambda_lse)


def tile_backward(grad, img, img_lens, cap, cap_lens, *, direction, norm, lambda_softmax, agg, lambda_lse):
    """Gradients of sum(grad * tile_sims(...)): grad (Ni, Nc) -> (g_img (Ni, K, d), g_cap (Nc, Lc, d))."""
    img, cap, s, q_valid, c_valid, gram, q_norm = _tile_inputs(img, img_lens, cap, cap_lens, direction)
    r, saved = attend_forward(s, q_valid, c_valid, gram, q_norm, norm=norm, lambda_softmax=lambda_softmax,
                              features=_features(img, cap, direction))
    valid = q_valid[:, :, 0].expand_as(r)
    g_r = grad[:, :, None] * aggregate_weights(r, valid, agg, lambda_lse)
    g_s, g_gram, g_q_norm = attend_backward(g_r, s, q_valid, c_valid, gram, q_norm, saved, norm=norm,
                                            lambda_softmax=lambda_softmax)
    if direction == "i2t":
        g_s = g_s.transpose(2, 3)                                                   # back to (Ni, Nc, K, Lc)
    g_img = torch.einsum("ickt,ctd->ikd", g_s, cap)
    g_cap = torch.einsum("ickt,ikd->ctd", g_s, img)
    if direction == "t2i":
        g_gram = g_gram[:, 0]
        g_img = g_img + torch.bmm(g_gram + g_gram.transpose(1, 2), img)
        cap_norm = cap.norm(dim=2, keepdim=True)
        g_cap = g_cap + g_q_norm.sum(0)[..., None] * cap / torch.where(cap_norm > 0, cap_norm, 1.0)
    else:
        g_gram = g_gram[0]
        g_cap = g_cap + torch.bmm(g_gram + g_gram.transpose(1, 2), cap)
        img_norm = img.norm(dim=2, keepdim=True)
        g_img = g_img + g_q_norm.sum(1)[..., None] * img / torch.where(img_norm > 0, img_norm, 1.0)
    r_valid = torch.arange(img.shape[1], device=img.device)[None, :] < img_lens[:, None]
    w_valid = torch.arange(cap.shape[1], device=cap.device)[None, :] < cap_lens[:, None]
    zero = torch.zeros((), dtype=g_img.dtype, device=g_img.device)
    return torch.where(r_valid[..., None], g_img, zero), torch.where(w_valid[..., None], g_cap, zero)


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
    elem = torch.finfo(dtype).bits // 8
    out = torch.empty(images.shape[0], captions.shape[0], dtype=dtype, device=images.device)
    for rows, idx in tiles(images.shape[0], images.shape[1], captions, cap_lens, elem, max_tile_bytes):
        lens = cap_lens[idx]
        cap = captions[idx, : int(lens.max())].to(dtype)
        out[rows, idx] = tile_sims(images[rows].to(dtype), img_lens[rows], cap, lens, direction=direction,
                                   norm=norm, lambda_softmax=lambda_softmax, agg=agg, lambda_lse=lambda_lse)
    return out


def tiles(n_img: int, K: int, captions: torch.Tensor, cap_lens: torch.Tensor, elem: int, max_tile_bytes: int):
    """Yield (image slice, caption index tensor) tiles whose (Ni, Nc, K, Lc) score tensor fits ``max_tile_bytes``."""
    img_chunk = max(1, min(n_img, 32))
    words_per_chunk = max(1, max_tile_bytes // (elem * img_chunk * K))
    if words_per_chunk < captions.shape[1]:
        img_chunk = max(1, max_tile_bytes // (elem * K * captions.shape[1]))
        words_per_chunk = max(1, max_tile_bytes // (elem * img_chunk * K))
    for idx in caption_chunks(cap_lens, words_per_chunk):
        for i0 in range(0, n_img, img_chunk):
            yield slice(i0, min(n_img, i0 + img_chunk)), idx.to(captions.device)


def xattn_sim_backward(grad, images, captions, cap_lens, img_lens, *, direction, norm, lambda_softmax, agg,
                       lambda_lse, max_tile_bytes=None):
    """Gradients of sum(grad * xattn_sim(...)) w.r.t. images (N_img, K, d) and captions (N_cap, L_max, d).

    Recomputes each tile's forward and back-propagates it at once with explicit formulas (``tile_backward``), so
    the memory is that of one tile (about 10 tile-sized tensors of at most ``max_tile_bytes`` each, default
    8 MiB) plus the two gradient outputs; nothing proportional to N_img x N_cap is kept. Padding rows get zero gradient. The
    subgradients at ties (max aggregation, LeakyReLU at 0) are PyTorch's, as in the reference.
    """
    max_tile_bytes = max_tile_bytes or DEFAULT_TILE_BYTES // 4
    dtype = compute_dtype_for(images.dtype)
    elem = torch.finfo(dtype).bits // 8
    grad_images = torch.zeros(images.shape, dtype=dtype, device=images.device)
    grad_captions = torch.zeros(captions.shape, dtype=dtype, device=captions.device)
    grad = grad.to(dtype)
    for rows, idx in tiles(images.shape[0], images.shape[1], captions, cap_lens, elem, max_tile_bytes):
        lens = cap_lens[idx]
        longest = int(lens.max())
        g_img, g_cap = tile_backward(grad[rows][:, idx], images[rows].to(dtype), img_lens[rows],
                                     captions[idx, :longest].to(dtype), lens, direction=direction, norm=norm,
                                     lambda_softmax=lambda_softmax, agg=agg, lambda_lse=lambda_lse)
        grad_images[rows] += g_img
        grad_captions[:, :longest].index_add_(0, idx, g_cap)
    return grad_images.to(images.dtype), grad_captions.to(captions.dtype)
