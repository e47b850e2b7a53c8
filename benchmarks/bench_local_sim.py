"""Benchmark of ``local_sim`` (SGRAF's local similarity vectors) on the CPU: the chunked torch path against the fused
C++ kernel ("cpu"), in float32 and bfloat16.

    python benchmarks/bench_local_sim.py                    # 60 x 300, 1 thread, float32 and bfloat16
    python benchmarks/bench_local_sim.py --threads 2 --size 100x500

Both are called as ``itm_models.sgraf`` calls them: ``local_sim_torch`` / ``local_sim_cpu`` with a preallocated
float32 output and the per-image Gram matrices given. Columns: seconds (median of ``--repeats`` after one warm-up
call), the torch path's time over this one, GFLOP/s counting 2 d s + 4 K d FLOPs per (image, word) (projection,
scores, attended vector), the fraction of the bare-GEMM rate (the faster of ``torch.mm`` and oneDNN brgemm on
(4096 x d) @ (d x s) in the same dtype, timed in the same run; MKL's float32 sgemm runs AVX2 code on AMD CPUs at
half brgemm's rate), and the peak extra memory of one call beyond its inputs and output (the rise of the
resident high-water mark, /proc/self/clear_refs + VmHWM, after glibc malloc_trim).

On a shared machine compare only rows measured while the load average stayed below the core count.
K = 36, d = 1024, s = 256, unit-norm embeddings (``common.matched_features``), caption lengths uniform 8..20.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (bare_gemm_rate, machine_line, matched_features, median_time, peak_extra_memory,  # noqa: E402
                    print_table, trim_heap)
from itm_kernels.local_sim import _have_cpu_kernel, local_sim_cpu, local_sim_gram, local_sim_torch  # noqa: E402

K, D, S = 36, 1024, 256
LAMBDA = 9.0


def gemm_rate(dtype: torch.dtype, repeats: int) -> float:
    """FLOP/s of the faster of torch.mm and brgemm on (4096 x d) @ (d x s) in ``dtype`` (``common.bare_gemm_rate``;
    ``repeats`` is kept for the command line, the helper takes the median of 3)."""
    return bare_gemm_rate(dtype, "cpu", 4096, D, S)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="60x300", help="N_imgxN_cap")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core rates)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median)")
    args = parser.parse_args(argv)
    if not _have_cpu_kernel():
        sys.exit("the compiled extension (itm_kernels._C) with local_sim_cpu_ is not built")
    torch.set_num_threads(args.threads)
    n_img, n_cap = (int(x) for x in args.size.lower().split("x"))
    print(f"# bench_local_sim | {machine_line()} | load average {os.getloadavg()[0]:.2f} at start")
    g = torch.Generator().manual_seed(0)
    weight = (torch.rand(S, D, generator=g) * 2 - 1) * (6.0 / (D + S)) ** 0.5
    bias = torch.rand(S, generator=g) * 0.1 - 0.05
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        images, captions, lens = matched_features(n_img, n_cap, K=K, d=D, dtype=dtype)
        words = int(lens.sum()) * n_img
        flops = words * (2 * D * S + 4 * K * D)
        rate = gemm_rate(dtype, args.repeats)
        gram = local_sim_gram(images)
        out = torch.empty(n_img, n_cap, captions.shape[1], S)
        w = weight.to(dtype)                     # as SGRAF: the weight in the features' dtype, the bias in float32
        t_torch = None
        for label, fn in (("torch", local_sim_torch), ("cpu", local_sim_cpu)):
            def call(fn=fn):
                fn(images, captions, lens, w, bias, lambda_softmax=LAMBDA, out=out, gram=gram)

            call()                                                          # warm-up
            trim_heap()
            _, peak = peak_extra_memory(call)
            t = median_time(call, repeats=args.repeats, warmup=0)
            t_torch = t_torch or t
            rows.append([name, label, f"{n_img}x{n_cap}", args.threads, f"{t:.3f}", f"{t_torch / t:.2f}",
                         f"{flops / t / 1e9:.0f}", f"{flops / rate / t:.2f}", f"{peak / 2**20:.1f}"])
        rows.append([name, "bare mm", "4096x1024 @ 1024x256", args.threads, "", "", f"{rate / 1e9:.0f}", "1.00", ""])
    print_table(f"local_sim forward (K={K}, d={D}, s={S}, lengths 8..20, {n_img} images x {n_cap} captions, "
                f"{(2 * D * S + 4 * K * D) / 1e6:.2f} MFLOP per (image, word)); median of {args.repeats}",
                ["dtype", "path", "size", "threads", "seconds", "speed-up", "GFLOP/s", "of bare GEMM",
                 "peak extra MiB"], rows)
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
