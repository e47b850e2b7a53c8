"""Deprecated: ``itm_models.gsmn_config`` moved to :mod:`itm_models.gsmn.config` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.gsmn_config moved to itm_models.gsmn.config", DeprecationWarning, stacklevel=2)

from .gsmn.config import *  # noqa: E402,F401,F403
from .gsmn.config import N_KERNELS, LAMBDA_SOFTMAX, _ALIASES  # noqa: E402,F401
