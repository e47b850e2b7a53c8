"""Deprecated: ``itm_models.evaluate`` moved to :mod:`itm_models.cli.eval` (this alias goes in the next release)."""
import warnings

warnings.warn("itm_models.evaluate moved to itm_models.cli.eval", DeprecationWarning, stacklevel=2)

from .cli.eval import *  # noqa: E402,F401,F403
from .cli.eval import DTYPES, load_model, evaluate, main, _official_batch_size, _model_dims, _check_fits  # noqa: E402,F401

if __name__ == "__main__":
    raise SystemExit(main())
