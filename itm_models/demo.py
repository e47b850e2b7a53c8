"""Deprecated: ``itm_models.demo`` moved to :mod:`itm_models.cli.demo` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.demo moved to itm_models.cli.demo", DeprecationWarning, stacklevel=2)

from .cli.demo import *  # noqa: E402,F401,F403
from .cli.demo import main, _official_seconds_per_pair  # noqa: E402,F401

if __name__ == "__main__":
    raise SystemExit(main())
