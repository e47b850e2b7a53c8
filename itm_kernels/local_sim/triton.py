"""The "triton" backend of ``local_sim``: SGRAF's local similarity vectors, one fused program per (image, caption).

Layout of this file: the forward kernel (math in its docstring), the fused backward kernel, the forward launcher
that picks block sizes (autotuned on a GPU) and buckets captions by length on the device, :func:`local_sim_triton`
(called by ``itm_kernels.local_sim`` with validated inputs), then :func:`local_sim_backward_triton` (the registered
backward after a "triton" forward). Neither direction synchronises the host.

Directions: the kernel sees a CONTEXT set attended over ("images", rows with per-item lengths) and a QUERY set
("captions"); t2i runs it as named, i2t (regions attend over the caption's words, ``itm_kernels.local_sim.i2t``)
with captions as the context (their lengths as region counts) and images as the queries (all K rows valid),
writing out[image, caption, region] through its strides: one launch set, no delegation by caption length.

Formulation (as the "torch" backend, without its scratch): a program holds one pair's K x L score tile, computes the
attention weights alpha (K x L) from it, and folds 1/(|a_t| + eps) into alpha with |a_t|^2 = alpha_t^T G alpha_t,
G = V V^T the image's Gram matrix. A second pass over the features then forms each d-chunk of the normalised
attended vectors a^ (L x BLOCK_D, one tile product), squares a^ - e in registers and contracts the chunk with W at
once (a second tile product into the L x BLOCK_S accumulator): the (pairs x L x d) attended vectors are never
written anywhere. The Gram matrices are computed once per image beforehand (the Gram kernel shared through
``itm_kernels._common.triton_utils``, N_img x BLOCK_K^2 float32) rather than per pair: at SGRAF size (K = 36 padded to 64, d = 1024) a per-pair Gram
product would be 2 64^2 d FLOPs per pair, 25-40% of the kernel's work for 16-32-word captions.

Per pair and word the tile products are 2 BLOCK_K d (scores) + 2 BLOCK_K d (a^) + 2 d s (projection, which dominates
at s = 256), on padded BLOCK_K = 64 rows for SGRAF's 36 regions.

Block sizes and limits (register use measured by compiling for sm_80/sm_90 with triton 3.9 and ptxas at SGRAF size,
K = 36, d = 1024, s = 256, 8 warps: 98-255 registers and no spill for every bucket and dtype; the same for s = 1024):
  * regions: K <= ``MAX_K`` = 128, padded to a power of two >= 16 (masked); more raise ValueError (the "torch"
    backend has no such limit). K = 65..128 compiles with 232-344 bytes of spill per thread on sm_90 (the 128 x 128
    Gram tile), K <= 64 with none.
  * words: captions are sorted by length into power-of-two buckets (>= 16 rows; a caption is padded to its bucket,
    not to L_max). A program takes at most ``MAX_BLOCK_L`` = 32 words (16 for K > 64: BLOCK_K x BLOCK_L <=
    ``MAX_KL_TILE``); longer buckets are split into word blocks, one program each, which recompute the other blocks'
    scores to get the per-region norm over the whole caption (any L_max works). For a 64-word bucket the extra
    score products equal what one 64-word program would spend recomputing a^ for its two 128-column s-chunks
    (+25% of the projection FLOPs either way), and the 64-word program spilled 16-760 bytes in every dtype; each
    further block adds one more score product per block.
  * s: in chunks of BLOCK_S = min(256, 8192 / BLOCK_L) columns (the float32 BLOCK_L x BLOCK_S accumulator stays at
    <= 8192 values, 32 registers per thread); larger s loops over chunks, recomputing the a^ chunks for each (a
    BLOCK_K / BLOCK_S share of extra work), writes the unnormalised y and rescales it in place at the end.
  * d: in chunks of BLOCK_D = 32 untuned (16 in the interpreter, so that tiny tests cover the loop and its ragged
    end); on a GPU ``triton.autotune`` picks BLOCK_D in {16, 32, 64} x 4/8 warps x 2/3 stages per shape key
    (``AUTOTUNE_PARAMS``; never run on a GPU yet, and only the untuned config was checked for spills).
  * no host sync: the caption buckets come from a device searchsorted (``triton_utils.device_length_buckets``); each
    bucket's launch covers all captions and programs past the bucket's device-side count return at once.
  * dtypes: float32 (tile products at the caller's ``precision``: "ieee" exact float32 FMA, the default, or
    "tf32"/"tf32x3" on tensor cores; ``itm_kernels._common.precision``), bfloat16 and float16 (the score, a^ and
    projection products in the input dtype with float32 accumulation, as autocast does and as the "torch" backend
    rounds: alpha / (|a| + eps) and (a^ - e)^2 are rounded to the input dtype before their products; everything
    else is float32). float64 raises ValueError: the "torch" backend handles float64 (Triton's float64 tile
    products are limited and slow).

Memory (forward peak): the float32 output (N_img x N_cap x L_max x s, written exactly once, padding rows included;
no zero-fill pass), the Gram tiles (N_img x BLOCK_K^2 float32, 16 KiB per image at K = 36), the caption index
tensors, a copy of ``weight`` in the input dtype / of ``bias`` in float32 when they come in another dtype
(s x d), and the Gram guard's flags (one int8 per program: N_img x N_cap x NWB bytes per bucket launch; see
``_local_sim_kernel``). Nothing d-sized per pair. Each bucket launches the kernel twice: the main pass and the
guard's fix-up pass, which returns at once for unflagged programs (~nothing when no pair cancels).

Backward (``_local_sim_bwd_kernel``): FlashAttention-style, each pair's tiles are recomputed (scores, attention,
a^ and y over d) and back-propagated in registers: one launch with a program per context item (dV, and dW/db as
per-item partials summed at the end: no atomics), one per query item (dE). The whole query side of a pair and all
of s sit in one tile (query rows x s <= ``BWD_MAX_QS`` after padding: t2i at s = 256 takes captions up to 64
words; larger shapes run the tiled torch backward). Memory: the float32 feature gradients, the Gram tiles and the
dW/db partials (N_ctx x s x d float32); no N_img x N_cap x K x L or x L x d tensor. It compiles for sm_80/sm_90 but
spills at SGRAF size (see ``BWD_NUM_WARPS``) and has not run on a GPU.

Kernels are wrapped on first use, in the mode ``TRITON_INTERPRET`` selects then (``itm_kernels._common.triton_utils``),
and call no other ``@triton.jit`` function of ours.
"""
import functools

import torch
import triton
import triton.language as tl

from .._common import triton_utils
from .._common.constants import GRAM_CANCEL_RATIO
from .._common.triton_utils import EPS, FP32_DOT_PRECISION, LEAKY_SLOPE, MIN_BLOCK, NEG_BIG, block_rows  # noqa: F401
# Most regions a program holds (its K x K Gram and K x L tiles live in registers).
MAX_K = 128
# Most words in one program; longer caption buckets are split into blocks of this many words. Also at most
# MAX_KL_TILE / BLOCK_K words, so that the K x L tiles (scores, attention) stay at 8 registers per thread.
MAX_BLOCK_L = 32
MAX_KL_TILE = 2048
# Values of the float32 (BLOCK_L x BLOCK_S) projection accumulator; BLOCK_S is at most MAX_BLOCK_S.
ACC_VALUES = 8192
MAX_BLOCK_S = 256
# Feature columns per step of both passes on a GPU.
BLOCK_D = 32
NUM_WARPS = 8
# Feature columns per d-chunk of the Gram guard's fix-up pass: its extra (BLOCK_L x BLOCK_D) float32 chunk of a
# spilled 272 bytes on sm_80 float32 t2i with 32, 48 bytes (sm_80/sm_90 float32) with 16 (tools/compile_check_triton.py
# --ops; the main pass does not spill). The fix-up only runs on flagged programs.
FIX_BLOCK_D = 16
NUM_STAGES = 2
# Images whose programs are adjacent, so that a bucket's captions are reused from L2 across them.
GROUP_IMG = 8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _local_sim_kernel(img_ptr, img_len_ptr, cap_ptr, cap_idx_ptr, cap_len_ptr, cap_range_ptr, gram_ptr, w_ptr,
                      b_ptr, out_ptr, flag_ptr, n_img, n_cap, L_out, D, S,
                      stride_in, stride_ik, stride_cn, stride_ct, stride_ws, stride_oi, stride_oc,
                      lambda_softmax: tl.float64,
                      ACC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, NWB: tl.constexpr, BLOCK_S: tl.constexpr,
                      ONE_S: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, GRAM_RATIO: tl.constexpr,
                      FIX: tl.constexpr):
    """SGRAF local similarity vectors of one (image, caption) pair, words [wb BLOCK_L, (wb + 1) BLOCK_L).

    Program -> (image i, caption slot p of the bucket, word block wb < NWB), GROUP images adjacent; caption
    c = cap_idx[start + p] with L_c = cap_len[c] valid words e_t, where (start, count) = cap_range[0:2] lives on
    the device (a length bucket found by a device searchsorted): the grid covers every caption (n_cap) and programs
    with p >= count return at once, so the host never reads a length. Regions v_k, k < K_i = img_len[i];
    G = gram[i] (BLOCK_K x BLOCK_K, zero beyond K_i); W = w (S x D) in the input dtype, b (S,) float32.
    The pair's rows start at out + i stride_oi + c stride_oc (rows of S contiguous values): t2i writes
    out[i, c, t]; i2t runs this kernel with the roles swapped (the "images" are captions, K_i their lengths; the
    "captions" are the images, every region valid) and the strides of out[image, caption, region].

        pass 1 (over d):  S[k, t] = v_k . e_t                              (tl.dot, ACC accumulator)
        h = LeakyReLU_0.1(S), zero outside k < K, t < L_c
        n[k, t] = h[k, t] / (|h[k, :]|_2 + eps)     norm over ALL L_c words (other word blocks' scores recomputed)
        alpha[:, t] = softmax_k<K(lambda n[:, t]);  P = alpha / (sqrt(alpha^T G alpha) + eps)   (= a^ weights)
        per s-chunk, pass 2 (over d):  A = P^T V_chunk (L x BLOCK_D, a^),  Y += ((A - E_chunk)^2) W_chunk^T
        y = Y + b;  out[i, c, t, :] = y / (|y|_2 + eps) for t < L_c, 0 for L_c <= t < L_out

    The program whose block is the bucket's last also zeroes rows from the bucket's end to L_out, and a block past
    L_c only writes zeros, so the output needs no zero fill. Rows beyond K / L_c and columns beyond D / S are never
    read (masked loads), so padding may hold anything. With ONE_S false (S > BLOCK_S) the unnormalised y chunks are
    written first and rescaled after a barrier.

    Gram guard, in two launches of this kernel over the same grid (``itm_kernels._common.gram_guard``): only |a_t|
    comes from the Gram form (a^ itself is formed explicitly in pass 2).
      * FIX false (the main pass) also takes b_t = sum_k alpha_kt |v_k| (|v_k| = sqrt(G_kk)) and stores
        flag[pid] = 1 when a valid word has |a_t|^2 < GRAM_RATIO b_t^2 (the quadratic form cancelled), else 0.
      * FIX true (the fix-up pass) returns at once where flag[pid] == 0; a flagged program recomputes its scores
        and alpha, takes |a_t|^2 from the explicit a = alpha^T V over d-chunks (one more tl.dot per chunk, IEEE
        precision, float32 sums), forms a^ in pass 2 as (alpha^T V_chunk) / (|a| + eps) (normalised after the
        product, in float32 also for bf16/fp16 inputs) and rewrites its whole block of rows.
    The flag tensor is one int8 per program (N_img x N_cap x NWB bytes per bucket launch, against the output's
    4 L s bytes per pair); with no flag the fix-up launch costs one byte load per program (~nothing).
    """
    pid = tl.program_id(0)
    if FIX:
        if tl.load(flag_ptr + pid) == 0:
            return
    n_q = n_cap * NWB
    per_group = GROUP * n_q
    first = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_img - first, GROUP)
    img = (first + (pid % per_group) % group_rows).to(tl.int64)
    q = (pid % per_group) // group_rows
    wb = q % NWB
    cap_start = tl.load(cap_range_ptr)
    cap_count = tl.load(cap_range_ptr + 1)
    if q // NWB >= cap_count:
        return
    cap = tl.load(cap_idx_ptr + cap_start + q // NWB).to(tl.int64)
    cap_len = tl.load(cap_len_ptr + cap).to(tl.int32)
    K = tl.load(img_len_ptr + img).to(tl.int32)
    row0 = wb * BLOCK_L

    offs_k = tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_L)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dd = tl.arange(0, BLOCK_D)
    k_valid = offs_k < K
    rows = row0 + offs_t
    t_valid = rows < cap_len
    v_rows = img_ptr + img * stride_in + offs_k.to(tl.int64) * stride_ik
    cap_base = cap_ptr + cap * stride_cn
    e_rows = cap_base + rows.to(tl.int64) * stride_ct
    pair_out = out_ptr + img * stride_oi + cap * stride_oc
    out_rows = pair_out + rows.to(tl.int64)[:, None] * S
    in_ty = img_ptr.dtype.element_ty

    active = row0 < cap_len
    if active:
        s = tl.zeros((BLOCK_K, BLOCK_L), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_dd
            d_in = offs_d < D
            x = tl.load(v_rows[:, None] + offs_d[None, :], mask=k_valid[:, None] & d_in[None, :], other=0.0)
            y = tl.load(e_rows[:, None] + offs_d[None, :], mask=t_valid[:, None] & d_in[None, :], other=0.0)
            if UPCAST:
                x = x.to(ACC)
                y = y.to(ACC)
            s = tl.dot(x, tl.trans(y), s, input_precision=DOT_PRECISION)
        h = tl.where(s > 0, s, LEAKY_SLOPE * s)
        h = tl.where(k_valid[:, None] & t_valid[None, :], h, 0.0)
        ssq = tl.sum(h * h, axis=1)
        if NWB > 1:
            # The norm over the caption's words needs the scores of its other word blocks too.
            for j in range(0, tl.cdiv(cap_len, BLOCK_L)):
                if j != wb:
                    rows_j = j * BLOCK_L + offs_t
                    tj_valid = rows_j < cap_len
                    ej_rows = cap_base + rows_j.to(tl.int64) * stride_ct
                    sj = tl.zeros((BLOCK_K, BLOCK_L), dtype=ACC)
                    for d0 in range(0, D, BLOCK_D):
                        offs_d = d0 + offs_dd
                        d_in = offs_d < D
                        x = tl.load(v_rows[:, None] + offs_d[None, :], mask=k_valid[:, None] & d_in[None, :],
                                    other=0.0)
                        y = tl.load(ej_rows[:, None] + offs_d[None, :], mask=tj_valid[:, None] & d_in[None, :],
                                    other=0.0)
                        if UPCAST:
                            x = x.to(ACC)
                            y = y.to(ACC)
                        sj = tl.dot(x, tl.trans(y), sj, input_precision=DOT_PRECISION)
                    hj = tl.where(sj > 0, sj, LEAKY_SLOPE * sj)
                    hj = tl.where(k_valid[:, None] & tj_valid[None, :], hj, 0.0)
                    ssq += tl.sum(hj * hj, axis=1)
        n = h / (tl.sqrt(ssq)[:, None] + EPS)
        z = tl.where(k_valid[:, None], tl.full((), lambda_softmax, ACC) * n, NEG_BIG)
        p = tl.where(k_valid[:, None], tl.exp(z - tl.max(z, axis=0, keep_dims=True)), 0.0)
        alpha = p / tl.sum(p, axis=0, keep_dims=True)
        if FIX:
            a_sq = tl.zeros((BLOCK_L,), dtype=ACC)
            alpha_t = tl.trans(alpha)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_dd
                x = tl.load(v_rows[:, None] + offs_d[None, :], mask=k_valid[:, None] & (offs_d < D)[None, :],
                            other=0.0)
                a = tl.dot(alpha_t, x.to(ACC), input_precision="ieee")                   # (BLOCK_L, BLOCK_D)
                a_sq += tl.sum(a * a, axis=1)
        else:
            g = tl.load(gram_ptr + img * (BLOCK_K * BLOCK_K) + offs_k[:, None] * BLOCK_K + offs_k[None, :])
            g_alpha = tl.dot(g, alpha, input_precision=DOT_PRECISION)
            a_sq = tl.sum(alpha * g_alpha, axis=0)
            v_norm = tl.sqrt(tl.maximum(tl.load(gram_ptr + img * (BLOCK_K * BLOCK_K) + offs_k * (BLOCK_K + 1)), 0.0))
            b_t = tl.sum(alpha * v_norm[:, None], axis=0)
            cancelled = t_valid & (a_sq < GRAM_RATIO * b_t * b_t)
            tl.store(flag_ptr + pid, tl.max(cancelled.to(tl.int32), axis=0).to(tl.int8))
        a_norm = tl.sqrt(tl.maximum(a_sq, 0.0))
        inv_a = 1.0 / (a_norm + EPS)
        if FIX:
            # Normalise after the product: folding 1/|a| into the weights first would scale the cancelling terms.
            p_t = tl.trans(alpha)
        else:
            p_t = tl.trans(alpha * inv_a[None, :]).to(in_ty)                          # (BLOCK_L, BLOCK_K)
            if UPCAST:
                p_t = p_t.to(ACC)

        y_sq = tl.zeros((BLOCK_L,), dtype=ACC)
        for s0 in range(0, S, BLOCK_S):
            cols = s0 + offs_s
            s_in = cols < S
            w_rows = w_ptr + cols.to(tl.int64) * stride_ws
            acc = tl.zeros((BLOCK_L, BLOCK_S), dtype=ACC)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_dd
                d_in = offs_d < D
                x = tl.load(v_rows[:, None] + offs_d[None, :], mask=k_valid[:, None] & d_in[None, :], other=0.0)
                y = tl.load(e_rows[:, None] + offs_d[None, :], mask=t_valid[:, None] & d_in[None, :], other=0.0)
                w = tl.load(w_rows[:, None] + offs_d[None, :], mask=s_in[:, None] & d_in[None, :], other=0.0)
                if UPCAST:
                    x = x.to(ACC)
                    w = w.to(ACC)
                if FIX:
                    a_hat = tl.dot(p_t, x.to(ACC), input_precision="ieee") * inv_a[:, None]
                else:
                    a_hat = tl.dot(p_t, x, input_precision=DOT_PRECISION)                # (BLOCK_L, BLOCK_D)
                diff = a_hat - y.to(ACC)
                sq = (diff * diff).to(in_ty)
                if UPCAST:
                    sq = sq.to(ACC)
                acc = tl.dot(sq, tl.trans(w), acc, input_precision=DOT_PRECISION)
            yv = acc + tl.load(b_ptr + cols, mask=s_in, other=0.0)[None, :]
            if ONE_S:
                o = yv / (tl.sqrt(tl.sum(yv * yv, axis=1)) + EPS)[:, None]
                tl.store(out_rows + cols[None, :], tl.where(t_valid[:, None], o, 0.0),
                         mask=(rows < L_out)[:, None] & s_in[None, :])
            else:
                y_sq += tl.sum(yv * yv, axis=1)
                tl.store(out_rows + cols[None, :], yv, mask=t_valid[:, None] & s_in[None, :])
        if not ONE_S:
            tl.debug_barrier()
            inv_y = 1.0 / (tl.sqrt(y_sq) + EPS)
            for s0 in range(0, S, BLOCK_S):
                cols = s0 + offs_s
                s_in = cols < S
                yv = tl.load(out_rows + cols[None, :], mask=t_valid[:, None] & s_in[None, :], other=0.0)
                tl.store(out_rows + cols[None, :], yv * inv_y[:, None], mask=(rows < L_out)[:, None] & s_in[None, :])

    # Zero rows [z0, z1): this block's if it lies past the caption, and for the bucket's last block also the rows
    # from the end of the bucket to L_out.
    z0 = tl.where(active, row0 + BLOCK_L, row0)
    z1 = tl.where(wb == NWB - 1, L_out, row0 + BLOCK_L)
    for r0 in range(z0, z1, BLOCK_L):
        zr = r0 + offs_t
        z_rows = pair_out + zr.to(tl.int64)[:, None] * S
        for s0 in range(0, S, BLOCK_S):
            cols = s0 + offs_s
            tl.store(z_rows + cols[None, :], tl.zeros((BLOCK_L, BLOCK_S), dtype=ACC),
                     mask=(zr < z1)[:, None] & (cols < S)[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Fused backward kernel (FlashAttention-style: recompute each pair's tiles, never store the attention)
# ----------------------------------------------------------------------------------------------------------------

def _local_sim_bwd_kernel(ctx_ptr, ctx_len_ptr, qry_ptr, qry_len_ptr, gram_ptr, w_ptr, b_ptr, grad_ptr, gout_ptr,
                          gw_ptr, gb_ptr, n_inner, D, S,
                          stride_cn, stride_cr, stride_qn, stride_qr, stride_ws, stride_gc, stride_gq, stride_gt,
                          stride_on, stride_or,
                          lambda_softmax: tl.float64,
                          ACC: tl.constexpr, DOT_PRECISION: tl.constexpr, OUTER_CTX: tl.constexpr,
                          BLOCK_C: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_S: tl.constexpr,
                          BLOCK_D: tl.constexpr, GRAM_RATIO: tl.constexpr):
    """Gradient of sum grad * local_sim w.r.t. ONE item's rows (deterministic: no atomics).

    Context items n (t2i: images, rows v_k = regions, k < C_n; i2t: captions, rows = words) are attended over by
    query items m (t2i: captions, rows e_t = words, t < L_m; i2t: images, rows = regions). OUTER_CTX: program n
    loops over every query item m and accumulates dV_n (C_n x d) into gout[n], and its pairs' shares of dW and db
    into gw[n] (S x d) and gb[n] (S,); else program m loops over the context items and accumulates dE_m into
    gout[m]. Per pair the forward is recomputed in float32 (loads widened) and back-propagated in registers:

        S = V E^T, h = LeakyReLU_0.1(S) (masked), wn_k = |h[k, :]|, n = h / (wn + eps), alpha = softmax_k(lambda n)
        P = alpha / (|a| + eps) with |a|^2 = alpha^T G alpha;  G P = V a^^T
        d-pass 1:  a^ = P^T V_chunk, u = a^ - E_chunk, Y += u^2 W_chunk^T;   y = Y + b
        g_y = g_o / (|y| + eps) - y (y . g_o) / (|y| (|y| + eps)^2)                    (g_o = grad[n, m] rows)
        d-pass 2:  g_u = 2 u (g_y W_chunk);  rad += rowsum(g_u a^);  VG += V_chunk g_u^T
        g_alpha = VG / (|a| + eps) - (rad / |a|) G P;  g_n = lambda alpha (g_alpha - colsum(alpha g_alpha))
        g_h = g_n / (wn + eps) - h rowsum(g_n h) / (wn (wn + eps)^2);  g_S = LeakyReLU'(S) g_h  (masked)
        d-pass 3:  g_a = g_u / (|a| + eps) - a^ rad / |a|
                   OUTER_CTX: dV += alpha g_a + g_S E_chunk;  dW += g_y^T u^2;  (db += colsum g_y, once)
                   else:      dE += -g_u + g_S^T V_chunk

    The output rows of a pair are grad + n stride_gc + m stride_gq + t stride_gt (s contiguous). Rows beyond the
    lengths are never read and get 0; the whole caption is one tile (BLOCK_Q >= its length) and S one chunk.

    Gram guard (as the forward's): a^ is always (alpha^T V_chunk) / (|a| + eps), normalised after the product; a
    pair with a valid row where |a|^2 < GRAM_RATIO (sum_k alpha |v_k|)^2 takes |a|^2 and G alpha = V a from the
    explicit a (one more d-loop, IEEE tl.dot) instead of the Gram forms, whose cancellation would otherwise
    scale the gradient's error by up to b^2 / |a|^2.
    """
    outer = tl.program_id(0).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_q = tl.arange(0, BLOCK_Q)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dd = tl.arange(0, BLOCK_D)
    s_valid = offs_s < S
    w_rows = w_ptr + offs_s.to(tl.int64) * stride_ws
    bias = tl.load(b_ptr + offs_s, mask=s_valid, other=0.0).to(ACC)
    lam = tl.full((), lambda_softmax, ACC)
    if OUTER_CTX:
        n_rows = tl.load(ctx_len_ptr + outer)
    else:
        n_rows = tl.load(qry_len_ptr + outer)
    offs_r = tl.arange(0, BLOCK_C) if OUTER_CTX else tl.arange(0, BLOCK_Q)
    o_rows = gout_ptr + outer * stride_on + offs_r.to(tl.int64) * stride_or
    r_valid = offs_r < n_rows
    for inner in range(0, n_inner):
        inner64 = tl.full((), inner, tl.int64)
        if OUTER_CTX:
            c_item = outer
            q_item = inner64
        else:
            c_item = inner64
            q_item = outer
        c_valid = offs_c < tl.load(ctx_len_ptr + c_item)
        q_valid = offs_q < tl.load(qry_len_ptr + q_item)
        c_ptrs = ctx_ptr + c_item * stride_cn + offs_c.to(tl.int64) * stride_cr
        q_ptrs = qry_ptr + q_item * stride_qn + offs_q.to(tl.int64) * stride_qr
        ok = c_valid[:, None] & q_valid[None, :]

        sc = tl.zeros((BLOCK_C, BLOCK_Q), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_dd
            d_in = offs_d < D
            x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & d_in[None, :], other=0.0)
            y = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_in[None, :], other=0.0)
            sc = tl.dot(x.to(ACC), tl.trans(y.to(ACC)), sc, input_precision=DOT_PRECISION)
        h = tl.where(sc > 0, sc, LEAKY_SLOPE * sc)
        h = tl.where(ok, h, 0.0)
        wn = tl.sqrt(tl.sum(h * h, axis=1))
        den = wn + EPS
        z = tl.where(c_valid[:, None], lam * (h / den[:, None]), NEG_BIG)
        p = tl.where(c_valid[:, None], tl.exp(z - tl.max(z, axis=0, keep_dims=True)), 0.0)
        alpha = p / tl.sum(p, axis=0, keep_dims=True)
        g = tl.load(gram_ptr + c_item * (BLOCK_C * BLOCK_C) + offs_c[:, None] * BLOCK_C + offs_c[None, :])
        g_alpha_prod = tl.dot(g, alpha, input_precision=DOT_PRECISION)
        a_sq = tl.sum(alpha * g_alpha_prod, axis=0)
        v_norm = tl.sqrt(tl.maximum(tl.load(gram_ptr + c_item * (BLOCK_C * BLOCK_C) + offs_c * (BLOCK_C + 1)), 0.0))
        b_t = tl.sum(alpha * v_norm[:, None], axis=0)
        p_t = tl.trans(alpha)                                                                 # (BLOCK_Q, BLOCK_C)
        if tl.max((q_valid & (a_sq < GRAM_RATIO * b_t * b_t)).to(tl.int32), axis=0) > 0:
            # The Gram forms cancelled (see the forward's guard): |a|^2 and G alpha = V a from the explicit a.
            a_sq = tl.zeros((BLOCK_Q,), dtype=ACC)
            g_alpha_prod = tl.zeros((BLOCK_C, BLOCK_Q), dtype=ACC)
            for d0 in range(0, D, BLOCK_D):
                offs_d = d0 + offs_dd
                x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & (offs_d < D)[None, :],
                            other=0.0).to(ACC)
                a = tl.dot(p_t, x, input_precision="ieee")
                a_sq += tl.sum(a * a, axis=1)
                g_alpha_prod = tl.dot(x, tl.trans(a), g_alpha_prod, input_precision="ieee")
        a_norm = tl.sqrt(tl.maximum(a_sq, 0.0))
        inv = 1.0 / (a_norm + EPS)

        acc_y = tl.zeros((BLOCK_Q, BLOCK_S), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_dd
            d_in = offs_d < D
            x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & d_in[None, :], other=0.0)
            y = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_in[None, :], other=0.0)
            w = tl.load(w_rows[:, None] + offs_d[None, :], mask=s_valid[:, None] & d_in[None, :], other=0.0)
            u = tl.dot(p_t, x.to(ACC), input_precision=DOT_PRECISION) * inv[:, None] - y.to(ACC)
            acc_y = tl.dot(u * u, tl.trans(w.to(ACC)), acc_y, input_precision=DOT_PRECISION)
        yv = acc_y + bias[None, :]
        y_norm = tl.sqrt(tl.sum(yv * yv, axis=1))
        y_den = y_norm + EPS
        g_ptrs = grad_ptr + c_item * stride_gc + q_item * stride_gq + offs_q.to(tl.int64)[:, None] * stride_gt
        g_o = tl.load(g_ptrs + offs_s[None, :], mask=q_valid[:, None] & s_valid[None, :], other=0.0).to(ACC)
        coef = tl.sum(yv * g_o, axis=1) / tl.where(y_norm > 0, y_norm * y_den * y_den, 1.0)
        g_y = tl.where(q_valid[:, None], g_o / y_den[:, None] - yv * coef[:, None], 0.0)

        rad = tl.zeros((BLOCK_Q,), dtype=ACC)
        vg = tl.zeros((BLOCK_C, BLOCK_Q), dtype=ACC)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_dd
            d_in = offs_d < D
            x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & d_in[None, :], other=0.0)
            y = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_in[None, :], other=0.0)
            w = tl.load(w_rows[:, None] + offs_d[None, :], mask=s_valid[:, None] & d_in[None, :], other=0.0)
            x = x.to(ACC)
            a_hat = tl.dot(p_t, x, input_precision=DOT_PRECISION) * inv[:, None]
            g_u = 2.0 * (a_hat - y.to(ACC)) * tl.dot(g_y, w.to(ACC), input_precision=DOT_PRECISION)
            rad += tl.sum(g_u * a_hat, axis=1)
            vg = tl.dot(x, tl.trans(g_u), vg, input_precision=DOT_PRECISION)
        rad = rad / tl.where(a_norm > 0, a_norm, 1.0)
        g_alpha = inv[None, :] * vg - rad[None, :] * (g_alpha_prod * inv[None, :])
        g_n = lam * alpha * (g_alpha - tl.sum(alpha * g_alpha, axis=0, keep_dims=True))
        g_n = tl.where(ok, g_n, 0.0)
        scale = tl.sum(g_n * h, axis=1) / tl.where(wn > 0, wn * den * den, 1.0)
        g_h = g_n / den[:, None] - h * scale[:, None]
        g_s = tl.where(sc > 0, g_h, LEAKY_SLOPE * g_h)
        g_s = tl.where(ok, g_s, 0.0)

        if OUTER_CTX:
            gb_ptrs = gb_ptr + outer * S + offs_s
            tl.store(gb_ptrs, tl.load(gb_ptrs, mask=s_valid, other=0.0) + tl.sum(g_y, axis=0), mask=s_valid)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + offs_dd
            d_in = offs_d < D
            x = tl.load(c_ptrs[:, None] + offs_d[None, :], mask=c_valid[:, None] & d_in[None, :], other=0.0)
            y = tl.load(q_ptrs[:, None] + offs_d[None, :], mask=q_valid[:, None] & d_in[None, :], other=0.0)
            w = tl.load(w_rows[:, None] + offs_d[None, :], mask=s_valid[:, None] & d_in[None, :], other=0.0)
            x = x.to(ACC)
            y = y.to(ACC)
            a_hat = tl.dot(p_t, x, input_precision=DOT_PRECISION) * inv[:, None]
            u = a_hat - y
            g_u = 2.0 * u * tl.dot(g_y, w.to(ACC), input_precision=DOT_PRECISION)
            if OUTER_CTX:
                g_a = g_u * inv[:, None] - a_hat * rad[:, None]
                upd = tl.dot(alpha, g_a, input_precision=DOT_PRECISION) + tl.dot(g_s, y, input_precision=DOT_PRECISION)
                delta = tl.where(q_valid[:, None], u * u, 0.0)
                gw_ptrs = gw_ptr + outer * S * D + offs_s.to(tl.int64)[:, None] * D + offs_d[None, :]
                gw_mask = s_valid[:, None] & d_in[None, :]
                gw_upd = tl.dot(tl.trans(g_y), delta, input_precision=DOT_PRECISION)
                tl.store(gw_ptrs, tl.load(gw_ptrs, mask=gw_mask, other=0.0) + gw_upd, mask=gw_mask)
            else:
                upd = tl.dot(tl.trans(g_s), x, input_precision=DOT_PRECISION) - g_u
            o_mask = r_valid[:, None] & d_in[None, :]
            o_ptrs = o_rows[:, None] + offs_d[None, :]
            tl.store(o_ptrs, tl.load(o_ptrs, mask=o_mask, other=0.0) + upd, mask=o_mask)


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------

def jit_kernel(interpret: bool, name: str = "local_sim"):
    """The ``@triton.jit`` object of a local_sim kernel ("local_sim" or "local_sim_bwd"): interpreted or compiled."""
    kernels = {"local_sim": _local_sim_kernel, "local_sim_bwd": _local_sim_bwd_kernel}
    return triton_utils.jit(kernels[name], interpret)


def kernel_config(dtype: torch.dtype, *, K: int, bucket: int, s: int, interpret: bool = False,
                  max_block_l: int | None = None, precision: str = FP32_DOT_PRECISION, fix: bool = False
                  ) -> tuple[dict, dict]:
    """Constexpr values and launch options (num_warps, num_stages, ...) of ``_local_sim_kernel`` for one launch:
    the main pass, or with ``fix`` the Gram guard's fix-up pass (untuned; it only runs on flagged programs).

    ``bucket``: the (power-of-two) word rows of the caption bucket; blocks of at most ``max_block_l`` (default
    ``MAX_BLOCK_L``) words, NWB = bucket / BLOCK_L programs per pair. In the interpreter BLOCK_S and BLOCK_D are 16,
    so that tiny tests run the s- and d-loops, their ragged ends and the S > BLOCK_S rescaling path.
    ``precision``: the float32 tl.dot precision (``itm_kernels._common.precision``); bf16/fp16 tiles and the
    interpreter ignore it. This is the untuned configuration (the interpreter's, and the base the compiled
    launcher's autotuner varies: ``AUTOTUNE_PARAMS``). Shared with ``tools/compile_check_triton.py``.
    """
    block_k = block_rows(K)
    block_l = min(bucket, max_block_l or MAX_BLOCK_L, max(MIN_BLOCK, MAX_KL_TILE // block_k))
    if interpret:
        block_s, block_d = MIN_BLOCK, MIN_BLOCK
    else:
        block_s = min(block_rows(s), MAX_BLOCK_S, max(MIN_BLOCK, ACC_VALUES // block_l))
        block_d = BLOCK_D
    # The interpreter multiplies bfloat16 tiles wrongly (see _common/triton_utils.py): widen right after loading. The values
    # rounded to the input dtype before each product (alpha / (|a| + eps), (a^ - e)^2) are rounded the same way,
    # so the interpreter computes what the GPU's native low-precision products compute (up to summation order).
    upcast = interpret and dtype != torch.float32
    constexprs = dict(ACC=tl.float32, UPCAST=upcast, DOT_PRECISION=triton_utils.dot_precision(dtype, interpret,
                                                                                              precision),
                      BLOCK_K=block_k, BLOCK_L=block_l, NWB=bucket // block_l, BLOCK_S=block_s, ONE_S=s <= block_s,
                      BLOCK_D=min(block_d, FIX_BLOCK_D) if fix else block_d, GROUP=GROUP_IMG,
                      GRAM_RATIO=GRAM_CANCEL_RATIO, FIX=fix)
    return constexprs, dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=True)


# What the compiled forward autotunes over: the d-chunk, warps and stages (the word blocks and s-chunks fix the grid
# and the register budget of the accumulators, so they stay the launcher's). Keyed on the sizes and tile heights.
# Not run on a GPU yet: tools/gpu_check.py times them; the interpreter runs kernel_config as is.
AUTOTUNE_PARAMS = [dict(BLOCK_D=bd) for bd in (16, 32, 64)]
AUTOTUNE_KEY = ["D", "S", "BLOCK_K", "BLOCK_L", "NWB", "BLOCK_S", "ONE_S", "DOT_PRECISION", "UPCAST"]


@functools.lru_cache(maxsize=None)
def autotuned_kernel():
    """The compiled ``_local_sim_kernel`` under ``triton.autotune`` over ``AUTOTUNE_PARAMS`` x warps x stages (the
    kernel only stores its outputs, recomputed from the inputs, so the autotuner's repeated launches are
    harmless)."""
    return triton.autotune(configs=triton_utils.autotune_configs(AUTOTUNE_PARAMS),
                           key=AUTOTUNE_KEY)(triton_utils.jit(_local_sim_kernel, False))


def check_supported(images: torch.Tensor, captions: torch.Tensor | None = None, direction: str = "t2i") -> None:
    """Raise ValueError unless the kernel takes these inputs: float32/bfloat16/float16, at most ``MAX_K`` rows on
    the attended side (t2i: regions K; i2t: words L_max)."""
    if images.dtype == torch.float64:
        raise ValueError("local_sim's triton backend takes float32, bfloat16 and float16 inputs; the 'torch' backend "
                         "handles float64")
    if images.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"local_sim's triton backend takes float32, bfloat16 and float16 inputs, got {images.dtype}")
    if images.shape[1] > MAX_K:
        raise ValueError(f"local_sim's triton backend takes at most {MAX_K} regions per image, got "
                         f"K={images.shape[1]}; the 'torch' backend has no such limit")
    if direction == "i2t" and captions is not None and captions.shape[1] > MAX_K:
        raise ValueError(f"local_sim's triton backend with direction='i2t' takes captions of at most {MAX_K} words "
                         f"(L_max), got L_max={captions.shape[1]}; the 'torch' backend has no such limit")


def supports(images: torch.Tensor, captions: torch.Tensor, weight: torch.Tensor | None = None) -> bool:
    """Whether this backend takes these inputs (the dispatcher's question; see :func:`check_supported`)."""
    try:
        check_supported(images, captions)
    except ValueError:
        return False
    return True


def _roles(images, captions, cap_lens, direction):
    """(ctx, ctx_lens, qry, qry_order, qry_ranges, qry_blocks, out_rows): the kernel's "images" (context: the
    attended rows) and "captions" (queries) for ``direction``, and the rows per pair of the output. Sync-free: the
    query buckets are found on the device (t2i) or are the one bucket of all K regions (i2t)."""
    n_img, K = images.shape[:2]
    dev = images.device
    if direction == "t2i":
        img_lens = torch.full((n_img,), K, dtype=torch.int64, device=dev)
        order, ranges, blocks = triton_utils.device_length_buckets(cap_lens, captions.shape[1])
        return images, img_lens, captions, cap_lens, order, ranges, blocks, captions.shape[1]
    img_lens = torch.full((n_img,), K, dtype=torch.int64, device=dev)
    order = torch.arange(n_img, dtype=torch.int32, device=dev)
    ranges = triton_utils.full_range(n_img, dev)[None, :]
    return captions, cap_lens, images, img_lens, order, ranges, [block_rows(K)], K


def local_sim_triton(images: torch.Tensor, captions: torch.Tensor, cap_lens: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, *, lambda_softmax: float, direction: str = "t2i",
                     precision: str = FP32_DOT_PRECISION, autotune: bool = True) -> torch.Tensor:
    """SGRAF local similarity vectors with the Triton kernel; inputs already validated by ``itm_kernels.local_sim``.

    Args:
        images: (N_img, K, d) contiguous float32/bfloat16/float16, K <= ``MAX_K`` (float64 or more regions:
            ValueError; the "torch" backend handles them).
        captions: (N_cap, L_max, d) contiguous, same dtype and device; ``cap_lens`` (N_cap,) int64 in 1..L_max.
            Padding words are never read.
        weight: (s, d) and bias: (s,), any float dtype on the same device: cast to the input dtype (weight, for
            the projection product) and to float32 (bias).
        lambda_softmax: the attention temperature (SGRAF: 9).
        direction: "t2i" (words attend over regions) or "i2t" (regions attend over the caption's words, L_max <=
            ``MAX_K``; ``itm_kernels.local_sim.i2t``): the same kernel with the roles swapped, one launch set.
        precision: float32 tile products: "ieee" (exact float32 FMA, the default), "tf32" or "tf32x3" (tensor
            cores; ``itm_kernels._common.precision``). bf16/fp16 products always run on tensor cores.
        autotune: on a GPU, let ``triton.autotune`` pick the d-chunk, warps and stages (its first launch per key
            benchmarks, which synchronises once); False runs ``kernel_config`` as is.
    Returns:
        t2i: (N_img, N_cap, L_max, s) float32: row [i, c, t] = l2norm(W (a^_t - e_t)^2 + b) for t < cap_lens[c],
        zero beyond (see ``itm_kernels.local_sim``). i2t: (N_img, N_cap, K, s) float32, every row valid. float32
        inputs: float32 products at ``precision``. bfloat16/float16 inputs: the three products in that dtype with
        float32 accumulation, everything else in float32.

    No host sync: the caption buckets are found on the device (``triton_utils.device_length_buckets``), the grid
    covers every caption per bucket and programs past a bucket's count return at once, so a call is CUDA-graph
    capturable once the autotuner has run for its shapes.
    Memory (peak, beyond the inputs): the float32 output, N_ctx x BLOCK_K^2 float32 Gram tiles (t2i: per image,
    BLOCK_K = round_pow2(K); i2t: per caption, BLOCK_K = round_pow2(L_max)), index tensors and dtype copies of
    weight/bias when needed; nothing d-sized per pair. Needs a CUDA device, or CPU tensors with
    ``TRITON_INTERPRET=1``.
    """
    check_supported(images, captions, direction)
    if direction not in ("t2i", "i2t"):
        raise ValueError(f"direction must be 't2i' or 'i2t', got {direction!r}")
    interpret = triton_utils.interpreted()
    triton_utils.check_mode(interpret)
    n_img, K, d = images.shape
    n_cap, L_max = captions.shape[:2]
    s = weight.shape[0]
    rows = L_max if direction == "t2i" else K
    out = torch.empty(n_img, n_cap, rows, s, dtype=torch.float32, device=images.device)
    if out.numel() == 0:
        return out
    w = weight.to(images.dtype).contiguous()
    b = bias.to(torch.float32).contiguous()
    ctx, ctx_lens, qry, qry_lens, order, ranges, blocks, l_out = _roles(images, captions, cap_lens, direction)
    n_ctx, n_qry = ctx.shape[0], qry.shape[0]
    # out[ctx item, qry item] offsets: t2i (image, caption); i2t (caption, image) of out[image, caption].
    stride_oi, stride_oc = (out.stride(0), out.stride(1)) if direction == "t2i" else (out.stride(1), out.stride(0))
    block_k = block_rows(ctx.shape[1])
    ctx_idx = torch.arange(n_ctx, dtype=torch.int32, device=images.device)
    gram = triton_utils.gram(ctx, ctx_idx, ctx_lens, block_k, interpret)               # (N_ctx, BLOCK_K, BLOCK_K)
    for bucket_no, bucket in enumerate(blocks):
        constexprs, options = kernel_config(images.dtype, K=ctx.shape[1], bucket=bucket, s=s, interpret=interpret,
                                            precision=precision)
        grid = (n_ctx * n_qry * constexprs["NWB"],)
        flags = torch.zeros(grid, dtype=torch.int8, device=images.device)     # the Gram guard's, one per program
        args = (ctx, ctx_lens, qry, order, qry_lens, ranges[bucket_no], gram, w, b, out, flags, n_ctx, n_qry, l_out,
                d, s, ctx.stride(0), ctx.stride(1), qry.stride(0), qry.stride(1), w.stride(0), stride_oi, stride_oc,
                float(lambda_softmax))
        kernel = jit_kernel(interpret)
        fix_constexprs = dict(constexprs, FIX=True)
        if autotune and not interpret:
            constexprs.pop("BLOCK_D")
            autotuned_kernel()[grid](*args, **constexprs, enable_fp_fusion=True)
        else:
            kernel[grid](*args, **constexprs, **options)
        kernel[grid](*args, **fix_constexprs, **options)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Fused backward: launcher
# ----------------------------------------------------------------------------------------------------------------

# The backward holds a pair's whole query side (t2i: the caption's words, i2t: the image's regions) and all of s in
# one (BLOCK_Q x BLOCK_S) float32 tile, twice (y and its gradient): at most this many values each. Larger shapes
# run the tiled torch backward (``local_sim_backward_torch``).
# Compiled for sm_90 at SGRAF size (K = 36, d = 1024, s = 256, 32-word captions, bf16; tools/compile_check_triton.py
# --ops): the kernel compiles but SPILLS: 16-wide d-chunks with 16 warps 2,080 bytes of stack per thread, with 8 warps
# 4,672; 32-wide with 8 warps 6,432 (t2i) and 8,560-9,184 (i2t, 64 query rows). Untuned: no GPU has run it.
BWD_MAX_QS = 16384
BWD_BLOCK_D = 16
BWD_NUM_WARPS = 16


def bwd_shapes(images: torch.Tensor, captions: torch.Tensor, weight: torch.Tensor, direction: str) -> tuple:
    """(BLOCK_C, BLOCK_Q, BLOCK_S) of the fused backward for these shapes: context rows, query rows, s."""
    K, L_max, s = images.shape[1], captions.shape[1], weight.shape[0]
    c_rows, q_rows = (K, L_max) if direction == "t2i" else (L_max, K)
    return block_rows(c_rows), block_rows(q_rows), block_rows(s)


def bwd_supported(images: torch.Tensor, captions: torch.Tensor, weight: torch.Tensor, direction: str) -> bool:
    """Whether the fused backward takes these shapes (context rows <= ``MAX_K``, query rows x s <= ``BWD_MAX_QS``
    after padding to powers of two); a shape question only, no sync."""
    if images.dtype not in SUPPORTED_DTYPES + (torch.float64,):
        return False
    block_c, block_q, block_s = bwd_shapes(images, captions, weight, direction)
    return block_c <= MAX_K and block_q * block_s <= BWD_MAX_QS


def bwd_config(dtype: torch.dtype, *, block_c: int, block_q: int, block_s: int, outer_ctx: bool,
               precision: str = FP32_DOT_PRECISION, interpret: bool = False) -> tuple[dict, dict]:
    """Constexpr values and launch options of ``_local_sim_bwd_kernel`` (shared with the compile check). Loads are
    widened to float32 (float64 for float64 inputs), so every product is a float32 tl.dot at the caller's
    ``precision`` on a GPU ("ieee" in the interpreter and for float64)."""
    wide = dtype == torch.float64
    constexprs = dict(ACC=tl.float64 if wide else tl.float32,
                      DOT_PRECISION="ieee" if interpret or wide else precision, OUTER_CTX=outer_ctx,
                      BLOCK_C=block_c, BLOCK_Q=block_q, BLOCK_S=block_s,
                      BLOCK_D=MIN_BLOCK if interpret else BWD_BLOCK_D, GRAM_RATIO=GRAM_CANCEL_RATIO)
    return constexprs, dict(num_warps=BWD_NUM_WARPS, num_stages=1, enable_fp_fusion=True)


def local_sim_backward_triton(grad: torch.Tensor, images: torch.Tensor, captions: torch.Tensor,
                              cap_lens: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, *,
                              lambda_softmax: float, direction: str = "t2i", precision: str = FP32_DOT_PRECISION
                              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fused gradients of sum(grad * local_sim(...)) w.r.t. (images, captions, weight, bias).

    Args: ``grad`` (N_img, N_cap, L_max, s) for t2i, (N_img, N_cap, K, s) for i2t, any float dtype and strides;
    the rest as :func:`local_sim_triton` (shapes must pass :func:`bwd_supported`; the registered backward checks).
    float64 inputs are taken too (float64 accumulation; the forward kernel has no float64, but this lets the
    backward's algebra be gradchecked in float64 against the reference's numerical Jacobian).
    Two launches of ``_local_sim_bwd_kernel`` (one program per context item, one per query item), each recomputing
    the pair tiles it needs in float32 (low-precision inputs are widened on load); float32 accumulation; gradients
    returned in the dtypes of images/captions/weight/bias, padding rows 0. No host sync (tile heights from the
    shapes; captions are not bucketed here), no atomics: dW and db are summed from per-context-item partials.

    Cost per pair: the score product, three a^ products and three W products (y, g_y W twice) plus dW in the
    context launch, two of each fewer in the query launch: about 7x the forward's projection FLOPs in all (the tiled
    torch backward: about 3x, with its tile tensors in memory).
    Memory (peak, beyond inputs and grad): the two feature gradients in float32, the Gram tiles (N_ctx x BLOCK_C^2),
    and the dW/db partials: N_ctx x s x d float32 (t2i: N_img of them; i2t: N_cap), e.g. 128 MiB for 128 images at
    s = 256, d = 1024; nothing of size N_img x N_cap x K x L or N_img x N_cap x L x d.
    """
    interpret = triton_utils.interpreted()
    triton_utils.check_mode(interpret)
    acc = triton_utils.acc_dtype(images.dtype)
    grad = grad.contiguous()
    n_img, K, d = images.shape
    s = weight.shape[0]
    g_img = torch.zeros(images.shape, dtype=acc, device=images.device)
    g_cap = torch.zeros(captions.shape, dtype=acc, device=captions.device)
    if direction == "t2i":
        ctx, ctx_lens, qry, g_ctx, g_qry = images, None, captions, g_img, g_cap
        qry_lens = cap_lens
        ctx_lens = torch.full((n_img,), K, dtype=torch.int64, device=images.device)
        stride_gc, stride_gq = grad.stride(0), grad.stride(1)
    else:
        ctx, ctx_lens, qry, g_ctx, g_qry = captions, cap_lens, images, g_cap, g_img
        qry_lens = torch.full((n_img,), K, dtype=torch.int64, device=images.device)
        stride_gc, stride_gq = grad.stride(1), grad.stride(0)
    n_ctx, n_qry = ctx.shape[0], qry.shape[0]
    g_w_parts = torch.zeros(n_ctx, s, d, dtype=acc, device=images.device)
    g_b_parts = torch.zeros(n_ctx, s, dtype=acc, device=images.device)
    if grad.numel() == 0 or n_ctx == 0 or n_qry == 0:
        return (g_img.to(images.dtype), g_cap.to(captions.dtype), g_w_parts.sum(0).to(weight.dtype),
                g_b_parts.sum(0).to(bias.dtype))
    w = weight.to(images.dtype).contiguous()
    b = bias.to(acc).contiguous()
    block_c, block_q, block_s = bwd_shapes(images, captions, weight, direction)
    ctx_idx = torch.arange(n_ctx, dtype=torch.int32, device=images.device)
    gram = triton_utils.gram(ctx, ctx_idx, ctx_lens, block_c, interpret)
    kernel = jit_kernel(interpret, "local_sim_bwd")
    for outer_ctx, out, n_outer, n_inner in ((True, g_ctx, n_ctx, n_qry), (False, g_qry, n_qry, n_ctx)):
        constexprs, options = bwd_config(images.dtype, block_c=block_c, block_q=block_q, block_s=block_s,
                                         outer_ctx=outer_ctx, precision=precision, interpret=interpret)
        kernel[(n_outer,)](ctx, ctx_lens, qry, qry_lens, gram, w, b, grad, out, g_w_parts, g_b_parts, n_inner, d, s,
                           ctx.stride(0), ctx.stride(1), qry.stride(0), qry.stride(1), w.stride(0), stride_gc,
                           stride_gq, grad.stride(2), out.stride(0), out.stride(1), float(lambda_softmax),
                           **constexprs, **options)
    return (g_img.to(images.dtype), g_cap.to(captions.dtype), g_w_parts.sum(0).to(weight.dtype),
            g_b_parts.sum(0).to(bias.dtype))
