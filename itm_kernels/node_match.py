"""``node_match``: GSMN's node-level matching vectors for a block of (image, caption) pairs, fused.

For every image i (regions v_k, k < K), caption c (words e_t, t < cap_len[c]) and block b of the feature axis
(``num_blocks`` equal slices of d; official GSMN: 16 blocks of 64), following ``shared/reference/SEMANTICS.md``
(GSMN) and the official ``VisualGraph`` / ``TextualGraph.node_level_matching``::

    s_kt        = v_k . e_t                                    one score tile, shared by both directions
    h_kt        = LeakyReLU_0.1(s_kt)
    regions query the words (visual graph):
        alpha_kt = softmax_t(lambda * h_kt / (|h_.t|_k + 1e-8))       l2 over the regions, softmax over the words
        region_match[i, c, k, b] = cos_b(v_k, sum_t alpha_kt e_t)
    words query the regions (textual graph):
        beta_tk  = softmax_k(lambda * h_kt / (|h_k.|_t + 1e-8))       l2 over the words, softmax over the regions
        word_match[i, c, t, b]   = cos_b(e_t, sum_k beta_tk v_k)
    cos_b(x, y) = x_b . y_b / max(|x_b| |y_b|, 1e-8)                  x_b: the b-th slice of d

How the attended contexts are avoided: with per-block scores s^b_kt = v_k,b . e_t,b (the 16 partial sums of the
score GEMM, so no extra FLOPs), the numerator of cos_b is sum_t alpha_kt s^b_kt, and |sum_t alpha_kt e_t,b|^2 =
alpha_k^T G^b alpha_k with the caption's per-block Gram matrix G^b = E_b E_b^T (L x L; the image's K x K Gram
for the other direction). Everything per pair is K x L x 16-sized; nothing d-sized exists per pair.

Tiles: captions are visited in length order and padded only to the longest of their tile; one tile holds a few
images x a few captions, sized so that its K x L x 16 tensors stay under ``max_tile_bytes``.

Backends: "cpu" is one fused C++ kernel per caption range (``csrc/cpu/node_match_cpu.cpp``): per pair, the block
scores as a register-tiled product with the 16 blocks as the lanes of one SIMD vector, then both attentions and
the Gram-form cosines in cache (16 blocks of >= 16 features; other shapes run on "torch"); "triton"
(``triton_node_match.py``, GPU, or CPU tensors under ``TRITON_INTERPRET=1``) and "cuda"
(``csrc/cuda/node_match_kernel.cuh``: one thread block per pair, K <= 64, L <= 128) form the contexts on chip;
"torch" runs the Gram-form algebra as torch ops on whole tiles; "reference" is the spec.

Autograd: a registered backward op (``itm_kernels::node_match_backward``) recomputes each tile under
``torch.func.vjp`` (checkpointing per tile), so it needs the memory of one tile's forward graph, never the
(pairs x K x L) tensors of the whole block.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._validation import check_feature_pair, check_lambda, check_lengths

EPS = 1e-8
LEAKY_SLOPE = 0.1
DEFAULT_LAMBDA_SOFTMAX = 20.0          # Flickr30K (COCO: 10)
DEFAULT_NUM_BLOCKS = 16
# K x L x 16 tensors of one tile; ~6 of them live at once. 4 MiB each keeps the tile's work in the L2/L3 caches
# while the block GEMMs keep >= a few hundred rows.
DEFAULT_TILE_BYTES = 4 << 20
BACKENDS = ("auto", "cpu", "cuda", "triton", "torch", "reference")
# Limits of the CUDA kernel (csrc/cuda/node_match_kernel.cuh); larger problems run on "torch".
CUDA_MAX_K, CUDA_MAX_L = 64, 128
# |sum_t a_t e_t,b|^2 = a^T G^b a cancels badly when the context is much shorter than its words and a block has
# very few features (measured: float32 cosines of 250 at 1 feature per block, 5e-4 excess error at 2). Below this
# width a tile forms its contexts explicitly (d-sized per pair, which is small exactly then).
GRAM_MIN_BLOCK_WIDTH = 16
# The C++ epilogue is compiled for GSMN's 16 blocks (one AVX-512 vector of float32); other counts run on "torch".
CPU_NUM_BLOCKS = 16


def _have_cpu_kernel() -> bool:
    from .backends import available_backends

    return "cpu" in available_backends() and hasattr(torch.ops.itm_kernels, "node_match_fused_")


def _have_cuda_kernel() -> bool:
    from .backends import has_cuda_kernels

    return has_cuda_kernels() and hasattr(torch.ops.itm_kernels, "node_match_cuda")


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _block_cosine(dot: Tensor, sq_x: Tensor, sq_y: Tensor) -> Tensor:
    """Official ``cosine_similarity``: x.y / max(|x| |y|, eps), given x.y, |x|^2 and |y|^2."""
    return dot / (sq_x.clamp_min(0).sqrt() * sq_y.clamp_min(0).sqrt()).clamp_min(EPS)


# --------------------------------------------------------------------------------------------------------------
# The specification
# --------------------------------------------------------------------------------------------------------------

def node_match_reference(images: Tensor, captions: Tensor, cap_lens, *, lambda_softmax: float = DEFAULT_LAMBDA_SOFTMAX,
                         num_blocks: int = DEFAULT_NUM_BLOCKS, compute_dtype=None) -> tuple[Tensor, Tensor]:
    """The readable spec: materialises every attended context (pairs x (K + L) x d). Small inputs only.

    Args as :func:`node_match`; ``compute_dtype`` (default: the input dtype) is the dtype of all the arithmetic.
    Differentiable by autograd. Returns (region_match (N_img, N_cap, K, B), word_match (N_img, N_cap, L_max, B))
    in ``compute_dtype``, word rows beyond each caption's length zero.
    """
    dtype = compute_dtype or images.dtype
    v, e = images.to(dtype), captions.to(dtype)
    n_img, K, d = v.shape
    L = e.shape[1]
    cap_lens = torch.as_tensor(cap_lens, device=v.device).long()
    valid = torch.arange(L, device=v.device)[None, :] < cap_lens[:, None]                 # (Nc, L)
    zero = torch.zeros((), dtype=dtype, device=v.device)
    e = torch.where(valid[..., None], e, zero)
    s = torch.einsum("ikd,ctd->ickt", v, e)                                                 # (Ni, Nc, K, L)
    h = torch.nn.functional.leaky_relu(s, LEAKY_SLOPE)
    word_ok = valid[None, :, None, :]
    h = torch.where(word_ok, h, zero)
    # regions query the words: l2 over the regions, softmax over the caption's words
    n_v = h / (h.pow(2).sum(dim=2, keepdim=True).sqrt() + EPS)
    alpha = torch.softmax(torch.where(word_ok, lambda_softmax * n_v, float("-inf")), dim=3)
    ctx_v = torch.einsum("ickt,ctd->ickd", alpha, e)                                        # (Ni, Nc, K, d)
    # words query the regions: l2 over the words, softmax over the regions
    n_t = h / (h.pow(2).sum(dim=3, keepdim=True).sqrt() + EPS)
    beta = torch.softmax(lambda_softmax * n_t, dim=2)
    ctx_t = torch.einsum("ickt,ikd->ictd", beta, v)                                         # (Ni, Nc, L, d)

    def blocks(x):
        return x.reshape(*x.shape[:-1], num_blocks, d // num_blocks)

    def cos(x, y):
        return (x * y).sum(-1) / (x.norm(dim=-1) * y.norm(dim=-1)).clamp_min(EPS)

    region = cos(blocks(v)[:, None], blocks(ctx_v))                                         # (Ni, Nc, K, B)
    word = cos(blocks(e)[None], blocks(ctx_t))                                              # (Ni, Nc, L, B)
    return region, torch.where(valid[None, :, :, None], word, zero)


# --------------------------------------------------------------------------------------------------------------
# One tile (differentiable torch code: the forward runs it without grad, the backward recomputes it with grad)
# --------------------------------------------------------------------------------------------------------------

def _tile(v: Tensor, e: Tensor, valid: Tensor, lambda_softmax: float, num_blocks: int) -> tuple[Tensor, Tensor]:
    """v (ni, K, d), e (nc, Lt, d) with padding rows zero, valid (nc, Lt) ->
    region (ni, nc, K, B), word (ni, nc, Lt, B); same dtype as v. Narrow blocks (fewer than
    ``GRAM_MIN_BLOCK_WIDTH`` features) take the explicit-context form."""
    if v.shape[2] // num_blocks < GRAM_MIN_BLOCK_WIDTH:
        return node_match_reference(v, e, valid.sum(1), lambda_softmax=lambda_softmax, num_blocks=num_blocks)
    return _tile_gram(v, e, valid, lambda_softmax, num_blocks)


def _tile_gram(v: Tensor, e: Tensor, valid: Tensor, lambda_softmax: float, num_blocks: int) -> tuple[Tensor, Tensor]:
    """:func:`_tile` through per-block scores and Gram matrices (no d-sized tensor per pair)."""
    ni, K, d = v.shape
    nc, Lt = e.shape[:2]
    B, db = num_blocks, d // num_blocks
    vb = v.reshape(ni * K, B, db).transpose(0, 1)                                  # (B, ni K, db)
    eb = e.reshape(nc * Lt, B, db).transpose(0, 1)                                 # (B, nc Lt, db)
    sb = torch.bmm(vb, eb.transpose(1, 2)).view(B, ni, K, nc, Lt)                  # per-block scores
    h = torch.nn.functional.leaky_relu(sb.sum(0), LEAKY_SLOPE)                     # (ni, K, nc, Lt)
    word_ok = valid[None, None]                                                    # (1, 1, nc, Lt)
    h = torch.where(word_ok, h, 0.0)
    # regions query the words
    n_v = h / (h.square().sum(1, keepdim=True).sqrt() + EPS)
    alpha = torch.softmax(torch.where(word_ok, lambda_softmax * n_v, float("-inf")), dim=3)
    num_v = (sb * alpha).sum(4)                                                    # (B, ni, K, nc)
    gram_e = torch.einsum("bcte,bcue->cbtu", eb.view(B, nc, Lt, db), eb.view(B, nc, Lt, db))   # (nc, B, Lt, Lt)
    a_c = alpha.permute(2, 0, 1, 3).reshape(nc, 1, ni * K, Lt)
    ctx_sq_v = (torch.matmul(a_c, gram_e) * a_c).sum(3)                            # (nc, B, ni K)
    v_sq = vb.square().sum(2).view(B, ni, K)
    region = _block_cosine(num_v.permute(1, 3, 2, 0),                              # (ni, nc, K, B)
                           v_sq.permute(1, 2, 0)[:, None],
                           ctx_sq_v.view(nc, B, ni, K).permute(2, 0, 3, 1))
    # words query the regions
    n_t = h / (h.square().sum(3, keepdim=True).sqrt() + EPS)
    beta = torch.softmax(lambda_softmax * n_t, dim=1)                              # (ni, K, nc, Lt)
    num_t = (sb * beta).sum(2)                                                     # (B, ni, nc, Lt)
    gram_v = torch.einsum("bike,bije->ibkj", vb.view(B, ni, K, db), vb.view(B, ni, K, db))     # (ni, B, K, K)
    b_i = beta.reshape(ni, K, nc * Lt).transpose(1, 2)[:, None]                    # (ni, 1, nc Lt, K)
    ctx_sq_t = (torch.matmul(b_i, gram_v) * b_i).sum(3)                            # (ni, B, nc Lt)
    e_sq = eb.square().sum(2).view(B, nc, Lt)
    word = _block_cosine(num_t.permute(1, 2, 3, 0),                                # (ni, nc, Lt, B)
                         e_sq.permute(1, 2, 0)[None],
                         ctx_sq_t.view(ni, B, nc, Lt).permute(0, 2, 3, 1))
    return region, torch.where(valid[None, :, :, None], word, 0.0)


def _plan(n_img: int, K: int, lens_sorted: list[int], num_blocks: int, elem: int, max_tile_bytes: int):
    """Yield (i0, i1, j0, j1, Lt) over images and length-sorted captions: tiles whose (B, ni, K, nc, Lt) tensors
    fit ``max_tile_bytes``."""
    budget = max(1, max_tile_bytes // (num_blocks * K * elem))                     # ni * nc * Lt
    n_cap = len(lens_sorted)
    j0 = 0
    while j0 < n_cap:
        longest = lens_sorted[min(n_cap - 1, j0 + max(1, budget // max(1, lens_sorted[j0] * 4)) - 1)]
        nc = max(1, min(n_cap - j0, budget // (longest * min(n_img, 4))))
        j1 = j0 + nc
        Lt = lens_sorted[j1 - 1]
        ni = max(1, budget // (nc * Lt))
        for i0 in range(0, n_img, ni):
            yield i0, min(n_img, i0 + ni), j0, j1, Lt
        j0 = j1


def _tiles(images: Tensor, captions: Tensor, cap_lens: Tensor, num_blocks: int, max_tile_bytes: int):
    """Yield (i0, i1, cap_idx, Lt, e, valid) for every tile; ``e`` gathered, padding zeroed, in the compute dtype."""
    cdtype = _out_dtype(images.dtype)
    lens = cap_lens.tolist()
    order = sorted(range(len(lens)), key=lens.__getitem__)
    lens_sorted = [lens[j] for j in order]
    order_t = torch.tensor(order, device=images.device, dtype=torch.long)
    elem = torch.finfo(cdtype).bits // 8
    current = None
    for i0, i1, j0, j1, Lt in _plan(images.shape[0], images.shape[1], lens_sorted, num_blocks, elem,
                                    max_tile_bytes):
        if current is None or current[0] != (j0, j1):
            idx = order_t[j0:j1]
            valid = torch.arange(Lt, device=images.device)[None, :] < cap_lens[idx][:, None]
            e = torch.where(valid[..., None], captions[idx, :Lt].to(cdtype), 0.0)
            current = ((j0, j1), idx, valid, e)
        _, idx, valid, e = current
        yield i0, i1, idx, Lt, e, valid


def node_match_torch(images: Tensor, captions: Tensor, cap_lens: Tensor, *, lambda_softmax: float, num_blocks: int,
                     max_tile_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Tiled forward on validated inputs; see :func:`node_match`. No autograd."""
    max_tile_bytes = max_tile_bytes or DEFAULT_TILE_BYTES
    n_img, K, _ = images.shape
    n_cap, L = captions.shape[:2]
    cdtype = _out_dtype(images.dtype)
    region = torch.empty(n_img, n_cap, K, num_blocks, dtype=cdtype, device=images.device)
    word = torch.zeros(n_img, n_cap, L, num_blocks, dtype=cdtype, device=images.device)
    v = images.to(cdtype)
    with torch.no_grad():
        for i0, i1, idx, Lt, e, valid in _tiles(images, captions, cap_lens, num_blocks, max_tile_bytes):
            r, w = _tile(v[i0:i1], e, valid, lambda_softmax, num_blocks)
            region[i0:i1].index_copy_(1, idx, r)
            word[i0:i1, :, :Lt].index_copy_(1, idx, w)
    return region, word


def _blocked(x: Tensor, num_blocks: int, rows: int) -> Tensor:
    """(n, len, d) -> (n, rows, d / num_blocks, num_blocks): feature b * db + e at [.., e, b], zero rows appended
    up to ``rows``."""
    n, length, d = x.shape
    out = x.new_zeros(n, rows, d // num_blocks, num_blocks)
    out[:, :length] = x.view(n, length, num_blocks, d // num_blocks).transpose(2, 3)
    return out


def node_match_cpu(images: Tensor, captions: Tensor, cap_lens: Tensor, *, lambda_softmax: float, num_blocks: int,
                   max_tile_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Forward with the fused C++ kernel (``torch.ops.itm_kernels.node_match_fused_``); validated CPU inputs, no
    autograd. Per call, the images' block-interleaved copy, Gram matrices and block norms; per caption range (length
    sorted, at most ``max_tile_bytes`` of block-interleaved words), the same for the captions; the kernel then scores
    every (image, caption) pair of the range in cache."""
    max_tile_bytes = max_tile_bytes or 2 * DEFAULT_TILE_BYTES
    n_img, K, d = images.shape
    n_cap, L = captions.shape[:2]
    B = num_blocks
    cdtype = _out_dtype(images.dtype)
    v = images.to(cdtype)
    img_blk = _blocked(v, B, -(-K // 4) * 4)                                                 # (N_img, Kp, db, B)
    vb = v.view(n_img, K, B, d // B)
    img_gram = torch.einsum("ikbe,ijbe->ikjb", vb, vb).contiguous()                         # (N_img, K, K, B)
    img_sq = vb.square().sum(3).contiguous()                                                 # (N_img, K, B)
    region = torch.empty(n_img, n_cap, K, B, dtype=cdtype, device=images.device)
    word = torch.empty(n_img, n_cap, L, B, dtype=cdtype, device=images.device)
    lens = cap_lens.tolist()
    order = sorted(range(n_cap), key=lens.__getitem__)
    order_t = torch.tensor(order, dtype=torch.long, device=images.device)
    per_word = d * (torch.finfo(cdtype).bits // 8)
    j0 = 0
    while j0 < n_cap:
        Lt = lens[order[j0]]
        j1 = j0 + 1
        while j1 < n_cap and (j1 - j0 + 1) * max(Lt, lens[order[j1]]) * per_word <= max_tile_bytes:
            Lt = max(Lt, lens[order[j1]])
            j1 += 1
        idx = order_t[j0:j1]
        e = captions[idx, :Lt].to(cdtype)
        valid = torch.arange(Lt, device=e.device)[None, :] < cap_lens[idx][:, None]
        e = torch.where(valid[..., None], e, 0.0)
        eb = e.view(j1 - j0, Lt, B, d // B)
        cap_gram = torch.einsum("ctbe,cube->ctub", eb, eb).contiguous()                      # (nc, Lt, Lt, B)
        torch.ops.itm_kernels.node_match_fused_(region, word, img_blk, _blocked(e, B, -(-Lt // 4) * 4), img_gram,
                                                img_sq, cap_gram, eb.square().sum(3).contiguous(),
                                                cap_lens[idx].contiguous(), idx, lambda_softmax)
        j0 = j1
    return region, word


def node_match_backward_torch(grad_region: Tensor, grad_word: Tensor, images: Tensor, captions: Tensor,
                              cap_lens: Tensor, *, lambda_softmax: float, num_blocks: int,
                              max_tile_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """Gradients of sum(grad_region * region) + sum(grad_word * word) w.r.t. (images, captions), by recomputing
    each tile under ``torch.func.vjp`` (in float32, float64 for float64 inputs): memory of one tile's forward
    graph. Padding words get zero gradient."""
    max_tile_bytes = max_tile_bytes or DEFAULT_TILE_BYTES // 2
    cdtype = _out_dtype(images.dtype)
    g_images = torch.zeros(images.shape, dtype=cdtype, device=images.device)
    g_captions = torch.zeros(captions.shape, dtype=cdtype, device=images.device)
    v_all = images.to(cdtype)
    grad_region, grad_word = grad_region.to(cdtype), grad_word.to(cdtype)
    for i0, i1, idx, Lt, e, valid in _tiles(images, captions, cap_lens, num_blocks, max_tile_bytes):
        def tile(v, e, valid=valid):
            return _tile(v, e, valid, lambda_softmax, num_blocks)

        _, vjp = torch.func.vjp(tile, v_all[i0:i1], e)
        gv, ge = vjp((grad_region[i0:i1, idx], grad_word[i0:i1, idx, :Lt]))
        g_images[i0:i1] += gv
        g_captions[idx, :Lt] += torch.where(valid[..., None], ge, 0.0)
    return g_images.to(images.dtype), g_captions.to(captions.dtype)


# --------------------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------------------

@torch.library.custom_op("itm_kernels::node_match", mutates_args=())
def node_match_op(images: Tensor, captions: Tensor, cap_lens: Tensor, lambda_softmax: float, num_blocks: int,
                  backend: str, max_tile_bytes: int) -> tuple[Tensor, Tensor]:
    """Registered forward: (N_img, K, d), (N_cap, L, d), (N_cap,) -> (N_img, N_cap, K, B), (N_img, N_cap, L, B)."""
    if backend == "cpu" and num_blocks == CPU_NUM_BLOCKS and images.shape[2] // num_blocks >= GRAM_MIN_BLOCK_WIDTH:
        return node_match_cpu(images, captions, cap_lens, lambda_softmax=lambda_softmax, num_blocks=num_blocks,
                              max_tile_bytes=max_tile_bytes or None)
    if backend == "cuda" and images.shape[1] <= CUDA_MAX_K and captions.shape[1] <= CUDA_MAX_L and \
            (images.dtype != torch.float64 or images.shape[1] * captions.shape[1] <= 64 * 64):
        return torch.ops.itm_kernels.node_match_cuda(images, captions, cap_lens, float(lambda_softmax),
                                                     int(num_blocks))
    if backend == "triton" and images.dtype != torch.float64:
        from .triton_node_match import node_match_triton

        return node_match_triton(images, captions, cap_lens, lambda_softmax=lambda_softmax, num_blocks=num_blocks)
    if backend == "reference":
        with torch.no_grad():
            region, word = node_match_reference(images, captions, cap_lens, lambda_softmax=lambda_softmax,
                                                num_blocks=num_blocks, compute_dtype=_out_dtype(images.dtype))
        return region.contiguous(), word.contiguous()
    return node_match_torch(images, captions, cap_lens, lambda_softmax=lambda_softmax, num_blocks=num_blocks,
                            max_tile_bytes=max_tile_bytes or None)


@node_match_op.register_fake
def _node_match_fake(images, captions, cap_lens, lambda_softmax, num_blocks, backend, max_tile_bytes):
    dtype = _out_dtype(images.dtype)
    n_img, K, _ = images.shape
    n_cap, L, _ = captions.shape
    return (images.new_empty((n_img, n_cap, K, num_blocks), dtype=dtype),
            images.new_empty((n_img, n_cap, L, num_blocks), dtype=dtype))


def _setup_context(ctx, inputs, output):
    images, captions, cap_lens, lambda_softmax, num_blocks, _, max_tile_bytes = inputs
    ctx.save_for_backward(images, captions, cap_lens)
    ctx.opts = (lambda_softmax, num_blocks, max_tile_bytes)


@torch.library.custom_op("itm_kernels::node_match_backward", mutates_args=())
def node_match_backward_op(grad_region: Tensor, grad_word: Tensor, images: Tensor, captions: Tensor,
                           cap_lens: Tensor, lambda_softmax: float, num_blocks: int,
                           max_tile_bytes: int) -> tuple[Tensor, Tensor]:
    """Registered backward: grads (N_img, N_cap, K, B), (N_img, N_cap, L, B) -> grads of (images, captions)."""
    return node_match_backward_torch(grad_region, grad_word, images, captions, cap_lens,
                                     lambda_softmax=lambda_softmax, num_blocks=num_blocks,
                                     max_tile_bytes=max_tile_bytes or None)


@node_match_backward_op.register_fake
def _node_match_backward_fake(grad_region, grad_word, images, captions, cap_lens, lambda_softmax, num_blocks,
                              max_tile_bytes):
    return torch.empty_like(images), torch.empty_like(captions)


def _backward(ctx, grad_region, grad_word):
    images, captions, cap_lens = ctx.saved_tensors
    g_images, g_captions = node_match_backward_op(grad_region.contiguous(), grad_word.contiguous(), images,
                                                  captions, cap_lens, *ctx.opts)
    needs = ctx.needs_input_grad
    return (g_images if needs[0] else None, g_captions if needs[1] else None, None, None, None, None, None)


node_match_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------

def node_match(images: Tensor, captions: Tensor, cap_lens, *, lambda_softmax: float = DEFAULT_LAMBDA_SOFTMAX,
               num_blocks: int = DEFAULT_NUM_BLOCKS, backend: str = "auto",
               max_tile_bytes: int | None = None) -> tuple[Tensor, Tensor]:
    """GSMN node-level matching vectors of every (image, caption) pair of a block, in both directions.

    Args:
        images: (N_img, K, d) region features (GSMN: l2-normalised, K = 36, d = 1024), float32, float64,
            bfloat16 or float16.
        captions: (N_cap, L_max, d) word features, same dtype and device, right-padded (padding never read).
        cap_lens: (N_cap,) integer lengths in 1..L_max (tensor, list or array).
        lambda_softmax: attention temperature of both directions (GSMN: 20 Flickr30K, 10 COCO).
        num_blocks: number of equal slices of d compared by cosine (GSMN ``num_block`` = 16); must divide d.
        backend: "auto" ("cpu" for CPU tensors when the extension is built, else "torch"), "cpu", "cuda",
            "triton", "torch" (tiled, bounded memory) or "reference" (the readable spec). The CUDA and Triton
            kernels have been compiled and run in emulation / the interpreter but never on a GPU, so "auto" does
            not pick them yet: name them to use them (problems beyond their limits run on "torch").
        max_tile_bytes: cap on one tile's (K x L x blocks) tensors (default 4 MiB).

    Returns:
        region_match: (N_img, N_cap, K, num_blocks), the block cosines of each region with its attended word
        context (regions query words: l2 over the regions, softmax over the words); word_match: (N_img, N_cap,
        L_max, num_blocks), each word with its attended region context (l2 over the words, softmax over the
        regions), zero for t >= cap_lens[c]. float64 for float64 inputs, float32 otherwise (low-precision inputs
        are computed in float32).

    Autograd: differentiable w.r.t. images and captions; the backward recomputes one tile at a time and saves only
    the inputs.

    Memory: the outputs (N_img N_cap (K + L_max) num_blocks values: call it on blocks of pairs), plus for "cpu"
    a float32 block-interleaved copy of the images with their per-block Gram matrices (N_img K (d + 16 K) values)
    and one caption range of at most ``max_tile_bytes`` (default 8 MiB) of words with theirs, and per thread a
    (K x L x 16) scratch; for "torch", one tile of at most about 6 x ``max_tile_bytes``. No (pairs x K x d) context
    is ever formed ("reference" excepted).
    """
    check_feature_pair(images, captions)
    cap_lens = check_lengths("cap_lens", cap_lens, captions.shape[0], captions.shape[1], images.device)
    lambda_softmax = check_lambda("lambda_softmax", lambda_softmax)
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1 \
            or images.shape[2] % num_blocks:
        raise ValueError(f"num_blocks must be a positive int that divides d={images.shape[2]}, got {num_blocks!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got "
                         f"{backend!r}")
    if max_tile_bytes is not None and (isinstance(max_tile_bytes, bool) or not isinstance(max_tile_bytes, int)
                                       or max_tile_bytes <= 0):
        raise ValueError(f"max_tile_bytes must be a positive int, got {max_tile_bytes!r}")
    if backend == "cpu" and (images.device.type != "cpu" or not _have_cpu_kernel()):
        raise ValueError("backend 'cpu' needs CPU tensors and the compiled extension (itm_kernels._C)")
    if backend == "cuda" and (images.device.type != "cuda" or not _have_cuda_kernel()):
        raise ValueError("backend 'cuda' needs CUDA tensors and the extension built with CUDA "
                         "(torch.ops.itm_kernels.node_match_cuda)")
    if backend == "triton":
        from .backends import available_backends

        if "triton" not in available_backends(images.device):
            raise ValueError(f"backend 'triton' is not available for {images.device.type} tensors here: it needs "
                             "triton and a CUDA device, or TRITON_INTERPRET=1 (set before triton is first "
                             "imported) for CPU tensors")
    name = backend
    if backend == "auto":
        name = "cpu" if images.device.type == "cpu" and _have_cpu_kernel() else "torch"
    return node_match_op(images.contiguous(), captions.contiguous(), cap_lens, lambda_softmax, num_blocks, name,
                         max_tile_bytes or 0)
