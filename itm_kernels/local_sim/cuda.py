"""The "cuda" backend of ``local_sim``: the fused kernel of csrc/local_sim/kernel.cuh, op
``itm_kernels::local_sim_cuda`` (csrc/local_sim/cuda.cu; one thread block per pair, K <= 64, L_max <= 128,
s <= 1024)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common import dispatch

# Limits of the CUDA kernel (csrc/local_sim/kernel.cuh).
CUDA_MAX_K, CUDA_MAX_L, CUDA_MAX_S = 64, 128, 1024


def supports(images: Tensor, captions: Tensor, weight: Tensor) -> bool:
    """Whether the kernel takes these shapes (K, L_max, s within its limits)."""
    return images.shape[1] <= CUDA_MAX_K and captions.shape[1] <= CUDA_MAX_L and weight.shape[0] <= CUDA_MAX_S


def _check_cuda_backend(images: Tensor, captions: Tensor, weight: Tensor) -> None:
    if images.device.type != "cuda" or not dispatch.has_cuda_kernels() or \
            not hasattr(torch.ops.itm_kernels, "local_sim_cuda"):
        raise ValueError("backend 'cuda' needs CUDA tensors and the extension built with CUDA "
                         "(torch.ops.itm_kernels.local_sim_cuda)")
    K, L, s = images.shape[1], captions.shape[1], weight.shape[0]
    if K > CUDA_MAX_K or L > CUDA_MAX_L or s > CUDA_MAX_S:
        raise ValueError(f"backend 'cuda' supports K <= {CUDA_MAX_K}, L_max <= {CUDA_MAX_L} and s <= {CUDA_MAX_S}, "
                         f"got K={K}, L_max={L}, s={s}; use backend 'torch'")


def local_sim_cuda(images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor, bias: Tensor, *,
                   lambda_softmax: float) -> Tensor:
    """Forward with the CUDA kernel on validated inputs (``_check_cuda_backend`` passed); no autograd."""
    return torch.ops.itm_kernels.local_sim_cuda(images, captions, cap_lens, weight, bias, float(lambda_softmax))
