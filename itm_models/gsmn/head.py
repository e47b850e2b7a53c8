"""GSMN (Graph Structured Matching Network, CVPR 2020) on the ``node_match`` kernel: the similarity head
:class:`GSMNSimilarity` (layers: :mod:`itm_models.gsmn.layers`; geometry: :mod:`itm_models.gsmn.geometry`).

Facts: ``shared/reference/SEMANTICS.md`` (GSMN). Per pair (image i, caption c), with m_r / m_t the 16-d node
matching vectors of ``itm_kernels.node_match`` (regions query words, words query regions):

- visual graph: w_k(r, j) Gaussian kernels over the polar coordinates of box centres (normalised over the 8
  kernels); h_r = concat_k W_k (sum_j w_k(r, j) x_j), W_k (4 x 16) without bias;
- textual graph: w_k(t, t') = A(t, t') p_k / sum_t' A(t, t') p_k with A = softmax(lambda e_t . e_t') (dense) or its
  parse-masked, l2-normalised version (sparse); h_t = concat_k (W_k (sum_t' w_k(t, t') x_t') + b_k);
- per node: out_2(tanh(out_1(h))) (weight-normalised 32 -> 32 -> 1); score = mean over regions + mean over words.

``propagate=False`` is the released code: the neighbour features x_j are the node's OWN vector m_r (resp. m_t),
so h_r = concat_k s_rk W_k m_r with s_rk = sum_j w_k(r, j), and the parse cancels out. ``propagate=True`` is the
paper: x_j = m_j, each neighbour's own vector.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn
from tqdm import tqdm

from itm_kernels._common.bf16_widen import widens_bf16_matmuls
from itm_kernels._common.dtypes import compute_dtype
from itm_kernels._common.validation import check_feature_pair, check_lengths
from itm_kernels.node_match import node_match

from .config import N_KERNELS, VARIANTS
from .geometry import (check_boxes, check_parses, normalize_boxes, sparse_adjacency, textual_kernel_weights,
                       word_affinity)
from .layers import TextualGraph, VisualGraph, _node_scores, _stacked

__all__ = ["GSMNSimilarity", "DEFAULT_BLOCK_PAIRS"]

# Pairs scored per node_match call in ``sims``: bounds its (pairs x (K + L) x 16) output (~16 MiB at 4,096).
DEFAULT_BLOCK_PAIRS = 4096


class GSMNSimilarity(nn.Module):
    """GSMN's similarity head: the visual graph ``i2t_match_G`` and the textual graph ``t2i_match_G``.

    Args:
        variant: "dense" (word graph over all word pairs) or "sparse" (masked by the dependency parse).
        lambda_softmax: attention and word-affinity temperature (20 Flickr30K, 10 COCO).
        propagate: False = the released code (no information between neighbours; the parse has no effect);
            True = the paper's propagation h_i = concat_k W_k sum_j w_k(i, j) m_j.
        embed_size, num_block, feat_dim, hid_dim, n_kernels: official sizes (1024, 16, 16, 32, 8); out_dim is 1.

    State dict: ``i2t_match_G.*`` and ``t2i_match_G.*`` with the official keys (weight-normalised ``out_1``/``out_2``
    as ``weight_g``/``weight_v``); :meth:`load_official_state` takes the official head state_dicts as they are.
    """

    def __init__(self, variant: str = "dense", lambda_softmax: float = 20.0, propagate: bool = False, *,
                 embed_size: int = 1024, num_block: int = 16, feat_dim: int = 16, hid_dim: int = 32,
                 out_dim: int = 1, n_kernels: int = N_KERNELS):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if num_block != feat_dim:
            raise ValueError(f"the matching vectors have num_block={num_block} entries, which must equal "
                             f"feat_dim={feat_dim}")
        if embed_size % num_block:
            raise ValueError(f"num_block={num_block} must divide embed_size={embed_size}")
        if hid_dim % n_kernels:
            raise ValueError(f"n_kernels={n_kernels} must divide hid_dim={hid_dim}")
        if out_dim != 1:
            raise ValueError(f"out_dim must be 1 (a score per node), got {out_dim}")
        if not (isinstance(lambda_softmax, (int, float)) and math.isfinite(lambda_softmax) and lambda_softmax >= 0):
            raise ValueError(f"lambda_softmax must be a finite number >= 0, got {lambda_softmax!r}")
        self.variant, self.lambda_softmax, self.propagate = variant, float(lambda_softmax), bool(propagate)
        self.embed_size, self.num_block = embed_size, num_block
        self.i2t_match_G = VisualGraph(feat_dim, hid_dim, out_dim, n_kernels)
        self.t2i_match_G = TextualGraph(feat_dim, hid_dim, out_dim, n_kernels)

    def load_official_state(self, state: dict) -> None:
        """Load ``{"i2t_match_G": VisualGraph.state_dict(), "t2i_match_G": TextualGraph.state_dict()}`` (entries 2
        and 3 of an official checkpoint's ``model`` list), strictly."""
        if not isinstance(state, dict) or set(state) != {"i2t_match_G", "t2i_match_G"}:
            got = sorted(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state must be a dict with exactly 'i2t_match_G' and 't2i_match_G', got {got}")
        for name in ("i2t_match_G", "t2i_match_G"):
            try:
                getattr(self, name).load_state_dict(state[name], strict=True)
            except RuntimeError as exc:
                raise ValueError(f"state[{name!r}] does not fit the official head: {exc}") from None

    # ----------------------------------------------------------------------------------------------------------
    # Graph inputs, computed once per image and once per caption
    # ----------------------------------------------------------------------------------------------------------

    def image_graph(self, boxes: Tensor, image_sizes=None, *, dtype=torch.float32) -> Tensor:
        """Per-image visual-graph weights from (N_img, K, 4) boxes (pixels with ``image_sizes``, else already
        normalised): released mode s_rk = sum_j w_k(r, j) (N_img, K, n_kernels); paper mode w_k(r, j)
        (N_img, K, K, n_kernels). Geometry in the boxes' dtype (float32 as the official code), result in ``dtype``."""
        if image_sizes is not None:
            boxes = normalize_boxes(boxes, image_sizes)
        w = self.i2t_match_G.graph_convolution_1.kernel_weights(boxes)
        return (w if self.propagate else w.sum(dim=2)).to(dtype)

    def caption_graph(self, cap_emb: Tensor, cap_lens: Sequence[int], parses=None, *,
                      dtype=torch.float32) -> list[Tensor]:
        """Per-caption textual-graph weights, one per caption: released mode r_tk = sum_t' w_k(t, t') (L_c,
        n_kernels); paper mode w_k(t, t') (L_c, L_c, n_kernels). ``parses`` (sparse variant): validated edge lists."""
        params = self.t2i_match_G.graph_convolution_3.params.to(dtype)
        out = []
        for c, n in enumerate(cap_lens):
            words = cap_emb[c, :n].to(dtype)
            adj = None
            if self.variant == "sparse":
                adj = torch.from_numpy(sparse_adjacency(parses[c], n)).to(device=words.device, dtype=dtype)
            w = textual_kernel_weights(word_affinity(words, self.lambda_softmax), params, adj)
            out.append(w if self.propagate else w.sum(dim=1))
        return out

    # ----------------------------------------------------------------------------------------------------------
    # Structure-level matching of a block of pairs
    # ----------------------------------------------------------------------------------------------------------

    def _visual_part(self, region_match: Tensor, img_graph: Tensor) -> Tensor:
        """region_match (ni, nc, K, 16), img_graph (ni, K, n_k) or (ni, K, K, n_k) -> (ni, nc) mean node score."""
        w, _ = _stacked(self.i2t_match_G.graph_convolution_1.conv_weights, region_match.dtype)   # (n_k, o, f)
        ni, nc, K, f = region_match.shape
        if self.propagate:
            agg = torch.einsum("irjk,icjf->icrkf", img_graph, region_match)                     # (ni, nc, K, n_k, f)
            h = torch.einsum("icrkf,kof->icrko", agg, w)
        else:
            h = torch.einsum("icrf,kof->icrko", region_match, w) * img_graph[:, None, :, :, None]
        return _node_scores(self.i2t_match_G, h.reshape(ni, nc, K, -1)).mean(dim=2)

    def _textual_part(self, word_match: Tensor, cap_graph: list[Tensor], lens: list[int]) -> Tensor:
        """word_match (ni, nc, L, 16), per-caption graphs -> (ni, nc) mean over each caption's words (the block's
        captions at once, padded to the longest; padding rows are masked out of the mean)."""
        w, b = _stacked(self.t2i_match_G.graph_convolution_3.conv_weights, word_match.dtype)
        ni, nc, L, _ = word_match.shape
        n_k = w.shape[0]
        lens_t = torch.tensor(lens, device=word_match.device)
        valid = torch.arange(L, device=word_match.device)[None, :] < lens_t[:, None]               # (nc, L)
        if self.propagate:
            g = word_match.new_zeros(nc, L, L, n_k)
            for c, n in enumerate(lens):
                g[c, :n, :n] = cap_graph[c].to(word_match.dtype)
            h = torch.einsum("ctuk,icuf,kof->ictko", g, word_match, w)
        else:
            g = word_match.new_zeros(nc, L, n_k)
            for c, n in enumerate(lens):
                g[c, :n] = cap_graph[c].to(word_match.dtype)
            h = torch.einsum("ictf,kof->ictko", word_match, w) * g[None, :, :, :, None]
        h = h + b
        scores = _node_scores(self.t2i_match_G, h.reshape(ni, nc, L, -1))                      # (ni, nc, L)
        scores = torch.where(valid[None], scores, torch.zeros((), dtype=scores.dtype, device=scores.device))
        return scores.sum(dim=2) / lens_t.to(scores.dtype)

    def _score_block(self, img_emb, cap_emb, lens_t, lens, img_graph, cap_graph, backend, parts: bool):
        region_match, word_match = node_match(img_emb, cap_emb, lens_t, lambda_softmax=self.lambda_softmax,
                                              num_blocks=self.num_block, backend=backend)
        dtype = region_match.dtype
        vis = self._visual_part(region_match, img_graph.to(dtype))
        txt = self._textual_part(word_match, cap_graph, lens)
        return (vis, txt) if parts else vis + txt

    def _check(self, img_emb, cap_emb, cap_lens, boxes, parses):
        check_feature_pair(img_emb, cap_emb)
        if img_emb.shape[2] != self.embed_size:
            raise ValueError(f"img_emb must have d = embed_size = {self.embed_size}, got {img_emb.shape[2]}")
        lens_t = check_lengths("cap_lens", cap_lens, cap_emb.shape[0], cap_emb.shape[1], img_emb.device)
        boxes = check_boxes(boxes, img_emb.shape[0], img_emb.shape[1], img_emb.device)
        lens = lens_t.tolist()
        if self.variant == "sparse":
            if parses is None:
                raise ValueError("the sparse GSMN needs parses: one [governor, dependent] edge list per caption")
            parses = check_parses(parses, lens)
        return lens_t, lens, boxes, parses

    @widens_bf16_matmuls
    def forward(self, img_emb: Tensor, cap_emb: Tensor, cap_lens, boxes, image_sizes=None, parses=None) -> Tensor:
        """Differentiable scores of all pairs of a batch: (B_img, K, d), (B_cap, L, d) -> (B_img, B_cap)."""
        lens_t, lens, boxes, parses = self._check(img_emb, cap_emb, cap_lens, boxes, parses)
        dtype = compute_dtype(img_emb.dtype)
        img_graph = self.image_graph(boxes, image_sizes, dtype=dtype)
        cap_graph = self.caption_graph(cap_emb, lens, parses, dtype=dtype)
        return self._score_block(img_emb, cap_emb, lens_t, lens, img_graph, cap_graph, "auto", False)

    @torch.no_grad()
    @widens_bf16_matmuls
    def sims(self, img_emb: Tensor, cap_emb: Tensor, cap_lens, boxes, image_sizes=None, parses=None, *,
             dtype: torch.dtype | None = None, return_parts: bool = False, backend: str = "auto",
             block_pairs: int = DEFAULT_BLOCK_PAIRS, progress: bool = False):
        """All-pairs scores in eval mode, in blocks of pairs with bounded memory.

        Args:
            img_emb: (N_img, K, d) region embeddings; cap_emb: (N_cap, L_max, d) word embeddings (padding never
                read); cap_lens: (N_cap,) lengths.
            boxes: (N_img, K, 4) x1, y1, x2, y2: pixels normalised here once by ``image_sizes`` (N_img, 2) =
                (width, height) when given, else taken as already normalised (e.g. the output of
                :func:`official_eval_boxes`, to reproduce the released numbers).
            parses: the sparse variant's dependency parses, one list of [governor, dependent] per caption (CoreNLP
                layout: 1-based tokens, first edge = ROOT, skipped).
            dtype: embedding dtype for the matching kernel (default: the input's); scores are float32 (float64
                for float64). The CPU kernel computes in float32 for bfloat16/float16 inputs, so on the CPU a low
                precision only rounds the embeddings (no speed-up); the GPU kernels multiply in it.
            return_parts: also return the visual and textual parts: (visual, textual), each (N_img, N_cap).
            block_pairs: pairs per ``node_match`` call.

        Returns:
            (N_img, N_cap) scores (or the two parts).

        Memory: the result, the per-image graph (N_img K 8 values; K K 8 with ``propagate``), the per-caption
        graphs, and one block's matching vectors (``block_pairs`` (K + L_max) 16 values) plus the kernel's tiles.
        """
        if self.training:
            raise RuntimeError("GSMNSimilarity.sims evaluates in eval mode: call .eval() first")
        if dtype is not None:
            img_emb, cap_emb = img_emb.to(dtype), cap_emb.to(dtype)
        lens_t, lens, boxes, parses = self._check(img_emb, cap_emb, cap_lens, boxes, parses)
        graph_dtype = compute_dtype(img_emb.dtype)
        img_graph = self.image_graph(boxes, image_sizes, dtype=graph_dtype)
        cap_graph = self.caption_graph(cap_emb, lens, parses, dtype=graph_dtype)
        n_img, n_cap = img_emb.shape[0], cap_emb.shape[0]
        vis = torch.empty(n_img, n_cap, dtype=graph_dtype, device=img_emb.device)
        txt = torch.empty_like(vis)
        cap_chunk = max(1, min(n_cap, block_pairs // min(n_img, 64)))
        img_chunk = max(1, min(n_img, block_pairs // cap_chunk))
        blocks = [(i0, c0) for c0 in range(0, n_cap, cap_chunk) for i0 in range(0, n_img, img_chunk)]
        for i0, c0 in tqdm(blocks, desc="GSMN sims", disable=not progress, leave=False):
            i1, c1 = min(n_img, i0 + img_chunk), min(n_cap, c0 + cap_chunk)
            longest = max(lens[c0:c1])
            v, t = self._score_block(img_emb[i0:i1], cap_emb[c0:c1, :longest], lens_t[c0:c1], lens[c0:c1],
                                     img_graph[i0:i1], cap_graph[c0:c1], backend, True)
            vis[i0:i1, c0:c1], txt[i0:i1, c0:c1] = v, t
        return (vis, txt) if return_parts else vis + txt
