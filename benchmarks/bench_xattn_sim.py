"""Benchmark of itm_kernels.xattn_sim against the official-style loop and the bare matrix product.

    python benchmarks/bench_xattn_sim.py                       # 200x1000 and 1000x5000, t2i/i2t, fp32/bf16
    python benchmarks/bench_xattn_sim.py --sizes 100x500 --repeats 1

Prints, per direction x dtype x size: the official-style loop time (fed float32; measured on a subset of at most
``--official-pairs`` pairs and extrapolated linearly by pair count where marked "~"), ours, the speed-up, the bare
packed product (N_img K x d) @ (d x sum L) in the same dtype timed in the same run, ours / bare, and our extra peak
memory. K = 36, d = 1024, lengths uniform 8..20.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itm_kernels  # noqa: E402
from itm_models.baselines.scan import official_style_sims  # noqa: E402
from common import (bare_product_time, machine_line, median_time, peak_extra_memory, print_table,  # noqa: E402
                    random_features)

LAMBDAS = {"t2i": (9.0, 6.0), "i2t": (4.0, 5.0)}


def official_time(images, captions, lens, direction, max_pairs):
    """Seconds of the official-style loop on the full problem (extrapolated from a subset when too large)."""
    n_img, n_cap = images.shape[0], captions.shape[0]
    sub_img = min(n_img, 128)
    sub_cap = max(1, min(n_cap, max_pairs // sub_img))
    lam1, lam2 = LAMBDAS[direction]
    t = median_time(lambda: official_style_sims(
        images[:sub_img].float(), captions[:sub_cap].float(), lens[:sub_cap], direction=direction,
        lambda_softmax=lam1, lambda_lse=lam2), repeats=1, warmup=0)
    exact = sub_img == n_img and sub_cap == n_cap
    return t * (n_img * n_cap) / (sub_img * sub_cap), exact


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="200x1000,1000x5000", help="comma-separated N_imgxN_cap")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--directions", default="t2i,i2t")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--official-pairs", type=int, default=20000, help="pairs the official-style loop times")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = itm_kernels._common.dispatch.choose_backend(args.backend, torch.device(device))
    print(f"# bench_xattn_sim | backend {backend} | {machine_line()}")
    rows = []
    for size in args.sizes.split(","):
        n_img, n_cap = (int(x) for x in size.lower().split("x"))
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            images, captions, lens = random_features(n_img, n_cap, dtype=dtype, device=device)
            bare = bare_product_time(images, captions, lens, repeats=args.repeats)
            for direction in args.directions.split(","):
                lam1, lam2 = LAMBDAS[direction]
                run = lambda: itm_kernels.xattn_sim(images, captions, lens, direction=direction,  # noqa: E731
                                                    lambda_softmax=lam1, lambda_lse=lam2, backend=backend)
                _, peak = peak_extra_memory(run)
                ours = median_time(run, repeats=args.repeats, warmup=0)
                off, exact = official_time(images.cpu(), captions.cpu(), lens.cpu(), direction, args.official_pairs)
                rows.append([f"{n_img}x{n_cap}", direction, dtype_name, f"{'' if exact else '~'}{off:.2f}",
                             f"{ours:.3f}", f"{off / ours:.1f}x", f"{bare:.3f}", f"{ours / bare:.2f}",
                             f"{peak / 2**20:.0f}"])
                print(" | ".join(rows[-1]), flush=True)
    print_table("xattn_sim (seconds; '~' = official-style loop fed float32, timed on a subset and extrapolated "
                "linearly by pairs)",
                ["size", "dir", "dtype", "official-style s", "ours s", "speed-up", "bare GEMM s", "ours/bare",
                 "extra peak MiB"], rows)


if __name__ == "__main__":
    main()
