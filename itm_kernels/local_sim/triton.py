"""The "triton" backend of ``local_sim``: SGRAF's local similarity vectors, one fused program per (image, caption).

Layout of this file: the kernel (math in its docstring), the launcher that picks block sizes and buckets captions by
length, then :func:`local_sim_triton` (to be called by ``itm_kernels.local_sim`` with validated inputs).

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
  * d: in chunks of BLOCK_D = 32 (16 in the interpreter, so that tiny tests cover the loop and its ragged end).
  * dtypes: float32 (IEEE float32 tile products, ``FP32_DOT_PRECISION``), bfloat16 and float16 (the score, a^ and
    projection products in the input dtype with float32 accumulation, as autocast does and as the "torch" backend
    rounds: alpha / (|a| + eps) and (a^ - e)^2 are rounded to the input dtype before their products; everything
    else is float32). float64 raises ValueError: the "torch" backend handles float64 (Triton's float64 tile
    products are limited and slow).

Memory: the float32 output (N_img x N_cap x L_max x s, written exactly once, padding rows included; no zero-fill
pass), the Gram tiles (N_img x BLOCK_K^2 float32, 16 KiB per image at K = 36), the caption index tensors, and a copy
of ``weight`` in the input dtype / of ``bias`` in float32 when they come in another dtype (s x d). Nothing
d-sized per pair.

Kernels are wrapped on first use, in the mode ``TRITON_INTERPRET`` selects then (``itm_kernels._common.triton_utils``),
and call no other ``@triton.jit`` function of ours.
"""
import torch
import triton
import triton.language as tl

from .._common import triton_utils
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
NUM_STAGES = 2
# Images whose programs are adjacent, so that a bucket's captions are reused from L2 across them.
GROUP_IMG = 8
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _local_sim_kernel(img_ptr, cap_ptr, cap_idx_ptr, cap_len_ptr, gram_ptr, w_ptr, b_ptr, out_ptr,
                      n_img, n_cap_bucket, n_cap, K, L_out, D, S,
                      stride_in, stride_ik, stride_cn, stride_ct, stride_ws,
                      lambda_softmax: tl.float64,
                      ACC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, NWB: tl.constexpr, BLOCK_S: tl.constexpr,
                      ONE_S: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr):
    """SGRAF local similarity vectors of one (image, caption) pair, words [wb BLOCK_L, (wb + 1) BLOCK_L).

    Program -> (image i, caption slot p of the bucket, word block wb < NWB), GROUP images adjacent; caption
    c = cap_idx[p] with L_c = cap_len[c] valid words e_t; regions v_k, k < K; G = gram[i] (BLOCK_K x BLOCK_K, zero
    beyond K); W = w (S x D) in the input dtype, b (S,) float32.

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
    """
    pid = tl.program_id(0)
    n_q = n_cap_bucket * NWB
    per_group = GROUP * n_q
    first = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_img - first, GROUP)
    img = (first + (pid % per_group) % group_rows).to(tl.int64)
    q = (pid % per_group) // group_rows
    wb = q % NWB
    cap = tl.load(cap_idx_ptr + q // NWB).to(tl.int64)
    cap_len = tl.load(cap_len_ptr + cap).to(tl.int32)
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
    pair_out = out_ptr + (img * n_cap + cap) * L_out * S
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
        g = tl.load(gram_ptr + img * (BLOCK_K * BLOCK_K) + offs_k[:, None] * BLOCK_K + offs_k[None, :])
        g_alpha = tl.dot(g, alpha, input_precision=DOT_PRECISION)
        a_norm = tl.sqrt(tl.maximum(tl.sum(alpha * g_alpha, axis=0), 0.0))
        p_t = tl.trans(alpha * (1.0 / (a_norm + EPS))[None, :]).to(in_ty)            # (BLOCK_L, BLOCK_K)
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
                a_hat = tl.dot(p_t, x, input_precision=DOT_PRECISION)                    # (BLOCK_L, BLOCK_D)
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
# Launcher
# ----------------------------------------------------------------------------------------------------------------

def jit_kernel(interpret: bool):
    """The ``@triton.jit`` object of the local_sim kernel: interpreted or compiled."""
    return triton_utils.jit(_local_sim_kernel, interpret)


def kernel_config(dtype: torch.dtype, *, K: int, bucket: int, s: int, interpret: bool = False,
                  max_block_l: int | None = None) -> tuple[dict, dict]:
    """Constexpr values and launch options (num_warps, num_stages, ...) of ``_local_sim_kernel`` for one launch.

    ``bucket``: the (power-of-two) word rows of the caption bucket; blocks of at most ``max_block_l`` (default
    ``MAX_BLOCK_L``) words, NWB = bucket / BLOCK_L programs per pair. In the interpreter BLOCK_S and BLOCK_D are 16,
    so that tiny tests run the s- and d-loops, their ragged ends and the S > BLOCK_S rescaling path.
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
    constexprs = dict(ACC=tl.float32, UPCAST=upcast, DOT_PRECISION=FP32_DOT_PRECISION, BLOCK_K=block_k,
                      BLOCK_L=block_l, NWB=bucket // block_l, BLOCK_S=block_s, ONE_S=s <= block_s,
                      BLOCK_D=block_d, GROUP=GROUP_IMG)
    return constexprs, dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=True)


def check_supported(images: torch.Tensor) -> None:
    """Raise ValueError unless the kernel takes these images: float32/bfloat16/float16, at most ``MAX_K`` regions."""
    if images.dtype == torch.float64:
        raise ValueError("local_sim's triton backend takes float32, bfloat16 and float16 inputs; the 'torch' backend "
                         "handles float64")
    if images.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"local_sim's triton backend takes float32, bfloat16 and float16 inputs, got {images.dtype}")
    if images.shape[1] > MAX_K:
        raise ValueError(f"local_sim's triton backend takes at most {MAX_K} regions per image, got "
                         f"K={images.shape[1]}; the 'torch' backend has no such limit")


def local_sim_triton(images: torch.Tensor, captions: torch.Tensor, cap_lens: torch.Tensor, weight: torch.Tensor,
                     bias: torch.Tensor, *, lambda_softmax: float) -> torch.Tensor:
    """SGRAF local similarity vectors with the Triton kernel; inputs already validated by ``itm_kernels.local_sim``.

    Args:
        images: (N_img, K, d) contiguous float32/bfloat16/float16, K <= ``MAX_K`` (float64 or more regions:
            ValueError; the "torch" backend handles them).
        captions: (N_cap, L_max, d) contiguous, same dtype and device; ``cap_lens`` (N_cap,) int64 in 1..L_max.
            Padding words are never read.
        weight: (s, d) and bias: (s,), any float dtype on the same device: cast to the input dtype (weight, for
            the projection product) and to float32 (bias).
        lambda_softmax: the attention temperature (SGRAF: 9).
    Returns:
        (N_img, N_cap, L_max, s) float32: row [i, c, t] = l2norm(W (a^_t - e_t)^2 + b) for t < cap_lens[c], zero
        beyond (see ``itm_kernels.local_sim``). float32 inputs: IEEE float32 products. bfloat16/float16 inputs: the
        three products in that dtype with float32 accumulation, everything else in float32.

    Memory: the output, N_img x BLOCK_K^2 float32 Gram tiles, index tensors and dtype copies of weight/bias when
    needed. Needs a CUDA device, or CPU tensors with ``TRITON_INTERPRET=1``.
    """
    check_supported(images)
    interpret = triton_utils.interpreted()
    triton_utils.check_mode(interpret)
    n_img, K, d = images.shape
    n_cap, L_max = captions.shape[:2]
    s = weight.shape[0]
    out = torch.empty(n_img, n_cap, L_max, s, dtype=torch.float32, device=images.device)
    if out.numel() == 0:
        return out
    w = weight.to(images.dtype).contiguous()
    b = bias.to(torch.float32).contiguous()
    block_k = block_rows(K)
    img_idx = torch.arange(n_img, dtype=torch.int32, device=images.device)
    img_lens = torch.full((n_img,), K, dtype=torch.int64, device=images.device)
    gram = triton_utils.gram(images, img_idx, img_lens, block_k, interpret)         # (N_img, BLOCK_K, BLOCK_K)
    for cap_idx, bucket in triton_utils.length_buckets(cap_lens):
        constexprs, options = kernel_config(images.dtype, K=K, bucket=bucket, s=s, interpret=interpret)
        grid = (n_img * cap_idx.numel() * constexprs["NWB"],)
        jit_kernel(interpret)[grid](
            images, captions, cap_idx, cap_lens, gram, w, b, out, n_img, cap_idx.numel(), n_cap, K, L_max, d, s,
            images.stride(0), images.stride(1), captions.stride(0), captions.stride(1), w.stride(0),
            float(lambda_softmax), **constexprs, **options)
    return out
