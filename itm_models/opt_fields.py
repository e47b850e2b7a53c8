"""Reading a model config out of an official ``opt`` (argparse.Namespace or dict), shared by the config classes."""
from __future__ import annotations

import dataclasses


def opt_fields(config_cls, opt, exclude=()) -> dict:
    """The entries of ``opt`` that are fields of the dataclass ``config_cls`` (less ``exclude``); the rest (paths,
    workers, logging) is ignored.

    Raises:
        ValueError: ``opt`` has no ``vocab_size`` (the official train.py sets ``opt.vocab_size = len(vocab)``).
    """
    d = dict(opt) if isinstance(opt, dict) else dict(vars(opt))
    if "vocab_size" not in d:
        raise ValueError("opt has no 'vocab_size' (the official train.py sets opt.vocab_size = len(vocab))")
    names = {f.name for f in dataclasses.fields(config_cls)} - set(exclude)
    return {k: v for k, v in d.items() if k in names}
