"""TSHSR (our design after the paper's abstract; no official code or numbers exist): the ablation table on the
synthetic data with harder negatives, and the all-pairs evaluation row of ``bench_eval.py --models tshsr``.

    python benchmarks/bench_tshsr.py                 # the ablation: 5 variants trained briefly, a few minutes
    python benchmarks/bench_tshsr.py --eval          # the all-pairs evaluation row only (also: bench_eval.py)

Ablation: one synthetic dataset (``make_synthetic_dataset(..., hard_negatives=...)``: near-twin images whose
captions share all concept words but one) and, per variant, the same small model (d = 64, s = 32, 2 SGR steps,
word_dim 32, img_dim 128) trained with ``itm_models.train.train`` (hinge loss with margin 0.2 summed over all
negatives, not only the hardest: a short run from scratch learns faster so; grad clip 2; Adam at lr 2e-3, no
decay) for the same epochs from the same seed, then scored on the test split with ``similarity_matrix``.
Variants: one stream (t2i) vs two (t2i + i2t), local only vs global + local (the SGR configuration) vs hierarchical
(global + intermediate + local). Columns: R@1/R@5/R@10 both directions and rsum on the test split, training time,
evaluation time, and evaluation peak extra memory (VmHWM rise of one ``similarity_matrix`` call in a fresh
process, ``common.peak_memory_subprocess``). One training run per variant (no seeds averaged): differences of a
few rsum points are within run-to-run noise.

Evaluation row (:func:`run_tshsr_eval`): a full-size default TSHSR head (d = 1024, s = 256, 3 steps, both streams,
three levels; random weights: timing does not depend on them) on ``bench_eval.grounded_features``' n x 5n pairs:
the plain per-pair loop (``itm_models.baselines.tshsr.per_pair_sims``, on a subset, extrapolated linearly by pairs,
"~"), ours (``TSHSRSimilarity.sims``), the speed-up, the fraction of the bare-GEMM limit (the model's FLOPs, counted
in :func:`tshsr_flops`, at the rate of the faster of torch.mm and brgemm on (8192 x d) @ (d x s) in this run), and
peak extra memory (fresh process).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from itm_models.baselines.tshsr import per_pair_sims  # noqa: E402
from itm_models.checkpoints import load_checkpoint  # noqa: E402
from itm_models.data import PrecompDataset  # noqa: E402
from itm_models.data.synthetic import make_synthetic_dataset  # noqa: E402
from itm_models.eval.metrics import recall  # noqa: E402
from itm_models.eval.similarity import similarity_matrix  # noqa: E402
from itm_models.train import train  # noqa: E402
from itm_models.tshsr import TSHSRConfig, TSHSRSimilarity, phrase_count  # noqa: E402
from common import (bare_gemm_rate, machine_line, peak_memory_subprocess, print_table, speedup,  # noqa: E402
                    timings)

VARIANTS = (
    ("t2i", "local", ("t2i",), ("local",)),
    ("t2i", "global+local (SGR)", ("t2i",), ("global", "local")),
    ("t2i", "hierarchical", ("t2i",), ("global", "intermediate", "local")),
    ("t2i+i2t", "local", ("t2i", "i2t"), ("local",)),
    ("t2i+i2t", "hierarchical", ("t2i", "i2t"), ("global", "intermediate", "local")),
)
SMALL = dict(embed_size=64, sim_dim=32, word_dim=32, sgr_step=2)
K, D, S, STEPS, GROUPS, WINDOW = 36, 1024, 256, 3, 4, 3


# ------------------------------------------------------------------------------------------------------------------
# ablation
# ------------------------------------------------------------------------------------------------------------------

def eval_call(checkpoint: str, data_dir: str):
    """Builder for ``common.peak_memory_subprocess``: one ``similarity_matrix`` call of a checkpoint on the test
    split."""
    model = load_checkpoint(checkpoint).model
    dataset = PrecompDataset(data_dir, "test")
    return lambda: similarity_matrix(model, dataset, device="cpu", progress=False)


def run_ablation(args) -> str:
    """Train and evaluate every variant; print and return the table."""
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench_tshsr_"))
    data_dir = root / "data"
    info = make_synthetic_dataset(data_dir, n_train=args.n_train, n_dev=0, n_test=args.n_test, n_regions=K,
                                  img_dim=args.img_dim, n_concepts=args.n_concepts, seed=args.seed,
                                  hard_negatives=args.hard_negatives)
    print(f"# data: {info['splits']}, {info['n_concepts']} concepts, hard_negatives {args.hard_negatives}, "
          f"img_dim {args.img_dim}", flush=True)
    rows = []
    for stream_label, level_label, streams, levels in VARIANTS:
        config = TSHSRConfig(vocab_size=info["vocab_size"], img_dim=args.img_dim, streams=streams, levels=levels,
                             num_epochs=args.epochs, lr_update=args.epochs, batch_size=args.batch_size,
                             learning_rate=args.lr, max_violation=False, **SMALL)
        out = root / f"run_{stream_label}_{level_label.split()[0]}"
        t0 = time.perf_counter()
        result = train(config, data_dir, out, seed=args.seed, device="cpu", val_every_epoch=0,
                       progress=not args.no_progress, log=None)
        train_s = time.perf_counter() - t0
        ckpt = result["checkpoint_last"]
        model = load_checkpoint(ckpt).model
        dataset = PrecompDataset(data_dir, "test")
        t0 = time.perf_counter()
        sims = similarity_matrix(model, dataset, device="cpu", progress=False)
        eval_s = time.perf_counter() - t0
        m = recall(sims)
        peak = peak_memory_subprocess(eval_call, str(ckpt), str(data_dir), threads=args.threads or None)
        rows.append([stream_label, level_label,
                     f"{m['i2t_r1']:.1f} / {m['i2t_r5']:.1f} / {m['i2t_r10']:.1f}",
                     f"{m['t2i_r1']:.1f} / {m['t2i_r5']:.1f} / {m['t2i_r10']:.1f}", f"{m['rsum']:.1f}",
                     f"{train_s:.0f}", f"{eval_s:.1f}", f"{peak / 2**20:.0f}",
                     f"{result['history'][-1]['loss']:.2f}"])
        print(" | ".join(rows[-1]), flush=True)
    n_img, n_cap = info["splits"]["test"]
    return print_table(
        f"TSHSR ablation (OUR design, not the paper's; synthetic data, hard_negatives {args.hard_negatives}: "
        f"{args.n_train} train images, test {n_img} x {n_cap}; d {SMALL['embed_size']}, s {SMALL['sim_dim']}, "
        f"{SMALL['sgr_step']} SGR steps; {args.epochs} epochs, batch {args.batch_size}, lr {args.lr}, all negatives; one "
        "run each)",
        ["streams", "levels", "i2t R@1 / R@5 / R@10", "t2i R@1 / R@5 / R@10", "rsum", "train s", "eval s",
         "eval peak extra MiB", "last epoch loss"], rows)


# ------------------------------------------------------------------------------------------------------------------
# all-pairs evaluation row
# ------------------------------------------------------------------------------------------------------------------

def tshsr_flops(lens: torch.Tensor, n_img: int) -> float:
    """FLOPs the default TSHSR model defines for n_img x len(lens) pairs (d = D, s = S, K = 36, both streams, three
    levels, STEPS full SGR steps), per pair: local_sim rows 4 K d (t2i: per word or phrase) / 4 L d (i2t: per
    region or group) + 2 d s each; global node 2 d s per stream; per SGR step 3 x 2 s^2 n + 2 x 2 n^2 s with n the
    stream's nodes; score 2 s per stream."""
    lens = lens.double().cpu()
    phrases = phrase_count(lens.long(), WINDOW).double()
    t2i_rows = lens + phrases
    i2t_rows = torch.full_like(lens, K + GROUPS)
    n_t2i, n_i2t = 1 + t2i_rows, 1 + i2t_rows
    sgr = lambda n: STEPS * (3 * 2 * S * S * n + 2 * 2 * n * n * S)  # noqa: E731
    per_pair = (t2i_rows * (4 * K * D + 2 * D * S) + i2t_rows * (4 * lens * D + 2 * D * S) + 2 * 2 * D * S
                + sgr(n_t2i) + sgr(n_i2t) + 2 * 2 * S)
    return float(per_pair.sum()) * n_img


def eval_row_call(n_img: int):
    """Builder for ``common.peak_memory_subprocess``: the default head's ``sims`` on n_img x 5 n_img pairs."""
    from bench_eval import grounded_features
    torch.manual_seed(0)
    head = TSHSRSimilarity(D, S, STEPS).eval()
    images, captions, lens = grounded_features(n_img, 5 * n_img)
    return lambda: head.sims(images, captions, lens)


def run_tshsr_eval(n_img: int, *, repeats: int = 1, loop_pairs: int = 200) -> str:
    """Print and return the TSHSR all-pairs evaluation table at n_img x 5 n_img."""
    from bench_eval import grounded_features
    torch.manual_seed(0)
    head = TSHSRSimilarity(D, S, STEPS).eval()
    images, captions, lens = grounded_features(n_img, 5 * n_img)
    sub_img = min(n_img, 4)
    sub_cap = max(1, min(5 * n_img, loop_pairs // sub_img))
    idx = torch.linspace(0, 5 * n_img - 1, sub_cap).round().long()
    loop = timings(lambda: per_pair_sims(head, images[:sub_img], captions[idx], lens[idx]), repeats=1, warmup=0)
    loop_s = loop.median * n_img * 5 * n_img / (sub_img * sub_cap)
    head.sims(images[:2], captions[:8], lens[:8])                              # first-call allocations
    ours = timings(lambda: head.sims(images, captions, lens), repeats=repeats, warmup=0)
    bare = tshsr_flops(lens, n_img) / bare_gemm_rate(torch.float32, "cpu", 8192, D, S)
    peak = peak_memory_subprocess(eval_row_call, n_img)
    row = [f"{n_img}x{5 * n_img}", "float32", f"~{loop_s:.1f}", ours.cell(".2f"), speedup(loop_s, ours.median),
           f"{bare:.2f}", f"{bare / ours.median:.2f}", f"{peak / 2**20:.0f}"]
    return print_table(
        f"TSHSR all-pairs evaluation (OUR design; default head d={D}, s={S}, {STEPS} steps, both streams, three "
        f"levels; seconds, ours median (min-max) of {repeats}; '~' = per-pair loop on {sub_img} x {sub_cap} pairs, "
        "extrapolated linearly by pairs; peak extra MiB: fresh process, output included)",
        ["gallery", "dtype", "per-pair loop s", "ours s", "speed-up", "bare GEMM s (same FLOPs)",
         "fraction of GEMM limit", "peak extra MiB"], [row])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eval", action="store_true", help="only the all-pairs evaluation row")
    p.add_argument("--n-img", type=int, default=100, help="evaluation row: images (captions: 5x)")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--n-train", type=int, default=200)
    p.add_argument("--n-test", type=int, default=100)
    p.add_argument("--n-concepts", type=int, default=60)
    p.add_argument("--img-dim", type=int, default=128)
    p.add_argument("--hard-negatives", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--workdir", default=None, help="where data and checkpoints go (default: a temporary folder)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# bench_tshsr | {machine_line()} | load average {os.getloadavg()[0]:.2f} at start", flush=True)
    if args.eval:
        run_tshsr_eval(args.n_img, repeats=args.repeats)
    else:
        run_ablation(args)
    print(f"# load average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
