"""The "cpu" backend of ``local_sim``: the fused C++ kernel ``torch.ops.itm_kernels.local_sim_cpu_``
(csrc/local_sim/cpu.cpp; the algorithm is described in ``itm_kernels.local_sim``)."""
from __future__ import annotations

import torch
from torch import Tensor

from .._common import dispatch
from .._common.dtypes import out_dtype as _out_dtype
from .torch import _gram, _mm_dtype, local_sim_torch


def _have_cpu_kernel() -> bool:
    return dispatch.has_cpu_op("local_sim")


_CPU_OUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16)


def local_sim_cpu(images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor, bias: Tensor, *,
                  lambda_softmax: float, max_tile_bytes: int | None = None, out: Tensor | None = None,
                  gram: Tensor | None = None) -> Tensor:
    """Forward with the fused C++ kernel (``torch.ops.itm_kernels.local_sim_cpu_``) on validated CPU inputs; the
    contract of :func:`local_sim_torch` (``out``: any floating dtype and strides, e.g. the word nodes of a larger
    node tensor, rows cast once; ``gram``: a precomputed :func:`local_sim_gram`). No autograd.

    float32 / bfloat16 / float64 features run in C++ (bfloat16: the three products in bfloat16 with float32
    accumulation, everything else float32); float16 features, non-CPU tensors or a build without the extension run
    :func:`local_sim_torch`. ``max_tile_bytes`` caps the per-thread scratch (default 2 MiB).

    Memory: the output, the Gram matrices (unless given), W^T packed once (d x s in the features' dtype) and per
    thread one scratch of at most ``max_tile_bytes`` (more only for a caption longer than that allows).
    """
    if images.dtype == torch.float16 or images.device.type != "cpu" or not _have_cpu_kernel():
        return local_sim_torch(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                               max_tile_bytes=max_tile_bytes, out=out, gram=gram)
    n_img, K, _ = images.shape
    n_cap, L, s_dim = captions.shape[0], captions.shape[1], weight.shape[0]
    cdtype = _out_dtype(images.dtype)
    if gram is None:
        gram = _gram(images, cdtype)
    elif gram.shape != (n_img, K, K) or gram.dtype != cdtype:
        raise ValueError(f"gram must be ({n_img}, K, K) {cdtype}, got {tuple(gram.shape)} {gram.dtype}")
    if out is None:
        out = torch.empty(n_img, n_cap, L, s_dim, dtype=cdtype, device=images.device)
    elif out.shape != (n_img, n_cap, L, s_dim):
        raise ValueError(f"out must be {(n_img, n_cap, L, s_dim)}, got {tuple(out.shape)}")
    direct = out.dtype in _CPU_OUT_DTYPES and (out.stride(-1) == 1 or s_dim == 1) and \
        torch._debug_has_internal_overlap(out) != 1                     # not an expanded tensor
    target = out if direct else torch.empty(out.shape, dtype=cdtype, device=out.device)
    torch.ops.itm_kernels.local_sim_cpu_(target, images.contiguous(), captions.contiguous(),
                                         cap_lens.to(torch.long).contiguous(),
                                         weight.to(_mm_dtype(images.dtype)).contiguous(),
                                         bias.to(cdtype).contiguous(), gram.contiguous(), float(lambda_softmax),
                                         int(max_tile_bytes or 0))
    if not direct:
        out.copy_(target)
    return out
