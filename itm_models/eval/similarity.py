"""All-pairs evaluation: encode every image and caption once, score all pairs through the fused kernels.

GSMN (and :class:`itm_models.gsmn.GSMNEnsemble`) also needs the split's graph inputs: boxes and image sizes per
image, a dependency parse per caption, and its own caption ids (``{split}_precaps_stan.txt``). :func:`gsmn_split`
reads them with the matching dataset::

    dataset, graph = gsmn_split("data/f30k_precomp", "test", allow_pickle=True)
    sims = similarity_matrix(model, dataset, graph=graph)                       # corrected geometry
    sims = similarity_matrix(model, dataset, graph=graph, official_boxes=True)  # the released numbers
"""
from __future__ import annotations

import os

import numpy as np
import torch
from tqdm import tqdm

from ..data import DataFormatError, PrecompDataset, load_split_images
from ..data.gsmn import load_gsmn_split
from ..gsmn.geometry import official_eval_boxes
from ..gsmn.model import GSMNEnsemble

__all__ = ["image_rows", "encode_images", "similarity_matrix", "is_graph_model", "gsmn_split",
           "GSMN_FILES"]

# GSMN's per-split files beyond SCAN's (shared/reference/SEMANTICS.md, Data layout).
GSMN_FILES = ("{split}_ims_bbx.npy", "{split}_ims_size.npy", "{split}_precaps_stan.txt", "{split}_caps.json")


def image_rows(n_images: int, im_div: int, captions_per_image: int = 5) -> np.ndarray:
    """Feature rows of the distinct images: row i for 5 captions per row, row 5 i when there is a row per caption
    (the official evalrank keeps every 5th row then)."""
    return (np.arange(n_images) * captions_per_image) // im_div


def is_graph_model(model) -> bool:
    """True for models whose ``sims`` needs graph inputs (boxes, image sizes, parses): :class:`itm_models.GSMN`
    (``model_type == "gsmn"``) and ensembles of them (:class:`itm_models.GSMNEnsemble`)."""
    if getattr(model, "model_type", None) == "gsmn":
        return True
    if isinstance(model, GSMNEnsemble):
        return True
    members = getattr(model, "models", None)
    return (isinstance(members, (list, tuple, torch.nn.ModuleList)) and len(members) > 0
            and all(getattr(m, "model_type", None) == "gsmn" for m in members))


def gsmn_split(data_dir, split: str, *, img_dim: int | None = None, n_regions: int | None = None,
               vocab_size: int | None = None, allow_pickle: bool = False, max_captions: int | None = None):
    """GSMN's evaluation inputs of a split: ``(dataset, graph)``.

    ``graph`` is :func:`itm_models.data.gsmn.load_gsmn_split`'s dict (``boxes`` and ``image_sizes`` per feature
    row, ``caption_ids`` and ``parses`` per caption); ``dataset`` is a
    :class:`itm_models.data.PrecompDataset` over ``{split}_ims.npy`` whose captions are those ids (GSMN's own
    vocabulary, ``{split}_precaps_stan.txt``), so neither ``{split}_caps.txt`` nor a vocabulary is needed.

    Args:
        img_dim, n_regions: expected feature width / regions per image (None: any).
        vocab_size: every caption id must be below it (the model's ``vocab_size``).
        allow_pickle: read a pickled ``{split}_ims_size.npy`` (the released layout; trusted files only).
        max_captions: only the first captions (the official ``dev`` evaluation uses 5,000).

    Raises:
        DataFormatError: a missing GSMN file (named), malformed files, ids outside the vocabulary, or files that
            do not fit each other (box rows vs feature rows, regions per image).
    """
    graph = load_gsmn_split(data_dir, split, allow_pickle=allow_pickle)
    precaps = os.path.join(os.fspath(data_dir), f"{split}_precaps_stan.txt")
    if vocab_size is not None:
        for c, ids in enumerate(graph["caption_ids"]):
            if max(ids) >= vocab_size:
                raise DataFormatError(f"{precaps} line {c + 1}: word id {max(ids)} is outside the model's vocabulary "
                                      f"size {vocab_size}")
    images = load_split_images(data_dir, split, img_dim=img_dim, n_regions=n_regions)
    bbx = os.path.join(os.fspath(data_dir), f"{split}_ims_bbx.npy")
    if graph["boxes"].shape[0] != images.shape[0]:
        raise DataFormatError(f"{bbx} has {graph['boxes'].shape[0]} box rows but {split}_ims.npy has "
                              f"{images.shape[0]} feature rows")
    if graph["boxes"].shape[1] != images.shape[1]:
        raise DataFormatError(f"{bbx} has {graph['boxes'].shape[1]} boxes per image but {split}_ims.npy has "
                              f"{images.shape[1]} regions")
    dataset = PrecompDataset(data_dir, split, img_dim=img_dim, n_regions=n_regions, vocab_size=vocab_size,
                             max_captions=max_captions, caption_ids=graph["caption_ids"])
    return dataset, graph


def _check_positive_ints(**values) -> None:
    """ValueError naming the first argument that is not an int >= 1 (bools refused)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _as_list(x):
    return (list(x), True) if isinstance(x, (list, tuple)) else ([x], False)


def _cast(x, dtype):
    return [e.to(dtype) for e in x] if isinstance(x, (list, tuple)) else x.to(dtype)


@torch.no_grad()
def encode_images(model, features, rows, *, batch_size=128, device="cpu", progress=True, desc="images"):
    """Encode the feature rows ``rows`` of ``features`` ((rows, K, img_dim) array or memmap), each once.

    Returns (len(rows), K, d) float32 on ``device`` (a list of them, one per member, for an ensemble whose
    ``encode_images`` returns a list). Reads ``batch_size`` rows of the memmap at a time.
    """
    _check_positive_ints(batch_size=batch_size)
    out, is_list = None, False
    for b0 in tqdm(range(0, len(rows), batch_size), desc=f"encode {desc}", disable=not progress, leave=False):
        idx = rows[b0:b0 + batch_size]
        batch = torch.from_numpy(np.ascontiguousarray(features[idx], dtype=np.float32)).to(device)
        embs, is_list = _as_list(model.encode_images(batch))
        if out is None:
            out = [torch.empty((len(rows),) + tuple(e.shape[1:]), dtype=torch.float32, device=device) for e in embs]
        for o, e in zip(out, embs):
            o[b0:b0 + len(idx)] = e.float()
    return out if is_list else out[0]


def _graph_inputs(model, dataset, graph, n_img, n_cap, captions_per_image, official_boxes, official_batch_size,
                  fold5):
    """Boxes (and image sizes, or None) of the distinct images, and the parses of the captions, for GSMN."""
    if graph is None:
        raise ValueError(f"{type(model).__name__} scores pairs with box geometry and dependency parses: pass "
                         "graph=itm_models.data.gsmn.load_gsmn_split(data_dir, split) (or use "
                         "itm_models.eval.similarity.gsmn_split, which also builds the dataset with GSMN's caption "
                         "ids)")
    missing = [k for k in ("boxes", "image_sizes", "parses") if k not in graph]
    if missing:
        raise ValueError(f"graph lacks {missing}: expected load_gsmn_split's dict (boxes, image_sizes, parses)")
    boxes, sizes, parses = graph["boxes"], graph["image_sizes"], graph["parses"]
    rows_total = dataset.images.shape[0]
    if len(boxes) != rows_total or len(sizes) != rows_total:
        raise ValueError(f"graph has {len(boxes)} box rows and {len(sizes)} image sizes for {rows_total} feature "
                         "rows: it must come from the same split as the dataset")
    if len(parses) < n_cap:
        raise ValueError(f"graph has {len(parses)} parses for {n_cap} captions")
    ids = graph.get("caption_ids")
    if ids is not None and (len(ids) < n_cap or any(len(a) != len(b) or not np.array_equal(a, b)
                                                    for a, b in zip(dataset.captions, ids[:n_cap]))):
        raise ValueError("the dataset's captions are not the GSMN caption ids of graph (GSMN reads "
                         "{split}_precaps_stan.txt, its own vocabulary): build the dataset with "
                         "PrecompDataset(..., caption_ids=graph['caption_ids']) or gsmn_split(...)")
    rows = image_rows(n_img, dataset.im_div, captions_per_image)
    img_boxes, img_sizes = np.asarray(boxes[rows]), np.asarray(sizes[rows])
    if official_boxes:
        if dataset.im_div != captions_per_image:
            raise ValueError(f"official_boxes reproduces the released evaluation of splits with {captions_per_image} "
                             "captions per feature row; this split has a feature row per caption")
        return official_eval_boxes(img_boxes, img_sizes, batch_size=official_batch_size,
                                   captions_per_image=captions_per_image, box_dtype=str(img_boxes.dtype),
                                   fold5=fold5), None, parses
    return torch.from_numpy(np.ascontiguousarray(img_boxes)), img_sizes, parses


@torch.no_grad()
def similarity_matrix(model, dataset, *, batch_size=128, caption_chunk=1000, device=None, dtype=torch.float32,
                      captions_per_image=5, backend="auto", progress=True, graph=None, official_boxes=False,
                      official_batch_size=64, fold5=False) -> np.ndarray:
    """All-pairs similarity matrix of a split, as the official evaluation defines it (image i = the i-th distinct
    image, caption c belongs to image c // captions_per_image).

    Args:
        model: has ``encode_images(features (B, K, img_dim)) -> (B, K, d)``, ``encode_captions(ids (B, L),
            lengths (B,)) -> (B, L, d)`` and ``sims(img_emb (N_img, K, d), cap_emb (N_cap, L, d), cap_lens)``
            (ensembles: lists of embeddings, one per member). GSMN models (:func:`is_graph_model`) also take boxes,
            image sizes and parses in ``sims``.
        dataset: a :class:`itm_models.data.PrecompDataset` (``images`` memmap, ``im_div``, ``captions`` ids). For
            GSMN its captions must be GSMN's ids (``PrecompDataset(..., caption_ids=graph["caption_ids"])``, or
            :func:`gsmn_split`).
        batch_size: images / captions encoded at a time (an int >= 1).
        caption_chunk: captions encoded and scored at a time (an int >= 1).
        captions_per_image: captions of each image (5 in the official splits; an int >= 1).
        dtype: dtype in which the embeddings are scored (float32; float64 reproduces the official float64
            evaluation to rounding; bfloat16 is faster on hardware with bf16 matrix units).
        backend: kernel backend of GSMN's ``sims`` (SCAN / SGRAF / TSHSR use the model's own ``backend``; TSHSR's
            ``sims`` scores each caption chunk in bounded-memory blocks of pairs).
        graph: GSMN only: :func:`itm_models.data.gsmn.load_gsmn_split`'s dict (``boxes`` and ``image_sizes`` per
            feature row, ``parses`` per caption). Each caption chunk is scored with the boxes of the distinct images
            and its own parses.
        official_boxes: GSMN only. False (default): correct geometry, each image's pixel boxes normalised once by its
            own size. True: the boxes the released evaluation actually feeds
            (:func:`itm_models.gsmn.geometry.official_eval_boxes`: repeated in-place division, and on the non-fold5
            path image k scored with the boxes of image k // 5), to reproduce the released numbers.
        official_batch_size: the released loader's batch size (the checkpoint's ``opt.batch_size``: 64 Flickr30K,
            32 COCO); it decides how often the released code divided each box (``official_boxes`` only).
        fold5: the released fold5 (COCO 1K) branch's box rows (``official_boxes`` only; the metrics' folds are
            :func:`itm_models.eval.metrics.recall_fold5`'s business).
    Returns:
        (N_img, N_cap) float32 numpy array on the host.

    Raises:
        ValueError: a size argument that is not a positive int (named), a caption count that is not a multiple of
            ``captions_per_image``, or graph inputs that do not fit the dataset.

    Each image is encoded once (the official code encodes it once per caption). Peak memory: the image
    embeddings (N_img x K x d floats), one caption chunk's embeddings, the kernels' tile scratch, and the
    (N_img, N_cap) float32 result.
    """
    _check_positive_ints(batch_size=batch_size, caption_chunk=caption_chunk, captions_per_image=captions_per_image,
                         official_batch_size=official_batch_size)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    n_cap = len(dataset.captions)
    if n_cap % captions_per_image:
        raise ValueError(f"the split has {n_cap} captions, not a multiple of captions_per_image={captions_per_image}")
    n_img = n_cap // captions_per_image
    graph_model = is_graph_model(model)
    if official_boxes and not graph_model:
        raise ValueError(f"official_boxes applies to GSMN models only, not {type(model).__name__}")
    if graph_model:
        boxes, sizes, parses = _graph_inputs(model, dataset, graph, n_img, n_cap, captions_per_image,
                                             official_boxes, official_batch_size, fold5)
        boxes = boxes.to(device)
    model.eval()
    img_embs = _cast(encode_images(model, dataset.images, image_rows(n_img, dataset.im_div, captions_per_image),
                                   batch_size=batch_size, device=device, progress=progress), dtype)
    sims = np.empty((n_img, n_cap), dtype=np.float32)
    for c0 in tqdm(range(0, n_cap, caption_chunk), desc="similarity", unit="chunk", disable=not progress):
        seqs = dataset.captions[c0:c0 + caption_chunk]
        lens = torch.tensor([len(s) for s in seqs], dtype=torch.long)
        ids = torch.zeros(len(seqs), int(lens.max()), dtype=torch.long)
        for j, s in enumerate(seqs):
            ids[j, : len(s)] = torch.as_tensor(s)
        cap_embs = _cast(_encode_caption_chunk(model, ids, lens, batch_size, device), dtype)
        if graph_model:
            block = model.sims(img_embs, cap_embs, lens.to(device), boxes, sizes, parses[c0:c0 + len(seqs)],
                               backend=backend)
        else:
            block = model.sims(img_embs, cap_embs, lens.to(device))
        sims[:, c0:c0 + len(seqs)] = block.float().cpu().numpy()
    return sims


def _encode_caption_chunk(model, ids, lens, batch_size, device):
    """Caption embeddings of a chunk, padded to its longest caption (a list of them for an ensemble)."""
    parts, is_list = None, False
    longest = int(lens.max())
    for b in range(0, ids.shape[0], batch_size):
        embs, is_list = _as_list(model.encode_captions(ids[b:b + batch_size].to(device),
                                                       lens[b:b + batch_size].to(device)))
        if parts is None:
            parts = [[] for _ in embs]
        for p, emb in zip(parts, embs):
            emb = emb.float()
            if emb.shape[1] < longest:
                emb = torch.nn.functional.pad(emb, (0, 0, 0, longest - emb.shape[1]))
            p.append(emb[:, :longest])
    out = [torch.cat(p) for p in parts]
    return out if is_list else out[0]
