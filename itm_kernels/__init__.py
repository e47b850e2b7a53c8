"""itm-kernels: fused cross-attention kernels for image-text matching (SCAN, SGRAF, GSMN).

Public API: :func:`xattn_sim` (all-pairs SCAN similarity), :func:`local_sim` (SGRAF's local similarity vectors
for a block of pairs), :func:`node_match` (GSMN's node-level matching vectors for a block of pairs),
:func:`available_backends`, :func:`build_info`.

Layout: one convention for every op. ``itm_kernels/<op>/`` (op = ``xattn_sim``, ``local_sim``, ``node_match``) is
the op's one home: ``__init__.py`` has the public function and its ``torch.library`` registration, and the backends
are the submodules ``reference`` (the spec), ``torch``, ``cpu``, ``cuda`` and ``triton``; the compiled kernels are
in ``csrc/<op>/``. ``itm_kernels/_common/`` holds what the ops share (constants, dtype rules, validation,
dispatch, Triton helpers, the CPU GEMM wrappers).

Name clash: each package has the name of its public function. This module binds ``itm_kernels.xattn_sim`` (etc.)
to the FUNCTION, after the packages are imported, and importing a submodule later does not undo that. So reach a
package's contents with ``from itm_kernels.xattn_sim import reference`` / ``from itm_kernels.xattn_sim.torch import
...`` or ``importlib.import_module("itm_kernels.xattn_sim")``, never by attribute access from ``itm_kernels`` (nor
``import itm_kernels.xattn_sim.torch as m``, which goes through that attribute).

The pre-layout modules (``itm_kernels.xattn``, ``.ops``, ``.backends``, ``.reference``, ...) are deprecated shims
that re-export the new homes for one release.
"""
from __future__ import annotations

from ._common.dispatch import available_backends, build_info
from . import local_sim as _local_sim_pkg
from . import node_match as _node_match_pkg
from . import xattn_sim as _xattn_sim_pkg
from . import xattn_topk as _xattn_topk_pkg

# Rebind the public names to the functions (importing the packages above set them to the modules).
xattn_sim = _xattn_sim_pkg.xattn_sim
local_sim = _local_sim_pkg.local_sim
node_match = _node_match_pkg.node_match
xattn_topk = _xattn_topk_pkg.xattn_topk

__all__ = ["xattn_sim", "xattn_topk", "local_sim", "node_match", "available_backends", "build_info"]
__version__ = "0.1.0"
