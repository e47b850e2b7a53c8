"""The "cpu" backend: the C++ kernel ``torch.ops.itm_kernels.xattn_sim_fwd`` (csrc/xattn_sim/cpu.cpp).

Algorithm. One loop skeleton serves both directions on tiles of "context rows x query columns": t2i tiles are
(the regions of a block of images) x (the words of a block of captions, packed back to back: no padding work);
i2t tiles are (the words of a block of captions) x (the regions of a block of images). OpenMP threads take jobs
(one packed operand block and a range of blocks of the other operand) from a shared counter. Per tile, one
single-threaded GEMM writes the scores S into per-thread scratch (oneDNN brgemm through ATen's cpublas: float32,
and bfloat16 products accumulated in float32 with AVX-512-BF16/AMX where the CPU has them; ATen ``mm`` for
float64), then a fused epilogue runs on the hot tile: the query-axis norm, the softmax over the context axis,
``q.a = sum_c alpha_c s_c`` and ``|a|^2 = alpha^T G alpha`` with the context Gram matrix (G = V V^T per image for
t2i, H = E E^T per caption for i2t, computed once per call), the cosine and the aggregation. The attended vectors
and anything of size N_img x N_cap x K x L never exist. The epilogue is compiled for AVX-512, AVX2 and baseline
x86-64 and the level is picked per process (``itm_kernels.build_info()["simd"]``; ``ITM_KERNELS_ISA`` forces a
lower one).

Precision: float64 inputs are computed in float64 throughout (golden max error 2.5e-15). float32 inputs: the
float32 GEMM is summed over chunks of 128 features (a single accumulation chain over all 1024 features made the
scores' max error 4.6x that of MKL's sgemm) and the epilogue runs in float32 (golden max error 4.1e-7, under the
1e-6 bar; the PyTorch float32 reference reaches 4.5e-7). bfloat16 inputs: exact products accumulated in float32,
float32 epilogue (about 1e-4 of the error of PyTorch's own bfloat16 computation). float16 inputs are converted to
float32 once.

Speed (2 Zen 4 cores, K = 36, d = 1024, caption lengths 8..20, 1000 images x 5000 captions, process CPU time
relative to the bare packed product (36000 x 1024) @ (1024 x 70275) of the same dtype chunked into a reused output):
float32 t2i 0.55, i2t 0.52 (oneDNN's brgemm beats MKL's sgemm on this AMD CPU); bfloat16 t2i 1.32, i2t 1.16.

Memory (beyond the inputs and the (N_img, N_cap) output): per thread one scratch of at most ``max_tile_bytes``
(default 4 MiB; the tile is 8 images x caption blocks of up to 384 words, shrunk to fit, but never below one image
x the longest caption), plus per-call tables: the Gram matrices (N_img * K * K values for t2i, the sum of L_c^2
for i2t) and the query norms, and the float32 copies of float16 inputs. Measured extra peak RSS at 1000 x 5000:
32 MiB (float32) and 59 MiB (bfloat16), the 19 MiB output included. Results do not depend on the tiling (bitwise
for float32/bfloat16).

Small problems run on the calling thread (a thread is woken per few MFLOP of work). Tuning knobs for other
machines (not needed here): ITM_CPU_TILE_IMAGES, ITM_CPU_TILE_WORDS (tile shape), ITM_CPU_GEMM_NB (columns per
packed GEMM block, default 64).
"""
from __future__ import annotations

import torch

from .._common.constants import AGGS, DIRECTIONS, NORMS
from .._common.dispatch import load_extension

DIRECTION_CODES = {name: i for i, name in enumerate(DIRECTIONS)}  # t2i 0, i2t 1 (csrc/xattn_sim/math.h Direction)
NORM_CODES = {name: i for i, name in enumerate(NORMS)}            # softmax 0 ... no_norm 6 (Norm)
AGG_CODES = {name: i for i, name in enumerate(AGGS)}              # lse 0, mean 1, max 2, sum 3 (Agg)


def xattn_sim(images, captions, cap_lens, img_lens, *, direction, norm, lambda_softmax, agg, lambda_lse,
              max_tile_bytes=None):
    """All-pairs SCAN similarity on the CPU kernel; arguments already validated (see ``itm_kernels.xattn_sim``).

    Args:
        images: (N_img, K, d) contiguous CPU tensor, float32/float64/bfloat16/float16.
        captions: (N_cap, L_max, d), same dtype. cap_lens (N_cap,), img_lens (N_img,): int64 lengths.
        max_tile_bytes: per-thread scratch cap (None: 4 MiB).
    Returns:
        (N_img, N_cap) float64 for float64 inputs, float32 otherwise.
    """
    if load_extension() is None:
        raise RuntimeError("the cpu backend needs the compiled extension itm_kernels._C "
                           "(pip install --no-build-isolation -e .)")
    return torch.ops.itm_kernels.xattn_sim_fwd(
        images, captions, cap_lens.to(torch.long).contiguous(), img_lens.to(torch.long).contiguous(),
        DIRECTION_CODES[direction], NORM_CODES[norm], float(lambda_softmax), AGG_CODES[agg], float(lambda_lse),
        int(max_tile_bytes or 0))
