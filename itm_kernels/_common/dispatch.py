"""Which backends this install has, and the ONE rule that resolves ``backend="auto"`` for every op."""
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
        from .. import _C  # noqa: F401
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


# Today's "auto" policy, per op: the backends "auto" may pick, by device type, in preference order among those
# available there. xattn_sim runs its GPU kernels; the GPU kernels of local_sim and node_match have not run on a GPU
# yet, so "auto" keeps them on "torch" for CUDA tensors.
AUTO_CANDIDATES = {
    "xattn_sim": {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")},
    "local_sim": {"cuda": ("torch",), "cpu": ("cpu", "torch")},
    "node_match": {"cuda": ("torch",), "cpu": ("cpu", "torch")},
}
# The compiled CPU op each op's "cpu" backend needs (an older extension may lack it).
CPU_OPS = {"xattn_sim": "xattn_sim_fwd", "local_sim": "local_sim_cpu_", "node_match": "node_match_fused_"}


def has_cpu_op(op: str) -> bool:
    """Whether the "cpu" backend of ``op`` can run: the compiled extension with that op's CPU kernel."""
    return has_cpu_kernels() and hasattr(torch.ops.itm_kernels, CPU_OPS[op])


def choose_backend(requested: str, device: torch.device, op: str = "xattn_sim") -> str:
    """Resolve "auto" to the backend ``op`` runs on ``device`` (``AUTO_CANDIDATES``, the one policy); refuse a
    named backend this install cannot run there. The Triton interpreter on CPU tensors is for tests, never a
    default."""
    usable = available_backends(device)
    if requested == "auto":
        allowed = AUTO_CANDIDATES[op].get(device.type, ("torch",))
        for name in allowed:
            if name in usable and (name != "cpu" or has_cpu_op(op)):
                return name
        return "torch"
    if requested not in usable:
        raise ValueError(f"backend {requested!r} is not available for {device.type} tensors in this install; "
                         f"available: {usable} (see itm_kernels.build_info())")
    return requested
