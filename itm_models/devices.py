"""The one device rule of the models, the training loop and the CLIs: :func:`resolve_device`."""
from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def _cuda_unavailable_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The device named by ``spec``, checked to exist here.

    Args:
        spec: "auto" or None (CUDA when available, else the CPU), "cpu", "cuda", "cuda:N", another torch device
            type whose backend reports itself available (``torch.<type>.is_available()``), or a
            :class:`torch.device`.

    Returns:
        :class:`torch.device`.

    Raises:
        ValueError: ``spec`` is not a device name, names CUDA when CUDA is not available (or a GPU index beyond
            ``torch.cuda.device_count()``), or names a device type this machine cannot run (``meta`` included).
    """
    if spec is None or (isinstance(spec, str) and spec == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(spec, (str, torch.device)):
        raise ValueError(f"device must be a string such as 'cpu', 'cuda' or 'cuda:1' (or 'auto'), got "
                         f"{type(spec).__name__}")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"device {spec!r} is not a device name: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(spec)!r} needs CUDA, but {_cuda_unavailable_reason()}; use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"device {str(spec)!r} does not exist: {count} GPU(s) visible (cuda:0 .. "
                             f"cuda:{count - 1})")
        return device
    backend = getattr(torch, device.type, None)
    if device.type != "meta" and callable(getattr(backend, "is_available", None)) and backend.is_available():
        return device
    raise ValueError(f"device {str(spec)!r} is not available on this machine: expected auto, cpu or cuda")
