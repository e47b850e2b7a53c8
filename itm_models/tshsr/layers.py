"""TSHSR's own layers (our design; see :mod:`itm_models.tshsr`): the intermediate levels (:class:`PhrasePooling`,
:class:`RegionGroups`) and one stream's parameters (:class:`StreamReasoning`). The global vectors
(``VisualSA`` / ``TextSA``) and the SGR step's parameters (``GraphReasoning``) are SGRAF's, imported from
:mod:`itm_models.sgraf.layers`, not copied."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..encoders import l2norm
from ..sgraf.layers import GraphReasoning, _xavier_

__all__ = ["PhrasePooling", "RegionGroups", "StreamReasoning", "phrase_count"]


def phrase_stride(window: int) -> int:
    """Stride between consecutive phrase windows: ``max(1, window - 1)`` (neighbouring phrases share a word)."""
    return max(1, window - 1)


def phrase_count(lengths: Tensor, window: int) -> Tensor:
    """Phrases of captions of ``lengths`` words: 1 when length <= window, else ceil((length - window) / stride) + 1
    (the last window may hold fewer words). (N,) int64 -> (N,) int64."""
    stride = phrase_stride(window)
    extra = torch.clamp(lengths - window, min=0)
    return (extra + stride - 1) // stride + 1


class PhrasePooling(nn.Module):
    """Phrases: learned attention pooling over short windows of consecutive words (our design).

    Phrase p of a caption covers words ``p * stride .. p * stride + window - 1`` (those below the caption's length;
    stride :func:`phrase_stride`); its vector is l2norm(sum_j a_j e_j) with a = softmax over the window's words of
    the learned score ``score(e_j)`` (Linear(d, 1)).
    """

    def __init__(self, embed_size: int, window: int):
        super().__init__()
        self.window = int(window)
        self.score = nn.Linear(embed_size, 1)
        _xavier_(self.score)

    def forward(self, words: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """words (N, L_max, d) right-padded (padding never read), lengths (N,) in 1..L_max ->
        (phrases (N, P_max, d), zero beyond each caption's count; counts (N,) int64; membership (N, P_max, L_max)
        float 0/1: word t belongs to phrase p)."""
        n, l_max, _ = words.shape
        counts = phrase_count(lengths, self.window)
        p_max = int(phrase_count(torch.tensor([l_max]), self.window)[0])
        stride = phrase_stride(self.window)
        dev = words.device
        idx = torch.arange(p_max, device=dev)[:, None] * stride + torch.arange(self.window, device=dev)[None]
        row_ok = torch.arange(p_max, device=dev)[None] < counts[:, None]                     # (N, P)
        member_ok = (idx[None] < lengths[:, None, None]) & row_ok[..., None]                 # (N, P, w)
        word_ok = torch.arange(l_max, device=dev)[None] < lengths[:, None]                   # (N, L)
        safe = torch.where(word_ok[..., None], words, torch.zeros((), dtype=words.dtype, device=dev))
        logits = self.score(safe).squeeze(2)                                                 # (N, L)
        gathered = logits[:, idx.clamp(max=l_max - 1)]                                       # (N, P, w)
        # Rows of absent phrases keep finite logits (no all -inf softmax, no NaN in backward); zeroed below.
        keep = member_ok | ~row_ok[..., None]
        attn = torch.softmax(gathered.masked_fill(~keep, float("-inf")), dim=2) * member_ok.to(words.dtype)
        members = safe[:, idx.clamp(max=l_max - 1)]                                          # (N, P, w, d)
        pooled = (attn[..., None] * members).sum(2)                                          # (N, P, d)
        one = torch.ones((), dtype=words.dtype, device=dev)
        phrases = torch.where(row_ok[..., None], l2norm(torch.where(row_ok[..., None], pooled, one)),
                              torch.zeros((), dtype=words.dtype, device=dev))
        membership = torch.zeros(n, p_max, l_max + self.window, dtype=words.dtype, device=dev)
        membership.scatter_(2, idx[None].expand(n, -1, -1), member_ok.to(words.dtype))
        return phrases, counts, membership[:, :, :l_max]


class RegionGroups(nn.Module):
    """Region groups: ``n_groups`` learned attention-pooled groups of an image's regions (our design).

    Group g's weights over the K regions are w_g = softmax_k(u_g . v_k + c_g) (``assign``: Linear(d, G), weight
    N(0, 1) so that the initial groups differ, zero bias); its vector is l2norm(sum_k w_gk v_k).
    """

    def __init__(self, embed_size: int, n_groups: int):
        super().__init__()
        self.n_groups = int(n_groups)
        self.assign = nn.Linear(embed_size, self.n_groups)
        nn.init.normal_(self.assign.weight, std=1.0)
        nn.init.zeros_(self.assign.bias)

    def forward(self, regions: Tensor) -> tuple[Tensor, Tensor]:
        """regions (N, K, d) -> (groups (N, G, d), membership (N, G, K) = w_gk / max_k w_gk in (0, 1])."""
        weights = torch.softmax(self.assign(regions), dim=1).transpose(1, 2)                 # (N, G, K)
        groups = l2norm(weights @ regions)
        return groups, weights / weights.amax(dim=2, keepdim=True)


class StreamReasoning(nn.Module):
    """One stream's parameters: the similarity projections of its levels, the SGR steps and the score.

    Names follow SGRAF's ``sim_enc`` where the meaning is the same (``sim_tranloc_w``, ``sim_tranglo_w``,
    ``SGR_module.<n>.*``, ``sim_eval_w``), so SGRAF's SGR weights load into the t2i stream as they are. Ours:
    ``sim_tranmid_w`` (the intermediate level's projection), ``hierarchy_bias`` (sgr_step,; with a global level the
    last entry is unused: that step computes the global node's row only, which the hierarchy does not touch) and the
    stream's intermediate pooling (``phrase_pool`` in t2i, ``region_groups`` in i2t).
    """

    def __init__(self, direction: str, embed_size: int, sim_dim: int, sgr_step: int, levels: tuple[str, ...],
                 phrase_window: int, region_groups: int, hierarchy_bias: float):
        super().__init__()
        self.direction = direction
        self.sim_tranloc_w = nn.Linear(embed_size, sim_dim)
        if "global" in levels:
            self.sim_tranglo_w = nn.Linear(embed_size, sim_dim)
        if "intermediate" in levels:
            self.sim_tranmid_w = nn.Linear(embed_size, sim_dim)
            if direction == "t2i":
                self.phrase_pool = PhrasePooling(embed_size, phrase_window)
            else:
                self.region_groups = RegionGroups(embed_size, region_groups)
            self.hierarchy_bias = nn.Parameter(torch.full((sgr_step,), float(hierarchy_bias)))
        self.SGR_module = nn.ModuleList([GraphReasoning(sim_dim) for _ in range(sgr_step)])
        self.sim_eval_w = nn.Linear(sim_dim, 1)
        for name in ("sim_tranloc_w", "sim_tranglo_w", "sim_tranmid_w", "sim_eval_w"):
            if hasattr(self, name):
                _xavier_(getattr(self, name))
