"""Reading the data folder's text and JSON files, with every failure a :class:`DataFormatError` naming the file."""
from __future__ import annotations

import json
import os

from .errors import DataFormatError

__all__ = ["read_text_lines", "read_json"]


def _decode_utf8(raw: bytes, path: str) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataFormatError(f"{path} line {line} is not valid UTF-8 (byte {raw[e.start:e.start + 1]!r} at offset "
                              f"{e.start})") from None


def _read_bytes(path: str, what: str) -> bytes:
    if not os.path.isfile(path):
        raise DataFormatError(f"{what} not found: {path}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise DataFormatError(f"{what} {path} cannot be read: {e.strerror or e}") from None


def read_text_lines(path: str | os.PathLike, what: str = "file") -> list[str]:
    """The ``\\n``-terminated lines of a UTF-8 text file, unstripped (a final newline does not add a line).

    Raises:
        DataFormatError: missing or unreadable file, or bytes that are not UTF-8 (the message names the line).
    """
    path = os.fspath(path)
    lines = _decode_utf8(_read_bytes(path, what), path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def read_json(path: str | os.PathLike, what: str = "JSON file"):
    """The parsed content of a UTF-8 JSON file.

    Raises:
        DataFormatError: missing or unreadable file, bytes that are not UTF-8, invalid JSON, or nesting too deep for
            the parser (a RecursionError in ``json``).
    """
    path = os.fspath(path)
    text = _decode_utf8(_read_bytes(path, what), path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{what} {path} is not readable JSON (not valid JSON: {e})") from None
    except RecursionError:
        raise DataFormatError(f"{what} {path} is nested too deeply to be read (thousands of levels of brackets); "
                              "it is not a file of this layout") from None
