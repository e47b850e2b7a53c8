"""The in-kernel Triton top-k of ``xattn_topk`` (``backend="triton"``): no score matrix, no score tile in memory.

Kernel. The launch geometry is ``xattn_sim``'s Triton forward (itm_kernels/xattn_sim/triton.py): a CONTEXT side
(t2i: images; i2t: captions) and a QUERY side of the attention, captions in power-of-two length buckets, one launch
per bucket. Every score is computed by that file's device function ``score_items`` with the constexprs of the
matching ``xattn_sim`` launch (``kernel_config``: same tile heights, query stacking QB, d-chunk). In the
interpreter a score is therefore bitwise the entry of ``xattn_sim(backend="triton")``'s matrix (tested); compiled,
it is the same code under the forward's untuned constexprs (one pipeline stage instead of two), while the
autotuned forward may pick another d-chunk / warp count: equal to rounding (``tools/gpu_check.py`` checks it
against the reference and the forward's matrix). The ranking side of a launch is either

- the context item (``QUERY_IS_CTX``: queries="images" with t2i, "captions" with i2t): one program per ranked
  item, looping over the gallery items of the launch QB at a time, or
- the attention's query items (queries="images" with i2t, "captions" with t2i): one program per block of QB
  ranked items, looping over the gallery (context) items one at a time.

Each program keeps, per ranked item, the top-KP of what it has seen as one sorted row of int64 keys, in
registers: candidates go into a (KP)-slot buffer, and every KP candidates the buffer and the running row are
merged with one bitonic ``tl.topk`` of 2 KP keys (KP = next power of two >= k). The rows are loaded from and
stored to a (N_queries, KP) int64 state at each launch's start and end, so the length buckets (separate
launches) continue one running top-k.

Keys. A float32 score v and its gallery index i pack into one int64 whose descending order is the library's
order: ``key = (s(v) << 32) | i`` with s the order-preserving int32 image of v (sign-magnitude flip), -0.0 taken
as +0.0 and every NaN as one NaN above +inf (the order of ``torch.topk``). Equal scores then order by the
higher index first: the tie rule of ``merge.py`` and ``itm_models.eval.metrics.recall``. Empty slots hold
INT64_MIN, below every real key; k <= the gallery size, so the first k keys are always real.

Bounds. k <= ``MAX_K`` (16, ``itm_kernels.xattn_topk.TRITON_MAX_K``: register use). Larger k, float64 inputs (a
float64 score and an index do not fit one int64) and ``attention="hard"`` take the streaming driver
(``itm_kernels.xattn_topk``). No host synchronisation: bucket ranges are device tensors and the loops read their
counts on the device. Parallelism: N_queries (or N_queries / QB) programs, each sweeping the whole gallery; a
few queries against a huge gallery leave the GPU underused (no split of the gallery across programs yet).

Memory beyond the inputs: the (N_queries, KP) int64 state (8 KP bytes per query), the (N_queries, k) outputs,
the context Gram tiles and the index tensors of ``xattn_sim``'s Triton forward; per program, registers for
2 x KP keys per ranked item (QB <= 2 items) besides the score tile. Nothing of size N_img x N_cap.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common.triton_utils import (block_rows, check_mode, device_function, device_length_buckets,
                                    full_range, interpreted, jit)
from .._common.triton_utils import gram as _gram
from ..xattn_sim import triton as xattn_triton
from .limits import TRITON_MAX_K as MAX_K
from .limits import triton_topk_supports as supports
from ..xattn_sim.triton import score_items  # noqa: F401  (a device function the kernel calls by this name)

__all__ = ["MAX_K", "supports", "xattn_topk", "kernel_config", "jit_kernel", "decode_keys"]

KEY_EMPTY = tl.constexpr(-(2 ** 63))
# Feature columns per d-chunk of the Gram guard's exact pass (the fix-up specialisation only).
TOPK_FIX_BLOCK_D = 16
_NAN_KEY = tl.constexpr(0x7FFFFFFF)


def _pack_keys(val, item):
    """int64 keys of float32 scores ``val`` and int64 gallery indices ``item`` (same shape), see the module doc."""
    v = tl.where(val == 0.0, 0.0, val)
    bits = v.to(tl.int32, bitcast=True)
    key32 = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    key32 = tl.where(val != val, _NAN_KEY, key32)
    return (key32.to(tl.int64) << 32) | item


pack_keys = device_function(_pack_keys)


def _merge_rows(state, buf, R: tl.constexpr, KP: tl.constexpr):
    """Top-KP (descending) of the (R, KP) rows ``state`` and ``buf`` side by side: one bitonic tl.topk of 2 KP."""
    both = tl.reshape(tl.join(state, buf), (R, 2 * KP))
    return tl.topk(both, KP)


merge_rows = device_function(_merge_rows)


def _xattn_topk_kernel(ctx_ptr, ctx_idx_ptr, ctx_len_ptr, ctx_range_ptr, gram_ptr, qry_ptr, qry_idx_ptr,
                       qry_len_ptr, qry_range_ptr, state_ptr, flag_ptr, n_ctx, n_qry, D, stride_cn, stride_cr, stride_qn,
                       stride_qr, lambda_softmax: tl.float64, lambda_lse: tl.float64,
                       NORM: tl.constexpr, CLIP: tl.constexpr, AGG: tl.constexpr, ACC: tl.constexpr,
                       UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_Q: tl.constexpr, QB: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr,
                       GRAM_RATIO: tl.constexpr, FIX: tl.constexpr, FIX_D: tl.constexpr,
                       QUERY_IS_CTX: tl.constexpr, KP: tl.constexpr, R: tl.constexpr,
                       C: tl.constexpr):
    """Merge one launch's scores into the running top-KP rows ``state`` (N_rank, KP) int64, sorted descending.

    QUERY_IS_CTX: program p ranks context item n = ctx_idx[c0 + p]; step s scores it against the query items
    qry_idx[q0 + s QB + j], j < QB (gallery indices = those items), KP / QB steps per buffer. Else: program b
    ranks the QB query items qry_idx[q0 + b QB + j]; step s scores context item ctx_idx[c0 + s] against them
    (gallery index = that item), KP steps per buffer. (c0, count) = ctx_range, (q0, count) = qry_range on the
    device; programs past the counts return at once. Scores: ``score_items`` (xattn_sim's tile computation).
    R = ranked items per program (1 or QB), C = candidates per ranked item per step (QB or 1).
    Gram guard, in two launches over one grid as the forward's: the main pass (FIX false) leaves out every step
    whose tile ``score_items`` flags (|a|^2 = alpha^T G alpha cancelled) and stores flag[pid] = 1 if it left one
    out; the fix-up pass (FIX true) returns at once unless flagged, walks the steps again and merges only the
    flagged ones, scored by the exact pass (attended vectors formed explicitly over d-chunks of FIX_D). Keeping
    the exact pass out of the main specialisation keeps its registers (tools/compile_check_triton.py).
    """
    pid = tl.program_id(0)
    if FIX:
        if tl.load(flag_ptr + pid) == 0:
            return
    ctx_start = tl.load(ctx_range_ptr)
    ctx_count = tl.load(ctx_range_ptr + 1)
    qry_start = tl.load(qry_range_ptr)
    qry_count = tl.load(qry_range_ptr + 1)
    offs_j = tl.arange(0, QB)
    offs_k = tl.arange(0, KP)
    if QUERY_IS_CTX:
        done = pid >= ctx_count
        rank_items = tl.full((1,), 0, tl.int64) + tl.load(ctx_idx_ptr + ctx_start + pid, mask=pid < ctx_count,
                                                          other=0).to(tl.int64)
        rank_in = tl.full((1,), 0, tl.int32) == 0
        n_steps = tl.cdiv(qry_count, QB)
    else:
        done = pid * QB >= qry_count
        rank_in = pid * QB + offs_j < qry_count
        rank_items = tl.load(qry_idx_ptr + qry_start + pid * QB + offs_j, mask=rank_in, other=0).to(tl.int64)
        n_steps = ctx_count
    if done:
        return
    STEPS: tl.constexpr = KP // C
    offs_s = tl.arange(0, STEPS)
    row_ptrs = state_ptr + rank_items[:, None] * KP + offs_k[None, :]
    state = tl.load(row_ptrs, mask=rank_in[:, None], other=KEY_EMPTY)
    any_flag = tl.full((), 0, tl.int32)

    for s0 in range(0, n_steps, STEPS):
        buf = tl.full((R, STEPS, C), KEY_EMPTY, tl.int64)
        for s in range(s0, tl.minimum(s0 + STEPS, n_steps)):
            if QUERY_IS_CTX:
                # Re-read under a mask that depends on s (always true): otherwise the compiler hoists the context
                # item's loop-invariant loads (its Gram tile) out of both loops, where they stay live and the
                # kernel spills (255 registers and 250-350 stack bytes on sm_90; tools/compile_check_triton.py).
                ctx_item = tl.load(ctx_idx_ptr + ctx_start + pid, mask=s >= s0, other=0).to(tl.int64)
                val, flag = score_items(ctx_ptr, ctx_item, ctx_len_ptr, gram_ptr, qry_ptr, qry_idx_ptr, qry_len_ptr,
                                        qry_start + s * QB, qry_count - s * QB, D, stride_cn, stride_cr, stride_qn,
                                        stride_qr, lambda_softmax, lambda_lse, NORM, CLIP, AGG, ACC, UPCAST,
                                        DOT_PRECISION, BLOCK_C, BLOCK_Q, QB, BLOCK_D, BLOCK_G, GRAM_RATIO, False,
                                        FIX_D)
                if FIX:
                    if flag > 0:
                        val, _exact = score_items(ctx_ptr, ctx_item, ctx_len_ptr, gram_ptr, qry_ptr, qry_idx_ptr,
                                                  qry_len_ptr, qry_start + s * QB, qry_count - s * QB, D, stride_cn,
                                                  stride_cr, stride_qn, stride_qr, lambda_softmax, lambda_lse, NORM,
                                                  CLIP, AGG, ACC, UPCAST, DOT_PRECISION, BLOCK_C, BLOCK_Q, QB,
                                                  BLOCK_D, BLOCK_G, GRAM_RATIO, True, FIX_D)
                    take = flag > 0
                else:
                    take = flag == 0
                any_flag = tl.maximum(any_flag, flag)
                g_in = s * QB + offs_j < qry_count
                g_items = tl.load(qry_idx_ptr + qry_start + s * QB + offs_j, mask=g_in, other=0).to(tl.int64)
                keys = tl.where(g_in & take, pack_keys(val.to(tl.float32), g_items), KEY_EMPTY)
                buf = tl.where(offs_s[None, :, None] == s - s0, tl.reshape(keys, (1, 1, C)), buf)
            else:
                g_item = tl.load(ctx_idx_ptr + ctx_start + s).to(tl.int64)
                val, flag = score_items(ctx_ptr, g_item, ctx_len_ptr, gram_ptr, qry_ptr, qry_idx_ptr, qry_len_ptr,
                                        qry_start + pid * QB, qry_count - pid * QB, D, stride_cn, stride_cr,
                                        stride_qn, stride_qr, lambda_softmax, lambda_lse, NORM, CLIP, AGG, ACC,
                                        UPCAST, DOT_PRECISION, BLOCK_C, BLOCK_Q, QB, BLOCK_D, BLOCK_G, GRAM_RATIO,
                                        False, FIX_D)
                if FIX:
                    if flag > 0:
                        val, _exact = score_items(ctx_ptr, g_item, ctx_len_ptr, gram_ptr, qry_ptr, qry_idx_ptr,
                                                  qry_len_ptr, qry_start + pid * QB, qry_count - pid * QB, D,
                                                  stride_cn, stride_cr, stride_qn, stride_qr, lambda_softmax,
                                                  lambda_lse, NORM, CLIP, AGG, ACC, UPCAST, DOT_PRECISION, BLOCK_C,
                                                  BLOCK_Q, QB, BLOCK_D, BLOCK_G, GRAM_RATIO, True, FIX_D)
                    take = flag > 0
                else:
                    take = flag == 0
                any_flag = tl.maximum(any_flag, flag)
                keys = tl.where(take, pack_keys(val.to(tl.float32), tl.full((QB,), 0, tl.int64) + g_item), KEY_EMPTY)
                buf = tl.where(offs_s[None, :, None] == s - s0, tl.reshape(keys, (R, 1, 1)), buf)
        state = merge_rows(state, tl.reshape(buf, (R, KP)), R, KP)

    tl.store(row_ptrs, state, mask=rank_in[:, None])
    if not FIX:
        tl.store(flag_ptr + pid, any_flag.to(tl.int8))


def jit_kernel(interpret: bool):
    """The ``@triton.jit`` object of ``_xattn_topk_kernel``: interpreted or compiled."""
    return jit(_xattn_topk_kernel, interpret)


def kernel_config(dtype: torch.dtype, *, k: int, query_is_ctx: bool, block_c: int, block_q: int, n_qry: int, d: int,
                  norm: str, agg: str, interpret: bool = False, precision: str = "ieee",
                  block_g: int | None = None) -> tuple[dict, dict]:
    """Constexprs and launch options of ``_xattn_topk_kernel``: those of the matching ``xattn_sim`` launch
    (``xattn_sim.triton.kernel_config``, untuned), plus KP and QUERY_IS_CTX. Shared with the compile check."""
    constexprs, options = xattn_triton.kernel_config(dtype, block_c=block_c, block_q=block_q, n_qry=n_qry, d=d,
                                                     norm=norm, agg=agg, interpret=interpret, precision=precision,
                                                     block_g=block_g)
    constexprs.pop("GROUP")
    constexprs["FIX_D"] = TOPK_FIX_BLOCK_D
    # One stage: the d-loop sits inside the step loop, and pipelining it costs ~60 registers (spills at k = 16).
    options = dict(options, num_stages=1)
    qb = constexprs["QB"]
    constexprs.update(QUERY_IS_CTX=query_is_ctx, KP=max(2, triton.next_power_of_2(k)), R=1 if query_is_ctx else qb,
                      C=qb if query_is_ctx else 1)
    return constexprs, options


def decode_keys(keys: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32, indices int64) of the first k of (N, KP) int64 keys (sorted descending); device ops only."""
    keys = keys[:, :k]
    key32 = (keys >> 32).to(torch.int32)
    bits = torch.where(key32 >= 0, key32, key32 ^ 0x7FFFFFFF)
    return bits.view(torch.float32), keys & 0xFFFFFFFF


def _launch(state, ctx, ctx_idx, ctx_lens, ctx_range, gram, qry, qry_idx, qry_lens, qry_range, *, k, query_is_ctx,
            block_c, block_q, norm, agg, lambda_softmax, lambda_lse, interpret, precision):
    n_ctx, n_qry = ctx_idx.numel(), qry_idx.numel()
    constexprs, options = kernel_config(ctx.dtype, k=k, query_is_ctx=query_is_ctx, block_c=block_c, block_q=block_q,
                                        n_qry=n_qry, d=ctx.shape[2], norm=norm, agg=agg, interpret=interpret,
                                        precision=precision, block_g=gram.shape[1])
    grid = (n_ctx,) if query_is_ctx else (triton.cdiv(n_qry, constexprs["QB"]),)
    flags = torch.zeros(grid, dtype=torch.int8, device=ctx.device)  # the Gram guard's, one per program
    args = (ctx, ctx_idx, ctx_lens, ctx_range, gram, qry, qry_idx, qry_lens, qry_range, state, flags, n_ctx, n_qry,
            ctx.shape[2], ctx.stride(0), ctx.stride(1), qry.stride(0), qry.stride(1), float(lambda_softmax),
            float(lambda_lse))
    kernel = jit_kernel(interpret)
    kernel[grid](*args, **constexprs, **options)
    kernel[grid](*args, **dict(constexprs, FIX=True), **options)


def xattn_topk(images: torch.Tensor, captions: torch.Tensor, cap_lens: torch.Tensor, img_lens: torch.Tensor,
               k: int, *, queries: str, direction: str, norm: str, lambda_softmax: float, agg: str,
               lambda_lse: float, precision: str = "ieee") -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per query with the Triton kernel; inputs already validated by ``itm_kernels.xattn_topk``.

    Args:
        images: (N_img, K, d), captions: (N_cap, L_max, d): contiguous, same dtype (float32, bfloat16 or float16:
            see :func:`supports`) and device (CUDA, or CPU with ``TRITON_INTERPRET=1``); cap_lens (N_cap,) and
            img_lens (N_img,) int64 lengths in 1..L_max / 1..K.
        k: 1..min(MAX_K, gallery size); queries: "images" (rank captions per image) or "captions".
        direction, norm, lambda_softmax, agg, lambda_lse, precision: as ``xattn_sim(backend="triton")``.
    Returns:
        ((N_q, k) float32 scores, descending, NaN first; (N_q, k) int64 gallery indices, higher index first among
        equal scores). Memory: see the module docstring. No host sync.
    """
    interpret = interpreted()
    check_mode(interpret)
    if not supports(images.dtype, k):
        raise ValueError(f"the Triton top-k takes k <= {MAX_K} and float32/bfloat16/float16 inputs, got k={k}, "
                         f"{images.dtype}; use the streaming driver (method='stream')")
    n_img, n_cap = images.shape[0], captions.shape[0]
    n_q = n_img if queries == "images" else n_cap
    dev = images.device
    kp = max(2, triton.next_power_of_2(k))
    state = torch.full((n_q, kp), -(2 ** 63), dtype=torch.int64, device=dev)
    opts = dict(k=k, norm=norm, agg=agg, lambda_softmax=lambda_softmax, lambda_lse=lambda_lse, interpret=interpret,
                precision=precision)
    img_idx = torch.arange(n_img, dtype=torch.int32, device=dev)
    all_images = full_range(n_img, dev)
    block_k = block_rows(images.shape[1])
    cap_order, cap_ranges, blocks = device_length_buckets(cap_lens, captions.shape[1])
    if direction == "t2i":
        gram = _gram(images, img_idx, img_lens, block_k, interpret)
        for b, block_l in enumerate(blocks):
            _launch(state, images, img_idx, img_lens, all_images, gram, captions, cap_order, cap_lens, cap_ranges[b],
                    query_is_ctx=queries == "images", block_c=block_k, block_q=block_l, **opts)
    else:
        all_caps = torch.arange(n_cap, dtype=torch.int32, device=dev)
        gram = _gram(captions, all_caps, cap_lens, blocks[-1], interpret)
        for b, block_l in enumerate(blocks):
            _launch(state, captions, cap_order, cap_lens, cap_ranges[b], gram, images, img_idx, img_lens, all_images,
                    query_is_ctx=queries == "captions", block_c=block_l, block_q=block_k, **opts)
    return decode_keys(state, k)
