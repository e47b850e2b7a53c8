"""Readers for GSMN's extra files in the precomputed-feature layout (``shared/reference/SEMANTICS.md``, Data layout):

- ``{split}_ims_bbx.npy``: (rows, 36, 4) boxes x1, y1, x2, y2 in pixels (dtype kept: it decides how the released
  evaluation mangles them, see :func:`itm_models.gsmn.geometry.official_eval_boxes`);
- ``{split}_ims_size.npy``: per image row the (width, height): the released files are object arrays of dicts
  ``{"image_w", "image_h"}`` (pickled, read only with ``allow_pickle=True``), structured arrays with those fields,
  or plain (rows, 2) integer arrays;
- ``{split}_precaps_stan.txt``: one caption per line as comma-separated word ids (GSMN's own vocabulary);
- ``{split}_caps.json``: one dependency parse per caption, a list of [governor, dependent] (CoreNLP layout).

Every problem raises :class:`itm_models.data.DataFormatError` naming the file.
"""
from __future__ import annotations

import os

import numpy as np

from .errors import DataFormatError
from .files import read_json

__all__ = ["load_split_boxes", "load_split_image_sizes", "load_split_caption_ids", "load_split_parses",
           "load_gsmn_split"]


def _path(data_dir, split: str, suffix: str) -> str:
    path = os.path.join(os.fspath(data_dir), f"{split}_{suffix}")
    if not os.path.isfile(path):
        raise DataFormatError(f"GSMN file not found: {path}")
    return path


def load_split_boxes(data_dir, split: str) -> np.ndarray:
    """``{split}_ims_bbx.npy`` -> (rows, K, 4) floating array in the file's dtype; checks x2 >= x1, y2 >= y1."""
    path = _path(data_dir, split, "ims_bbx.npy")
    try:
        boxes = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataFormatError(f"{path} is not a readable numeric .npy array: {e}") from None
    if boxes.ndim != 3 or boxes.shape[2] != 4 or not np.issubdtype(boxes.dtype, np.floating):
        raise DataFormatError(f"{path}: expected a floating (rows, K, 4) array, got {boxes.dtype} {boxes.shape}")
    if not np.isfinite(boxes).all() or (boxes[..., 2] < boxes[..., 0]).any() or (boxes[..., 3] < boxes[..., 1]).any():
        raise DataFormatError(f"{path}: boxes must be finite with x2 >= x1 and y2 >= y1")
    return boxes


def load_split_image_sizes(data_dir, split: str, *, allow_pickle: bool = False) -> np.ndarray:
    """``{split}_ims_size.npy`` -> (rows, 2) int64 (width, height), all > 0.

    ``allow_pickle``: the released files are pickled object arrays of dicts; unpickling can run code, so it is off
    unless asked for (trusted files only)."""
    path = _path(data_dir, split, "ims_size.npy")
    try:
        raw = np.load(path, allow_pickle=allow_pickle)
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise DataFormatError(f"{path} is a pickled object array (the released layout: one dict per image); "
                                  "pass allow_pickle=True to read it (trusted files only)") from None
        raise DataFormatError(f"{path} is not a readable .npy array: {e}") from None
    except (OSError, EOFError) as e:
        raise DataFormatError(f"{path} is not a readable .npy array: {e}") from None
    try:
        if raw.dtype.names:
            sizes = np.stack([raw["image_w"], raw["image_h"]], axis=1)
        elif raw.dtype == object:
            sizes = np.array([[d["image_w"], d["image_h"]] for d in raw.reshape(-1)])
        else:
            sizes = raw
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise DataFormatError(f"{path}: expected fields/keys image_w and image_h per image: {e}") from None
    if sizes.ndim != 2 or sizes.shape[1] != 2 or not np.issubdtype(sizes.dtype, np.number):
        raise DataFormatError(f"{path}: expected (rows, 2) (width, height), got {sizes.dtype} {sizes.shape}")
    if not np.isfinite(sizes).all() or (sizes <= 0).any() or (sizes != np.round(sizes)).any():
        raise DataFormatError(f"{path}: image sizes must be positive integers")
    return sizes.astype(np.int64)


def load_split_caption_ids(data_dir, split: str) -> list[list[int]]:
    """``{split}_precaps_stan.txt`` -> one list of word ids per caption."""
    path = _path(data_dir, split, "precaps_stan.txt")
    out = []
    with open(path, "rb") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            try:
                ids = [int(x) for x in line.split(b",")]
            except ValueError:
                raise DataFormatError(f"{path}:{n}: expected comma-separated integer word ids, got "
                                      f"{line[:60]!r}") from None
            if not ids or min(ids) < 0:
                raise DataFormatError(f"{path}:{n}: a caption needs at least one id, all >= 0")
            out.append(ids)
    if not out:
        raise DataFormatError(f"{path}: no captions")
    return out


def load_split_parses(data_dir, split: str) -> list[list[list[int]]]:
    """``{split}_caps.json`` -> one edge list ([governor, dependent] pairs) per caption."""
    path = _path(data_dir, split, "caps.json")
    parses = read_json(path, "GSMN parse file")
    if not isinstance(parses, list):
        raise DataFormatError(f"{path}: expected a JSON list with one parse per caption")
    for c, edges in enumerate(parses):
        if not isinstance(edges, list) or not all(isinstance(e, list) and len(e) == 2 and
                                                  all(isinstance(x, int) and x >= 0 for x in e) for e in edges):
            raise DataFormatError(f"{path}: parse {c} must be a list of [governor, dependent] pairs of ints >= 0")
    return parses


def load_gsmn_split(data_dir, split: str, *, allow_pickle: bool = False) -> dict:
    """All of GSMN's extra files of a split, checked against each other: ``boxes`` (rows, K, 4), ``image_sizes``
    (rows, 2), ``caption_ids`` and ``parses`` (one per caption). Captions must be 5 per box row or 1 per row."""
    boxes = load_split_boxes(data_dir, split)
    sizes = load_split_image_sizes(data_dir, split, allow_pickle=allow_pickle)
    ids = load_split_caption_ids(data_dir, split)
    parses = load_split_parses(data_dir, split)
    if len(sizes) != len(boxes):
        raise DataFormatError(f"{split}: {len(boxes)} box rows but {len(sizes)} image sizes")
    if len(parses) != len(ids):
        raise DataFormatError(f"{split}: {len(ids)} captions in {split}_precaps_stan.txt but {len(parses)} parses "
                              f"in {split}_caps.json")
    if len(ids) not in (len(boxes), 5 * len(boxes)):
        raise DataFormatError(f"{split}: {len(ids)} captions for {len(boxes)} box rows (expected 1 or 5 per row)")
    return {"boxes": boxes, "image_sizes": sizes, "caption_ids": ids, "parses": parses}
