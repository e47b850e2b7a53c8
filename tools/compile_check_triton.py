"""Compile the Triton kernels of ``itm_kernels`` (xattn_sim, xattn_topk, local_sim, node_match) for NVIDIA targets
without a GPU.

For each target (default sm_80 and sm_90), input dtype (default float32 and bfloat16) and direction, this compiles
the Gram kernel of the context side (t2i: images, 64-row tiles; i2t: captions, 32-row tiles), the attention
kernel and the in-kernel top-k (both ranked sides, k = 1 and 16), with the constexprs, launch options and argument specialisation the launcher would give a SCAN-sized
problem (K = 36 regions, captions in the 16-word bucket for t2i and the 32-word bucket for i2t, d = 1024), all the
way to a cubin (ptxas included). It prints the PTX and cubin sizes, registers and stack (spill) bytes per thread
(from ``cuobjdump -res-usage`` when it runs) and shared memory, and exits non-zero if any compilation fails.
Runs in its own process: a process that imported triton with ``TRITON_INTERPRET=1`` cannot compile.

    python tools/compile_check_triton.py                     # clipped_l2norm + lse (the README configuration)
    python tools/compile_check_triton.py --all-options       # every norm x agg: 232 kernels, a few minutes
    python tools/compile_check_triton.py --arch 90 --dtype float64
    python tools/compile_check_triton.py --sample 6 --run 3    # slice 3 of every reachable variant (fwd + bwd)
    python tools/compile_check_triton.py --ops       # local_sim (fwd + fused bwd) and node_match, SGRAF/GSMN size
    python tools/compile_check_triton.py --no-topk   # without the in-kernel top-k (xattn_topk) kernels

local_sim and node_match are compiled at SGRAF/GSMN size (``OP_SHAPES``: K = 36, d = 1024, s = 256, captions of up
to 32 words, 16 blocks) with their launchers' configs (``kernel_config``/``bwd_config`` of their modules); the
sampled variants (``--sample``) include them.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DTYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "float64": "fp64"}
# A SCAN-sized launch (COCO 1K: 1,000 images x 5,000 captions, K = 36 regions, d = 1024, L_max = 64): t2i runs
# the 3,000 captions of <= 16 words against the images; i2t the 3,000 captions of 17..32 words against them.
K, L_MAX, D = 36, 64, 1024
N_IMG, N_CAP, N_BUCKET = 1000, 5000, 3000
SHAPES = {"t2i": dict(block_c=64, block_q=16), "i2t": dict(block_c=32, block_q=64)}


def cuda_compiler_available() -> tuple[bool, str]:
    """Whether triton can compile for NVIDIA targets here (its CUDA backend and bundled ptxas), and why not."""
    try:
        import triton
        from triton.backends import backends

        if "nvidia" not in backends:
            return False, f"triton {triton.__version__} has no nvidia backend (has {sorted(backends)})"
        ptxas = triton.knobs.nvidia.ptxas.path
    except Exception as exc:  # no triton, or no ptxas binary
        return False, f"{type(exc).__name__}: {exc}"
    if not ptxas or not os.path.exists(ptxas):
        return False, f"ptxas not found ({ptxas!r})"
    return True, ""


def _specialize(fn, types: dict, values: dict, constexprs: dict) -> tuple[dict, dict, dict]:
    """(signature, constexprs, attrs) as the JIT would specialize a launch with these argument values: pointers
    (torch allocations) 16-byte aligned, integers divisible by 16 marked so, integers equal to 1 made constants."""
    constexprs = dict(constexprs)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif types.get(name, "").startswith("*"):
            sig[name] = types[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name in types:
            sig[name] = types[name]
        elif values[name] == 1:
            sig[name] = "constexpr"
            constexprs[name] = 1
        else:
            sig[name] = "i32" if abs(values[name]) < 2 ** 31 else "i64"
            if values[name] % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, constexprs, attrs


def _resources(cubin: bytes) -> dict:
    """Registers and spill bytes per thread, read from the cubin with cuobjdump (empty if it cannot be run)."""
    try:
        from triton.tools.disasm import path_to_cuobjdump

        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(cubin)
            f.flush()
            text = subprocess.check_output([path_to_cuobjdump(), "-res-usage", f.name], text=True,
                                           stderr=subprocess.STDOUT)
    except Exception:
        return {}
    found = {}
    for key, pattern in (("registers", r"REG:(\d+)"), ("stack", r"STACK:(\d+)"), ("local", r"LOCAL:(\d+)")):
        m = re.search(pattern, text)
        if m:
            found[key] = int(m.group(1))
    return found


# SGRAF / GSMN launches: K = 36 regions, d = 1024, s = 256 (local_sim), 16 blocks (node_match), L_max = 32.
OP_SHAPES = dict(K=36, L_MAX=32, D=1024, S=256, NB=16, N_IMG=1000, N_CAP=5000)
OP_KERNELS = ("local_sim", "local_sim_fix", "local_sim_bwd", "node_match")


def _compile(fn, types, values, constexprs, options, arch):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = _specialize(fn, types, values, constexprs)
    start = time.perf_counter()
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs, attrs=attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    return compiled, round(time.perf_counter() - start, 2)


def compile_op_one(kernel: str, arch: int, dtype_name: str, direction: str = "t2i", precision: str = "ieee") -> dict:
    """Compile one local_sim / node_match kernel variant (``OP_KERNELS``) for sm_<arch> at ``OP_SHAPES``."""
    import torch

    from itm_kernels._common.triton_utils import block_rows
    from itm_kernels.local_sim import triton as tls
    from itm_kernels.node_match import triton as tnm

    dtype = getattr(torch, dtype_name)
    elem = "*" + DTYPES[dtype_name]
    sh = OP_SHAPES
    K, L, D, S = sh["K"], sh["L_MAX"], sh["D"], sh["S"]
    ctx_rows, qry_rows = (K, L) if direction == "t2i" else (L, K)
    n_ctx, n_qry = (sh["N_IMG"], sh["N_CAP"]) if direction == "t2i" else (sh["N_CAP"], sh["N_IMG"])
    if kernel in ("local_sim", "local_sim_fix"):
        # local_sim_fix: the Gram guard's fix-up pass (the same kernel with FIX=True).
        constexprs, options = tls.kernel_config(dtype, K=ctx_rows, bucket=block_rows(qry_rows), s=S,
                                                precision=precision, fix=kernel == "local_sim_fix")
        fn = tls.jit_kernel(False)
        types = dict(img_ptr=elem, img_len_ptr="*i64", cap_ptr=elem, cap_idx_ptr="*i32", cap_len_ptr="*i64",
                     cap_range_ptr="*i32", gram_ptr="*fp32", w_ptr=elem, b_ptr="*fp32", out_ptr="*fp32",
                     flag_ptr="*i8", lambda_softmax="fp64")
        out_rows = L if direction == "t2i" else K
        pair = out_rows * S
        strides = (sh["N_CAP"] * pair, pair) if direction == "t2i" else (pair, sh["N_CAP"] * pair)
        values = dict(n_img=n_ctx, n_cap=n_qry, L_out=out_rows, D=D, S=S, stride_in=ctx_rows * D, stride_ik=D,
                      stride_cn=qry_rows * D, stride_ct=D, stride_ws=D, stride_oi=strides[0], stride_oc=strides[1])
    elif kernel == "local_sim_bwd":
        # The per-context-item launch (OUTER_CTX: the one that also accumulates dW/db).
        constexprs, options = tls.bwd_config(dtype, block_c=block_rows(ctx_rows), block_q=block_rows(qry_rows),
                                             block_s=block_rows(S), outer_ctx=True, precision=precision)
        fn = tls.jit_kernel(False, "local_sim_bwd")
        types = dict(ctx_ptr=elem, ctx_len_ptr="*i64", qry_ptr=elem, qry_len_ptr="*i64", gram_ptr="*fp32",
                     w_ptr=elem, b_ptr="*fp32", grad_ptr="*fp32", gout_ptr="*fp32", gw_ptr="*fp32", gb_ptr="*fp32",
                     lambda_softmax="fp64")
        out_rows = L if direction == "t2i" else K
        pair = out_rows * S
        g_strides = (sh["N_CAP"] * pair, pair) if direction == "t2i" else (pair, sh["N_CAP"] * pair)
        values = dict(n_inner=n_qry, D=D, S=S, stride_cn=ctx_rows * D, stride_cr=D, stride_qn=qry_rows * D,
                      stride_qr=D, stride_ws=D, stride_gc=g_strides[0], stride_gq=g_strides[1], stride_gt=S,
                      stride_on=ctx_rows * D, stride_or=D)
    elif kernel == "node_match":
        constexprs, options = tnm.kernel_config(dtype, K=K, block_l=block_rows(L), d=D, num_blocks=sh["NB"],
                                                precision=precision)
        fn = tnm.jit_kernel(False)
        types = dict(img_ptr=elem, cap_ptr=elem, cap_idx_ptr="*i32", cap_len_ptr="*i64", cap_range_ptr="*i32",
                     region_ptr="*fp32", word_ptr="*fp32", lambda_softmax="fp64")
        values = dict(n_img=sh["N_IMG"], n_cap=sh["N_CAP"], K=K, L_out=L, D=D, DB=D // sh["NB"], NB=sh["NB"],
                      stride_in=K * D, stride_ik=D, stride_cn=L * D, stride_ct=D)
    else:
        raise ValueError(f"unknown kernel {kernel!r}; one of {OP_KERNELS}")
    compiled, seconds = _compile(fn, types, values, constexprs, options, arch)
    info = dict(kernel=kernel, arch=f"sm_{arch}", dtype=dtype_name, direction=direction, norm="-", agg="-",
                precision=precision if dtype_name == "float32" else "-",
                ptx_bytes=len(compiled.asm["ptx"]), cubin_bytes=len(compiled.asm["cubin"]),
                shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                num_stages=compiled.metadata.num_stages, seconds=seconds)
    info.update(_resources(compiled.asm["cubin"]))
    return info


# The in-kernel top-k (itm_kernels/xattn_topk/triton.py), one kernel per ranked side; compiled at the SCAN-sized
# xattn_sim launch of its direction, with k = TOPK_KS (KP = 2, the smallest buffer; KP = MAX_K = 16, the largest).
TOPK_KERNELS = ("xattn_topk:images", "xattn_topk:captions")
TOPK_KS = (1, 16)


def compile_topk_one(kernel: str, arch: int, dtype_name: str, direction: str, norm: str = "clipped_l2norm",
                     agg: str = "lse", precision: str = "ieee", k: int = TOPK_KS[-1]) -> dict:
    """Compile one ``_xattn_topk_kernel`` variant (``TOPK_KERNELS``: which side is ranked) for sm_<arch>."""
    import torch

    from itm_kernels.xattn_topk import triton as tk

    dtype = getattr(torch, dtype_name)
    elem = "*" + DTYPES[dtype_name]
    queries = kernel.split(":")[1]
    query_is_ctx = (queries == "images") == (direction == "t2i")
    shape = SHAPES[direction]
    ctx_rows, qry_rows = (K, L_MAX) if direction == "t2i" else (L_MAX, K)
    n_ctx, n_qry = (N_IMG, N_BUCKET) if direction == "t2i" else (N_BUCKET, N_IMG)
    constexprs, options = tk.kernel_config(dtype, k=k, query_is_ctx=query_is_ctx, n_qry=n_qry, d=D, norm=norm,
                                           agg=agg, precision=precision, **shape)
    types = dict(ctx_ptr=elem, qry_ptr=elem, gram_ptr="*fp32", state_ptr="*i64", flag_ptr="*i8", ctx_idx_ptr="*i32",
                 qry_idx_ptr="*i32", ctx_len_ptr="*i64", qry_len_ptr="*i64", ctx_range_ptr="*i32",
                 qry_range_ptr="*i32", lambda_softmax="fp64", lambda_lse="fp64")
    values = dict(n_ctx=n_ctx, n_qry=n_qry, D=D, stride_cn=ctx_rows * D, stride_cr=D, stride_qn=qry_rows * D,
                  stride_qr=D)
    compiled, seconds = _compile(tk.jit_kernel(False), types, values, constexprs, options, arch)
    info = dict(kernel=kernel, arch=f"sm_{arch}", dtype=dtype_name, direction=direction, norm=norm, agg=agg,
                precision=precision if dtype_name == "float32" else "-", k=k,
                ptx_bytes=len(compiled.asm["ptx"]), cubin_bytes=len(compiled.asm["cubin"]),
                shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                num_stages=compiled.metadata.num_stages, seconds=seconds)
    info.update(_resources(compiled.asm["cubin"]))
    # The Gram guard's fix-up specialisation (runs on flagged programs only): compiled too, its resources reported.
    fixed, fix_seconds = _compile(tk.jit_kernel(False), types, values, dict(constexprs, FIX=True), options, arch)
    info.update({f"fix_{key}": val for key, val in _resources(fixed.asm["cubin"]).items()})
    info["seconds"] = seconds + fix_seconds
    return info


def compile_one(kernel: str, arch: int, dtype_name: str, direction: str, norm: str = "clipped_l2norm",
                agg: str = "lse", precision: str = "ieee") -> dict:
    """Compile one kernel variant to a cubin for sm_<arch>; returns what was compiled and its resource use."""
    if kernel in OP_KERNELS:
        return compile_op_one(kernel, arch, dtype_name, direction, precision)
    if kernel in TOPK_KERNELS:
        return compile_topk_one(kernel, arch, dtype_name, direction, norm, agg, precision)
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from itm_kernels.xattn_sim import triton as tx

    dtype = getattr(torch, dtype_name)
    elem = "*" + DTYPES[dtype_name]
    acc = "*fp64" if dtype == torch.float64 else "*fp32"
    fn = tx.jit_kernel({"xattn_sim_fix": "xattn_sim"}.get(kernel, kernel)
                       if kernel in ("xattn_sim", "xattn_sim_fix", "xattn_sim_bwd") else "gram", False)
    shape = SHAPES[direction]
    ctx_rows, qry_rows = (K, L_MAX) if direction == "t2i" else (L_MAX, K)
    n_ctx, n_qry = (N_IMG, N_BUCKET) if direction == "t2i" else (N_BUCKET, N_IMG)
    if kernel in ("xattn_sim", "xattn_sim_fix"):
        # xattn_sim_fix: the Gram guard's fix-up pass (the same kernel with FIX=True).
        constexprs, options = tx.kernel_config(dtype, n_qry=n_qry, d=D, norm=norm, agg=agg, precision=precision,
                                               fix=kernel == "xattn_sim_fix", **shape)
        types = dict(ctx_ptr=elem, qry_ptr=elem, gram_ptr=acc, out_ptr=acc, ctx_idx_ptr="*i32", qry_idx_ptr="*i32",
                     ctx_len_ptr="*i64", qry_len_ptr="*i64", ctx_range_ptr="*i32", qry_range_ptr="*i32",
                     flag_ptr="*i8", lambda_softmax="fp64", lambda_lse="fp64")
        out_strides = (N_CAP, 1) if direction == "t2i" else (1, N_CAP)
        values = dict(n_ctx=n_ctx, n_qry=n_qry, D=D, stride_cn=ctx_rows * D, stride_cr=D, stride_qn=qry_rows * D,
                      stride_qr=D, stride_oc=out_strides[0], stride_oq=out_strides[1])
    elif kernel == "xattn_sim_bwd":
        # The per-context-item launch (OUTER_CTX) at the forward's tile heights (the other launch differs only in
        # its second d-loop); the backward's tiles are not bucketed: K and L_max rounded up.
        constexprs, options = tx.bwd_config(dtype, block_c=shape["block_c"], block_q=shape["block_q"], d=D,
                                            norm=norm, agg=agg, outer_ctx=True, precision=precision)
        types = dict(ctx_ptr=elem, qry_ptr=elem, gram_ptr=acc, grad_ptr=acc, gout_ptr=acc, ctx_len_ptr="*i64",
                     qry_len_ptr="*i64", lambda_softmax="fp64", lambda_lse="fp64")
        grad_strides = (N_CAP, 1) if direction == "t2i" else (1, N_CAP)
        values = dict(n_inner=n_qry, D=D, stride_cn=ctx_rows * D, stride_cr=D, stride_qn=qry_rows * D, stride_qr=D,
                      stride_gc=grad_strides[0], stride_gq=grad_strides[1], stride_on=ctx_rows * D, stride_or=D)
    else:
        constexprs, options = tx.gram_config(dtype, block_r=shape["block_c"], d=D)
        types = dict(x_ptr=elem, idx_ptr="*i32", len_ptr="*i64", gram_ptr=acc)
        values = dict(D=D, stride_xn=ctx_rows * D, stride_xr=D)
    signature, constexprs, attrs = _specialize(fn, types, values, constexprs)
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    start = time.perf_counter()
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    info = dict(kernel=kernel, arch=f"sm_{arch}", dtype=dtype_name, direction=direction, norm=norm, agg=agg,
                precision=precision if dtype_name == "float32" else "-",
                ptx_bytes=len(compiled.asm["ptx"]), cubin_bytes=len(compiled.asm["cubin"]),
                shared_bytes=compiled.metadata.shared, num_warps=compiled.metadata.num_warps,
                num_stages=compiled.metadata.num_stages, seconds=round(time.perf_counter() - start, 2))
    info.update(_resources(compiled.asm["cubin"]))
    return info


def compile_check(archs=(80, 90), dtypes=("float32", "bfloat16"), directions=("t2i", "i2t"), all_options=False,
                  log=print, topk=True) -> list[dict]:
    """Compile every requested variant; returns one dict per kernel. Raises on the first failure.

    Per (arch, dtype, direction): the Gram and xattn_sim kernels (every norm x agg with ``all_options``) and, with
    ``topk`` (not for float64), the top-k kernel for both ranked sides at k = ``TOPK_KS``.

    Must run in a process that imported triton without ``TRITON_INTERPRET=1``: triton builds its standard library
    (tl.sum, tl.max, tl.cdiv, ...) for the interpreter at import time, and that cannot be compiled afterwards.
    """
    from itm_kernels.xattn_sim import reference
    from itm_kernels.xattn_sim import triton as xattn_triton

    if xattn_triton.triton_imported_interpreted():
        raise RuntimeError("triton was imported with TRITON_INTERPRET=1 in this process; run the compile check in "
                           "a fresh process without it (python tools/compile_check_triton.py)")

    options = list(itertools.product(reference.NORMS, reference.AGGS)) if all_options else [("clipped_l2norm",
                                                                                              "lse")]
    results = []
    for arch, dtype_name, direction in itertools.product(archs, dtypes, directions):
        jobs = ([(compile_one, "gram", options[0], {})] + [(compile_one, "xattn_sim", o, {}) for o in options]
                + [(compile_one, "xattn_sim_fix", o, {}) for o in options])
        if topk and dtype_name != "float64":  # float64 top-k runs the streaming driver
            jobs += [(compile_topk_one, kernel, options[0], dict(k=k)) for kernel in TOPK_KERNELS for k in TOPK_KS]
        for fn, kernel, (norm, agg), extra in jobs:
            try:
                info = fn(kernel, arch, dtype_name, direction, norm, agg, **extra)
            except Exception as exc:
                raise RuntimeError(f"compiling {kernel} for sm_{arch} {dtype_name} {direction} {norm}/{agg} "
                                   f"{extra} failed: {exc}") from exc
            log("  ".join(f"{k}={v}" for k, v in info.items()))
            results.append(info)
    return results


def all_variants(archs=(80, 90)) -> list[tuple]:
    """Every Triton variant a user can reach: (kernel, arch, dtype, direction, norm, agg, precision), precision only
    varying for float32 (bf16/fp16/fp64 tiles ignore it)."""
    from itm_kernels.xattn_sim import reference

    dtypes = [("float32", p) for p in ("ieee", "tf32", "tf32x3")] + [(d, "ieee") for d in ("bfloat16", "float16",
                                                                                             "float64")]
    xattn = [(kernel, arch, dtype, direction, norm, agg, precision)
             for kernel in ("xattn_sim", "xattn_sim_fix", "xattn_sim_bwd") for arch in archs
             for dtype, precision in dtypes
             for direction in ("t2i", "i2t") for norm in reference.NORMS for agg in reference.AGGS]
    # local_sim (forward and fused backward, both directions) and node_match (t2i only: it computes both ways at
    # once): no norm/agg options; no float64 kernels (float64 runs on "torch").
    op_dtypes = [d for d in dtypes if d[0] != "float64"]
    ops = [(kernel, arch, dtype, direction, "-", "-", precision)
           for kernel in OP_KERNELS for arch in archs for dtype, precision in op_dtypes
           for direction in (("t2i",) if kernel == "node_match" else ("t2i", "i2t"))]
    # The in-kernel top-k: both ranked sides, no float64 kernel (float64 runs the streaming driver), k = 16.
    topk = [(kernel, arch, dtype, direction, norm, agg, precision)
            for kernel in TOPK_KERNELS for arch in archs for dtype, precision in op_dtypes
            for direction in ("t2i", "i2t") for norm in reference.NORMS for agg in reference.AGGS]
    return xattn + ops + topk


def sampled_variants(count: int, run: int, archs=(80, 90)) -> list[tuple]:
    """Slice ``run`` of ``count`` variants of a fixed shuffle of :func:`all_variants`: consecutive runs (CI's run
    number) cover every variant once every ceil(len / count) runs."""
    import random

    variants = all_variants(archs)
    random.Random(16).shuffle(variants)
    start = (run * count) % len(variants)
    return (variants + variants)[start:start + count]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="SM version, repeatable (default 80 and 90)")
    parser.add_argument("--dtype", action="append", choices=sorted(DTYPES),
                        help="input dtype, repeatable (default float32 and bfloat16)")
    parser.add_argument("--direction", action="append", choices=["t2i", "i2t"], help="default both")
    parser.add_argument("--all-options", action="store_true", help="every norm x agg, not only clipped_l2norm/lse")
    parser.add_argument("--json", action="store_true", help="end with one line: the results as a JSON list")
    parser.add_argument("--sample", type=int, metavar="N",
                        help="compile N variants of every reachable one (kernel x arch x dtype/precision x direction x "
                             "norm x agg), slice --run of a fixed shuffle, instead of the default set")
    parser.add_argument("--run", type=int, default=int(os.environ.get("GITHUB_RUN_NUMBER", "0")),
                        help="which slice --sample takes (default $GITHUB_RUN_NUMBER, else 0)")
    parser.add_argument("--no-topk", action="store_true", help="skip the xattn_topk kernels of the default set")
    parser.add_argument("--ops", action="store_true",
                        help="compile local_sim (forward + fused backward) and node_match instead of xattn_sim")
    args = parser.parse_args(argv)
    # Compile for real every time: a cache hit would prove only that an earlier run compiled.
    os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("0", ""):
        print("note: ignoring TRITON_INTERPRET for this compile-only run", file=sys.stderr)
        os.environ["TRITON_INTERPRET"] = "0"
    available, why = cuda_compiler_available()
    if not available:
        print(f"FAILED: cannot compile for CUDA targets: {why}", file=sys.stderr)
        return 1
    if args.ops:
        results = []
        for arch, dtype in itertools.product(args.arch or (80, 90), args.dtype or ("float32", "bfloat16")):
            for kernel in OP_KERNELS:
                for direction in (("t2i",) if kernel == "node_match" else args.direction or ("t2i", "i2t")):
                    try:
                        info = compile_op_one(kernel, arch, dtype, direction)
                    except Exception as exc:
                        print(f"FAILED: compiling {kernel} sm_{arch} {dtype} {direction}: {exc}", file=sys.stderr)
                        return 1
                    print("  ".join(f"{k}={v}" for k, v in info.items()), flush=True)
                    results.append(info)
        print(f"OK: {len(results)} kernels compiled")
        if args.json:
            print(json.dumps(results))
        return 0
    if args.sample:
        results = []
        for variant in sampled_variants(args.sample, args.run, tuple(args.arch or (80, 90))):
            kernel, arch, dtype, direction, norm, agg, precision = variant
            try:
                info = compile_one(kernel, arch, dtype, direction, norm, agg, precision)
            except Exception as exc:
                print(f"FAILED: compiling {variant}: {exc}", file=sys.stderr)
                return 1
            print("  ".join(f"{k}={v}" for k, v in info.items()))
            results.append(info)
        print(f"OK: {len(results)} kernels compiled (sample run {args.run})")
        if args.json:
            print(json.dumps(results))
        return 0
    try:
        results = compile_check(archs=tuple(args.arch or (80, 90)), dtypes=tuple(args.dtype or ("float32",
                                                                                                  "bfloat16")),
                                directions=tuple(args.direction or ("t2i", "i2t")), all_options=args.all_options,
                                topk=not args.no_topk)
    except Exception as exc:
        print(f"FAILED: {exc}", file=sys.stderr)
        return 1
    print(f"OK: {len(results)} kernels compiled")
    if args.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
