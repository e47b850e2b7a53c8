"""Benchmark of the SGRAF heads' all-pairs evaluation (``SGRAFSimilarity.sims``) against the official-style loop.

    python benchmarks/bench_sgraf.py                        # 200 x 1000, SGR and SAF, float32 and bfloat16
    python benchmarks/bench_sgraf.py --size 1000x5000       # Flickr30K 1K test size
    python benchmarks/bench_sgraf.py --modules SAF --dtypes float32 --repeats 1

The official-style loop (``itm_models.baselines.sgraf.official_style_sims``, the official ``shard_attn_scores``
restated: shards of 100 images x 100 captions; per shard the image globals recomputed; per caption its globals, the
caption repeated once per image, the attended vectors (n_img, L, d) materialised, W_loc on every word, the global
branch, three SGR steps with separate query/key layers on every node, or SAF) is timed on the first
``--official-captions`` captions against all images and extrapolated linearly by caption count (marked "~").

Ours runs once per configuration by default (``--repeats``), after a small warm-up call; the peak memory is taken
on the first timed run. Columns: ours in float32 and in bfloat16 (bf16 matrix products, float32 normalisations),
the speed-up over the official-style loop, GFLOP/s of our per-pair dense layers, and the fraction of the bare-GEMM
limit: the time the faster of ``torch.mm`` and oneDNN brgemm (``itm_kernels._common.fast_mm``; 2x MKL's float32 rate on AMD
CPUs) of shape (8192 x d) @ (d x s) in the same dtype, timed in the same run, needs
for those FLOPs, divided by our time.

On a shared machine, compare only rows measured while the load average stayed below the core count: two torch
threads competing with other processes for 2 cores run many times slower (OpenMP barriers); ``--threads 1`` is the
robust per-core measurement.

Per-pair dense-layer FLOPs (L + 1 nodes): official: 2 d s (L + 1) (W_loc on every word + W_glo) +
3 steps x 3 x 2 s^2 (L + 1) (SGR); ours: the same W_loc/W_glo + 2 steps x 2 x 2 s^2 (L + 1) (first two SGR steps:
two (s x s) GEMMs each, query-key folded) + 2 x 2 s^2 (last step, global node only); SAF adds 2 s (L + 1) to both. Peak memory: the rise of the
process's resident high-water mark (/proc/self/clear_refs + VmHWM, after glibc malloc_trim) while ``sims`` runs,
output included.
K = 36, d = 1024, s = 256, unit-norm embeddings, caption lengths uniform 8..20 (mean 14).
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
from common import (bare_gemm_rate, machine_line, matched_features, median_time, peak_extra_memory,  # noqa: E402
                    print_table, trim_heap)
from itm_models.baselines.sgraf import official_style_sims  # noqa: E402
from itm_models.sgraf import SGRAFSimilarity  # noqa: E402

D, S = 1024, 256


def dense_flops(lens: torch.Tensor, n_img: int, module: str, steps: int = 3) -> tuple[float, float]:
    """(official, ours) FLOPs of the per-pair dense layers over all pairs (see the module docstring)."""
    nodes = float((lens + 1).sum()) * n_img                 # sum over pairs of (L + 1)
    pairs = float(lens.numel()) * n_img
    loc_glo = 2 * D * S * nodes
    if module == "SGR":
        official = loc_glo + steps * 3 * 2 * S * S * nodes
        ours = loc_glo + (steps - 1) * 2 * 2 * S * S * nodes + 2 * 2 * S * S * pairs
    else:
        official = ours = loc_glo + 2 * S * nodes
    return official, ours


def gemm_rate(dtype: torch.dtype) -> float:
    """FLOP/s of the faster of torch.mm and brgemm on (8192 x d) @ (d x s) in ``dtype`` (median over repeats)."""
    return bare_gemm_rate(dtype, "cpu", 8192, D, S)


def make_head(module: str, seed: int = 0) -> SGRAFSimilarity:
    torch.manual_seed(seed)
    return SGRAFSimilarity(D, S, module, 3).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="200x1000", help="N_imgxN_cap (1000x5000 for Flickr30K 1K)")
    parser.add_argument("--modules", default="SGR,SAF")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of ours per configuration (median)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own, all cores)")
    parser.add_argument("--official-captions", type=int, default=100,
                        help="captions (against all images) the official-style loop is timed on")
    args = parser.parse_args(argv)
    n_img, n_cap = (int(x) for x in args.size.lower().split("x"))
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_sgraf | {machine_line()} | load average {os.getloadavg()[0]:.2f} at start")
    images, captions, lens = matched_features(n_img, n_cap, d=D)
    rates = {name: gemm_rate(getattr(torch, name)) for name in args.dtypes.split(",")}
    print("# bare GEMM (8192 x 1024) @ (1024 x 256): " +
          ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in rates.items()))
    rows = []
    for module in args.modules.split(","):
        head = make_head(module)
        flops_official, flops_ours = dense_flops(lens, n_img, module)
        sub = min(n_cap, args.official_captions)
        t0 = time.perf_counter()
        official_style_sims(head, images, captions, lens, max_captions=sub)
        t_official = (time.perf_counter() - t0) * n_cap / sub
        mark = "" if sub == n_cap else "~"
        rows.append([module, f"{n_img}x{n_cap}", "official-style fp32", f"{mark}{t_official:.1f}", "1.0",
                     f"{flops_official / t_official / 1e9:.0f}", "", "", f"{sub} captions, extrapolated" if mark
                     else "measured"])
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            img, cap = images.to(dtype), captions.to(dtype)
            head.sims(img[:2], cap[:8], lens[:8])                            # warm-up (first-call allocations)
            times = []

            def timed():
                t0 = time.perf_counter()
                head.sims(img, cap, lens)
                times.append(time.perf_counter() - t0)

            trim_heap()
            _, peak = peak_extra_memory(timed)                               # first run: time and peak memory
            for _ in range(args.repeats - 1):
                timed()
            t = statistics.median(times)
            limit = flops_ours / rates[name]
            rows.append([module, f"{n_img}x{n_cap}", f"ours {name}", f"{t:.2f}", f"{t_official / t:.1f}",
                         f"{flops_ours / t / 1e9:.0f}", f"{limit / t:.2f}", f"{peak / 2**20:.0f}",
                         f"median of {len(times)}"])
    print_table(f"SGRAF all-pairs evaluation (d={D}, s={S}, K=36, mean L={float(lens.float().mean()):.1f}); "
                f"official dense FLOPs/pair: SGR {dense_flops(lens, 1, 'SGR')[0] / n_cap / 1e6:.1f} M, "
                f"SAF {dense_flops(lens, 1, 'SAF')[0] / n_cap / 1e6:.1f} M; ours SGR "
                f"{dense_flops(lens, 1, 'SGR')[1] / n_cap / 1e6:.1f} M",
                ["head", "size", "run", "seconds", "speed-up", "GFLOP/s (own FLOPs)", "of bare GEMM",
                 "peak MiB", "note"], rows)
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
