"""itm-kernels: fused cross-attention kernels for image-text matching (SCAN, SGRAF, GSMN).

Public API: :func:`xattn_sim` (all-pairs SCAN similarity), :func:`available_backends`, :func:`build_info`.
"""
from __future__ import annotations

from .backends import available_backends, build_info
from .xattn import xattn_sim

__all__ = ["xattn_sim", "available_backends", "build_info"]
__version__ = "0.1.0"
