"""Scaffolding shared by the model tests (SGRAF and GSMN training, GSMN evaluation): tiny synthetic data folders,
GSMN's extra files, seeded tiny models, the training CLI's resolved options, and the resume check.

Imported as ``from model_helpers import ...`` (``tests/`` is on ``sys.path`` through ``conftest.py``).
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from itm_models.cli.train import _parser, _resolve_model_options
from itm_models.checkpoints import load_checkpoint
from itm_models.data import load_vocab
from itm_models.data.synthetic import make_synthetic_dataset
from itm_models.train import train
from conftest import assert_close_report


def synthetic_data_dir(tmp_path_factory, name: str, **kwargs):
    """A fresh folder ``name`` holding :func:`make_synthetic_dataset`'s splits (``kwargs`` passed on)."""
    out = tmp_path_factory.mktemp(name)
    make_synthetic_dataset(out, **kwargs)
    return out


def vocab_size_of(data_dir) -> int:
    """The size of ``data_dir``'s vocabulary (``vocab.json``)."""
    return len(load_vocab(None, data_dir))


def seeded(seed: int, build):
    """``build()`` right after ``torch.manual_seed(seed)``: the same seed gives the same initial weights."""
    torch.manual_seed(seed)
    return build()


def resolved_cli_args(*argv):
    """The ``itm-train`` options after :func:`_resolve_model_options` (``--data d --out o`` added)."""
    parser = _parser()
    a = parser.parse_args(["--data", "d", "--out", "o", *argv])
    _resolve_model_options(parser, a)
    return a


def write_gsmn_files(root, split: str, ids, parses, boxes, sizes) -> None:
    """GSMN's files of a split: caption ids (``_precaps_stan.txt``), parses (``_caps.json``), pixel boxes
    (``_ims_bbx.npy``) and image sizes as a structured array (``_ims_size.npy``, the released files' fields)."""
    (root / f"{split}_precaps_stan.txt").write_text("\n".join(",".join(map(str, c)) for c in ids) + "\n")
    (root / f"{split}_caps.json").write_text(json.dumps(parses))
    np.save(root / f"{split}_ims_bbx.npy", boxes)
    structured = np.zeros(len(sizes), dtype=[("image_w", np.int64), ("image_h", np.int64)])
    structured["image_w"], structured["image_h"] = sizes[:, 0], sizes[:, 1]
    np.save(root / f"{split}_ims_size.npy", structured)


def check_resume_continues_the_same_run(config_of, data_dir, tmp_path, sims_of) -> dict:
    """Train 2 epochs in one go (``tmp_path / "full"``) and 1 + 1 epochs with a resume (``tmp_path / "cut"``),
    from ``config_of(num_epochs)`` (learning rate decayed after each epoch: ``lr_update=1``, lr 2e-3); assert the
    resumed epoch takes the same steps with the same losses, records the same dev rsums, and ends with the same
    weights (``sims_of(model)`` within 1e-6). Returns the keyword arguments of the runs (for further resumes)."""
    run = dict(seed=5, device="cpu", progress=False, log=None)
    steps_full: list = []
    full = train(config_of(2), data_dir, tmp_path / "full", **run,
                 on_step=lambda e, s, l: steps_full.append((e, s, l)))
    assert [h["lr"] for h in full["history"]] == pytest.approx([2e-3, 2e-4])
    train(config_of(1), data_dir, tmp_path / "cut", **run)
    steps_resumed: list = []
    resumed = train(config_of(2), data_dir, tmp_path / "cut", **run, resume=True,
                    on_step=lambda e, s, l: steps_resumed.append((e, s, l)))
    tail = [x for x in steps_full if x[0] == 1]
    assert [x[:2] for x in steps_resumed] == [x[:2] for x in tail] and tail
    for (e, s, a), (_, _, b) in zip(tail, steps_resumed):                     # same batches, same dropout masks
        assert abs(a - b) <= 1e-6, (e, s, a, b)
    assert [h["rsum"] for h in resumed["history"]] == [h["rsum"] for h in full["history"]]
    assert_close_report(sims_of(load_checkpoint(tmp_path / "cut" / "checkpoint_last.pt").model),
                        sims_of(load_checkpoint(tmp_path / "full" / "checkpoint_last.pt").model),
                        atol=1e-6, rtol=0, what="resumed vs uninterrupted weights")
    return run
