"""Deprecated: ``itm_models.gsmn_data`` moved to :mod:`itm_models.data.gsmn` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.gsmn_data moved to itm_models.data.gsmn", DeprecationWarning, stacklevel=2)

from .data.gsmn import *  # noqa: E402,F401,F403
from .data.gsmn import _path  # noqa: E402,F401
