"""The one exception of the data readers: :class:`DataFormatError`."""
from __future__ import annotations

__all__ = ["DataFormatError"]


class DataFormatError(ValueError):
    """A data file is missing or malformed; the message names the file and the problem."""
