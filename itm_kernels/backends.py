"""Which backends this install has, and the choice of one for a given input."""
from __future__ import annotations

import functools
import os

import torch

_C_IMPORT_ERROR: str | None = None


@functools.lru_cache(maxsize=None)
def load_extension():
    """Import the compiled extension ``itm_kernels._C`` (registers the ``torch.ops.itm_kernels`` ops), or None."""
    global _C_IMPORT_ERROR
    try:
        from . import _C  # noqa: F401
    except ImportError as exc:  # an install without a compiler, or a source checkout before `pip install`
        _C_IMPORT_ERROR = str(exc)
        return None
    return _C


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception:
        return False
    return True


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _probe() -> dict:
    ext = load_extension()
    return {
        "cpu": ext is not None and hasattr(torch.ops.itm_kernels, "xattn_sim_fwd"),
        "cuda": ext is not None and bool(ext.build_info().get("cuda", False)) and torch.cuda.is_available(),
        "triton": triton_importable(),
        "gpu": torch.cuda.is_available(),
    }


# Probed once at import, so that torch.compile traces plain constants here rather than an import.
_HAVE = _probe()


def has_cpu_kernels() -> bool:
    return _HAVE["cpu"]


def has_cuda_kernels() -> bool:
    return _HAVE["cuda"]


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that can run on ``device`` (default: every device this machine has), in preference order.

    "reference" and "torch" are always there; "cpu" needs the compiled extension; "triton" needs triton and a
    CUDA device (or ``TRITON_INTERPRET=1`` for CPU tensors); "cuda" needs the extension built with CUDA.
    """
    kind = None if device is None else torch.device(device).type
    names = []
    if kind in (None, "cuda"):
        if has_cuda_kernels():
            names.append("cuda")
        if _HAVE["triton"] and (_HAVE["gpu"] or triton_interpreted()):
            names.append("triton")
    if kind in (None, "cpu"):
        if has_cpu_kernels():
            names.append("cpu")
        if kind == "cpu" and _HAVE["triton"] and triton_interpreted():
            names.append("triton")
    names += ["torch", "reference"]
    return list(dict.fromkeys(names))


def build_info() -> dict:
    """What this install has: versions, compiled-extension flags (OpenMP, SIMD targets, CUDA archs), backends."""
    ext = load_extension()
    info = {
        "torch": torch.__version__,
        "extension": ext is not None,
        "extension_error": _C_IMPORT_ERROR,
        "triton": None,
        "cuda_available": torch.cuda.is_available(),
        "backends": available_backends(),
    }
    if triton_importable():
        import triton

        info["triton"] = triton.__version__
    if ext is not None:
        info.update(ext.build_info())
    return info


def choose_backend(requested: str, device: torch.device) -> str:
    """Resolve "auto" to the fastest backend for ``device``; refuse a backend this install cannot run there."""
    usable = available_backends(device)
    if requested == "auto":
        # The Triton interpreter on CPU tensors is for tests, never a default.
        return next(b for b in usable if not (b == "triton" and device.type == "cpu"))
    if requested not in usable:
        raise ValueError(f"backend {requested!r} is not available for {device.type} tensors in this install; "
                         f"available: {usable} (see itm_kernels.build_info())")
    return requested
