"""The "triton" backend of ``xattn_sim``: one fused kernel per (context item, block of query items).

Layout of this file: the forward kernel (math in its docstring), the launcher that picks block sizes (autotuned on
a GPU) and buckets captions by length on the device, the public :func:`xattn_sim` (called by
``itm_kernels.xattn_sim.run_forward`` with validated inputs), then the fused backward kernel and
:func:`xattn_sim_backward` (the registered backward of a "triton" forward). Neither direction synchronises the
host. The Gram kernel, the mode checks and the length buckets are shared with the other ops
(``itm_kernels._common.triton_utils``).

Both directions are the same computation with the roles swapped, so one kernel serves both. It sees a CONTEXT set
(t2i: images, context rows = regions; i2t: captions, rows = words) and a QUERY set (t2i: captions, rows = words;
i2t: images, rows = regions); the score tile is always context x query.

Kernels are wrapped on first use, in the mode ``TRITON_INTERPRET`` selects then (``jit_kernel``). The forward's
per-tile score computation is the device function ``score_items``, which the in-kernel top-k
(``itm_kernels.xattn_topk.triton``) calls too; device functions are wrapped at import in the mode triton was
imported in (``device_function``), the only mode a launch in this process can pass ``check_mode`` in (see
``itm_kernels._common.triton_utils`` for the mode rules).
"""
import functools

import torch
import triton
import triton.language as tl

from .._common.triton_utils import (EPS, FP32_DOT_PRECISION, LEAKY_SLOPE, MIN_BLOCK, NEG_BIG, _check_mode,  # noqa: F401
                                    _gram_kernel, acc_dtype, block_rows, check_mode, device_function,
                                    dtype_constexprs, gram_config, interpreted, jit, length_buckets,
                                    triton_imported_interpreted)
from .._common.constants import GRAM_CANCEL_RATIO
from .._common.triton_utils import full_range
from .._common.triton_utils import device_length_buckets  # noqa: F401  (shared with local_sim and node_match)
from .._common.triton_utils import gram as _gram
from .._common.triton_utils import length_buckets as _length_buckets
# Query rows stacked into one score tile (several short captions share a program in t2i). With 64 rows, or with
# 4 warps, the t2i kernel needs 255 registers and spills on sm_80/sm_90 (tools/compile_check_triton.py); 32 rows
# and 8 warps compile to 59-139 registers without spills (K = 36, d = 1024, every norm and agg). Tiles grow with
# K and the caption buckets (powers of two); sizes beyond 64 rows compile but were not checked for spills.
TARGET_QUERY_ROWS = 32
NUM_WARPS = 8
# Feature columns per d-chunk of the Gram guard's fix-up pass (at most).
FIX_BLOCK_D = 32
# Context items that consecutive programs share, so that a block of query items is reused from L2.
GROUP_CTX = 8

# norm -> (NORM constexpr, CLIP constexpr): the clipped variants apply LeakyReLU(0.1) first.
_NORM_KINDS = {
    "softmax": ("softmax", False),
    "l2norm": ("l2", False),
    "clipped_l2norm": ("l2", True),
    "l1norm": ("l1", False),
    "clipped_l1norm": ("l1", True),
    "clipped": ("none", True),
    "no_norm": ("none", False),
}


def _score_items(ctx_ptr, ctx_item, ctx_len_ptr, gram_ptr, qry_ptr, qry_idx_ptr, qry_len_ptr, q_first, q_left, D,
                 stride_cn, stride_cr, stride_qn, stride_qr, lambda_softmax, lambda_lse,
                 NORM: tl.constexpr, CLIP: tl.constexpr, AGG: tl.constexpr, ACC: tl.constexpr, UPCAST: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, QB: tl.constexpr,
                 BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, GRAM_RATIO: tl.constexpr, FIX: tl.constexpr,
                 FIX_D: tl.constexpr):
    """(QB,) SCAN scores (ACC) of context item ``ctx_item`` against the query items qry_idx[q_first + j], j < QB,
    and the Gram guard's flag (int32: 1 where some valid row's |a|^2 = alpha^T G alpha cancelled; 0 with FIX).

    The per-tile computation of ``_xattn_sim_kernel`` (the math and the guard are in its docstring), shared with
    the in-kernel top-k (``itm_kernels.xattn_topk.triton``) so that both produce the same bits. FIX: the exact
    pass (attended vectors formed explicitly, over d-chunks of FIX_D). Slots j >= ``q_left`` are empty: their items are not loaded and
    their scores are garbage for the caller to mask.
    """
    NQ: tl.constexpr = QB * BLOCK_Q
    ctx_len = tl.load(ctx_len_ptr + ctx_item)
    offs_c = tl.arange(0, BLOCK_C)
    c_valid = offs_c < ctx_len
    offs_n = tl.arange(0, NQ)
    q_slot = offs_n // BLOCK_Q
    q_row = offs_n % BLOCK_Q
    q_in = q_slot < q_left
    q_item = tl.load(qry_idx_ptr + q_first + q_slot, mask=q_in, other=0).to(tl.int64)
    q_len = tl.load(qry_len_ptr + q_item, mask=q_in, other=0)
    q_valid = q_in & (q_row < q_len)
    c_ptrs = ctx_ptr + ctx_item * stride_cn + offs_c.to(tl.int64) * stride_cr
    q_ptrs = qry_ptr + q_item * stride_qn + q_row.to(tl.int64) * stride_qr

    s = tl.zeros((BLOCK_C, NQ), dtype=ACC)
    q_sq = tl.zeros((NQ,), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        d_in = offs_d < D
        x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & d_in[None, :], other=0.0)
        y = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_in[None, :], other=0.0)
        if UPCAST:
            x = x.to(ACC)
            y = y.to(ACC)
        s = tl.dot(x, tl.trans(y), s, input_precision=DOT_PRECISION)
        y_acc = y.to(ACC)
        q_sq += tl.sum(y_acc * y_acc, axis=1)

    # Normalise along the query axis, per context row and query item.
    s3 = tl.reshape(s, (BLOCK_C, QB, BLOCK_Q))
    qv3 = tl.reshape(q_valid, (1, QB, BLOCK_Q))
    cv3 = tl.reshape(c_valid, (BLOCK_C, 1, 1))
    z = s3
    if CLIP:
        z = tl.where(z > 0, z, LEAKY_SLOPE * z)
    z = tl.where(qv3, z, 0.0)
    if NORM == "softmax":
        # Masked entries become exp(-1e30 - max) = 0; an item with no valid row at all (past n_qry) gets a
        # uniform row instead of 0/0.
        z = tl.where(qv3, z, NEG_BIG)
        e = tl.exp(z - tl.max(z, axis=2, keep_dims=True))
        z = tl.where(qv3, e / tl.sum(e, axis=2, keep_dims=True), 0.0)
    elif NORM == "l2":
        z = z / (tl.sqrt(tl.sum(z * z, axis=2, keep_dims=True)) + EPS)
    elif NORM == "l1":
        z = z / (tl.sum(tl.abs(z), axis=2, keep_dims=True) + EPS)

    # Attention over the context axis.
    logits = tl.where(cv3, tl.full((), lambda_softmax, ACC) * z, NEG_BIG)
    p = tl.where(cv3, tl.exp(logits - tl.max(logits, axis=0, keep_dims=True)), 0.0)
    alpha = p / tl.sum(p, axis=0, keep_dims=True)
    alpha2 = tl.reshape(alpha, (BLOCK_C, NQ))
    flag = tl.full((), 0, tl.int32)
    if FIX:
        # Exact: the attended vectors a (NQ x BLOCK_D per chunk) formed explicitly, never their Gram form.
        num = tl.zeros((NQ,), dtype=ACC)
        a_sq = tl.zeros((NQ,), dtype=ACC)
        alpha_t = tl.trans(alpha2)
        for d0 in range(0, D, FIX_D):
            offs_d = d0 + tl.arange(0, FIX_D)
            d_in = offs_d < D
            x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & d_in[None, :], other=0.0)
            y = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_in[None, :], other=0.0)
            a = tl.dot(alpha_t, x.to(ACC), input_precision="ieee")
            num += tl.sum(a * y.to(ACC), axis=1)
            a_sq += tl.sum(a * a, axis=1)
    else:
        num = tl.reshape(tl.sum(alpha * s3, axis=0), (NQ,))
        g = tl.load(gram_ptr + ctx_item * (BLOCK_G * BLOCK_G) + offs_c[:, None] * BLOCK_G + offs_c[None, :])
        g_alpha = tl.dot(g, alpha2, input_precision=DOT_PRECISION)
        a_sq = tl.sum(alpha2 * g_alpha, axis=0)
        x_norm = tl.sqrt(tl.maximum(tl.load(gram_ptr + ctx_item * (BLOCK_G * BLOCK_G) + offs_c * (BLOCK_G + 1)),
                                    0.0))
        b = tl.sum(alpha2 * x_norm[:, None], axis=0)
        cancelled = q_valid & (a_sq < GRAM_RATIO * b * b)
        flag = tl.max(cancelled.to(tl.int32), axis=0)
    a_norm = tl.sqrt(tl.maximum(a_sq, 0.0))
    r = num / tl.maximum(tl.sqrt(q_sq) * a_norm, EPS)

    # Aggregate over each query item's valid rows.
    r2 = tl.reshape(r, (QB, BLOCK_Q))
    qv2 = tl.reshape(q_valid, (QB, BLOCK_Q))
    if AGG == "lse":
        lam = tl.full((), lambda_lse, ACC)
        lr = tl.where(qv2, lam * r2, NEG_BIG)
        top = tl.max(lr, axis=1)
        total = tl.sum(tl.exp(lr - top[:, None]), axis=1)
        val = (top + tl.log(total)) / lam
    elif AGG == "mean":
        count = tl.sum(qv2.to(ACC), axis=1)
        val = tl.sum(tl.where(qv2, r2, 0.0), axis=1) / tl.maximum(count, 1.0)
    elif AGG == "max":
        val = tl.max(tl.where(qv2, r2, NEG_BIG), axis=1)
    else:
        val = tl.sum(tl.where(qv2, r2, 0.0), axis=1)
    return val, flag


# The one ``@triton.jit`` device function of this file, called by the forward kernel above and by the top-k kernel
# (itm_kernels/xattn_topk/triton.py). It is wrapped at import in the mode triton itself was imported in
# (``device_function``): a launch in the other mode fails ``check_mode`` before it could call it.
score_items = device_function(_score_items)


def _xattn_sim_kernel(ctx_ptr, ctx_idx_ptr, ctx_len_ptr, ctx_range_ptr, gram_ptr, qry_ptr, qry_idx_ptr, qry_len_ptr,
                      qry_range_ptr, out_ptr, flag_ptr, n_ctx, n_qry, D, stride_cn, stride_cr, stride_qn, stride_qr,
                      stride_oc, stride_oq, lambda_softmax: tl.float64, lambda_lse: tl.float64,
                      NORM: tl.constexpr, CLIP: tl.constexpr, AGG: tl.constexpr, ACC: tl.constexpr,
                      UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                      BLOCK_Q: tl.constexpr, QB: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
                      BLOCK_G: tl.constexpr, GRAM_RATIO: tl.constexpr, FIX: tl.constexpr):
    """SCAN scores of one context item against QB query items: QB entries of ``out``.

    Program -> (context slot p, query block b) with consecutive programs sharing GROUP context items; context
    item n = ctx_idx[c0 + p] with C_n = ctx_len[n] valid rows x_k; query items m_j = qry_idx[q0 + b QB + j],
    j < QB, with L_j = qry_len[m_j] valid rows y_t. The QB query items are stacked into one (QB BLOCK_Q)-row tile.
    (c0, count) = ctx_range[0:2] and (q0, count) = qry_range[0:2] live on the device (a length bucket, found by a
    device searchsorted): the grid covers the upper bounds n_ctx x n_qry and programs past the counts return at
    once, so the host never reads a length. G_n is the (BLOCK_G, BLOCK_G) tile gram[n], BLOCK_G >= BLOCK_C.

        s[k, (j, t)] = x_k . y_t                     (tl.dot over d-chunks, ACC accumulator)
        z = LeakyReLU_0.1(s) if CLIP else s
        n[k, j, :]  = NORM of z[k, j, t] over t < L_j: softmax | z / (|z|_2 + eps) | z / (|z|_1 + eps) | z
        alpha[:, j, t] = softmax over k < C_n of lambda_softmax n[k, j, t]
        num = sum_k alpha s,   |a|^2 = alpha^T G_n alpha (G_n from _gram_kernel, again one tl.dot)
        R[j, t] = num / max(|y_t| |a|, eps)
        out[n, m_j] = AGG over t < L_j of R[j, t]:
                      (1/lambda_lse) log sum exp(lambda_lse R) (max-shifted) | mean | max | sum

    Rows beyond the lengths are never read (masked loads) and every statistic is masked, so padding may hold
    anything. ``out`` is addressed as out_ptr + n stride_oc + m stride_oq, which is how i2t writes out[image,
    caption] although its context items are captions.

    Gram guard, in two launches of this kernel over the same grid (``itm_kernels._common.gram_guard``):
      * FIX false (the main pass) also takes b[j, t] = sum_k alpha |x_k| (|x_k| = sqrt(G_kk), one more (C x NQ)
        product-sum, no extra tile) and stores flag[pid] = 1 when some valid row has |a|^2 < GRAM_RATIO b^2 (the
        quadratic form cancelled: its float32 error ~ eps b^2 exceeds a share of |a|^2), else 0.
      * FIX true (the fix-up pass) returns at once where flag[pid] == 0; a flagged program recomputes s and alpha
        as above, then forms the attended vectors explicitly over d-chunks (a_chunk = alpha^T X_chunk, one tl.dot
        at IEEE precision) and accumulates num = a . y and |a|^2 from them in ACC, then overwrites the QB
        aggregated scores of its tile. Scores are aggregated per program, so the fix-up redoes the whole tile.
    The flag tensor is one int8 per program (N_ctx x ceil(N_qry / QB) bytes per bucket launch); when nothing is
    flagged the fix-up launch costs one byte load per program (a launch's overhead, ~nothing).
    """
    pid = tl.program_id(0)
    if FIX:
        if tl.load(flag_ptr + pid) == 0:
            return
    n_qb = tl.cdiv(n_qry, QB)
    per_group = GROUP * n_qb
    first = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_ctx - first, GROUP)
    slot = first + (pid % per_group) % group_rows
    qb = (pid % per_group) // group_rows

    ctx_start = tl.load(ctx_range_ptr)
    ctx_count = tl.load(ctx_range_ptr + 1)
    qry_start = tl.load(qry_range_ptr)
    qry_count = tl.load(qry_range_ptr + 1)
    if (slot >= ctx_count) | (qb * QB >= qry_count):
        return
    ctx_item = tl.load(ctx_idx_ptr + ctx_start + slot).to(tl.int64)
    val, flag = score_items(ctx_ptr, ctx_item, ctx_len_ptr, gram_ptr, qry_ptr, qry_idx_ptr, qry_len_ptr,
                            qry_start + qb * QB, qry_count - qb * QB, D, stride_cn, stride_cr, stride_qn, stride_qr,
                            lambda_softmax, lambda_lse, NORM, CLIP, AGG, ACC, UPCAST, DOT_PRECISION, BLOCK_C,
                            BLOCK_Q, QB, BLOCK_D, BLOCK_G, GRAM_RATIO, FIX, BLOCK_D)
    if not FIX:
        tl.store(flag_ptr + pid, flag.to(tl.int8))

    offs_j = qb * QB + tl.arange(0, QB)
    j_in = offs_j < qry_count
    out_items = tl.load(qry_idx_ptr + qry_start + offs_j, mask=j_in, other=0).to(tl.int64)
    tl.store(out_ptr + ctx_item * stride_oc + out_items * stride_oq, val, mask=j_in)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------

def jit_kernel(name: str, interpret: bool):
    """The ``@triton.jit`` object of kernel ``name`` ("xattn_sim", "xattn_sim_bwd" or "gram"): interpreted or
    compiled."""
    kernels = {"xattn_sim": _xattn_sim_kernel, "gram": _gram_kernel, "xattn_sim_bwd": _xattn_sim_bwd_kernel}
    return jit(kernels[name], interpret)


def kernel_config(dtype: torch.dtype, *, block_c: int, block_q: int, n_qry: int, d: int, norm: str, agg: str,
                  interpret: bool = False, precision: str = FP32_DOT_PRECISION, block_g: int | None = None,
                  fix: bool = False) -> tuple[dict, dict]:
    """Constexpr values and launch options (num_warps, num_stages) of ``_xattn_sim_kernel`` for one launch: the
    main pass, or with ``fix`` the Gram guard's fix-up pass (untuned; it only runs on flagged programs).

    Shared with ``tools/compile_check_triton.py`` so that CI compiles exactly what the launcher runs. This is the
    untuned configuration (the interpreter's, float64's, and the base the autotuner varies: ``AUTOTUNE_CONFIGS``).
    """
    norm_kind, clip = _NORM_KINDS[norm]
    qb = max(1, min(TARGET_QUERY_ROWS // block_q, triton.next_power_of_2(max(n_qry, 1))))
    constexprs = dict(NORM=norm_kind, CLIP=clip, AGG=agg, GROUP=GROUP_CTX, BLOCK_C=block_c, BLOCK_Q=block_q, QB=qb,
                      BLOCK_G=block_g or block_c, GRAM_RATIO=GRAM_CANCEL_RATIO, FIX=fix,
                      **dtype_constexprs(dtype, d, interpret, precision))
    if fix:
        # The fix-up widens each chunk to ACC for its IEEE product: 64-wide bf16 chunks spilled (160-176 bytes on
        # sm_80/sm_90, t2i); 32-wide ones do not (tools/compile_check_triton.py).
        constexprs["BLOCK_D"] = min(constexprs["BLOCK_D"], FIX_BLOCK_D)
    return constexprs, dict(num_warps=NUM_WARPS, num_stages=2, enable_fp_fusion=True)


# Tile configurations the compiled launcher autotunes over (per dtype class), keyed on d and the tile heights
# (BLOCK_C, BLOCK_Q: the K and caption-length buckets, e.g. K = 36/50 -> 64, K = 100 -> 128) and the options.
# Only the d-chunk, warps and stages vary: the query stacking QB fixes the grid, so it stays the launcher's.
# Not run on a GPU yet: tools/gpu_check.py times them; the interpreter and float64 use kernel_config as is.
AUTOTUNE_BLOCK_D = {"fp32": (16, 32, 64), "lowp": (32, 64, 128)}
AUTOTUNE_CONFIGS = {kind: [dict(BLOCK_D=bd, num_warps=w, num_stages=st) for bd in block_ds for w in (4, 8)
                           for st in (2, 3)] for kind, block_ds in AUTOTUNE_BLOCK_D.items()}
AUTOTUNE_KEY = ["D", "BLOCK_C", "BLOCK_Q", "QB", "NORM", "CLIP", "AGG", "DOT_PRECISION"]


def _autotune_kind(dtype: torch.dtype) -> str | None:
    return {torch.float32: "fp32", torch.bfloat16: "lowp", torch.float16: "lowp"}.get(dtype)


@functools.lru_cache(maxsize=None)
def autotuned_kernel(kind: str):
    """The compiled ``_xattn_sim_kernel`` under ``triton.autotune`` over ``AUTOTUNE_CONFIGS[kind]`` (the kernel only
    stores its outputs, so the autotuner's repeated launches are harmless)."""
    configs = [triton.Config({"BLOCK_D": c["BLOCK_D"]}, num_warps=c["num_warps"], num_stages=c["num_stages"])
               for c in AUTOTUNE_CONFIGS[kind]]
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY)(jit(_xattn_sim_kernel, False))


def _launch(out, ctx, ctx_idx, ctx_lens, ctx_range, gram, qry, qry_idx, qry_lens, qry_range, stride_oc, stride_oq, *,
            block_c, block_q, norm, agg, lambda_softmax, lambda_lse, interpret, precision=FP32_DOT_PRECISION,
            autotune=True):
    n_ctx, n_qry = ctx_idx.numel(), qry_idx.numel()
    constexprs, options = kernel_config(ctx.dtype, block_c=block_c, block_q=block_q, n_qry=n_qry, d=ctx.shape[2],
                                        norm=norm, agg=agg, interpret=interpret, precision=precision,
                                        block_g=gram.shape[1])
    grid = (n_ctx * triton.cdiv(n_qry, constexprs["QB"]),)
    # One Gram-guard flag per program (see _xattn_sim_kernel): zero where a program returns before computing.
    flags = torch.zeros(grid, dtype=torch.int8, device=ctx.device)
    args = (ctx, ctx_idx, ctx_lens, ctx_range, gram, qry, qry_idx, qry_lens, qry_range, out, flags, n_ctx, n_qry,
            ctx.shape[2], ctx.stride(0), ctx.stride(1), qry.stride(0), qry.stride(1), stride_oc, stride_oq,
            float(lambda_softmax), float(lambda_lse))
    fix_constexprs = dict(constexprs, FIX=True)
    kind = _autotune_kind(ctx.dtype)
    kernel = jit_kernel("xattn_sim", interpret)
    if autotune and not interpret and kind is not None:
        constexprs.pop("BLOCK_D")
        autotuned_kernel(kind)[grid](*args, **constexprs, enable_fp_fusion=True)
    else:
        kernel[grid](*args, **constexprs, **options)
    kernel[grid](*args, **fix_constexprs, **options)


# ----------------------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------------------

def xattn_sim(images: torch.Tensor, captions: torch.Tensor, cap_lens: torch.Tensor, img_lens: torch.Tensor, *,
              direction: str, norm: str, lambda_softmax: float, agg: str, lambda_lse: float,
              precision: str = FP32_DOT_PRECISION) -> torch.Tensor:
    """All-pairs SCAN similarity with the Triton kernels; inputs already validated by ``itm_kernels.xattn_sim``.

    Args:
        images: (N_img, K, d) contiguous, float16/bfloat16/float32/float64; ``img_lens`` (N_img,) int64 in 1..K.
        captions: (N_cap, L_max, d) contiguous, same dtype and device; ``cap_lens`` (N_cap,) int64 in 1..L_max.
        direction, norm, lambda_softmax, agg, lambda_lse: as ``itm_kernels.xattn_sim``.
    Returns:
        (N_img, N_cap) float32 (float64 for float64 inputs). Low-precision inputs are multiplied exactly and
        accumulated in float32 (tensor-core tl.dot on a GPU); float32 tiles use ``precision`` ("ieee": IEEE
        float32 FMA, the default and the one the goldens check; "tf32"/"tf32x3": tensor cores), float64 tiles
        float64 ones. The interpreter always multiplies exactly.

    Captions are sorted by length and launched in power-of-two length buckets, so a short caption is padded to its
    bucket's height, not to L_max; short captions share a program (up to ``TARGET_QUERY_ROWS`` stacked words).
    The buckets are found on the device (``device_length_buckets``): no host sync, CUDA-graph capturable once the
    autotuner has run for these shapes (its first launch per key benchmarks, which synchronises).
    Gram guard: each bucket runs the kernel twice over one grid, the main pass (which also flags programs whose
    |a|^2 = alpha^T G alpha cancelled) and a fix-up pass that returns at once unless flagged and otherwise
    recomputes its tile from the explicit attended vectors (``_xattn_sim_kernel``); with no flag the fix-up costs
    one launch of one-byte loads. No host sync either way.
    Memory: the output, the context Gram tiles (t2i: N_img x BLOCK_K^2; i2t: N_cap x BLOCK_L^2 with BLOCK_L =
    round_pow2(L_max), in float32/float64), the index tensors and the guard's flags (one int8 per program of a
    bucket launch: N_ctx x ceil(N_qry_bucket / QB) bytes, at most a quarter of the output's bytes). Needs a CUDA
    device, or CPU tensors with ``TRITON_INTERPRET=1``.
    """
    interpret = interpreted()
    _check_mode(interpret)
    n_img, n_cap = images.shape[0], captions.shape[0]
    out = torch.empty(n_img, n_cap, dtype=acc_dtype(images.dtype), device=images.device)
    if n_img == 0 or n_cap == 0:
        return out
    opts = dict(norm=norm, agg=agg, lambda_softmax=lambda_softmax, lambda_lse=lambda_lse, interpret=interpret,
                precision=precision)
    img_idx = torch.arange(n_img, dtype=torch.int32, device=images.device)
    all_images = full_range(n_img, images.device)
    block_k = block_rows(images.shape[1])
    cap_order, cap_ranges, blocks = device_length_buckets(cap_lens, captions.shape[1])
    if direction == "t2i":
        gram = _gram(images, img_idx, img_lens, block_k, interpret)
        for b, block_l in enumerate(blocks):
            _launch(out, images, img_idx, img_lens, all_images, gram, captions, cap_order, cap_lens, cap_ranges[b],
                    out.stride(0), out.stride(1), block_c=block_k, block_q=block_l, **opts)
    elif direction == "i2t":
        all_caps = torch.arange(n_cap, dtype=torch.int32, device=captions.device)
        gram = _gram(captions, all_caps, cap_lens, blocks[-1], interpret)
        for b, block_l in enumerate(blocks):
            _launch(out, captions, cap_order, cap_lens, cap_ranges[b], gram, images, img_idx, img_lens, all_images,
                    out.stride(1), out.stride(0), block_c=block_l, block_q=block_k, **opts)
    else:
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fused backward (FlashAttention-style: recompute each tile, never store the attention)
# ----------------------------------------------------------------------------------------------------------------

def _xattn_sim_bwd_kernel(ctx_ptr, ctx_len_ptr, gram_ptr, qry_ptr, qry_len_ptr, grad_ptr, gout_ptr,
                          n_inner, D, stride_cn, stride_cr, stride_qn, stride_qr, stride_gc, stride_gq,
                          stride_on, stride_or, lambda_softmax: tl.float64, lambda_lse: tl.float64,
                          NORM: tl.constexpr, CLIP: tl.constexpr, AGG: tl.constexpr, ACC: tl.constexpr,
                          UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, TINY: tl.constexpr,
                          OUTER_CTX: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr,
                          BLOCK_D: tl.constexpr, GRAM_RATIO: tl.constexpr):
    """Gradient of sum_{n,m} grad[n, m] out[n, m] w.r.t. ONE item's rows (deterministic: no atomics).

    OUTER_CTX: program n = a context item, looping over all query items m, accumulates dX_n (C_n x d) into
    gout[n]; else program m = a query item, looping over the context items n, accumulates dY_m into gout[m].
    For each pair the tile is recomputed as the forward kernel does (s = X Y^T, norm, alpha, num, a_sq = alpha^T G
    alpha, r, aggregation weights w) and back-propagated in registers:

        g_r = grad[n, m] w;  g_num = g_r / max(den, eps);  g_den = [den >= eps] (-g_r num / max(den, eps)^2)
        g_qn = g_den |a|;    g_asq = [a_sq >= tiny] g_den |y| / (2 |a|)
        g_alpha = g_num s + 2 g_asq (G alpha);  g_logit = alpha (g_alpha - sum_k alpha g_alpha)
        g_s = g_num alpha + clip'(s) NORM'(lambda_softmax g_logit)      (NORM' along the query axis, masked)
        dX_n += g_s Y + 2 ((alpha g_asq) alpha^T) X        dY_m += g_s^T X + (g_qn / |y|) y

    The second d-loop multiplies g_s (ACC) by the re-loaded rows, widened to ACC. Memory: the gradient outputs
    and the Gram tiles; nothing of size N_ctx x N_qry is formed. Padding rows are never read and get 0.

    Gram guard (as the forward's): where some valid row of a pair has a_sq < GRAM_RATIO b^2, b = sum_k alpha
    |x_k|, the Gram forms cancelled and the gradient through 1/|a| would be wrong by up to eps b^2 / |a|^2
    relative; that pair then takes num, a_sq and G alpha = X a from the explicit attended vectors (one more
    d-loop, a = alpha^T X per chunk at IEEE precision). Unflagged pairs pay one (C x Q) product-sum for b.
    """
    outer = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_q = tl.arange(0, BLOCK_Q)
    if OUTER_CTX:
        n_rows = tl.load(ctx_len_ptr + outer)
    else:
        n_rows = tl.load(qry_len_ptr + outer)
    for inner in range(0, n_inner):
        inner64 = tl.full((), inner, tl.int64)
        if OUTER_CTX:
            c_item = outer
            q_item = inner64
        else:
            c_item = inner64
            q_item = outer
        c_len = tl.load(ctx_len_ptr + c_item)
        q_len = tl.load(qry_len_ptr + q_item)
        c_valid = offs_c < c_len
        q_valid = offs_q < q_len
        c_ptrs = ctx_ptr + c_item * stride_cn + offs_c.to(tl.int64) * stride_cr
        q_ptrs = qry_ptr + q_item * stride_qn + offs_q.to(tl.int64) * stride_qr

        s = tl.zeros((BLOCK_C, BLOCK_Q), dtype=ACC)
        q_sq = tl.zeros((BLOCK_Q,), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_in = offs_d < D
            x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & d_in[None, :], other=0.0)
            y = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_in[None, :], other=0.0)
            if UPCAST:
                x = x.to(ACC)
                y = y.to(ACC)
            s = tl.dot(x, tl.trans(y), s, input_precision=DOT_PRECISION)
            y_acc = y.to(ACC)
            q_sq += tl.sum(y_acc * y_acc, axis=1)

        qv = q_valid[None, :]
        cv = c_valid[:, None]
        x0 = s
        if CLIP:
            x0 = tl.where(x0 > 0, x0, LEAKY_SLOPE * x0)
        x0 = tl.where(qv, x0, 0.0)
        if NORM == "softmax":
            e = tl.exp(tl.where(qv, x0, NEG_BIG) - tl.max(tl.where(qv, x0, NEG_BIG), axis=1, keep_dims=True))
            e = tl.where(qv, e, 0.0)
            nz = e / tl.sum(e, axis=1, keep_dims=True)
        elif NORM == "l2":
            rr = tl.sqrt(tl.sum(x0 * x0, axis=1, keep_dims=True))
            nz = x0 / (rr + EPS)
        elif NORM == "l1":
            nz = x0 / (tl.sum(tl.abs(x0), axis=1, keep_dims=True) + EPS)
        else:
            nz = x0
        logits = tl.where(cv, tl.full((), lambda_softmax, ACC) * nz, NEG_BIG)
        p = tl.where(cv, tl.exp(logits - tl.max(logits, axis=0, keep_dims=True)), 0.0)
        alpha = p / tl.sum(p, axis=0, keep_dims=True)
        num = tl.sum(alpha * s, axis=0)
        g = tl.load(gram_ptr + c_item * (BLOCK_C * BLOCK_C) + offs_c[:, None] * BLOCK_C + offs_c[None, :])
        g_alpha_prod = tl.dot(g, alpha, input_precision=DOT_PRECISION)
        a_sq = tl.sum(alpha * g_alpha_prod, axis=0)
        x_norm = tl.sqrt(tl.maximum(tl.load(gram_ptr + c_item * (BLOCK_C * BLOCK_C) + offs_c * (BLOCK_C + 1)), 0.0))
        b = tl.sum(alpha * x_norm[:, None], axis=0)
        if tl.max((q_valid & (a_sq < GRAM_RATIO * b * b)).to(tl.int32), axis=0) > 0:
            num = tl.zeros((BLOCK_Q,), dtype=ACC)
            a_sq = tl.zeros((BLOCK_Q,), dtype=ACC)
            g_alpha_prod = tl.zeros((BLOCK_C, BLOCK_Q), dtype=ACC)
            alpha_t = tl.trans(alpha)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + tl.arange(0, BLOCK_D)
                d_in = offs_d < D
                x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & d_in[None, :], other=0.0)
                y = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_in[None, :], other=0.0)
                x = x.to(ACC)
                a = tl.dot(alpha_t, x, input_precision="ieee")
                num += tl.sum(a * y.to(ACC), axis=1)
                a_sq += tl.sum(a * a, axis=1)
                g_alpha_prod = tl.dot(x, tl.trans(a), g_alpha_prod, input_precision="ieee")
        a_norm = tl.sqrt(tl.maximum(a_sq, TINY))
        qn = tl.sqrt(q_sq)
        den = qn * a_norm
        den_c = tl.maximum(den, EPS)
        r = num / den_c

        # Aggregation weights over the valid query rows.
        if AGG == "lse":
            lr = tl.where(q_valid, tl.full((), lambda_lse, ACC) * r, NEG_BIG)
            w = tl.where(q_valid, tl.exp(lr - tl.max(lr, axis=0)), 0.0)
            w = w / tl.sum(w, axis=0)
        elif AGG == "mean":
            w = q_valid.to(ACC) / tl.sum(q_valid.to(ACC), axis=0)
        elif AGG == "max":
            top = tl.max(tl.where(q_valid, r, NEG_BIG), axis=0)
            hit = (q_valid & (r == top)).to(ACC)
            w = hit / tl.sum(hit, axis=0)
        else:
            w = q_valid.to(ACC)
        g_out = tl.load(grad_ptr + c_item * stride_gc + q_item * stride_gq).to(ACC)
        g_r = g_out * w
        g_num = g_r / den_c
        g_den = tl.where(den >= EPS, -g_r * num / (den_c * den_c), 0.0)
        g_qn = g_den * a_norm
        g_asq = tl.where(a_sq >= TINY, g_den * qn / (2.0 * a_norm), 0.0)
        g_alpha = g_num[None, :] * s + 2.0 * g_asq[None, :] * g_alpha_prod
        g_logit = alpha * (g_alpha - tl.sum(alpha * g_alpha, axis=0, keep_dims=True))
        g_n = tl.full((), lambda_softmax, ACC) * g_logit
        if NORM == "softmax":
            g_x = nz * (g_n - tl.sum(nz * g_n, axis=1, keep_dims=True))
        elif NORM == "l2":
            f = 1.0 / (rr + EPS)
            rr_safe = tl.where(rr > 0, rr, 1.0)
            g_x = f * g_n - f * f * tl.sum(g_n * x0, axis=1, keep_dims=True) * x0 / rr_safe
        elif NORM == "l1":
            f = 1.0 / (tl.sum(tl.abs(x0), axis=1, keep_dims=True) + EPS)
            sign = tl.where(x0 > 0, 1.0, tl.where(x0 < 0, -1.0, 0.0))
            g_x = f * g_n - f * f * tl.sum(g_n * x0, axis=1, keep_dims=True) * sign
        else:
            g_x = g_n
        g_x = tl.where(qv, g_x, 0.0)
        if CLIP:
            g_x = tl.where(s > 0, g_x, LEAKY_SLOPE * g_x)   # a where of two scalars would round 0.1 to float32
        g_s = tl.where(cv & qv, g_num[None, :] * alpha + g_x, 0.0).to(ACC)

        if OUTER_CTX:
            m2 = tl.dot(alpha * (2.0 * g_asq)[None, :], tl.trans(alpha), input_precision=DOT_PRECISION).to(ACC)
        else:
            q_coef = tl.where(q_valid & (qn > 0), g_qn / tl.where(qn > 0, qn, 1.0), 0.0)
        offs_r = tl.arange(0, BLOCK_C) if OUTER_CTX else tl.arange(0, BLOCK_Q)
        o_ptrs = gout_ptr + outer * stride_on + offs_r.to(tl.int64) * stride_or
        r_valid = offs_r < n_rows
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_in = offs_d < D
            x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & d_in[None, :], other=0.0)
            y = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_in[None, :], other=0.0)
            x = x.to(ACC)
            y = y.to(ACC)
            if OUTER_CTX:
                upd = tl.dot(g_s, y, input_precision=DOT_PRECISION) + tl.dot(m2, x, input_precision=DOT_PRECISION)
            else:
                upd = tl.dot(tl.trans(g_s), x, input_precision=DOT_PRECISION) + q_coef[:, None] * y
            o_mask = r_valid[:, None] & d_in[None, :]
            acc = tl.load(o_ptrs[:, None] + offs_d[None, :], mask=o_mask, other=0.0)
            tl.store(o_ptrs[:, None] + offs_d[None, :], acc + upd, mask=o_mask)


def bwd_config(dtype: torch.dtype, *, block_c: int, block_q: int, d: int, norm: str, agg: str, outer_ctx: bool,
               precision: str = "ieee", interpret: bool = False) -> tuple[dict, dict]:
    """Constexpr values and launch options of ``_xattn_sim_bwd_kernel`` (shared with the compile check)."""
    norm_kind, clip = _NORM_KINDS[norm]
    constexprs = dict(NORM=norm_kind, CLIP=clip, AGG=agg, OUTER_CTX=outer_ctx, BLOCK_C=block_c, BLOCK_Q=block_q,
                      TINY=float(torch.finfo(acc_dtype(dtype)).tiny), GRAM_RATIO=GRAM_CANCEL_RATIO,
                      **dtype_constexprs(dtype, d, interpret))
    if dtype != torch.float64 and not interpret:
        # The second d-loop multiplies float32 tiles: follow the forward's float32 precision choice. 32-wide
        # d-chunks: with 64 the bf16 variants spill (255 registers, 192-256 stack bytes on sm_90, 8 warps).
        constexprs["DOT_PRECISION"] = precision
        constexprs["BLOCK_D"] = 32
    return constexprs, dict(num_warps=8, num_stages=1, enable_fp_fusion=True)


def xattn_sim_backward(grad: torch.Tensor, images: torch.Tensor, captions: torch.Tensor, cap_lens: torch.Tensor,
                       img_lens: torch.Tensor, *, direction: str, norm: str, lambda_softmax: float, agg: str,
                       lambda_lse: float, precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """Fused gradients of sum(grad * xattn_sim(...)) w.r.t. images (N_img, K, d) and captions (N_cap, L_max, d).

    Two launches of ``_xattn_sim_bwd_kernel`` (one program per image, one per caption), each recomputing the
    score tiles it needs; float32 accumulation (float64 for float64 inputs); gradients returned in the input
    dtype, padding rows 0. Memory: the two gradients in the accumulation dtype plus the Gram tiles
    (N_ctx x BLOCK_C^2), i.e. the forward's bound; nothing of size N_img x N_cap x K x L. No host sync: the tile
    heights come from the tensors' shapes (K, L_max), not from the lengths (captions are not bucketed here).
    """
    interpret = interpreted()
    _check_mode(interpret)
    acc = acc_dtype(images.dtype)
    grad = grad.to(acc).contiguous()
    g_img = torch.zeros(images.shape, dtype=acc, device=images.device)
    g_cap = torch.zeros(captions.shape, dtype=acc, device=captions.device)
    n_img, n_cap = images.shape[0], captions.shape[0]
    if n_img == 0 or n_cap == 0:
        return g_img.to(images.dtype), g_cap.to(captions.dtype)
    if direction == "t2i":
        ctx, ctx_lens, qry, qry_lens, g_ctx, g_qry = images, img_lens, captions, cap_lens, g_img, g_cap
        stride_gc, stride_gq = grad.stride(0), grad.stride(1)
    else:
        ctx, ctx_lens, qry, qry_lens, g_ctx, g_qry = captions, cap_lens, images, img_lens, g_cap, g_img
        stride_gc, stride_gq = grad.stride(1), grad.stride(0)
    block_c, block_q = block_rows(ctx.shape[1]), block_rows(qry.shape[1])
    ctx_idx = torch.arange(ctx.shape[0], dtype=torch.int32, device=ctx.device)
    gram = _gram(ctx, ctx_idx, ctx_lens, block_c, interpret)
    kernel = jit_kernel("xattn_sim_bwd", interpret)
    for outer_ctx, out, n_outer, n_inner in ((True, g_ctx, ctx.shape[0], qry.shape[0]),
                                             (False, g_qry, qry.shape[0], ctx.shape[0])):
        constexprs, options = bwd_config(images.dtype, block_c=block_c, block_q=block_q, d=ctx.shape[2], norm=norm,
                                         agg=agg, outer_ctx=outer_ctx, precision=precision, interpret=interpret)
        kernel[(n_outer,)](ctx, ctx_lens, gram, qry, qry_lens, grad, out, n_inner, ctx.shape[2],
                           ctx.stride(0), ctx.stride(1), qry.stride(0), qry.stride(1), stride_gc, stride_gq,
                           out.stride(0), out.stride(1), float(lambda_softmax), float(lambda_lse),
                           **constexprs, **options)
    return g_img.to(images.dtype), g_cap.to(captions.dtype)
