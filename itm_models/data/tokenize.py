"""Caption tokenisation and vocabulary of the official SCAN data pipeline, without nltk and without downloads.

The official ``PrecompDataset`` turns a caption line into ids as::

    tokens = nltk.tokenize.word_tokenize(str(caption).lower())
    ids = [vocab('<start>')] + [vocab(t) for t in tokens] + [vocab('<end>')]

``nltk.word_tokenize`` first splits the text into sentences with the pre-trained English Punkt model, then runs
``NLTKWordTokenizer`` (improved Penn Treebank rules) on each sentence. :func:`word_tokenize` reproduces both steps
for lower-cased text, following the rules of NLTK 3.8/3.9:

- Treebank rules, applied in NLTK's order: opening quotes become `````` ``, closing quotes ``''``; ``, ; : ! ? ( ) [ ]
  { } < > $ % & @ # * --`` and ``...`` are split off (a comma or colon only when not followed by a digit, so
  ``1,000`` and ``3:00`` stay whole); the final period of a sentence is split off (inner periods stay: ``3.5``,
  ``u.s.``); clitics ``'s 'm 'd 're 've 'll n't`` are split (``isn't`` -> ``is n't``); ``cannot gonna gotta wanna
  gimme lemme`` are split in two.
- Punkt sentence breaks, which matter only for a period inside the caption (``a dog. a cat.`` -> ``dog . a``):
  a period ends a sentence unless the word before it is a known abbreviation (a small built-in list, see
  ``_ABBREVIATIONS``), an ellipsis, or a single letter or a number followed by a lower-case word or ``, ; : . ! ?``.

Not reproduced (irrelevant to lower-cased captions): Punkt's learned collocations and its per-word orthographic
statistics (we assume every lower-case word is not a sentence starter, which holds for ordinary English words), and
the full learned abbreviation list.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from typing import Iterable

from .errors import DataFormatError
from .files import read_json

__all__ = [
    "word_tokenize", "treebank_tokenize", "split_sentences", "tokenize_caption", "Vocabulary",
    "PAD", "START", "END", "UNK", "SPECIAL_TOKENS",
]

PAD, START, END, UNK = "<pad>", "<start>", "<end>", "<unk>"
SPECIAL_TOKENS = (PAD, START, END, UNK)  # ids 0, 1, 2, 3 in every official vocabulary

# --------------------------------------------------------------------------------------------------------------
# Treebank word rules (NLTKWordTokenizer). Each stage is a list of (pattern, replacement) applied in order.
# --------------------------------------------------------------------------------------------------------------
_CLOSERS = "\\]\\)}>\"'"  # closing brackets and quotes that may follow a final period

_OPENING_QUOTES = [
    (re.compile("([«“‘„]|`+)"), r" \1 "),
    (re.compile(r'^"'), "``"),
    (re.compile(r"(``)"), r" \1 "),
    (re.compile(r"""([ (\[{<])("|'')"""), r"\1 `` "),
    # a quote opening a word, unless it starts a clitic ('re 've 'll 'm 't 's 'd 'n)
    (re.compile(r"(?i)(')(?!re|ve|ll|m|t|s|d|n)(\w)\b"), r"\1 \2"),
]
_PUNCTUATION = [
    (re.compile("([^.])(\\.)([" + _CLOSERS + "»”’ ]*)\\s*$"), r"\1 \2 \3 "),  # final period
    (re.compile(r"([:,])([^\d])"), r" \1 \2"),  # comma / colon not inside a number
    (re.compile(r"([:,])$"), r" \1 "),
    (re.compile(r"\.{2,}"), r" \g<0> "),  # ellipsis
    (re.compile(r"[;@#$%&]"), r" \g<0> "),
    (re.compile("([^.])(\\.)([" + _CLOSERS + "]*)\\s*$"), r"\1 \2\3 "),  # final period, second form
    (re.compile(r"[?!]"), r" \g<0> "),
    (re.compile(r"([^'])' "), r"\1 ' "),  # closing single quote
    (re.compile(r"[*]"), r" \g<0> "),
]
_BRACKETS = (re.compile(r"[\]\[(){}<>]"), r" \g<0> ")
_DOUBLE_DASH = (re.compile(r"--"), r" -- ")
_CLOSING_QUOTES = [
    (re.compile("([»”’])"), r" \1 "),
    (re.compile(r"''"), " '' "),
    (re.compile(r'"'), " '' "),
    (re.compile(r"([^' ])('[sS]|'[mM]|'[dD]|') "), r"\1 \2 "),
    (re.compile(r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) "), r"\1 \2 "),
]
_SPLIT_WORDS = [  # MacIntyre contractions: one word written as two
    re.compile(r"(?i)\b(can)(not)\b"),
    re.compile(r"(?i)\b(d)('ye)\b"),
    re.compile(r"(?i)\b(gim)(me)\b"),
    re.compile(r"(?i)\b(gon)(na)\b"),
    re.compile(r"(?i)\b(got)(ta)\b"),
    re.compile(r"(?i)\b(lem)(me)\b"),
    re.compile(r"(?i)\b(more)('n)\b"),
    re.compile(r"(?i)\b(wan)(na)(?=\s)"),
    re.compile(r"(?i) ('t)(is)\b"),
    re.compile(r"(?i) ('t)(was)\b"),
]


def treebank_tokenize(sentence: str) -> list[str]:
    """Split one sentence into words with NLTK's ``NLTKWordTokenizer`` (improved Penn Treebank) rules.

    Args:
        sentence: one sentence (no sentence splitting is done here; see :func:`word_tokenize`).

    Returns:
        list of str tokens; double quotes come out as `````` `` (opening) and ``''`` (closing).
    """
    text = sentence
    for pattern, repl in _OPENING_QUOTES:
        text = pattern.sub(repl, text)
    for pattern, repl in _PUNCTUATION:
        text = pattern.sub(repl, text)
    text = _BRACKETS[0].sub(_BRACKETS[1], text)
    text = _DOUBLE_DASH[0].sub(_DOUBLE_DASH[1], text)
    text = f" {text} "
    for pattern, repl in _CLOSING_QUOTES:
        text = pattern.sub(repl, text)
    for pattern in _SPLIT_WORDS:
        text = pattern.sub(r" \1 \2 ", text)
    return text.split()


# --------------------------------------------------------------------------------------------------------------
# Punkt sentence boundaries (the pre-trained English model's decisions on lower-cased text).
# --------------------------------------------------------------------------------------------------------------
# Common abbreviations that the English Punkt model knows (lower case, final period removed). A period after one
# of these never ends a sentence in lower-cased text.
_ABBREVIATIONS = frozenset(
    "mr mrs ms dr prof st jr sr vs etc inc corp co ltd mt ft ave blvd gen gov sen rep capt col lt sgt "
    "jan feb mar apr jun jul aug sep sept oct nov dec u.s u.k e.g i.e a.m p.m".split()
)
_END_CHARS = ".?!"
_NON_WORD = r"""[)";}\]*:@'({\[?!]"""  # characters that cannot occur inside a Punkt word
_MULTI_CHAR = r"(?:-{2,}|\.{2,}|(?:\.\s){2,}\.)"
_PUNKT_WORD = re.compile(
    "(" + _MULTI_CHAR
    + r"|(?=[^(\"`{\[:;&#*@)}\]\-,])\S+?(?=\s|$|" + _NON_WORD + "|" + _MULTI_CHAR
    + r"|,(?=$|\s|" + _NON_WORD + "|" + _MULTI_CHAR + r"))|\S)"
)
_CANDIDATE = re.compile("[" + re.escape(_END_CHARS) + "](?=(?P<after>" + _NON_WORD + r"|\s+(?P<next>\S+)))")
_NUMERIC = re.compile(r"^-?[.,]?\d[\d,.\-]*\.?$")
_INITIAL = re.compile(r"[^\W\d]\.$")
_ELLIPSIS = re.compile(r"\.\.+$")
_REALIGN = re.compile(r"""["')\]}]+?(?:\s+|(?=--)|$)""", re.MULTILINE)
_ORTHO_PUNCT = frozenset(";:,.!?")


def _punkt_words(text: str) -> list[str]:
    words = []
    for line in text.split("\n"):
        if line.strip():
            words.extend(_PUNKT_WORD.findall(line))
    return words


def _is_break(word: str, nxt: str | None) -> bool:
    """Punkt's decision for one word: does it end a sentence, given the following word (None at the end)?"""
    if word in _END_CHARS:
        return True
    if not word.endswith(".") or _ELLIPSIS.match(word):
        return False  # no period, or an ellipsis (a lower-case next word is never a sentence starter)
    if word.endswith(".."):
        return False
    stem = word[:-1].lower()
    if stem in _ABBREVIATIONS or stem.split("-")[-1] in _ABBREVIATIONS:
        return False
    if nxt is not None and (_INITIAL.match(word) or _NUMERIC.sub("##number##", word.lower()) == "##number##"):
        # Orthographic heuristic: a lower-case word or , ; : . ! ? after an initial or a number keeps it inside
        # the sentence; anything else (a digit, a quote, a bracket) leaves the break.
        if nxt in _ORTHO_PUNCT or nxt[0].islower():
            return False
    return True


def _context_has_break(context: str) -> bool:
    words = _punkt_words(context)
    return any(_is_break(w, words[i + 1]) for i, w in enumerate(words[:-1]))


def split_sentences(text: str) -> list[str]:
    """Split text into sentences the way the pre-trained English Punkt model does on lower-cased text.

    Args:
        text: a caption (lower-cased for exact agreement with the official pipeline).

    Returns:
        list of sentence strings (without the whitespace between them); ``[]`` for blank text.
    """
    # Candidate ends: . ? ! followed by a non-word character or by whitespace and a token. Of a run of
    # candidates that share their preceding word (``wow!!! a``) only the last one counts.
    candidates = []
    prev_stop, prev_start, prev_match = 0, 0, None
    for m in _CANDIDATE.finditer(text):
        before = text[prev_stop:m.start()]
        last_ws = max((i for i, ch in enumerate(before) if ch.isspace()), default=0)
        start = last_ws + prev_stop + 1 if last_ws else prev_start
        if prev_match is not None and prev_stop <= start:
            candidates.append((prev_match, text[prev_start:prev_stop] + prev_match.group() + prev_match["after"]))
        prev_match, prev_start, prev_stop = m, start, m.start()
    if prev_match is not None:
        candidates.append((prev_match, text[prev_start:prev_stop] + prev_match.group() + prev_match["after"]))

    spans = []
    last = 0
    for m, context in candidates:
        if _context_has_break(context):
            spans.append((last, m.end()))
            last = m.start("next") if m["next"] else m.end()
    spans.append((last, len(text.rstrip())))

    # Closing quotes / brackets right after a break belong to the sentence before it.
    sentences = []
    shift = 0
    for k, (s, e) in enumerate(spans):
        s += shift
        shift = 0
        if k + 1 < len(spans):
            ns, ne = spans[k + 1]
            m = _REALIGN.match(text[ns:ne])
            if m:
                sentences.append(text[s:ns + len(m.group(0).rstrip())])
                shift = m.end()
                continue
        if text[s:e]:
            sentences.append(text[s:e])
    return sentences


def word_tokenize(text: str) -> list[str]:
    """``nltk.word_tokenize(text)`` for lower-cased caption text: Punkt sentences, then Treebank words.

    Args:
        text: caption text (lower-case it first, as the official pipeline does, or use :func:`tokenize_caption`).

    Returns:
        list of str tokens.
    """
    return [tok for sentence in split_sentences(text) for tok in treebank_tokenize(sentence)]


def tokenize_caption(caption: str) -> list[str]:
    """Official caption tokenisation: strip, lower-case, :func:`word_tokenize`."""
    return word_tokenize(str(caption).strip().lower())


# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------
def _vocab_error(msg: str) -> Exception:
    return DataFormatError(msg)


class Vocabulary:
    """Word <-> id map in the official format: JSON ``{"word2idx": {...}, "idx2word": {...}, "idx": n}``.

    Ids are ``<pad>`` = 0, ``<start>`` = 1, ``<end>`` = 2, ``<unk>`` = 3, then the words. ``vocab(word)`` returns the
    id of ``word`` or the id of ``<unk>``. The shipped files hold 8,481 (Flickr30K) and 11,353 (COCO) tokens.
    """

    def __init__(self, word2idx: dict[str, int] | None = None):
        """Build from a ``word -> id`` map (ids must be 0..n-1, special tokens at 0..3), or an empty vocabulary
        holding only the four special tokens when ``word2idx`` is None."""
        if word2idx is None:
            word2idx = {w: i for i, w in enumerate(SPECIAL_TOKENS)}
        self.word2idx: dict[str, int] = {}
        self.idx2word: dict[int, str] = {}
        for word, idx in word2idx.items():
            if isinstance(idx, bool) or not isinstance(idx, int):
                raise _vocab_error(f"vocabulary id of {word!r} is not an int: {idx!r}")
            self.word2idx[word] = idx
            self.idx2word[idx] = word
        n = len(self.word2idx)
        if len(self.idx2word) != n or (n and (min(self.idx2word) != 0 or max(self.idx2word) != n - 1)):
            raise _vocab_error(f"vocabulary ids must be exactly 0..{n - 1}, each used once")
        for want, word in enumerate(SPECIAL_TOKENS):
            if self.word2idx.get(word) != want:
                raise _vocab_error(f"vocabulary must map {word!r} to {want}, got {self.word2idx.get(word)!r}")

    @property
    def idx(self) -> int:
        """Next free id (= number of entries), as the official ``Vocabulary.idx``."""
        return len(self.word2idx)

    def __len__(self) -> int:
        return len(self.word2idx)

    def __contains__(self, word: str) -> bool:
        return word in self.word2idx

    def __call__(self, word: str) -> int:
        """Id of ``word``; the id of ``<unk>`` (3) for unknown words."""
        return self.word2idx.get(word, self.word2idx[UNK])

    def add_word(self, word: str) -> int:
        """Add ``word`` (if new) with the next free id; return its id."""
        if word not in self.word2idx:
            idx = len(self.word2idx)
            self.word2idx[word] = idx
            self.idx2word[idx] = word
        return self.word2idx[word]

    def encode_caption(self, text: str) -> list[int]:
        """``[<start>] + ids of tokenize_caption(text) + [<end>]`` (length = number of tokens + 2)."""
        return [self.word2idx[START], *(self(t) for t in tokenize_caption(text)), self.word2idx[END]]

    def decode(self, ids: Iterable[int]) -> list[str]:
        """Words of ``ids`` (``<unk>`` for ids outside the vocabulary); handy for inspecting batches."""
        return [self.idx2word.get(int(i), UNK) for i in ids]

    def to_json_dict(self) -> dict:
        """The official JSON layout (``idx2word`` keys are strings, as JSON requires)."""
        return {
            "word2idx": dict(self.word2idx),
            "idx2word": {str(i): w for i, w in sorted(self.idx2word.items())},
            "idx": self.idx,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the vocabulary as official-format JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_json_dict(), f, ensure_ascii=False)

    @classmethod
    def from_json_dict(cls, d: dict, source: str = "vocabulary") -> "Vocabulary":
        """Build from the official JSON dict; ``idx2word`` may be keyed by str or int and must agree with
        ``word2idx``; ``idx`` (if present) must equal the number of words."""
        if not isinstance(d, dict) or not isinstance(d.get("word2idx"), dict):
            raise _vocab_error(f"{source}: expected a JSON object with a 'word2idx' object")
        vocab = cls(d["word2idx"])
        if "idx2word" in d:
            try:
                i2w = {int(k): v for k, v in d["idx2word"].items()}
            except (AttributeError, TypeError, ValueError):
                raise _vocab_error(f"{source}: 'idx2word' must map integer ids to words") from None
            if i2w != vocab.idx2word:
                bad = next(i for i in sorted(set(i2w) | set(vocab.idx2word)) if i2w.get(i) != vocab.idx2word.get(i))
                raise _vocab_error(
                    f"{source}: idx2word[{bad}] = {i2w.get(bad)!r} disagrees with word2idx "
                    f"({vocab.idx2word.get(bad)!r})"
                )
        if "idx" in d and d["idx"] != len(vocab):
            raise _vocab_error(f"{source}: 'idx' is {d['idx']!r} but the vocabulary has {len(vocab)} words")
        return vocab

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Vocabulary":
        """Read an official-format vocabulary JSON file."""
        path = os.fspath(path)
        return cls.from_json_dict(read_json(path, "vocabulary file"), source=path)

    @classmethod
    def build(cls, captions: Iterable[str], threshold: int = 4) -> "Vocabulary":
        """Official ``build_vocab``: tokenise every caption, keep words seen at least ``threshold`` times.

        Args:
            captions: caption strings.
            threshold: minimum count (the official scripts use 4).

        Returns:
            Vocabulary with the four special tokens, then the kept words in order of first appearance.
        """
        counts = Counter()
        for caption in captions:
            counts.update(tokenize_caption(caption))
        vocab = cls()
        for word, n in counts.items():
            if n >= threshold:
                vocab.add_word(word)
        return vocab
