"""Train SCAN, SGRAF (SGR / SAF) or GSMN (dense / sparse) on precomputed region features (the official ``train.py``
recipes).

Recipe (``shared/reference/SEMANTICS.md``, "Training"): Adam (default betas) at ``lr0 * 0.1 ** (epoch //
lr_update)``, the summed hinge loss with hardest negatives (:class:`itm_models.losses.ContrastiveLoss`) on each
batch's B x B score matrix, global gradient-norm clipping, and after each epoch the dev rsum (R@1+R@5+R@10 in
both directions) picks the best checkpoint. SCAN's similarity is :func:`itm_kernels.xattn_sim`, whose backward
recomputes tiles instead of storing the attention; SGRAF's is :meth:`itm_models.sgraf.head.SGRAFSimilarity.forward`
(dropout 0.4 and BatchNorm batch statistics in training, as officially).

The model follows the config's type: :class:`itm_models.scan.SCANConfig` (batch 128, lr 2e-4, 30 epochs, decay at
15 on Flickr30K), :class:`itm_models.sgraf.SGRAFConfig` (batch 128, Adam 2e-4, margin 0.2, hardest negatives,
grad clip 2, sim_dim 256, 3 SGR steps; Flickr30K SGR 40 epochs / decay at 30, SAF 30 / 20; COCO 20 / 10) or
:class:`itm_models.tshsr.TSHSRConfig` (our design; SGRAF's SGR recipe by our choice: batch 128, Adam 2e-4, 40
epochs, decay at 30),
:class:`itm_models.gsmn.config.GSMNConfig` (Flickr30K: batch 64, Adam 2e-4, 30 epochs, decay at 15, lambda 20;
COCO: batch 32, 5e-4, 20 epochs, decay at 5, lambda 10; :func:`itm_models.gsmn.config.recipe`). Dev scores: SCAN
through :func:`itm_models.scan.encode_and_score`, SGRAF and GSMN through
:func:`itm_models.eval.similarity.similarity_matrix` (the model's all-pairs ``sims``).

GSMN reads the split's GSMN files (:func:`itm_models.eval.similarity.gsmn_split`: ``{split}_ims.npy``,
``{split}_ims_bbx.npy``, ``{split}_ims_size.npy``, ``{split}_precaps_stan.txt`` (its caption ids: neither
``{split}_caps.txt`` nor a vocabulary is needed) and ``{split}_caps.json`` (parses)); each training batch carries
its images' pixel boxes and sizes (normalised once, by the model: correct geometry, not the released loader's
repeated in-place division) and its captions' parses (:class:`GSMNTrainSet`, :func:`collate_gsmn`).

Outputs in ``out_dir``: ``checkpoint_last.pt`` (after every epoch, for resuming) and ``checkpoint_best.pt`` (best dev
rsum), both in the safe format of :func:`itm_models.checkpoints.save_checkpoint`. A run folder is never reused by
accident: a non-empty ``out_dir`` is refused unless the run resumes (``resume``) or replaces it (``overwrite``).
Each run stores its id (``extra["run_id"]``) in its checkpoints, and ``checkpoint_best.pt`` is only ever replaced by
a better checkpoint of the same run (a resumed run keeps the best score found in the folder and compares with it).

Determinism: the weights come from ``torch.manual_seed(seed)``; epoch ``e`` shuffles with its own generator seeded
from ``(seed, e)``. A run resumed from ``checkpoint_last.pt`` therefore takes exactly the steps the uninterrupted run
would have taken (on the same device and backend).

CLI: :mod:`itm_models.cli.train` (``itm-train``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..checkpoints import (CheckpointError, load_checkpoint, new_run_id, read_checkpoint, restore_optimizer,
                           save_checkpoint)
from ..data import OFFICIAL_DEV_CAPTIONS, PrecompDataset, collate, load_vocab, split_paths
from ..devices import resolve_device
from ..eval.metrics import format_metrics_table
from ..eval.similarity import gsmn_split
from ..gsmn import GSMN, GSMNConfig
from ..losses import ContrastiveLoss
from ..scan import SCAN, SCANConfig
from ..sgraf import NUM_REGIONS as SGRAF_REGIONS
from ..sgraf import SGRAF, SGRAFConfig
from ..tshsr import TSHSR, TSHSRConfig
from .datasets import GSMNBatch, GSMNTrainSet, collate_gsmn
from .validation import validate

__all__ = ["train", "train_step", "adjust_learning_rate", "epoch_generator", "CHECKPOINT_LAST", "CHECKPOINT_BEST"]

CHECKPOINT_LAST = "checkpoint_last.pt"
CHECKPOINT_BEST = "checkpoint_best.pt"
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
    if isinstance(config, TSHSRConfig):
        return TSHSR.from_config(config)
    return SGRAF.from_config(config)


def _drop_last(config, n_items: int) -> bool:
    """SGRAF's VisualSA BatchNorm over d cannot take a training batch of one image: drop a last batch of exactly
    one caption (the official Flickr30K / COCO sizes never produce one); SCAN keeps every batch."""
    return isinstance(config, (SGRAFConfig, TSHSRConfig)) and n_items % config.batch_size == 1


def _check_run_folder(out_dir: str, *, resume, overwrite: bool) -> None:
    """Refuse an ``out_dir`` that is a file, or a non-empty folder when the run neither resumes nor overwrites."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise NotADirectoryError(f"out_dir {out_dir} exists and is not a folder")
    if resume or overwrite or not os.path.isdir(out_dir):
        return
    entries = sorted(os.listdir(out_dir))
    if entries:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise FileExistsError(f"{out_dir} is not empty ({shown}): resume its run (--resume / resume=True), replace "
                              "it (--overwrite / overwrite=True), or choose a new folder")


def _restored_run(ckpt, path: str) -> dict:
    """The training state of a loaded checkpoint (run id, epochs done, best score and epoch, history, RNG state),
    each checked so that a resumed run cannot fail later on a malformed entry."""
    extra = ckpt.extra
    history = extra.get("history", [])
    if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
        raise CheckpointError(f"{path}: extra['history'] must be a list of dicts (one per epoch)")
    best_epoch = extra.get("best_epoch")
    epoch = int(ckpt.epoch or 0)
    if best_epoch is not None and not (isinstance(best_epoch, int) and not isinstance(best_epoch, bool)
                                       and 1 <= best_epoch <= epoch):
        raise CheckpointError(f"{path}: extra['best_epoch'] is {best_epoch!r}; expected None or an epoch in "
                              f"1..{epoch}")
    rng = extra.get("torch_rng")
    if rng is not None:
        reference = torch.get_rng_state()
        if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != reference.shape:
            raise CheckpointError(f"{path}: extra['torch_rng'] is not a CPU generator state (a uint8 tensor of shape "
                                  f"{tuple(reference.shape)})")
    run_id = extra.get("run_id")
    if run_id is not None and not isinstance(run_id, str):
        raise CheckpointError(f"{path}: extra['run_id'] is {run_id!r}; expected a string")
    return {"epoch": epoch, "best_rsum": ckpt.best_rsum, "best_epoch": best_epoch, "history": list(history),
            "torch_rng": rng, "run_id": run_id or new_run_id()}


def _best_of_folder(best_path: str, run: dict, *, overwrite: bool) -> None:
    """On resume: keep the better of the resumed checkpoint's best score and that of ``checkpoint_best.pt`` when the
    latter belongs to the same run (ids equal, or either written before run ids were stored); a best checkpoint of
    another run (or an unreadable one) is refused unless ``overwrite``: then it is removed and the best score
    forgotten, so that the next validated epoch writes the folder's best."""
    if not os.path.exists(best_path):
        return

    def replace_it() -> None:
        os.remove(best_path)
        run["best_rsum"] = run["best_epoch"] = None

    try:
        best = read_checkpoint(best_path)
    except CheckpointError as exc:
        if overwrite:
            return replace_it()
        raise CheckpointError(f"cannot resume: the run's best checkpoint is unreadable ({exc}); remove it or pass "
                              "overwrite=True (--overwrite)") from None
    other = (best.get("extra") or {}).get("run_id")
    if other is not None and other != run["run_id"]:
        if overwrite:
            return replace_it()
        raise CheckpointError(f"cannot resume into this folder: {best_path} belongs to another run ({other}, this run "
                              f"is {run['run_id']}); pass overwrite=True (--overwrite) to replace it")
    score = best.get("best_rsum")
    if score is not None and (run["best_rsum"] is None or score > run["best_rsum"]):
        run["best_rsum"] = float(score)
        run["best_epoch"] = (best.get("extra") or {}).get("best_epoch") or best.get("epoch")


def train(config: SCANConfig | SGRAFConfig | GSMNConfig, data_dir: str | os.PathLike, out_dir: str | os.PathLike, *,
          vocab=None, seed: int = 0, device: str | torch.device | None = "auto", backend: str = "auto",
          resume: bool | str | os.PathLike = False, workers: int = 0, val_every_epoch: int = 1,
          progress: bool = True, on_step: Callable[[int, int, float], None] | None = None,
          log: Callable[[str], None] | None = print, allow_pickle: bool = False, overwrite: bool = False) -> dict:
    """Train a SCAN, SGRAF or GSMN model on ``{data_dir}/train_*`` and validate on ``{data_dir}/dev_*``.

    Args:
        config: :class:`SCANConfig`, :class:`itm_models.sgraf.SGRAFConfig` or
            :class:`itm_models.gsmn.config.GSMNConfig` (the model to build, and the training options
            ``num_epochs``, ``batch_size``, ``learning_rate``, ``lr_update``, ``margin``, ``max_violation``,
            ``grad_clip``); ``vocab_size`` must be at least the vocabulary's size (GSMN: above every caption id).
            SGRAF needs 36 regions per image (its VisualSA BatchNorm has one channel per region slot).
        data_dir: folder in the precomputed layout (``train_ims.npy``, ``train_caps.txt``, ``dev_*``, ``vocab.json``;
            GSMN: ``{train,dev}_ims.npy`` and GSMN's files ``_ims_bbx.npy``, ``_ims_size.npy``,
            ``_precaps_stan.txt``, ``_caps.json``, no captions file and no vocabulary needed).
        out_dir: where the checkpoints go (created). If it exists it must be empty, unless ``resume`` or
            ``overwrite``.
        vocab: :class:`itm_models.data.tokenize.Vocabulary`, a JSON path, or None for ``{data_dir}/vocab.json`` (GSMN:
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
        overwrite: start a new run in a non-empty ``out_dir``: its ``checkpoint_last.pt`` / ``checkpoint_best.pt``
            are removed first (other files are left alone). With ``resume``: replace a ``checkpoint_best.pt`` of
            another run.

    Returns:
        dict: ``best_rsum`` (None without validation), ``best_epoch``, ``epochs`` (completed), ``history`` (one
        dict per epoch: ``epoch``, ``lr``, ``loss`` (mean per batch), ``steps``, ``time_s``, and the dev metrics
        when validated), ``checkpoint_last``, ``checkpoint_best``, ``config`` (dict), ``run_id``.

    Raises:
        FileExistsError: a non-empty ``out_dir`` without ``resume`` or ``overwrite``.
        NotADirectoryError: ``out_dir`` is a file.
        CheckpointError: a missing, corrupt or incompatible checkpoint to resume from, or a best checkpoint of another
            run in ``out_dir``.
        ValueError: bad arguments (device, val_every_epoch, vocab_size); DataFormatError: bad data files.
        FloatingPointError: the loss became NaN or infinite.
    """
    say = log or (lambda _msg: None)
    data_dir, out_dir = os.fspath(data_dir), os.fspath(out_dir)
    device = resolve_device(device)
    if not isinstance(config, (SCANConfig, SGRAFConfig, GSMNConfig, TSHSRConfig)):
        raise TypeError(f"config must be a SCANConfig, an SGRAFConfig, a GSMNConfig or a TSHSRConfig, got "
                        f"{type(config).__name__}")
    if val_every_epoch < 0:
        raise ValueError(f"val_every_epoch must be >= 0, got {val_every_epoch}")
    _check_run_folder(out_dir, resume=resume, overwrite=overwrite)
    is_gsmn = isinstance(config, GSMNConfig)
    voc = None if is_gsmn and vocab is None else load_vocab(vocab, data_dir)
    if voc is not None and config.vocab_size < len(voc):
        raise ValueError(f"config.vocab_size={config.vocab_size} is smaller than the vocabulary ({len(voc)} tokens)")
    n_regions = SGRAF_REGIONS if isinstance(config, (SGRAFConfig, TSHSRConfig)) else None
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
    if overwrite and not resume:
        for stale in (last_path, best_path):
            if os.path.exists(stale):
                os.remove(stale)

    torch.manual_seed(seed)
    model = _build_model(config, backend)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    criterion = ContrastiveLoss(config.margin, config.max_violation)
    start_epoch, best_rsum, best_epoch, history, run_id = 0, None, None, [], new_run_id()

    if resume:
        path = last_path if resume is True else os.fspath(resume)
        ckpt = load_checkpoint(path, map_location=device)
        _check_resume_config(ckpt.model.config, config, path)
        run = _restored_run(ckpt, path)
        _best_of_folder(best_path, run, overwrite=overwrite)
        model.load_state_dict(ckpt.model.state_dict())
        if ckpt.optimizer_state is not None:
            restore_optimizer(optimizer, ckpt.optimizer_state, path=path)
        start_epoch, best_rsum, best_epoch = run["epoch"], run["best_rsum"], run["best_epoch"]
        history, run_id = run["history"], run["run_id"]
        if run["torch_rng"] is not None:
            torch.set_rng_state(run["torch_rng"].cpu())
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
        elif dev_set is None and best_rsum is None:  # no score: the best is the last (unless one was scored)
            best_epoch, is_best = epoch + 1, True
        history.append(record)
        say(f"epoch {epoch + 1}: lr {lr:.3g}, mean loss {record['loss']:.4f}, {steps} steps, "
            f"{record['time_s']:.1f} s" + (" (best)" if is_best and dev_set is not None else ""))
        extra = {"history": history, "best_epoch": best_epoch, "seed": int(seed), "torch_rng": torch.get_rng_state(),
                 "run_id": run_id}
        save_checkpoint(model, last_path, optimizer=optimizer, epoch=epoch + 1, best_rsum=best_rsum, **extra)
        if is_best:
            save_checkpoint(model, best_path, optimizer=optimizer, epoch=epoch + 1, best_rsum=best_rsum, **extra)
    return {"best_rsum": best_rsum, "best_epoch": best_epoch, "epochs": max(start_epoch, config.num_epochs),
            "history": history, "checkpoint_last": last_path, "checkpoint_best": best_path,
            "config": dataclasses.asdict(config), "run_id": run_id}
