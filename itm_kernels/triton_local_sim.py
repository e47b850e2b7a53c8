"""Deprecated: ``itm_kernels.triton_local_sim`` moved to ``itm_kernels.local_sim.triton``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.triton_local_sim is deprecated; import from itm_kernels.local_sim.triton instead",
              DeprecationWarning, stacklevel=2)

from importlib import import_module as _import_module

_new = _import_module("itm_kernels.local_sim.triton")
globals().update({k: v for k, v in vars(_new).items() if not (k.startswith("__") and k.endswith("__"))})
del _new, _import_module
