"""``itm-eval`` / ``python -m itm_models.evaluate``: all-pairs evaluation of one model or an ensemble.

    itm-eval --checkpoint runs/demo/checkpoint_best.pt --data data/synthetic --split test
    itm-eval --checkpoint model_best.pth.tar --data data/f30k_precomp --split test --dtype float64
    itm-eval --checkpoint a.pth.tar --ensemble b.pth.tar --data data/coco_precomp --split testall --fold5

Prints the metric table and the time taken; ``--save-sims`` writes the (N_img, N_cap) float32 matrix (.npy).
Any missing or malformed file, or a checkpoint that does not fit the data, ends with a one-line error.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np
import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def load_model(path: str, *, backend: str = "auto", trusted: bool = False):
    """Load our own checkpoint format, or else an official-layout checkpoint (SCAN, SGRAF)."""
    from .checkpoints import CheckpointError, load_checkpoint, load_official_checkpoint

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return load_checkpoint(path, backend=backend).model
    except CheckpointError as exc:
        if "official" not in str(exc):
            raise
    return load_official_checkpoint(path, backend=backend, trusted=trusted)


def evaluate(checkpoints, data, split, *, vocab=None, fold5=False, dtype="float32", batch_size=128, device=None,
             backend="auto", save_sims=None, trusted=False, progress=True) -> dict:
    """Evaluate the mean similarity matrix of ``checkpoints`` on ``{data}/{split}``; returns the metrics dict
    (plus ``seconds``)."""
    from .data import PrecompDataset
    from .evaluation import similarity_matrix
    from .metrics import ensemble_sims, recall, recall_fold5

    t0 = time.perf_counter()
    models = [load_model(p, backend=backend, trusted=trusted) for p in checkpoints]
    vocab_size = getattr(getattr(models[0], "config", None), "vocab_size", None)
    img_dim = getattr(getattr(models[0], "config", None), "img_dim", None)
    dataset = PrecompDataset(data, split, vocab=vocab, img_dim=img_dim, vocab_size=vocab_size)
    all_sims = [similarity_matrix(m, dataset, batch_size=batch_size, device=device, dtype=DTYPES[dtype],
                                  progress=progress) for m in models]
    sims = all_sims[0] if len(all_sims) == 1 else ensemble_sims(all_sims)
    if save_sims:
        np.save(save_sims, np.asarray(sims, dtype=np.float32))
    metrics = recall_fold5(sims) if fold5 else recall(sims)
    metrics["seconds"] = time.perf_counter() - t0
    return metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="itm-eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="our .pt checkpoint or an official .pth.tar")
    parser.add_argument("--ensemble", nargs="*", default=[], help="more checkpoints: their similarity matrices are "
                        "averaged with --checkpoint's")
    parser.add_argument("--data", required=True, help="folder with {split}_ims.npy, {split}_caps.txt, vocab.json")
    parser.add_argument("--split", default="test")
    parser.add_argument("--vocab", default=None, help="vocabulary JSON (default: {data}/vocab.json)")
    parser.add_argument("--fold5", action="store_true", help="COCO 1K protocol: 5 folds of 1,000 images, averaged")
    parser.add_argument("--save-sims", default=None, help="write the similarity matrix to this .npy file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default=None)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--trusted", action="store_true", help="unpickle official checkpoints without restriction "
                        "(weights_only=False; trusted files only)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from .checkpoints import CheckpointError
    from .data import DataFormatError
    from .metrics import format_metrics_table

    try:
        metrics = evaluate([args.checkpoint] + list(args.ensemble), args.data, args.split, vocab=args.vocab,
                           fold5=args.fold5, dtype=args.dtype, batch_size=args.batch_size, device=args.device,
                           backend=args.backend, save_sims=args.save_sims, trusted=args.trusted,
                           progress=not args.no_progress)
    except (CheckpointError, DataFormatError, FileNotFoundError, ValueError) as exc:
        print(f"itm-eval: error: {exc}", file=sys.stderr)
        return 2
    seconds = metrics.pop("seconds")
    title = f"{args.split}{' (5-fold 1K)' if args.fold5 else ''}: {1 + len(args.ensemble)} model(s)"
    print(format_metrics_table(metrics, title=title))
    print(f"time: {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
