"""itm-kernels: fused cross-attention kernels for image-text matching (SCAN, SGRAF, GSMN).

Public API: :func:`xattn_sim` (all-pairs SCAN similarity), :func:`local_sim` (SGRAF's local similarity vectors
for a block of pairs), :func:`node_match` (GSMN's node-level matching vectors for a block of pairs),
:func:`available_backends`, :func:`build_info`.
"""
from __future__ import annotations

from .backends import available_backends, build_info
from .local_sim import local_sim
from .node_match import node_match
from .xattn import xattn_sim

__all__ = ["xattn_sim", "local_sim", "node_match", "available_backends", "build_info"]
__version__ = "0.1.0"
