"""Deprecated: ``itm_models.synthetic`` moved to :mod:`itm_models.data.synthetic` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.synthetic moved to itm_models.data.synthetic", DeprecationWarning, stacklevel=2)

from .data.synthetic import *  # noqa: E402,F401,F403
from .data.synthetic import main, synthetic_boxes, synthetic_parses  # noqa: E402,F401

if __name__ == "__main__":
    main()
