"""Training: :mod:`.loop` (:func:`train`, :func:`train_step`, the learning-rate schedule and the per-epoch
shuffle), :mod:`.datasets` (GSMN's training items and batches), :mod:`.validation` (:func:`validate`). The CLI
``itm-train`` is :mod:`itm_models.cli.train`.

The names of the former module ``itm_models.train`` are all here; ``main`` and ``cli`` (and the CLI helpers
``_parser``, ``_resolve_model_options``, ``_config_from_args``) are loaded from :mod:`itm_models.cli.train` on
first access, so importing the training package does not import the CLI.
"""
from .datasets import GSMNBatch, GSMNTrainSet, collate_gsmn
from .loop import CHECKPOINT_BEST, CHECKPOINT_LAST, adjust_learning_rate, epoch_generator, train, train_step
from .validation import validate

__all__ = ["train", "train_step", "validate", "adjust_learning_rate", "epoch_generator", "main",
           "GSMNTrainSet", "GSMNBatch", "collate_gsmn", "CHECKPOINT_LAST", "CHECKPOINT_BEST"]

_FROM_CLI = ("main", "cli", "_parser", "_resolve_model_options", "_config_from_args")


def __getattr__(name):
    if name in _FROM_CLI:
        from ..cli import train as _cli_train

        return getattr(_cli_train, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
