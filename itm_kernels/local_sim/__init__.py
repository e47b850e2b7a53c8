"""``local_sim``: SGRAF's local similarity vectors for a block of (image, caption) pairs, fused.

For every image i, caption c and word t < cap_len[c] (``shared/reference/SEMANTICS.md``, SGRAF; official
``SCAN_attention`` + ``sim_tranloc_w`` in Paranioar/SGRAF ``model.py``)::

    s_kt   = v_k . e_t                                   scores, regions k = 1..K, words of the caption only
    n_kt   = l2norm_t(LeakyReLU_0.1(s_kt))               over the caption's words, eps 1e-8 on the norm
    alpha_t = softmax_k(lambda_softmax * n_kt)           over the regions (lambda 9 in SGRAF)
    a_t    = sum_k alpha_tk v_k,  a^_t = a_t / (|a_t| + 1e-8)
    y_t    = W (a^_t - e_t)^2 + b                        element-wise square, W (s, d), b (s,)
    out_t  = y_t / (|y_t| + 1e-8)

Rows t >= cap_len[c] of the (N_img, N_cap, L_max, s) result are zero.

How the chunked torch implementation avoids the (pairs x L x d) tensor: the attended vectors exist one tile of
(images x packed words of a caption range) at a time, in one reused scratch buffer of at most ``max_tile_bytes``.
Per tile: the scores are one GEMM (images*K x d) @ (d x words); the normalisations and the softmax run on the small
(images, K, words) tensor; |a_t|^2 = alpha_t^T G alpha_t with the per-image Gram matrix G = V V^T, so 1/(|a|+eps)
is folded into alpha and one batched GEMM writes a^ - e straight into the scratch (e enters as the GEMM's
accumulator); words where that quadratic form cancels in float32 (``itm_kernels._common.gram_guard``: the
attended vector nearly vanishes) take a^ from the explicit a in float64 instead (torch and cpu backends; the Triton
kernel has no such guard yet); one in-place pass squares it and one GEMM with W^T (+ b) contracts d away. (The expansion
W(a^2) - 2 W(a*e) + W(e^2) saves nothing: a^2 and a*e still need a^ in d-space, and two contractions cost twice
one.) Per pair and word the FLOPs are the
official ones: 4 K d for the scores and the attended vector, 2 d s for the projection, which dominates (s = 256).

The compiled CPU kernel (backend "cpu", :func:`local_sim_cpu`, ``csrc/local_sim/cpu.cpp``) runs the same
algebra fused per work item (a caption block of <= 256 packed words x a range of images; items spread over the
threads): per group of 4 images one score GEMM, then per image the K-sized epilogue (LeakyReLU, per-caption l2
norm, softmax, |a|^2 by the Gram matrix) in SIMD C++ on the (K x words) tile, and over feature chunks of 256:
A = P V (P = alpha / (|a| + eps)) into float scratch, (A - e)^2 in the GEMM input dtype, Y += that W^T; then bias,
the row l2norm and the store into the output rows (any strides, cast once). Its GEMMs are oneDNN's brgemm
(float32; bfloat16 with VNNI-packed operands and float32 accumulation), single-threaded per item; float64 uses
at::mm; float16 runs on "torch". Its memory: the output, the Gram matrices, W^T packed once per call (d x s) and per
thread one scratch of at most ``max_tile_bytes`` (default 2 MiB; 1.4 MiB in bfloat16 at d = 1024, s = 256).
Measured on one Zen 5 core (60 x 300 pairs, ``benchmarks/bench_local_sim.py``): bfloat16 0.87 of the bare
bfloat16 GEMM rate (1.5x "torch"), float32 2.5x "torch".

GPU kernels: "triton" (``itm_kernels/local_sim/triton.py``: one program per (image, caption, word block), the
per-image Gram matrix computed once, a^ formed per feature chunk and contracted with W at once; tensor-core tile
products (bf16/fp16 natively, float32 per ``precision=``), autotuned on a GPU, no host sync, t2i and i2t) and
"cuda" (``csrc/local_sim/kernel.cuh``: one thread block per pair, K <= 64, L_max <= 128, s <= 1024). Neither has
run on a GPU yet (they are compiled for sm_80/sm_90 and tested under the Triton interpreter and a host emulation
of the CUDA block code), so "auto" never picks them (``itm_kernels._common.dispatch``: the verified table is
empty): on CUDA tensors it runs "torch".

The backward saves only the inputs and recomputes each tile: after a "triton" forward the fused Triton backward
(:func:`itm_kernels.local_sim.triton.local_sim_backward_triton`) where its shapes allow, otherwise the analytic
tiled torch one (:func:`local_sim_backward_torch`), for every other backend.

This package is the one home of the op: the public :func:`local_sim` and its ``torch.library`` registration live
here; the backends are the submodules ``reference`` (the spec), ``torch`` (chunked forward, and the backward of
every backend), ``cpu``, ``cuda`` and ``triton``. Every name the former module ``itm_kernels/local_sim/`` had is
re-exported here. This file never uses a global named ``torch`` (PyTorch is ``_torch``): importing the submodule
``.torch`` binds that package attribute.
"""
from __future__ import annotations

import torch as _torch
from torch import Tensor

from .._common import dispatch
from .._common.constants import BACKENDS, EPS, LEAKY_SLOPE  # noqa: F401
from .._common.dispatch import choose_backend
from .._common.dtypes import compute_dtype, out_dtype
from .._common.precision import resolve_precision
from .._common.dtypes import out_dtype as _out_dtype  # noqa: F401
from .._common.validation import (check_choice, check_feature_pair, check_lambda, check_lengths, check_op_features,
                                  check_op_grad, check_op_lengths, check_tile_bytes)
from .cpu import _CPU_OUT_DTYPES, _have_cpu_kernel, local_sim_cpu  # noqa: F401
from .cuda import CUDA_MAX_K, CUDA_MAX_L, CUDA_MAX_S, _check_cuda_backend, local_sim_cuda  # noqa: F401
from .i2t import local_sim_i2t, local_sim_i2t_reference
from .reference import DEFAULT_LAMBDA_SOFTMAX, local_sim_reference
from .torch import (DEFAULT_TILE_BYTES, LOW_PRECISION_ROW_BUCKET, _caption_ranges, _gram, _mm_dtype,  # noqa: F401
                    _packed_words, _plan, _Tile, local_sim_backward_torch, local_sim_gram, local_sim_torch)

# --------------------------------------------------------------------------------------------------------------
# torch.library registration: forward, backward, fake implementations, autograd
# --------------------------------------------------------------------------------------------------------------

def _check_op_args(op, images, captions, cap_lens, weight, bias, lambda_softmax, max_tile_bytes, backend=None,
                   direction="t2i"):
    """The checks the registered ops run on their own arguments (direct calls, compiled graphs): metadata, the
    length values (on the host for CPU tensors, ``torch._assert_async`` on a GPU) and the options."""
    check_op_features(op, images=images, captions=captions)
    check_op_lengths(op, "cap_lens", cap_lens, captions.shape[0], captions.shape[1], images.device)
    _check_weight_bias(weight, bias, images, op)
    check_lambda("lambda_softmax", lambda_softmax, dtype=images.dtype)
    check_tile_bytes(op, max_tile_bytes)
    if backend is not None and (backend not in BACKENDS or backend == "auto"):
        raise ValueError(f"{op}: backend must be a resolved backend {BACKENDS[1:]}, got {backend!r}")
    check_choice("direction", direction, ("t2i", "i2t"))


def _check_weight_bias(weight, bias, images, where="local_sim"):
    for name, t, dims in (("weight", weight, 2), ("bias", bias, 1)):
        if not isinstance(t, Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{where}: {name} must be a floating-point torch.Tensor, got {type(t).__name__}")
        if t.dim() != dims or t.device != images.device:
            raise ValueError(f"{where}: {name} must be {dims}-D on {images.device}, got shape {tuple(t.shape)} on "
                             f"{t.device}")
    if weight.shape[1] != images.shape[2] or bias.shape[0] != weight.shape[0] or weight.shape[0] < 1:
        raise ValueError(f"{where}: weight must be (s, d={images.shape[2]}) with s >= 1 and bias (s,), got "
                         f"{tuple(weight.shape)} and {tuple(bias.shape)}")


@_torch.library.custom_op("itm_kernels::local_sim", mutates_args=())
def local_sim_op(images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor, bias: Tensor,
                 lambda_softmax: float, backend: str, max_tile_bytes: int, direction: str = "t2i",
                 precision: str = "ieee") -> Tensor:
    """Registered forward: (N_img, K, d), (N_cap, L, d), (N_cap,), (s, d), (s,) -> (N_img, N_cap, L, s).

    ``direction`` "i2t" (result (N_img, N_cap, K, s)) is taken by the "triton" backend only (one kernel with the
    roles swapped); the public function delegates i2t to t2i calls on the other backends. ``precision``: the
    float32 tl.dot precision of "triton" (``itm_kernels._common.precision``), ignored by the other backends."""
    _check_op_args("itm_kernels::local_sim", images, captions, cap_lens, weight, bias, lambda_softmax,
                   max_tile_bytes, backend, direction)
    if direction != "t2i" and backend != "triton":
        raise ValueError(f"local_sim_op takes direction={direction!r} with backend 'triton' only")
    if backend == "reference":
        out = local_sim_reference(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                                  compute_dtype=compute_dtype(images.dtype))
    elif backend == "cpu":
        out = local_sim_cpu(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                            max_tile_bytes=max_tile_bytes or None)
    elif backend == "cuda":
        out = local_sim_cuda(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax)
    elif backend == "triton":
        from .triton import local_sim_triton

        out = local_sim_triton(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                               direction=direction, precision=precision)
    else:
        out = local_sim_torch(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                              max_tile_bytes=max_tile_bytes or None)
    return out.to(out_dtype(images.dtype)).contiguous()


@local_sim_op.register_fake
def _local_sim_fake(images, captions, cap_lens, weight, bias, lambda_softmax, backend, max_tile_bytes,
                    direction="t2i", precision="ieee"):
    _check_op_args("itm_kernels::local_sim", images, captions, cap_lens, weight, bias, lambda_softmax,
                   max_tile_bytes, backend, direction)
    rows = captions.shape[1] if direction == "t2i" else images.shape[1]
    return images.new_empty((images.shape[0], captions.shape[0], rows, weight.shape[0]),
                            dtype=out_dtype(images.dtype))


@_torch.library.custom_op("itm_kernels::local_sim_backward", mutates_args=())
def local_sim_backward_op(grad: Tensor, images: Tensor, captions: Tensor, cap_lens: Tensor, weight: Tensor,
                          bias: Tensor, lambda_softmax: float, max_tile_bytes: int, backend: str = "torch",
                          direction: str = "t2i", precision: str = "ieee"
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Registered backward: grad (N_img, N_cap, L, s) -> grads of (images, captions, weight, bias).

    ``backend``: the forward's; after a "triton" forward the fused Triton backward
    (``triton.local_sim_backward_triton``) runs when its shapes allow (``triton.bwd_supported``; always for
    i2t, which the public function routes here only then), every other case the tiled torch one."""
    _check_backward_args(grad, images, captions, cap_lens, weight, bias, lambda_softmax, max_tile_bytes, direction)
    if backend == "triton":
        from . import triton as triton_backend

        if direction == "i2t" or triton_backend.bwd_supported(images, captions, weight, direction):
            return triton_backend.local_sim_backward_triton(grad, images, captions, cap_lens, weight, bias,
                                                            lambda_softmax=lambda_softmax, direction=direction,
                                                            precision=precision)
    return local_sim_backward_torch(grad, images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                                    max_tile_bytes=max_tile_bytes or None)


def _check_backward_args(grad, images, captions, cap_lens, weight, bias, lambda_softmax, max_tile_bytes,
                         direction="t2i"):
    op = "itm_kernels::local_sim_backward"
    _check_op_args(op, images, captions, cap_lens, weight, bias, lambda_softmax, max_tile_bytes, direction=direction)
    rows = captions.shape[1] if direction == "t2i" else images.shape[1]
    check_op_grad(op, "grad", grad, (images.shape[0], captions.shape[0], rows, weight.shape[0]), images.device)


@local_sim_backward_op.register_fake
def _local_sim_backward_fake(grad, images, captions, cap_lens, weight, bias, lambda_softmax, max_tile_bytes,
                             backend="torch", direction="t2i", precision="ieee"):
    _check_backward_args(grad, images, captions, cap_lens, weight, bias, lambda_softmax, max_tile_bytes, direction)
    return (_torch.empty_like(images), _torch.empty_like(captions), _torch.empty_like(weight),
            _torch.empty_like(bias))


def _setup_context(ctx, inputs, output):
    images, captions, cap_lens, weight, bias, lambda_softmax, backend, max_tile_bytes, direction, precision = inputs
    ctx.save_for_backward(images, captions, cap_lens, weight, bias)
    ctx.opts = (lambda_softmax, max_tile_bytes, backend, direction, precision)


def _backward(ctx, grad):
    images, captions, cap_lens, weight, bias = ctx.saved_tensors
    grads = local_sim_backward_op(grad.contiguous(), images, captions, cap_lens, weight, bias, *ctx.opts)
    needs = ctx.needs_input_grad
    return (grads[0] if needs[0] else None, grads[1] if needs[1] else None, None,
            grads[2] if needs[3] else None, grads[3] if needs[4] else None, None, None, None, None, None)


local_sim_op.register_autograd(_backward, setup_context=_setup_context)


DIRECTIONS = ("t2i", "i2t")

# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------

def _check_triton_backend(images: Tensor) -> None:
    if "triton" not in dispatch.available_backends(images.device):
        raise ValueError(f"backend 'triton' is not available for {images.device.type} tensors here: it needs triton "
                         "and a CUDA device, or TRITON_INTERPRET=1 (set before triton is first imported) for CPU "
                         "tensors")
    if images.dtype == _torch.float64:
        raise ValueError("backend 'triton' does not take float64 inputs; the 'torch' backend handles float64")


def local_sim(images: Tensor, captions: Tensor, cap_lens, weight: Tensor, bias: Tensor, *,
              lambda_softmax: float = DEFAULT_LAMBDA_SOFTMAX, backend: str = "auto",
              max_tile_bytes: int | None = None, direction: str = "t2i", precision: str | None = None) -> Tensor:
    """SGRAF local similarity vectors of every (image, caption) pair of a block, every word.

    Args:
        images: (N_img, K, d) region features (SGRAF: l2-normalised, K = 36), float32, float64, bfloat16 or
            float16.
        captions: (N_cap, L_max, d) word features, same dtype and device, right-padded (padding never read).
        cap_lens: (N_cap,) integer lengths in 1..L_max (tensor, list or array).
        weight: (s, d) and bias: (s,): ``sim_tranloc_w`` (any float dtype; cast to the matmul dtype).
        lambda_softmax: the attention temperature (SGRAF: 9).
        backend: "auto" ("cpu" for CPU tensors when the extension is built, else "torch"), "cpu" (the fused C++
            kernel; float16 features run on "torch"), "cuda" (fused CUDA kernel: K <= 64, L_max <= 128,
            s <= 1024), "triton" (fused Triton kernel; no float64), "torch" (chunked torch ops, bounded memory) or
            "reference" (the readable spec). "cuda" and "triton" are compiled and interpreter-tested but have not
            run on a GPU; "auto" never picks them.
        max_tile_bytes: cap on the scratch: "torch": the one tile of attended vectors (default 8 MiB); "cpu": each
            thread's work item (default 2 MiB).
        direction: "t2i" (default: every word attends over the regions, as above) or "i2t" (every region attends
            over the caption's words; result (N_img, N_cap, K, s), see :mod:`itm_kernels.local_sim.i2t`: the same
            t2i kernels of the chosen backend, exactly, one call per distinct caption length; "triton" runs its
            one kernel with the roles swapped instead, when L_max <= 128 and its fused backward takes the shapes).
        precision: float32 products of the "triton" backend: "ieee" (exact float32, the default unless
            ``torch.backends.cuda.matmul.allow_tf32`` is on), "tf32" or "tf32x3" (tensor cores); other backends
            and dtypes ignore it (bf16/fp16 products always run on tensor cores on "triton").

    Returns:
        (N_img, N_cap, L_max, s): row [i, c, t] = l2norm(W (a^_t - e_t)^2 + b) for the pair (image i, caption c)
        and word t < cap_lens[c], zero beyond; float64 for float64 inputs, float32 otherwise. With bfloat16/float16
        inputs the three matrix products multiply in that dtype (as under autocast; "torch" also rounds their
        results to it, "cpu" accumulates and keeps them in float32) and every normalisation, the softmax and the
        output are float32.

    Autograd: differentiable w.r.t. images, captions, weight and bias, saving only the inputs: after a "triton"
    forward the fused Triton backward (``triton.local_sim_backward_triton``: recomputes each pair's tiles, float32
    accumulation, dW/db from per-image partials, N_img x s x d float32) where its shapes allow
    (``triton.bwd_supported``), otherwise the analytic tiled torch backward (float32, float64 for float64 inputs).

    Memory: the output (N_img N_cap L_max s values; call it on blocks of pairs), the per-image Gram matrices
    (N_img K K) and scratch of at most ``max_tile_bytes`` ("torch": one; "cpu": one per thread, plus W^T packed
    once, d s values): the (pairs x L x d) attended vectors never exist all at once ("reference" excepted).
    "triton": the output, the Gram tiles and index tensors (no scratch); its fused backward adds the float32
    feature gradients and N_img x s x d float32 dW partials (N_cap x s x d for i2t).
    """
    check_feature_pair(images, captions)
    _check_weight_bias(weight, bias, images)
    cap_lens = check_lengths("cap_lens", cap_lens, captions.shape[0], captions.shape[1], images.device)
    lambda_softmax = check_lambda("lambda_softmax", lambda_softmax, dtype=images.dtype)
    check_choice("backend", backend, BACKENDS)
    if max_tile_bytes is not None and (isinstance(max_tile_bytes, bool) or not isinstance(max_tile_bytes, int)
                                       or max_tile_bytes <= 0):
        raise ValueError(f"max_tile_bytes must be a positive int, got {max_tile_bytes!r}")
    if backend == "cpu" and (images.device.type != "cpu" or not _have_cpu_kernel()):
        raise ValueError("backend 'cpu' needs CPU tensors and the compiled extension (itm_kernels._C)")
    if backend == "cuda":
        _check_cuda_backend(images, captions, weight)
    if backend == "triton":
        _check_triton_backend(images)
    check_choice("direction", direction, DIRECTIONS)
    precision = resolve_precision(precision)
    if direction == "i2t" and backend == "triton" and _triton_i2t_fused(images, captions, weight):
        return local_sim_op(images.contiguous(), captions.contiguous(), cap_lens, weight.contiguous(),
                            bias.contiguous(), lambda_softmax, "triton", max_tile_bytes or 0, "i2t", precision)
    if direction == "i2t":
        if backend == "reference":
            return local_sim_i2t_reference(images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                                           compute_dtype=compute_dtype(images.dtype)).to(out_dtype(images.dtype))
        return local_sim_i2t(local_sim, images, captions, cap_lens, weight, bias, lambda_softmax=lambda_softmax,
                             backend=backend, max_tile_bytes=max_tile_bytes, precision=precision)
    name = choose_backend(backend, images.device, op="local_sim", inputs=(images, captions, weight))
    return local_sim_op(images.contiguous(), captions.contiguous(), cap_lens, weight.contiguous(),
                        bias.contiguous(), lambda_softmax, name, max_tile_bytes or 0, "t2i", precision)


def _triton_i2t_fused(images: Tensor, captions: Tensor, weight: Tensor) -> bool:
    """Whether i2t on "triton" runs as one swapped-roles kernel (forward and fused backward take the shapes)
    rather than by caption-length delegation to t2i calls."""
    from . import triton as triton_backend

    return triton_backend.supports(images, captions) and captions.shape[1] <= triton_backend.MAX_K and \
        triton_backend.bwd_supported(images, captions, weight, "i2t")
