"""SCAN's configuration: :class:`SCANConfig` (the official ``train.py`` options) and the option vocabularies."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config_utils import check_fields, opt_fields
from ..encoders import IMAGE_ENCODER_TYPES

__all__ = ["SCANConfig", "AGG_FUNCS", "RAW_FEATURE_NORMS", "CROSS_ATTN"]

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
        check_fields(self, ints=("vocab_size", "word_dim", "embed_size", "num_layers", "img_dim", "lr_update",
                                 "num_epochs", "batch_size"),
                     bools=("bi_gru", "no_imgnorm", "no_txtnorm", "max_violation"),
                     numbers=(("lambda_softmax", 0.0), ("lambda_lse", 0.0), ("margin", None), ("grad_clip", 0.0),
                              ("learning_rate", 0.0)))
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
