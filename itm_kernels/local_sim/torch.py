"""The "torch" backend of ``local_sim``: chunked PyTorch forward and the analytic tiled backward every forward backend
shares (the algorithm is described in ``itm_kernels.local_sim``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common.constants import EPS, LEAKY_SLOPE
from .._common.dtypes import out_dtype as _out_dtype
from .._common.gram_guard import attended_vectors, cancelled

# Scratch of the d-sized tile: a few MiB keeps the element-wise pass in the L2/L3 caches while the GEMMs
# stay large enough (>= 1,000 rows) to run near their peak; measured on 2 Zen cores, 4-16 MiB are equivalent.
DEFAULT_TILE_BYTES = 8 << 20
# Low-precision GEMMs go through oneDNN, which keeps per-shape state (primitives, JIT kernels: measured ~0.3-0.5
# MiB per new shape, never released), so a long evaluation with ever-new tile shapes grows without bound. Tiles in
# bfloat16/float16 are padded to a multiple of this many words, which bounds the number of distinct shapes.
LOW_PRECISION_ROW_BUCKET = 64


def _mm_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the matrix products: the input's (bf16/fp16 multiply in low precision, autocast-style)."""
    return dtype


def _caption_ranges(cap_lens: list[int], words_per_range: int):
    """Contiguous caption ranges [c0, c1) holding at most ``words_per_range`` real words (at least one caption)."""
    c0, n = 0, len(cap_lens)
    while c0 < n:
        c1, words = c0, 0
        while c1 < n and (c1 == c0 or words + cap_lens[c1] <= words_per_range):
            words += cap_lens[c1]
            c1 += 1
        yield c0, c1, words
        c0 = c1


def _plan(n_img: int, cap_lens: list[int], d: int, elem: int, max_tile_bytes: int, bucket: int = 1):
    """Yield (i0, i1, c0, c1, words): tiles whose (images x packed words x d) scratch fits ``max_tile_bytes``;
    ``words`` is the range's word count rounded up to a multiple of ``bucket``."""
    rows = max(1, max_tile_bytes // (d * elem))
    words_per_range = max(1, rows // min(n_img, 4))
    for c0, c1, words in _caption_ranges(cap_lens, words_per_range):
        words = -(-words // bucket) * bucket
        img_chunk = max(1, rows // words)
        for i0 in range(0, n_img, img_chunk):
            yield i0, min(n_img, i0 + img_chunk), c0, c1, words


class _Tile:
    """The small (K-sized) quantities of one tile: scores, normalised scores, attention, 1/(|a| + eps)."""

    def __init__(self, v_mm, gram, e_mm, seg, n_slots, lambda_softmax, cdtype):
        ni, K, d = v_mm.shape
        self.s = torch.matmul(v_mm.reshape(ni * K, d), e_mm.t()).to(cdtype).view(ni, K, -1)   # (ni, K, W)
        self.h = torch.nn.functional.leaky_relu(self.s, LEAKY_SLOPE)
        sq = torch.zeros(ni, K, n_slots, dtype=cdtype, device=v_mm.device)
        sq.index_add_(2, seg, self.h * self.h)
        self.word_norm = sq.sqrt()                                                                # (ni, K, nc)
        self.den = (self.word_norm + EPS)[:, :, seg]                                              # (ni, K, W)
        self.alpha = torch.softmax(lambda_softmax * (self.h / self.den), dim=1)                   # over K
        a_sq = (self.alpha * torch.bmm(gram, self.alpha)).sum(1)                                  # (ni, W)
        bad = cancelled(a_sq, self.alpha, gram)
        self.exact = None
        if bool(bad.any()):           # the Gram identity cancelled: those a^ come from the explicit a (float64)
            j, w = bad.nonzero(as_tuple=True)
            a = attended_vectors(self.alpha.transpose(1, 2)[j, w], lambda j0, j1: v_mm[j[j0:j1]], d)
            a_norm = torch.linalg.vector_norm(a, dim=1)
            a_sq = a_sq.index_put((j, w), a_norm.square().to(a_sq.dtype))
            self.exact = (j, w, (a / (a_norm[:, None] + EPS)).to(v_mm.dtype))
        self.a_norm = a_sq.clamp_min(0).sqrt()
        self.inv = 1.0 / (self.a_norm + EPS)

    def attended_hat(self, v_mm, out, minus=None):
        """a^ = (alpha * inv)^T V into ``out`` (ni, W, d), in the matmul dtype; a^ + ``minus`` (W, d) if given,
        added inside the GEMM (one rounding in low precision)."""
        scaled = (self.alpha * self.inv[:, None, :]).to(v_mm.dtype).transpose(1, 2)
        if minus is None:
            out = torch.bmm(scaled, v_mm, out=out)
        else:
            out = torch.baddbmm(minus.expand(out.shape), scaled, v_mm, out=out)
        if self.exact is not None:
            j, w, rows = self.exact
            out[j, w] = rows if minus is None else rows + minus[w]
        return out


def _gram(images, cdtype):
    v = images.to(cdtype)
    return torch.bmm(v, v.transpose(1, 2))                                                        # (N_img, K, K)


def local_sim_gram(images: Tensor, cdtype: torch.dtype | None = None) -> Tensor:
    """The per-image Gram matrices V V^T (N_img, K, K) in ``cdtype`` (default: float32, float64 for float64) that
    :func:`local_sim_torch` needs; callers that score one image against many caption blocks compute them once and
    pass them as ``gram``."""
    return _gram(images, cdtype or _out_dtype(images.dtype))


def _packed_words(captions, cap_lens_t, lens, c0, c1, mm, n_rows=None):
    """The real words of captions c0..c1 packed: (longest, valid (nc, longest), e (W, d), seg (W,) caption of each
    row). With ``n_rows`` > W, zero rows are appended with seg = nc, a spare slot that no output reads."""
    longest = max(lens[c0:c1])
    valid = torch.arange(longest, device=captions.device)[None, :] < cap_lens_t[c0:c1, None]
    e = captions[c0:c1, :longest][valid].to(mm)                                                   # (W, d)
    seg = torch.repeat_interleave(torch.arange(c1 - c0, device=captions.device), cap_lens_t[c0:c1])
    if n_rows is not None and n_rows > e.shape[0]:
        extra = n_rows - e.shape[0]
        e = torch.cat([e, e.new_zeros(extra, e.shape[1])])
        seg = torch.cat([seg, seg.new_full((extra,), c1 - c0)])
    return longest, valid, e, seg


def local_sim_torch(images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor, bias: Tensor, *,
                    lambda_softmax: float, max_tile_bytes: int | None = None, out: Tensor | None = None,
                    gram: Tensor | None = None) -> Tensor:
    """Chunked forward on validated inputs; see :func:`local_sim`. No autograd.

    ``out``: optional (N_img, N_cap, L, s) destination of any floating dtype, strided views included (e.g. the
    word nodes of a larger node tensor); the float32/float64 rows are cast into it on the way (one rounding).
    ``gram``: optional precomputed :func:`local_sim_gram` of ``images`` (same values as computed here).

    Memory: the output, the per-image Gram matrices (N_img x K x K), one scratch of at most ``max_tile_bytes``
    (default 8 MiB) for the attended vectors, and K-sized/s-sized per-tile tensors (K/d and s/d of the scratch).
    """
    max_tile_bytes = max_tile_bytes or DEFAULT_TILE_BYTES
    n_img, _, d = images.shape
    n_cap, L, s_dim = captions.shape[0], captions.shape[1], weight.shape[0]
    cdtype, mm = _out_dtype(images.dtype), _mm_dtype(images.dtype)
    v_mm, w_mm, b_mm = images.to(mm), weight.to(mm), bias.to(mm)
    if gram is None:
        gram = _gram(images, cdtype)
    elif gram.shape != (n_img, images.shape[1], images.shape[1]) or gram.dtype != cdtype:
        raise ValueError(f"gram must be ({n_img}, K, K) {cdtype}, got {tuple(gram.shape)} {gram.dtype}")
    if out is None:
        out = torch.empty(n_img, n_cap, L, s_dim, dtype=cdtype, device=images.device)
    elif out.shape != (n_img, n_cap, L, s_dim):
        raise ValueError(f"out must be {(n_img, n_cap, L, s_dim)}, got {tuple(out.shape)}")
    lens = cap_lens.tolist()
    elem = torch.finfo(mm).bits // 8
    bucket = LOW_PRECISION_ROW_BUCKET if mm in (torch.bfloat16, torch.float16) else 1
    plan = list(_plan(n_img, lens, d, elem, max_tile_bytes, bucket))
    scratch = torch.empty(max((i1 - i0) * words for i0, i1, _, _, words in plan) * d, dtype=mm,
                          device=images.device)
    w_t = w_mm.t()
    packed = None
    for i0, i1, c0, c1, words in plan:
        if packed is None or packed[0] != (c0, c1):
            packed = ((c0, c1),) + _packed_words(captions, cap_lens, lens, c0, c1, mm, n_rows=words)
            packed += (~packed[2]).nonzero(as_tuple=True)                 # padding rows below the range's longest
            neg_e = -packed[3]
            real = sum(lens[c0:c1])
        _, longest, valid, e, seg, pad_c, pad_t = packed
        ni = i1 - i0
        tile = _Tile(v_mm[i0:i1], gram[i0:i1], e, seg, c1 - c0 + 1, lambda_softmax, cdtype)
        diff = tile.attended_hat(v_mm[i0:i1], scratch[: ni * words * d].view(ni, words, d), minus=neg_e)
        diff.square_()                                                                            # (a^ - e)^2
        y = torch.addmm(b_mm, diff.view(ni * words, d), w_t).to(cdtype)                          # (ni W, s)
        y = y / (torch.linalg.vector_norm(y, dim=1, keepdim=True) + EPS)
        region = out[i0:i1, c0:c1, :longest]
        region[:, valid] = y.view(ni, words, s_dim)[:, :real].to(out.dtype)
        if pad_c.numel():                                   # zero only the padding rows (index_put, not a full pass)
            region[:, pad_c, pad_t] = torch.zeros((), dtype=out.dtype, device=out.device)
        out[i0:i1, c0:c1, longest:] = 0
    return out


# Output dtypes the C++ kernel stores into directly (others get a float32/float64 buffer and one copy).


def local_sim_backward_torch(grad: Tensor, images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor,
                             bias: Tensor, *, lambda_softmax: float, max_tile_bytes: int | None = None):
    """Gradients of sum(grad * local_sim(...)) w.r.t. (images, captions, weight, bias), analytically.

    Each tile's forward is recomputed (in float32, float64 for float64 inputs) and back-propagated at once, so the
    memory is three d-sized tile tensors (a^, a^ - e, and (a^ - e)^2 reused for the gradients) of at most
    ``max_tile_bytes`` (default 4 MiB) each, plus the gradient outputs; padding words get zero gradient.
    Subgradient of LeakyReLU at 0: PyTorch's (slope 0.1).
    """
    max_tile_bytes = max_tile_bytes or DEFAULT_TILE_BYTES // 2
    n_img, K, d = images.shape
    s_dim = weight.shape[0]
    cdtype = _out_dtype(images.dtype)
    v, gram = images.to(cdtype), _gram(images, cdtype)
    w = weight.to(cdtype)
    b = bias.to(cdtype)
    grad = grad.to(cdtype)
    g_images = torch.zeros(images.shape, dtype=cdtype, device=images.device)
    g_captions = torch.zeros(captions.shape, dtype=cdtype, device=images.device)
    g_weight = torch.zeros(w.shape, dtype=cdtype, device=images.device)
    g_bias = torch.zeros(b.shape, dtype=cdtype, device=images.device)
    lens = cap_lens.tolist()
    elem = torch.finfo(cdtype).bits // 8
    packed = None
    for i0, i1, c0, c1, words in _plan(n_img, lens, d, elem, max_tile_bytes):
        if packed is None or packed[0] != (c0, c1):
            packed = ((c0, c1),) + _packed_words(captions, cap_lens, lens, c0, c1, cdtype)
        _, longest, valid, e, seg = packed
        ni, vi = i1 - i0, v[i0:i1]
        t = _Tile(vi, gram[i0:i1], e, seg, c1 - c0, lambda_softmax, cdtype)
        a_hat = t.attended_hat(vi, torch.empty(ni, words, d, dtype=cdtype, device=v.device))
        u = a_hat - e                                                                             # (ni, W, d)
        delta = u * u
        y = torch.addmm(b, delta.view(-1, d), w.t())                                             # (ni W, s)
        y_norm = torch.linalg.vector_norm(y, dim=1, keepdim=True)
        y_den = y_norm + EPS
        g_o = grad[i0:i1, c0:c1, :longest][:, valid].reshape(-1, s_dim)
        # o = y / (|y| + eps)
        coef = (y * g_o).sum(1, keepdim=True) / torch.where(y_norm > 0, y_norm * y_den * y_den, 1.0)
        g_y = g_o / y_den - y * coef
        g_weight += g_y.t() @ delta.view(-1, d)
        g_bias += g_y.sum(0)
        g_u = torch.mm(g_y, w, out=delta.view(-1, d)).view(ni, words, d)                        # g_delta
        g_u.mul_(u).mul_(2)                                                                       # d delta / d u
        g_e = -g_u.sum(0)                                                                         # (W, d)
        # a^ = a / (|a| + eps): g_a = g_a^ / (|a| + eps) - a^ (a^ . g_a^) / |a|
        radial = (g_u * a_hat).sum(2) / torch.where(t.a_norm > 0, t.a_norm, 1.0)                # (ni, W)
        g_a = g_u.mul_(t.inv[:, :, None])
        g_a.addcmul_(a_hat, radial[:, :, None], value=-1)
        g_alpha = torch.bmm(vi, g_a.transpose(1, 2))                                              # (ni, K, W)
        g_vi = torch.bmm(t.alpha, g_a)                                                            # (ni, K, d)
        # softmax over K, then the l2norm over each caption's words, then LeakyReLU
        g_n = lambda_softmax * t.alpha * (g_alpha - (t.alpha * g_alpha).sum(1, keepdim=True))
        seg_dot = torch.zeros(ni, K, c1 - c0, dtype=cdtype, device=v.device)
        seg_dot.index_add_(2, seg, g_n * t.h)
        scale = seg_dot / torch.where(t.word_norm > 0, t.word_norm * (t.word_norm + EPS) ** 2, 1.0)
        g_h = g_n / t.den - t.h * scale[:, :, seg]
        g_s = torch.where(t.s > 0, g_h, LEAKY_SLOPE * g_h)                                      # (ni, K, W)
        g_vi += torch.matmul(g_s, e)
        g_e += g_s.permute(2, 0, 1).reshape(words, ni * K) @ vi.reshape(ni * K, d)
        g_images[i0:i1] += g_vi
        g_cap_view = g_captions[c0:c1, :longest]
        g_cap_view[valid] += g_e
    return (g_images.to(images.dtype), g_captions.to(captions.dtype), g_weight.to(weight.dtype),
            g_bias.to(bias.dtype))
