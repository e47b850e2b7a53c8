"""The whole GSMN model: SCAN's encoders and :class:`itm_models.gsmn.head.GSMNSimilarity`; the ensemble of several
GSMN models (:class:`GSMNEnsemble`). Importing this module registers model type ``"gsmn"`` with
:func:`itm_models.checkpoints.register_model_type`, so :func:`~itm_models.checkpoints.save_checkpoint` /
``load_checkpoint`` round-trip a :class:`GSMN`."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from itm_kernels._common.bf16_widen import widens_bf16_matmuls

from ..checkpoints import register_model_type
from ..encoders import EncoderImagePrecomp, EncoderText
from .config import GSMNConfig
from .head import GSMNSimilarity

__all__ = ["GSMN", "GSMNEnsemble"]


class GSMN(nn.Module):
    """GSMN: SCAN's encoders (``img_enc``, ``txt_enc``) and :class:`GSMNSimilarity` (``sim``), with the interface
    of the other models: :meth:`encode_images`, :meth:`encode_captions`, :meth:`sims` (which also takes boxes,
    image sizes and parses).

    ``model.config`` is a :class:`itm_models.gsmn.config.GSMNConfig` (built from the arguments, or the one given to
    :meth:`from_config`), so :func:`itm_models.checkpoints.save_checkpoint` / ``load_checkpoint`` round-trip the
    model (model type ``"gsmn"``)."""

    model_type = "gsmn"

    def __init__(self, *, vocab_size: int, variant: str = "dense", propagate: bool = False, img_dim: int = 2048,
                 word_dim: int = 300, embed_size: int = 1024, num_layers: int = 1, bi_gru: bool = True,
                 no_imgnorm: bool = False, no_txtnorm: bool = False, lambda_softmax: float = 20.0,
                 num_block: int = 16, feat_dim: int = 16, hid_dim: int = 32, out_dim: int = 1):
        super().__init__()
        self.img_enc = EncoderImagePrecomp(img_dim, embed_size, no_imgnorm)
        self.txt_enc = EncoderText(vocab_size, word_dim, embed_size, num_layers, bi_gru, no_txtnorm)
        self.sim = GSMNSimilarity(variant, lambda_softmax, propagate, embed_size=embed_size, num_block=num_block,
                                  feat_dim=feat_dim, hid_dim=hid_dim, out_dim=out_dim)
        self.config = GSMNConfig(vocab_size=vocab_size, variant=variant, propagate=propagate, img_dim=img_dim,
                                 word_dim=word_dim, embed_size=embed_size, num_layers=num_layers, bi_gru=bi_gru,
                                 no_imgnorm=no_imgnorm, no_txtnorm=no_txtnorm, lambda_softmax=lambda_softmax,
                                 num_block=num_block, feat_dim=feat_dim, hid_dim=hid_dim, out_dim=out_dim)

    @classmethod
    def from_config(cls, config: GSMNConfig, backend: str = "auto") -> "GSMN":
        """Build the model that ``config`` describes and keep ``config`` (training fields included) on
        ``model.config``. ``backend`` is accepted for the interface of
        :func:`itm_models.checkpoints.load_checkpoint` and unused (``sims`` takes a backend per call)."""
        if not isinstance(config, GSMNConfig):
            raise TypeError(f"config must be a GSMNConfig, got {type(config).__name__}")
        model = cls(**config.model_kwargs())
        model.config = config
        return model

    @widens_bf16_matmuls
    def encode_images(self, images: Tensor) -> Tensor:
        """(N, K, img_dim) precomputed region features -> (N, K, d)."""
        return self.img_enc(images)

    @widens_bf16_matmuls
    def encode_captions(self, ids: Tensor, lengths) -> Tensor:
        """(N, L_max) ids, (N,) lengths -> (N, L_max, d)."""
        return self.txt_enc(ids, lengths)

    @widens_bf16_matmuls
    def sims(self, img_emb: Tensor, cap_emb: Tensor, cap_lens, boxes, image_sizes=None, parses=None, **kwargs):
        """All-pairs scores (N_img, N_cap): :meth:`GSMNSimilarity.sims`."""
        return self.sim.sims(img_emb, cap_emb, cap_lens, boxes, image_sizes, parses, **kwargs)

    @widens_bf16_matmuls
    def forward(self, images: Tensor, ids: Tensor, lengths, boxes, image_sizes=None, parses=None) -> Tensor:
        """A training batch: (B, K, img_dim), (B, L) ids, (B,) lengths, (B, K, 4) boxes -> (B, B) scores."""
        lens = torch.as_tensor(lengths)
        return self.sim(self.encode_images(images), self.encode_captions(ids, lens), lens.to(images.device), boxes,
                        image_sizes, parses)

    def official_state_dicts(self) -> list[dict]:
        """``[img_enc, txt_enc, i2t_match_G, t2i_match_G]``: the official checkpoint's ``model`` list."""
        return [self.img_enc.state_dict(), self.txt_enc.state_dict(), self.sim.i2t_match_G.state_dict(),
                self.sim.t2i_match_G.state_dict()]


class GSMNEnsemble(nn.Module):
    """The mean of several GSMN models' similarity matrices (the paper's dense + sparse ensemble)."""

    def __init__(self, models: Sequence[GSMN]):
        super().__init__()
        models = list(models)
        if not models or not all(isinstance(m, GSMN) for m in models):
            raise ValueError(f"GSMNEnsemble needs at least one GSMN model, got "
                             f"{[type(m).__name__ for m in models]}")
        self.models = nn.ModuleList(models)

    def encode_images(self, images: Tensor) -> list[Tensor]:
        return [m.encode_images(images) for m in self.models]

    def encode_captions(self, ids: Tensor, lengths) -> list[Tensor]:
        return [m.encode_captions(ids, lengths) for m in self.models]

    def sims(self, img_embs: Sequence[Tensor], cap_embs: Sequence[Tensor], cap_lens, boxes, image_sizes=None,
             parses=None, **kwargs) -> Tensor:
        """Mean over the members of :meth:`GSMN.sims` (one embedding per member, as ``encode_*`` return)."""
        if len(img_embs) != len(self.models) or len(cap_embs) != len(self.models):
            raise ValueError(f"need one image and one caption embedding per member ({len(self.models)}), got "
                             f"{len(img_embs)} and {len(cap_embs)}")
        total = None
        for m, v, e in zip(self.models, img_embs, cap_embs):
            s = m.sims(v, e, cap_lens, boxes, image_sizes, parses, **kwargs)
            total = s if total is None else total + s
        return total / len(self.models)


register_model_type("gsmn", GSMNConfig, GSMN.from_config)
