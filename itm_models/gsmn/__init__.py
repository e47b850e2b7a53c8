"""GSMN (Graph Structured Matching Network, CVPR 2020): :mod:`.config` (:class:`GSMNConfig`, recipes),
:mod:`.geometry` (boxes, word affinities, parses), :mod:`.layers` (graph convolutions and heads), :mod:`.head`
(:class:`GSMNSimilarity` on the ``node_match`` kernel), :mod:`.parse` (spaCy parses), :mod:`.model`
(:class:`GSMN`, :class:`GSMNEnsemble`), :mod:`.official` (official checkpoints). The official-style loop is
:mod:`itm_models.baselines.gsmn`.

The names of the former module ``itm_models.gsmn`` are all here.
"""
from .config import LAMBDA_SOFTMAX, N_KERNELS, RECIPES, VARIANTS, GSMNConfig, recipe  # noqa: F401
from .geometry import normalize_boxes, official_eval_boxes  # noqa: F401
from .head import DEFAULT_BLOCK_PAIRS, GSMNSimilarity  # noqa: F401
from .layers import (TextualGraph, TextualGraphConvolution, VisualGraph, VisualGraphConvolution,  # noqa: F401
                     WeightNormLinear)
from .model import GSMN, GSMNEnsemble  # noqa: F401
from .official import build_gsmn_from_official  # noqa: F401
from .parse import parse_captions  # noqa: F401

__all__ = ["GSMNSimilarity", "GSMN", "GSMNEnsemble", "official_eval_boxes", "normalize_boxes", "parse_captions",
           "build_gsmn_from_official", "GSMNConfig", "recipe"]
