"""What the Triton in-kernel top-k (``triton.py``) takes, importable without triton (the dispatcher in
``__init__.py`` asks before choosing a method)."""
from __future__ import annotations

import torch

__all__ = ["TRITON_MAX_K", "triton_topk_supports"]

# The largest k of the Triton kernel, from tools/compile_check_triton.py (SCAN size: K = 36, d = 1024): at k <= 16
# it fits the registers on sm_80/sm_90; at k = 32 the t2i caption-ranking kernel (float32, sm_90) takes 255
# registers and spills 184 bytes, at k = 64 / 128 the image-ranking one 168 bytes / ~2 KB (the 2 KP-key bitonic
# merge). Larger k runs the streaming driver, which is as exact.
TRITON_MAX_K = 16


def triton_topk_supports(dtype: torch.dtype, k: int) -> bool:
    """Whether the Triton in-kernel top-k takes the problem: k <= TRITON_MAX_K and float32 scores (float32, bfloat16
    or float16 inputs; a float64 score and its index do not fit one int64 key)."""
    return k <= TRITON_MAX_K and dtype in (torch.float32, torch.bfloat16, torch.float16)
