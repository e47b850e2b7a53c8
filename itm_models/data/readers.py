"""Readers for the SCAN precomputed-feature layout (also used by SGRAF, GSMN and VSE-infinity).

A data folder holds, per split (``train``, ``dev``, ``test``, ``testall``):

- ``{split}_ims.npy``: float32 (rows, 36, 2048) bottom-up-attention region features. Opened with
  ``np.load(mmap_mode="r")``: COCO train is 33 GB, so it is never read whole; each item copies one image.
- ``{split}_caps.txt``: one caption per line (UTF-8), the captions of image ``k`` on lines ``5k .. 5k+4``.
- ``{split}_ids.txt`` (optional): one id per image row or per caption.
- a vocabulary JSON (``{word2idx, idx2word, idx}``); by default ``{data_dir}/vocab.json``.

If ``rows == captions`` every caption has its own feature row (Flickr30K dev ships 5,070 rows), so ``im_div = 1``;
otherwise there must be exactly 5 captions per row and ``im_div = 5``. Caption ``i`` uses feature row
``i // im_div``.

Every problem with the files raises :class:`DataFormatError` (a ``ValueError``) with a one-line message that names
the file and what is wrong, before any result is returned.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch

from .errors import DataFormatError
from .files import read_text_lines
from .tokenize import Vocabulary

__all__ = [
    "DataFormatError", "PrecompDataset", "collate", "load_split_images", "load_split_captions",
    "read_caption_lines", "load_vocab", "split_paths", "precomp_loader", "OFFICIAL_DEV_CAPTIONS",
]

# The official PrecompDataset evaluates only the first 5,000 captions of the 'dev' split (COCO dev is large).
OFFICIAL_DEV_CAPTIONS = 5000


def split_paths(data_dir: str | os.PathLike, split: str) -> dict[str, str]:
    """Paths of a split's files: keys ``ims``, ``caps``, ``ids`` (the files need not exist)."""
    d = os.fspath(data_dir)
    return {
        "ims": os.path.join(d, f"{split}_ims.npy"),
        "caps": os.path.join(d, f"{split}_caps.txt"),
        "ids": os.path.join(d, f"{split}_ids.txt"),
    }


def _require_file(path: str, what: str) -> None:
    if not os.path.isfile(path):
        raise DataFormatError(f"{what} not found: {path}")


def load_split_images(
    data_dir: str | os.PathLike, split: str, img_dim: int | None = None, n_regions: int | None = None
) -> np.ndarray:
    """Memory-map ``{data_dir}/{split}_ims.npy``.

    Args:
        data_dir: data folder.
        split: split name (``train``, ``dev``, ``test``, ``testall``).
        img_dim: expected feature width (2048 for BUTD features), or None to accept any.
        n_regions: expected regions per image (36), or None to accept any.

    Returns:
        read-only ``np.memmap`` of shape (rows, n_regions, img_dim), floating dtype (float32 in the official
        files); nothing is read into memory.

    Raises:
        DataFormatError: missing file, not a valid .npy, not 3-D, not floating point, no rows, regions or features,
            or a width / region count different from the expected one.
    """
    path = split_paths(data_dir, split)["ims"]
    _require_file(path, "image features file")
    try:
        ims = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise DataFormatError(f"{path} is not a readable .npy array: {e}") from None
    if not isinstance(ims, np.ndarray):
        raise DataFormatError(f"{path} holds {type(ims).__name__}, expected one .npy array")
    if ims.ndim != 3:
        raise DataFormatError(
            f"{path} has shape {tuple(ims.shape)} (ndim {ims.ndim}), expected (rows, regions, img_dim)"
        )
    if ims.dtype.kind != "f":
        raise DataFormatError(f"{path} has dtype {ims.dtype}, expected float32 features")
    if 0 in ims.shape:
        empty = ("image rows", "regions per image", "features per region")[ims.shape.index(0)]
        raise DataFormatError(f"{path} has no {empty} (shape {tuple(ims.shape)}); expected (rows, regions, img_dim), "
                              "all > 0")
    if img_dim is not None and ims.shape[2] != img_dim:
        raise DataFormatError(f"{path} has feature width {ims.shape[2]}, expected img_dim={img_dim}")
    if n_regions is not None and ims.shape[1] != n_regions:
        raise DataFormatError(f"{path} has {ims.shape[1]} regions per image, expected {n_regions}")
    return ims


def read_caption_lines(data_dir: str | os.PathLike, split: str) -> list[str]:
    """Caption lines of ``{data_dir}/{split}_caps.txt``, stripped, as the official reader does.

    Every ``\\n``-terminated line is one caption (blank lines included); a final newline does not add one.

    Raises:
        DataFormatError: missing file, not UTF-8, or no captions.
    """
    path = split_paths(data_dir, split)["caps"]
    _require_file(path, "caption file")
    lines = read_text_lines(path, "caption file")
    if not lines:
        raise DataFormatError(f"caption file is empty: {path}")
    return [line.strip() for line in lines]


def _read_ids(path: str) -> list[str]:
    return [line.strip() for line in read_text_lines(path, "id file")]


def load_vocab(vocab, data_dir: str | os.PathLike | None = None) -> Vocabulary:
    """Resolve a vocabulary argument: a :class:`Vocabulary`, a JSON path, or None for ``{data_dir}/vocab.json``."""
    if isinstance(vocab, Vocabulary):
        return vocab
    if vocab is None:
        if data_dir is None:
            raise DataFormatError("no vocabulary given and no data folder to look for vocab.json in")
        path = os.path.join(os.fspath(data_dir), "vocab.json")
        if not os.path.isfile(path):
            raise DataFormatError(f"no vocabulary given and the default vocabulary file is missing: {path}")
        return Vocabulary.load(path)
    if isinstance(vocab, (str, os.PathLike)):
        return Vocabulary.load(vocab)
    raise TypeError(f"vocab must be a Vocabulary, a path or None, got {type(vocab).__name__}")


def _encode_all(captions: Sequence[str], vocab: Vocabulary, vocab_size: int | None, path: str) -> list[np.ndarray]:
    limit = len(vocab) if vocab_size is None else int(vocab_size)
    out = []
    for line_no, caption in enumerate(captions, start=1):
        ids = np.asarray(vocab.encode_caption(caption), dtype=np.int64)
        if ids.max() >= limit:
            k = int(np.argmax(ids >= limit))
            word = vocab.idx2word.get(int(ids[k]), "?")
            raise DataFormatError(
                f"{path} line {line_no}: token {word!r} has id {int(ids[k])}, outside the vocabulary size {limit}"
            )
        out.append(ids)
    return out


def _check_ids(caption_ids: Sequence[Sequence[int]], vocab_size: int | None) -> list[np.ndarray]:
    """Ready-made caption ids as int64 arrays; each non-empty, >= 0 and below ``vocab_size`` when given."""
    out = []
    for c, seq in enumerate(caption_ids):
        try:
            ids = np.asarray(seq)
        except ValueError as e:
            raise DataFormatError(f"caption_ids[{c}] is not a flat sequence of integer ids: {e}") from None
        if ids.ndim != 1 or ids.size == 0 or not (np.issubdtype(ids.dtype, np.integer)):
            raise DataFormatError(f"caption_ids[{c}] must be a non-empty flat sequence of integer ids, got "
                                  f"shape {ids.shape} dtype {ids.dtype}")
        ids = ids.astype(np.int64)
        if ids.min() < 0 or (vocab_size is not None and ids.max() >= int(vocab_size)):
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            allowed = ">= 0" if vocab_size is None else f"in 0..{int(vocab_size) - 1} (vocabulary size {vocab_size})"
            raise DataFormatError(f"caption_ids[{c}] (caption {c + 1}) has id {bad}; ids must be {allowed}")
        out.append(ids)
    return out


def _pad(seqs: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    padded = torch.zeros(len(seqs), int(lengths.max()) if len(seqs) else 0, dtype=torch.long)
    for i, s in enumerate(seqs):
        padded[i, : len(s)] = torch.as_tensor(s, dtype=torch.long)
    return padded, lengths


def load_split_captions(
    data_dir: str | os.PathLike, split: str, vocab=None, vocab_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokenise and encode every caption of a split, in file order.

    Args:
        data_dir: data folder.
        split: split name.
        vocab: :class:`Vocabulary`, vocabulary JSON path, or None for ``{data_dir}/vocab.json``.
        vocab_size: if given (e.g. a checkpoint's ``opt.vocab_size``), every id must be below it.

    Returns:
        ``(ids, lengths)``: ids (N_cap, L_max) int64 padded with 0 (``<pad>``), each row
        ``<start> words <end>``; lengths (N_cap,) int64, counting ``<start>`` and ``<end>``.

    Raises:
        DataFormatError: missing / empty / non-UTF-8 caption file, bad vocabulary, or an id >= ``vocab_size``.
    """
    voc = load_vocab(vocab, data_dir)
    captions = read_caption_lines(data_dir, split)
    encoded = _encode_all(captions, voc, vocab_size, split_paths(data_dir, split)["caps"])
    return _pad(encoded)


class PrecompDataset(torch.utils.data.Dataset):
    """Caption-indexed dataset over precomputed region features (the official ``PrecompDataset``).

    Item ``i`` is ``(image, caption, i, img_id)``: ``image`` float32 tensor (n_regions, img_dim) = feature row
    ``img_id = i // im_div`` (copied from the memory map), ``caption`` int64 tensor (L_i,) =
    ``[<start>, words..., <end>]``. Captions are tokenised once, at construction (about 20 us each), so every
    vocabulary problem surfaces before training starts.

    Args:
        data_dir: data folder with ``{split}_ims.npy`` and ``{split}_caps.txt``.
        split: split name.
        vocab: :class:`Vocabulary`, JSON path, or None for ``{data_dir}/vocab.json``.
        img_dim: expected feature width (None: any).
        n_regions: expected regions per image (None: any).
        vocab_size: if given, every caption id must be below it (e.g. the model's embedding rows).
        max_captions: use only the first ``max_captions`` captions (the official code uses
            ``OFFICIAL_DEV_CAPTIONS`` = 5,000 for ``dev``); None for all.
        caption_ids: ready-made caption id sequences (one per caption, in file order) used instead of tokenising
            ``{split}_caps.txt``: GSMN reads ``{split}_precaps_stan.txt``, ids in its own vocabulary
            (:func:`itm_models.data.gsmn.load_split_caption_ids`). Then neither ``{split}_caps.txt`` nor a
            vocabulary is read (``vocab`` is kept only if given), and the ids are used as they are (every id must
            be >= 0 and below ``vocab_size`` when given).

    Attributes:
        images: the read-only memory map (rows, n_regions, img_dim).
        im_div: 1 or 5, captions per feature row.
        captions: list of int64 arrays.
        image_ids: lines of ``{split}_ids.txt`` when present, else None.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        split: str,
        vocab=None,
        img_dim: int | None = None,
        n_regions: int | None = None,
        vocab_size: int | None = None,
        max_captions: int | None = None,
        caption_ids: Sequence[Sequence[int]] | None = None,
    ):
        paths = split_paths(data_dir, split)
        if caption_ids is None:
            self.vocab = load_vocab(vocab, data_dir)
        else:
            self.vocab = None if vocab is None else load_vocab(vocab, data_dir)
            paths["caps"] = "caption_ids"
        self.images = load_split_images(data_dir, split, img_dim=img_dim, n_regions=n_regions)
        lines = read_caption_lines(data_dir, split) if caption_ids is None else list(caption_ids)
        rows, n_caps = self.images.shape[0], len(lines)
        if n_caps == rows:
            self.im_div = 1
        elif n_caps == 5 * rows:
            self.im_div = 5
        else:
            raise DataFormatError(
                f"{paths['caps']} has {n_caps} captions for {rows} image rows in {paths['ims']}: "
                f"expected {rows} (one per row) or {5 * rows} (5 per image)"
            )
        self.image_ids = None
        if os.path.isfile(paths["ids"]):
            ids = _read_ids(paths["ids"])
            if len(ids) not in (rows, n_caps):
                raise DataFormatError(
                    f"{paths['ids']} has {len(ids)} lines, expected {rows} (image rows) or {n_caps} (captions)"
                )
            self.image_ids = ids
        if max_captions is not None:
            if max_captions < 1:
                raise ValueError(f"max_captions must be positive, got {max_captions}")
            lines = lines[:max_captions]
        if caption_ids is None:
            self.captions = _encode_all(lines, self.vocab, vocab_size, paths["caps"])
        else:
            self.captions = _check_ids(lines, vocab_size)
        self.split = split
        self.data_dir = os.fspath(data_dir)
        self._ims_path = paths["ims"]

    def __getstate__(self):
        # Pickling a memmap copies its whole content (33 GB for COCO train) into every spawned DataLoader worker;
        # send the path instead and map the file again on arrival.
        state = self.__dict__.copy()
        state["images"] = None
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.images = np.load(self._ims_path, mmap_mode="r", allow_pickle=False)

    def __len__(self) -> int:
        return len(self.captions)

    def __getitem__(self, index: int):
        if not -len(self) <= index < len(self):
            raise IndexError(f"caption index {index} out of range for {len(self)} captions")
        index = index % len(self)
        img_id = index // self.im_div
        image = torch.from_numpy(np.array(self.images[img_id], dtype=np.float32))
        caption = torch.from_numpy(self.captions[index])
        return image, caption, index, img_id


def collate(batch):
    """Official ``collate_fn``: sort by caption length (descending, stable), stack images, pad captions with 0.

    Args:
        batch: list of ``(image (K, D) float32, caption (L_i,) int64, index, img_id)`` items.

    Returns:
        ``(images, captions, lengths, indices)``: images (B, K, D) float32; captions (B, L_max) int64 padded
        with 0; lengths (B,) int64 (descending); indices (B,) int64, the dataset indices in batch order.
    """
    if not batch:
        raise ValueError("batch is empty")
    batch = sorted(batch, key=lambda item: len(item[1]), reverse=True)
    images = torch.stack([item[0] for item in batch])
    captions, lengths = _pad([item[1] for item in batch])
    indices = torch.tensor([int(item[2]) for item in batch], dtype=torch.long)
    return images, captions, lengths, indices


def precomp_loader(
    data_dir: str | os.PathLike,
    split: str,
    vocab=None,
    batch_size: int = 128,
    shuffle: bool = False,
    num_workers: int = 0,
    **dataset_kwargs,
) -> torch.utils.data.DataLoader:
    """DataLoader over :class:`PrecompDataset` with :func:`collate` (``dataset_kwargs`` go to the dataset)."""
    dataset = PrecompDataset(data_dir, split, vocab, **dataset_kwargs)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, num_workers=num_workers, collate_fn=collate
    )

