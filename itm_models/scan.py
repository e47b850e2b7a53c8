"""SCAN (Stacked Cross Attention, Lee et al. 2018): encoders + the cross-attention similarity of ``itm_kernels``.

:class:`SCANConfig` mirrors the official ``train.py`` options; :class:`SCAN` holds ``img_enc`` and ``txt_enc`` under
the official names (so ``[img_enc.state_dict(), txt_enc.state_dict()]`` is the official checkpoint's ``model``
list) and scores with :func:`itm_kernels.xattn_sim`, which never materialises the (images x captions x regions x
words) tensor. :class:`SCANEnsemble` averages several models' similarity matrices (the papers' t2i + i2t rows).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

import itm_kernels

from .encoders import IMAGE_ENCODER_TYPES, EncoderText, build_image_encoder
from .opt_fields import opt_fields

__all__ = ["SCANConfig", "SCAN", "SCANEnsemble", "encode_and_score", "AGG_FUNCS", "RAW_FEATURE_NORMS",
           "CROSS_ATTN"]

# Official ``agg_func`` names -> itm_kernels ``agg`` names.
AGG_FUNCS = {"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}
RAW_FEATURE_NORMS = ("softmax", "l2norm", "clipped_l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm")
CROSS_ATTN = ("t2i", "i2t")


@dataclass
class SCANConfig:
    """SCAN hyper-parameters, named and defaulted as the official ``train.py`` options (plain data only).

    Model: ``vocab_size`` (embedding rows; the official code sets it to ``len(vocab)``), ``word_dim``,
    ``embed_size`` (d), ``num_layers``, ``bi_gru``, ``img_dim``, ``no_imgnorm``, ``no_txtnorm``,
    ``precomp_enc_type`` ("basic" | "weight_norm"), ``raw_feature_norm``, ``agg_func`` ("LogSumExp" | "Mean" |
    "Max" | "Sum"; the short names "lse" | "mean" | "max" | "sum" are accepted and stored as the official ones),
    ``cross_attn`` ("t2i" | "i2t"), ``lambda_softmax`` (lambda1), ``lambda_lse`` (lambda2).
    Training: ``margin``, ``max_violation`` (hardest negatives), ``grad_clip``, ``learning_rate``, ``lr_update``
    (epochs per 10x decay), ``num_epochs``, ``batch_size``.

    Defaults are the official parser's (so ``bi_gru`` and ``max_violation`` default to False, although every README
    training command turns both on; the training CLI defaults to the README settings).
    """

    vocab_size: int
    word_dim: int = 300
    embed_size: int = 1024
    num_layers: int = 1
    bi_gru: bool = False
    img_dim: int = 2048
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    precomp_enc_type: str = "basic"
    raw_feature_norm: str = "clipped_l2norm"
    agg_func: str = "LogSumExp"
    cross_attn: str = "t2i"
    lambda_softmax: float = 9.0
    lambda_lse: float = 6.0
    margin: float = 0.2
    max_violation: bool = False
    grad_clip: float = 2.0
    learning_rate: float = 2e-4
    lr_update: int = 15
    num_epochs: int = 30
    batch_size: int = 128

    def __post_init__(self):
        short = {v: k for k, v in AGG_FUNCS.items()}
        if self.agg_func in short:
            self.agg_func = short[self.agg_func]
        for name in ("vocab_size", "word_dim", "embed_size", "num_layers", "img_dim", "lr_update", "num_epochs",
                     "batch_size"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise ValueError(f"SCANConfig.{name} must be a positive int, got {v!r}")
            setattr(self, name, int(v))
        for name in ("bi_gru", "no_imgnorm", "no_txtnorm", "max_violation"):
            v = getattr(self, name)
            if not isinstance(v, (bool, np.bool_)):
                raise ValueError(f"SCANConfig.{name} must be a bool, got {v!r}")
            setattr(self, name, bool(v))
        for name, lo in (("lambda_softmax", 0.0), ("lambda_lse", 0.0), ("margin", None), ("grad_clip", 0.0),
                         ("learning_rate", 0.0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)) \
                    or not math.isfinite(v) or (lo is not None and v < lo):
                need = "a finite number" if lo is None else f"a finite number >= {lo}"
                raise ValueError(f"SCANConfig.{name} must be {need}, got {v!r}")
            setattr(self, name, float(v))
        if self.precomp_enc_type not in IMAGE_ENCODER_TYPES:
            raise ValueError(f"SCANConfig.precomp_enc_type must be one of {IMAGE_ENCODER_TYPES}, "
                             f"got {self.precomp_enc_type!r}")
        if self.raw_feature_norm not in RAW_FEATURE_NORMS:
            raise ValueError(f"SCANConfig.raw_feature_norm must be one of {RAW_FEATURE_NORMS}, "
                             f"got {self.raw_feature_norm!r}")
        if self.agg_func not in AGG_FUNCS:
            raise ValueError(f"SCANConfig.agg_func must be one of {tuple(AGG_FUNCS)} (or {tuple(AGG_FUNCS.values())}),"
                             f" got {self.agg_func!r}")
        if self.cross_attn not in CROSS_ATTN:
            raise ValueError(f"SCANConfig.cross_attn must be one of {CROSS_ATTN}, got {self.cross_attn!r}")
        if self.agg_func == "LogSumExp" and self.lambda_lse <= 0:
            raise ValueError(f"SCANConfig.lambda_lse must be > 0 with agg_func='LogSumExp', got {self.lambda_lse}")

    @classmethod
    def from_opt(cls, opt) -> "SCANConfig":
        """Build from an official ``argparse.Namespace`` (or a dict): the fields above are taken, the rest
        (paths, logging, workers, ...) ignored. ``vocab_size`` is required; any other missing field keeps its
        official default (older SCAN versions lacked e.g. ``bi_gru``)."""
        return cls(**opt_fields(cls, opt))

    def to_dict(self) -> dict:
        """Plain-data dict of every field (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)


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

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """(N, K, img_dim) precomputed region features -> (N, K, embed_size) region embeddings."""
        return self.img_enc(images)

    def encode_captions(self, ids: torch.Tensor, lengths) -> torch.Tensor:
        """(N, L_max) token ids with (N,) lengths in 1..L_max (any order) -> (N, L_max, embed_size) word
        embeddings, exact zeros beyond each length."""
        return self.txt_enc(ids, lengths)

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
        models = list(models)
        if not models:
            raise ValueError("SCANEnsemble needs at least one model")
        for i, m in enumerate(models):
            if not isinstance(m, SCAN):
                raise TypeError(f"models[{i}] is a {type(m).__name__}, expected SCAN")
        self.models = nn.ModuleList(models)

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


def _batches(n: int, size: int):
    for start in range(0, n, size):
        yield start, min(n, start + size)


@torch.no_grad()
def encode_and_score(model: SCAN | SCANEnsemble, images, ids: torch.Tensor, lengths, *, batch_size: int = 128,
                     caption_chunk: int = 1000, sims_dtype: torch.dtype | None = None,
                     device: str | torch.device | None = None, backend: str | None = None) -> torch.Tensor:
    """Encode every image and caption once (in batches, no grad, eval mode) and score all pairs.

    Args:
        model: :class:`SCAN` or :class:`SCANEnsemble` (mean of the members' matrices).
        images: (N_img, K, img_dim) features: tensor, numpy array or memory map (copied one batch at a time).
        ids: (N_cap, L_max) token ids; lengths: (N_cap,) lengths.
        batch_size: items per encoder batch.
        caption_chunk: captions per ``xattn_sim`` call (bounds the peak memory of the embeddings in flight).
        sims_dtype: dtype of the embeddings fed to the similarity (``torch.float64`` reproduces the official
            float64 evaluation); default: the model's dtype.
        device: where to run (default: the model's device).
        backend: ``xattn_sim`` backend (default: the model's).

    Returns:
        (N_img, N_cap) scores on the CPU (float64 if ``sims_dtype`` is float64, else float32).
    """
    if isinstance(model, SCANEnsemble):
        total = None
        for m in model.models:
            s = encode_and_score(m, images, ids, lengths, batch_size=batch_size, caption_chunk=caption_chunk,
                                 sims_dtype=sims_dtype, device=device, backend=backend)
            total = s if total is None else total + s
        return total / len(model.models)
    if batch_size < 1 or caption_chunk < 1:
        raise ValueError(f"batch_size and caption_chunk must be positive, got {batch_size}, {caption_chunk}")
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    was_training = model.training
    model.eval()
    try:
        lens = torch.as_tensor(lengths).to(torch.long).cpu()
        n_img = len(images)
        img_embs = []
        for a, b in _batches(n_img, batch_size):
            chunk = images[a:b]
            chunk = torch.as_tensor(np.asarray(chunk)) if not isinstance(chunk, torch.Tensor) else chunk
            img_embs.append(model.encode_images(chunk.to(device=device, dtype=param.dtype)))
        img_emb = torch.cat(img_embs)
        if sims_dtype is not None:
            img_emb = img_emb.to(sims_dtype)
        l_max = int(lens.max())
        ids = ids[:, :l_max]
        cap_embs = []
        for a, b in _batches(ids.shape[0], batch_size):
            cap_embs.append(model.encode_captions(ids[a:b].to(device), lens[a:b]))
        cap_emb = torch.cat(cap_embs)
        if sims_dtype is not None:
            cap_emb = cap_emb.to(sims_dtype)
        cols = []
        for a, b in _batches(cap_emb.shape[0], caption_chunk):
            cols.append(model.sims(img_emb, cap_emb[a:b], lens[a:b].to(device), backend=backend).cpu())
        return torch.cat(cols, dim=1)
    finally:
        model.train(was_training)
