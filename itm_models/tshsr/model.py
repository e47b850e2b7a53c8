"""The whole TSHSR model: SCAN's precomputed-region encoder, SGRAF's text encoder and the TSHSR head
(:class:`itm_models.tshsr.head.TSHSRSimilarity`); :class:`TSHSREnsemble` (mean of members' scores). Importing this
module registers model type ``"tshsr"`` with :func:`itm_models.checkpoints.register_model_type`."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..config_utils import ensemble_members
from ..checkpoints import register_model_type
from ..encoders import EncoderImagePrecomp
from ..sgraf.model import SGRAFTextEncoder
from .config import TSHSRConfig
from .head import TSHSRSimilarity

__all__ = ["TSHSR", "TSHSREnsemble"]


class TSHSR(nn.Module):
    """TSHSR (our design after the abstract of Chen et al. 2022; see :mod:`itm_models.tshsr`): ``img_enc``
    (SCAN's precomputed-region encoder), ``txt_enc`` (SGRAF's text encoder) and ``sim_enc``
    (:class:`TSHSRSimilarity`). The interface of :func:`itm_models.eval.similarity.similarity_matrix`:
    :meth:`encode_images`, :meth:`encode_captions`, :meth:`sims`.

    Build with ``TSHSR(config)`` or :meth:`from_config`; ``model.config`` is the :class:`TSHSRConfig`, so
    :func:`itm_models.checkpoints.save_checkpoint` / ``load_checkpoint`` round-trip the model (type ``"tshsr"``).
    """

    model_type = "tshsr"

    def __init__(self, config: TSHSRConfig):
        super().__init__()
        if not isinstance(config, TSHSRConfig):
            raise TypeError(f"config must be a TSHSRConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.img_enc = EncoderImagePrecomp(c.img_dim, c.embed_size, c.no_imgnorm)
        self.txt_enc = SGRAFTextEncoder(c.vocab_size, c.word_dim, c.embed_size, c.num_layers, c.bi_gru,
                                        c.no_txtnorm)
        self.sim_enc = TSHSRSimilarity(c.embed_size, c.sim_dim, c.sgr_step, streams=c.streams, levels=c.levels,
                                       phrase_window=c.phrase_window, region_groups=c.region_groups,
                                       fusion=c.fusion, hierarchy_bias=c.hierarchy_bias)

    @classmethod
    def from_config(cls, config: TSHSRConfig, backend: str = "auto") -> "TSHSR":
        """The model ``config`` describes (``backend`` is accepted for :func:`itm_models.checkpoints.load_checkpoint`
        and unused: local_sim picks its own path)."""
        return cls(config)

    def encode_images(self, images: Tensor) -> Tensor:
        """(N, 36, img_dim) precomputed region features -> (N, 36, d)."""
        return self.img_enc(images)

    def encode_captions(self, ids: Tensor, lengths) -> Tensor:
        """(N, L_max) ids, (N,) lengths -> (N, L_max, d), zeros beyond each length."""
        return self.txt_enc(ids, lengths)

    def sims(self, img_emb: Tensor, cap_emb: Tensor, cap_lens, **kwargs) -> Tensor:
        """All-pairs scores (N_img, N_cap): :meth:`TSHSRSimilarity.sims` (same keyword arguments)."""
        return self.sim_enc.sims(img_emb, cap_emb, cap_lens, **kwargs)

    def forward(self, images: Tensor, ids: Tensor, lengths) -> Tensor:
        """A training batch: (B, 36, img_dim), (B, L_max) ids, (B,) lengths -> (B, B) scores (diagonal positive)."""
        lens = torch.as_tensor(lengths)
        return self.sim_enc(self.encode_images(images), self.encode_captions(ids, lens), lens.to(images.device))


class TSHSREnsemble(nn.Module):
    """Element-wise mean of several TSHSR models' similarity matrices (each member keeps its own encoders).

    Raises:
        ValueError: no model. TypeError: a member that is not a :class:`TSHSR`.
    """

    def __init__(self, models: Sequence[TSHSR]):
        super().__init__()
        self.models = ensemble_members(models, TSHSR, "TSHSREnsemble")

    def encode_images(self, images: Tensor) -> list[Tensor]:
        """(N, 36, img_dim) -> one (N, 36, d_m) embedding per member."""
        return [m.encode_images(images) for m in self.models]

    def encode_captions(self, ids: Tensor, lengths) -> list[Tensor]:
        """(N, L_max) ids, (N,) lengths -> one (N, L_max, d_m) embedding per member."""
        return [m.encode_captions(ids, lengths) for m in self.models]

    def sims(self, img_embs: Sequence[Tensor], cap_embs: Sequence[Tensor], cap_lens, **kwargs) -> Tensor:
        """Mean over members of ``member.sims(img_embs[m], cap_embs[m], cap_lens, **kwargs)``: (N_img, N_cap)."""
        for name, embs in (("img_embs", img_embs), ("cap_embs", cap_embs)):
            if isinstance(embs, Tensor) or not isinstance(embs, (list, tuple)) or len(embs) != len(self.models):
                raise ValueError(f"{name} must be a list with one embedding tensor per member ({len(self.models)}), "
                                 "as encode_images / encode_captions return")
        total = None
        for m, ie, ce in zip(self.models, img_embs, cap_embs):
            s = m.sims(ie, ce, cap_lens, **kwargs)
            total = s if total is None else total + s
        return total / len(self.models)

    def forward(self, images: Tensor, ids: Tensor, lengths) -> Tensor:
        """(B_img, 36, img_dim), (B_cap, L_max) ids, (B_cap,) lengths -> mean of the members' scores."""
        return sum(m(images, ids, lengths) for m in self.models) / len(self.models)


register_model_type("tshsr", TSHSRConfig, TSHSR.from_config)
