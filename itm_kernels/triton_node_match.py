"""Deprecated: ``itm_kernels.triton_node_match`` moved to ``itm_kernels.node_match.triton``; this shim re-exports it
for one release."""
import warnings

warnings.warn("itm_kernels.triton_node_match is deprecated; import from itm_kernels.node_match.triton instead",
              DeprecationWarning, stacklevel=2)

from importlib import import_module as _import_module

_new = _import_module("itm_kernels.node_match.triton")
globals().update({k: v for k, v in vars(_new).items() if not (k.startswith("__") and k.endswith("__"))})
del _new, _import_module
