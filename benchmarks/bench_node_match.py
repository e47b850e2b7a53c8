"""Benchmark of ``node_match`` (GSMN's node-level matching vectors) on the CPU: the tiled torch path against the
fused C++ kernel ("cpu"), in float32 and bfloat16.

    python benchmarks/bench_node_match.py                    # 60 x 300, 1 thread, float32 and bfloat16
    python benchmarks/bench_node_match.py --threads 2 --size 100x500

Both are called as ``itm_models`` calls them: ``node_match_torch`` / ``node_match_cpu`` (no autograd) on a block of
pairs. Columns: seconds (median of ``--repeats`` after one warm-up call) with the min-max spread, the torch path's
time over this one, GFLOP/s counting 2 K L d FLOPs per pair (the score product; the Gram forms of both directions add
2 B K L (K + L) more, left out so that the rate is comparable with the GEMM), the fraction of the bare GEMM of the
same FLOPs (the packed (N_img K x d) @ (d x sum L) product, by the faster of ``torch.mm`` and oneDNN brgemm,
``common.bare_product_time``, timed in the same run), and the peak extra memory of one call beyond its inputs
(the rise of the resident high-water mark, /proc/self/clear_refs + VmHWM, after glibc malloc_trim; the outputs are
included, since the call allocates them).

On a shared machine compare only rows measured while the load average stayed below the core count.
K = 36, d = 1024, 16 blocks, lambda 20 (Flickr30K), unit-norm embeddings (``common.matched_features``), caption
lengths uniform 8..20.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (bare_product_time, machine_line, matched_features, peak_extra_memory,  # noqa: E402
                    print_table, trim_heap)
from itm_kernels.node_match.cpu import _have_cpu_kernel, node_match_cpu  # noqa: E402
from itm_kernels.node_match.torch import node_match_torch  # noqa: E402

K, D, B = 36, 1024, 16
LAMBDA = 20.0


def timings(fn, repeats: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn()`` (after the caller's warm-up)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="60x300", help="N_imgxN_cap")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: per-core rates)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per configuration (median, min-max)")
    args = parser.parse_args(argv)
    if not _have_cpu_kernel():
        sys.exit("the compiled extension (itm_kernels._C) with node_match_fused_ is not built")
    torch.set_num_threads(args.threads)
    n_img, n_cap = (int(x) for x in args.size.lower().split("x"))
    print(f"# bench_node_match | {machine_line()} | load average {os.getloadavg()[0]:.2f} at start")
    rows = []
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        images, captions, lens = matched_features(n_img, n_cap, K=K, d=D, dtype=dtype)
        flops = 2 * n_img * K * D * int(lens.sum())
        bare = bare_product_time(images, captions, lens)
        t_torch = None
        for label, fn in (("torch", node_match_torch), ("cpu", node_match_cpu)):
            def call(fn=fn):
                return fn(images, captions, lens, lambda_softmax=LAMBDA, num_blocks=B)

            call()                                                          # warm-up
            trim_heap()
            _, peak = peak_extra_memory(call)
            ts = timings(call, args.repeats)
            t = statistics.median(ts)
            t_torch = t_torch or t
            rows.append([name, label, f"{n_img}x{n_cap}", args.threads, f"{t:.3f}", f"{min(ts):.3f}-{max(ts):.3f}",
                         f"{t_torch / t:.2f}", f"{flops / t / 1e9:.0f}", f"{bare / t:.2f}", f"{peak / 2**20:.1f}"])
        rows.append([name, "bare mm", f"{n_img * K}x{D} @ {D}x{int(lens.sum())}", args.threads, f"{bare:.3f}", "",
                     "", f"{flops / bare / 1e9:.0f}", "1.00", ""])
    print_table(f"node_match forward (K={K}, d={D}, {B} blocks, lengths 8..20, {n_img} images x {n_cap} captions, "
                f"{2 * K * D * 14 / 1e6:.2f} MFLOP per pair of 14 words); median of {args.repeats}",
                ["dtype", "path", "size", "threads", "seconds", "min-max", "speed-up", "GFLOP/s", "of bare GEMM",
                 "peak extra MiB"], rows)
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
