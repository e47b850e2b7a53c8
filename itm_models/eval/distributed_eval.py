"""``itm-eval --distributed``: the evaluation of :func:`itm_models.cli.eval.evaluate`, sharded over ranks.

    torchrun --nproc_per_node 2 -m itm_models.cli.eval --checkpoint ck.pt --data data/synthetic --distributed
    torchrun --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \
        -m itm_models.cli.eval ... --distributed --device cuda

Each rank encodes the split (every image and caption once; the encoders are cheap next to the all-pairs head),
then scores only its image chunks against every caption chunk and counts ranks tile by tile
(:func:`itm_models.eval.streaming.streaming_recall`); counts are summed across ranks. No rank holds the
(N_img, N_cap) matrix; ``save_sims`` writes it shard by shard into one ``.npy`` memmap. The metrics equal the
one-process ``evaluate`` exactly when the head is batching-invariant (SCAN on the ``cpu`` backend; tested), else
the one-process result of the same tile grid.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from itm_kernels._common.validation import check_size

from .distributed import init_distributed
from .streaming import model_tile_fn, save_sims_npy, streaming_recall

__all__ = ["evaluate_distributed", "ensemble_tile_fn", "offset_tile_fn"]


def ensemble_tile_fn(tile_fns):
    """The element-wise mean of several tile functions, with ``ensemble_sims``'s float32 arithmetic."""
    if len(tile_fns) == 1:
        return lambda *a: tile_fns[0](*a).float()

    def tile(i0, i1, c0, c1):
        total = torch.zeros((i1 - i0, c1 - c0), dtype=torch.float32)
        for f in tile_fns:
            total += f(i0, i1, c0, c1).float().cpu()
        return total / len(tile_fns)
    return tile


def offset_tile_fn(tile_fn, i_off: int, c_off: int):
    return lambda i0, i1, c0, c1: tile_fn(i0 + i_off, i1 + i_off, c0 + c_off, c1 + c_off)


def _encode_captions(model, captions, lens, batch_size, chunk, device):
    """All caption embeddings, padded to the longest caption, encoded in the chunks and batches that
    ``similarity_matrix`` uses (the GRU's rounding depends on its batch: same batches, same bits)."""
    from .similarity import _encode_caption_chunk
    longest, parts = int(lens.max()), []
    for c0 in range(0, len(captions), chunk):
        seqs = captions[c0:c0 + chunk]
        ids = torch.zeros(len(seqs), int(lens[c0:c0 + chunk].max()), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.as_tensor(s)
        embs = _encode_caption_chunk(model, ids, lens[c0:c0 + chunk], batch_size, device)
        embs = embs if isinstance(embs, list) else [embs]
        parts.append([torch.nn.functional.pad(e, (0, 0, 0, longest - e.shape[1])) for e in embs])
    out = [torch.cat([p[m] for p in parts]) for m in range(len(parts[0]))]
    return out if len(out) > 1 else out[0]


@torch.no_grad()
def evaluate_distributed(models, datasets, *, fold5=False, dtype=torch.float32, batch_size=128, device=None,
                         backend="auto", save_sims=None, progress=False, graph_kwargs=None, img_chunk=128,
                         cap_chunk=1000, captions_per_image=5, timeout_s=600.0) -> dict:
    """Metrics of the mean score matrix of ``models`` (one dataset per model), computed across the ranks.

    Args mirror :func:`itm_models.cli.eval.evaluate` once the checkpoints and datasets are loaded;
    ``graph_kwargs``: per model, None or the GSMN ``dict(graph=..., official_boxes=..., fold5=...,
    official_batch_size=...)``. Returns the metrics (every rank), plus ``seconds``, ``world_size``.
    """
    from .metrics import _RECALL_KEYS, METRIC_KEYS
    from .similarity import _cast, _graph_inputs, encode_images, image_rows

    for name, value in (("batch_size", batch_size), ("img_chunk", img_chunk), ("cap_chunk", cap_chunk),
                        ("captions_per_image", captions_per_image)):
        check_size(name, value)
    if len(models) == 0 or len(models) != len(datasets):
        raise ValueError(f"evaluate_distributed needs one dataset per model (at least one), got {len(models)} "
                         f"models and {len(datasets)} datasets")
    t0 = time.perf_counter()
    rank, size, device = init_distributed(device or "cpu", timeout_s=timeout_s)
    graph_kwargs = graph_kwargs or [None] * len(models)
    tiles, n_img = [], None
    for model, dataset, gk in zip(models, datasets, graph_kwargs):
        model.eval()
        n_cap = len(dataset.captions)
        if n_cap % captions_per_image:
            raise ValueError(f"the split has {n_cap} captions, not a multiple of captions_per_image="
                             f"{captions_per_image}")
        n_img = n_cap // captions_per_image
        img = _cast(encode_images(model, dataset.images, image_rows(n_img, dataset.im_div, captions_per_image),
                                  batch_size=batch_size, device=device, progress=progress and rank == 0), dtype)
        lens = torch.tensor([len(s) for s in dataset.captions], dtype=torch.long)
        cap = _cast(_encode_captions(model, dataset.captions, lens, batch_size, cap_chunk, device), dtype)
        if gk is None:
            tiles.append(model_tile_fn(model, img, cap, lens.to(device)))
        else:
            boxes, sizes, parses = _graph_inputs(model, dataset, gk["graph"], n_img, n_cap, captions_per_image,
                                                 gk["official_boxes"], gk["official_batch_size"], gk["fold5"])
            tiles.append(model_tile_fn(model, img, cap, lens.to(device), graph_inputs=(boxes.to(device), sizes,
                                                                                       parses), backend=backend))
    tile = ensemble_tile_fn(tiles)
    n_cap = captions_per_image * n_img
    if save_sims:
        save_sims_npy(tile, n_img, n_cap, save_sims, img_chunk=img_chunk, cap_chunk=cap_chunk)
    if fold5:
        if n_img % 5:
            raise ValueError(f"--fold5 needs a number of images divisible by 5, got {n_img}")
        m = n_img // 5
        folds = [streaming_recall(offset_tile_fn(tile, f * m, f * m * captions_per_image), m, captions_per_image,
                                  img_chunk=img_chunk, cap_chunk=cap_chunk) for f in range(5)]
        metrics = {k: float(np.mean([fold[k] for fold in folds])) for k in METRIC_KEYS[:-1]}
        metrics["rsum"] = float(sum(metrics[k] for k in _RECALL_KEYS))
    else:
        metrics = streaming_recall(tile, n_img, captions_per_image, img_chunk=img_chunk, cap_chunk=cap_chunk)
    metrics["seconds"] = time.perf_counter() - t0
    metrics["world_size"] = size
    return metrics
