"""SGRAF's configuration (:class:`SGRAFConfig`, the official ``opts.py`` option names) and the official per-module
training schedules (:func:`recipe_schedule`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..config_utils import check_fields, opt_fields

__all__ = ["SGRAFConfig", "recipe_schedule", "RECIPE_SCHEDULES", "MODULES"]

MODULES = ("SGR", "SAF")
# The official README's (num_epochs, lr_update) per dataset and module; everything else in the recipe is shared.
RECIPE_SCHEDULES = {("f30k", "SGR"): (40, 30), ("f30k", "SAF"): (30, 20),
                    ("coco", "SGR"): (20, 10), ("coco", "SAF"): (20, 10)}


def recipe_schedule(module: str, dataset: str = "f30k") -> tuple[int, int]:
    """The official ``(num_epochs, lr_update)`` of ``module`` ("SGR" | "SAF") on ``dataset`` ("f30k" | "coco"):
    Flickr30K SGR 40 / 30, SAF 30 / 20; COCO 20 / 10 for both."""
    if (dataset, module) not in RECIPE_SCHEDULES:
        raise ValueError(f"no official schedule for module={module!r} on dataset={dataset!r}; known: "
                         f"{sorted(RECIPE_SCHEDULES)}")
    return RECIPE_SCHEDULES[(dataset, module)]


@dataclass
class SGRAFConfig:
    """SGRAF hyper-parameters, named as the official ``opts.py`` options (plain data only).

    Model: ``vocab_size`` (embedding rows, ``len(vocab)``), ``word_dim``, ``embed_size`` (d), ``sim_dim`` (s),
    ``num_layers``, ``bi_gru``, ``img_dim``, ``no_imgnorm``, ``no_txtnorm``, ``module_name`` ("SGR" | "SAF"),
    ``sgr_step``. Training: ``margin``, ``max_violation`` (hardest negatives), ``grad_clip``, ``learning_rate``,
    ``lr_update`` (epochs per 10x decay), ``num_epochs``, ``batch_size``.

    Defaults are the official parser's, which (unlike SCAN's) turns ``bi_gru`` and ``max_violation`` on: batch 128,
    Adam lr 2e-4, margin 0.2, grad clip 2, sim_dim 256, 3 SGR steps. ``num_epochs`` and ``lr_update`` left as None
    take the Flickr30K schedule of the module (:func:`recipe_schedule`: SGR 40 / 30, SAF 30 / 20; pass 20 / 10 for
    COCO). The attention's lambda (9) and the dropout rates (0.4) are fixed by the model, as officially.
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
    module_name: str = "SGR"
    sgr_step: int = 3
    margin: float = 0.2
    max_violation: bool = True
    grad_clip: float = 2.0
    learning_rate: float = 2e-4
    lr_update: int | None = None
    num_epochs: int | None = None
    batch_size: int = 128

    def __post_init__(self):
        if self.module_name not in MODULES:
            raise ValueError(f"SGRAFConfig.module_name must be one of {MODULES}, got {self.module_name!r}")
        epochs, lr_update = recipe_schedule(self.module_name)
        self.num_epochs = epochs if self.num_epochs is None else self.num_epochs
        self.lr_update = lr_update if self.lr_update is None else self.lr_update
        check_fields(self, ints=("vocab_size", "word_dim", "embed_size", "sim_dim", "num_layers", "img_dim",
                                 "sgr_step", "lr_update", "num_epochs", "batch_size"),
                     bools=("bi_gru", "no_imgnorm", "no_txtnorm", "max_violation"),
                     numbers=(("margin", None), ("grad_clip", 0.0), ("learning_rate", 0.0)))

    @classmethod
    def from_opt(cls, opt) -> "SGRAFConfig":
        """Build from an official ``argparse.Namespace`` (or dict): the fields above are taken, the rest (paths,
        workers, logging) ignored. ``vocab_size`` is required."""
        return cls(**opt_fields(cls, opt))

    def to_dict(self) -> dict:
        """Plain-data dict of every field (``dataclasses.asdict``)."""
        return dataclasses.asdict(self)
