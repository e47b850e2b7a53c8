"""TSHSR similarity head (:class:`TSHSRSimilarity`): two streams of hierarchical similarity nodes, graph reasoning
per stream, fused scores; all-pairs evaluation in bounded-memory blocks (:meth:`TSHSRSimilarity.sims`).

Our design after the abstract (see :mod:`itm_models.tshsr` for what comes from where). For an image (regions
v_1..v_K, K = 36) and a caption (words e_1..e_L), every node is a similarity vector of dimension s:

- t2i stream (words attend over regions): local nodes ``local_sim(V, E)`` (SGRAF's local similarity vectors,
  lambda 9); intermediate nodes ``local_sim(V, phrases)`` with W_mid (phrases: :class:`PhrasePooling`); global node
  l2norm(W_glo (img_glo - cap_glo)^2 + b_glo) with SGRAF's VisualSA / TextSA vectors.
- i2t stream (regions attend over words): local nodes ``local_sim(V, E, direction="i2t")``; intermediate nodes
  ``local_sim(groups, E, direction="i2t")`` with W_mid (groups: :class:`RegionGroups`); its own global node.
- Nodes X = [global; intermediate; local] (the levels of ``levels``). ``sgr_step`` SGR steps per stream:
  A = softmax_rows(Q K^T + beta_n M) over the valid nodes, X = ReLU(W_g (A X) + b_g), where M is the hierarchy:
  M[i, j] = M[j, i] = the membership of local node j in intermediate node i (phrase windows: 0/1; region groups:
  w_gk / max_k w_gk), zero elsewhere; beta_n is learned (``hierarchy_bias``). Read-out: the global node after the
  last step (only its row is computed), or without a global level the mean of the valid nodes.
- Stream score sigmoid(W_e x + b_e); fused score: the sum over streams, or n_streams x softmax(learned logits)
  weighted ("learned", starts equal to the sum).

With ``streams=("t2i",)`` and ``levels=("global", "local")`` this is exactly SGRAF's SGR head (M is empty), and
:meth:`TSHSRSimilarity.load_sgr_state_dict` loads an SGR head's weights as they are.
"""
from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from itm_kernels._common.validation import FLOAT_DTYPES, check_feature_pair, check_features, check_lengths
from itm_kernels.local_sim import local_sim

from ..sgraf.head import LAMBDA_SOFTMAX, SGRAFSimilarity
from ..sgraf.layers import DROPOUT, NUM_REGIONS, TextSA, VisualSA
from .config import FUSIONS, LEVELS, STREAMS
from .layers import StreamReasoning, phrase_count

__all__ = ["TSHSRSimilarity", "DEFAULT_BLOCK_ROWS", "GLOBAL_CHUNK"]

# Graph nodes (pairs x nodes per pair) per evaluation block of ``sims``.
DEFAULT_BLOCK_ROWS = 8192
# Items whose global / phrase / group vectors are computed at a time in ``sims``.
GLOBAL_CHUNK = 64


class TSHSRSimilarity(nn.Module):
    """The TSHSR head (our design after the abstract; module docstring).

    Args:
        embed_size: d. sim_dim: s. sgr_step: SGR steps per stream. streams: subset of ("t2i", "i2t"). levels:
        subset of ("global", "intermediate", "local") with "local". phrase_window, region_groups, fusion
        ("sum" | "learned"), hierarchy_bias: see :class:`itm_models.tshsr.TSHSRConfig`.

    Parameters: ``v_global_w`` / ``t_global_w`` (SGRAF's VisualSA / TextSA, shared by the streams; with a global
    level only), ``streams.<t2i|i2t>`` (:class:`itm_models.tshsr.layers.StreamReasoning`) and, for
    ``fusion="learned"``, ``fusion_logits`` (n_streams,).
    """

    def __init__(self, embed_size: int = 1024, sim_dim: int = 256, sgr_step: int = 3, *,
                 streams: tuple = STREAMS, levels: tuple = LEVELS, phrase_window: int = 3, region_groups: int = 4,
                 fusion: str = "sum", hierarchy_bias: float = 1.0):
        super().__init__()
        streams, levels = tuple(streams), tuple(levels)
        if not streams or any(s not in STREAMS for s in streams) or len(set(streams)) != len(streams):
            raise ValueError(f"streams must hold distinct names from {STREAMS}, got {streams!r}")
        if "local" not in levels or any(v not in LEVELS for v in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"levels must hold distinct names from {LEVELS} including 'local', got {levels!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if not isinstance(sgr_step, int) or sgr_step < 1:
            raise ValueError(f"sgr_step must be a positive int, got {sgr_step!r}")
        self.embed_size, self.sim_dim, self.sgr_step = embed_size, sim_dim, sgr_step
        self.stream_names = tuple(s for s in STREAMS if s in streams)
        self.levels = tuple(v for v in LEVELS if v in levels)
        self.fusion = fusion
        if "global" in self.levels:
            self.v_global_w = VisualSA(embed_size, DROPOUT, NUM_REGIONS)
            self.t_global_w = TextSA(embed_size, DROPOUT)
        self.streams = nn.ModuleDict({s: StreamReasoning(s, embed_size, sim_dim, sgr_step, self.levels,
                                                         phrase_window, region_groups, hierarchy_bias)
                                      for s in self.stream_names})
        if fusion == "learned":
            self.fusion_logits = nn.Parameter(torch.zeros(len(self.stream_names)))

    # ---------------------------------------------------------------------------------------------------------
    # loading SGRAF weights
    # ---------------------------------------------------------------------------------------------------------

    def load_sgr_state_dict(self, state_dict: dict) -> None:
        """Load an SGRAF SGR head's ``sim_enc`` state_dict (:class:`itm_models.SGRAFSimilarity`) into the t2i
        stream and the global encoders; parameters SGRAF has not (ours) are left as they are.

        Raises:
            ValueError: no t2i stream or no global level, an SAF state_dict, or a key / shape that does not fit.
        """
        if "t2i" not in self.stream_names or "global" not in self.levels:
            raise ValueError("an SGR head loads into a TSHSR head with the t2i stream and the global level")
        if any(k.startswith("SAF_module") for k in state_dict):
            raise ValueError("state_dict is an SAF head's; only SGR heads map onto TSHSR")
        mapped = {}
        for key, value in state_dict.items():
            top = key.split(".", 1)[0]
            if top in ("v_global_w", "t_global_w"):
                mapped[key] = value
            else:
                mapped["streams.t2i." + key] = value
        own = self.state_dict()
        for key, value in mapped.items():
            if key not in own:
                raise ValueError(f"SGR key {key.removeprefix('streams.t2i.')!r} has no place in this TSHSR head "
                                 f"(sgr_step {self.sgr_step})")
            if own[key].shape != value.shape:
                raise ValueError(f"SGR key {key!r} has shape {tuple(value.shape)}, this head {tuple(own[key].shape)}")
        missing_sgr = [k for k in own if k.startswith("streams.t2i.SGR_module") and k not in mapped]
        if missing_sgr:
            raise ValueError(f"the SGR state_dict lacks {missing_sgr[:3]} (it has fewer steps than this head)")
        self.load_state_dict(mapped, strict=False)

    # ---------------------------------------------------------------------------------------------------------
    # pieces shared by forward() and sims()
    # ---------------------------------------------------------------------------------------------------------

    def _check(self, img_emb: Tensor, cap_emb: Tensor, cap_lens) -> Tensor:
        """Named errors for malformed inputs; returns cap_lens as int64 on cap_emb's device."""
        check_features("img_emb", img_emb)
        check_features("cap_emb", cap_emb)
        if img_emb.shape[2] != self.embed_size or ("global" in self.levels and img_emb.shape[1] != NUM_REGIONS):
            k = NUM_REGIONS if "global" in self.levels else "K"
            raise ValueError(f"img_emb must be (N_img, {k}, {self.embed_size}), got {tuple(img_emb.shape)}")
        if cap_emb.shape[2] != self.embed_size:
            raise ValueError(f"cap_emb must be (N_cap, L_max, {self.embed_size}), got {tuple(cap_emb.shape)}")
        check_feature_pair(img_emb, cap_emb, names=("img_emb", "cap_emb"))
        return check_lengths("cap_lens", cap_lens, cap_emb.shape[0], cap_emb.shape[1], cap_emb.device)

    def _image_items(self, img: Tensor) -> dict:
        """Per-image vectors (no pair dependence): global (N, d), region groups (N, G, d) and their membership."""
        out = {}
        if "global" in self.levels:
            out["glo"] = self.v_global_w(img)
        if "i2t" in self.stream_names and "intermediate" in self.levels:
            out["groups"], out["group_member"] = self.streams["i2t"].region_groups(img)
        return out

    def _caption_items(self, cap: Tensor, lens: Tensor) -> dict:
        """Per-caption vectors: global (N, d), phrases (N, P, d), their counts and membership (N, P, L)."""
        out = {}
        if "global" in self.levels:
            out["glo"] = self.t_global_w(cap, lens)
        if "t2i" in self.stream_names and "intermediate" in self.levels:
            out["phrases"], out["phrase_lens"], out["phrase_member"] = self.streams["t2i"].phrase_pool(cap, lens)
        return out

    def _stream_nodes(self, name: str, img: Tensor, cap: Tensor, lens: Tensor, items_i: dict, items_c: dict,
                      cdtype: torch.dtype):
        """Nodes of one stream for a block: (x (Ni, Nc, n, s), valid (1, Nc, n) bool, M (Ni|1, Nc|1, n, n) or None).
        ``img`` / ``cap`` in the matmul dtype of local_sim; the nodes in ``cdtype``."""
        st = self.streams[name]
        nc = cap.shape[0]
        dev = img.device
        parts, valid, n_mid = [], [], 0
        lsim = lambda a, b, ln, lin, **kw: local_sim(a, b, ln, lin.weight, lin.bias,  # noqa: E731
                                                    lambda_softmax=LAMBDA_SOFTMAX, **kw).to(cdtype)
        if "global" in self.levels:
            glo_w, glo_b = st.sim_tranglo_w.weight.to(cdtype), st.sim_tranglo_w.bias.to(cdtype)
            parts.append(SGRAFSimilarity._global_sims(items_i["glo"], items_c["glo"], glo_w, glo_b)[:, :, None])
            valid.append(torch.ones(1, 1, 1, dtype=torch.bool, device=dev))
        if name == "t2i":
            if "intermediate" in self.levels:
                phr, plens = items_c["phrases"].to(img.dtype), items_c["phrase_lens"]
                parts.append(lsim(img, phr, plens, st.sim_tranmid_w))
                valid.append((torch.arange(phr.shape[1], device=dev)[None] < plens[:, None])[None])
                n_mid = phr.shape[1]
            parts.append(lsim(img, cap, lens, st.sim_tranloc_w))
            valid.append((torch.arange(cap.shape[1], device=dev)[None] < lens[:, None])[None])
        else:
            if "intermediate" in self.levels:
                groups = items_i["groups"].to(img.dtype)
                parts.append(lsim(groups, cap, lens, st.sim_tranmid_w, direction="i2t"))
                valid.append(torch.ones(1, 1, groups.shape[1], dtype=torch.bool, device=dev))
                n_mid = groups.shape[1]
            parts.append(lsim(img, cap, lens, st.sim_tranloc_w, direction="i2t"))
            valid.append(torch.ones(1, 1, img.shape[1], dtype=torch.bool, device=dev))
        x = torch.cat(parts, dim=2)
        valid = torch.cat([v.expand(1, nc, -1) for v in valid], dim=2)                          # (1, Nc, n)
        hier = None
        if n_mid:
            g = 1 if "global" in self.levels else 0
            member = (items_c["phrase_member"][None] if name == "t2i"
                      else items_i["group_member"][:, None]).to(cdtype)                    # (Ni|1, Nc|1, mid, loc)
            n = x.shape[2]
            hier = torch.zeros(member.shape[0], member.shape[1], n, n, dtype=cdtype, device=dev)
            hier[:, :, g:g + n_mid, g + n_mid:] = member
            hier[:, :, g + n_mid:, g:g + n_mid] = member.transpose(2, 3)
        return x, valid, hier

    def _reason(self, name: str, x: Tensor, valid: Tensor, hier: Tensor | None) -> Tensor:
        """SGR steps with the hierarchy bias on x (Ni, Nc, n, s) -> the stream's score (Ni, Nc)."""
        st = self.streams[name]
        dt = x.dtype
        key_mask = ~valid[:, :, None, :]                                                     # (.., 1, n)
        has_global = "global" in self.levels
        full_steps = st.SGR_module[:-1] if has_global else st.SGR_module
        lin = lambda t, m: torch.nn.functional.linear(t, m.weight.to(dt), m.bias.to(dt))  # noqa: E731
        for n_step, m in enumerate(full_steps):
            logits = lin(x, m.graph_query_w) @ lin(x, m.graph_key_w).transpose(2, 3)         # (Ni, Nc, n, n)
            if hier is not None:
                logits = logits + st.hierarchy_bias[n_step].to(dt) * hier
            attn = torch.softmax(logits.masked_fill(key_mask, float("-inf")), dim=-1)
            x = torch.relu(lin(attn @ x, m.sim_graph_w))
        if has_global:                                   # the last step for the global node only (row 0)
            m = st.SGR_module[-1]
            q0 = lin(x[:, :, :1], m.graph_query_w)                                           # (Ni, Nc, 1, s)
            logits = q0 @ lin(x, m.graph_key_w).transpose(2, 3)                              # (Ni, Nc, 1, n)
            attn = torch.softmax(logits.masked_fill(key_mask, float("-inf")), dim=-1)       # M's row 0 is zero
            vec = torch.relu(lin((attn @ x).squeeze(2), m.sim_graph_w))                     # (Ni, Nc, s)
        else:
            w = valid.to(dt).expand(x.shape[0], x.shape[1], -1)
            vec = (w[..., None] * x).sum(2) / w.sum(2, keepdim=True)
        return torch.sigmoid(lin(vec, st.sim_eval_w)).squeeze(2)

    def _max_nodes(self, length: int, k: int) -> int:
        """Graph nodes per pair of the larger stream for a caption of ``length`` words and K = ``k`` regions."""
        g = 1 if "global" in self.levels else 0
        mid = "intermediate" in self.levels
        sizes = []
        if "t2i" in self.stream_names:
            window = self.streams["t2i"].phrase_pool.window if mid else 0
            sizes.append(g + length + (int(phrase_count(torch.tensor([length]), window)[0]) if mid else 0))
        if "i2t" in self.stream_names:
            sizes.append(g + k + (self.streams["i2t"].region_groups.n_groups if mid else 0))
        return max(sizes)

    def _fuse(self, scores: list[Tensor]) -> Tensor:
        if self.fusion == "learned":
            w = torch.softmax(self.fusion_logits.to(scores[0].dtype), dim=0) * len(scores)
            return sum(wi * s for wi, s in zip(w, scores))
        return sum(scores[1:], scores[0])

    def _block_scores(self, img: Tensor, cap: Tensor, lens: Tensor, items_i: dict, items_c: dict,
                      cdtype: torch.dtype) -> Tensor:
        """Fused scores (Ni, Nc) of a block of pairs (img/cap in local_sim's matmul dtype)."""
        scores = []
        for name in self.stream_names:
            x, valid, hier = self._stream_nodes(name, img, cap, lens, items_i, items_c, cdtype)
            scores.append(self._reason(name, x, valid, hier))
        return self._fuse(scores)

    def stream_scores(self, img_emb: Tensor, cap_emb: Tensor, cap_lens) -> dict[str, Tensor]:
        """Each stream's score (N_img, N_cap) before fusion (current mode; autograd as :meth:`forward`)."""
        lens = self._check(img_emb, cap_emb, cap_lens)
        items_i, items_c = self._image_items(img_emb), self._caption_items(cap_emb, lens)
        out = {}
        for name in self.stream_names:
            x, valid, hier = self._stream_nodes(name, img_emb, cap_emb, lens, items_i, items_c, img_emb.dtype)
            out[name] = self._reason(name, x, valid, hier)
        return out

    # ---------------------------------------------------------------------------------------------------------
    # public API
    # ---------------------------------------------------------------------------------------------------------

    def forward(self, img_emb: Tensor, cap_emb: Tensor, cap_lens) -> Tensor:
        """Scores of every (image, caption) pair of a batch, (B_img, B_cap), with autograd, in the current mode
        (training: dropout 0.4 and VisualSA's BatchNorm batch statistics, as SGRAF).

        Args: img_emb (B_img, 36, d) (any K without a global level), cap_emb (B_cap, L_max, d) right-padded
        (padding never read), cap_lens (B_cap,) in 1..L_max; float32 or float64.

        Memory: per stream the node tensor (B_img B_cap n s) and the attention (B_img B_cap n n) of each SGR step
        are kept for backward (n = 1 + phrases + L_max in t2i, 1 + G + K in i2t); local_sim saves its inputs only.
        """
        lens = self._check(img_emb, cap_emb, cap_lens)
        items_i, items_c = self._image_items(img_emb), self._caption_items(cap_emb, lens)
        return self._block_scores(img_emb, cap_emb, lens, items_i, items_c, img_emb.dtype)

    @torch.no_grad()
    def sims(self, img_emb: Tensor, cap_emb: Tensor, cap_lens, *, dtype: torch.dtype | None = None,
             block_rows: int = DEFAULT_BLOCK_ROWS) -> Tensor:
        """All-pairs TSHSR scores with inference semantics (no dropout, running BatchNorm statistics), whatever
        ``self.training`` is.

        Args:
            img_emb: (N_img, 36, d). cap_emb: (N_cap, L_max, d), right-padded (padding never read). cap_lens:
                (N_cap,) in 1..L_max.
            dtype: dtype of local_sim's matrix products (default img_emb's): float32, float64, or
                bfloat16/float16 (then everything after local_sim in float32).
            block_rows: graph nodes (pairs x nodes of the longer stream) per block.
        Returns:
            (N_img, N_cap) scores, float64 for float64, float32 otherwise.

        Work: the per-item vectors (globals, phrases, region groups) once per image / caption (images 64 at a
        time); captions grouped by exact length (no padding; i2t's local_sim then runs one t2i call per block)
        and cut into chunks of about block_rows / (min(N_img, 16) x nodes) captions; per block of (images x
        caption chunk) pairs, about block_rows nodes, the nodes of each stream by local_sim (t2i, i2t), the SGR
        steps and the scores. Peak memory beyond inputs and output: the per-item vectors ((N_img + N_cap) x d,
        N_img x G x d, N_cap x P x d) and per block a few node-sized tensors (block_rows x s values each) and the
        attention (block_rows x n values per step), plus local_sim's scratch: tens of MiB at the defaults.
        """
        lens = self._check(img_emb, cap_emb, cap_lens)
        if dtype is not None and dtype not in FLOAT_DTYPES:
            raise TypeError(f"dtype must be None or one of {FLOAT_DTYPES}, got {dtype}")
        if isinstance(block_rows, bool) or not isinstance(block_rows, int) or block_rows < 1:
            raise ValueError(f"block_rows must be a positive int, got {block_rows!r}")
        mm_dtype = dtype or img_emb.dtype
        cdtype = torch.float64 if mm_dtype == torch.float64 else torch.float32
        n_img, n_cap, k = img_emb.shape[0], cap_emb.shape[0], img_emb.shape[1]
        was_training = self.training
        self.eval()
        try:
            # A float64 evaluation of a float32 head runs on a float64 copy (the head is a few MiB).
            module = self if next(self.parameters()).dtype == cdtype else copy.deepcopy(self).to(cdtype)
            img_c = img_emb.to(cdtype)
            items_i = _cat_items([module._image_items(img_c[i:i + GLOBAL_CHUNK])
                                  for i in range(0, n_img, GLOBAL_CHUNK)])
            img_mm = img_emb.to(mm_dtype)
            out = torch.empty(n_img, n_cap, dtype=cdtype, device=img_emb.device)
            for length, idx_all in _length_groups(lens):
                n_nodes = self._max_nodes(length, k)
                per_chunk = max(1, block_rows // min(n_img, 16) // n_nodes)
                for c0 in range(0, len(idx_all), per_chunk):
                    idx = idx_all[c0:c0 + per_chunk]
                    lens_c = lens[idx]
                    cap_c = cap_emb[idx, :length]
                    items_c = module._caption_items(cap_c.to(cdtype), lens_c)
                    cap_mm = cap_c.to(mm_dtype)
                    img_chunk = max(1, block_rows // (len(idx) * n_nodes))
                    for i0 in range(0, n_img, img_chunk):
                        i1 = min(n_img, i0 + img_chunk)
                        block_items = {key: v[i0:i1] for key, v in items_i.items()}
                        out[i0:i1, idx] = module._block_scores(img_mm[i0:i1], cap_mm, lens_c, block_items, items_c,
                                                               cdtype)
        finally:
            self.train(was_training)
        return out


def _length_groups(lens: Tensor):
    """(length, caption indices) for every distinct caption length, longest first."""
    for length in torch.unique(lens.cpu()).flip(0).tolist():
        yield int(length), (lens == length).nonzero().squeeze(1)


def _cat_items(chunks: list[dict]) -> dict:
    return {key: torch.cat([c[key] for c in chunks]) for key in chunks[0]}
