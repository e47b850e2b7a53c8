"""SCAN (Stacked Cross Attention): :mod:`.config` (:class:`SCANConfig`), :mod:`.model` (:class:`SCAN`,
:class:`SCANEnsemble`), :mod:`.scoring` (:func:`encode_and_score`), :mod:`.official` (official checkpoints).

The names of the former module ``itm_models.scan`` are all here.
"""
from .config import AGG_FUNCS, CROSS_ATTN, RAW_FEATURE_NORMS, SCANConfig
from .model import SCAN, SCANEnsemble
from .official import build_scan_from_official
from .scoring import encode_and_score

__all__ = ["SCANConfig", "SCAN", "SCANEnsemble", "encode_and_score", "AGG_FUNCS", "RAW_FEATURE_NORMS",
           "CROSS_ATTN", "build_scan_from_official"]
