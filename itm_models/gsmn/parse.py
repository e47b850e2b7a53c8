"""Dependency parses for the sparse GSMN from raw captions (optional: spaCy)."""
from __future__ import annotations

from collections.abc import Sequence

__all__ = ["parse_captions"]


def parse_captions(texts: Sequence[str], *, model: str = "en_core_web_sm") -> list[list[list[int]]]:
    """Dependency parses in the CoreNLP layout GSMN reads ([0, root] first, then [governor, dependent] sorted by
    dependent, 1-based tokens), from spaCy. Optional: needs ``spacy`` and the English pipeline ``model``.

    Token t of the parse is row t of the caption's word sequence when row 0 is ``<start>``.
    """
    try:
        import spacy
    except ImportError:
        raise ImportError("parse_captions needs spaCy (pip install spacy && python -m spacy download "
                          f"{model}); GSMN also accepts parses from any parser as edge lists") from None
    try:
        nlp = spacy.load(model)
    except OSError:
        raise ImportError(f"spaCy pipeline {model!r} is not installed: python -m spacy download {model}") from None
    out = []
    for doc in nlp.pipe(texts):
        edges = []
        for tok in doc:
            if tok.head.i == tok.i:
                edges.insert(0, [0, tok.i + 1])
            else:
                edges.append([tok.head.i + 1, tok.i + 1])
        out.append([edges[0]] + sorted(edges[1:], key=lambda e: e[1]) if edges else [])
    return out
