"""``node_match``: GSMN's node-level matching vectors for a block of (image, caption) pairs, fused.

For every image i (regions v_k, k < K), caption c (words e_t, t < cap_len[c]) and block b of the feature axis
(``num_blocks`` equal slices of d; official GSMN: 16 blocks of 64), following ``shared/reference/SEMANTICS.md``
(GSMN) and the official ``VisualGraph`` / ``TextualGraph.node_level_matching``::

    s_kt        = v_k . e_t                                    one score tile, shared by both directions
    h_kt        = LeakyReLU_0.1(s_kt)
    regions query the words (visual graph):
        alpha_kt = softmax_t(lambda * h_kt / (|h_.t|_k + 1e-8))       l2 over the regions, softmax over the words
        region_match[i, c, k, b] = cos_b(v_k, sum_t alpha_kt e_t)
    words query the regions (textual graph):
        beta_tk  = softmax_k(lambda * h_kt / (|h_k.|_t + 1e-8))       l2 over the words, softmax over the regions
        word_match[i, c, t, b]   = cos_b(e_t, sum_k beta_tk v_k)
    cos_b(x, y) = x_b . y_b / max(|x_b| |y_b|, 1e-8)                  x_b: the b-th slice of d

How the attended contexts are avoided: with per-block scores s^b_kt = v_k,b . e_t,b (the 16 partial sums of the
score GEMM, so no extra FLOPs), the numerator of cos_b is sum_t alpha_kt s^b_kt, and |sum_t alpha_kt e_t,b|^2 =
alpha_k^T G^b alpha_k with the caption's per-block Gram matrix G^b = E_b E_b^T (L x L; the image's K x K Gram
for the other direction). Everything per pair is K x L x 16-sized; nothing d-sized exists per pair. Where that
quadratic form cancels in float32 (``itm_kernels._common.gram_guard``: the block context nearly vanishes), the
"torch" and "cpu" backends recompute the block cosine from the explicit block context in float64.

Tiles: captions are visited in length order and padded only to the longest of their tile; one tile holds a few
images x a few captions, sized so that its K x L x 16 tensors stay under ``max_tile_bytes``.

Backends: "cpu" is one fused C++ kernel per caption range (``csrc/node_match/cpu.cpp``): per pair, the block
scores as a register-tiled product with the 16 blocks as the lanes of one SIMD vector, then both attentions and
the Gram-form cosines in cache (16 blocks of >= 16 features; other shapes run on "torch"); "triton"
(``itm_kernels/node_match/triton.py``, GPU, or CPU tensors under ``TRITON_INTERPRET=1``) and "cuda"
(``csrc/node_match/kernel.cuh``: one thread block per pair, K <= 64, L <= 128) form the contexts on chip
("triton": tl.dot products, ``precision=`` for float32, autotuned, no host sync; neither GPU kernel has run on a
GPU, so "auto" never picks them);
"torch" runs the Gram-form algebra as torch ops on whole tiles; "reference" is the spec.

Autograd: a registered backward op (``itm_kernels::node_match_backward``) recomputes each tile under
``torch.func.vjp`` (checkpointing per tile), so it needs the memory of one tile's forward graph, never the
(pairs x K x L) tensors of the whole block.

This package is the one home of the op: the public :func:`node_match` and its ``torch.library`` registration live
here; the backends are the submodules ``reference`` (the spec), ``torch`` (tiled forward, and the backward of every
backend), ``cpu``, ``cuda`` and ``triton``. Every name the former module ``itm_kernels/node_match/`` had is
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
from .cpu import CPU_NUM_BLOCKS, _blocked, _have_cpu_kernel, node_match_cpu  # noqa: F401
from .cuda import CUDA_MAX_K, CUDA_MAX_L, _have_cuda_kernel, node_match_cuda  # noqa: F401
from .cuda import supports as cuda_supports
from .reference import DEFAULT_LAMBDA_SOFTMAX, DEFAULT_NUM_BLOCKS, node_match_reference
from .torch import (DEFAULT_TILE_BYTES, GRAM_MIN_BLOCK_WIDTH, _block_cosine, _plan, _tile, _tile_gram,  # noqa: F401
                    _tiles, node_match_backward_torch, node_match_torch)

# --------------------------------------------------------------------------------------------------------------
# torch.library registration
# --------------------------------------------------------------------------------------------------------------

def _check_op_args(op, images, captions, cap_lens, lambda_softmax, num_blocks, max_tile_bytes, backend=None):
    """The checks the registered ops run on their own arguments (direct calls, compiled graphs): metadata, the
    length values (on the host for CPU tensors, ``torch._assert_async`` on a GPU) and the options."""
    check_op_features(op, images=images, captions=captions)
    check_op_lengths(op, "cap_lens", cap_lens, captions.shape[0], captions.shape[1], images.device)
    check_lambda("lambda_softmax", lambda_softmax, dtype=images.dtype)
    _check_num_blocks(num_blocks, images.shape[2], op)
    check_tile_bytes(op, max_tile_bytes)
    if backend is not None and (backend not in BACKENDS or backend == "auto"):
        raise ValueError(f"{op}: backend must be a resolved backend {BACKENDS[1:]}, got {backend!r}")


def _check_num_blocks(num_blocks, d, where="node_match"):
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or num_blocks < 1 or d % num_blocks:
        raise ValueError(f"{where}: num_blocks must be a positive int that divides d={d}, got {num_blocks!r}")


def _check_backward_args(grad_region, grad_word, images, captions, cap_lens, lambda_softmax, num_blocks,
                         max_tile_bytes):
    op = "itm_kernels::node_match_backward"
    _check_op_args(op, images, captions, cap_lens, lambda_softmax, num_blocks, max_tile_bytes)
    n_img, K, _ = images.shape
    n_cap, L, _ = captions.shape
    check_op_grad(op, "grad_region", grad_region, (n_img, n_cap, K, num_blocks), images.device)
    check_op_grad(op, "grad_word", grad_word, (n_img, n_cap, L, num_blocks), images.device)


@_torch.library.custom_op("itm_kernels::node_match", mutates_args=())
def node_match_op(images: Tensor, captions: Tensor, cap_lens: Tensor, lambda_softmax: float, num_blocks: int,
                  backend: str, max_tile_bytes: int, precision: str = "ieee") -> tuple[Tensor, Tensor]:
    """Registered forward: (N_img, K, d), (N_cap, L, d), (N_cap,) -> (N_img, N_cap, K, B), (N_img, N_cap, L, B).
    ``precision``: the float32 tl.dot precision of "triton" (``itm_kernels._common.precision``); others ignore it."""
    _check_op_args("itm_kernels::node_match", images, captions, cap_lens, lambda_softmax, num_blocks,
                   max_tile_bytes, backend)
    if backend == "cpu" and num_blocks == CPU_NUM_BLOCKS and images.shape[2] // num_blocks >= GRAM_MIN_BLOCK_WIDTH:
        return node_match_cpu(images, captions, cap_lens, lambda_softmax=lambda_softmax, num_blocks=num_blocks,
                              max_tile_bytes=max_tile_bytes or None)
    if backend == "cuda" and cuda_supports(images, captions):
        return node_match_cuda(images, captions, cap_lens, lambda_softmax=lambda_softmax, num_blocks=num_blocks)
    if backend == "triton" and images.dtype != _torch.float64:
        from .triton import node_match_triton

        return node_match_triton(images, captions, cap_lens, lambda_softmax=lambda_softmax, num_blocks=num_blocks,
                                 precision=precision)
    if backend == "reference":
        with _torch.no_grad():
            region, word = node_match_reference(images, captions, cap_lens, lambda_softmax=lambda_softmax,
                                                num_blocks=num_blocks, compute_dtype=compute_dtype(images.dtype))
        return region.contiguous(), word.contiguous()
    return node_match_torch(images, captions, cap_lens, lambda_softmax=lambda_softmax, num_blocks=num_blocks,
                            max_tile_bytes=max_tile_bytes or None)


@node_match_op.register_fake
def _node_match_fake(images, captions, cap_lens, lambda_softmax, num_blocks, backend, max_tile_bytes,
                     precision="ieee"):
    _check_op_args("itm_kernels::node_match", images, captions, cap_lens, lambda_softmax, num_blocks,
                   max_tile_bytes, backend)
    dtype = out_dtype(images.dtype)
    n_img, K, _ = images.shape
    n_cap, L, _ = captions.shape
    return (images.new_empty((n_img, n_cap, K, num_blocks), dtype=dtype),
            images.new_empty((n_img, n_cap, L, num_blocks), dtype=dtype))


def _setup_context(ctx, inputs, output):
    images, captions, cap_lens, lambda_softmax, num_blocks, _, max_tile_bytes, _ = inputs
    ctx.save_for_backward(images, captions, cap_lens)
    ctx.opts = (lambda_softmax, num_blocks, max_tile_bytes)


@_torch.library.custom_op("itm_kernels::node_match_backward", mutates_args=())
def node_match_backward_op(grad_region: Tensor, grad_word: Tensor, images: Tensor, captions: Tensor,
                           cap_lens: Tensor, lambda_softmax: float, num_blocks: int,
                           max_tile_bytes: int) -> tuple[Tensor, Tensor]:
    """Registered backward: grads (N_img, N_cap, K, B), (N_img, N_cap, L, B) -> grads of (images, captions)."""
    _check_backward_args(grad_region, grad_word, images, captions, cap_lens, lambda_softmax, num_blocks,
                         max_tile_bytes)
    return node_match_backward_torch(grad_region, grad_word, images, captions, cap_lens,
                                     lambda_softmax=lambda_softmax, num_blocks=num_blocks,
                                     max_tile_bytes=max_tile_bytes or None)


@node_match_backward_op.register_fake
def _node_match_backward_fake(grad_region, grad_word, images, captions, cap_lens, lambda_softmax, num_blocks,
                              max_tile_bytes):
    _check_backward_args(grad_region, grad_word, images, captions, cap_lens, lambda_softmax, num_blocks,
                         max_tile_bytes)
    return _torch.empty_like(images), _torch.empty_like(captions)


def _backward(ctx, grad_region, grad_word):
    images, captions, cap_lens = ctx.saved_tensors
    g_images, g_captions = node_match_backward_op(grad_region.contiguous(), grad_word.contiguous(), images,
                                                  captions, cap_lens, *ctx.opts)
    needs = ctx.needs_input_grad
    return (g_images if needs[0] else None, g_captions if needs[1] else None, None, None, None, None, None, None)


node_match_op.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------------------
# Public function
# --------------------------------------------------------------------------------------------------------------

def node_match(images: Tensor, captions: Tensor, cap_lens, *, lambda_softmax: float = DEFAULT_LAMBDA_SOFTMAX,
               num_blocks: int = DEFAULT_NUM_BLOCKS, backend: str = "auto",
               max_tile_bytes: int | None = None, precision: str | None = None) -> tuple[Tensor, Tensor]:
    """GSMN node-level matching vectors of every (image, caption) pair of a block, in both directions.

    Args:
        images: (N_img, K, d) region features (GSMN: l2-normalised, K = 36, d = 1024), float32, float64,
            bfloat16 or float16.
        captions: (N_cap, L_max, d) word features, same dtype and device, right-padded (padding never read).
        cap_lens: (N_cap,) integer lengths in 1..L_max (tensor, list or array).
        lambda_softmax: attention temperature of both directions (GSMN: 20 Flickr30K, 10 COCO).
        num_blocks: number of equal slices of d compared by cosine (GSMN ``num_block`` = 16); must divide d.
        backend: "auto" ("cpu" for CPU tensors when the extension is built, else "torch"), "cpu", "cuda",
            "triton", "torch" (tiled, bounded memory) or "reference" (the readable spec). The CUDA and Triton
            kernels have been compiled and run in emulation / the interpreter but never on a GPU, so "auto" does
            not pick them yet: name them to use them (problems beyond their limits run on "torch").
        max_tile_bytes: cap on one tile's (K x L x blocks) tensors (default 4 MiB).
        precision: float32 products of the "triton" backend: "ieee" (exact float32, the default unless
            ``torch.backends.cuda.matmul.allow_tf32`` is on), "tf32" or "tf32x3" (tensor cores); other backends
            and dtypes ignore it (bf16/fp16 score products always run on tensor cores on "triton").

    Returns:
        region_match: (N_img, N_cap, K, num_blocks), the block cosines of each region with its attended word
        context (regions query words: l2 over the regions, softmax over the words); word_match: (N_img, N_cap,
        L_max, num_blocks), each word with its attended region context (l2 over the words, softmax over the
        regions), zero for t >= cap_lens[c]. float64 for float64 inputs, float32 otherwise (low-precision inputs
        are computed in float32).

    Autograd: differentiable w.r.t. images and captions; the backward recomputes one tile at a time and saves only
    the inputs.

    Memory: the outputs (N_img N_cap (K + L_max) num_blocks values: call it on blocks of pairs), plus for "cpu"
    a float32 block-interleaved copy of the images with their per-block Gram matrices (N_img K (d + 16 K) values)
    and one caption range of at most ``max_tile_bytes`` (default 8 MiB) of words with theirs, and per thread a
    (K x L x 16) scratch; for "torch", one tile of at most about 6 x ``max_tile_bytes``. No (pairs x K x d) context
    is ever formed ("reference" excepted).
    """
    check_feature_pair(images, captions)
    cap_lens = check_lengths("cap_lens", cap_lens, captions.shape[0], captions.shape[1], images.device)
    lambda_softmax = check_lambda("lambda_softmax", lambda_softmax, dtype=images.dtype)
    _check_num_blocks(num_blocks, images.shape[2])
    check_choice("backend", backend, BACKENDS)
    if max_tile_bytes is not None and (isinstance(max_tile_bytes, bool) or not isinstance(max_tile_bytes, int)
                                       or max_tile_bytes <= 0):
        raise ValueError(f"max_tile_bytes must be a positive int, got {max_tile_bytes!r}")
    if backend == "cpu" and (images.device.type != "cpu" or not _have_cpu_kernel()):
        raise ValueError("backend 'cpu' needs CPU tensors and the compiled extension (itm_kernels._C)")
    if backend == "cuda" and (images.device.type != "cuda" or not _have_cuda_kernel()):
        raise ValueError("backend 'cuda' needs CUDA tensors and the extension built with CUDA "
                         "(torch.ops.itm_kernels.node_match_cuda)")
    if backend == "triton":
        if "triton" not in dispatch.available_backends(images.device):
            raise ValueError(f"backend 'triton' is not available for {images.device.type} tensors here: it needs "
                             "triton and a CUDA device, or TRITON_INTERPRET=1 (set before triton is first "
                             "imported) for CPU tensors")
    precision = resolve_precision(precision)
    name = choose_backend(backend, images.device, op="node_match", inputs=(images, captions))
    return node_match_op(images.contiguous(), captions.contiguous(), cap_lens, lambda_softmax, num_blocks, name,
                         max_tile_bytes or 0, precision)
