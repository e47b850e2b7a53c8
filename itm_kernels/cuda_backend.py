"""Deprecated: ``itm_kernels.cuda_backend`` moved to ``itm_kernels.xattn_sim.cuda``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.cuda_backend is deprecated; import from itm_kernels.xattn_sim.cuda instead",
              DeprecationWarning, stacklevel=2)

from .xattn_sim.cuda import *  # noqa: F401,F403
from .xattn_sim.cuda import (  # noqa: F401,E402
    DIRECTION_CODES,
    NORM_CODES,
    AGG_CODES,
    MAX_REGIONS,
    MAX_WORDS,
    supports,
    xattn_sim,
    backends,
)
