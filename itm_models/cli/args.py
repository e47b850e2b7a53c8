"""Argument checks shared by the CLIs, and the one way they end on an error.

The ``type=`` functions below make argparse refuse a bad value at parse time with ``PROG: error: argument
--flag: why`` (exit status 2), before any data is read. :func:`run_main` turns the errors a user can cause later
(a corrupt checkpoint, a malformed data file, a run folder in use, a diverging loss) into one line on stderr and
exit status 2, never a traceback.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Callable

__all__ = ["positive_int", "nonnegative_int", "positive_float", "nonnegative_float", "finite_float", "device_name",
           "backend_name", "output_dir", "USER_ERRORS", "run_main", "one_line"]

# What a user's input can raise after parsing (CheckpointError and DataFormatError are ValueErrors; OSError covers
# FileNotFoundError, FileExistsError, NotADirectoryError and PermissionError).
USER_ERRORS = (ValueError, OSError, FloatingPointError)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def nonnegative_int(text: str) -> int:
    """An integer >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number (not nan or inf)."""
    return _float(text)


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def nonnegative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def device_name(text: str) -> str:
    """``auto`` or a device that exists here (:func:`itm_models.devices.resolve_device`); returned as given."""
    from ..devices import resolve_device

    try:
        resolve_device(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def backend_name(text: str) -> str:
    """One of the kernel backends (``itm_kernels``' names: auto, cpu, torch, cuda, triton, reference)."""
    from itm_kernels._common.constants import BACKENDS

    if text not in BACKENDS:
        raise argparse.ArgumentTypeError(f"unknown backend {text!r}; choose from {', '.join(BACKENDS)}")
    return text


def output_dir(text: str) -> str:
    """A folder that exists or can be created: not an existing file, and not below one."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder, got an empty path")
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} exists and is not a folder")
    parent = os.path.dirname(os.path.abspath(text))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise argparse.ArgumentTypeError(f"{text} cannot be created: {parent} is a file, not a folder")
    return text


def one_line(exc: BaseException) -> str:
    """The exception's message on one line (its type name when it has none)."""
    text = " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}"
    return text or type(exc).__name__


def run_main(prog: str, main: Callable, argv=None) -> int:
    """Run ``main(argv)``; a user error (:data:`USER_ERRORS`) ends with ``PROG: error: message`` on stderr and exit
    status 2, Ctrl-C with ``PROG: interrupted`` and 130. Returns 0 after a normal run (or ``main``'s int result)."""
    try:
        result = main(argv)
    except USER_ERRORS as exc:
        print(f"{prog}: error: {one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0
