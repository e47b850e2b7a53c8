"""``mm_float_out``: a matrix product with a float32 result through the fastest CPU GEMM this install has.

PyTorch's float32 ``torch.mm`` calls MKL, which runs its AVX2 code on AMD CPUs; oneDNN's AVX-512 brgemm microkernel
(``torch.ops.itm_kernels.brgemm_mm``, ``csrc/gemm/cpu.cpp``, the one our fused kernels use) multiplies about
2x faster there (223 vs 97 GFLOP/s measured on one Zen core) and as fast in bfloat16. The benchmarks take the
faster of the two as the bare-GEMM yardstick; the SGRAF evaluation multiplies its global branch with it.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .dispatch import load_extension


def brgemm_available(dtype: torch.dtype) -> bool:
    """Whether :func:`mm_float_out` can use brgemm for CPU operands of ``dtype`` (float32 always with the compiled
    extension; bfloat16 on CPUs whose brgemm reads VNNI-packed bfloat16, i.e. AVX-512-BF16)."""
    ext = load_extension()
    if ext is None or not hasattr(torch.ops.itm_kernels, "brgemm_mm"):
        return False
    if dtype == torch.float32:
        return True
    return dtype == torch.bfloat16 and ext.build_info().get("bf16_gemm") == "brgemm-vnni"


def mm_float_out(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` with a float32 result: (M, K) @ (K, N) -> (M, N) float32.

    Args:
        a: (M, K) float32 or bfloat16 (unit column stride; any row stride). b: (K, N), a's dtype.
    Returns:
        (M, N) float32, accumulated in float32. On CPU tensors with the compiled extension: oneDNN brgemm, B packed
        per call (K x N extra elements), rows in parallel chunks of 256; float32 sums the inner axis in chunks of
        256 (rounding within 1.5x of MKL's). bfloat16 without AVX-512-BF16 (or with an odd K) is widened to
        float32 inside the C++ op (M x K + K x N extra float32) and runs the float32 brgemm: never ATen's bfloat16
        mm, which rounds the result to bfloat16 and is a scalar loop on AVX2 CPUs. Other devices or dtypes:
        ``torch.mm(a, b).float()``.
    """
    if (a.device.type == "cpu" and b.device.type == "cpu" and a.dim() == 2 and b.dim() == 2 and a.dtype == b.dtype
            and a.numel() > 0 and b.numel() > 0 and a.stride(1) == 1
            and (brgemm_available(torch.float32) and a.dtype in (torch.float32, torch.bfloat16))):
        return torch.ops.itm_kernels.brgemm_mm(a, b.contiguous())
    if a.dtype == torch.bfloat16 and b.dtype == torch.bfloat16:  # float32 accumulation, never a bf16-rounded mm
        return torch.mm(a.float(), b.float())
    return torch.mm(a, b).float()
