"""The headline benchmark: all-pairs SCAN evaluation (similarity matrix + recall metrics) on a synthetic
Flickr30K-sized test set (1,000 images x 5,000 captions, K = 36, d = 1024), ours against the official-style loop.

    python benchmarks/bench_eval.py                 # a few minutes on 2 cores
    python benchmarks/bench_eval.py --quick         # 200 x 1,000, under a minute

For SCAN t2i and i2t, in float32 and bfloat16, it prints: the official-style loop's time (fed float32; on a
subset, extrapolated linearly by pairs, and marked "~"), ours, the speed-up, ours over the bare packed GEMM
(the hardware limit, timed in the same run), peak extra memory, and whether the recall metrics are identical to
the reference's (float64 scores of the same pairs). It saves a log-log plot of time against gallery size.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itm_kernels  # noqa: E402
from itm_kernels import reference  # noqa: E402
from itm_models.metrics import format_metrics_table, recall  # noqa: E402
from common import (bare_product_time, machine_line, matched_features, median_time, peak_extra_memory,  # noqa: E402
                    print_table)

LAMBDAS = {"t2i": (9.0, 6.0), "i2t": (4.0, 5.0)}


def evaluate(images, captions, lens, direction, backend="auto"):
    lam1, lam2 = LAMBDAS[direction]
    sims = itm_kernels.xattn_sim(images, captions, lens, direction=direction, lambda_softmax=lam1,
                                 lambda_lse=lam2, backend=backend)
    return sims, recall(sims.cpu().numpy())


def official_seconds(images, captions, lens, direction, max_pairs):
    n_img, n_cap = images.shape[0], captions.shape[0]
    sub_img = min(n_img, 100)
    sub_cap = max(5, min(n_cap, max_pairs // sub_img))
    lam1, lam2 = LAMBDAS[direction]
    t0 = time.perf_counter()
    reference.official_style_sims(images[:sub_img].float().cpu(), captions[:sub_cap].float().cpu(),
                                  lens[:sub_cap].cpu(), direction=direction, lambda_softmax=lam1, lambda_lse=lam2)
    return (time.perf_counter() - t0) * n_img * n_cap / (sub_img * sub_cap)


def save_plot(curves: dict, path: Path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot (pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for label, pts in curves.items():
        xs, ys = zip(*sorted(pts))
        ax.loglog(xs, ys, marker="o", label=label, linestyle="--" if "official" in label else "-")
    ax.set_xlabel("gallery size (image-caption pairs)")
    ax.set_ylabel("seconds (similarity matrix + metrics)")
    ax.set_title("SCAN all-pairs evaluation")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return f"plot saved to {path}"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-img", type=int, default=1000)
    parser.add_argument("--quick", action="store_true", help="200 images x 1,000 captions")
    parser.add_argument("--directions", default="t2i,i2t")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--official-pairs", type=int, default=10000)
    parser.add_argument("--no-check", action="store_true", help="skip the float64 metrics check at full size")
    parser.add_argument("--plot", default="benchmarks/out/bench_eval.png")
    args = parser.parse_args(argv)
    n_img = 200 if args.quick else args.n_img
    sizes = sorted({max(20, n_img // 10), max(20, n_img // 4), n_img})
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = itm_kernels.backends.choose_backend("auto", torch.device(device))
    print(f"# bench_eval | backend {backend} | {machine_line()}", flush=True)
    rows, curves, shown = [], {}, False
    for direction in args.directions.split(","):
        for size in sizes:
            images32, captions32, lens = matched_features(size, 5 * size, device=device)
            off = official_seconds(images32, captions32, lens, direction, args.official_pairs)
            curves.setdefault(f"official-style {direction} (fp32 loop)", []).append((size * 5 * size, off))
            truth = None
            if size == n_img and not args.no_check:
                truth = evaluate(images32.double(), captions32.double(), lens, direction)[1]
            for dtype_name in args.dtypes.split(","):
                dtype = getattr(torch, dtype_name)
                images, captions = images32.to(dtype), captions32.to(dtype)
                (_, metrics), peak = peak_extra_memory(lambda: evaluate(images, captions, lens, direction))
                ours = median_time(lambda: evaluate(images, captions, lens, direction), repeats=args.repeats,
                                   warmup=0)
                curves.setdefault(f"ours {direction} {dtype_name}", []).append((size * 5 * size, ours))
                if size != n_img:
                    continue
                bare = bare_product_time(images, captions, lens, repeats=args.repeats)
                same = "n/a" if truth is None else ("yes" if metrics == truth else
                                                    f"no (rsum {metrics['rsum']:.2f} vs {truth['rsum']:.2f})")
                rows.append([f"{size}x{5 * size}", direction, dtype_name, f"~{off:.1f}", f"{ours:.2f}",
                             f"{off / ours:.0f}x", f"{bare:.2f}", f"{bare / ours:.2f}", f"{peak / 2**20:.0f}",
                             f"{metrics['rsum']:.1f}", same])
                print(" | ".join(rows[-1]), flush=True)
                if not shown:
                    print(format_metrics_table(metrics, title=f"metrics ({direction}, {dtype_name}, synthetic)"))
                    shown = True
    print_table("SCAN evaluation: similarity matrix + metrics (seconds; '~' = official-style loop fed float32, "
                "timed on a subset and extrapolated linearly by pairs)",
                ["gallery", "dir", "dtype", "official-style s", "ours s", "speed-up", "bare GEMM s",
                 "fraction of GEMM limit", "peak extra MiB", "rsum", "metrics identical to float64"], rows)
    print(save_plot(curves, Path(args.plot)))


if __name__ == "__main__":
    main()
