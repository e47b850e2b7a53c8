"""The whole SGRAF model: SCAN's precomputed-region encoder, SGRAF's text encoder (:class:`SGRAFTextEncoder`) and the
similarity head (:class:`itm_models.sgraf.head.SGRAFSimilarity`); the SGR + SAF ensemble (:class:`SGRAFEnsemble`).
Importing this module registers model type ``"sgraf"`` with :func:`itm_models.checkpoints.register_model_type`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from itm_kernels._common.bf16_widen import widens_bf16_matmuls

from ..config_utils import ensemble_members
from ..checkpoints import register_model_type
from ..encoders import EncoderImagePrecomp, _check_captions, l2norm
from .config import SGRAFConfig
from .head import SGRAFSimilarity
from .layers import DROPOUT

__all__ = ["SGRAFTextEncoder", "SGRAF", "SGRAFEnsemble"]


class SGRAFTextEncoder(nn.Module):
    """SGRAF's ``EncoderText``: SCAN's text encoder (``itm_models.encoders.EncoderText``) with the GRU named
    ``cap_rnn`` and Dropout(0.4) on the word embeddings in training. Keys ``embed.weight``, ``cap_rnn.*``.

    Args as :class:`itm_models.encoders.EncoderText` (SGRAF defaults ``use_bi_gru`` on).
    """

    def __init__(self, vocab_size: int, word_dim: int, embed_size: int, num_layers: int = 1,
                 use_bi_gru: bool = True, no_txtnorm: bool = False):
        super().__init__()
        self.vocab_size, self.embed_size = int(vocab_size), int(embed_size)
        self.use_bi_gru, self.no_txtnorm = bool(use_bi_gru), bool(no_txtnorm)
        # Official construction order (embedding, dropout, GRU, then the embedding's U(-0.1, 0.1)).
        self.embed = nn.Embedding(self.vocab_size, word_dim)
        self.dropout = nn.Dropout(DROPOUT)
        self.cap_rnn = nn.GRU(word_dim, self.embed_size, num_layers, batch_first=True, bidirectional=self.use_bi_gru)
        with torch.no_grad():
            self.embed.weight.uniform_(-0.1, 0.1)

    @widens_bf16_matmuls
    def forward(self, ids: Tensor, lengths) -> Tensor:
        """(N, L_max) token ids, (N,) lengths in 1..L_max (any order) -> (N, L_max, embed_size) word embeddings,
        exact zeros beyond each length."""
        ids, lens = _check_captions(ids, lengths, self.vocab_size)
        l_max = ids.shape[1]
        valid = (torch.arange(l_max)[None, :] < lens[:, None]).to(ids.device)
        x = self.dropout(self.embed(torch.where(valid, ids, torch.zeros((), dtype=ids.dtype, device=ids.device))))
        packed = pack_padded_sequence(x, lens, batch_first=True, enforce_sorted=bool((lens[:-1] >= lens[1:]).all()))
        out, _ = self.cap_rnn(packed)
        cap_emb, _ = pad_packed_sequence(out, batch_first=True, total_length=l_max)
        if self.use_bi_gru:
            half = cap_emb.shape[2] // 2
            cap_emb = (cap_emb[:, :, :half] + cap_emb[:, :, half:]) / 2
        return cap_emb if self.no_txtnorm else l2norm(cap_emb)


class SGRAF(nn.Module):
    """SGRAF: ``img_enc`` (SCAN's precomputed-region encoder), ``txt_enc`` (:class:`SGRAFTextEncoder`) and
    ``sim_enc`` (:class:`SGRAFSimilarity`), built in the official order. The interface of
    :func:`itm_models.eval.similarity.similarity_matrix`: :meth:`encode_images`, :meth:`encode_captions`, :meth:`sims`.

    ``model.config`` is an :class:`SGRAFConfig` (built from the arguments, or the one given to
    :meth:`from_config`), so :func:`itm_models.checkpoints.save_checkpoint` / ``load_checkpoint`` round-trip the
    model (model type ``"sgraf"``).
    """

    model_type = "sgraf"

    def __init__(self, *, vocab_size: int, img_dim: int = 2048, word_dim: int = 300, embed_size: int = 1024,
                 sim_dim: int = 256, num_layers: int = 1, bi_gru: bool = True, no_imgnorm: bool = False,
                 no_txtnorm: bool = False, module: str = "SGR", sgr_step: int = 3):
        super().__init__()
        self.config = SGRAFConfig(vocab_size=vocab_size, word_dim=word_dim, embed_size=embed_size, sim_dim=sim_dim,
                                  num_layers=num_layers, bi_gru=bi_gru, img_dim=img_dim, no_imgnorm=no_imgnorm,
                                  no_txtnorm=no_txtnorm, module_name=module, sgr_step=sgr_step)
        self.img_enc = EncoderImagePrecomp(img_dim, embed_size, no_imgnorm)
        self.txt_enc = SGRAFTextEncoder(vocab_size, word_dim, embed_size, num_layers, bi_gru, no_txtnorm)
        self.sim_enc = SGRAFSimilarity(embed_size, sim_dim, module, sgr_step)

    @classmethod
    def from_config(cls, config: SGRAFConfig, backend: str = "auto") -> "SGRAF":
        """Build the model that ``config`` describes and keep ``config`` (training fields included) on
        ``model.config``. ``backend`` is accepted for the interface of
        :func:`itm_models.checkpoints.load_checkpoint` and unused: the head's ``local_sim`` has one CPU path."""
        if not isinstance(config, SGRAFConfig):
            raise TypeError(f"config must be an SGRAFConfig, got {type(config).__name__}")
        model = cls(vocab_size=config.vocab_size, img_dim=config.img_dim, word_dim=config.word_dim,
                    embed_size=config.embed_size, sim_dim=config.sim_dim, num_layers=config.num_layers,
                    bi_gru=config.bi_gru, no_imgnorm=config.no_imgnorm, no_txtnorm=config.no_txtnorm,
                    module=config.module_name, sgr_step=config.sgr_step)
        model.config = config
        return model

    @property
    def module_name(self) -> str:
        """"SGR" or "SAF"."""
        return self.sim_enc.module_name

    @widens_bf16_matmuls
    def encode_images(self, images: Tensor) -> Tensor:
        """(N, 36, img_dim) precomputed region features -> (N, 36, d)."""
        return self.img_enc(images)

    @widens_bf16_matmuls
    def encode_captions(self, ids: Tensor, lengths) -> Tensor:
        """(N, L_max) ids, (N,) lengths -> (N, L_max, d), zeros beyond each length."""
        return self.txt_enc(ids, lengths)

    @widens_bf16_matmuls
    def sims(self, img_emb: Tensor, cap_emb: Tensor, cap_lens, **kwargs) -> Tensor:
        """All-pairs scores (N_img, N_cap): :meth:`SGRAFSimilarity.sims` (same keyword arguments)."""
        return self.sim_enc.sims(img_emb, cap_emb, cap_lens, **kwargs)

    @widens_bf16_matmuls
    def forward(self, images: Tensor, ids: Tensor, lengths) -> Tensor:
        """A training batch: (B, 36, img_dim), (B, L_max) ids, (B,) lengths -> (B, B) scores (diagonal positive)."""
        lens = torch.as_tensor(lengths)
        return self.sim_enc(self.encode_images(images), self.encode_captions(ids, lens), lens.to(images.device))

    def official_state_dicts(self) -> list[dict]:
        """``[img_enc, txt_enc, sim_enc]`` state_dicts: the official checkpoint's ``model`` list."""
        return [self.img_enc.state_dict(), self.txt_enc.state_dict(), self.sim_enc.state_dict()]

    def load_official_state_dicts(self, state_dicts) -> None:
        if len(state_dicts) != 3:
            raise ValueError(f"an SGRAF model list has 3 state_dicts [img_enc, txt_enc, sim_enc], got "
                             f"{len(state_dicts)}")
        for name, module, sd in zip(("img_enc", "txt_enc", "sim_enc"), (self.img_enc, self.txt_enc, self.sim_enc),
                                    state_dicts):
            try:
                module.load_state_dict(sd, strict=True)
            except RuntimeError as exc:
                raise ValueError(f"model list entry {name} does not fit the model built from opt: {exc}") from None


class SGRAFEnsemble(nn.Module):
    """Element-wise mean of several SGRAF models' similarity matrices: the paper's SGRAF row is an SGR and an SAF
    model (the official evaluation averages their two sims matrices). Each member keeps its own encoders.

    Args:
        models: non-empty sequence of :class:`SGRAF` (any mix of modules and sizes).

    Raises:
        ValueError: no model. TypeError: a member that is not an :class:`SGRAF`.
    """

    def __init__(self, models: Sequence[SGRAF]):
        super().__init__()
        self.models = ensemble_members(models, SGRAF, "SGRAFEnsemble")

    @property
    def module_names(self) -> tuple[str, ...]:
        """The members' modules, e.g. ("SGR", "SAF")."""
        return tuple(m.module_name for m in self.models)

    def encode_images(self, images: Tensor) -> list[Tensor]:
        """(N, 36, img_dim) region features -> one (N, 36, d_m) embedding per member."""
        return [m.encode_images(images) for m in self.models]

    def encode_captions(self, ids: Tensor, lengths) -> list[Tensor]:
        """(N, L_max) ids, (N,) lengths -> one (N, L_max, d_m) embedding per member (zeros beyond each length)."""
        return [m.encode_captions(ids, lengths) for m in self.models]

    def _check_embeddings(self, img_embs, cap_embs) -> None:
        for name, embs in (("img_embs", img_embs), ("cap_embs", cap_embs)):
            if isinstance(embs, Tensor) or not isinstance(embs, (list, tuple)):
                raise ValueError(f"{name} must be a list with one embedding tensor per member ({len(self.models)}), "
                                 f"as encode_images / encode_captions return, got {type(embs).__name__}")
            if len(embs) != len(self.models):
                raise ValueError(f"{name} holds {len(embs)} embeddings, expected {len(self.models)} (one per member)")

    def sims(self, img_embs: Sequence[Tensor], cap_embs: Sequence[Tensor], cap_lens, **kwargs) -> Tensor:
        """Mean over members of ``member.sims(img_embs[m], cap_embs[m], cap_lens, **kwargs)``.

        Args:
            img_embs: per member (N_img, 36, d_m). cap_embs: per member (N_cap, L_max, d_m). cap_lens: (N_cap,).
            **kwargs: passed to :meth:`SGRAFSimilarity.sims` (``dtype``, ``block_rows``, ``max_tile_bytes``).
        Returns:
            (N_img, N_cap) float32 (float64 for float64 embeddings) mean scores.
        """
        self._check_embeddings(img_embs, cap_embs)
        total = None
        for m, ie, ce in zip(self.models, img_embs, cap_embs):
            s = m.sims(ie, ce, cap_lens, **kwargs)
            total = s if total is None else total + s
        return total / len(self.models)

    def forward(self, images: Tensor, ids: Tensor, lengths) -> Tensor:
        """(B_img, 36, img_dim), (B_cap, L_max) ids, (B_cap,) lengths -> (B_img, B_cap) mean of the members'
        training-mode scores (:meth:`SGRAF.forward`)."""
        total = None
        for m in self.models:
            s = m(images, ids, lengths)
            total = s if total is None else total + s
        return total / len(self.models)


register_model_type("sgraf", SGRAFConfig, SGRAF.from_config)
