"""The official SGRAF evaluation loop, restated (benchmark baseline and test oracle): the official
``EncoderSimilarity.forward`` step by step (:func:`official_style_forward`) and its ``shard_attn_scores``
(:func:`official_style_sims`), on the modules of an :class:`itm_models.sgraf.head.SGRAFSimilarity`. Not for
production use: it is what the fused head replaces.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..encoders import l2norm
from ..sgraf.head import LAMBDA_SOFTMAX, SGRAFSimilarity
from ..sgraf.layers import EPS

__all__ = ["official_style_forward", "official_style_sims"]


def official_style_forward(head: SGRAFSimilarity, img_emb: Tensor, cap_emb: Tensor, cap_lens) -> Tensor:
    """The official ``EncoderSimilarity.forward`` restated step by step on ``head``'s modules: the image globals of
    the shard, then a Python loop over captions; each caption is repeated once per image, its attended vectors
    (n_img, L, d) are materialised, then W_loc, the global branch, the SGR steps with separate query/key layers on
    all nodes, or SAF with its BatchNorm called once per caption. Honours ``head.training`` as the official code
    does (dropout, batch statistics, running-statistics updates). Returns (n_img, n_cap).
    """
    n_img = img_emb.shape[0]
    lens = [int(x) for x in cap_lens]
    img_glo = head.v_global_w(img_emb)
    columns = []
    for c, n_word in enumerate(lens):
        cap_i = cap_emb[c:c + 1, :n_word]
        cap_rep = cap_i.repeat(n_img, 1, 1)
        cap_glo = head.t_global_w(cap_i, torch.tensor([n_word], device=cap_emb.device))
        attn = torch.bmm(img_emb, cap_rep.transpose(1, 2))                          # (n_img, K, L)
        attn = l2norm(torch.nn.functional.leaky_relu(attn, 0.1), dim=2)
        attn = torch.softmax(attn.transpose(1, 2) * LAMBDA_SOFTMAX, dim=2)         # (n_img, L, K)
        context = l2norm(torch.bmm(attn, img_emb), dim=-1)
        sim_loc = l2norm(head.sim_tranloc_w((context - cap_rep).pow(2)), dim=-1)
        sim_glo = l2norm(head.sim_tranglo_w((img_glo - cap_glo).pow(2)), dim=-1)
        x = torch.cat([sim_glo[:, None], sim_loc], 1)                              # (n_img, L + 1, s)
        if head.module_name == "SGR":
            for step in head.SGR_module:
                q, k = step.graph_query_w(x), step.graph_key_w(x)
                edge = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)
                x = torch.relu(step.sim_graph_w(torch.bmm(edge, x)))
            vec = x[:, 0]
        else:
            saf = head.SAF_module
            gate = torch.sigmoid(saf.bn(saf.attn_sim_w(x).permute(0, 2, 1)))      # (n_img, 1, L + 1)
            gate = gate / (gate.abs().sum(dim=-1, keepdim=True) + EPS)
            vec = l2norm(torch.matmul(gate, x).squeeze(1), dim=-1)
        columns.append(torch.sigmoid(head.sim_eval_w(vec)))
    return torch.cat(columns, 1)


@torch.no_grad()
def official_style_sims(head: SGRAFSimilarity, img_emb: Tensor, cap_emb: Tensor, cap_lens, *, shard_size: int = 100,
                        max_captions: int | None = None) -> Tensor:
    """The official ``shard_attn_scores``: shards of ``shard_size`` images x ``shard_size`` captions, each scored by
    :func:`official_style_forward` (so the image globals are recomputed per caption shard and the caption globals
    per image shard). ``max_captions`` scores only the first captions (benchmarks extrapolate from a subset).
    Returns (N_img, n_scored_captions) in the inputs' dtype. Eval mode is the caller's business, as officially."""
    n_img = img_emb.shape[0]
    n_cap = cap_emb.shape[0] if max_captions is None else min(cap_emb.shape[0], max_captions)
    lens = [int(x) for x in cap_lens]
    out = torch.zeros(n_img, n_cap, dtype=img_emb.dtype)
    for i0 in range(0, n_img, shard_size):
        for c0 in range(0, n_cap, shard_size):
            c1 = min(n_cap, c0 + shard_size)
            out[i0:i0 + shard_size, c0:c1] = official_style_forward(head, img_emb[i0:i0 + shard_size],
                                                                    cap_emb[c0:c1], lens[c0:c1])
    return out
