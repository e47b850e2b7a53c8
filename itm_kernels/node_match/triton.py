"""The "triton" backend of ``node_match``: one fused program per (image, caption) pair.

Layout of this file: the kernel (math in its docstring), the launcher that picks block sizes and buckets captions by
length, then :func:`node_match_triton` (called by ``itm_kernels.node_match.node_match_op`` with validated inputs).

Formulation: explicit contexts, a few feature columns at a time. The CPU kernel and the "torch" backend avoid the
attended contexts with per-block score tiles and Gram matrices (alpha^T G^b alpha), which cancels badly for narrow
blocks (``GRAM_MIN_BLOCK_WIDTH``) and needs 16 (K x L) score tiles live at once. Here the contexts' columns of one
step are small register tiles (K x 16 and L x 16 at GSMN size), so the kernel forms them, as the reference does: no
Gram matrices, no cancellation at any block width, and two more tile products (alpha E, beta^T V) of the size of
the score product. Only the K x L score, alpha and beta tiles live across the feature loop.

Products: tl.dot throughout; bf16/fp16 score products on tensor cores in the input dtype, the float32 ones (and the
float32 context products) at the caller's ``precision`` ("ieee" exact by default, "tf32"/"tf32x3" on tensor cores;
``itm_kernels._common.precision``). On a GPU ``triton.autotune`` picks warps and stages per shape key (not run on
a GPU yet). No host sync for L_max <= ``MAX_ROWS``: the caption buckets come from a device searchsorted and
programs past a bucket's device-side count return at once. Compiled for sm_80/sm_90, never run on a GPU.

Kernels are wrapped on first use, in the mode ``TRITON_INTERPRET`` selects then (``itm_kernels._common.triton_utils``), and
call no other ``@triton.jit`` function of ours.
"""
import functools

import torch
import triton
import triton.language as tl

from .._common import triton_utils
from .._common.triton_utils import EPS, FP32_DOT_PRECISION, LEAKY_SLOPE, MIN_BLOCK, NEG_BIG, block_rows  # noqa: F401
# Feature columns per step. Compiled for sm_80/sm_90 at GSMN size (K = 36, d = 1024, 16 blocks; triton 3.9,
# ptxas): 16 columns, 8 warps, 2 stages use 64-198 registers with no spill for 16/32/64-word buckets (8 bytes of
# stack for float32 at 32 words on sm_90); 32 or 64 columns, or 4 warps, spill up to 9 KB at 32-64 words. Tiny tests
# use the same value, so the interpreter runs the GPU's step and loop structure.
TARGET_CHUNK = 16
# Largest padded region / word count a program holds (its K x L tiles stay in registers; the 128-word bucket spills
# 48-256 bytes). More regions, and longer captions' buckets, run on the "torch" backend.
MAX_ROWS = 128
NUM_WARPS = 8
NUM_STAGES = 2
# Images whose programs are adjacent, so that a bucket's captions are reused from L2 across them.
GROUP_IMG = 8


def _node_match_kernel(img_ptr, cap_ptr, cap_idx_ptr, cap_len_ptr, cap_range_ptr, region_ptr, word_ptr,
                       n_img, n_cap, K, L_out, D, DB, NB,
                       stride_in, stride_ik, stride_cn, stride_ct,
                       lambda_softmax: tl.float64,
                       ACC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                       BLOCK_K: tl.constexpr, BLOCK_L: tl.constexpr, SUB: tl.constexpr, BPC: tl.constexpr,
                       GROUP: tl.constexpr):
    """GSMN node matching of one (image, caption) pair: K + L rows of NB block cosines.

    Program -> (image i, caption slot p of the bucket), GROUP images adjacent; caption c = cap_idx[start + p]
    with L_c = cap_len[c] valid words e_t, where (start, count) = cap_range[0:2] lives on the device (a length
    bucket): the grid covers every caption and programs with p >= count return at once (no host sync);
    regions v_k, k < K. The d = NB DB features are visited in steps of BPC blocks
    x SUB columns each (feature b DB + w0 + j at step column (b - b0) SUB + j; SUB >= DB pads a block, SUB < DB
    takes a block in several steps whose per-block sums accumulate).

        pass 1 (over the steps):   S[k, t] = v_k . e_t                        (tl.dot, ACC accumulator)
        h = LeakyReLU_0.1(S), zero outside k < K, t < L_c
        alpha[k, :] = softmax_t<L_c(lambda h[k, t] / (|h[:, t]|_2 + eps))    regions query the words
        beta[:, t]  = softmax_k<K(lambda h[k, t] / (|h[k, :]|_2 + eps))      words query the regions
        pass 2 (per step):         A = alpha E_step (K x BD), T = beta^T V_step (L x BD)
            region[i, c, k, b] = sum_w v_kw A_kw / max(|v_k,b| |A_k,b|, eps)     (sums over the block's columns)
            word[i, c, t, b]   = sum_w e_tw T_tw / max(|e_t,b| |T_t,b|, eps)     for t < L_c

    Rows beyond K / L_c and columns beyond each block are never read (masked loads), so padding may hold anything;
    word rows t >= L_c are not written (the launcher zeroes the output).
    """
    BD: tl.constexpr = BPC * SUB
    pid = tl.program_id(0)
    per_group = GROUP * n_cap
    first = (pid // per_group) * GROUP
    group_rows = tl.minimum(n_img - first, GROUP)
    img = (first + (pid % per_group) % group_rows).to(tl.int64)
    slot = (pid % per_group) // group_rows
    cap_start = tl.load(cap_range_ptr)
    if slot >= tl.load(cap_range_ptr + 1):
        return
    cap = tl.load(cap_idx_ptr + cap_start + slot).to(tl.int64)
    cap_len = tl.load(cap_len_ptr + cap)

    offs_k = tl.arange(0, BLOCK_K)
    offs_t = tl.arange(0, BLOCK_L)
    k_valid = offs_k < K
    t_valid = offs_t < cap_len
    v_rows = img_ptr + img * stride_in + offs_k.to(tl.int64) * stride_ik
    e_rows = cap_ptr + cap * stride_cn + offs_t.to(tl.int64) * stride_ct
    offs_j = tl.arange(0, BD)
    j_blk = offs_j // SUB
    j_col = offs_j % SUB
    offs_b = tl.arange(0, BPC)

    s = tl.zeros((BLOCK_K, BLOCK_L), dtype=ACC)
    for b0 in range(0, NB, BPC):
        blk = b0 + j_blk
        for w0 in range(0, DB, SUB):
            col = w0 + j_col
            col_ok = (col < DB) & (blk < NB)
            feat = blk * DB + col
            x = tl.load(v_rows[:, None] + feat[None, :], mask=k_valid[:, None] & col_ok[None, :], other=0.0)
            y = tl.load(e_rows[:, None] + feat[None, :], mask=t_valid[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                x = x.to(ACC)
                y = y.to(ACC)
            s = tl.dot(x, tl.trans(y), s, input_precision=DOT_PRECISION)

    ok = k_valid[:, None] & t_valid[None, :]
    h = tl.where(s > 0, s, LEAKY_SLOPE * s)
    h = tl.where(ok, h, 0.0)
    lam = tl.full((), lambda_softmax, ACC)
    # regions query the words: l2 over the regions, softmax over the caption's words
    n_v = h / (tl.sqrt(tl.sum(h * h, axis=0, keep_dims=True)) + EPS)
    z = tl.where(t_valid[None, :], lam * n_v, NEG_BIG)
    p = tl.where(t_valid[None, :], tl.exp(z - tl.max(z, axis=1, keep_dims=True)), 0.0)
    alpha = p / tl.sum(p, axis=1, keep_dims=True)
    # words query the regions: l2 over the words, softmax over the regions
    n_t = h / (tl.sqrt(tl.sum(h * h, axis=1, keep_dims=True)) + EPS)
    z = tl.where(k_valid[:, None], lam * n_t, NEG_BIG)
    p = tl.where(k_valid[:, None], tl.exp(z - tl.max(z, axis=0, keep_dims=True)), 0.0)
    beta_t = tl.trans(p / tl.sum(p, axis=0, keep_dims=True))                      # (BLOCK_L, BLOCK_K)

    pair = img * n_cap + cap
    region_rows = region_ptr + pair * K * NB + offs_k.to(tl.int64)[:, None] * NB
    word_rows = word_ptr + pair * L_out * NB + offs_t.to(tl.int64)[:, None] * NB
    for b0 in range(0, NB, BPC):
        blk = b0 + j_blk
        num_v = tl.zeros((BLOCK_K, BPC), dtype=ACC)
        sq_v = tl.zeros((BLOCK_K, BPC), dtype=ACC)
        sq_cv = tl.zeros((BLOCK_K, BPC), dtype=ACC)
        num_t = tl.zeros((BLOCK_L, BPC), dtype=ACC)
        sq_e = tl.zeros((BLOCK_L, BPC), dtype=ACC)
        sq_ct = tl.zeros((BLOCK_L, BPC), dtype=ACC)
        for w0 in range(0, DB, SUB):
            col = w0 + j_col
            col_ok = (col < DB) & (blk < NB)
            feat = blk * DB + col
            x = tl.load(v_rows[:, None] + feat[None, :], mask=k_valid[:, None] & col_ok[None, :], other=0.0)
            y = tl.load(e_rows[:, None] + feat[None, :], mask=t_valid[:, None] & col_ok[None, :], other=0.0)
            x = x.to(ACC)
            y = y.to(ACC)
            ctx_v = tl.dot(alpha, y, input_precision=DOT_PRECISION)                 # (BLOCK_K, BD)
            ctx_t = tl.dot(beta_t, x, input_precision=DOT_PRECISION)                # (BLOCK_L, BD)
            num_v += tl.sum(tl.reshape(x * ctx_v, (BLOCK_K, BPC, SUB)), axis=2)
            sq_v += tl.sum(tl.reshape(x * x, (BLOCK_K, BPC, SUB)), axis=2)
            sq_cv += tl.sum(tl.reshape(ctx_v * ctx_v, (BLOCK_K, BPC, SUB)), axis=2)
            num_t += tl.sum(tl.reshape(y * ctx_t, (BLOCK_L, BPC, SUB)), axis=2)
            sq_e += tl.sum(tl.reshape(y * y, (BLOCK_L, BPC, SUB)), axis=2)
            sq_ct += tl.sum(tl.reshape(ctx_t * ctx_t, (BLOCK_L, BPC, SUB)), axis=2)
        b_ok = (b0 + offs_b) < NB
        cos = num_v / tl.maximum(tl.sqrt(sq_v) * tl.sqrt(sq_cv), EPS)
        tl.store(region_rows + (b0 + offs_b)[None, :], cos, mask=k_valid[:, None] & b_ok[None, :])
        cos = num_t / tl.maximum(tl.sqrt(sq_e) * tl.sqrt(sq_ct), EPS)
        tl.store(word_rows + (b0 + offs_b)[None, :], cos, mask=t_valid[:, None] & b_ok[None, :])


# ----------------------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------------------

def jit_kernel(interpret: bool):
    """The ``@triton.jit`` object of the node_match kernel: interpreted or compiled."""
    return triton_utils.jit(_node_match_kernel, interpret)


def kernel_config(dtype: torch.dtype, *, K: int, block_l: int, d: int, num_blocks: int, interpret: bool = False,
                  chunk: int | None = None, precision: str = FP32_DOT_PRECISION) -> tuple[dict, dict]:
    """Constexpr values and launch options (num_warps, num_stages) of ``_node_match_kernel`` for one launch;
    ``chunk``: feature columns per step (default ``TARGET_CHUNK``); ``precision``: the float32 tl.dot precision
    (``itm_kernels._common.precision``; bf16/fp16 score products always run on tensor cores, the interpreter
    multiplies exactly). The untuned configuration: the compiled launcher autotunes warps and stages over it."""
    chunk = chunk or TARGET_CHUNK
    # SUB columns of each of BPC blocks per step; both powers of two (the per-block sums reshape the step's
    # columns), >= MIN_BLOCK columns in all for tl.dot, no more blocks than the op has unless tl.dot needs them.
    sub = min(triton.next_power_of_2(d // num_blocks), chunk)
    bpc = max(max(1, MIN_BLOCK // sub), min(triton.next_power_of_2(num_blocks), max(1, chunk // sub)))
    # The interpreter multiplies bfloat16 tiles wrongly (see _common/triton_utils.py): widen right after loading. Exact for
    # bf16/fp16 inputs (their products fit in float32); the GPU's native low-precision score product is only
    # compiled, not run.
    upcast = interpret and dtype != torch.float32
    constexprs = dict(ACC=tl.float32, UPCAST=upcast,
                      DOT_PRECISION=triton_utils.dot_precision(dtype, interpret, precision),
                      BLOCK_K=block_rows(K), BLOCK_L=block_l, SUB=sub, BPC=bpc, GROUP=GROUP_IMG)
    return constexprs, dict(num_warps=NUM_WARPS, num_stages=NUM_STAGES, enable_fp_fusion=True)


# The compiled launcher autotunes warps and stages (the feature step fixes the register tiles; wider steps spilled
# at compile time, see TARGET_CHUNK). Not run on a GPU yet: tools/gpu_check.py times them.
AUTOTUNE_WARPS = (4, 8)
AUTOTUNE_STAGES = (1, 2, 3)
AUTOTUNE_KEY = ["D", "DB", "NB", "BLOCK_K", "BLOCK_L", "SUB", "BPC", "DOT_PRECISION", "UPCAST"]


@functools.lru_cache(maxsize=None)
def autotuned_kernel():
    """The compiled ``_node_match_kernel`` under ``triton.autotune`` (it only stores its outputs, so the
    autotuner's repeated launches are harmless)."""
    configs = triton_utils.autotune_configs([{}], warps=AUTOTUNE_WARPS, stages=AUTOTUNE_STAGES)
    return triton.autotune(configs=configs, key=AUTOTUNE_KEY)(triton_utils.jit(_node_match_kernel, False))


def supported(images: torch.Tensor) -> bool:
    """Whether the kernel takes these inputs at all: float32/bfloat16/float16 and at most ``MAX_ROWS`` regions
    (captions longer than ``MAX_ROWS`` words are handed to the "torch" backend by the launcher)."""
    return images.dtype in (torch.float32, torch.bfloat16, torch.float16) and images.shape[1] <= MAX_ROWS


def node_match_triton(images: torch.Tensor, captions: torch.Tensor, cap_lens: torch.Tensor, *,
                      lambda_softmax: float, num_blocks: int, precision: str = FP32_DOT_PRECISION,
                      autotune: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """GSMN node matching with the Triton kernel; inputs already validated by ``itm_kernels.node_match``.

    Args:
        images: (N_img, K, d) contiguous float32/bfloat16/float16 (float64, or K > ``MAX_ROWS``: run by the
            "torch" backend instead).
        captions: (N_cap, L_max, d) contiguous, same dtype and device; ``cap_lens`` (N_cap,) int64 in 1..L_max.
        lambda_softmax, num_blocks: as ``itm_kernels.node_match``.
        precision: float32 tile products: "ieee" (exact float32 FMA, the default), "tf32" or "tf32x3" (tensor
            cores). bf16/fp16 score products always run on tensor cores.
        autotune: on a GPU, let ``triton.autotune`` pick warps and stages (its first launch per key benchmarks,
            which synchronises once).
    Returns:
        region_match (N_img, N_cap, K, num_blocks) and word_match (N_img, N_cap, L_max, num_blocks), float32,
        word rows beyond each length zero. Score products in the input dtype with float32 accumulation; the
        context products (alpha E, beta^T V) on float32 tiles at ``precision``; everything else float32.

    Captions are sorted by length and launched in power-of-two length buckets (a caption is padded to its bucket,
    not to L_max), found on the device: no host sync when L_max <= ``MAX_ROWS``. Longer L_max takes the host
    buckets (one sync) and runs the buckets beyond ``MAX_ROWS`` words on the "torch" backend. Memory (peak,
    beyond the inputs): the two float32 outputs and the index tensors; nothing per pair beyond them.
    Needs a CUDA device, or CPU tensors with ``TRITON_INTERPRET=1``.
    """
    from .torch import node_match_torch

    if not supported(images):
        return node_match_torch(images, captions, cap_lens, lambda_softmax=lambda_softmax, num_blocks=num_blocks)
    interpret = triton_utils.interpreted()
    triton_utils.check_mode(interpret)
    n_img, K, d = images.shape
    n_cap, L_max = captions.shape[:2]
    region = torch.empty(n_img, n_cap, K, num_blocks, dtype=torch.float32, device=images.device)
    word = torch.zeros(n_img, n_cap, L_max, num_blocks, dtype=torch.float32, device=images.device)
    if block_rows(L_max) <= MAX_ROWS:
        order, ranges, blocks = triton_utils.device_length_buckets(cap_lens, L_max)
        launches = [(order, ranges[b], block_l) for b, block_l in enumerate(blocks)]
    else:
        launches = []
        for cap_idx, block_l in triton_utils.length_buckets(cap_lens):          # host buckets: one sync
            if block_l > MAX_ROWS:
                idx = cap_idx.long()
                r, w = node_match_torch(images, captions[idx], cap_lens[idx], lambda_softmax=lambda_softmax,
                                        num_blocks=num_blocks)
                region.index_copy_(1, idx, r)
                word.index_copy_(1, idx, w)
            else:
                launches.append((cap_idx, triton_utils.full_range(cap_idx.numel(), images.device), block_l))
    for cap_idx, cap_range, block_l in launches:
        constexprs, options = kernel_config(images.dtype, K=K, block_l=block_l, d=d, num_blocks=num_blocks,
                                            interpret=interpret, precision=precision)
        kernel = jit_kernel(interpret)
        if autotune and not interpret:
            kernel = autotuned_kernel()
            options = dict(enable_fp_fusion=True)
        kernel[(n_img * n_cap,)](
            images, captions, cap_idx, cap_lens, cap_range, region, word, n_img, n_cap, K, L_max, d,
            d // num_blocks, num_blocks, images.stride(0), images.stride(1), captions.stride(0), captions.stride(1),
            float(lambda_softmax), **constexprs, **options)
    return region, word


def supports(images: torch.Tensor, captions: torch.Tensor) -> bool:
    """Whether this backend takes these inputs: float16/bfloat16/float32 (float64 runs on "torch")."""
    return images.dtype != torch.float64
