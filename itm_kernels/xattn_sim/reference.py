"""The specification: SCAN cross-attention similarity in plain PyTorch.

Every backend of :func:`itm_kernels.xattn_sim` is tested against :func:`xattn_sim` here. It is written
for readability, materialises the (N_img, N_cap, K, L) score tensor and is meant for small inputs only.
(The restated official evaluation loop, the benchmark baseline, is ``itm_models.baselines.scan.official_style_sims``.)

The semantics are those of the official SCAN code (kuanghuei/SCAN ``func_attention``, ``xattn_score_t2i``,
``xattn_score_i2t``); see ``shared/reference/SEMANTICS.md``:

- attend(query Q, context C): scores s = C Q^T (context x query); ``norm`` along the QUERY axis separately for
  each context element; alpha = softmax over the CONTEXT axis of ``lambda_softmax * s_normed``; attended
  a_q = sum_c alpha_qc C_c; R_q = cosine(Q_q, a_q) = Q_q.a_q / max(|Q_q| |a_q|, 1e-8).
- t2i: query = the caption's words, context = the image's regions; i2t: query = regions, context = words.
- aggregation over the query items: lse (1/lambda_lse) log sum exp(lambda_lse R), mean, max or sum.
"""
from __future__ import annotations

import torch

from .._common.constants import AGGS, DIRECTIONS, EPS, LEAKY_SLOPE, NORMS  # noqa: F401
from .._common.dtypes import out_dtype


def _lengths_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def normalize_scores(s: torch.Tensor, valid: torch.Tensor, norm: str, dim: int) -> torch.Tensor:
    """Apply SCAN's ``raw_feature_norm`` to ``s`` along ``dim`` (the query axis), over ``valid`` entries only.

    ``s`` and ``valid`` broadcast against each other; invalid entries of the result are 0.
    """
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if norm in ("clipped_l2norm", "clipped_l1norm", "clipped"):
        s = torch.nn.functional.leaky_relu(s, LEAKY_SLOPE)
    s = torch.where(valid, s, zero)
    if norm == "softmax":
        s = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=dim)
        return torch.where(valid, s, zero)
    if norm in ("l2norm", "clipped_l2norm"):
        sq = s.pow(2).sum(dim=dim, keepdim=True)
        # sqrt via where: the same value, but a row of zeros (a padded context item) gets gradient 0, not NaN.
        return s / (torch.where(sq > 0, sq, torch.ones_like(sq)).sqrt() * (sq > 0) + EPS)
    if norm in ("l1norm", "clipped_l1norm"):
        return s / (s.abs().sum(dim=dim, keepdim=True) + EPS)
    if norm in ("clipped", "no_norm"):
        return s
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")


def aggregate(r: torch.Tensor, valid: torch.Tensor, agg: str, lambda_lse: float) -> torch.Tensor:
    """Reduce the per-query cosines ``r`` over their last axis, counting ``valid`` entries only."""
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    if agg == "lse":
        return torch.logsumexp((lambda_lse * r).masked_fill(~valid, float("-inf")), dim=-1) / lambda_lse
    if agg == "mean":
        return torch.where(valid, r, zero).sum(-1) / valid.sum(-1).to(r.dtype)
    if agg == "max":
        return r.masked_fill(~valid, float("-inf")).amax(-1)
    if agg == "sum":
        return torch.where(valid, r, zero).sum(-1)
    raise ValueError(f"agg must be one of {AGGS}, got {agg!r}")


def attend_all_pairs(query, query_lens, context, context_lens, *, norm, lambda_softmax):
    """Cosines R between each query item and its attended context, for every (query set, context set) pair.

    Args:
        query: (N_q, Lq, d), padded; ``query_lens`` (N_q,) valid lengths.
        context: (N_c, Lc, d), padded; ``context_lens`` (N_c,) valid lengths.
    Returns:
        R (N_c, N_q, Lq) in the input dtype, and the (N_q, Lq) validity mask of the query items.
        Invalid query positions hold arbitrary finite values.
    """
    q_valid = _lengths_mask(query_lens, query.shape[1])            # (N_q, Lq)
    c_valid = _lengths_mask(context_lens, context.shape[1])        # (N_c, Lc)
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    query = torch.where(q_valid[..., None], query, zero)
    context = torch.where(c_valid[..., None], context, zero)
    s = torch.einsum("ckd,qtd->cqkt", context, query)              # (N_c, N_q, Lc, Lq)
    pair_valid_q = q_valid[None, :, None, :]
    s_normed = normalize_scores(s, pair_valid_q, norm, dim=3)
    logits = (lambda_softmax * s_normed).masked_fill(~c_valid[:, None, :, None], float("-inf"))
    alpha = torch.softmax(logits, dim=2)                            # over the context axis
    attended = torch.einsum("cqkt,ckd->cqtd", alpha, context)      # (N_c, N_q, Lq, d)
    dots = (attended * query[None]).sum(-1)
    norms = attended.norm(dim=-1) * query.norm(dim=-1)[None]
    r = dots / norms.clamp_min(EPS)
    return r, q_valid


def hard_all_pairs(query, query_lens, context, context_lens):
    """Hard attention (ColBERT MaxSim / CHAN): R_q = max over valid context items c of cosine(Q_q, C_c).

    cosine(x, y) = x.y / max(|x| |y|, 1e-8), the same eps as the soft path. Shapes as :func:`attend_all_pairs`.
    """
    q_valid = _lengths_mask(query_lens, query.shape[1])
    c_valid = _lengths_mask(context_lens, context.shape[1])
    zero = torch.zeros((), dtype=query.dtype, device=query.device)
    query = torch.where(q_valid[..., None], query, zero)
    context = torch.where(c_valid[..., None], context, zero)
    s = torch.einsum("ckd,qtd->cqkt", context, query)              # (N_c, N_q, Lc, Lq)
    norms = context.norm(dim=-1)[:, None, :, None] * query.norm(dim=-1)[None, :, None, :]
    cos = (s / norms.clamp_min(EPS)).masked_fill(~c_valid[:, None, :, None], float("-inf"))
    return cos.amax(dim=2), q_valid


def xattn_sim(images, captions, cap_lens, *, img_lens=None, direction="t2i", norm="clipped_l2norm",
              lambda_softmax=9.0, agg="lse", lambda_lse=6.0, compute_dtype=None, attention="soft"):
    """Reference all-pairs SCAN similarity.

    Args:
        images: (N_img, K, d) region features. ``img_lens`` (N_img,) optional valid region counts.
        captions: (N_cap, L_max, d) word features, padded; ``cap_lens`` (N_cap,) lengths 1..L_max.
        compute_dtype: dtype of the arithmetic; default the input dtype (so a bfloat16 input is computed in
            bfloat16: tests use this to measure the error PyTorch itself makes in low precision).
        attention: "soft" (SCAN) or "hard" (:func:`hard_all_pairs`: each query item's best context item;
            ``norm`` and ``lambda_softmax`` unused).
    Returns:
        (N_img, N_cap): float64 for float64 inputs, float32 otherwise.
    Memory: O(N_img * N_cap * max(K, L) * d); for tests only.
    """
    result_dtype = out_dtype(images.dtype)
    compute_dtype = compute_dtype or images.dtype
    images = images.to(compute_dtype)
    captions = captions.to(compute_dtype)
    cap_lens = torch.as_tensor(cap_lens, device=images.device).long()
    if img_lens is None:
        img_lens = torch.full((images.shape[0],), images.shape[1], dtype=torch.long, device=images.device)
    img_lens = torch.as_tensor(img_lens, device=images.device).long()
    if attention == "hard":
        attend_all_pairs_ = lambda q, ql, c, cl, **_: hard_all_pairs(q, ql, c, cl)  # noqa: E731
    else:
        attend_all_pairs_ = attend_all_pairs
    if direction == "t2i":
        r, valid = attend_all_pairs_(captions, cap_lens, images, img_lens, norm=norm, lambda_softmax=lambda_softmax)
        sims = aggregate(r, valid[None], agg, lambda_lse)              # (N_img, N_cap)
    elif direction == "i2t":
        r, valid = attend_all_pairs_(images, img_lens, captions, cap_lens, norm=norm, lambda_softmax=lambda_softmax)
        sims = aggregate(r, valid[None], agg, lambda_lse).t()          # (N_cap, N_img) -> (N_img, N_cap)
    else:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    return sims.to(result_dtype)
