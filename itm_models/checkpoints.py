"""Checkpoints: the official SCAN layout (read), and our own safe format (write and read).

Official layout (``model_best.pth.tar`` of kuanghuei/SCAN, also SGRAF and GSMN): a ``torch.save`` dict with
``model`` (a LIST of state_dicts: SCAN ``[img_enc, txt_enc]``, SGRAF ``[img_enc, txt_enc, sim_enc]``, GSMN
``[img_enc, txt_enc, visual graph, textual graph]``), ``opt`` (a pickled ``argparse.Namespace`` with every
hyper-parameter), ``epoch``, ``best_rsum`` (often a NumPy scalar) and ``Eiters``. The model type is read from
``opt``; :func:`register_official_loader` adds a builder for another type (SGRAF, GSMN) without touching the rest.

Our format (:func:`save_checkpoint`): a dict of tensors and plain data only (the config as
``dataclasses.asdict``, the optimizer state, epoch, best_rsum, extras), which ``torch.load(weights_only=True)``
reads: loading it never runs pickled code.

Integrity: ``torch.load`` checks no checksum, so a file with flipped bytes would load with corrupted weights.
Every zip-format file (ours, and official files written by PyTorch >= 1.6) has its members' CRC-32s verified
before it is unpickled, and our files also store the SHA-256 of their payload (``payload_sha256``), checked after
loading and before any model is built. Files of ours written before the hash was stored still load, with a
:class:`CheckpointWarning`. Saves are atomic (temporary file, ``fsync``, rename, ``fsync`` of the folder) and leave
no temporary file behind when they fail.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import math
import os
import pickle
import uuid
import warnings
import zipfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

__all__ = [
    "CheckpointError", "CheckpointWarning", "load_official_checkpoint", "read_official_checkpoint",
    "detect_official_model_type", "load_state_dict_checked", "check_state_dict_fits",
    "register_official_loader", "save_checkpoint", "load_checkpoint", "read_checkpoint", "LoadedCheckpoint",
    "register_model_type", "restore_optimizer", "payload_sha256", "new_run_id",
    "FORMAT_NAME", "FORMAT_VERSION",
]

FORMAT_NAME = "itm_models.checkpoint"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt, of another layout or model type, or does not fit the model
    that its options describe; the message names the file and what is wrong."""


class CheckpointWarning(UserWarning):
    """A checkpoint loaded without its payload hash being checked (written before hashes were stored)."""


# --------------------------------------------------------------------------------------------------------------
# Integrity
# --------------------------------------------------------------------------------------------------------------
_HASH_KEY = "payload_sha256"
_READ_CHUNK = 1 << 20


def _verify_zip_crcs(path: str) -> None:
    """Read every member of a zip-format torch file and compare its CRC-32 with the stored one (torch.load does
    not). Legacy (non-zip) files have no checksums and pass unchecked; members whose stored CRC is 0 were written
    with ``torch.serialization.set_crc32_options(False)`` and are not checked either."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.CRC == 0 and info.file_size:
                    info = copy.copy(info)
                    del info.CRC                       # no checksum recorded: read without comparing
                with archive.open(info) as member:
                    while member.read(_READ_CHUNK):
                        pass
    except zipfile.BadZipFile as exc:
        raise CheckpointError(f"{path} is corrupt: {exc} (the file was damaged after it was written)") from None
    except (OSError, EOFError, ValueError, NotImplementedError) as exc:
        raise CheckpointError(f"{path} is corrupt or truncated: {type(exc).__name__}: {exc}") from None


def _digest_into(h, value) -> None:
    """Feed a canonical encoding of ``value`` (tensors, plain data, containers) into the hash ``h``."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().data if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{len(value)};".encode())
        for k, v in value.items():
            _digest_into(h, k)
            _digest_into(h, v)
    elif isinstance(value, (list, tuple)):
        h.update(f"L{len(value)};".encode())
        for v in value:
            _digest_into(h, v)
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)};".encode())
        h.update(data)
    elif isinstance(value, float):
        h.update(f"F{value.hex()};".encode())
    elif value is None or isinstance(value, (bool, int, torch.dtype, torch.device)):
        h.update(f"{type(value).__name__}:{value!r};".encode())
    else:
        raise TypeError(f"cannot hash a {type(value).__name__}")


def payload_sha256(ckpt: dict) -> str:
    """SHA-256 (hex) of a checkpoint dict's content, every key but ``payload_sha256`` itself: tensors by dtype,
    shape and bytes, plain data by type and value, containers in order."""
    h = hashlib.sha256()
    _digest_into(h, {k: v for k, v in ckpt.items() if k != _HASH_KEY})
    return h.hexdigest()


def new_run_id() -> str:
    """A fresh training-run id (stored in a run's checkpoints so that one run never replaces another's)."""
    return uuid.uuid4().hex


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:                                   # platforms that cannot open a folder (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to ``path.tmpPID``, fsync it, rename it over ``path``, fsync the folder; on any failure the
    temporary file is removed and ``path`` is left as it was."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


# --------------------------------------------------------------------------------------------------------------
# Loading helpers
# --------------------------------------------------------------------------------------------------------------
def _numpy_scalar_globals() -> list:
    """NumPy objects that official checkpoints pickle (``best_rsum`` is a NumPy float64), for weights_only."""
    try:
        from numpy._core.multiarray import scalar
    except ImportError:  # NumPy 1.x
        from numpy.core.multiarray import scalar
    out: list = [scalar, (scalar, "numpy.core.multiarray.scalar"), (scalar, "numpy._core.multiarray.scalar"),
                 np.dtype]
    for t in (np.float64, np.float32, np.float16, np.int64, np.int32, np.bool_):
        out.append(type(np.dtype(t)))
    return out


def _official_safe_globals() -> list:
    return [argparse.Namespace, *_numpy_scalar_globals()]


def _torch_load(path: str, *, safe_globals: list, trusted: bool, map_location, what: str):
    """torch.load with weights_only=True (plus ``safe_globals``), or weights_only=False when ``trusted``; the zip
    CRCs are verified first."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} not found: {path}")
    _verify_zip_crcs(path)
    try:
        if trusted:
            # Deliberate: the caller vouched for the file; unpickling it may run arbitrary code.
            return torch.load(path, map_location=map_location, weights_only=False)
        with torch.serialization.safe_globals(safe_globals):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        try:
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except Exception:  # not a zip checkpoint: the list is unknown
            unsafe = None
        if unsafe is None:
            raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: "
                                  f"{str(exc).splitlines()[0][:200]})") from None
        allowed = {f"{g.__module__}.{g.__qualname__}" for g in safe_globals if not isinstance(g, tuple)}
        allowed |= {g[1] for g in safe_globals if isinstance(g, tuple)}
        extra = [g for g in unsafe if g not in allowed]
        raise CheckpointError(
            f"{path} holds pickled objects that a safe load refuses: {extra or unsafe}. If you trust the file's "
            "source, pass trusted=True (torch.load(weights_only=False): unpickling can run arbitrary code)"
        ) from None
    except CheckpointError:
        raise
    except Exception as exc:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None


def _shape(x) -> tuple:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else ()


def check_state_dict_fits(expected: dict, state_dict: dict, *, where: str, path: str, hint: str = "") -> None:
    """Check that ``state_dict`` has exactly the keys of ``expected`` (a module's ``state_dict()``, possibly on the
    meta device) with the same shapes, and only tensors.

    Raises:
        CheckpointError: a non-tensor value, a missing or unexpected key, or a shape mismatch.
    """
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path}: {where} is a {type(state_dict).__name__}, expected a state_dict (dict)")
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"{path}: {where}[{k!r}] is a {type(v).__name__}, expected a tensor")
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: {where} does not match the model built from its options: missing keys "
                              f"{missing}, unexpected keys {unexpected}")
    for k, v in expected.items():
        got = state_dict[k]
        if got.shape != v.shape and not (k.endswith("weight_g") and got.numel() == v.numel() == 1):
            raise CheckpointError(f"{path}: {where}[{k!r}] has shape {_shape(got)} in the checkpoint but the model "
                                  f"expects {_shape(v)}{hint}")


def load_state_dict_checked(module: nn.Module, state_dict: dict, *, where: str, path: str, hint: str = "") -> None:
    """Strict ``load_state_dict`` that reports missing / unexpected keys and shape mismatches by name.

    Args:
        module: the module to fill.
        state_dict: name -> tensor.
        where: what ``state_dict`` is, for messages (e.g. ``"model[1] (txt_enc)"``).
        path: the file, for messages.
        hint: appended to shape-mismatch messages (e.g. which options built the module).

    Raises:
        CheckpointError: a non-tensor value, a missing or unexpected key, or a shape mismatch.
    """
    check_state_dict_fits(module.state_dict(), state_dict, where=where, path=path, hint=hint)
    module.load_state_dict(state_dict, strict=True)


# --------------------------------------------------------------------------------------------------------------
# Official checkpoints
# --------------------------------------------------------------------------------------------------------------
# Fields that identify each official model type's ``opt`` (checked in this order: SGRAF and GSMN options may also
# carry SCAN's names).
_OFFICIAL_TYPE_MARKERS = (
    ("sgraf", ("module_name", "sim_dim", "sgr_step")),
    ("gsmn", ("num_block", "hid_dim", "feat_dim", "is_sparse")),
    ("scan", ("cross_attn",)),
)
_OFFICIAL_LIST_LENGTHS = {"scan": 2, "sgraf": 3, "gsmn": 4}
_OFFICIAL_LIST_NAMES = {
    "scan": "[img_enc, txt_enc]",
    "sgraf": "[img_enc, txt_enc, sim_enc]",
    "gsmn": "[img_enc, txt_enc, visual graph head, textual graph head]",
}

OfficialBuilder = Callable[[dict, list, str], nn.Module]
# Filled by the model packages on import (itm_models.scan.official, .sgraf.official, .gsmn.official).
_OFFICIAL_LOADERS: dict[str, OfficialBuilder] = {}


def register_official_loader(model_type: str, builder: OfficialBuilder) -> None:
    """Add (or replace) the builder of an official model type.

    ``builder(opt: dict, state_dicts: list[dict], path: str) -> nn.Module`` rebuilds the model from the options
    and loads the weights (use :func:`load_state_dict_checked` for clear errors); :func:`load_official_checkpoint`
    has already checked the layout and the list length, and puts the result in eval mode.
    """
    if model_type not in _OFFICIAL_LIST_LENGTHS:
        raise ValueError(f"unknown official model type {model_type!r}; known: {tuple(_OFFICIAL_LIST_LENGTHS)}")
    _OFFICIAL_LOADERS[model_type] = builder


def detect_official_model_type(opt) -> str:
    """The model type ("scan", "sgraf" or "gsmn") of an official ``opt`` (Namespace or dict).

    SGRAF options have ``module_name`` / ``sim_dim`` / ``sgr_step``; GSMN ``num_block`` / ``hid_dim`` /
    ``feat_dim`` / ``is_sparse``; SCAN ``cross_attn``.

    Raises:
        CheckpointError: ``opt`` has none of these fields.
    """
    d = dict(opt) if isinstance(opt, dict) else dict(vars(opt))
    for kind, markers in _OFFICIAL_TYPE_MARKERS:
        if any(m in d for m in markers):
            return kind
    raise CheckpointError(f"cannot tell the model type from opt: it has none of the fields "
                          f"{[m for _, ms in _OFFICIAL_TYPE_MARKERS for m in ms]}; its fields are {sorted(d)}")


def read_official_checkpoint(path: str | os.PathLike, *, trusted: bool = False, map_location="cpu") -> dict:
    """Read and check an official-layout checkpoint; returns its dict with ``opt`` as a plain dict and
    ``model_type`` added.

    Loading: ``torch.load(weights_only=True)`` with exactly the pickled types official files contain allowed
    (``argparse.Namespace``, NumPy scalars for ``best_rsum``), so no pickled code runs. With ``trusted=True`` the
    file is loaded with ``weights_only=False`` instead, as PyTorch < 2.6 did: only for files from a trusted source,
    since unpickling can execute arbitrary code.

    Raises:
        CheckpointError: missing / unreadable file, not a dict, no ``model`` / ``opt``, a ``model`` that is not a
            list of state_dicts or has the wrong length for the model type, an ``opt`` that is neither a Namespace
            nor a dict, or an unknown model type.
    """
    path = os.fspath(path)
    ckpt = _torch_load(path, safe_globals=_official_safe_globals(), trusted=trusted, map_location=map_location,
                       what="official checkpoint")
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{path} holds a {type(ckpt).__name__}, expected the official checkpoint dict with "
                              "'model' (list of state_dicts) and 'opt' (argparse.Namespace)")
    if ckpt.get("format") == FORMAT_NAME:
        raise CheckpointError(f"{path} is an itm_models checkpoint, not the official layout: use "
                              "itm_models.checkpoints.load_checkpoint")
    missing = [k for k in ("model", "opt") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not an official checkpoint: the dict lacks {missing} (it has keys "
                              f"{sorted(map(str, ckpt))}); expected 'model' (list of state_dicts) and 'opt'")
    opt = ckpt["opt"]
    if isinstance(opt, argparse.Namespace):
        opt = dict(vars(opt))
    elif not isinstance(opt, dict):
        raise CheckpointError(f"{path}: 'opt' is a {type(opt).__name__}, expected an argparse.Namespace")
    model = ckpt["model"]
    if not isinstance(model, (list, tuple)) or not all(isinstance(sd, dict) for sd in model):
        raise CheckpointError(f"{path}: 'model' must be a list of state_dicts, got "
                              f"{type(model).__name__}" + (f" of {[type(x).__name__ for x in model]}"
                                                           if isinstance(model, (list, tuple)) else ""))
    try:
        kind = detect_official_model_type(opt)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    want = _OFFICIAL_LIST_LENGTHS[kind]
    if len(model) != want:
        raise CheckpointError(f"{path}: 'model' holds {len(model)} state_dicts, but a {kind.upper()} checkpoint "
                              f"has {want}: {_OFFICIAL_LIST_NAMES[kind]}")
    out = dict(ckpt)
    out["opt"] = opt
    out["model"] = list(model)
    out["model_type"] = kind
    return out


def _dry_run_on_meta(builder: OfficialBuilder, opt: dict, state_dicts: list, path: str) -> None:
    """Run an official builder on the meta device first: the options are checked against the weights' shapes
    without allocating anything, so an ``opt`` that describes a huge model (``vocab_size=1e9``) is refused by its
    shapes before the real build. Builders that cannot run on the meta device skip the dry run."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*copying from a non-meta parameter.*")
        try:
            with torch.device("meta"):
                builder(opt, state_dicts, path)
        except NotImplementedError:
            pass


def load_official_checkpoint(path: str | os.PathLike, *, trusted: bool = False, map_location="cpu",
                             backend: str = "auto") -> nn.Module:
    """Rebuild a model from an official checkpoint (``model_best.pth.tar``) and load its weights.

    Args:
        path: the file.
        trusted: load with ``torch.load(weights_only=False)``. Off by default: official files load with
            ``weights_only=True`` and an allow-list of exactly what they pickle (``argparse.Namespace`` for
            ``opt``, NumPy scalars for ``best_rsum``), which PyTorch >= 2.6 otherwise refuses. Turn it on only for
            files from a trusted source that pickle something else: unpickling can execute arbitrary code.
        map_location: ``torch.load`` map_location (the model is built on the CPU and loaded from these tensors).
        backend: default ``xattn_sim`` backend of the returned model.

    Returns:
        The model in eval mode (a :class:`itm_models.scan.SCAN` for SCAN files; other types once a builder is
        registered), with the checkpoint's ``epoch``, ``best_rsum`` and ``Eiters`` on ``model.checkpoint_info``.

    The builder runs on the meta device first, so options that do not fit the weights are refused before any
    memory is allocated for the model they describe.

    Raises:
        CheckpointError: see :func:`read_official_checkpoint`; also a model type without a builder, options that do
            not describe a valid model, or weights that do not fit it (the message names the key and both shapes).
    """
    path = os.fspath(path)
    ckpt = read_official_checkpoint(path, trusted=trusted, map_location=map_location)
    kind = ckpt["model_type"]
    builder = _OFFICIAL_LOADERS.get(kind)
    if builder is None:
        opt = ckpt["opt"]
        detail = ", ".join(f"opt.{m}={opt[m]!r}" for _, ms in _OFFICIAL_TYPE_MARKERS for m in ms if m in opt)
        raise CheckpointError(f"{path} is a {kind.upper()} checkpoint ({detail}); load_official_checkpoint can "
                              f"rebuild {sorted(_OFFICIAL_LOADERS)} models only")
    _dry_run_on_meta(builder, ckpt["opt"], ckpt["model"], path)
    model = builder(ckpt["opt"], ckpt["model"], path)
    if hasattr(model, "backend"):
        model.backend = backend
    model.checkpoint_info = {k: ckpt.get(k) for k in ("epoch", "best_rsum", "Eiters")}
    return model.eval()


# --------------------------------------------------------------------------------------------------------------
# Our format
# --------------------------------------------------------------------------------------------------------------
# Filled by the model packages on import (itm_models.scan.model, .sgraf.model, .gsmn.model).
_MODEL_TYPES: dict[str, tuple[type, type]] = {}


def register_model_type(model_type: str, config_cls: type, model_cls: type) -> None:
    """Let :func:`load_checkpoint` rebuild ``model_cls(config_cls(**config))`` for ``model_type``."""
    _MODEL_TYPES[model_type] = (config_cls, model_cls)


_PLAIN = (type(None), bool, int, float, str)


def _check_plain(value, where: str) -> None:
    """Refuse anything ``torch.load(weights_only=True)`` would not read back (custom classes, NumPy objects)."""
    if type(value) in _PLAIN or isinstance(value, (torch.Tensor, torch.dtype, torch.device)):
        return
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; use str or int keys")
            _check_plain(v, f"{where}[{k!r}]")
        return
    if isinstance(value, np.generic):
        raise TypeError(f"{where} is a NumPy {type(value).__name__}; convert it with float() / int()")
    raise TypeError(f"{where} is a {type(value).__name__}; a safe checkpoint holds only tensors and plain data "
                    "(None, bool, int, float, str, lists, tuples, dicts)")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None,
                    epoch: int | None = None, best_rsum: float | None = None, **extra) -> None:
    """Save ``model`` (and training state) in our safe format, atomically and durably.

    Args:
        model: a model with a dataclass ``config`` and a ``model_type`` registered with
            :func:`register_model_type` (:class:`itm_models.scan.SCAN`).
        path: output file (``.pt``).
        optimizer: its ``state_dict()`` is stored for resuming.
        epoch: number of completed epochs.
        best_rsum: best validation rsum so far.
        **extra: more plain data or tensors (RNG states, history, run id, ...), stored under ``"extra"``.

    Layout: ``{"format", "format_version", "model_type", "config" (dataclasses.asdict), "state_dict",
    "optimizer", "epoch", "best_rsum", "extra", "torch_version", "payload_sha256"}`` (the last: SHA-256 of the
    rest, :func:`payload_sha256`); readable with ``torch.load(path, weights_only=True)``.

    Writing: ``path.tmpPID``, ``fsync``, rename over ``path``, ``fsync`` of the folder; if anything fails the
    temporary file is removed and an existing ``path`` is untouched.

    Raises:
        TypeError: a model without a dataclass config / registered type, or a non-plain ``extra`` value.
    """
    kind = getattr(model, "model_type", None)
    config = getattr(model, "config", None)
    if kind not in _MODEL_TYPES or not dataclasses.is_dataclass(config):
        raise TypeError(f"cannot save a {type(model).__name__}: it needs a dataclass .config and a registered "
                        f".model_type (known: {sorted(_MODEL_TYPES)})")
    ckpt = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "model_type": kind,
        "config": dataclasses.asdict(config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": None if optimizer is None else optimizer.state_dict(),
        "epoch": None if epoch is None else int(epoch),
        "best_rsum": None if best_rsum is None else float(best_rsum),
        "extra": extra,
        "torch_version": str(torch.__version__),
    }
    _check_plain(ckpt, "checkpoint")
    ckpt[_HASH_KEY] = payload_sha256(ckpt)
    _atomic_torch_save(ckpt, os.fspath(path))


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns.

    Attributes:
        model: the rebuilt model in eval mode, on the CPU (move it with ``.to(device)``).
        optimizer_state: the optimizer's ``state_dict`` (restore it with :func:`restore_optimizer`), or None.
        epoch: completed epochs, or None. best_rsum: best validation rsum, or None.
        extra: the ``**extra`` given to :func:`save_checkpoint`. path: the file.
    """

    model: nn.Module
    optimizer_state: dict | None = None
    epoch: int | None = None
    best_rsum: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    path: str = ""


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_hyper_value(value, where: str, path: str) -> None:
    """An optimizer hyper-parameter: None, bool, str, a finite number or tensor, or a tuple / list of those."""
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_hyper_value(v, f"{where}[{i}]", path)
        return
    if isinstance(value, torch.Tensor):
        finite = value.numel() <= 1 and bool(torch.isfinite(value.detach().double().cpu()).all())
    elif isinstance(value, float):
        finite = math.isfinite(value)
    else:
        finite = value is None or isinstance(value, (bool, int, str))
    if not finite:
        raise CheckpointError(f"{path}: {where} is {value!r}; an optimizer setting must be a finite number, a bool, "
                              "None or a string")


def _check_optimizer_layout(state, path: str) -> None:
    """The layout of an optimizer ``state_dict``: ``state`` {param id: {name: tensor or number}} and
    ``param_groups`` [{"params": [distinct int ids], settings}], every state id in a group."""
    if not isinstance(state, dict) or not isinstance(state.get("state"), dict) \
            or not isinstance(state.get("param_groups"), list):
        got = f"a dict with keys {sorted(map(str, state))}" if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"{path}: 'optimizer' must be None or an optimizer state_dict ({{'state': dict, "
                              f"'param_groups': list}}), got {got}")
    seen: set = set()
    for g, group in enumerate(state["param_groups"]):
        params = group.get("params") if isinstance(group, dict) else None
        if not isinstance(params, list) or not all(_is_int(i) and i >= 0 for i in params):
            raise CheckpointError(f"{path}: optimizer param_groups[{g}] must be a dict whose 'params' is a list of "
                                  "parameter ids (ints >= 0)")
        if seen.intersection(params) or len(set(params)) != len(params):
            raise CheckpointError(f"{path}: optimizer param_groups[{g}] repeats a parameter id")
        seen.update(params)
        for key, value in group.items():
            if key != "params":
                _check_hyper_value(value, f"optimizer param_groups[{g}][{key!r}]", path)
    for pid, entry in state["state"].items():
        if pid not in seen:
            raise CheckpointError(f"{path}: optimizer state has an entry for parameter id {pid!r}, which no "
                                  "param_group lists")
        if not isinstance(entry, dict) or not all(
                isinstance(v, torch.Tensor) or _is_real(v) or v is None for v in entry.values()):
            raise CheckpointError(f"{path}: optimizer state[{pid}] must map names to tensors or numbers")
        step = entry.get("step")
        if step is not None:
            value = float(step) if _is_real(step) else (float(step) if step.numel() == 1 else math.nan)
            if not math.isfinite(value) or value < 0:
                raise CheckpointError(f"{path}: optimizer state[{pid}]['step'] is {step!r}; expected a finite "
                                      "count >= 0")


def _check_entries(ckpt: dict, path: str) -> None:
    """Every entry :func:`load_checkpoint` and a resumed run use, checked at load (so a resume cannot fail later)."""
    missing = [k for k in ("config", "state_dict") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is an incomplete itm_models checkpoint: it lacks {missing} (it has keys "
                              f"{sorted(map(str, ckpt))})")
    if not isinstance(ckpt["config"], dict) or not all(isinstance(k, str) for k in ckpt["config"]):
        raise CheckpointError(f"{path}: 'config' is a {type(ckpt['config']).__name__}, expected a dict of options")
    if not isinstance(ckpt["state_dict"], dict):
        raise CheckpointError(f"{path}: 'state_dict' is a {type(ckpt['state_dict']).__name__}, expected a dict of "
                              "tensors")
    epoch = ckpt.get("epoch")
    if epoch is not None and not (_is_int(epoch) and epoch >= 0):
        raise CheckpointError(f"{path}: 'epoch' is {epoch!r}; expected None or a number of epochs (int >= 0)")
    best = ckpt.get("best_rsum")
    if best is not None and not (_is_real(best) and math.isfinite(best)):
        raise CheckpointError(f"{path}: 'best_rsum' is {best!r}; expected None or a finite number")
    extra = ckpt.get("extra")
    if extra is not None and not isinstance(extra, dict):
        raise CheckpointError(f"{path}: 'extra' is a {type(extra).__name__}, expected a dict")
    if ckpt.get("optimizer") is not None:
        _check_optimizer_layout(ckpt["optimizer"], path)


def read_checkpoint(path: str | os.PathLike, *, map_location="cpu") -> dict:
    """Read and verify a checkpoint written by :func:`save_checkpoint`, without building its model.

    Checks, in order: the zip CRCs, the format, the stored payload SHA-256 (files without one, written before it was
    stored, load with a :class:`CheckpointWarning`), the model type, and the layout of every entry (``config``,
    ``state_dict``, ``epoch``, ``best_rsum``, ``optimizer``, ``extra``).

    Returns:
        The checkpoint dict (see :func:`save_checkpoint` for its keys).

    Raises:
        CheckpointError: missing, unreadable or corrupt file, an official-layout file, another format or version, an
            unknown model type, or a malformed entry.
    """
    path = os.fspath(path)
    try:
        ckpt = _torch_load(path, safe_globals=[], trusted=False, map_location=map_location, what="checkpoint")
    except CheckpointError as exc:
        if "argparse.Namespace" in str(exc):
            raise CheckpointError(f"{path} is an official-layout checkpoint (pickled argparse.Namespace opt): use "
                                  "itm_models.checkpoints.load_official_checkpoint") from None
        raise
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT_NAME:
        if isinstance(ckpt, dict) and "model" in ckpt and "opt" in ckpt:
            raise CheckpointError(f"{path} is an official-layout checkpoint: use load_official_checkpoint")
        got = f"a dict with keys {sorted(map(str, ckpt))}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(f"{path} is not an itm_models checkpoint (format {FORMAT_NAME!r}): it holds {got}")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {version!r}; this code reads version {FORMAT_VERSION}")
    stored = ckpt.get(_HASH_KEY)
    if stored is None:
        warnings.warn(f"{path} stores no payload hash (written by an older itm_models): its content cannot be "
                      "verified; save it again to add one", CheckpointWarning, stacklevel=3)
    else:
        try:
            actual = payload_sha256(ckpt)
        except TypeError as exc:
            raise CheckpointError(f"{path} holds something a checkpoint never stores: {exc}") from None
        if stored != actual:
            raise CheckpointError(f"{path} is corrupt: its content does not match its stored SHA-256 (stored "
                                  f"{str(stored)[:16]}..., actual {actual[:16]}...)")
    kind = ckpt.get("model_type")
    if kind not in _MODEL_TYPES:
        raise CheckpointError(f"{path} holds a model of type {kind!r}; known types: {sorted(_MODEL_TYPES)}")
    _check_entries(ckpt, path)
    return ckpt


def _expected_state(model_cls, config, backend: str) -> dict | None:
    """The state_dict (names and shapes) of ``model_cls(config)`` built on the meta device: no memory is allocated,
    so a config that asks for a huge model is refused by its shapes before anything is built. None when the model
    cannot be built on the meta device (then the real build checks the shapes)."""
    try:
        with torch.device("meta"):
            return model_cls(config, backend=backend).state_dict()
    except (NotImplementedError, RuntimeError):
        return None


def load_checkpoint(path: str | os.PathLike, *, map_location="cpu", backend: str = "auto") -> LoadedCheckpoint:
    """Load a checkpoint written by :func:`save_checkpoint` (``torch.load(weights_only=True)``: no pickled code).

    The file is verified first (:func:`read_checkpoint`: zip CRCs, payload SHA-256, every entry's layout), and its
    config is checked against the stored tensors' shapes on the meta device before the model is built, so a
    corrupt or hostile file never allocates the model its config describes.

    Args:
        path: the file.
        map_location: ``torch.load`` map_location for the stored tensors (the optimizer state and extras keep it;
            the model itself is built on the CPU).
        backend: default ``xattn_sim`` backend of the rebuilt model.

    Returns:
        :class:`LoadedCheckpoint` with the model in eval mode.

    Raises:
        CheckpointError: missing / unreadable / corrupt file, an official-layout file (use
            :func:`load_official_checkpoint`), another format, an unknown model type, an invalid config, malformed
            entries, or weights that do not fit the config.
    """
    path = os.fspath(path)
    ckpt = read_checkpoint(path, map_location=map_location)
    kind = ckpt["model_type"]
    config_cls, model_cls = _MODEL_TYPES[kind]
    try:
        config = config_cls(**ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: its config does not describe a valid {kind} model: {exc}") from None
    expected = _expected_state(model_cls, config, backend)
    if expected is not None:
        check_state_dict_fits(expected, ckpt["state_dict"], where="state_dict", path=path,
                              hint=" (its config does not describe the stored weights)")
    model = model_cls(config, backend=backend)
    load_state_dict_checked(model, ckpt["state_dict"], where="state_dict", path=path)
    return LoadedCheckpoint(model=model.eval(), optimizer_state=ckpt.get("optimizer"), epoch=ckpt.get("epoch"),
                            best_rsum=None if ckpt.get("best_rsum") is None else float(ckpt["best_rsum"]),
                            extra=ckpt.get("extra") or {}, path=path)


def restore_optimizer(optimizer: torch.optim.Optimizer, state: dict, *, path: str = "checkpoint") -> None:
    """``optimizer.load_state_dict(state)`` after checking that ``state`` fits ``optimizer``: the same number of
    parameter groups and parameters per group, every per-parameter tensor either a scalar or of its parameter's
    shape, and settings the optimizer's own constructor accepts (a NaN learning rate or betas >= 1 are refused).

    Raises:
        CheckpointError: naming ``path`` and the mismatch.
    """
    _check_optimizer_layout(state, path)
    groups = optimizer.param_groups
    saved = state["param_groups"]
    if len(saved) != len(groups) or any(len(a["params"]) != len(b["params"]) for a, b in zip(saved, groups)):
        raise CheckpointError(f"{path}: the optimizer state has parameter groups of sizes "
                              f"{[len(g['params']) for g in saved]}, the model's optimizer "
                              f"{[len(g['params']) for g in groups]}")
    for a, b in zip(saved, groups):
        for pid, param in zip(a["params"], b["params"]):
            for name, value in state["state"].get(pid, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != param.shape:
                    raise CheckpointError(f"{path}: optimizer state[{pid}][{name!r}] has shape {tuple(value.shape)}, "
                                          f"its parameter {tuple(param.shape)}")
        settings = {k: v for k, v in a.items() if k in optimizer.defaults}
        try:
            type(optimizer)([torch.zeros(1, requires_grad=True)], **settings)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise CheckpointError(f"{path}: the optimizer settings {settings} are not valid for "
                                  f"{type(optimizer).__name__}: {exc}") from None
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: the optimizer state does not fit {type(optimizer).__name__}: "
                              f"{exc}") from None
