"""Shared pieces of the model configs (:class:`itm_models.SCANConfig`, :class:`itm_models.SGRAFConfig`,
:class:`itm_models.GSMNConfig`): reading a config out of an official ``opt`` (argparse.Namespace or dict), and the
one set of field validators the three ``__post_init__`` use (their error messages name ``<Config>.<field>``).
"""
from __future__ import annotations

import dataclasses
import math

import numpy as np

__all__ = ["opt_fields", "positive_int", "finite_number", "plain_bool", "check_fields"]


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


def positive_int(value, owner: str, name: str) -> int:
    """``value`` as an int >= 1 (bools refused); ValueError naming ``owner.name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{owner}.{name} must be a positive int, got {value!r}")
    return int(value)


def finite_number(value, owner: str, name: str, low: float | None) -> float:
    """``value`` as a finite float (>= ``low`` unless None; bools refused); ValueError naming ``owner.name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not math.isfinite(value) or (low is not None and value < low):
        need = "a finite number" if low is None else f"a finite number >= {low}"
        raise ValueError(f"{owner}.{name} must be {need}, got {value!r}")
    return float(value)


def plain_bool(value, owner: str, name: str) -> bool:
    """``value`` (a bool or NumPy bool) as a bool; ValueError naming ``owner.name`` otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{owner}.{name} must be a bool, got {value!r}")
    return bool(value)


def check_fields(config, *, ints=(), bools=(), numbers=()) -> None:
    """Validate and normalise fields of the dataclass instance ``config`` in place, in this order: the positive
    ints ``ints``, the bools ``bools``, then the finite numbers ``numbers`` (``(name, low)`` pairs, ``low`` None
    for no bound). Errors name ``type(config).__name__``."""
    owner = type(config).__name__
    for name in ints:
        setattr(config, name, positive_int(getattr(config, name), owner, name))
    for name in bools:
        setattr(config, name, plain_bool(getattr(config, name), owner, name))
    for name, low in numbers:
        setattr(config, name, finite_number(getattr(config, name), owner, name, low))


def ensemble_members(models, member_cls, owner: str):
    """The members of an ensemble as a ``torch.nn.ModuleList``, each checked to be a ``member_cls``.

    Raises:
        TypeError: ``models`` is a single module, or a member is not a ``member_cls``.
        ValueError: ``models`` is empty.
    """
    from torch import nn

    name = member_cls.__name__
    if isinstance(models, nn.Module):
        raise TypeError(f"models must be a sequence of {name} models, got a single {type(models).__name__}; "
                        "wrap it in a list")
    models = list(models)
    if not models:
        raise ValueError(f"{owner} needs at least one model (models is empty)")
    for i, m in enumerate(models):
        if not isinstance(m, member_cls):
            raise TypeError(f"models[{i}] is a {type(m).__name__}, expected {name}")
    return nn.ModuleList(models)
