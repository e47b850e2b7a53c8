"""``local_sim``: SGRAF's local similarity vectors for a block of (image, caption) pairs, fused.

For every image i, caption c and word t < cap_len[c] (``shared/reference/SEMANTICS.md``, SGRAF; official
``SCAN_attention`` + ``sim_tranloc_w`` in Paranioar/SGRAF ``model.py``)::

    s_kt   = v_k . e_t                                   scores, regions k = 1..K, words of the caption only
    n_kt   = l2norm_t(LeakyReLU_0.1(s_kt))               over the caption's words, eps 1e-8 on the norm
    alpha_t = softmax_k(lambda_softmax * n_kt)           over the regions (lambda 9 in SGRAF)
    a_t    = sum_k alpha_tk v_k,  a^_t = a_t / (|a_t| + 1e-8)
    y_t    = W (a^_t - e_t)^2 + b                        element-wise square, W (s, d), b (s,)
    out_t  = y_t / (|y_t| + 1e-8)

Rows t >= cap_len[c] of the (N_img, N_cap, L_max, s) result are zero.

How the chunked torch implementation avoids the (pairs x L x d) tensor: the attended vectors exist one tile of
(images x packed words of a caption range) at a time, in one reused scratch buffer of at most ``max_tile_bytes``.
Per tile: the scores are one GEMM (images*K x d) @ (d x words); the normalisations and the softmax run on the small
(images, K, words) tensor; |a_t|^2 = alpha_t^T G alpha_t with the per-image Gram matrix G = V V^T, so 1/(|a|+eps)
is folded into alpha and one batched GEMM writes a^ - e straight into the scratch (e enters as the GEMM's
accumulator); one in-place pass squares it and one GEMM with W^T (+ b) contracts d away. (The expansion
W(a^2) - 2 W(a*e) + W(e^2) saves nothing: a^2 and a*e still need a^ in d-space, and two contractions cost twice
one.) Per pair and word the FLOPs are the
official ones: 4 K d for the scores and the attended vector, 2 d s for the projection, which dominates (s = 256).

The compiled CPU kernel (backend "cpu", :func:`local_sim_cpu`, ``csrc/cpu/local_sim_cpu.cpp``) runs the same
algebra fused per work item (a caption block of <= 256 packed words x a range of images; items spread over the
threads): per group of 4 images one score GEMM, then per image the K-sized epilogue (LeakyReLU, per-caption l2
norm, softmax, |a|^2 by the Gram matrix) in SIMD C++ on the (K x words) tile, and over feature chunks of 256:
A = P V (P = alpha / (|a| + eps)) into float scratch, (A - e)^2 in the GEMM input dtype, Y += that W^T; then bias,
the row l2norm and the store into the output rows (any strides, cast once). Its GEMMs are oneDNN's brgemm
(float32; bfloat16 with VNNI-packed operands and float32 accumulation), single-threaded per item; float64 uses
at::mm; float16 runs on "torch". Its memory: the output, the Gram matrices, W^T packed once per call (d x s) and per
thread one scratch of at most ``max_tile_bytes`` (default 2 MiB; 1.4 MiB in bfloat16 at d = 1024, s = 256).
Measured on one Zen 5 core (60 x 300 pairs, ``benchmarks/bench_local_sim.py``): bfloat16 0.87 of the bare
bfloat16 GEMM rate (1.5x "torch"), float32 2.5x "torch".

GPU kernels: "triton" (``itm_kernels/triton_local_sim.py``: one program per (image, caption, word block), the
per-image Gram matrix computed once, a^ formed per feature chunk and contracted with W at once) and "cuda"
(``csrc/cuda/local_sim_kernel.cuh``: one thread block per pair, K <= 64, L_max <= 128, s <= 1024). Neither has run
on a GPU yet (they are tested under the Triton interpreter and a host emulation of the CUDA block code), so "auto"
never picks them: on CUDA tensors it runs "torch".

The backward is analytic and recomputes each tile (:func:`local_sim_backward_torch`): autograd saves only the
inputs; it is the same for every forward backend.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_feature_pair, check_lambda, check_lengths

EPS = 1e-8
LEAKY_SLOPE = 0.1
DEFAULT_LAMBDA_SOFTMAX = 9.0
# Scratch of the d-sized tile: a few MiB keeps the element-wise pass in the L2/L3 caches while the GEMMs
# stay large enough (>= 1,000 rows) to run near their peak; measured on 2 Zen cores, 4-16 MiB are equivalent.
DEFAULT_TILE_BYTES = 8 << 20
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch", "reference")
# Limits of the CUDA kernel (csrc/cuda/local_sim_kernel.cuh).
CUDA_MAX_K, CUDA_MAX_L, CUDA_MAX_S = 64, 128, 1024
# Low-precision GEMMs go through oneDNN, which keeps per-shape state (primitives, JIT kernels: measured ~0.3-0.5
# MiB per new shape, never released), so a long evaluation with ever-new tile shapes grows without bound. Tiles in
# bfloat16/float16 are padded to a multiple of this many words, which bounds the number of distinct shapes.
LOW_PRECISION_ROW_BUCKET = 64


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _have_cpu_kernel() -> bool:
    from .backends import available_backends

    return "cpu" in available_backends() and hasattr(torch.ops.itm_kernels, "local_sim_cpu_")


# --------------------------------------------------------------------------------------------------------------
# The specification
# --------------------------------------------------------------------------------------------------------------

def local_sim_reference(images: Tensor, captions: Tensor, cap_lens, weight: Tensor, bias: Tensor, *,
                        lambda_softmax: float = DEFAULT_LAMBDA_SOFTMAX, compute_dtype=None) -> Tensor:
    """The readable spec: materialises every (pair, word, d) attended vector. Small inputs only.

    Args as :func:`local_sim`; ``compute_dtype`` (default: the input dtype) is the dtype of ALL the arithmetic,
    so that tests can measure the error PyTorch itself makes in a low precision. Differentiable by autograd.
    Returns (N_img, N_cap, L_max, s) in ``compute_dtype``, zero beyond each caption's length.
    """
    dtype = compute_dtype or images.dtype
    v, e = images.to(dtype), captions.to(dtype)
    w, b = weight.to(dtype), bias.to(dtype)
    cap_lens = torch.as_tensor(cap_lens, device=images.device).long()
    valid = torch.arange(e.shape[1], device=e.device)[None, :] < cap_lens[:, None]        # (Nc, L)
    zero = torch.zeros((), dtype=dtype, device=e.device)
    e = torch.where(valid[..., None], e, zero)                                              # padding never read
    s = torch.einsum("ikd,ctd->ickt", v, e)                                                 # (Ni, Nc, K, L)
    h = torch.where(valid[None, :, None, :], torch.nn.functional.leaky_relu(s, LEAKY_SLOPE), zero)
    n = h / (h.pow(2).sum(dim=3, keepdim=True).sqrt() + EPS)                               # over the words
    alpha = torch.softmax(lambda_softmax * n, dim=2)                                        # over the regions
    a = torch.einsum("ickt,ikd->ictd", alpha, v)                                            # (Ni, Nc, L, d)
    a_hat = a / (a.norm(dim=3, keepdim=True) + EPS)
    y = torch.matmul((a_hat - e[None]).pow(2), w.t()) + b                                   # (Ni, Nc, L, s)
    out = y / (y.norm(dim=3, keepdim=True) + EPS)
    return torch.where(valid[None, :, :, None], out, zero)


# --------------------------------------------------------------------------------------------------------------
# Chunked torch implementation (forward and analytic backward)
# --------------------------------------------------------------------------------------------------------------

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
        self.a_norm = a_sq.clamp_min(0).sqrt()
        self.inv = 1.0 / (self.a_norm + EPS)

    def attended_hat(self, v_mm, out, minus=None):
        """a^ = (alpha * inv)^T V into ``out`` (ni, W, d), in the matmul dtype; a^ + ``minus`` (W, d) if given,
        added inside the GEMM (one rounding in low precision)."""
        scaled = (self.alpha * self.inv[:, None, :]).to(v_mm.dtype).transpose(1, 2)
        if minus is None:
            return torch.bmm(scaled, v_mm, out=out)
        return torch.baddbmm(minus.expand(out.shape), scaled, v_mm, out=out)


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
_CPU_OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def local_sim_cpu(images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor, bias: Tensor, *,
                  lambda_softmax: float, max_tile_bytes: int | None = None, out: Tensor | None = None,
                  gram: Tensor | None = None) -> Tensor:
    """Forward with the fused C++ kernel (``torch.ops.itm_kernels.local_sim_cpu_``) on validated CPU inputs; the
    contract of :func:`local_sim_torch` (``out``: any floating dtype and strides, e.g. the word nodes of a larger
    node tensor, rows cast once; ``gram``: a precomputed :func:`local_sim_gram`). No autograd.

    float32 / bfloat16 / float64 features run in C++ (bfloat16: the three products in bfloat16 with float32
    accumulation, everything else float32); float16 features, non-CPU tensors or a build without the extension run
    :func:`local_sim_torch`. ``max_tile_bytes`` caps the per-thread scratch (default 2 MiB).

    Memory: the output, the Gram matrices (unless given), W^T packed once (d x s in the features' dtype) and per
    thread one scratch of at most ``max_tile_bytes`` (more only for a caption longer than that allows).
    """
    if images.dtype == torch.float16 or images.device.type != "cpu" or not _have_cpu_kernel():
        return local_sim_torch(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                               max_tile_bytes=max_tile_bytes, out=out, gram=gram)
    n_img, K, _ = images.shape
    n_cap, L, s_dim = captions.shape[0], captions.shape[1], weight.shape[0]
    cdtype = _out_dtype(images.dtype)
    if gram is None:
        gram = _gram(images, cdtype)
    elif gram.shape != (n_img, K, K) or gram.dtype != cdtype:
        raise ValueError(f"gram must be ({n_img}, K, K) {cdtype}, got {tuple(gram.shape)} {gram.dtype}")
    if out is None:
        out = torch.empty(n_img, n_cap, L, s_dim, dtype=cdtype, device=images.device)
    elif out.shape != (n_img, n_cap, L, s_dim):
        raise ValueError(f"out must be {(n_img, n_cap, L, s_dim)}, got {tuple(out.shape)}")
    direct = out.dtype in _CPU_OUT_DTYPES and (out.stride(-1) == 1 or s_dim == 1) and \
        torch._debug_has_internal_overlap(out) != 1                     # not an expanded tensor
    target = out if direct else torch.empty(out.shape, dtype=cdtype, device=out.device)
    torch.ops.itm_kernels.local_sim_cpu_(target, images.contiguous(), captions.contiguous(),
                                         cap_lens.to(torch.long).contiguous(),
                                         weight.to(_mm_dtype(images.dtype)).contiguous(),
                                         bias.to(cdtype).contiguous(), gram.contiguous(), float(lambda_softmax),
                                         int(max_tile_bytes or 0))
    if not direct:
        out.copy_(target)
    return out


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


# --------------------------------------------------------------------------------------------------------------
# torch.library registration: forward, backward, fake implementations, autograd
# --------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("itm_kernels::local_sim", mutates_args=())
def local_sim_op(images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor, bias: Tensor,
                 lambda_softmax: float, backend: str, max_tile_bytes: int) -> Tensor:
    """Registered forward: (N_img, K, d), (N_cap, L, d), (N_cap,), (s, d), (s,) -> (N_img, N_cap, L, s)."""
    if backend == "reference":
        out = local_sim_reference(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                                  compute_dtype=_out_dtype(images.dtype))
    elif backend == "cpu":
        out = local_sim_cpu(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                            max_tile_bytes=max_tile_bytes or None)
    elif backend == "cuda":
        out = torch.ops.itm_kernels.local_sim_cuda(images, captions, cap_lens, weight, bias, float(lambda_softmax))
    elif backend == "triton":
        from .triton_local_sim import local_sim_triton

        out = local_sim_triton(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax)
    else:
        out = local_sim_torch(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                              max_tile_bytes=max_tile_bytes or None)
    return out.to(_out_dtype(images.dtype)).contiguous()


@local_sim_op.register_fake
def _local_sim_fake(images, captions, cap_lens, weight, bias, lambda_softmax, backend, max_tile_bytes):
    return images.new_empty((images.shape[0], captions.shape[0], captions.shape[1], weight.shape[0]),
                            dtype=_out_dtype(images.dtype))


@torch.library.custom_op("itm_kernels::local_sim_backward", mutates_args=())
def local_sim_backward_op(grad: Tensor, images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor,
                          bias: Tensor, lambda_softmax: float, max_tile_bytes: int
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Registered backward: grad (N_img, N_cap, L, s) -> grads of (images, captions, weight, bias)."""
    return local_sim_backward_torch(grad, images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                                    max_tile_bytes=max_tile_bytes or None)


@local_sim_backward_op.register_fake
def _local_sim_backward_fake(grad, images, captions, cap_lens, weight, bias, lambda_softmax, max_tile_bytes):
    return (torch.empty_like(images), torch.empty_like(captions), torch.empty_like(weight),
            torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    images, captions, cap_lens, weight, bias, lambda_softmax, _, max_tile_bytes = inputs
    ctx.save_for_backward(images, captions, cap_lens, weight, bias)
    ctx.opts = (lambda_softmax, max_tile_bytes)


def _backward(ctx, grad):
    images, captions, cap_lens, weight, bias = ctx.saved_tensors
    grads = local_sim_backward_op(grad.contiguous(), images, captions, cap_lens, weight, bias, *ctx.opts)
    needs = ctx.needs_input_grad
    return (grads[0] if needs[0] else None, grads[1] if needs[1] else None, None,
            grads[2] if needs[3] else None, grads[3] if needs[4] else None, None, None, None)


local_sim_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------

def _check_cuda_backend(images: Tensor, captions: Tensor, weight: Tensor) -> None:
    from .backends import has_cuda_kernels

    if images.device.type != "cuda" or not has_cuda_kernels() or not hasattr(torch.ops.itm_kernels, "local_sim_cuda"):
        raise ValueError("backend 'cuda' needs CUDA tensors and the extension built with CUDA "
                         "(torch.ops.itm_kernels.local_sim_cuda)")
    K, L, s = images.shape[1], captions.shape[1], weight.shape[0]
    if K > CUDA_MAX_K or L > CUDA_MAX_L or s > CUDA_MAX_S:
        raise ValueError(f"backend 'cuda' supports K <= {CUDA_MAX_K}, L_max <= {CUDA_MAX_L} and s <= {CUDA_MAX_S}, "
                         f"got K={K}, L_max={L}, s={s}; use backend 'torch'")


def _check_triton_backend(images: Tensor) -> None:
    from .backends import available_backends

    if "triton" not in available_backends(images.device):
        raise ValueError(f"backend 'triton' is not available for {images.device.type} tensors here: it needs triton "
                         "and a CUDA device, or TRITON_INTERPRET=1 (set before triton is first imported) for CPU "
                         "tensors")
    if images.dtype == torch.float64:
        raise ValueError("backend 'triton' does not take float64 inputs; the 'torch' backend handles float64")


def local_sim(images: Tensor, captions: Tensor, cap_lens, weight: Tensor, bias: Tensor, *,
              lambda_softmax: float = DEFAULT_LAMBDA_SOFTMAX, backend: str = "auto",
              max_tile_bytes: int | None = None) -> Tensor:
    """SGRAF local similarity vectors of every (image, caption) pair of a block, every word.

    Args:
        images: (N_img, K, d) region features (SGRAF: l2-normalised, K = 36), float32, float64, bfloat16 or
            float16.
        captions: (N_cap, L_max, d) word features, same dtype and device, right-padded (padding never read).
        cap_lens: (N_cap,) integer lengths in 1..L_max (tensor, list or array).
        weight: (s, d) and bias: (s,): ``sim_tranloc_w`` (any float dtype; cast to the matmul dtype).
        lambda_softmax: the attention temperature (SGRAF: 9).
        backend: "auto" ("cpu" for CPU tensors when the extension is built, else "torch"), "cpu" (the fused C++
            kernel; float16 features run on "torch"), "cuda" (fused CUDA kernel: K <= 64, L_max <= 128,
            s <= 1024), "triton" (fused Triton kernel; no float64), "torch" (chunked torch ops, bounded memory) or
            "reference" (the readable spec). "cuda" and "triton" have not run on a GPU yet; "auto" never picks them.
        max_tile_bytes: cap on the scratch: "torch": the one tile of attended vectors (default 8 MiB); "cpu": each
            thread's work item (default 2 MiB).

    Returns:
        (N_img, N_cap, L_max, s): row [i, c, t] = l2norm(W (a^_t - e_t)^2 + b) for the pair (image i, caption c)
        and word t < cap_lens[c], zero beyond; float64 for float64 inputs, float32 otherwise. With bfloat16/float16
        inputs the three matrix products multiply in that dtype (as under autocast; "torch" also rounds their
        results to it, "cpu" accumulates and keeps them in float32) and every normalisation, the softmax and the
        output are float32.

    Autograd: differentiable w.r.t. images, captions, weight and bias (analytic tiled backward computed in float32,
    float64 for float64 inputs; it saves only the inputs).

    Memory: the output (N_img N_cap L_max s values; call it on blocks of pairs), the per-image Gram matrices
    (N_img K K) and scratch of at most ``max_tile_bytes`` ("torch": one; "cpu": one per thread, plus W^T packed
    once, d s values): the (pairs x L x d) attended vectors never exist all at once ("reference" excepted).
    """
    check_feature_pair(images, captions)
    for name, t, dims in (("weight", weight, 2), ("bias", bias, 1)):
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims or t.device != images.device:
            raise ValueError(f"{name} must be {dims}-D on {images.device}, got shape {tuple(t.shape)} on {t.device}")
    if weight.shape[1] != images.shape[2] or bias.shape[0] != weight.shape[0]:
        raise ValueError(f"weight must be (s, d={images.shape[2]}) and bias (s,), got {tuple(weight.shape)} and "
                         f"{tuple(bias.shape)}")
    cap_lens = check_lengths("cap_lens", cap_lens, captions.shape[0], captions.shape[1], images.device)
    lambda_softmax = check_lambda("lambda_softmax", lambda_softmax)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if max_tile_bytes is not None and (isinstance(max_tile_bytes, bool) or not isinstance(max_tile_bytes, int)
                                       or max_tile_bytes <= 0):
        raise ValueError(f"max_tile_bytes must be a positive int, got {max_tile_bytes!r}")
    if backend == "cpu" and (images.device.type != "cpu" or not _have_cpu_kernel()):
        raise ValueError("backend 'cpu' needs CPU tensors and the compiled extension (itm_kernels._C)")
    if backend == "cuda":
        _check_cuda_backend(images, captions, weight)
    if backend == "triton":
        _check_triton_backend(images)
    name = backend
    if backend == "auto":
        name = "cpu" if images.device.type == "cpu" and _have_cpu_kernel() else "torch"
    return local_sim_op(images.contiguous(), captions.contiguous(), cap_lens, weight.contiguous(),
                        bias.contiguous(), lambda_softmax, name, max_tile_bytes or 0)
