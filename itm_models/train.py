"""Train SCAN, SGRAF (SGR / SAF) or GSMN (dense / sparse) on precomputed region features (the official ``train.py``
recipes).

Recipe (``shared/reference/SEMANTICS.md``, "Training"): Adam (default betas) at ``lr0 * 0.1 ** (epoch //
lr_update)``, the summed hinge loss with hardest negatives (:class:`itm_models.losses.ContrastiveLoss`) on each
batch's B x B score matrix, global gradient-norm clipping, and after each epoch the dev rsum (R@1+R@5+R@10 in
both directions) picks the best checkpoint. SCAN's similarity is :func:`itm_kernels.xattn_sim`, whose backward
recomputes tiles instead of storing the attention; SGRAF's is :meth:`itm_models.sgraf.SGRAFSimilarity.forward`
(dropout 0.4 and BatchNorm batch statistics in training, as officially).

The model follows the config's type: :class:`itm_models.scan.SCANConfig` (batch 128, lr 2e-4, 30 epochs, decay at
15 on Flickr30K), :class:`itm_models.sgraf.SGRAFConfig` (batch 128, Adam 2e-4, margin 0.2, hardest negatives,
grad clip 2, sim_dim 256, 3 SGR steps; Flickr30K SGR 40 epochs / decay at 30, SAF 30 / 20; COCO 20 / 10) or
:class:`itm_models.gsmn_config.GSMNConfig` (Flickr30K: batch 64, Adam 2e-4, 30 epochs, decay at 15, lambda 20;
COCO: batch 32, 5e-4, 20 epochs, decay at 5, lambda 10; :func:`itm_models.gsmn_config.recipe`). Dev scores: SCAN
through :func:`itm_models.scan.encode_and_score`, SGRAF and GSMN through
:func:`itm_models.evaluation.similarity_matrix` (the model's all-pairs ``sims``).

GSMN reads the split's GSMN files (:func:`itm_models.evaluation.gsmn_split`: ``{split}_ims.npy``,
``{split}_ims_bbx.npy``, ``{split}_ims_size.npy``, ``{split}_precaps_stan.txt`` (its caption ids: neither
``{split}_caps.txt`` nor a vocabulary is needed) and ``{split}_caps.json`` (parses)); each training batch carries
its images' pixel boxes and sizes (normalised once, by the model: correct geometry, not the released loader's
repeated in-place division) and its captions' parses (:class:`GSMNTrainSet`, :func:`collate_gsmn`).

Outputs in ``out_dir``: ``checkpoint_last.pt`` (after every epoch, for resuming) and ``checkpoint_best.pt`` (best dev
rsum), both in the safe format of :func:`itm_models.checkpoints.save_checkpoint`.

Determinism: the weights come from ``torch.manual_seed(seed)``; epoch ``e`` shuffles with its own generator seeded
from ``(seed, e)``. A run resumed from ``checkpoint_last.pt`` therefore takes exactly the steps the uninterrupted run
would have taken (on the same device and backend).

CLI: ``python -m itm_models.train --data DIR --out DIR [--model scan | --model sgraf --module SGR|SAF |
--model gsmn --variant dense|sparse [--propagate] [--recipe f30k|coco]] [options]`` (``--help`` lists them).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from types import SimpleNamespace
from typing import Callable, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from .checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from .data import OFFICIAL_DEV_CAPTIONS, PrecompDataset, collate, load_vocab, split_paths
from .evaluation import gsmn_split, similarity_matrix
from .gsmn import GSMN, GSMNEnsemble
from .gsmn_config import GSMNConfig
from .gsmn_config import recipe as gsmn_recipe
from .losses import ContrastiveLoss
from .metrics import format_metrics_table, recall
from .scan import AGG_FUNCS, CROSS_ATTN, RAW_FEATURE_NORMS, SCAN, SCANConfig, SCANEnsemble, encode_and_score
from .sgraf import MODULES as SGRAF_MODULES
from .sgraf import NUM_REGIONS as SGRAF_REGIONS
from .sgraf import SGRAF, SGRAFConfig, SGRAFEnsemble, recipe_schedule

__all__ = ["train", "train_step", "validate", "adjust_learning_rate", "epoch_generator", "main",
           "GSMNTrainSet", "GSMNBatch", "collate_gsmn", "CHECKPOINT_LAST", "CHECKPOINT_BEST"]

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
CAPTIONS_PER_IMAGE = 5
# SCAN's Flickr30K (num_epochs, lr_update); SGRAF's come from itm_models.sgraf.recipe_schedule.
SCAN_SCHEDULE = (30, 15)
# Config fields that may change between a run and its resumption (they do not change the model's shape or meaning).
_RESUMABLE_CHANGES = {"margin", "max_violation", "grad_clip", "learning_rate", "lr_update", "num_epochs", "batch_size"}


def adjust_learning_rate(optimizer: torch.optim.Optimizer, lr0: float, epoch: int, lr_update: int) -> float:
    """Set every param group's lr to ``lr0 * 0.1 ** (epoch // lr_update)`` (official step decay); return it."""
    lr = lr0 * (0.1 ** (epoch // lr_update))
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The CPU generator that shuffles epoch ``epoch`` of a run with ``seed`` (independent of earlier epochs)."""
    state = np.random.SeedSequence([int(seed), int(epoch)]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def train_step(model: SCAN | SGRAF | GSMN, optimizer: torch.optim.Optimizer, criterion: ContrastiveLoss, batch, *,
               grad_clip: float = 2.0, device: str | torch.device = "cpu") -> float:
    """One optimisation step on a collated batch; returns the loss before the step.

    Args:
        model: the model (:class:`SCAN`, :class:`SGRAF` or :class:`itm_models.GSMN`; put in train mode by the
            caller).
        optimizer: its optimizer.
        criterion: :class:`ContrastiveLoss`.
        batch: ``(images (B, K, img_dim), ids (B, L_max), lengths (B,), indices (B,))`` from
            :func:`itm_models.data.collate`; caption j belongs to image j. GSMN: a :class:`GSMNBatch` from
            :func:`collate_gsmn` (the same, plus pixel boxes, image sizes and parses).
        grad_clip: clip the global gradient norm to this value (0 or less: no clipping).
        device: where images and ids (and GSMN's boxes) are moved.

    Returns:
        The summed hinge loss of the batch's (B, B) score matrix, as a Python float.
    """
    images, ids, lengths = batch[0], batch[1], batch[2]
    device = torch.device(device)
    images = images.to(device, non_blocking=True)
    ids = ids.to(device, non_blocking=True)
    graph_inputs = ()
    if getattr(model, "model_type", None) == "gsmn":
        if not isinstance(batch, GSMNBatch):
            raise TypeError("a GSMN training batch carries boxes, image sizes and parses: build it with "
                            "itm_models.train.collate_gsmn (GSMNTrainSet items)")
        graph_inputs = (batch.boxes.to(device, non_blocking=True), batch.image_sizes, batch.parses)
    optimizer.zero_grad(set_to_none=True)
    scores = model(images, ids, lengths, *graph_inputs)
    loss = criterion(scores)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return float(loss.detach())


class GSMNBatch(NamedTuple):
    """A collated GSMN training batch (a tuple: ``batch[0:4]`` are :func:`itm_models.data.collate`'s fields)."""

    images: torch.Tensor        # (B, K, img_dim) float32
    ids: torch.Tensor           # (B, L_max) int64, padded with 0
    lengths: torch.Tensor       # (B,) int64, descending
    indices: torch.Tensor       # (B,) int64 caption indices
    boxes: torch.Tensor         # (B, K, 4) pixel boxes x1, y1, x2, y2 of each caption's image (box file's dtype)
    image_sizes: torch.Tensor   # (B, 2) int64 (width, height) of each caption's image
    parses: list                # B edge lists ([governor, dependent], CoreNLP layout)


class GSMNTrainSet(torch.utils.data.Dataset):
    """GSMN's training items: :func:`itm_models.evaluation.gsmn_split`'s dataset (features, GSMN caption ids) with
    each caption's image boxes and size and its parse.

    Item ``i``: ``(image (K, img_dim), caption (L_i,), i, img_id, boxes (K, 4), size (2,), parse)``. The boxes stay
    in pixels, as the box file holds them (never divided in place); the model divides them once by the image size.
    Every parse is checked against its caption's length at construction.

    Args:
        data_dir, split: the data folder and split (``{split}_ims.npy`` plus GSMN's four files).
        img_dim: expected feature width (None: any). vocab_size: every caption id must be below it.
        allow_pickle: read a pickled ``{split}_ims_size.npy`` (the released layout; trusted files only).
        max_captions: only the first captions.
    """

    def __init__(self, data_dir, split: str = "train", *, img_dim: int | None = None, vocab_size: int | None = None,
                 allow_pickle: bool = False, max_captions: int | None = None):
        from .data import DataFormatError
        from .gsmn_geometry import check_parses

        self.dataset, self.graph = gsmn_split(data_dir, split, img_dim=img_dim, vocab_size=vocab_size,
                                              allow_pickle=allow_pickle, max_captions=max_captions)
        self.boxes, self.image_sizes = self.graph["boxes"], self.graph["image_sizes"]
        self.parses = self.graph["parses"][:len(self.dataset)]
        try:
            check_parses(self.parses, [len(c) for c in self.dataset.captions])
        except (TypeError, ValueError) as exc:
            path = os.path.join(os.fspath(data_dir), f"{split}_caps.json")
            raise DataFormatError(f"{path} does not fit {split}_precaps_stan.txt: {exc}") from None
        self.split, self.im_div = split, self.dataset.im_div

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, caption, index, img_id = self.dataset[index]
        boxes = torch.from_numpy(np.array(self.boxes[img_id]))
        size = torch.from_numpy(np.array(self.image_sizes[img_id], dtype=np.int64))
        return image, caption, index, img_id, boxes, size, self.parses[index]


def collate_gsmn(batch) -> GSMNBatch:
    """:func:`itm_models.data.collate` for :class:`GSMNTrainSet` items: sorted by caption length (descending,
    stable), with each caption's image boxes, image size and parse in the same order."""
    if not batch:
        raise ValueError("batch is empty")
    batch = sorted(batch, key=lambda item: len(item[1]), reverse=True)
    images, ids, lengths, indices = collate([item[:4] for item in batch])      # already sorted: order kept
    return GSMNBatch(images, ids, lengths, indices, torch.stack([item[4] for item in batch]),
                     torch.stack([item[5] for item in batch]), [item[6] for item in batch])


class _ImageRows:
    """Rows ``rows`` of a (memory-mapped) feature array, read one slice at a time."""

    def __init__(self, images, rows: np.ndarray):
        self.images, self.rows = images, rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.images[self.rows[sl]], dtype=np.float32))


def _pad_ids(captions: list) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(c) for c in captions], dtype=torch.long)
    ids = torch.zeros(len(captions), int(lengths.max()), dtype=torch.long)
    for i, c in enumerate(captions):
        ids[i, :len(c)] = torch.as_tensor(c, dtype=torch.long)
    return ids, lengths


def _similarity_matrix_of(model, dataset: PrecompDataset, n_cap: int, *, batch_size: int, device,
                          sims_dtype: torch.dtype | None) -> np.ndarray:
    """(n_cap // 5, n_cap) float32 dev scores of an SGRAF model or ensemble through
    :func:`itm_models.evaluation.similarity_matrix` (an ensemble: the mean of its members' matrices)."""
    view = SimpleNamespace(images=dataset.images, im_div=dataset.im_div, captions=dataset.captions[:n_cap])
    members = list(model.models) if isinstance(model, SGRAFEnsemble) else [model]
    total = None
    for m in members:
        s = similarity_matrix(m, view, batch_size=batch_size, device=device, dtype=sims_dtype or torch.float32,
                              captions_per_image=CAPTIONS_PER_IMAGE, progress=False)
        total = s if total is None else total + s
    return total / len(members)


def validate(model: SCAN | SGRAF | GSMN, dataset: PrecompDataset, *, batch_size: int = 128, device=None,
             backend: str | None = None, sims_dtype: torch.dtype | None = None, graph: dict | None = None) -> dict:
    """Dev retrieval metrics, as the official ``validate``: every image encoded once, every caption once, all pairs
    scored (no grad, in caption chunks), then :func:`itm_models.metrics.recall`.

    Args:
        model: a :class:`SCAN` / :class:`SCANEnsemble` (scored by :func:`itm_models.scan.encode_and_score`), an
            :class:`SGRAF` / :class:`SGRAFEnsemble` or a :class:`itm_models.GSMN` / :class:`itm_models.GSMNEnsemble`
            (scored by :func:`itm_models.evaluation.similarity_matrix`); its train/eval mode is restored afterwards.
        dataset: a :class:`PrecompDataset`; its captions are cut to a multiple of 5, and caption ``5k .. 5k+4``
            are matched against the feature row of caption ``5k`` (as the official ``img_embs[::5]``).
        batch_size: encoder batch size. device / backend / sims_dtype: see
            :func:`itm_models.scan.encode_and_score` (float32 by default; ``torch.float64`` is the official SCAN
            precision, slower and rarely different in rank; SGRAF evaluates in float32 officially). ``backend``:
            SCAN's ``xattn_sim`` backend, or GSMN's ``node_match`` backend.
        graph: GSMN only: the split's graph inputs (``gsmn_split(data_dir, split)[1]``; ``dataset`` must be the
            matching dataset over GSMN's caption ids). Scored with correct geometry.

    Returns:
        dict with the keys of :func:`recall` (``i2t_r1`` ... ``rsum``) plus ``n_images`` and ``n_captions``.
    """
    n_cap = len(dataset.captions) - len(dataset.captions) % CAPTIONS_PER_IMAGE
    if n_cap == 0:
        raise ValueError(f"the {dataset.split} split has {len(dataset.captions)} captions; validation needs at least "
                         f"{CAPTIONS_PER_IMAGE}")
    rows = np.arange(0, n_cap, CAPTIONS_PER_IMAGE) // dataset.im_div
    if isinstance(model, (SCAN, SCANEnsemble)):
        ids, lengths = _pad_ids(dataset.captions[:n_cap])
        sims = encode_and_score(model, _ImageRows(dataset.images, rows), ids, lengths, batch_size=batch_size,
                                device=device, backend=backend, sims_dtype=sims_dtype)
    elif isinstance(model, (SGRAF, SGRAFEnsemble, GSMN, GSMNEnsemble)):
        is_gsmn = isinstance(model, (GSMN, GSMNEnsemble))
        if is_gsmn and graph is None:
            raise ValueError("validating GSMN needs graph=: the split's boxes, image sizes and parses "
                             "(itm_models.evaluation.gsmn_split(data_dir, split) returns (dataset, graph))")
        modes = [(m, m.training) for m in model.modules()]                  # similarity_matrix leaves eval mode
        try:
            if is_gsmn:
                view = SimpleNamespace(images=dataset.images, im_div=dataset.im_div, captions=dataset.captions[:n_cap])
                sims = similarity_matrix(model, view, graph=graph, batch_size=batch_size, device=device,
                                         dtype=sims_dtype or torch.float32, backend=backend or "auto",
                                         captions_per_image=CAPTIONS_PER_IMAGE, progress=False)
            else:
                sims = _similarity_matrix_of(model, dataset, n_cap, batch_size=batch_size, device=device,
                                             sims_dtype=sims_dtype)
        finally:
            for m, training in modes:
                m.training = training
    else:
        raise TypeError(f"model must be a SCAN, SCANEnsemble, SGRAF, SGRAFEnsemble, GSMN or GSMNEnsemble, got "
                        f"{type(model).__name__}")
    metrics = recall(sims, captions_per_image=CAPTIONS_PER_IMAGE)
    metrics["n_images"], metrics["n_captions"] = len(rows), n_cap
    return metrics


def _check_resume_config(saved, config, path: str) -> None:
    if type(saved) is not type(config):
        kind = lambda c: type(c).__name__.removesuffix("Config")  # noqa: E731
        raise CheckpointError(f"cannot resume from {path}: it holds a {kind(saved)} model, the run trains "
                              f"{kind(config)}")
    a, b = dataclasses.asdict(saved), dataclasses.asdict(config)
    diff = {k: (a[k], b[k]) for k in a if k not in _RESUMABLE_CHANGES and a[k] != b[k]}
    if diff:
        raise CheckpointError(f"cannot resume from {path}: the model options differ (checkpoint, requested): {diff}")


def _build_model(config: SCANConfig | SGRAFConfig | GSMNConfig, backend: str) -> SCAN | SGRAF | GSMN:
    """A freshly initialised model of the config's type (SCAN with its ``xattn_sim`` backend, SGRAF or GSMN)."""
    if isinstance(config, SCANConfig):
        return SCAN(config, backend=backend)
    if isinstance(config, GSMNConfig):
        return GSMN.from_config(config)
    return SGRAF.from_config(config)


def _drop_last(config, n_items: int) -> bool:
    """SGRAF's VisualSA BatchNorm over d cannot take a training batch of one image: drop a last batch of exactly
    one caption (the official Flickr30K / COCO sizes never produce one); SCAN keeps every batch."""
    return isinstance(config, SGRAFConfig) and n_items % config.batch_size == 1


def _resolve_device(device) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def train(config: SCANConfig | SGRAFConfig | GSMNConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          vocab=None, seed: int = 0, device: str | torch.device | None = "auto", backend: str = "auto",
          resume: bool | str | os.PathLike = False, workers: int = 0, val_every_epoch: int = 1,
          progress: bool = True, on_step: Callable[[int, int, float], None] | None = None,
          log: Callable[[str], None] | None = print, allow_pickle: bool = False) -> dict:
    """Train a SCAN, SGRAF or GSMN model on ``{data_dir}/train_*`` and validate on ``{data_dir}/dev_*``.

    Args:
        config: :class:`SCANConfig`, :class:`itm_models.sgraf.SGRAFConfig` or
            :class:`itm_models.gsmn_config.GSMNConfig` (the model to build, and the training options
            ``num_epochs``, ``batch_size``, ``learning_rate``, ``lr_update``, ``margin``, ``max_violation``,
            ``grad_clip``); ``vocab_size`` must be at least the vocabulary's size (GSMN: above every caption id).
            SGRAF needs 36 regions per image (its VisualSA BatchNorm has one channel per region slot).
        data_dir: folder in the precomputed layout (``train_ims.npy``, ``train_caps.txt``, ``dev_*``, ``vocab.json``;
            GSMN: ``{train,dev}_ims.npy`` and GSMN's files ``_ims_bbx.npy``, ``_ims_size.npy``,
            ``_precaps_stan.txt``, ``_caps.json``, no captions file and no vocabulary needed).
        out_dir: where the checkpoints go (created).
        vocab: :class:`itm_models.tokenize.Vocabulary`, a JSON path, or None for ``{data_dir}/vocab.json`` (GSMN:
            read only when given, to check ``vocab_size`` against it).
        seed: seeds the initial weights and every epoch's shuffle.
        device: "cpu", "cuda", ... or "auto" (CUDA when available).
        backend: ``xattn_sim`` backend for training and validation (SCAN), or GSMN's ``node_match`` backend for
            validation (its training forward picks "auto"); SGRAF's ``local_sim`` has one path.
        resume: False; True to continue from ``{out_dir}/checkpoint_last.pt``; or a checkpoint path. Model
            options must match; training options (epochs, lr, ...) may change.
        workers: DataLoader worker processes.
        val_every_epoch: validate every N epochs and after the last one (0: never; then the best checkpoint is
            the last one).
        progress: show tqdm bars (loss and positive pairs per second).
        on_step: called as ``on_step(epoch, step, loss)`` after every step.
        log: called with one line (or a metrics table) per epoch; None for silence.
        allow_pickle: GSMN: read pickled ``{split}_ims_size.npy`` files (the released layout; trusted files only).

    Returns:
        dict: ``best_rsum`` (None without validation), ``best_epoch``, ``epochs`` (completed), ``history`` (one
        dict per epoch: ``epoch``, ``lr``, ``loss`` (mean per batch), ``steps``, ``time_s``, and the dev metrics
        when validated), ``checkpoint_last``, ``checkpoint_best``, ``config`` (dict).
    """
    say = log or (lambda _msg: None)
    data_dir, out_dir = os.fspath(data_dir), os.fspath(out_dir)
    device = _resolve_device(device)
    if not isinstance(config, (SCANConfig, SGRAFConfig, GSMNConfig)):
        raise TypeError(f"config must be a SCANConfig, an SGRAFConfig or a GSMNConfig, got {type(config).__name__}")
    if val_every_epoch < 0:
        raise ValueError(f"val_every_epoch must be >= 0, got {val_every_epoch}")
    is_gsmn = isinstance(config, GSMNConfig)
    voc = None if is_gsmn and vocab is None else load_vocab(vocab, data_dir)
    if voc is not None and config.vocab_size < len(voc):
        raise ValueError(f"config.vocab_size={config.vocab_size} is smaller than the vocabulary ({len(voc)} tokens)")
    n_regions = SGRAF_REGIONS if isinstance(config, SGRAFConfig) else None
    dev_set = dev_graph = None
    if val_every_epoch and not os.path.isfile(split_paths(data_dir, "dev")["ims"]):
        raise FileNotFoundError(f"no dev split in {data_dir} (dev_ims.npy); pass val_every_epoch=0 to train "
                                "without validation")
    if is_gsmn:
        train_set = GSMNTrainSet(data_dir, "train", img_dim=config.img_dim, vocab_size=config.vocab_size,
                                 allow_pickle=allow_pickle)
        if val_every_epoch:
            dev_set, dev_graph = gsmn_split(data_dir, "dev", img_dim=config.img_dim, vocab_size=config.vocab_size,
                                            allow_pickle=allow_pickle, max_captions=OFFICIAL_DEV_CAPTIONS)
    else:
        train_set = PrecompDataset(data_dir, "train", voc, img_dim=config.img_dim, n_regions=n_regions,
                                   vocab_size=config.vocab_size)
        if val_every_epoch:
            dev_set = PrecompDataset(data_dir, "dev", voc, img_dim=config.img_dim, n_regions=n_regions,
                                     vocab_size=config.vocab_size, max_captions=OFFICIAL_DEV_CAPTIONS)
    os.makedirs(out_dir, exist_ok=True)
    last_path, best_path = os.path.join(out_dir, CHECKPOINT_LAST), os.path.join(out_dir, CHECKPOINT_BEST)

    torch.manual_seed(seed)
    model = _build_model(config, backend)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    criterion = ContrastiveLoss(config.margin, config.max_violation)
    start_epoch, best_rsum, best_epoch, history = 0, None, None, []

    if resume:
        path = last_path if resume is True else os.fspath(resume)
        ckpt = load_checkpoint(path, map_location=device)
        _check_resume_config(ckpt.model.config, config, path)
        model.load_state_dict(ckpt.model.state_dict())
        if ckpt.optimizer_state is not None:
            optimizer.load_state_dict(ckpt.optimizer_state)
        start_epoch = int(ckpt.epoch or 0)
        best_rsum = ckpt.best_rsum
        best_epoch = ckpt.extra.get("best_epoch")
        history = list(ckpt.extra.get("history", []))
        if "torch_rng" in ckpt.extra:
            torch.set_rng_state(ckpt.extra["torch_rng"].cpu())
        say(f"resumed from {path}: {start_epoch} epoch(s) done, best rsum {best_rsum}")

    pin = device.type == "cuda"
    for epoch in range(start_epoch, config.num_epochs):
        lr = adjust_learning_rate(optimizer, config.learning_rate, epoch, config.lr_update)
        loader = torch.utils.data.DataLoader(
            train_set, batch_size=config.batch_size, shuffle=True, generator=epoch_generator(seed, epoch),
            num_workers=workers, collate_fn=collate_gsmn if is_gsmn else collate, pin_memory=pin,
            persistent_workers=False,
            drop_last=_drop_last(config, len(train_set)))
        model.train()
        t0 = time.perf_counter()
        total, steps, pairs = 0.0, 0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{config.num_epochs}", disable=not progress, leave=False,
                   dynamic_ncols=True)
        for step, batch in enumerate(bar):
            loss = train_step(model, optimizer, criterion, batch, grad_clip=config.grad_clip, device=device)
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at epoch {epoch + 1}, step {step}")
            total, steps, pairs = total + loss, steps + 1, pairs + len(batch[2])
            if on_step is not None:
                on_step(epoch, step, loss)
            if progress:
                rate = pairs / max(time.perf_counter() - t0, 1e-9)
                bar.set_postfix({"loss": f"{loss:.4f}", "pairs/s": f"{rate:.0f}"}, refresh=False)
        bar.close()
        record = {"epoch": epoch + 1, "lr": lr, "loss": total / max(steps, 1), "steps": steps,
                  "time_s": time.perf_counter() - t0}
        last_epoch = epoch + 1 == config.num_epochs
        is_best = False
        if dev_set is not None and ((epoch + 1) % val_every_epoch == 0 or last_epoch):
            metrics = validate(model, dev_set, batch_size=config.batch_size, device=device, graph=dev_graph,
                               backend=backend if is_gsmn else None)
            record.update(metrics)
            if best_rsum is None or metrics["rsum"] > best_rsum:
                best_rsum, best_epoch, is_best = metrics["rsum"], epoch + 1, True
            say(format_metrics_table(metrics, title=f"epoch {epoch + 1} dev ({metrics['n_images']} images)"))
        elif dev_set is None:
            best_epoch, is_best = epoch + 1, True
        history.append(record)
        say(f"epoch {epoch + 1}: lr {lr:.3g}, mean loss {record['loss']:.4f}, {steps} steps, "
            f"{record['time_s']:.1f} s" + (" (best)" if is_best and dev_set is not None else ""))
        extra = {"history": history, "best_epoch": best_epoch, "seed": int(seed), "torch_rng": torch.get_rng_state()}
        save_checkpoint(model, last_path, optimizer=optimizer, epoch=epoch + 1, best_rsum=best_rsum, **extra)
        if is_best:
            save_checkpoint(model, best_path, optimizer=optimizer, epoch=epoch + 1, best_rsum=best_rsum, **extra)
    return {"best_rsum": best_rsum, "best_epoch": best_epoch, "epochs": max(start_epoch, config.num_epochs),
            "history": history, "checkpoint_last": last_path, "checkpoint_best": best_path,
            "config": dataclasses.asdict(config)}


# Options of some models only, with their defaults (the parser's default is None, so that giving one to another
# model is an error rather than silently ignored). GSMN's None defaults come from its recipe (--recipe).
_SCAN_ONLY = {"direction": "t2i", "agg": "LogSumExp", "lambda_softmax": 9.0, "lambda_lse": 6.0,
              "norm": "clipped_l2norm", "precomp_enc_type": "basic", "backend": "auto"}
_SGRAF_ONLY = {"module": "SGR", "sim_dim": 256, "sgr_step": 3}
_GSMN_ONLY = {"variant": "dense", "propagate": False, "lambda_softmax": None, "recipe": "f30k", "allow_pickle": False}
_MODEL_OPTIONS = {"scan": _SCAN_ONLY, "sgraf": _SGRAF_ONLY, "gsmn": _GSMN_ONLY}
# SCAN's and SGRAF's (batch_size, learning_rate) when not given (GSMN's come from its recipe).
_DEFAULT_BATCH_LR = (128, 2e-4)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m itm_models.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with {train,dev}_ims.npy, {train,dev}_caps.txt (GSMN: "
                   "{train,dev}_ims.npy, _ims_bbx.npy, _ims_size.npy, _precaps_stan.txt, _caps.json)")
    p.add_argument("--vocab", default=None, help="vocabulary JSON (default: DATA/vocab.json; GSMN: optional, "
                   "vocab_size = max(its size, largest caption id + 1))")
    p.add_argument("--out", required=True, help="output folder for checkpoint_last.pt / checkpoint_best.pt")
    p.add_argument("--model", choices=("scan", "sgraf", "gsmn"), default="scan", help="model to train (default scan)")
    p.add_argument("--epochs", type=int, default=None,
                   help="number of epochs (default: the official Flickr30K recipe of the model: SCAN 30, SGR 40, "
                        "SAF 30, GSMN 30; COCO: SCAN and SGRAF 20, GSMN --recipe coco 20)")
    p.add_argument("--batch-size", type=int, default=None, help="default 128 (GSMN: 64 Flickr30K, 32 COCO)")
    p.add_argument("--lr", type=float, default=None,
                   help="initial learning rate (default 2e-4; SCAN COCO README and GSMN --recipe coco: 5e-4)")
    p.add_argument("--lr-update", type=int, default=None,
                   help="epochs per 10x learning-rate decay (default: SCAN 15, SGR 30, SAF 20, GSMN 15; COCO: 10, "
                        "GSMN 5)")
    p.add_argument("--embed-size", type=int, default=1024)
    p.add_argument("--word-dim", type=int, default=300)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument("--img-dim", type=int, default=2048)
    scan = p.add_argument_group("SCAN only (--model scan)")
    scan.add_argument("--direction", choices=CROSS_ATTN, default=None, help="cross attention direction (default t2i)")
    scan.add_argument("--agg", choices=(*AGG_FUNCS, *AGG_FUNCS.values()), default=None,
                      help="aggregation (default LogSumExp)")
    scan.add_argument("--lambda-softmax", type=float, default=None,
                      help="SCAN and GSMN: attention temperature (SCAN lambda1, default 9; README: 9 for t2i, 4 for "
                           "i2t; GSMN: 20 Flickr30K, 10 COCO)")
    scan.add_argument("--lambda-lse", type=float, default=None,
                      help="lambda2 (default 6; README: 6 t2i; i2t 5 Flickr30K, 20 COCO)")
    scan.add_argument("--norm", choices=RAW_FEATURE_NORMS, default=None,
                      help="raw_feature_norm (default clipped_l2norm)")
    scan.add_argument("--precomp-enc-type", choices=("basic", "weight_norm"), default=None,
                      help="image encoder (default basic)")
    scan.add_argument("--backend", default=None,
                      help="itm_kernels.xattn_sim backend (auto, cpu, torch, cuda, triton; default auto)")
    sgraf = p.add_argument_group("SGRAF only (--model sgraf)")
    sgraf.add_argument("--module", choices=SGRAF_MODULES, default=None,
                       help="similarity head: SGR (graph reasoning) or SAF (attention filtration); default SGR")
    sgraf.add_argument("--sim-dim", type=int, default=None, help="similarity vector size s (default 256)")
    sgraf.add_argument("--sgr-step", type=int, default=None, help="SGR reasoning steps (default 3)")
    gsmn = p.add_argument_group("GSMN only (--model gsmn)")
    gsmn.add_argument("--variant", choices=("dense", "sparse"), default=None,
                      help="textual graph: dense (all word pairs) or sparse (dependency parse); default dense")
    gsmn.add_argument("--propagate", action=argparse.BooleanOptionalAction, default=None,
                      help="the paper's propagation between neighbours (default off: the released code)")
    gsmn.add_argument("--recipe", choices=("f30k", "coco"), default=None,
                      help="official settings for --lr, --epochs, --lr-update, --batch-size, --lambda-softmax not "
                           "given: f30k 2e-4 / 30 / 15 / 64 / 20 (default), coco 5e-4 / 20 / 5 / 32 / 10")
    gsmn.add_argument("--allow-pickle", action="store_true", default=None,
                      help="read pickled {split}_ims_size.npy files (the released layout; trusted files only)")
    p.add_argument("--bi-gru", action=argparse.BooleanOptionalAction, default=True,
                   help="bidirectional GRU, halves averaged (README setting; default on)")
    p.add_argument("--max-violation", action=argparse.BooleanOptionalAction, default=True,
                   help="hardest negatives only (README setting; default on)")
    p.add_argument("--margin", type=float, default=0.2)
    p.add_argument("--grad-clip", type=float, default=2.0)
    p.add_argument("--no-imgnorm", action="store_true")
    p.add_argument("--no-txtnorm", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", nargs="?", const=True, default=False, metavar="PATH",
                   help="continue from OUT/checkpoint_last.pt, or from PATH")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    p.add_argument("--val-every-epoch", type=int, default=1, metavar="N",
                   help="validate on dev every N epochs and after the last (0: never)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    return p


def _resolve_model_options(parser: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Fill the chosen model's own options and its schedule defaults in ``a``; an option of another model only is
    a usage error (exit status 2)."""
    own = _MODEL_OPTIONS[a.model]
    others = [name for model, options in _MODEL_OPTIONS.items() if model != a.model for name in options]
    given = [name for name in dict.fromkeys(others) if name not in own and getattr(a, name) is not None]
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        parser.error(f"{flags} {'does' if len(given) == 1 else 'do'} not apply to --model {a.model}")
    for name, default in own.items():
        if getattr(a, name) is None:
            setattr(a, name, default)
    if a.model == "gsmn":
        r = gsmn_recipe(a.recipe)
        epochs, lr_update, batch_size, lr = r["num_epochs"], r["lr_update"], r["batch_size"], r["learning_rate"]
        a.lambda_softmax = r["lambda_softmax"] if a.lambda_softmax is None else a.lambda_softmax
    else:
        epochs, lr_update = SCAN_SCHEDULE if a.model == "scan" else recipe_schedule(a.module)
        batch_size, lr = _DEFAULT_BATCH_LR
    a.epochs = epochs if a.epochs is None else a.epochs
    a.lr_update = lr_update if a.lr_update is None else a.lr_update
    a.batch_size = batch_size if a.batch_size is None else a.batch_size
    a.lr = lr if a.lr is None else a.lr


def _config_from_args(a: argparse.Namespace, vocab_size: int) -> SCANConfig | SGRAFConfig | GSMNConfig:
    """The config of the chosen model from resolved CLI arguments (see :func:`_resolve_model_options`)."""
    shared = dict(vocab_size=vocab_size, word_dim=a.word_dim, embed_size=a.embed_size, num_layers=a.num_layers,
                  bi_gru=a.bi_gru, img_dim=a.img_dim, no_imgnorm=a.no_imgnorm, no_txtnorm=a.no_txtnorm,
                  margin=a.margin, max_violation=a.max_violation, grad_clip=a.grad_clip, learning_rate=a.lr,
                  lr_update=a.lr_update, num_epochs=a.epochs, batch_size=a.batch_size)
    if a.model == "sgraf":
        return SGRAFConfig(module_name=a.module, sim_dim=a.sim_dim, sgr_step=a.sgr_step, **shared)
    if a.model == "gsmn":
        return GSMNConfig(variant=a.variant, propagate=a.propagate, lambda_softmax=a.lambda_softmax, **shared)
    return SCANConfig(precomp_enc_type=a.precomp_enc_type, raw_feature_norm=a.norm, agg_func=a.agg,
                      cross_attn=a.direction, lambda_softmax=a.lambda_softmax, lambda_lse=a.lambda_lse, **shared)


def _gsmn_vocab(a: argparse.Namespace):
    """GSMN's (vocabulary or None, vocab_size): its captions are ids (``{split}_precaps_stan.txt``), so the
    vocabulary is optional: vocab_size = max(its size if one is given or DATA/vocab.json exists, the largest id of
    the train (and, when validating, dev) captions + 1)."""
    from .gsmn_data import load_split_caption_ids

    splits = ["train"] + (["dev"] if a.val_every_epoch else [])
    top = max(max(max(c) for c in load_split_caption_ids(a.data, split)) for split in splits)
    voc = None
    if a.vocab is not None or os.path.isfile(os.path.join(a.data, "vocab.json")):
        voc = load_vocab(a.vocab, a.data)
    return voc, max(top + 1, len(voc) if voc is not None else 0)


def main(argv=None) -> dict:
    """CLI entry point (``python -m itm_models.train``); returns :func:`train`'s result."""
    parser = _parser()
    a = parser.parse_args(argv)
    _resolve_model_options(parser, a)
    if a.model == "gsmn":
        voc, vocab_size = _gsmn_vocab(a)
    else:
        voc = load_vocab(a.vocab, a.data)
        vocab_size = len(voc)
    config = _config_from_args(a, vocab_size)
    result = train(config, a.data, a.out, vocab=voc, seed=a.seed, device=a.device, backend=a.backend or "auto",
                   resume=a.resume, workers=a.workers, val_every_epoch=a.val_every_epoch,
                   progress=not a.no_progress, allow_pickle=bool(a.allow_pickle))
    print(f"done: {result['epochs']} epochs, best dev rsum {result['best_rsum']} (epoch {result['best_epoch']}); "
          f"checkpoints in {a.out}")
    return result


if __name__ == "__main__":
    main()


def cli() -> int:
    """Console-script entry point (``itm-train``): exit status 0 on success, 2 with a one-line error on bad data."""
    from .data import DataFormatError

    try:
        main()
    except (DataFormatError, FileNotFoundError) as exc:
        print(f"itm-train: error: {exc}", file=sys.stderr)
        return 2
    return 0
