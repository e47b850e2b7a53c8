"""Deprecated: ``itm_kernels._validation`` moved to ``itm_kernels._common.validation``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels._validation is deprecated; import from itm_kernels._common.validation instead",
              DeprecationWarning, stacklevel=2)

from ._common.validation import *  # noqa: F401,F403
from ._common.validation import (  # noqa: F401,E402
    FLOAT_DTYPES,
    BACKENDS,
    check_features,
    check_lengths,
    check_choice,
    check_lambda,
    check_feature_pair,
    check_xattn_args,
)
