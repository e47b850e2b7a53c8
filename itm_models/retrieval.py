"""Two-stage retrieval: a cheap shortlist over the whole gallery, then the cross-attention head on the shortlist.

    vals, idx = two_stage(model, img_emb, cap_emb, cap_lens, shortlist=100, k=10, method="pooled")

Stage 1 (never the full matrix: the cheap scores are streamed through a running top-``shortlist``):
- ``method="pooled"``: cosine of the mean-pooled regions and mean-pooled valid words (the model's own embeddings);
- ``method="hard"``: hard-assignment late interaction, ``itm_kernels.xattn_topk(..., attention="hard",
  agg="mean")``: each word's best region, mean over words (ColBERT MaxSim / CHAN).
Stage 2: ``model.sims`` on each query's shortlist; the top ``k`` of those scores. Ties: higher index first.

Cost: stage 1 is one GEMM of (N_q x d) by (d x N_g) (pooled) or a K x L-times cheaper-than-attention pass
(hard); stage 2 is ``N_q x shortlist`` head evaluations instead of ``N_q x N_g``.
"""
from __future__ import annotations

import torch

from itm_kernels._common.validation import check_size
from itm_kernels.xattn_topk import check_k
from itm_kernels.xattn_topk.merge import empty_topk, merge_candidates, merge_tile

__all__ = ["two_stage", "shortlist_pooled", "shortlist_hard", "METHODS"]

METHODS = ("pooled", "hard")


def _pool(x: torch.Tensor, lens: torch.Tensor | None) -> torch.Tensor:
    if lens is None:
        p = x.float().mean(1)
    else:
        valid = torch.arange(x.shape[1], device=x.device)[None] < lens.to(x.device)[:, None]
        p = torch.where(valid[..., None], x.float(), 0.0).sum(1) / lens.to(x.device)[:, None].float()
    return torch.nn.functional.normalize(p, dim=-1, eps=1e-8)


@torch.no_grad()
def shortlist_pooled(img_emb, cap_emb, cap_lens, n: int, *, queries: str = "captions", chunk: int = 4096):
    """Top-``n`` gallery items per query by cosine of mean-pooled embeddings: (N_q, n) values and indices."""
    chunk = check_size("chunk", chunk)
    pi, pc = _pool(img_emb, None), _pool(cap_emb, torch.as_tensor(cap_lens))
    q, g = (pc, pi) if queries == "captions" else (pi, pc)
    n = check_k(n, g.shape[0], "n")
    best_v, best_i = empty_topk(q.shape[0], torch.float32, q.device)
    for g0 in range(0, g.shape[0], chunk):
        best_v, best_i = merge_tile(best_v, best_i, q @ g[g0:g0 + chunk].t(), g0, n)
    return best_v, best_i


@torch.no_grad()
def shortlist_hard(img_emb, cap_emb, cap_lens, n: int, *, queries: str = "captions", backend: str = "auto"):
    """Top-``n`` by hard-assignment late interaction (``xattn_sim(attention="hard", agg="mean")``)."""
    from itm_kernels import xattn_topk
    return xattn_topk(img_emb, cap_emb, cap_lens, n, queries=queries, attention="hard", agg="mean",
                      backend=backend)


@torch.no_grad()
def two_stage(model, img_emb, cap_emb, cap_lens, *, shortlist: int = 100, k: int = 10, method: str = "pooled",
              queries: str = "captions", **sims_kwargs):
    """Top-``k`` per query re-ranked by ``model.sims`` within a cheap shortlist.

    Args:
        model: anything with ``sims(img_emb (B_i, K, d), cap_emb (B_c, L, d), cap_lens (B_c,)) -> (B_i, B_c)``
            (SCAN / SGRAF heads; extra ``sims_kwargs`` are passed on).
        img_emb: (N_img, K, d); cap_emb: (N_cap, L, d); cap_lens: (N_cap,) (encoded embeddings).
        shortlist: candidates per query kept by stage 1, 1..gallery size; ``k``: results, 1..shortlist.
        method: "pooled" or "hard" (module docstring). queries: "captions" (t2i: images per caption) or "images".

    Returns:
        (values (N_q, k), indices (N_q, k) int64 gallery indices): the head's scores, descending.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if queries not in ("images", "captions"):
        raise ValueError(f"queries must be one of ('images', 'captions'), got {queries!r}")
    lens = torch.as_tensor(cap_lens)
    n_g = img_emb.shape[0] if queries == "captions" else cap_emb.shape[0]
    shortlist = check_k(shortlist, n_g, "shortlist")
    k = check_k(k, shortlist, "k")
    if method == "pooled":
        _, cand = shortlist_pooled(img_emb, cap_emb, lens, shortlist, queries=queries)
    else:
        _, cand = shortlist_hard(img_emb, cap_emb, lens, shortlist, queries=queries)
    vals = torch.empty(cand.shape, dtype=torch.float32)
    for q in range(cand.shape[0]):
        s = cand[q]
        if queries == "captions":
            vals[q] = model.sims(img_emb[s], cap_emb[q:q + 1], lens[q:q + 1], **sims_kwargs)[:, 0].float().cpu()
        else:
            vals[q] = model.sims(img_emb[q:q + 1], cap_emb[s], lens[s], **sims_kwargs)[0].float().cpu()
    return merge_candidates(vals, cand.cpu(), k)
