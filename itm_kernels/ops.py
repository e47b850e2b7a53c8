"""``torch.library`` registration of xattn_sim: forward and backward ops with fake (meta) implementations and
autograd, so that ``torch.compile(fullgraph=True)`` traces through them and ``opcheck`` can test them."""
from __future__ import annotations

import torch
from torch import Tensor

from . import reference, torch_backend


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def run_forward(backend: str, images, captions, cap_lens, img_lens, opts: dict, max_tile_bytes):
    """Run one backend's forward on validated inputs (no autograd)."""
    if backend == "reference":
        return reference.xattn_sim(images, captions, cap_lens, img_lens=img_lens,
                                   compute_dtype=torch_backend.compute_dtype_for(images.dtype), **opts)
    if backend == "torch":
        return torch_backend.xattn_sim(images, captions, cap_lens, img_lens, max_tile_bytes=max_tile_bytes, **opts)
    if backend == "cpu":
        from . import cpu_backend
        return cpu_backend.xattn_sim(images, captions, cap_lens, img_lens, max_tile_bytes=max_tile_bytes, **opts)
    if backend == "triton":
        from . import triton_xattn
        return triton_xattn.xattn_sim(images, captions, cap_lens, img_lens, **opts)
    if backend == "cuda":
        from . import cuda_backend
        return cuda_backend.xattn_sim(images, captions, cap_lens, img_lens, **opts)
    raise ValueError(f"unknown backend {backend!r}")


@torch.library.custom_op("itm_kernels::xattn_sim", mutates_args=())
def xattn_sim_op(images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor, direction: str, norm: str,
                 lambda_softmax: float, agg: str, lambda_lse: float, backend: str, max_tile_bytes: int) -> Tensor:
    """Registered forward: (N_img, K, d), (N_cap, L_max, d), (N_cap,), (N_img,) -> (N_img, N_cap)."""
    opts = dict(direction=direction, norm=norm, lambda_softmax=lambda_softmax, agg=agg, lambda_lse=lambda_lse)
    out = run_forward(backend, images, captions, cap_lens, img_lens, opts, max_tile_bytes or None)
    return out.to(_out_dtype(images.dtype)).contiguous()


@xattn_sim_op.register_fake
def _xattn_sim_fake(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse, backend,
                    max_tile_bytes):
    return images.new_empty((images.shape[0], captions.shape[0]), dtype=_out_dtype(images.dtype))


@torch.library.custom_op("itm_kernels::xattn_sim_backward", mutates_args=())
def xattn_sim_backward_op(grad: Tensor, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor,
                          direction: str, norm: str, lambda_softmax: float, agg: str, lambda_lse: float,
                          max_tile_bytes: int) -> tuple[Tensor, Tensor]:
    """Registered backward: grad (N_img, N_cap) -> (grad_images (N_img, K, d), grad_captions (N_cap, L_max, d))."""
    return torch_backend.xattn_sim_backward(grad, images, captions, cap_lens, img_lens, direction=direction,
                                            norm=norm, lambda_softmax=lambda_softmax, agg=agg,
                                            lambda_lse=lambda_lse, max_tile_bytes=max_tile_bytes or None)


@xattn_sim_backward_op.register_fake
def _xattn_sim_backward_fake(grad, images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg,
                             lambda_lse, max_tile_bytes):
    return torch.empty_like(images), torch.empty_like(captions)


def _setup_context(ctx, inputs, output):
    images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse, _, max_tile_bytes = inputs
    ctx.save_for_backward(images, captions, cap_lens, img_lens)
    ctx.opts = (direction, norm, lambda_softmax, agg, lambda_lse, max_tile_bytes)


def _backward(ctx, grad):
    images, captions, cap_lens, img_lens = ctx.saved_tensors
    grad_images, grad_captions = xattn_sim_backward_op(grad, images, captions, cap_lens, img_lens, *ctx.opts)
    need_img, need_cap = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (grad_images if need_img else None, grad_captions if need_cap else None,
            None, None, None, None, None, None, None, None, None)


xattn_sim_op.register_autograd(_backward, setup_context=_setup_context)
