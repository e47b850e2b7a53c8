"""``xattn_sim``: the all-pairs SCAN cross-attention similarity, dispatched to a backend.

This package is the one home of the op: the public :func:`xattn_sim` and its ``torch.library`` registration
(forward and backward ops with fake (meta) implementations and autograd, so that ``torch.compile(fullgraph=True)``
traces through them and ``opcheck`` can test them) live here; the backends are the submodules ``reference`` (the
spec), ``torch``, ``cpu``, ``cuda`` and ``triton`` (compiled kernels: csrc/xattn_sim/).

Import note: this package has submodules named ``torch`` and ``triton``. Python 3 imports are absolute, so
``import torch`` in any module still means PyTorch; but importing the submodule binds the package attribute
``torch``, which is why this file never uses a global named ``torch`` (it imports PyTorch as ``_torch``).
"""
from __future__ import annotations

import torch as _torch
from torch import Tensor

from .._common.constants import BACKENDS
from .._common.dispatch import choose_backend
from .._common.dtypes import compute_dtype, out_dtype
from .._common.precision import PRECISIONS, resolve_precision
from .._common.validation import check_op_grad, check_xattn_args, check_xattn_op_args
from . import reference
from . import torch as torch_backend

__all__ = ["xattn_sim", "xattn_sim_op", "xattn_sim_backward_op", "run_forward"]


def xattn_sim(images: Tensor, captions: Tensor, cap_lens, *, img_lens=None, direction: str = "t2i",
              norm: str = "clipped_l2norm", lambda_softmax: float = 9.0, agg: str = "lse", lambda_lse: float = 6.0,
              backend: str = "auto", max_tile_bytes: int | None = None, attention: str = "soft",
              precision: str | None = None) -> Tensor:
    """All-pairs SCAN cross-attention similarity between every image and every caption.

    Args:
        images: (N_img, K, d) region features, float32, float64, bfloat16 or float16.
        captions: (N_cap, L_max, d) word features, same dtype and device, right-padded (padding never read).
        cap_lens: (N_cap,) integer caption lengths in 1..L_max (tensor, list or array).
        img_lens: optional (N_img,) integer region counts in 1..K; default all K regions.
        direction: "t2i" (words attend to regions, aggregate over words) or "i2t" (regions attend to words,
            aggregate over regions).
        norm: the official ``raw_feature_norm``: "softmax", "l2norm", "clipped_l2norm", "l1norm",
            "clipped_l1norm", "clipped" or "no_norm"; applied to the region-word scores along the query axis.
        lambda_softmax: attention temperature lambda1 (>= 0). lambda_lse: LogSumExp temperature lambda2 (> 0
            when agg="lse").
        agg: aggregation of the per-query cosines: "lse", "mean", "max" or "sum".
        backend: "auto" (``itm_kernels._common.dispatch.choose_backend``: on GPU cuda > triton > torch, a GPU
            kernel only once verified for the device's compute capability; cpu > torch on CPU), "cpu", "triton",
            "cuda", "torch" or "reference".
        max_tile_bytes: cap on the scratch of one tile (default: the backend's own, tens of MiB).
        attention: "soft" (SCAN's attention, the default) or "hard": each query item's best context item by
            cosine (ColBERT MaxSim / CHAN), then ``agg``; ``norm`` and ``lambda_softmax`` are unused. Hard runs one
            tiled GEMM + masked-max implementation on every backend (``itm_kernels.xattn_sim.hard``; reference:
            ``reference.hard_all_pairs``), differentiable through per-tile recomputation; it is not a registered
            ``custom_op`` (no ``opcheck`` / ``fullgraph`` compile guarantee yet).
        precision: float32 products of the "triton" backend: "ieee" (exact float32, the goldens' setting), "tf32"
            or "tf32x3" (tensor cores); None follows ``torch.backends.cuda.matmul.allow_tf32`` ("ieee" unless it
            is on). Other backends and dtypes ignore it (bf16/fp16 tiles always use tensor cores on "triton").

    Returns:
        (N_img, N_cap) similarities; float64 for float64 inputs, float32 otherwise (bfloat16/float16 inputs are
        multiplied exactly and accumulated in float32). Row i, column c is SCAN's score of image i and caption c,
        exactly as the official ``xattn_score_t2i``/``xattn_score_i2t`` compute it, every eps included.

    Autograd: differentiable w.r.t. ``images`` and ``captions`` on every backend. The backward recomputes the
    forward tile by tile and saves only the inputs, never the attention: after a "triton" forward the fused Triton
    backward (``itm_kernels.xattn_sim.triton.xattn_sim_backward``), otherwise the tiled PyTorch one
    (``itm_kernels.xattn_sim.torch.xattn_sim_backward``).

    Memory: the output plus a per-tile scratch bounded by ``max_tile_bytes`` (per thread on the CPU backend);
    nothing of size N_img x N_cap x K x L or N_img x N_cap x L x d is ever allocated ("reference" excepted: it is
    the readable spec and materialises everything).
    """
    (images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse, backend) = \
        check_xattn_args(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                         backend)
    if max_tile_bytes is not None and (not isinstance(max_tile_bytes, int) or max_tile_bytes <= 0):
        raise ValueError(f"max_tile_bytes must be a positive int, got {max_tile_bytes!r}")
    if attention not in ("soft", "hard"):
        raise ValueError(f"attention must be one of ('soft', 'hard'), got {attention!r}")
    precision = resolve_precision(precision)
    name = choose_backend(backend, images.device, op="xattn_sim", inputs=(images, captions))
    if attention == "hard":
        if name == "reference":
            return reference.xattn_sim(images, captions, cap_lens, img_lens=img_lens, direction=direction, agg=agg,
                                       lambda_lse=lambda_lse, compute_dtype=compute_dtype(images.dtype),
                                       attention="hard")
        from .hard import xattn_sim_hard
        return xattn_sim_hard(images, captions, cap_lens, img_lens, direction=direction, agg=agg,
                              lambda_lse=lambda_lse, max_tile_bytes=max_tile_bytes)
    return xattn_sim_op(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                        name, max_tile_bytes or 0, precision)


# --------------------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------------------

def run_forward(backend: str, images, captions, cap_lens, img_lens, opts: dict, max_tile_bytes,
                precision: str = "ieee"):
    """Run one backend's forward on validated inputs (no autograd)."""
    if backend == "reference":
        return reference.xattn_sim(images, captions, cap_lens, img_lens=img_lens,
                                   compute_dtype=compute_dtype(images.dtype), **opts)
    if backend == "torch":
        return torch_backend.xattn_sim(images, captions, cap_lens, img_lens, max_tile_bytes=max_tile_bytes, **opts)
    if backend == "cpu":
        from . import cpu as cpu_backend
        return cpu_backend.xattn_sim(images, captions, cap_lens, img_lens, max_tile_bytes=max_tile_bytes, **opts)
    if backend == "triton":
        from . import triton as triton_backend
        return triton_backend.xattn_sim(images, captions, cap_lens, img_lens, precision=precision, **opts)
    if backend == "cuda":
        from . import cuda as cuda_backend
        return cuda_backend.xattn_sim(images, captions, cap_lens, img_lens, **opts)
    raise ValueError(f"unknown backend {backend!r}")


@_torch.library.custom_op("itm_kernels::xattn_sim", mutates_args=())
def xattn_sim_op(images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor, direction: str, norm: str,
                 lambda_softmax: float, agg: str, lambda_lse: float, backend: str, max_tile_bytes: int,
                 precision: str = "ieee") -> Tensor:
    """Registered forward: (N_img, K, d), (N_cap, L_max, d), (N_cap,), (N_img,) -> (N_img, N_cap).

    Checks its own arguments (``check_xattn_op_args``: shapes, dtypes, devices, length values, options), so that a
    direct call or a compiled graph (where the public function's value checks are traced away) never returns
    garbage."""
    check_xattn_op_args("itm_kernels::xattn_sim", images, captions, cap_lens, img_lens, direction, norm,
                        lambda_softmax, agg, lambda_lse, max_tile_bytes)
    _check_backend_precision(backend, precision)
    opts = dict(direction=direction, norm=norm, lambda_softmax=lambda_softmax, agg=agg, lambda_lse=lambda_lse)
    out = run_forward(backend, images, captions, cap_lens, img_lens, opts, max_tile_bytes or None, precision)
    return out.to(out_dtype(images.dtype)).contiguous()


@xattn_sim_op.register_fake
def _xattn_sim_fake(images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse, backend,
                    max_tile_bytes, precision="ieee"):
    check_xattn_op_args("itm_kernels::xattn_sim", images, captions, cap_lens, img_lens, direction, norm,
                        lambda_softmax, agg, lambda_lse, max_tile_bytes)
    return images.new_empty((images.shape[0], captions.shape[0]), dtype=out_dtype(images.dtype))


@_torch.library.custom_op("itm_kernels::xattn_sim_backward", mutates_args=())
def xattn_sim_backward_op(grad: Tensor, images: Tensor, captions: Tensor, cap_lens: Tensor, img_lens: Tensor,
                          direction: str, norm: str, lambda_softmax: float, agg: str, lambda_lse: float,
                          max_tile_bytes: int, backend: str = "torch", precision: str = "ieee"
                          ) -> tuple[Tensor, Tensor]:
    """Registered backward: grad (N_img, N_cap) -> (grad_images (N_img, K, d), grad_captions (N_cap, L_max, d)).

    ``backend``: the forward's; "triton" runs the fused Triton backward (``triton.xattn_sim_backward``), every
    other backend the tiled PyTorch one."""
    _check_backward_args(grad, images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg,
                         lambda_lse, max_tile_bytes, backend, precision)
    if backend == "triton":
        from . import triton as triton_backend
        return triton_backend.xattn_sim_backward(grad, images, captions, cap_lens, img_lens, direction=direction,
                                                 norm=norm, lambda_softmax=lambda_softmax, agg=agg,
                                                 lambda_lse=lambda_lse, precision=precision)
    return torch_backend.xattn_sim_backward(grad, images, captions, cap_lens, img_lens, direction=direction,
                                            norm=norm, lambda_softmax=lambda_softmax, agg=agg,
                                            lambda_lse=lambda_lse, max_tile_bytes=max_tile_bytes or None)


@xattn_sim_backward_op.register_fake
def _xattn_sim_backward_fake(grad, images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg,
                             lambda_lse, max_tile_bytes, backend="torch", precision="ieee"):
    _check_backward_args(grad, images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg,
                         lambda_lse, max_tile_bytes, backend, precision)
    return _torch.empty_like(images), _torch.empty_like(captions)


def _check_backend_precision(backend, precision):
    if backend not in BACKENDS or backend == "auto":
        raise ValueError(f"itm_kernels::xattn_sim: backend must be a resolved backend {BACKENDS[1:]}, got {backend!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"itm_kernels::xattn_sim: precision must be one of {PRECISIONS}, got {precision!r}")


def _check_backward_args(grad, images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg,
                         lambda_lse, max_tile_bytes, backend, precision):
    op = "itm_kernels::xattn_sim_backward"
    check_xattn_op_args(op, images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse,
                        max_tile_bytes)
    check_op_grad(op, "grad", grad, (images.shape[0], captions.shape[0]), images.device)
    _check_backend_precision(backend, precision)


def _setup_context(ctx, inputs, output):
    (images, captions, cap_lens, img_lens, direction, norm, lambda_softmax, agg, lambda_lse, backend, max_tile_bytes,
     precision) = inputs
    ctx.save_for_backward(images, captions, cap_lens, img_lens)
    ctx.opts = (direction, norm, lambda_softmax, agg, lambda_lse, max_tile_bytes, backend, precision)


def _backward(ctx, grad):
    images, captions, cap_lens, img_lens = ctx.saved_tensors
    grad_images, grad_captions = xattn_sim_backward_op(grad, images, captions, cap_lens, img_lens, *ctx.opts)
    need_img, need_cap = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    return (grad_images if need_img else None, grad_captions if need_cap else None,
            None, None, None, None, None, None, None, None, None, None)


xattn_sim_op.register_autograd(_backward, setup_context=_setup_context)
