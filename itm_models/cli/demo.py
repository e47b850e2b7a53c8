"""``itm-demo`` / ``python -m itm_models.cli.demo``: the main job on built-in synthetic data.

Generates a synthetic dataset in the official precomputed layout (test split sized like Flickr30K's: 1,000
images x 5,000 captions), trains a small SCAN t2i model on it, evaluates it on the test split with the fused
kernels, and prints the metric table and a speed table (ours against the official-style loop, extrapolated from
a subset). About 3 to 5 minutes on 2 CPU cores with the defaults.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

from .args import nonnegative_int, output_dir, positive_float, positive_int, run_main


def _official_seconds_per_pair(model, dataset, n_img=50, n_cap=100) -> float:
    """Official-style loop (caption loop, weighted context per caption) on a subset, in seconds per pair."""
    from ..baselines.scan import official_style_sims
    from ..eval.similarity import encode_images, image_rows

    rows = image_rows(n_img, dataset.im_div)
    with torch.no_grad():
        img = encode_images(model, dataset.images, rows, progress=False).double()
        seqs = dataset.captions[:n_cap]
        lens = torch.tensor([len(s) for s in seqs])
        ids = torch.zeros(n_cap, int(lens.max()), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.as_tensor(s)
        cap = model.encode_captions(ids, lens).double()
    cfg = model.config
    t0 = time.perf_counter()
    official_style_sims(img, cap, lens, direction=cfg.cross_attn, norm=cfg.raw_feature_norm,
                        lambda_softmax=cfg.lambda_softmax, agg=model.agg, lambda_lse=cfg.lambda_lse)
    return (time.perf_counter() - t0) / (n_img * n_cap)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="itm-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=output_dir, default="runs/demo", help="folder for the data and the "
                        "checkpoints (the demo's own: a rerun replaces OUT/data and OUT/checkpoints)")
    parser.add_argument("--n-train", type=positive_int, default=2000, help="training images (5 captions each)")
    parser.add_argument("--n-test", type=positive_int, default=1000, help="test images (5 captions each)")
    parser.add_argument("--epochs", type=positive_int, default=2)
    parser.add_argument("--embed-size", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--lr", type=positive_float, default=5e-4)
    parser.add_argument("--max-violation", action="store_true", help="hardest negatives from the first step (the "
                        "official recipe; on this small synthetic set it can collapse to equal scores early on)")
    parser.add_argument("--seed", type=nonnegative_int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv=None) -> int:
    """``itm-demo``: exit status 0 on success; a bad option, an unusable --out or a failing step end with one line on
    stderr and exit status 2."""
    return run_main("itm-demo", _demo, argv)


def _demo(argv) -> int:
    args = _parser().parse_args(argv)

    from ..data import PrecompDataset
    from ..eval.similarity import similarity_matrix
    from ..eval.metrics import format_metrics_table, recall
    from ..scan import SCANConfig
    from ..data.synthetic import make_synthetic_dataset
    from ..data.tokenize import Vocabulary
    from ..train import train

    torch.manual_seed(args.seed)
    data_dir = os.path.join(args.out, "data")
    t_start = time.perf_counter()
    print(f"1/3 synthetic dataset -> {data_dir}", flush=True)
    make_synthetic_dataset(data_dir, n_train=args.n_train, n_dev=200, n_test=args.n_test, seed=args.seed)
    vocab = Vocabulary.load(os.path.join(data_dir, "vocab.json"))
    config = SCANConfig(vocab_size=len(vocab), embed_size=args.embed_size, bi_gru=True, cross_attn="t2i",
                        agg_func="LogSumExp", lambda_softmax=9.0, lambda_lse=6.0,
                        max_violation=args.max_violation, num_epochs=args.epochs, lr_update=max(1, args.epochs - 1),
                        learning_rate=args.lr,
                        batch_size=args.batch_size)
    t_data = time.perf_counter()
    print(f"2/3 training SCAN t2i (d={args.embed_size}, {args.epochs} epochs, {args.n_train * 5} captions)",
          flush=True)
    result = train(config, data_dir, os.path.join(args.out, "checkpoints"), seed=args.seed, device="cpu",
                   progress=not args.no_progress, log=print, overwrite=True)
    t_train = time.perf_counter()
    print("3/3 evaluating on the test split with the fused kernels", flush=True)
    from ..checkpoints import load_checkpoint

    model = load_checkpoint(result["checkpoint_best"]).model
    test = PrecompDataset(data_dir, "test", vocab=vocab)
    t0 = time.perf_counter()
    sims = similarity_matrix(model, test, progress=not args.no_progress)
    metrics = recall(sims)
    t_eval = time.perf_counter() - t0
    per_pair = _official_seconds_per_pair(model, test)
    n_pairs = sims.size
    print(format_metrics_table(metrics, title=f"SCAN t2i on the synthetic test split ({sims.shape[0]} images x "
                                              f"{sims.shape[1]} captions)"))
    from itm_kernels._common.dispatch import choose_backend

    backend = choose_backend("auto", torch.device("cpu"))
    print("\nspeed (encode + all-pairs similarity + metrics)")
    print(f"| path | seconds | speed-up |\n|---|---|---|")
    print(f"| official-style loop, float64 (timed on 5,000 pairs, extrapolated) | ~{per_pair * n_pairs:.1f} | 1x |")
    print(f"| itm-kernels ({backend} backend), float32 | {t_eval:.1f} | {per_pair * n_pairs / t_eval:.0f}x |")
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s (data {t_data - t_start:.0f} s, training "
          f"{t_train - t_data:.0f} s, evaluation {t_eval:.1f} s); best dev rsum {result['best_rsum']:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
