"""Benchmark of the SGRAF heads' all-pairs evaluation (``SGRAFSimilarity.sims``) against the official-style loop.

    python benchmarks/bench_sgraf.py --quick                # 20 x 100: about a minute
    python benchmarks/bench_sgraf.py                        # 100 x 500, SGR and SAF, float32 and bfloat16
    python benchmarks/bench_sgraf.py --size 1000x5000       # Flickr30K 1K test size (hours on 2 cores)
    python benchmarks/bench_sgraf.py --modules SAF --dtypes float32 --repeats 1

The official-style loop (``itm_models.baselines.sgraf.official_style_sims``, the official ``shard_attn_scores``
restated: shards of 100 images x 100 captions; per shard the image globals recomputed; per caption its globals, the
caption repeated once per image, the attended vectors (n_img, L, d) materialised, W_loc on every word, the global
branch, three SGR steps with separate query/key layers on every node, or SAF) is timed on the first
min(N_img, 100) images x ``--official-captions`` captions spread evenly over the gallery and extrapolated
linearly by pairs (marked "~"). It is timed fed float32 and, for bfloat16 rows, fed bfloat16 inputs under CPU
autocast to bfloat16 (its matrix products in bfloat16, as a user would run it).

Ours (``SGRAFSimilarity.sims`` with float32 or bfloat16 matrix products) runs ``--repeats`` times after a
warm-up call on a small block. Columns: both official-style times, ours, the speed-up over each, GFLOP/s of the
model's FLOPs, the bare-GEMM time of the model's FLOPs (the fastest of torch.mm, oneDNN linear and brgemm on
(8192 x d) @ (d x s) in the same dtype, timed in the same run, named) and its fraction (bare / ours; our SGR path
does fewer FLOPs than the model defines, so it can exceed 1), and the peak extra memory of one ``sims`` call in a
fresh process (the (N_img, N_cap) output counts).

Model FLOPs per pair (image, caption of L words, n = L + 1 graph nodes): the t2i attention 4 K L d (scores and
attended vectors), W_loc on every word and W_glo on the global node 2 d s n, then SGR: per step 3 x 2 s^2 n
(query, key, W_g) + 2 x 2 n^2 s (Q K^T, A X); or SAF: 4 s n (gate, weighted sum); plus the score 2 s
(``sgraf_flops``; at L = 12 the 24.4 / 8.6 MFLOP of SEMANTICS.md).

On a shared machine, compare only rows measured while the load average stayed below the core count;
``--threads 1`` is the robust per-core measurement. K = 36, d = 1024, s = 256, unit-norm embeddings
(``common.matched_features``), caption lengths uniform 8..20 (mean 14).
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (COMPARISON_HEADERS, Timing, comparison_cells, finish, gemm_yardstick,  # noqa: E402
                    matched_features, parse_size, peak_memory, print_table, standard_parser, start, subset_timing,
                    timings)
from itm_models.baselines.sgraf import official_style_sims  # noqa: E402
from itm_models.sgraf import SGRAFSimilarity  # noqa: E402

K, D, S, SGR_STEPS = 36, 1024, 256, 3


def sgraf_flops(lens: torch.Tensor, n_img: int, module: str, steps: int = SGR_STEPS) -> tuple[float, float]:
    """(model, ours) FLOPs of all n_img x len(lens) pairs (the count in the module docstring; ours folds query and
    key into one s x s product and runs the last SGR step on the global node only)."""
    n = lens.double().cpu() + 1                                 # graph nodes per caption
    shared = 4 * K * D * (n - 1) + 2 * D * S * n + 2 * S        # attention, W_loc + W_glo, score
    if module == "SGR":
        step = 3 * 2 * S * S * n + 2 * 2 * n * n * S
        model = shared + steps * step
        ours = shared + (steps - 1) * (2 * 2 * S * S * n + 2 * 2 * n * n * S) + 2 * 2 * S * S + 2 * 2 * n * S
    else:
        model = ours = shared + 4 * S * n
    return float(model.sum()) * n_img, float(ours.sum()) * n_img


def make_head(module: str, seed: int = 0) -> SGRAFSimilarity:
    """A full-size SGRAF head (d = 1024, s = 256, 3 SGR steps) with seeded random weights, eval mode."""
    torch.manual_seed(seed)
    return SGRAFSimilarity(D, S, module, SGR_STEPS).eval()


def sgraf_call(module: str, n_img: int, n_cap: int, dtype_name: str, state_path: str | None = None,
               signal: float = 0.3, noise: float = 0.95):
    """Builder for ``common.peak_memory``: a head (seeded, or loaded from ``state_path``), the gallery
    (``matched_features`` with ``signal``/``noise``) and the all-pairs ``sims`` call in ``dtype_name``."""
    head = make_head(module)
    if state_path is not None:
        head.load_state_dict(torch.load(state_path))
    images, captions, lens = matched_features(n_img, n_cap, d=D, signal=signal, noise=noise)
    dtype = getattr(torch, dtype_name)
    head.sims(images[:2], captions[:8], lens[:8], dtype=dtype)          # first-call allocations
    return lambda: head.sims(images, captions, lens, dtype=dtype)


def official_sgraf_timing(head: SGRAFSimilarity, images, captions, lens, dtype: torch.dtype, *, max_captions: int,
                          repeats: int, warmup: int = 1) -> Timing:
    """The official-style loop on min(N_img, 100) images x ``max_captions`` captions spread evenly over the gallery
    (their lengths follow the gallery's), fed ``dtype`` (bfloat16: inputs cast, CPU autocast to bfloat16),
    extrapolated linearly by pairs to the whole gallery."""
    n_img, n_cap = images.shape[0], captions.shape[0]
    sub_img, sub_cap = min(n_img, 100), max(1, min(n_cap, max_captions))
    idx = torch.linspace(0, n_cap - 1, sub_cap).round().long().to(captions.device)
    im, cap, ln = images[:sub_img].to(dtype), captions[idx].to(dtype), lens[idx]
    cast = (torch.autocast(images.device.type, dtype=dtype) if dtype != torch.float32
            else contextlib.nullcontext())

    def run():
        with torch.no_grad(), cast:
            official_style_sims(head, im, cap, ln)
    return subset_timing(run, n_img * n_cap, sub_img * sub_cap, repeats=repeats, warmup=warmup)


def main(argv=None):
    parser = standard_parser(__doc__, repeats=3)
    parser.add_argument("--size", default="100x500", help="N_imgxN_cap (1000x5000 for Flickr30K 1K)")
    parser.add_argument("--modules", default="SGR,SAF")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--official-captions", type=int, default=100,
                        help="captions (against min(N_img, 100) images) the official-style loop is timed on")
    args = parser.parse_args(argv)
    n_img, n_cap = parse_size("20x100" if args.quick else args.size)
    start("bench_sgraf", args)
    images, captions, lens = matched_features(n_img, n_cap, d=D)
    rows, notes = [], []
    yardsticks = {}
    for module in args.modules.split(","):
        head = make_head(module)
        model_flops, _ = sgraf_flops(lens, n_img, module)
        official32 = official_sgraf_timing(head, images, captions, lens, torch.float32,
                                           max_captions=args.official_captions, repeats=args.repeats)
        for name in args.dtypes.split(","):
            dtype = getattr(torch, name)
            if name not in yardsticks:
                yardsticks[name] = gemm_yardstick(1.0, dtype, 8192, D, S, repeats=args.repeats)
                notes.append(f"# {name} per FLOP: {yardsticks[name].note()}")
            bare = yardsticks[name].scaled(model_flops)
            off_same = None if dtype == torch.float32 else official_sgraf_timing(
                head, images, captions, lens, dtype, max_captions=args.official_captions, repeats=args.repeats)
            head.sims(images[:2], captions[:8], lens[:8], dtype=dtype)          # warm-up (first-call allocations)
            ours = timings(lambda: head.sims(images, captions, lens, dtype=dtype), repeats=args.repeats, warmup=0)
            mem = peak_memory(sgraf_call, module, n_img, n_cap, name, enabled=not args.no_memory)
            rows.append([f"{n_img}x{n_cap}", module, name, *comparison_cells(official32, off_same, ours),
                         f"{model_flops / ours.median / 1e9:.0f}", bare.cell(".3g"), bare.fraction(ours), mem])
            print(" | ".join(rows[-1]), flush=True)
    per_pair = {m: [f / (n_img * n_cap) / 1e6 for f in sgraf_flops(lens, n_img, m)] for m in ("SGR", "SAF")}
    print_table(f"SGRAF all-pairs evaluation (d={D}, s={S}, K={K}, mean L={float(lens.float().mean()):.1f}; seconds, "
                f"{args.repeats} repeats; '~' = official-style loop on min(N_img, 100) x {args.official_captions} "
                "pairs, extrapolated linearly by pairs; random heads)",
                ["size", "head", "dtype", *COMPARISON_HEADERS, "GFLOP/s (model FLOPs)",
                 "bare GEMM s of the model FLOPs (winner)", "fraction of GEMM limit", "peak extra MiB"], rows)
    print(f"# model FLOPs per pair: SGR {per_pair['SGR'][0]:.1f} M, SAF {per_pair['SAF'][0]:.1f} M; ours SGR "
          f"{per_pair['SGR'][1]:.1f} M")
    finish(notes)


if __name__ == "__main__":
    main()
