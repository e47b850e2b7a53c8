"""SGRAF's layers (official names, official initialisation): the global vectors ``VisualSA`` / ``TextSA`` and the
parameter holders of graph reasoning (``GraphReasoning``, one SGR step) and attention filtration
(``AttentionFiltration``, SAF). The computation of SGR and SAF lives in :class:`itm_models.sgraf.head.SGRAFSimilarity`.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from itm_kernels._common.constants import EPS

from ..encoders import l2norm

__all__ = ["VisualSA", "TextSA", "GraphReasoning", "AttentionFiltration", "EPS", "DROPOUT", "NUM_REGIONS"]

DROPOUT = 0.4
NUM_REGIONS = 36


def _xavier_(linear: nn.Linear) -> None:
    """The official initialisation of every SGRAF Linear: U(-r, r), r = sqrt(6 / (in + out)), zero bias."""
    r = math.sqrt(6.0) / math.sqrt(linear.in_features + linear.out_features)
    linear.weight.data.uniform_(-r, r)
    linear.bias.data.fill_(0)


def _init_children(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Linear):
            _xavier_(m)
        elif isinstance(m, nn.BatchNorm1d):
            m.weight.data.fill_(1)
            m.bias.data.zero_()


def _lengths_mask(lengths: Tensor, size: int) -> Tensor:
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


class VisualSA(nn.Module):
    """Global image vector by self-attention over the regions: (n, K, d) -> (n, d). K must equal ``num_region``."""

    def __init__(self, embed_dim: int, dropout_rate: float = DROPOUT, num_region: int = NUM_REGIONS):
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(num_region),
                                             nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.BatchNorm1d(embed_dim),
                                              nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        _init_children(self)

    def forward(self, local: Tensor) -> Tensor:
        l_emb = self.embedding_local(local)                                   # (n, K, d)
        g_emb = self.embedding_global(local.mean(1))                          # (n, d)
        weights = torch.softmax(self.embedding_common(l_emb * g_emb[:, None]).squeeze(2), dim=1)
        return l2norm((weights[:, :, None] * local).sum(1))


class TextSA(nn.Module):
    """Global caption vector by self-attention over the caption's words: (n, L, d), lengths (n,) -> (n, d)."""

    def __init__(self, embed_dim: int, dropout_rate: float = DROPOUT):
        super().__init__()
        self.embedding_local = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_global = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.Tanh(), nn.Dropout(dropout_rate))
        self.embedding_common = nn.Sequential(nn.Linear(embed_dim, 1))
        _init_children(self)

    def forward(self, local: Tensor, lengths: Tensor) -> Tensor:
        valid = _lengths_mask(lengths, local.shape[1])                        # (n, L)
        words = local[valid]                                                  # (W, d): real words only
        rows = torch.repeat_interleave(torch.arange(local.shape[0], device=local.device), lengths)
        mean = torch.zeros(local.shape[0], local.shape[2], dtype=local.dtype, device=local.device)
        mean = mean.index_add(0, rows, words) / lengths[:, None].to(local.dtype)
        l_emb = self.embedding_local(words)                                   # (W, d)
        g_emb = self.embedding_global(mean)                                   # (n, d)
        logits = self.embedding_common(l_emb * g_emb[rows]).squeeze(1)       # (W,)
        padded = torch.full(valid.shape, float("-inf"), dtype=logits.dtype, device=logits.device)
        weights = torch.softmax(padded.masked_scatter(valid, logits), dim=1)[valid]
        glo = torch.zeros_like(mean).index_add(0, rows, weights[:, None] * words)
        return l2norm(glo)


class GraphReasoning(nn.Module):
    """Parameters of one SGR step (official names); the computation lives in :class:`SGRAFSimilarity`."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.graph_query_w = nn.Linear(sim_dim, sim_dim)
        self.graph_key_w = nn.Linear(sim_dim, sim_dim)
        self.sim_graph_w = nn.Linear(sim_dim, sim_dim)
        _init_children(self)


class AttentionFiltration(nn.Module):
    """Parameters of SAF (official names): the gate Linear(s -> 1) and its BatchNorm1d(1)."""

    def __init__(self, sim_dim: int):
        super().__init__()
        self.attn_sim_w = nn.Linear(sim_dim, 1)
        self.bn = nn.BatchNorm1d(1)
        _init_children(self)
