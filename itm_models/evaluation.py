"""Deprecated: ``itm_models.evaluation`` moved to :mod:`itm_models.eval.similarity` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.evaluation moved to itm_models.eval.similarity", DeprecationWarning, stacklevel=2)

from .eval.similarity import *  # noqa: E402,F401,F403
from .eval.similarity import GSMN_FILES, _graph_inputs, _encode_caption_chunk, _as_list, _cast  # noqa: E402,F401
