"""Deprecated: ``itm_kernels.fast_mm`` moved to ``itm_kernels._common.fast_mm``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.fast_mm is deprecated; import from itm_kernels._common.fast_mm instead",
              DeprecationWarning, stacklevel=2)

from ._common.fast_mm import *  # noqa: F401,F403
from ._common.fast_mm import (  # noqa: F401,E402
    brgemm_available,
    mm_float_out,
)
