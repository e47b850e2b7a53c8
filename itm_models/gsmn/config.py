"""GSMN's configuration (:class:`GSMNConfig`, the official option names) and the official training recipes.

Recipes (``shared/reference/SEMANTICS.md``, GSMN; the released README's training commands): hinge loss with margin
0.2 and hardest negatives, Adam, grad-norm clip 2, bi-GRU;

- Flickr30K: lr 2e-4, 30 epochs, lr / 10 after 15, batch 64, lambda_softmax 20;
- COCO: lr 5e-4, 20 epochs, lr / 10 after 5, batch 32, lambda_softmax 10.

:func:`recipe` returns them; :meth:`GSMNConfig.for_dataset` builds a config from one. The model type ``"gsmn"``
is registered for :func:`~itm_models.checkpoints.save_checkpoint` / ``load_checkpoint`` by
:mod:`itm_models.gsmn.model`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass


from ..config_utils import check_fields, opt_fields

__all__ = ["GSMNConfig", "recipe", "RECIPES", "VARIANTS", "N_KERNELS", "LAMBDA_SOFTMAX"]

VARIANTS = ("dense", "sparse")
N_KERNELS = 8                                   # graph-convolution kernels (fixed by the model, as officially)

# The official per-dataset training settings (the fields of GSMNConfig they set).
RECIPES = {
    "f30k": {"learning_rate": 2e-4, "num_epochs": 30, "lr_update": 15, "batch_size": 64, "lambda_softmax": 20.0},
    "coco": {"learning_rate": 5e-4, "num_epochs": 20, "lr_update": 5, "batch_size": 32, "lambda_softmax": 10.0},
}
# The attention and word-affinity temperature of each recipe.
LAMBDA_SOFTMAX = {name: r["lambda_softmax"] for name, r in RECIPES.items()}
_ALIASES = {"f30k": "f30k", "flickr30k": "f30k", "flickr": "f30k", "coco": "coco", "mscoco": "coco"}


def recipe(dataset: str = "f30k") -> dict:
    """The official GSMN training settings of ``dataset`` ("f30k" | "coco"; "f30k_precomp", "flickr30k",
    "coco_precomp" also accepted): a new dict with ``learning_rate``, ``num_epochs``, ``lr_update``,
    ``batch_size`` and ``lambda_softmax``."""
    key = str(dataset).lower().removesuffix("_precomp")
    if key not in _ALIASES:
        raise ValueError(f"no official GSMN recipe for dataset={dataset!r}; known: {sorted(RECIPES)}")
    return dict(RECIPES[_ALIASES[key]])


@dataclass
class GSMNConfig:
    """GSMN hyper-parameters, named as the official ``train.py`` options (plain data only).

    Model: ``vocab_size`` (embedding rows), ``img_dim``, ``word_dim``, ``embed_size`` (d, a multiple of
    ``num_block``), ``num_layers``, ``bi_gru``, ``no_imgnorm``, ``no_txtnorm``, ``lambda_softmax`` (attention and
    word-affinity temperature), ``num_block`` (blocks of the matching vectors; must equal ``feat_dim``),
    ``feat_dim``, ``hid_dim`` (a multiple of the 8 kernels), ``out_dim`` (1), ``variant`` ("dense" | "sparse"; the
    official ``is_sparse`` is :attr:`is_sparse`), ``propagate`` (False: the released code; True: the paper's
    propagation, an option of ours). Training: ``margin``, ``max_violation`` (hardest negatives), ``grad_clip``,
    ``learning_rate``, ``lr_update`` (epochs per 10x decay), ``num_epochs``, ``batch_size``.

    Defaults are the Flickr30K recipe (:func:`recipe`) with the README's training switches on (``bi_gru``,
    ``max_violation``; the official parser leaves both off, and :meth:`from_opt` keeps that for options that lack
    them); :meth:`for_dataset` takes another dataset's recipe.
    """

    vocab_size: int
    img_dim: int = 2048
    word_dim: int = 300
    embed_size: int = 1024
    num_layers: int = 1
    bi_gru: bool = True
    no_imgnorm: bool = False
    no_txtnorm: bool = False
    lambda_softmax: float = 20.0
    num_block: int = 16
    feat_dim: int = 16
    hid_dim: int = 32
    out_dim: int = 1
    variant: str = "dense"
    propagate: bool = False
    margin: float = 0.2
    max_violation: bool = True
    grad_clip: float = 2.0
    learning_rate: float = 2e-4
    num_epochs: int = 30
    lr_update: int = 15
    batch_size: int = 64

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"GSMNConfig.variant must be one of {VARIANTS}, got {self.variant!r}")
        check_fields(self, ints=("vocab_size", "img_dim", "word_dim", "embed_size", "num_layers", "num_block",
                                 "feat_dim", "hid_dim", "out_dim", "num_epochs", "lr_update", "batch_size"),
                     bools=("bi_gru", "no_imgnorm", "no_txtnorm", "propagate", "max_violation"),
                     numbers=(("lambda_softmax", 0.0), ("margin", None), ("grad_clip", 0.0), ("learning_rate", 0.0)))
        if self.num_block != self.feat_dim:
            raise ValueError(f"GSMNConfig: the matching vectors have num_block={self.num_block} entries, which must "
                             f"equal feat_dim={self.feat_dim}")
        if self.embed_size % self.num_block:
            raise ValueError(f"GSMNConfig: num_block={self.num_block} must divide embed_size={self.embed_size}")
        if self.hid_dim % N_KERNELS:
            raise ValueError(f"GSMNConfig: hid_dim={self.hid_dim} must be a multiple of the {N_KERNELS} kernels")
        if self.out_dim != 1:
            raise ValueError(f"GSMNConfig.out_dim must be 1 (a score per node), got {self.out_dim}")

    @property
    def is_sparse(self) -> bool:
        """The official option: True for the sparse (parse-masked) textual graph."""
        return self.variant == "sparse"

    @classmethod
    def for_dataset(cls, dataset: str, **fields) -> "GSMNConfig":
        """The config of ``dataset``'s official recipe (:func:`recipe`), ``fields`` overriding it
        (``vocab_size`` is required): ``GSMNConfig.for_dataset("coco", vocab_size=11353, variant="sparse")``."""
        return cls(**{**recipe(dataset), **fields})

    @classmethod
    def from_opt(cls, opt, *, propagate: bool = False) -> "GSMNConfig":
        """Build from an official ``argparse.Namespace`` (or dict): ``is_sparse`` gives ``variant``, the fields
        above are taken, the rest (paths, workers, logging) ignored; ``bi_gru`` / ``max_violation`` / ``is_sparse``
        missing from ``opt`` are False (the official parser's defaults). ``vocab_size`` is required."""
        kwargs = opt_fields(cls, opt, exclude=("variant", "propagate"))
        kwargs.setdefault("bi_gru", False)
        kwargs.setdefault("max_violation", False)
        is_sparse = opt.get("is_sparse") if isinstance(opt, dict) else getattr(opt, "is_sparse", False)
        return cls(variant="sparse" if is_sparse else "dense", propagate=propagate, **kwargs)

    def model_kwargs(self) -> dict:
        """The keyword arguments of :class:`itm_models.GSMN` that this config describes."""
        names = ("vocab_size", "variant", "propagate", "img_dim", "word_dim", "embed_size", "num_layers", "bi_gru",
                 "no_imgnorm", "no_txtnorm", "lambda_softmax", "num_block", "feat_dim", "hid_dim", "out_dim")
        return {n: getattr(self, n) for n in names}

    def to_dict(self) -> dict:
        """Plain-data dict of every field (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)
