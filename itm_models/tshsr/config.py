"""TSHSR's configuration (:class:`TSHSRConfig`): our design's options (streams, levels, phrase window, region
groups, fusion) and the training recipe, which is SGRAF's SGR recipe by our choice (no official TSHSR recipe is
public)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config_utils import check_fields, opt_fields

__all__ = ["TSHSRConfig", "STREAMS", "LEVELS", "FUSIONS"]

STREAMS = ("t2i", "i2t")
LEVELS = ("global", "intermediate", "local")
FUSIONS = ("sum", "learned")


def _choice_tuple(config, name: str, allowed: tuple[str, ...]) -> None:
    """Normalise ``config.<name>`` (a list or tuple of distinct names from ``allowed``) to a tuple in ``allowed``'s
    order; ValueError naming the field otherwise."""
    value = getattr(config, name)
    owner = type(config).__name__
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or not value:
        raise ValueError(f"{owner}.{name} must be a non-empty tuple of names from {allowed}, got {value!r}")
    bad = [v for v in value if v not in allowed]
    if bad or len(set(value)) != len(value):
        raise ValueError(f"{owner}.{name} must hold distinct names from {allowed}, got {tuple(value)!r}")
    setattr(config, name, tuple(v for v in allowed if v in value))


@dataclass
class TSHSRConfig:
    """TSHSR hyper-parameters (plain data only), named like SGRAF's where they mean the same.

    Model: ``vocab_size``, ``word_dim``, ``embed_size`` (d), ``sim_dim`` (s), ``num_layers``, ``bi_gru``,
    ``img_dim``, ``no_imgnorm``, ``no_txtnorm`` and ``sgr_step`` as :class:`itm_models.SGRAFConfig`; ours:

    - ``streams``: a non-empty subset of ("t2i", "i2t"): words attend over regions / regions over words.
    - ``levels``: a subset of ("global", "intermediate", "local") that holds "local": the graph nodes of each
      stream (global: the SGRAF global node; intermediate: phrases in t2i, region groups in i2t; local: words in
      t2i, regions in i2t). Without "global" a stream's score reads the mean of its nodes after reasoning.
    - ``phrase_window``: words per phrase (phrases are windows of that many consecutive words, stride
      ``max(1, phrase_window - 1)``; a caption shorter than the window is one phrase).
    - ``region_groups``: learned attention-pooled groups of regions in the i2t stream.
    - ``fusion``: "sum" (the streams' scores added) or "learned" (n_streams x softmax of learned logits, which
      starts equal to the sum).
    - ``hierarchy_bias``: initial value of the learned per-step bias added to the attention logits between an
      intermediate node and the local nodes it summarises (both ways).

    Training (our choice: SGRAF's SGR recipe on Flickr30K): ``margin`` 0.2, ``max_violation`` on, ``grad_clip`` 2,
    Adam ``learning_rate`` 2e-4, ``num_epochs`` 40, ``lr_update`` 30, ``batch_size`` 128.
    """

    vocab_size: int
    word_dim: int = 300
    embed_size: int = 1024
    sim_dim: int = 256
    num_layers: int = 1
    bi_gru: bool = True
    img_dim: int = 2048
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    sgr_step: int = 3
    streams: tuple = STREAMS
    levels: tuple = LEVELS
    phrase_window: int = 3
    region_groups: int = 4
    fusion: str = "sum"
    hierarchy_bias: float = 1.0
    margin: float = 0.2
    max_violation: bool = True
    grad_clip: float = 2.0
    learning_rate: float = 2e-4
    lr_update: int = 30
    num_epochs: int = 40
    batch_size: int = 128

    def __post_init__(self):
        _choice_tuple(self, "streams", STREAMS)
        _choice_tuple(self, "levels", LEVELS)
        if "local" not in self.levels:
            raise ValueError(f"TSHSRConfig.levels must include 'local' (the nodes every other level summarises), "
                             f"got {self.levels!r}")
        if self.fusion not in FUSIONS:
            raise ValueError(f"TSHSRConfig.fusion must be one of {FUSIONS}, got {self.fusion!r}")
        check_fields(self, ints=("vocab_size", "word_dim", "embed_size", "sim_dim", "num_layers", "img_dim",
                                 "sgr_step", "phrase_window", "region_groups", "lr_update", "num_epochs",
                                 "batch_size"),
                     bools=("bi_gru", "no_imgnorm", "no_txtnorm", "max_violation"),
                     numbers=(("hierarchy_bias", None), ("margin", None), ("grad_clip", 0.0),
                              ("learning_rate", 0.0)))

    @classmethod
    def from_opt(cls, opt) -> "TSHSRConfig":
        """Build from an ``argparse.Namespace`` or dict: the fields above are taken, the rest ignored."""
        return cls(**opt_fields(cls, opt))

    def to_dict(self) -> dict:
        """Plain-data dict of every field (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)
