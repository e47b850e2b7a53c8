"""A synthetic image-text dataset in the SCAN precomputed layout, with structure a matching model can learn.

Hidden model:

- ``n_concepts`` concepts (default 300), each with a made-up pronounceable word (``zorvak``, ``mibu``, ...) and a
  sparse non-negative prototype in ``img_dim`` dimensions (about 20 % non-zero entries).
- Each image shows 5-8 distinct concepts. Of its ``n_regions`` regions, about 70 % each show one of them
  (weight 0.7-1.3, every concept in at least one region when ``0.7 * n_regions >= 8``, a quarter of them blended with a second concept of the
  same image), and the rest show one of 24 shared background prototypes; every region gets ReLU-shaped noise, and
  the regions are shuffled. The features are non-negative with mean about 0.2 and many exact zeros, like
  bottom-up-attention features.
- Optional harder negatives (``hard_negatives``): near-twin images sharing all concepts but one with the previous
  image, with captions that name the distinguishing concept (so they share most words with the twin's captions).
- Each caption names 3-6 of its image's concepts, in random order, joined by filler words (articles, prepositions,
  colours that carry no information), with commas, a final ``.`` / ``!`` or none, and sometimes a capital first
  letter (the tokeniser lower-cases).

The concepts and words depend only on ``seed``; each split has its own random stream, so changing ``n_train`` does
not change the test split. Sizes by default: train 3,000 images (15,000 captions), dev 1,000, test 1,000 images x
5,000 captions (the Flickr30K test size); with 36 x 2048 float32 features that is 1.5 GB on disk, written in chunks
through ``np.lib.format.open_memmap`` 128 images (38 MB) at a time, in about 11 s on 2 cores.

CLI: ``python -m itm_models.data.synthetic OUT_DIR [--n-train N] [--n-dev N] [--n-test N] [--img-dim D] ...``
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np

from .tokenize import Vocabulary

__all__ = ["make_synthetic_dataset", "concept_words", "FILLER_WORDS"]

FILLER_WORDS = (
    "a", "the", "with", "on", "near", "beside", "and", "in", "under", "behind", "next", "to", "of", "front",
    "holding", "some", "two", "small", "large", "red", "blue", "old", "is", "are", "there",
)
_CONNECTORS = (
    ("with",), ("on",), ("near",), ("beside",), ("and",), ("in",), ("under",), ("behind",), ("next", "to"),
    ("in", "front", "of"), ("holding",),
)
_ARTICLES = ("a", "the", "some", "two", "")
_ADJECTIVES = ("small", "large", "red", "blue", "old")
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "st", "tr", "sh")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou")
_CODAS = ("", "", "", "k", "n", "r", "s", "x", "l")

_N_BACKGROUND = 24
_PROTO_DENSITY = 0.2
_PROTO_SCALE = 2.0  # prototype entries relu(N(0,1)) * 2 on 20 % of dims: mean about 0.16
_NOISE_SIGMA, _NOISE_SHIFT = 0.25, 0.1  # region noise relu(N(-0.1, 0.25)): mean about 0.06
_CHUNK_IMAGES = 128  # 128 x 36 x 2048 float32 = 38 MB per chunk


def concept_words(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct made-up lower-case words of 2-3 syllables (no filler word, no special token)."""
    words: list[str] = []
    seen = set(FILLER_WORDS)
    while len(words) < n:
        n_syl = 2 + int(rng.random() < 0.4)
        parts = []
        for s in range(n_syl):
            parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))])
        parts.append(_CODAS[rng.integers(len(_CODAS))])
        word = "".join(parts)
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _prototypes(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    p = np.maximum(rng.standard_normal((n, dim), dtype=np.float32), 0.0)
    p *= rng.random((n, dim), dtype=np.float32) < _PROTO_DENSITY
    p *= _PROTO_SCALE
    return p


def _caption(rng: np.random.Generator, words: list[str]) -> str:
    """One sentence naming ``words`` in the given order, with filler words and punctuation."""
    out: list[str] = []
    for k, w in enumerate(words):
        if k:
            if rng.random() < 0.2:
                out[-1] += ","
            out.extend(_CONNECTORS[rng.integers(len(_CONNECTORS))])
        art = _ARTICLES[rng.integers(len(_ARTICLES))]
        if art:
            out.append(art)
        if rng.random() < 0.25:
            out.append(_ADJECTIVES[rng.integers(len(_ADJECTIVES))])
        out.append(w)
    if rng.random() < 0.15:
        out = ["there", "is"] + out
    text = " ".join(out)
    end = rng.random()
    text += "." if end < 0.75 else ("!" if end < 0.8 else "")
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:]
    return text


def _write_split(
    out_dir: str,
    split: str,
    n_images: int,
    rng: np.random.Generator,
    protos: np.ndarray,
    background: np.ndarray,
    words: list[str],
    n_regions: int,
    captions_per_image: int,
    id_offset: int,
    hard_negatives: float = 0.0,
) -> int:
    n_concepts, dim = protos.shape
    table = np.concatenate([protos, background])  # (n_concepts + n_background, dim)
    path = os.path.join(out_dir, f"{split}_ims.npy")
    # Create the file once; each chunk maps it again and unmaps it, so written pages never pile up in RSS.
    created = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n_images, n_regions, dim))
    del created
    captions: list[str] = []
    n_fg = max(1, int(round(0.7 * n_regions)))
    prev_shown = None
    for c0 in range(0, n_images, _CHUNK_IMAGES):
        b = min(_CHUNK_IMAGES, n_images - c0)
        main = np.empty((b, n_regions), dtype=np.int64)
        second = np.empty((b, n_regions), dtype=np.int64)
        for i in range(b):
            k = int(rng.integers(5, 9))
            shown = rng.choice(n_concepts, size=k, replace=False)
            distinct = None
            if hard_negatives > 0 and prev_shown is not None and rng.random() < hard_negatives:
                # a near twin of the previous image: its concepts but one, replaced by a concept it lacks
                distinct = int(rng.choice(np.setdiff1d(np.arange(n_concepts), prev_shown)))
                shown = prev_shown.copy()
                shown[rng.integers(len(shown))] = distinct
                k = len(shown)
            prev_shown = shown
            # every shown concept gets a region, the other foreground regions draw from them at random
            fg = np.concatenate([shown, rng.choice(shown, size=max(0, n_fg - k))])[:n_regions]
            bg = n_concepts + rng.integers(0, len(background), size=n_regions - len(fg))
            order = rng.permutation(n_regions)
            main[i] = np.concatenate([fg, bg])[order]
            sec = np.concatenate([rng.choice(shown, size=len(fg)), bg])[order]
            second[i] = sec
            for _ in range(captions_per_image):
                m = int(rng.integers(3, min(6, k) + 1))
                named = rng.choice(shown, size=m, replace=False)
                if distinct is not None and distinct not in named:   # the one word that tells the twins apart
                    named[rng.integers(m)] = distinct
                captions.append(_caption(rng, [words[j] for j in named]))
        w_main = rng.uniform(0.7, 1.3, size=(b, n_regions, 1)).astype(np.float32)
        blend = rng.random((b, n_regions, 1)) < 0.25
        w_sec = np.where(blend & (main < n_concepts)[..., None], rng.uniform(0.2, 0.5, size=(b, n_regions, 1)), 0.0)
        feats = table[main] * w_main
        feats += table[second] * w_sec.astype(np.float32)
        noise = rng.standard_normal(feats.shape, dtype=np.float32)
        noise *= _NOISE_SIGMA
        noise -= _NOISE_SHIFT
        np.maximum(noise, 0.0, out=noise)
        feats += noise
        ims = np.lib.format.open_memmap(path, mode="r+")
        ims[c0:c0 + b] = feats
        ims.flush()
        del ims
    with open(os.path.join(out_dir, f"{split}_caps.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(captions) + "\n")
    with open(os.path.join(out_dir, f"{split}_ids.txt"), "w", encoding="utf-8") as f:
        f.write("\n".join(str(id_offset + i) for i in range(n_images)) + "\n")
    return len(captions)


def make_synthetic_dataset(
    out_dir: str | os.PathLike,
    n_train: int = 3000,
    n_dev: int = 1000,
    n_test: int = 1000,
    n_regions: int = 36,
    img_dim: int = 2048,
    vocab_size: int | None = None,
    seed: int = 0,
    captions_per_image: int = 5,
    n_concepts: int = 300,
    hard_negatives: float = 0.0,
) -> dict:
    """Write a learnable synthetic dataset in the precomputed layout to ``out_dir``.

    Files: ``{train,dev,test}_ims.npy`` float32 (n_images, n_regions, img_dim), ``{split}_caps.txt``
    (``captions_per_image`` consecutive captions per image), ``{split}_ids.txt`` (one id per image) and
    ``vocab.json`` (official format). A split with 0 images is skipped.

    Args:
        out_dir: folder to write (created if needed; existing files of the same names are overwritten).
        n_train, n_dev, n_test: images per split.
        n_regions: regions per image (36 like BUTD).
        img_dim: feature width (2048 like BUTD).
        vocab_size: total vocabulary size including the 4 special tokens, filler words and punctuation; when given
            it sets ``n_concepts = vocab_size - (number of fixed tokens)``. None keeps ``n_concepts``.
        seed: random seed; the output is a deterministic function of all arguments.
        captions_per_image: 5 (as Flickr30K / COCO) or 1 (one feature row per caption).
        n_concepts: number of hidden concepts (= concept words).
        hard_negatives: probability (0..1) that an image is a near twin of the previous image of its split: the
            same concepts but one, replaced by a concept the previous image lacks, and every caption of it names
            that concept; its captions then share most words with the twin's. 0 (default) draws nothing extra, so
            the output is unchanged from the generator without the option.

    Returns:
        dict with ``out_dir``, ``vocab_size``, ``n_concepts`` and ``splits`` ({split: (n_images, n_captions)}).
    """
    if captions_per_image not in (1, 5):
        raise ValueError(f"captions_per_image must be 1 or 5 (what the readers accept), got {captions_per_image}")
    for name, v in (("n_train", n_train), ("n_dev", n_dev), ("n_test", n_test)):
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    if not 0.0 <= hard_negatives <= 1.0:
        raise ValueError(f"hard_negatives must be a probability in [0, 1], got {hard_negatives}")
    if n_regions < 1 or img_dim < 1:
        raise ValueError(f"n_regions and img_dim must be positive, got {n_regions}, {img_dim}")
    fixed = Vocabulary()
    for w in FILLER_WORDS + (",", ".", "!"):
        fixed.add_word(w)
    if vocab_size is not None:
        n_concepts = vocab_size - len(fixed)
    if n_concepts < 8:
        raise ValueError(f"need at least 8 concepts (vocab_size >= {len(fixed) + 8}), got n_concepts={n_concepts}")

    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    world = np.random.default_rng([seed, 0])
    words = concept_words(n_concepts, world)
    protos = _prototypes(world, n_concepts, img_dim)
    background = _prototypes(world, _N_BACKGROUND, img_dim)

    vocab = fixed
    for w in words:
        vocab.add_word(w)
    vocab.save(os.path.join(out_dir, "vocab.json"))

    splits = {}
    offset = 0
    for k, (split, n) in enumerate((("train", n_train), ("dev", n_dev), ("test", n_test)), start=1):
        if n == 0:
            continue
        rng = np.random.default_rng([seed, k])
        n_caps = _write_split(out_dir, split, n, rng, protos, background, words, n_regions, captions_per_image, offset,
                               hard_negatives)
        splits[split] = (n, n_caps)
        offset += n
    return {"out_dir": out_dir, "vocab_size": len(vocab), "n_concepts": n_concepts, "splits": splits}


def main(argv=None) -> None:
    """CLI entry point: ``python -m itm_models.data.synthetic OUT_DIR [options]``."""
    p = argparse.ArgumentParser(prog="python -m itm_models.data.synthetic", description=__doc__.split("\n\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--n-train", type=int, default=3000)
    p.add_argument("--n-dev", type=int, default=1000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-regions", type=int, default=36)
    p.add_argument("--img-dim", type=int, default=2048)
    p.add_argument("--n-concepts", type=int, default=300)
    p.add_argument("--vocab-size", type=int, default=None)
    p.add_argument("--captions-per-image", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hard-negatives", type=float, default=0.0,
                   help="probability that an image is a near twin of the previous one (default 0: none)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    info = make_synthetic_dataset(
        a.out_dir, n_train=a.n_train, n_dev=a.n_dev, n_test=a.n_test, n_regions=a.n_regions, img_dim=a.img_dim,
        vocab_size=a.vocab_size, seed=a.seed, captions_per_image=a.captions_per_image, n_concepts=a.n_concepts,
        hard_negatives=a.hard_negatives,
    )
    dt = time.perf_counter() - t0
    for split, (n_img, n_cap) in info["splits"].items():
        print(f"{split:>5}: {n_img} images x {n_cap} captions")
    print(f"vocabulary: {info['vocab_size']} tokens ({info['n_concepts']} concepts)")
    print(f"wrote {info['out_dir']} in {dt:.1f} s")


if __name__ == "__main__":
    main()


def synthetic_boxes(n_images: int, n_regions: int = 36, *, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """GSMN box inputs: pixel boxes (n_images, n_regions, 4) float32 x1, y1, x2, y2 inside images of random sizes,
    and the sizes (n_images, 2) int64 (width, height), as the golden generator draws them."""
    rng = np.random.default_rng(seed)
    w = rng.integers(240, 801, size=n_images)
    h = rng.integers(240, 801, size=n_images)
    bw = w[:, None] * rng.uniform(0.04, 0.95, (n_images, n_regions))
    bh = h[:, None] * rng.uniform(0.04, 0.95, (n_images, n_regions))
    x1 = rng.uniform(0, 1, (n_images, n_regions)) * (w[:, None] - 1 - bw)
    y1 = rng.uniform(0, 1, (n_images, n_regions)) * (h[:, None] - 1 - bh)
    boxes = np.stack([x1, y1, x1 + bw, y1 + bh], axis=-1).astype(np.float32)
    return boxes, np.stack([w, h], axis=1).astype(np.int64)


def synthetic_parses(lengths, *, seed: int = 0) -> list[list[list[int]]]:
    """Random dependency trees in the CoreNLP layout GSMN reads, one per caption of ``lengths`` tokens (rows 0
    and L - 1 are <start> / <end>: the tree covers tokens 1..L-2): [0, root] first, then [governor, dependent]
    sorted by dependent; governors prefer nearby tokens."""
    rng = np.random.default_rng(seed)
    out = []
    for n_rows in lengths:
        n = max(1, int(n_rows) - 2)
        root = int(rng.integers(1, n + 1))
        attached, edges = [root], []
        for d in rng.permutation([t for t in range(1, n + 1) if t != root]):
            q = np.exp(-np.abs(np.array(attached) - d) / 2.0)
            edges.append([int(rng.choice(attached, p=q / q.sum())), int(d)])
            attached.append(int(d))
        out.append([[0, root]] + sorted(edges, key=lambda e: e[1]))
    return out
