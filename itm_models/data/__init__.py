"""Data: :mod:`.readers` (the SCAN precomputed-feature layout: :class:`PrecompDataset`, ...), :mod:`.tokenize`
(official tokenisation and :class:`Vocabulary`), :mod:`.synthetic` (a learnable synthetic dataset), :mod:`.gsmn`
(GSMN's extra files), :mod:`.files` (text and JSON files read with named errors), :mod:`.errors`
(:class:`DataFormatError`).

The names of the former module ``itm_models.data`` are all here.
"""
from .errors import DataFormatError
from .readers import (OFFICIAL_DEV_CAPTIONS, PrecompDataset, collate, load_split_captions, load_split_images,
                      load_vocab, precomp_loader, read_caption_lines, split_paths)
from .tokenize import Vocabulary

__all__ = [
    "DataFormatError", "PrecompDataset", "collate", "load_split_images", "load_split_captions",
    "read_caption_lines", "load_vocab", "split_paths", "precomp_loader", "OFFICIAL_DEV_CAPTIONS",
]
