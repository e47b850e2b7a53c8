"""The "torch" backend of ``node_match``: the Gram-form algebra as torch ops on whole tiles, and the tiled backward
every forward backend shares (the algorithm is described in ``itm_kernels.node_match``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common.constants import EPS, LEAKY_SLOPE
from .._common.constants import GRAM_CANCEL_RATIO
from .._common.dtypes import out_dtype as _out_dtype
from .._common.gram_guard import exact_attended
from .reference import node_match_reference

# K x L x 16 tensors of one tile; ~6 of them live at once. 4 MiB each keeps the tile's work in the L2/L3 caches
# while the block GEMMs keep >= a few hundred rows.
DEFAULT_TILE_BYTES = 4 << 20
# |sum_t a_t e_t,b|^2 = a^T G^b a cancels badly when the context is much shorter than its words and a block has
# very few features (measured: float32 cosines of 250 at 1 feature per block, 5e-4 excess error at 2). Below this
# width a tile forms its contexts explicitly (d-sized per pair, which is small exactly then).
GRAM_MIN_BLOCK_WIDTH = 16


def _sqrt0(x: Tensor) -> Tensor:
    """sqrt(max(x, 0)) with gradient 0 (not NaN) at 0: an all-zero word or region vector has finite gradients."""
    pos = x > 0
    return torch.where(pos, torch.where(pos, x, 1.0).sqrt(), 0.0)


def _block_cosine(dot: Tensor, sq_x: Tensor, sq_y: Tensor) -> Tensor:
    """Official ``cosine_similarity``: x.y / max(|x| |y|, eps), given x.y, |x|^2 and |y|^2."""
    return dot / (_sqrt0(sq_x) * _sqrt0(sq_y)).clamp_min(EPS)


def _guard(num: Tensor, ctx_sq: Tensor, ctx_norm: Tensor, weights, context, query, ok: Tensor):
    """The Gram guard of one direction, in the output layout (ni, nc, Q, B): where ctx_sq = |sum_c w_c x_c,b|^2
    cancels against (sum_c w_c |x_c,b|)^2 (``ctx_norm`` holds that sum), q.x and |x|^2 are recomputed exactly.
    ``weights(i, c, q)`` gives the (n, C) attention rows, ``context(b, i, c)`` the (n, C, db) block contexts and
    ``query(b, i, c, q)`` the (n, db) query blocks; ``ok`` masks the valid queries."""
    with torch.no_grad():
        bad = (ctx_sq < GRAM_CANCEL_RATIO * ctx_norm * ctx_norm) & ok
        if not bool(bad.any()):
            return num, ctx_sq
        i, c, q, b = bad.nonzero(as_tuple=True)
    w = weights(i, c, q)
    db = query(b[:1], i[:1], c[:1], q[:1]).shape[-1]
    dot, sq = exact_attended(w, lambda j0, j1: context(b[j0:j1], i[j0:j1], c[j0:j1]), db, query(b, i, c, q))
    return num.index_put((i, c, q, b), dot.to(num.dtype)), ctx_sq.index_put((i, c, q, b), sq.to(ctx_sq.dtype))


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
    n_v = h / (_sqrt0(h.square().sum(1, keepdim=True)) + EPS)
    alpha = torch.softmax(torch.where(word_ok, lambda_softmax * n_v, float("-inf")), dim=3)
    num_v = (sb * alpha).sum(4)                                                    # (B, ni, K, nc)
    gram_e = torch.einsum("bcte,bcue->cbtu", eb.view(B, nc, Lt, db), eb.view(B, nc, Lt, db))   # (nc, B, Lt, Lt)
    a_c = alpha.permute(2, 0, 1, 3).reshape(nc, 1, ni * K, Lt)
    ctx_sq_v = (torch.matmul(a_c, gram_e) * a_c).sum(3)                            # (nc, B, ni K)
    v_sq = vb.square().sum(2).view(B, ni, K)
    e_sq = eb.square().sum(2).view(B, nc, Lt)
    vb4, eb4 = vb.view(B, ni, K, db), eb.view(B, nc, Lt, db)
    num_v, ctx_sq_v = num_v.permute(1, 3, 2, 0), ctx_sq_v.view(nc, B, ni, K).permute(2, 0, 3, 1)   # (ni, nc, K, B)
    with torch.no_grad():
        norm_v = torch.einsum("ikct,bct->ickb", alpha, _sqrt0(e_sq))
    num_v, ctx_sq_v = _guard(num_v, ctx_sq_v, norm_v, lambda i, c, k: alpha[i, k, c],
                             lambda b, i, c: eb4[b, c], lambda b, i, c, k: vb4[b, i, k],
                             torch.ones((), dtype=torch.bool, device=v.device))
    region = _block_cosine(num_v, v_sq.permute(1, 2, 0)[:, None], ctx_sq_v)     # (ni, nc, K, B)
    # words query the regions
    n_t = h / (_sqrt0(h.square().sum(3, keepdim=True)) + EPS)
    beta = torch.softmax(lambda_softmax * n_t, dim=1)                              # (ni, K, nc, Lt)
    num_t = (sb * beta).sum(2)                                                     # (B, ni, nc, Lt)
    gram_v = torch.einsum("bike,bije->ibkj", vb.view(B, ni, K, db), vb.view(B, ni, K, db))     # (ni, B, K, K)
    b_i = beta.reshape(ni, K, nc * Lt).transpose(1, 2)[:, None]                    # (ni, 1, nc Lt, K)
    ctx_sq_t = (torch.matmul(b_i, gram_v) * b_i).sum(3)                            # (ni, B, nc Lt)
    num_t, ctx_sq_t = num_t.permute(1, 2, 3, 0), ctx_sq_t.view(ni, B, nc, Lt).permute(0, 2, 3, 1)  # (ni, nc, Lt, B)
    with torch.no_grad():
        norm_t = torch.einsum("ikct,bik->ictb", beta, _sqrt0(v_sq))
    num_t, ctx_sq_t = _guard(num_t, ctx_sq_t, norm_t, lambda i, c, t: beta[i, :, c, t],
                             lambda b, i, c: vb4[b, i], lambda b, i, c, t: eb4[b, c, t], valid[None, :, :, None])
    word = _block_cosine(num_t, e_sq.permute(1, 2, 0)[None], ctx_sq_t)          # (ni, nc, Lt, B)
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
