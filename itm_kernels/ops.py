"""Deprecated: ``itm_kernels.ops`` moved to ``itm_kernels.xattn_sim``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.ops is deprecated; import from itm_kernels.xattn_sim instead",
              DeprecationWarning, stacklevel=2)

from .xattn_sim import *  # noqa: F401,F403
from .xattn_sim import (  # noqa: F401,E402
    run_forward,
    xattn_sim_op,
    xattn_sim_backward_op,
    _xattn_sim_fake,
    _xattn_sim_backward_fake,
    _setup_context,
    _backward,
    reference,
    torch_backend,
    out_dtype as _out_dtype,
)
