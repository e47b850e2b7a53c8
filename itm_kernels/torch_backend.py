"""Deprecated: ``itm_kernels.torch_backend`` moved to ``itm_kernels.xattn_sim.torch``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.torch_backend is deprecated; import from itm_kernels.xattn_sim.torch instead",
              DeprecationWarning, stacklevel=2)

from importlib import import_module as _import_module

_new = _import_module("itm_kernels.xattn_sim.torch")
globals().update({k: v for k, v in vars(_new).items() if not (k.startswith("__") and k.endswith("__"))})
del _new, _import_module
