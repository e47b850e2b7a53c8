"""Deprecated: ``itm_models.opt_fields`` moved to :mod:`itm_models.config_utils` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.opt_fields moved to itm_models.config_utils", DeprecationWarning, stacklevel=2)

from .config_utils import *  # noqa: E402,F401,F403
