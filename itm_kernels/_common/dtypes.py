"""The dtype rules of every op: ONE function each."""
from __future__ import annotations

import torch


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    """Output dtype of every op for inputs of ``dtype``: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the torch/reference backends compute in (and accumulate in) for inputs of ``dtype``: float64 for
    float64, float32 otherwise (bfloat16/float16 products are exact in float32)."""
    return torch.float64 if dtype == torch.float64 else torch.float32
