"""Deprecated: ``itm_models.tokenize`` moved to :mod:`itm_models.data.tokenize` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.tokenize moved to itm_models.data.tokenize", DeprecationWarning, stacklevel=2)

from .data.tokenize import *  # noqa: E402,F401,F403
from .data.tokenize import _vocab_error  # noqa: E402,F401
