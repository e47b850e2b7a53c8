"""The "cuda" backend of ``node_match``: the fused kernel of csrc/node_match/kernel.cuh, op
``itm_kernels::node_match_cuda`` (csrc/node_match/cuda.cu; one thread block per pair, K <= 64, L <= 128)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common import dispatch

# Limits of the CUDA kernel (csrc/node_match/kernel.cuh); larger problems run on "torch".
CUDA_MAX_K, CUDA_MAX_L = 64, 128


def _have_cuda_kernel() -> bool:
    return dispatch.has_cuda_kernels() and hasattr(torch.ops.itm_kernels, "node_match_cuda")


def supports(images: Tensor, captions: Tensor) -> bool:
    """Whether the kernel takes these shapes (others run on "torch")."""
    return images.shape[1] <= CUDA_MAX_K and captions.shape[1] <= CUDA_MAX_L and \
        (images.dtype != torch.float64 or images.shape[1] * captions.shape[1] <= 64 * 64)


def node_match_cuda(images: Tensor, captions: Tensor, cap_lens: Tensor, *, lambda_softmax: float,
                    num_blocks: int) -> tuple[Tensor, Tensor]:
    """Forward with the CUDA kernel on validated inputs that :func:`supports`; no autograd."""
    return torch.ops.itm_kernels.node_match_cuda(images, captions, cap_lens, float(lambda_softmax), int(num_blocks))
