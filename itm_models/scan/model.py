"""SCAN (Stacked Cross Attention, Lee et al. 2018): encoders + the cross-attention similarity of ``itm_kernels``.

:class:`SCANConfig` mirrors the official ``train.py`` options; :class:`SCAN` holds ``img_enc`` and ``txt_enc`` under
the official names (so ``[img_enc.state_dict(), txt_enc.state_dict()]`` is the official checkpoint's ``model``
list) and scores with :func:`itm_kernels.xattn_sim`, which never materialises the (images x captions x regions x
words) tensor. :class:`SCANEnsemble` averages several models' similarity matrices (the papers' t2i + i2t rows).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import itm_kernels
from itm_kernels._common.bf16_widen import widens_bf16_matmuls

from ..config_utils import ensemble_members
from ..checkpoints import register_model_type
from ..encoders import EncoderText, build_image_encoder
from .config import AGG_FUNCS, SCANConfig

__all__ = ["SCAN", "SCANEnsemble"]


class SCAN(nn.Module):
    """SCAN model: ``img_enc`` (precomputed regions -> d), ``txt_enc`` (ids -> d per word), and the cross-attention
    similarity (``cross_attn``, ``raw_feature_norm``, ``lambda_softmax``, ``agg_func``, ``lambda_lse``).

    Args:
        config: :class:`SCANConfig`.
        backend: default ``itm_kernels.xattn_sim`` backend for :meth:`sims` ("auto", "cpu", "torch", ...).

    The state_dict keys are ``img_enc.fc.*`` and ``txt_enc.{embed,rnn}.*``; :meth:`official_state_dicts` gives the
    official checkpoint's ``model`` list.
    """

    model_type = "scan"

    def __init__(self, config: SCANConfig, backend: str = "auto"):
        super().__init__()
        if not isinstance(config, SCANConfig):
            raise TypeError(f"config must be a SCANConfig, got {type(config).__name__}")
        self.config = config
        self.backend = backend
        # Order as the official SCAN.__init__: the same seed gives the official initial weights.
        self.img_enc = build_image_encoder(config.img_dim, config.embed_size, config.precomp_enc_type,
                                           config.no_imgnorm)
        self.txt_enc = EncoderText(config.vocab_size, config.word_dim, config.embed_size, config.num_layers,
                                   use_bi_gru=config.bi_gru, no_txtnorm=config.no_txtnorm)

    @property
    def direction(self) -> str:
        """"t2i" or "i2t" (``config.cross_attn``)."""
        return self.config.cross_attn

    @property
    def agg(self) -> str:
        """itm_kernels aggregation name ("lse", "mean", "max", "sum") of ``config.agg_func``."""
        return AGG_FUNCS[self.config.agg_func]

    @widens_bf16_matmuls
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, K, img_dim) precomputed region features -> (N, K, embed_size) region embeddings."""
        return self.img_enc(images)

    @widens_bf16_matmuls
    def encode_captions(self, ids: torch.Tensor, lengths) -> torch.Tensor:
        """(N, L_max) token ids with (N,) lengths in 1..L_max (any order) -> (N, L_max, embed_size) word
        embeddings, exact zeros beyond each length."""
        return self.txt_enc(ids, lengths)

    @widens_bf16_matmuls
    def sims(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, cap_lens, *, backend: str | None = None,
             img_lens=None) -> torch.Tensor:
        """All-pairs SCAN similarity of embedded images and captions (``itm_kernels.xattn_sim``).

        Args:
            img_emb: (N_img, K, d) from :meth:`encode_images`.
            cap_emb: (N_cap, L_max, d) from :meth:`encode_captions`, same dtype and device.
            cap_lens: (N_cap,) caption lengths in 1..L_max.
            backend: overrides the model's default backend.
            img_lens: optional (N_img,) region counts (default all K).

        Returns:
            (N_img, N_cap) scores in float64 for float64 embeddings (the official evaluation's precision), float32
            otherwise; differentiable w.r.t. both embeddings.
        """
        c = self.config
        return itm_kernels.xattn_sim(img_emb, cap_emb, cap_lens, img_lens=img_lens, direction=c.cross_attn,
                                     norm=c.raw_feature_norm, lambda_softmax=c.lambda_softmax, agg=self.agg,
                                     lambda_lse=c.lambda_lse, backend=backend or self.backend)

    def topk(self, img_emb: torch.Tensor, cap_emb: torch.Tensor, cap_lens, k: int, *, queries: str = "images",
             backend: str | None = None, img_lens=None, **topk_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` best captions per image (``queries="images"``) or images per caption (``"captions"``) by
        :meth:`sims`, without the (N_img, N_cap) matrix (``itm_kernels.xattn_topk``: the in-kernel top-k on the
        cpu backend, a running top-k over streamed tiles elsewhere).

        Args:
            img_emb, cap_emb, cap_lens, backend, img_lens: as :meth:`sims`; k: 1..gallery size;
            topk_kwargs: further ``xattn_topk`` options (``query_chunk``, ``method``, ``max_tile_bytes``).

        Returns:
            (values (N_q, k) in :meth:`sims`'s dtype, descending; indices (N_q, k) int64), ties by the higher
            index first. Not differentiable.
        """
        c = self.config
        return itm_kernels.xattn_topk(img_emb, cap_emb, cap_lens, k, queries=queries, img_lens=img_lens,
                                      direction=c.cross_attn, norm=c.raw_feature_norm,
                                      lambda_softmax=c.lambda_softmax, agg=self.agg, lambda_lse=c.lambda_lse,
                                      backend=backend or self.backend, **topk_kwargs)

    @widens_bf16_matmuls
    def forward(self, images: torch.Tensor, ids: torch.Tensor, lengths) -> torch.Tensor:
        """Score a batch: (B_img, K, img_dim), (B_cap, L_max) ids, (B_cap,) lengths -> (B_img, B_cap) scores.

        For a training batch of B positive pairs, entry (i, j) scores image i with caption j; the diagonal holds
        the positives (the input of :class:`itm_models.losses.ContrastiveLoss`).
        """
        img_emb = self.encode_images(images)
        cap_emb = self.encode_captions(ids, lengths)
        lens = lengths if isinstance(lengths, torch.Tensor) else torch.as_tensor(lengths)
        return self.sims(img_emb, cap_emb, lens.to(img_emb.device))

    def official_state_dicts(self) -> list[dict]:
        """``[img_enc.state_dict(), txt_enc.state_dict()]``: the official checkpoint's ``model`` list."""
        return [self.img_enc.state_dict(), self.txt_enc.state_dict()]

    def load_official_state_dicts(self, state_dicts: Sequence[dict]) -> None:
        """Load the official ``model`` list ``[img_enc, txt_enc]`` strictly (see
        :func:`itm_models.checkpoints.load_official_checkpoint` for the checked, error-reporting path)."""
        if len(state_dicts) != 2:
            raise ValueError(f"a SCAN model list has 2 state_dicts [img_enc, txt_enc], got {len(state_dicts)}")
        self.img_enc.load_state_dict(state_dicts[0], strict=True)
        self.txt_enc.load_state_dict(state_dicts[1], strict=True)


class SCANEnsemble(nn.Module):
    """Element-wise mean of several SCAN models' similarity matrices (the papers' ensemble rows, e.g. a t2i and an
    i2t model). Each member keeps its own encoders and options.

    Args:
        models: non-empty sequence of :class:`SCAN` (any mix of directions, aggregations, sizes).
    """

    def __init__(self, models: Sequence[SCAN]):
        super().__init__()
        self.models = ensemble_members(models, SCAN, "SCANEnsemble")

    def encode_images(self, images: torch.Tensor) -> list[torch.Tensor]:
        """(N, K, img_dim) -> one (N, K, d_m) embedding per member."""
        return [m.encode_images(images) for m in self.models]

    def encode_captions(self, ids: torch.Tensor, lengths) -> list[torch.Tensor]:
        """(N, L_max) ids, (N,) lengths -> one (N, L_max, d_m) embedding per member."""
        return [m.encode_captions(ids, lengths) for m in self.models]

    def sims(self, img_embs: Sequence[torch.Tensor], cap_embs: Sequence[torch.Tensor], cap_lens, *,
             backend: str | None = None) -> torch.Tensor:
        """Mean over members of ``member.sims(img_embs[m], cap_embs[m], cap_lens)`` -> (N_img, N_cap)."""
        if len(img_embs) != len(self.models) or len(cap_embs) != len(self.models):
            raise ValueError(f"expected {len(self.models)} image and caption embeddings (one per member), got "
                             f"{len(img_embs)} and {len(cap_embs)}")
        total = None
        for m, ie, ce in zip(self.models, img_embs, cap_embs):
            s = m.sims(ie, ce, cap_lens, backend=backend)
            total = s if total is None else total + s
        return total / len(self.models)

    def forward(self, images: torch.Tensor, ids: torch.Tensor, lengths) -> torch.Tensor:
        """(B_img, K, img_dim), (B_cap, L_max), (B_cap,) -> (B_img, B_cap) mean of the members' scores."""
        total = None
        for m in self.models:
            s = m(images, ids, lengths)
            total = s if total is None else total + s
        return total / len(self.models)


register_model_type("scan", SCANConfig, SCAN)
