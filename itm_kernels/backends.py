"""Deprecated: ``itm_kernels.backends`` moved to ``itm_kernels._common.dispatch``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.backends is deprecated; import from itm_kernels._common.dispatch instead",
              DeprecationWarning, stacklevel=2)

from ._common.dispatch import *  # noqa: F401,F403
from ._common.dispatch import (  # noqa: F401,E402
    _C_IMPORT_ERROR,
    _HAVE,
    _probe,
    load_extension,
    triton_importable,
    triton_interpreted,
    has_cpu_kernels,
    has_cuda_kernels,
    available_backends,
    build_info,
    choose_backend,
)
