"""Deprecated: ``itm_models.metrics`` moved to :mod:`itm_models.eval.metrics` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.metrics moved to itm_models.eval.metrics", DeprecationWarning, stacklevel=2)

from .eval.metrics import *  # noqa: E402,F401,F403
from .eval.metrics import _RECALL_KEYS, _BLOCK_ELEMENTS, _as_score_matrix, _check_cpi, _last_argmax, _ranks, _summary  # noqa: E402,F401
