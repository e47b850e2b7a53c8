"""Deprecated: ``itm_kernels.cpu_backend`` moved to ``itm_kernels.xattn_sim.cpu``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.cpu_backend is deprecated; import from itm_kernels.xattn_sim.cpu instead",
              DeprecationWarning, stacklevel=2)

from .xattn_sim.cpu import *  # noqa: F401,F403
from .xattn_sim.cpu import (  # noqa: F401,E402
    DIRECTION_CODES,
    NORM_CODES,
    AGG_CODES,
    xattn_sim,
    load_extension,
)
