"""Benchmark of itm_kernels.xattn_sim against the official-style loop and the bare matrix product.

    python benchmarks/bench_xattn_sim.py --quick                  # 60 x 300: about a minute
    python benchmarks/bench_xattn_sim.py                          # 200 x 1,000, t2i/i2t, fp32/bf16
    python benchmarks/bench_xattn_sim.py --sizes 1000x5000        # the report size (Flickr30K 1K test)
    python benchmarks/bench_xattn_sim.py --sizes 1000x5000 --dim 256   # small d: the epilogue's share is largest

Prints, per size x dtype x direction: the official-style loop (``itm_models.baselines.scan``) fed float32 and,
for bfloat16 rows, fed bfloat16 (timed on a subset of at most ``--official-pairs`` pairs and extrapolated
linearly by pairs where marked "~"), ours, the speed-up over each, the bare packed product
(N_img K x d) @ (d x sum L) in the same dtype by the fastest of torch.mm, oneDNN linear and brgemm (named),
timed in the same run, the fraction of that limit (bare / ours), and our peak extra memory of one call in a
fresh process (the (N_img, N_cap) output counts). K = 36, d = 1024 (``--dim``), lengths uniform 8..20.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itm_kernels  # noqa: E402
from itm_models.baselines.scan import official_style_sims  # noqa: E402
from common import (COMPARISON_HEADERS, SCAN_LAMBDAS, Timing, bare_product_timing, comparison_cells,  # noqa: E402
                    finish, parse_size, peak_memory, print_table, random_features, standard_parser, start,
                    subset_timing, timings)


def xattn_call(n_img: int, n_cap: int, dtype_name: str, direction: str, backend: str, device: str = "cpu",
               dim: int = 1024):
    """Builder for ``common.peak_memory``: the inputs of one row and the call that computes its similarities."""
    images, captions, lens = random_features(n_img, n_cap, d=dim, dtype=getattr(torch, dtype_name), device=device)
    lam1, lam2 = SCAN_LAMBDAS[direction]
    return lambda: itm_kernels.xattn_sim(images, captions, lens, direction=direction, lambda_softmax=lam1,
                                         lambda_lse=lam2, backend=backend)


def official_timing(images, captions, lens, direction, max_pairs, dtype, repeats, warmup) -> tuple[Timing, bool]:
    """Timing of the official-style loop fed ``dtype`` on at most ``max_pairs`` pairs, extrapolated to all pairs;
    and whether it ran on all pairs (no extrapolation)."""
    n_img, n_cap = images.shape[0], captions.shape[0]
    sub_img = min(n_img, 128)
    sub_cap = max(1, min(n_cap, max_pairs // sub_img))
    lam1, lam2 = SCAN_LAMBDAS[direction]
    im, cap, ln = images[:sub_img].to("cpu", dtype), captions[:sub_cap].to("cpu", dtype), lens[:sub_cap].cpu()
    t = subset_timing(lambda: official_style_sims(im, cap, ln, direction=direction, lambda_softmax=lam1,
                                                  lambda_lse=lam2),
                      n_img * n_cap, sub_img * sub_cap, repeats=repeats, warmup=warmup)
    return t, (sub_img, sub_cap) == (n_img, n_cap)


def main(argv=None):
    parser = standard_parser(__doc__)
    parser.add_argument("--sizes", default="200x1000", help="comma-separated N_imgxN_cap (report: 1000x5000)")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--directions", default="t2i,i2t")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--official-pairs", type=int, default=20000, help="pairs the official-style loop times")
    parser.add_argument("--dim", type=int, default=1024, help="feature size d")
    args = parser.parse_args(argv)
    start("bench_xattn_sim", args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = itm_kernels._common.dispatch.choose_backend(args.backend, torch.device(device))
    sizes = ["60x300"] if args.quick else args.sizes.split(",")
    print(f"# backend {backend}", flush=True)
    rows, notes = [], []
    for size in sizes:
        n_img, n_cap = parse_size(size)
        images32, captions32, lens = random_features(n_img, n_cap, d=args.dim, device=device)
        official32 = {d: official_timing(images32, captions32, lens, d, args.official_pairs, torch.float32,
                                         args.repeats, args.warmup) for d in args.directions.split(",")}
        for dtype_name in args.dtypes.split(","):
            dtype = getattr(torch, dtype_name)
            images, captions = images32.to(dtype), captions32.to(dtype)
            bare = bare_product_timing(images, captions, lens, repeats=args.repeats)
            notes.append(f"# {size} {dtype_name}: {bare.note()}")
            for direction in args.directions.split(","):
                lam1, lam2 = SCAN_LAMBDAS[direction]
                ours = timings(lambda: itm_kernels.xattn_sim(images, captions, lens, direction=direction,
                                                             lambda_softmax=lam1, lambda_lse=lam2, backend=backend),
                               repeats=args.repeats, warmup=args.warmup)
                off32, exact = official32[direction]
                off_same = None if dtype == torch.float32 else official_timing(
                    images32, captions32, lens, direction, args.official_pairs, dtype, args.repeats, args.warmup)[0]
                mark = "" if exact else "~"
                mem = peak_memory(xattn_call, n_img, n_cap, dtype_name, direction, backend, device=device,
                                  dim=args.dim, enabled=not args.no_memory)
                rows.append([size, direction, dtype_name, *comparison_cells(off32, off_same, ours, mark),
                             bare.cell(".3g"), bare.fraction(ours), mem, f"{n_img * n_cap * 4 / 2**20:.1f}"])
                print(" | ".join(rows[-1]), flush=True)
    print_table(f"xattn_sim, K=36, d={args.dim}, lengths 8..20, backend {backend} (seconds; '~' = official-style loop "
                f"timed on at most {args.official_pairs} pairs, extrapolated linearly by pairs; {args.repeats} "
                "repeats)",
                ["size", "dir", "dtype", *COMPARISON_HEADERS, "bare GEMM s (winner)", "fraction of GEMM limit",
                 "peak extra MiB", "fp32 output MiB"], rows)
    finish(notes)


if __name__ == "__main__":
    main()
