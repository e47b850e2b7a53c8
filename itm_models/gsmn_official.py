"""Deprecated: ``itm_models.gsmn_official`` moved to :mod:`itm_models.baselines.gsmn` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.gsmn_official moved to itm_models.baselines.gsmn", DeprecationWarning, stacklevel=2)

from .baselines.gsmn import *  # noqa: E402,F401,F403
from .baselines.gsmn import EPS, _inter_relation, _block_cosine, _convolve, _mlp  # noqa: E402,F401
