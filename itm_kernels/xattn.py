"""Deprecated: ``itm_kernels.xattn`` moved to ``itm_kernels.xattn_sim``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.xattn is deprecated; import from itm_kernels.xattn_sim instead",
              DeprecationWarning, stacklevel=2)

from .xattn_sim import *  # noqa: F401,F403
from .xattn_sim import (  # noqa: F401,E402
    xattn_sim,
    xattn_sim_op,
    check_xattn_args,
    choose_backend,
)
