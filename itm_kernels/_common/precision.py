"""The ``precision=`` keyword of the Triton backends: how float32 tiles are multiplied by tl.dot (no triton import
here: the public functions resolve it before any backend is chosen)."""
from __future__ import annotations

import torch

# "ieee": IEEE float32 FMA (no tensor cores; exact float32, what the goldens check); "tf32": one tensor-core product
# with 10-bit mantissas (about 1e-3 relative); "tf32x3": three tf32 products (near-float32 accuracy).
PRECISIONS = ("ieee", "tf32", "tf32x3")


def resolve_precision(precision: str | None) -> str:
    """The float32 tl.dot precision of a call: ``precision`` if given (one of ``PRECISIONS``), else "tf32" when
    ``torch.backends.cuda.matmul.allow_tf32`` is on and "ieee" otherwise (PyTorch's default: exact float32)."""
    if precision is None:
        return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "ieee"
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} or None, got {precision!r}")
    return precision
