"""SGRAF (SGR and SAF, Diao et al. 2021): :mod:`.layers` (VisualSA, TextSA, graph reasoning, filtration),
:mod:`.batchnorm` (SAF's training statistics), :mod:`.head` (:class:`SGRAFSimilarity`, the fused all-pairs
evaluation), :mod:`.config` (:class:`SGRAFConfig`, schedules), :mod:`.model` (:class:`SGRAF`,
:class:`SGRAFEnsemble`, the text encoder), :mod:`.official` (official checkpoints). The official-style loop is
:mod:`itm_models.baselines.sgraf`.

The names of the former module ``itm_models.sgraf`` are all here (``official_style_forward`` /
``official_style_sims`` with a DeprecationWarning: import them from ``itm_models.baselines.sgraf``).
"""
from ..encoders import l2norm  # noqa: F401
from .config import MODULES, RECIPE_SCHEDULES, SGRAFConfig, recipe_schedule  # noqa: F401
from .head import (DEFAULT_BLOCK_ROWS, GLOBAL_CHUNK, LAMBDA_SOFTMAX, NODE_BUCKET_LOW_PRECISION,  # noqa: F401
                   SGRAFSimilarity)
from .layers import (DROPOUT, EPS, NUM_REGIONS, AttentionFiltration, GraphReasoning, TextSA,  # noqa: F401
                     VisualSA)
from .model import SGRAF, SGRAFEnsemble, SGRAFTextEncoder  # noqa: F401
from .official import build_sgraf_from_official  # noqa: F401

__all__ = ["SGRAFSimilarity", "VisualSA", "TextSA", "official_style_forward", "official_style_sims",
           "SGRAFTextEncoder", "SGRAF", "SGRAFConfig", "SGRAFEnsemble", "build_sgraf_from_official",
           "recipe_schedule", "RECIPE_SCHEDULES"]

_MOVED = {"official_style_forward": "itm_models.baselines.sgraf", "official_style_sims": "itm_models.baselines.sgraf"}


def __getattr__(name):
    if name in _MOVED:
        import importlib
        import warnings

        warnings.warn(f"itm_models.sgraf.{name} moved to {_MOVED[name]}.{name}", DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
