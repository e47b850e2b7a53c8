"""The official-style GSMN evaluation loop, the baseline of ``benchmarks/bench_gsmn.py``: per caption, both graphs,
with the released code's data movement (the caption repeated over all images, attended contexts materialised,
the (images x K x K x 16) neighbourhood tensor and its kernel weights rebuilt per caption, eight separate Linear
calls). Released semantics only (``propagate=False``). Not for production use: it is what we replace.
"""
from __future__ import annotations

import torch
from torch import Tensor

from itm_kernels._common.constants import EPS

from ..gsmn.geometry import (check_parses, gaussian_kernel_weights, normalize_boxes, pseudo_coordinates,
                             sparse_adjacency)
from ..gsmn.head import GSMNSimilarity

__all__ = ["official_style_sims"]



def _inter_relation(context: Tensor, query: Tensor, lam: float) -> Tensor:
    """(n, Lc, d), (n, Lq, d) -> (n, Lq, Lc): clipped-l2norm attention of each query over the context."""
    attn = torch.nn.functional.leaky_relu(torch.bmm(context, query.transpose(1, 2)), 0.1)     # (n, Lc, Lq)
    attn = attn / (attn.pow(2).sum(2, keepdim=True).sqrt() + EPS)
    return torch.softmax(attn.transpose(1, 2) * lam, dim=2)


def _block_cosine(query: Tensor, context: Tensor, n_block: int) -> Tensor:
    q = torch.stack(torch.split(query, n_block, dim=2), dim=2)
    c = torch.stack(torch.split(context, n_block, dim=2), dim=2)
    return (q * c).sum(-1) / (q.norm(dim=-1) * c.norm(dim=-1)).clamp(min=EPS)


def _convolve(convs, weights: Tensor, neighbourhood: Tensor) -> Tensor:
    """weights (n, N, n_k), neighbourhood (n, N, f) -> (n, n_k * o) with one Linear per kernel."""
    agg = torch.bmm(weights.transpose(1, 2), neighbourhood)
    return torch.cat([convs[k](agg[:, k]) for k in range(len(convs))], dim=1)


def _mlp(head, h: Tensor) -> Tensor:
    return head.out_2(torch.tanh(head.out_1(h)))


@torch.no_grad()
def official_style_sims(head: GSMNSimilarity, img_emb: Tensor, cap_emb: Tensor, cap_lens, boxes: Tensor,
                        image_sizes=None, parses=None) -> Tensor:
    """(N_img, N_cap) GSMN scores computed the released way, one caption at a time (float32 like ``shard_xattn``).

    ``boxes`` as in :meth:`GSMNSimilarity.sims`. Memory per caption: N_img x K x (K x 16 + d) floats.
    """
    if head.propagate:
        raise ValueError("official_style_sims reproduces the released code: build the head with propagate=False")
    img = img_emb.float()
    cap = cap_emb.float()
    lens = [int(n) for n in torch.as_tensor(cap_lens).tolist()]
    if image_sizes is not None:
        boxes = normalize_boxes(torch.as_tensor(boxes), image_sizes)
    boxes = torch.as_tensor(boxes).float()
    if head.variant == "sparse":
        parses = check_parses(parses, lens)
    n_img, K, d = img.shape
    n_block = d // head.num_block
    vis_conv = head.i2t_match_G.graph_convolution_1
    txt_conv = head.t2i_match_G.graph_convolution_3
    rho, theta = pseudo_coordinates(boxes)                                                   # once per shard
    out = torch.empty(n_img, len(lens))
    for c, n in enumerate(lens):
        words = cap[c:c + 1, :n]
        expand = words.repeat(n_img, 1, 1)
        # visual graph: regions query the words
        attn = _inter_relation(expand, img, head.lambda_softmax)                            # (n_img, K, n)
        m_v = _block_cosine(img, torch.bmm(attn, expand), n_block)                           # (n_img, K, 16)
        neighbours = m_v.unsqueeze(2).repeat(1, 1, K, 1).view(n_img * K, K, -1)
        kw = gaussian_kernel_weights(rho, theta, vis_conv.mean_rho, vis_conv.mean_theta, vis_conv.precision_rho,
                                     vis_conv.precision_theta).view(n_img * K, K, -1)
        h_v = _convolve(vis_conv.conv_weights, kw, neighbours)
        vis = _mlp(head.i2t_match_G, h_v).view(n_img, K).mean(1)
        # textual graph: words query the regions
        affinity = torch.softmax(head.lambda_softmax * torch.bmm(words, words.transpose(1, 2)), dim=2)  # (1, n, n)
        attn = _inter_relation(img, expand, head.lambda_softmax)                            # (n_img, n, K)
        m_t = _block_cosine(expand, torch.bmm(attn, img), n_block).unsqueeze(2)            # (n_img, n, 1, 16)
        if head.variant == "dense":
            neighbours = m_t.repeat(1, 1, n, 1)
            weights = affinity[..., None].repeat(n_img, 1, 1, 1)
        else:
            adj = torch.from_numpy(sparse_adjacency(parses[c], n)).view(1, n, n, 1)
            neighbours = adj * m_t
            masked = adj * affinity[..., None]
            weights = (masked / (masked.pow(2).sum(2, keepdim=True).sqrt() + EPS)).repeat(n_img, 1, 1, 1)
        kw = (weights.reshape(-1, 1) * txt_conv.params.view(1, -1)).view(n_img * n, n, -1)
        kw = kw / kw.sum(dim=1, keepdim=True)
        h_t = _convolve(txt_conv.conv_weights, kw, neighbours.reshape(n_img * n, n, -1))
        txt = _mlp(head.t2i_match_G, h_t).view(n_img, n).mean(1)
        out[:, c] = vis + txt
    return out
