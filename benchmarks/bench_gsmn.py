"""All-pairs GSMN evaluation (dense, sparse, dense + sparse ensemble): ours against the official-style loop.

    python benchmarks/bench_gsmn.py                  # 1,000 x 5,000 (Flickr30K test size); minutes on 2 cores
    python benchmarks/bench_gsmn.py --quick          # 200 x 1,000

For each head it prints: the official-style loop's time (per caption, both graphs, the released data movement;
median of 3 runs on a subset, extrapolated linearly by pairs, marked "~"), ours in float32 and bfloat16 inputs (GSMN's
matching kernel computes in float32 either way on the CPU), the speed-up, ours over the hardware limit, peak extra
memory, and the largest score difference to the official-style loop on the subset.

Hardware limit ("bare GEMM, same FLOPs"): the released algorithm's irreducible matrix products per pair are the
score tile (2 K L d FLOPs) and the two attended contexts (2 K L d each), 6 K L d in all; the limit is the time of
the bare packed score product (N_img K x d) @ (d x sum L) in the inputs' dtype, measured in the same run, times 3.
(Ours never forms the contexts: it runs the score product as 16 block products and reads |context|^2 from Gram
matrices, so it can beat that limit.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from itm_models.gsmn import GSMNSimilarity  # noqa: E402
from itm_models.baselines.gsmn import official_style_sims  # noqa: E402
from itm_models.data.synthetic import synthetic_boxes, synthetic_parses  # noqa: E402
from common import (bare_product_time, machine_line, matched_features, median_time, peak_extra_memory,  # noqa: E402
                    print_table)


def heads(seed: int = 0) -> dict:
    """Dense and sparse heads with random official-style weights, eval mode."""
    torch.manual_seed(seed)
    return {v: GSMNSimilarity(v).eval() for v in ("dense", "sparse")}


def official_seconds(head, images, captions, lens, boxes, sizes, parses, sub_img, sub_cap):
    """Official-style time for the full problem, extrapolated from a sub_img x sub_cap subset; and its scores."""
    args = (images[:sub_img], captions[:sub_cap], lens[:sub_cap], boxes[:sub_img], sizes[:sub_img],
            parses[:sub_cap])
    scores = None

    def run():
        nonlocal scores
        scores = official_style_sims(head, *args)
    t = median_time(run, repeats=3, warmup=0)
    return t * (images.shape[0] * captions.shape[0]) / (sub_img * sub_cap), scores


def run_gsmn(n_img: int, n_cap: int, official_subset=(100, 100), repeats: int = 1) -> str:
    """Time the dense, sparse and ensemble GSMN heads on n_img x n_cap synthetic pairs; print and return the table."""
    images, captions, lens = matched_features(n_img, n_cap)
    boxes, sizes = synthetic_boxes(n_img)
    boxes, sizes = torch.from_numpy(boxes), torch.from_numpy(sizes)
    parses = synthetic_parses(lens.tolist())
    bare = 3 * bare_product_time(images, captions, lens)
    bare_bf16 = 3 * bare_product_time(images.bfloat16(), captions.bfloat16(), lens)
    sub_img, sub_cap = (min(n_img, official_subset[0]), min(n_cap, official_subset[1]))
    rows, totals = [], {"fp32": 0.0, "bf16": 0.0, "official": 0.0}
    for variant, head in heads().items():
        official, off_scores = official_seconds(head, images, captions, lens, boxes, sizes, parses, sub_img, sub_cap)
        for label, dtype, limit in (("fp32", torch.float32, bare), ("bf16", torch.bfloat16, bare_bf16)):
            def ours():
                return head.sims(images, captions, lens, boxes, sizes, parses, dtype=dtype, progress=True)
            start = time.perf_counter()
            scores, mem = peak_extra_memory(ours)                       # the first timed run
            times = [time.perf_counter() - start] + [median_time(ours, repeats=1, warmup=0)
                                                     for _ in range(repeats - 1)]
            t = statistics.median(times)
            diff = (scores[:sub_img, :sub_cap] - off_scores).abs().max().item()
            totals[label] += t
            rows.append([variant, label, f"~{official:.1f}", f"{t:.2f}", f"{official / t:.1f}x", f"{t / limit:.2f}",
                         f"{mem / 2**20:.0f}", f"{diff:.1e}"])
        totals["official"] += official
    for label, limit in (("fp32", bare), ("bf16", bare_bf16)):
        rows.append(["ensemble", label, f"~{totals['official']:.1f}", f"{totals[label]:.2f}",
                     f"{totals['official'] / totals[label]:.1f}x", f"{totals[label] / (2 * limit):.2f}", "", ""])
    return print_table(f"GSMN all-pairs evaluation, {n_img} images x {n_cap} captions (K = 36, d = 1024, lengths 8..20); "
                f"official-style timed on {sub_img} x {sub_cap} and extrapolated (~); bare GEMM x3 = {bare:.2f} s "
                f"fp32, {bare_bf16:.2f} s bf16",
                ["head", "inputs", "official-style s", "ours s", "speed-up", "ours / bare GEMM (same FLOPs)",
                 "peak extra MiB", "max |ours - official|"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=1000)
    p.add_argument("--captions", type=int, default=5000)
    p.add_argument("--quick", action="store_true", help="200 images x 1,000 captions")
    p.add_argument("--official-subset", type=int, nargs=2, default=(100, 100), metavar=("IMAGES", "CAPTIONS"))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own, all cores)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    n_img, n_cap = (200, 1000) if args.quick else (args.images, args.captions)
    print(machine_line())
    run_gsmn(n_img, n_cap, args.official_subset, args.repeats)


if __name__ == "__main__":
    main()
