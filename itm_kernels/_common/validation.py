"""Argument checks shared by every public op: clear errors naming the argument, before any kernel runs."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .constants import AGGS, BACKENDS, DIRECTIONS, FLOAT_DTYPES, NORMS


def check_size(name: str, value, *, minimum: int = 1, maximum: int | None = None, what: str = "") -> int:
    """``value`` as an int in ``minimum..maximum`` (a count, chunk, batch or shard size), else a ValueError naming
    ``name``, the expected range (``what`` says what bounds it) and the value. Python and numpy ints only: bools,
    floats (also integral ones), strings and tensors are refused, so that a size is never silently truncated."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = int(value)
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"in {minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ValueError(f"{name} must be an int {bound}{f' ({what})' if what else ''}, got {value}")
    return value


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


def lambda_range(dtype: torch.dtype) -> tuple[float, float]:
    """(smallest positive, largest) temperature usable with inputs of ``dtype``: sqrt(tiny) and sqrt(max) of the
    compute dtype (float32: 1.1e-19 .. 1.8e19; float64: 1.5e-154 .. 1.3e154). Within it lambda times a (normalised)
    score, its gradient, and 1/lambda_lse times a log-sum stay finite; beyond it a forward or a backward overflows
    (e.g. lambda_lse = 1e300 gives NaN, 1e-300 Inf, lambda_softmax = 3.5e38 NaN in float32)."""
    info = torch.finfo(torch.float64 if dtype == torch.float64 else torch.float32)
    return math.sqrt(info.tiny), math.sqrt(info.max)


def check_lambda(name: str, value, *, positive: bool = False, dtype: torch.dtype | None = None) -> float:
    """``value`` as a float, finite and >= 0 (> 0 with ``positive``); with ``dtype`` (the inputs'), also within
    :func:`lambda_range` (the lower bound only where it must be positive)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        else:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        need = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be finite and {need}, got {value}")
    if dtype is not None:
        lo, hi = lambda_range(dtype)
        if value > hi or (positive and value < lo):
            span = f"{lo:.3g}..{hi:.3g}" if positive else f"0..{hi:.3g}"
            raise ValueError(f"{name} must lie in {span} for {dtype} inputs (beyond that the "
                             f"{'float64' if dtype == torch.float64 else 'float32'} arithmetic overflows), got "
                             f"{value}")
    return value


def check_op_features(op: str, **features) -> None:
    """Metadata checks of a registered op's float inputs (no data read): float dtype, 3-D, non-empty, one dtype,
    one device, one feature size d. ``features``: name -> tensor, images first."""
    first = None
    for name, x in features.items():
        if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{op}: {name} must be a float16/bfloat16/float32/float64 tensor, got "
                            f"{getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 3 or x.numel() == 0:
            raise ValueError(f"{op}: {name} must be a non-empty (N, len, d) tensor, got shape {tuple(x.shape)}")
        if first is None:
            first = (name, x)
            continue
        name0, x0 = first
        if x.dtype != x0.dtype or x.device != x0.device or x.shape[2] != x0.shape[2]:
            raise ValueError(f"{op}: {name} must share dtype, device and d with {name0}: got {x.dtype} on "
                             f"{x.device} with d={x.shape[2]}, and {x0.dtype} on {x0.device} with d={x0.shape[2]}")


def check_op_lengths(op: str, name: str, lens, count: int, max_len: int, device: torch.device) -> None:
    """A registered op's lengths argument: an integer (count,) tensor on ``device`` with values in 1..max_len.

    The values are checked by ``torch._assert_async`` (on a GPU an on-device assert: no host synchronisation; on
    the CPU it raises at once, turned into a ``ValueError`` with the values found); fake/meta tensors (tracing) are
    checked by metadata only. This runs inside the op, so it holds under ``torch.compile`` and for direct calls."""
    if not isinstance(lens, torch.Tensor) or lens.dtype.is_floating_point or lens.dtype.is_complex \
            or lens.dtype == torch.bool:
        raise TypeError(f"{op}: {name} must be an integer tensor, got {getattr(lens, 'dtype', type(lens).__name__)}")
    if lens.dim() != 1 or lens.shape[0] != count:
        raise ValueError(f"{op}: {name} must have shape ({count},), got {tuple(lens.shape)}")
    if lens.device != device:
        raise ValueError(f"{op}: {name} must be on {device} like the features, got {lens.device}")
    if lens.device.type == "meta" or isinstance(lens, torch._subclasses.FakeTensor):
        return
    message = f"{op}: {name} must lie in 1..{max_len}"
    if lens.device.type != "cpu":
        torch._assert_async(((lens >= 1) & (lens <= max_len)).all(), message)
        return
    try:
        torch._assert_async(((lens >= 1) & (lens <= max_len)).all(), message)
    except RuntimeError:
        raise ValueError(f"{message}, got values in {int(lens.min())}..{int(lens.max())}") from None


def check_op_grad(op: str, name: str, grad, shape: tuple, device: torch.device) -> None:
    """A registered backward op's incoming gradient: a float tensor of exactly ``shape`` on ``device``."""
    if not isinstance(grad, torch.Tensor) or not grad.dtype.is_floating_point:
        raise TypeError(f"{op}: {name} must be a floating-point tensor, got {getattr(grad, 'dtype', type(grad))}")
    if tuple(grad.shape) != tuple(shape) or grad.device != device:
        raise ValueError(f"{op}: {name} must have shape {tuple(shape)} on {device}, got {tuple(grad.shape)} on "
                         f"{grad.device}")


def check_tile_bytes(op: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{op}: max_tile_bytes must be an int >= 0 (0: the default), got {value!r}")


def check_feature_pair(images, captions, names: tuple[str, str] = ("images", "captions")) -> None:
    """images (N_img, K, d) and captions (N_cap, L_max, d): float tensors sharing d, dtype and device; ``names``
    are the argument names the errors use."""
    a, b = names
    check_features(a, images)
    check_features(b, captions)
    if images.shape[2] != captions.shape[2]:
        raise ValueError(f"{a} and {b} must share the feature size d, got {a} d={images.shape[2]} "
                         f"and {b} d={captions.shape[2]}")
    if images.dtype != captions.dtype:
        raise TypeError(f"{a} and {b} must have the same dtype, got {images.dtype} and {captions.dtype}")
    if images.device != captions.device:
        raise ValueError(f"{a} and {b} must be on the same device, got {images.device} and {captions.device}")


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
    lambda_softmax = check_lambda("lambda_softmax", lambda_softmax, dtype=images.dtype)
    lambda_lse = check_lambda("lambda_lse", lambda_lse, positive=(agg == "lse"), dtype=images.dtype)
    return (images.contiguous(), captions.contiguous(), cap_lens, img_lens, direction, norm, lambda_softmax, agg,
            lambda_lse, backend)


def check_xattn_op_args(op, images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                        max_tile_bytes) -> None:
    """The checks the registered ``itm_kernels::xattn_sim`` ops run on their own arguments (see
    :func:`check_op_lengths` for what is read from the device)."""
    check_op_features(op, images=images, captions=captions)
    check_op_lengths(op, "cap_lens", cap_lens, captions.shape[0], captions.shape[1], images.device)
    check_op_lengths(op, "img_lens", img_lens, images.shape[0], images.shape[1], images.device)
    for name, value, choices in (("direction", direction, DIRECTIONS), ("norm", norm, NORMS), ("agg", agg, AGGS)):
        if value not in choices:
            raise ValueError(f"{op}: {name} must be one of {choices}, got {value!r}")
    check_lambda("lambda_softmax", lambda_softmax, dtype=images.dtype)
    check_lambda("lambda_lse", lambda_lse, positive=(agg == "lse"), dtype=images.dtype)
    check_tile_bytes(op, max_tile_bytes)
