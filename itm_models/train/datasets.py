"""GSMN's training items: :class:`GSMNTrainSet` (features, GSMN caption ids, each caption's image boxes and size and
its parse) and :func:`collate_gsmn` (batches as :class:`GSMNBatch`). SCAN and SGRAF train on
:class:`itm_models.data.PrecompDataset` with :func:`itm_models.data.collate`."""
from __future__ import annotations

import os
from typing import NamedTuple

import numpy as np
import torch

from ..data import DataFormatError, collate
from ..eval.similarity import gsmn_split
from ..gsmn.geometry import check_parses

__all__ = ["GSMNBatch", "GSMNTrainSet", "collate_gsmn"]


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
    """GSMN's training items: :func:`itm_models.eval.similarity.gsmn_split`'s dataset (features, GSMN caption ids) with
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
