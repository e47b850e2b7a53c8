"""Argument checks shared by every public op: clear errors naming the argument, before any kernel runs."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .constants import AGGS, BACKENDS, DIRECTIONS, FLOAT_DTYPES, NORMS


def check_features(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N, len, d), got {type(x).__name__}")
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")
    if x.dim() != 3:
        raise ValueError(f"{name} must have 3 dimensions (N, len, d), got shape {tuple(x.shape)}")
    if x.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(x.shape)}")
    return x


def check_lengths(name: str, lengths, count: int, max_len: int, device: torch.device) -> torch.Tensor:
    """Return ``lengths`` as a contiguous int64 tensor on ``device`` after checking 1 <= lengths <= max_len."""
    if isinstance(lengths, torch.Tensor):
        if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got dtype {lengths.dtype}")
        t = lengths
    elif isinstance(lengths, Sequence) or hasattr(lengths, "__array__"):
        t = torch.as_tensor(lengths)
        if t.dtype.is_floating_point or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integers, got {t.dtype}")
    else:
        raise TypeError(f"{name} must be an integer tensor or sequence, got {type(lengths).__name__}")
    if t.dim() != 1 or t.shape[0] != count:
        raise ValueError(f"{name} must have shape ({count},), got {tuple(t.shape)}")
    t = t.to(device=device, dtype=torch.long).contiguous()
    if torch.compiler.is_compiling():  # value checks would force a graph break; eager calls check them
        return t
    lo, hi = int(t.min()), int(t.max())
    if lo < 1 or hi > max_len:
        raise ValueError(f"{name} must lie in 1..{max_len}, got values in {lo}..{hi}")
    return t


def check_choice(name: str, value, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_lambda(name: str, value, *, positive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {need}, got {value}")
    return value


def check_feature_pair(images, captions) -> None:
    """images (N_img, K, d) and captions (N_cap, L_max, d): float tensors sharing d, dtype and device."""
    check_features("images", images)
    check_features("captions", captions)
    if images.shape[2] != captions.shape[2]:
        raise ValueError(f"images and captions must share the feature size d, got images d={images.shape[2]} "
                         f"and captions d={captions.shape[2]}")
    if images.dtype != captions.dtype:
        raise TypeError(f"images and captions must have the same dtype, got {images.dtype} and {captions.dtype}")
    if images.device != captions.device:
        raise ValueError(f"images and captions must be on the same device, got {images.device} and {captions.device}")


def check_xattn_args(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse, backend):
    """Validate and normalise the arguments of ``xattn_sim``; returns them ready for a backend."""
    check_feature_pair(images, captions)
    cap_lens = check_lengths("cap_lens", cap_lens, captions.shape[0], captions.shape[1], images.device)
    if img_lens is None:
        img_lens = torch.full((images.shape[0],), images.shape[1], dtype=torch.long, device=images.device)
    else:
        img_lens = check_lengths("img_lens", img_lens, images.shape[0], images.shape[1], images.device)
    check_choice("direction", direction, DIRECTIONS)
    check_choice("norm", norm, NORMS)
    check_choice("agg", agg, AGGS)
    check_choice("backend", backend, BACKENDS)
    lambda_softmax = check_lambda("lambda_softmax", lambda_softmax)
    lambda_lse = check_lambda("lambda_lse", lambda_lse, positive=(agg == "lse"))
    return (images.contiguous(), captions.contiguous(), cap_lens, img_lens, direction, norm, lambda_softmax, agg,
            lambda_lse, backend)
