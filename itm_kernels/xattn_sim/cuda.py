"""The "cuda" backend: the fused kernel of ``csrc/xattn_sim/kernel.cuh``, op ``itm_kernels::xattn_sim_fwd``.

One thread block per (image, block of captions) computes the region x word score tile in shared memory with float
accumulation (double for float64 inputs) and runs the whole SCAN epilogue there, using the Gram identity
|a|^2 = alpha^T G alpha with a per-image (t2i) or per-caption (i2t) Gram matrix made by a prologue kernel. Limits:
K <= 64 regions, L_max <= 128 words; the op refuses larger inputs with a message naming the limit (and
``backend="auto"`` consults :func:`supports` and falls back).

Products: scalar FMA on register tiles (no tensor cores). It is kept as the exact path (float64, and float32 with
IEEE products); moving its score product onto mma/WMMA tiles is undecided until ``tools/gpu_check.py`` has timed it
against the Triton tensor-core kernel on a GPU (no GPU has run it yet); the Triton kernel is the fast path.
"""
from __future__ import annotations

import torch

from .._common import dispatch as backends
# Integer encodings of the options: the enums of csrc/xattn_sim/math.h (tests/xattn_sim/test_xattn_sim_cuda.py
# checks), the same tables as the cpu backend's.
from .cpu import AGG_CODES, DIRECTION_CODES, NORM_CODES  # noqa: F401

# The kernel's limits (kMaxRegions, kMaxWords in csrc/xattn_sim/kernel.cuh): K and L_max of the inputs.
MAX_REGIONS = 64
MAX_WORDS = 128


def supports(images: torch.Tensor, captions: torch.Tensor) -> bool:
    """Whether the kernel takes these shapes (the op refuses others with a message naming the limit)."""
    return images.shape[1] <= MAX_REGIONS and captions.shape[1] <= MAX_WORDS


def xattn_sim(images: torch.Tensor, captions: torch.Tensor, cap_lens: torch.Tensor, img_lens: torch.Tensor, *,
              direction: str, norm: str, lambda_softmax: float, agg: str, lambda_lse: float,
              max_tile_bytes: int | None = None) -> torch.Tensor:
    """All-pairs SCAN similarity on a CUDA device; arguments already validated (see ``itm_kernels.xattn_sim``).

    Args:
        images: (N_img, K, d) CUDA tensor, float32/float64/float16/bfloat16, contiguous; K <= 64.
        captions: (N_cap, L_max, d), same dtype and device, contiguous; L_max <= 128.
        cap_lens, img_lens: (N_cap,), (N_img,) int64 tensors on the same device.
        max_tile_bytes: cap on the Gram workspace (default 64 MiB); larger inputs run in several launches.
    Returns:
        (N_img, N_cap) float32 (float64 for float64 inputs).
    """
    if backends.load_extension() is None or not hasattr(torch.ops.itm_kernels, "xattn_sim_fwd"):
        raise RuntimeError("the cuda backend needs the compiled extension itm_kernels._C built with CUDA "
                           f"(see itm_kernels.build_info()): {backends.build_info().get('extension_error')}")
    return torch.ops.itm_kernels.xattn_sim_fwd(
        images, captions, cap_lens.to(device=images.device, dtype=torch.long).contiguous(),
        img_lens.to(device=images.device, dtype=torch.long).contiguous(), DIRECTION_CODES[direction],
        NORM_CODES[norm], float(lambda_softmax), AGG_CODES[agg], float(lambda_lse), int(max_tile_bytes or 0))
