"""Triton helpers shared by the three ops' Triton backends (itm_kernels/xattn_sim/triton.py,
itm_kernels/local_sim/triton.py, itm_kernels/node_match/triton.py): the ``tl.constexpr`` copies of the shared
constants, the interpreter/compiler mode checks, tile sizes, one kernel-wrapping rule, the caption length buckets
(host-side and device-side), the float32 tl.dot precision rule, autotune configs, and the per-item Gram kernel
(G = X X^T over valid rows) that xattn_sim and local_sim both use.

Kernels are wrapped on first use, in the mode ``TRITON_INTERPRET`` selects then (:func:`jit`), so importing this
module fixes nothing. triton itself fixes the mode of its own library (tl.sum, tl.max, tl.cdiv) when it is first
imported, so the variable must be set before anything imports triton, and one process runs either interpreted or
compiled kernels: the launchers check (:func:`check_mode`), and ``tools/compile_check_triton.py`` runs in its own
process.
"""
import functools

import torch
import triton
import triton.language as tl

from . import constants
from .dtypes import out_dtype
from .precision import PRECISIONS, resolve_precision  # noqa: F401

# tl.constexpr copies of the ONE Python definition (itm_kernels/_common/constants.py).
EPS = tl.constexpr(constants.EPS)
LEAKY_SLOPE = tl.constexpr(constants.LEAKY_SLOPE)
# A finite stand-in for -inf in masked maxima: rows with nothing valid then give finite garbage (masked at the
# store) instead of inf - inf = NaN.
NEG_BIG = tl.constexpr(-1.0e30)

# tl.dot needs every tile dimension >= 16.
MIN_BLOCK = 16
# float32 tiles are multiplied in IEEE float32 (FMA, no tensor cores) unless the caller asks for tensor cores with
# precision="tf32" (10-bit mantissas: cannot hold the 1e-5 agreement with the float64 reference) or "tf32x3"
# (three tf32 products, near-float32 accuracy; no GPU has checked it). bf16/fp16 tiles always run on tensor cores.
FP32_DOT_PRECISION = "ieee"


def _gram_kernel(x_ptr, idx_ptr, len_ptr, gram_ptr, D, stride_xn, stride_xr,
                 ACC: tl.constexpr, UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """Gram matrix of one context item: G = X X^T over its valid rows.

    Program p reads item n = idx[p] (rows r < len[n] of x[n], the rest taken as 0) and writes the full padded
    (BLOCK_R, BLOCK_R) tile ``gram[p]`` in ACC (float32, or float64 for float64 inputs). The attention kernel uses
    it for |a_q|^2 = alpha_q^T G alpha_q, so the attended vectors a_q are never formed.
    """
    slot = tl.program_id(0)
    item = tl.load(idx_ptr + slot).to(tl.int64)
    n_rows = tl.load(len_ptr + item)
    offs_r = tl.arange(0, BLOCK_R)
    row_ptrs = x_ptr + item * stride_xn + offs_r.to(tl.int64) * stride_xr
    row_valid = offs_r < n_rows
    gram = tl.zeros((BLOCK_R, BLOCK_R), dtype=ACC)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(row_ptrs[:, None] + offs_d[None, :], mask=row_valid[:, None] & (offs_d < D)[None, :], other=0.0)
        if UPCAST:
            x = x.to(ACC)
        gram = tl.dot(x, tl.trans(x), gram, input_precision=DOT_PRECISION)
    out_ptrs = gram_ptr + slot.to(tl.int64) * (BLOCK_R * BLOCK_R) + offs_r[:, None] * BLOCK_R + offs_r[None, :]
    tl.store(out_ptrs, gram)


# ----------------------------------------------------------------------------------------------------------------
# Modes and wrapping
# ----------------------------------------------------------------------------------------------------------------

def interpreted() -> bool:
    """Whether kernels run in the Triton interpreter (``TRITON_INTERPRET=1``), read now rather than at import."""
    return bool(triton.knobs.runtime.interpret)


def triton_imported_interpreted() -> bool:
    """Whether triton's own ``@triton.jit`` library (tl.sum, tl.max, tl.cdiv, ...) was built for the interpreter.

    triton fixes this when it is first imported, from ``TRITON_INTERPRET``; interpreted kernels need it built for
    the interpreter and compiled kernels need it built for the compiler, so the variable must be set (or not)
    before anything imports triton, and one process cannot do both.
    """
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def check_mode(interpret: bool) -> None:
    if interpret != triton_imported_interpreted():
        raise RuntimeError(
            f"TRITON_INTERPRET is {'on' if interpret else 'off'} now but was "
            f"{'on' if not interpret else 'off'} when triton was first imported in this process; set it before "
            "importing triton (or anything that imports it)")


_check_mode = check_mode


@functools.lru_cache(maxsize=None)
def jit(fn, interpret: bool):
    """The ``@triton.jit`` object of the kernel function ``fn``: interpreted or compiled."""
    if interpret:
        from triton.runtime.interpreter import InterpretedFunction

        return InterpretedFunction(fn)
    return triton.runtime.JITFunction(fn)


def device_function(fn):
    """A ``@triton.jit`` device function (called from kernels, never launched), wrapped NOW in the mode triton's own
    library was imported in (:func:`triton_imported_interpreted`). Kernels are wrapped on first use instead, but a
    kernel finds its device functions among its module's globals, so they must exist at import; the mode triton
    was imported in is the only one in which a launch passes :func:`check_mode`, so this is never the wrong one."""
    return jit(fn, triton_imported_interpreted())


# Accumulation and output dtype of the kernels: float64 for float64 inputs, float32 otherwise (the one dtype rule).
acc_dtype = out_dtype


def block_rows(n: int) -> int:
    """Tile rows for items (regions, words) of up to ``n`` rows: a power of two, at least ``MIN_BLOCK``."""
    return max(MIN_BLOCK, triton.next_power_of_2(max(int(n), 1)))


# ----------------------------------------------------------------------------------------------------------------
# Gram tiles and length buckets
# ----------------------------------------------------------------------------------------------------------------

def gram_config(dtype: torch.dtype, *, block_r: int, d: int, interpret: bool = False) -> tuple[dict, dict]:
    """Constexpr values and launch options of ``_gram_kernel``."""
    return dict(BLOCK_R=block_r, **dtype_constexprs(dtype, d, interpret)), dict(num_warps=4, num_stages=2,
                                                                                  enable_fp_fusion=True)


def dot_precision(dtype: torch.dtype, interpret: bool, precision: str = FP32_DOT_PRECISION) -> str:
    """The tl.dot ``input_precision`` of a launch: the caller's float32 ``precision`` ("ieee", "tf32", "tf32x3";
    see ``itm_kernels._common.precision``) for compiled float32 tiles, "ieee" otherwise (bf16/fp16 tiles run on
    tensor cores whatever it says, float64 has no tf32, and the interpreter always multiplies exactly)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return precision if dtype == torch.float32 and not interpret else "ieee"


def autotune_configs(params: list[dict], *, warps=(4, 8), stages=(2, 3)) -> list:
    """``triton.Config`` objects: every dict of constexprs in ``params`` x ``warps`` x ``stages``."""
    return [triton.Config(dict(p), num_warps=w, num_stages=st) for p in params for w in warps for st in stages]


def dtype_constexprs(dtype: torch.dtype, d: int, interpret: bool, precision: str = FP32_DOT_PRECISION) -> dict:
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    if interpret:
        # The interpreter multiplies bfloat16 tiles wrongly: widen right after loading. Exact for bf16/fp16 inputs
        # (their products fit in float32), but the GPU's native low-precision tl.dot is only compiled, not run.
        # The smallest d-chunk makes small test sizes cover the d-loop and its ragged last chunk.
        return dict(ACC=acc, UPCAST=dtype != acc_dtype(dtype), DOT_PRECISION="ieee", BLOCK_D=MIN_BLOCK)
    block_d = {torch.float64: 16, torch.float32: 32}.get(dtype, 64)
    return dict(ACC=acc, UPCAST=False, DOT_PRECISION=precision if dtype == torch.float32 else "ieee",
                BLOCK_D=block_d)


def length_buckets(lengths: torch.Tensor):
    """Split items by length into power-of-two tile heights: yields (int32 index tensor, block rows)."""
    order = torch.argsort(lengths, stable=True)
    sorted_lens = lengths[order].cpu()
    blocks = [block_rows(n) for n in sorted_lens.tolist()]
    start = 0
    while start < len(blocks):
        stop = start
        while stop < len(blocks) and blocks[stop] == blocks[start]:
            stop += 1
        yield order[start:stop].to(torch.int32), blocks[start]
        start = stop


def gram(x: torch.Tensor, idx: torch.Tensor, lens: torch.Tensor, block_r: int, interpret: bool) -> torch.Tensor:
    """(len(idx), block_r, block_r) Gram tiles of x[idx] over their valid rows, in the accumulation dtype."""
    out = torch.empty(idx.numel(), block_r, block_r, dtype=acc_dtype(x.dtype), device=x.device)
    constexprs, options = gram_config(x.dtype, block_r=block_r, d=x.shape[2], interpret=interpret)
    jit(_gram_kernel, interpret)[(idx.numel(),)](x, idx, lens, out, x.shape[2], x.stride(0), x.stride(1),
                                                 **constexprs, **options)
    return out


def device_length_buckets(lengths: torch.Tensor, max_len: int):
    """Sync-free length buckets: (order, ranges, blocks) with ``order`` (int32) the items sorted by length,
    ``blocks`` the host-known tile heights 16, 32, ..., block_rows(max_len) (from the shape, not the lengths) and
    ``ranges[b]`` = (start, count) in ``order`` of the items whose block_rows(length) is blocks[b], on the device."""
    blocks = []
    while not blocks or blocks[-1] < block_rows(max_len):
        blocks.append(MIN_BLOCK * 2 ** len(blocks))
    order = torch.argsort(lengths, stable=True)
    sorted_lens = lengths[order]
    bounds = MIN_BLOCK * torch.pow(torch.full((len(blocks),), 2, dtype=torch.long, device=lengths.device),
                                   torch.arange(len(blocks), device=lengths.device))
    ends = torch.searchsorted(sorted_lens, bounds.to(sorted_lens.dtype), right=True)
    starts = torch.cat([torch.zeros_like(ends[:1]), ends[:-1]])
    ranges = torch.stack([starts, ends - starts], dim=1).to(torch.int32)
    return order.to(torch.int32), ranges, blocks


def full_range(count: int, device) -> torch.Tensor:
    """The device range (start 0, ``count`` items) of one bucket holding every item: int32 (2,), no sync."""
    return torch.stack([torch.zeros((), dtype=torch.int32, device=device),
                        torch.full((), count, dtype=torch.int32, device=device)])
