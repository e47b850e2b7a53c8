"""``itm-eval`` / ``python -m itm_models.cli.eval``: all-pairs evaluation of one model or an ensemble.

    itm-eval --checkpoint runs/demo/checkpoint_best.pt --data data/synthetic --split test
    itm-eval --checkpoint model_best.pth.tar --data data/f30k_precomp --split test --dtype float64
    itm-eval --checkpoint a.pth.tar --ensemble b.pth.tar --data data/coco_precomp --split testall --fold5

GSMN checkpoints (official ``model_best.pth.tar`` or ours) are scored with the split's GSMN files, read
automatically: ``{split}_ims_bbx.npy``, ``{split}_ims_size.npy``, ``{split}_precaps_stan.txt`` (the caption ids,
GSMN's own vocabulary: ``{split}_caps.txt`` and vocab.json are not read) and ``{split}_caps.json`` (parses):

    itm-eval --checkpoint dense.pth.tar --ensemble sparse.pth.tar --data data/f30k_precomp --allow-pickle
    itm-eval --checkpoint dense.pth.tar --data data/f30k_precomp --allow-pickle --official-boxes

Geometry is correct by default (each image's boxes normalised once by its own size); ``--official-boxes`` feeds
the boxes the released evaluation feeds (divided in place repeatedly, image k paired with image k // 5's boxes off
the fold5 path) to reproduce the released numbers. ``--allow-pickle`` reads the released ``{split}_ims_size.npy``
(a pickled object array; trusted files only).

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

from itm_kernels._common.validation import check_size

from .args import USER_ERRORS, backend_name, device_name, one_line, positive_int

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def load_model(path: str, *, backend: str = "auto", trusted: bool = False):
    """Load our own checkpoint format, or else an official-layout checkpoint (SCAN, SGRAF, GSMN)."""
    from ..checkpoints import CheckpointError, load_checkpoint, load_official_checkpoint

    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        return load_checkpoint(path, backend=backend).model
    except CheckpointError as exc:
        if "official" not in str(exc):
            raise
    return load_official_checkpoint(path, backend=backend, trusted=trusted)


def _official_batch_size(path: str, *, trusted: bool) -> int:
    """The batch size of the released evaluation loader for an official checkpoint (``opt.batch_size``), else 64
    (the Flickr30K setting)."""
    from ..checkpoints import CheckpointError, read_official_checkpoint

    try:
        opt = read_official_checkpoint(path, trusted=trusted)["opt"]
    except CheckpointError:
        return 64
    return int(opt.get("batch_size", 64))


def _model_dims(model) -> tuple[int | None, int | None]:
    """(vocab_size, img_dim) of a model (from its config, else its encoders; the first member of an ensemble)."""
    members = getattr(model, "models", None)
    if members is not None and len(members):
        return _model_dims(members[0])
    config = getattr(model, "config", None)
    vocab_size = getattr(config, "vocab_size", None)
    img_dim = getattr(config, "img_dim", None)
    if vocab_size is None:
        vocab_size = getattr(getattr(model, "txt_enc", None), "vocab_size", None)
    if img_dim is None:
        img_dim = getattr(getattr(model, "img_enc", None), "img_dim", None)
    return vocab_size, img_dim


def _check_fits(model, dataset, path: str, source: str) -> None:
    """A checkpoint whose vocabulary or feature width does not fit the data: a clear error, not an index error."""
    from ..data import DataFormatError

    vocab_size, img_dim = _model_dims(model)
    if img_dim is not None and dataset.images.shape[2] != img_dim:
        raise DataFormatError(f"{path} expects img_dim={img_dim} features, but {dataset.split}_ims.npy has width "
                              f"{dataset.images.shape[2]}")
    if vocab_size is not None:
        top = max(int(c.max()) for c in dataset.captions)
        if top >= vocab_size:
            raise DataFormatError(f"{source} holds word id {top}, outside the vocabulary of {path} "
                                  f"(vocab_size {vocab_size})")


def evaluate(checkpoints, data, split, *, vocab=None, fold5=False, dtype="float32", batch_size=128, device=None,
             backend="auto", save_sims=None, trusted=False, progress=True, official_boxes=False,
             official_batch_size=None, allow_pickle=False, distributed=False) -> dict:
    """Evaluate the mean similarity matrix of ``checkpoints`` on ``{data}/{split}``; returns the metrics dict
    (plus ``seconds``).

    GSMN checkpoints read the split's GSMN files (:func:`itm_models.eval.similarity.gsmn_split`); ``official_boxes``
    feeds them the released evaluation's boxes, with ``official_batch_size`` (default: the official checkpoint's
    ``opt.batch_size``, else 64) deciding the in-place division counts; ``allow_pickle`` reads a pickled
    ``{split}_ims_size.npy``. Other models read ``{split}_caps.txt`` with the vocabulary.

    ``distributed``: run under torchrun; the ranks share the work without any of them holding the matrix
    (:func:`itm_models.eval.distributed_eval.evaluate_distributed`)."""
    from ..data import DataFormatError, PrecompDataset
    from ..eval.similarity import GSMN_FILES, gsmn_split, is_graph_model, similarity_matrix
    from ..eval.metrics import ensemble_sims, recall, recall_fold5

    check_size("batch_size", batch_size)
    if official_batch_size is not None:
        check_size("official_batch_size", official_batch_size)
    t0 = time.perf_counter()
    models = [load_model(p, backend=backend, trusted=trusted) for p in checkpoints]
    graph_flags = [is_graph_model(m) for m in models]
    if official_boxes and not any(graph_flags):
        raise ValueError("--official-boxes reproduces the released GSMN evaluation's box handling: it needs a GSMN "
                         "checkpoint")
    plain = gsmn = None                               # the dataset of each kind, read once
    all_sims = []
    for path, model, needs_graph in zip(checkpoints, models, graph_flags):
        vocab_size, img_dim = _model_dims(model)
        kwargs = {}
        if needs_graph:
            if gsmn is None:
                try:
                    gsmn = gsmn_split(data, split, img_dim=img_dim, vocab_size=vocab_size, allow_pickle=allow_pickle)
                except DataFormatError as exc:
                    files = ", ".join(f.format(split=split) for f in GSMN_FILES)
                    hint = " (itm-eval: --allow-pickle)" if "allow_pickle" in str(exc) else ""
                    raise DataFormatError(f"{exc}{hint}; GSMN checkpoint {path} is evaluated with the split's GSMN "
                                          f"files: {files}") from None
            dataset, graph = gsmn
            source = os.path.join(os.fspath(data), f"{split}_precaps_stan.txt")
            obs = official_batch_size
            if official_boxes and obs is None:
                obs = _official_batch_size(path, trusted=trusted)
            kwargs = dict(graph=graph, official_boxes=official_boxes, fold5=fold5,
                          official_batch_size=64 if obs is None else obs)
        else:
            if plain is None:
                plain = PrecompDataset(data, split, vocab=vocab, img_dim=img_dim, vocab_size=vocab_size)
            dataset = plain
            source = os.path.join(os.fspath(data), f"{split}_caps.txt")
        _check_fits(model, dataset, path, source)
        if distributed:
            all_sims.append((model, dataset, kwargs or None))
            continue
        all_sims.append(similarity_matrix(model, dataset, batch_size=batch_size, device=device,
                                          dtype=DTYPES[dtype], backend=backend, progress=progress, **kwargs))
    if distributed:
        from ..eval.distributed_eval import evaluate_distributed
        models_, datasets_, graph_kwargs = zip(*all_sims)
        if len({len(d.captions) for d in datasets_}) > 1:
            raise ValueError("the checkpoints' datasets hold different numbers of captions")
        metrics = evaluate_distributed(list(models_), list(datasets_), fold5=fold5, dtype=DTYPES[dtype],
                                       batch_size=batch_size, device=device, backend=backend, save_sims=save_sims,
                                       progress=progress, graph_kwargs=list(graph_kwargs))
        metrics["seconds"] = time.perf_counter() - t0
        return metrics
    if len({s.shape for s in all_sims}) > 1:
        raise ValueError(f"the checkpoints' similarity matrices have different shapes {[s.shape for s in all_sims]}: "
                         f"{split}_caps.txt and {split}_precaps_stan.txt hold different numbers of captions")
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
    parser.add_argument("--data", required=True, help="folder with {split}_ims.npy, {split}_caps.txt, vocab.json "
                        "(GSMN: {split}_ims.npy and GSMN's files, see above)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--vocab", default=None, help="vocabulary JSON (default: {data}/vocab.json)")
    parser.add_argument("--fold5", action="store_true", help="COCO 1K protocol: 5 folds of 1,000 images, averaged")
    parser.add_argument("--save-sims", default=None, help="write the similarity matrix to this .npy file")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--batch-size", type=positive_int, default=128)
    parser.add_argument("--device", type=device_name, default="auto", help="cpu, cuda, cuda:1, ... (default: cuda "
                        "when available)")
    parser.add_argument("--backend", type=backend_name, default="auto")
    parser.add_argument("--trusted", action="store_true", help="unpickle official checkpoints without restriction "
                        "(weights_only=False; trusted files only)")
    parser.add_argument("--official-boxes", action="store_true", help="GSMN: feed the boxes the released "
                        "evaluation feeds (repeated in-place division, k // 5 pairing) to reproduce its numbers; "
                        "default: correct geometry")
    parser.add_argument("--official-batch-size", type=positive_int, default=None, help="GSMN with --official-boxes: the "
                        "released loader's batch size (default: the official checkpoint's opt.batch_size, else 64)")
    parser.add_argument("--allow-pickle", action="store_true", help="GSMN: read a pickled {split}_ims_size.npy "
                        "(the released files are object arrays of dicts; trusted files only)")
    parser.add_argument("--distributed", action="store_true", help="launched by torchrun: shard the images over "
                        "the ranks (gloo on CPUs, NCCL with --device cuda); no rank holds the matrix")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    from ..eval.metrics import format_metrics_table

    try:
        metrics = evaluate([args.checkpoint] + list(args.ensemble), args.data, args.split, vocab=args.vocab,
                           fold5=args.fold5, dtype=args.dtype, batch_size=args.batch_size,
                           device=None if args.device == "auto" else args.device,
                           backend=args.backend, save_sims=args.save_sims, trusted=args.trusted,
                           progress=not args.no_progress, official_boxes=args.official_boxes,
                           official_batch_size=args.official_batch_size, allow_pickle=args.allow_pickle,
                           distributed=args.distributed)
    except USER_ERRORS as exc:
        print(f"itm-eval: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("itm-eval: interrupted", file=sys.stderr)
        return 130
    seconds = metrics.pop("seconds")
    world_size = metrics.pop("world_size", 1)
    if args.distributed and int(os.environ.get("RANK", "0")) != 0:
        return 0  # rank 0 reports
    title = (f"{args.split}{' (5-fold 1K)' if args.fold5 else ''}: {1 + len(args.ensemble)} model(s)"
             f"{', released GSMN box handling' if args.official_boxes else ''}")
    print(format_metrics_table(metrics, title=title))
    print(f"time: {seconds:.1f} s" + (f" on {world_size} ranks" if args.distributed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
