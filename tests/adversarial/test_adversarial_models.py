"""Issue 14, items 6-9: the reproducers of lost or corrupted work, of CLI tracebacks and of unnamed reader errors,
each as a test of the behaviour that replaced it.

- 6: a run folder is never reused by accident, and ``checkpoint_best.pt`` is only replaced by a better checkpoint of
  the same run (run ids; a resumed run keeps the folder's best score).
- 7: checkpoints are verified before loading (zip CRCs, payload SHA-256, every entry), the config is checked
  against the stored shapes before the model is built, saves are durable and leave nothing behind on failure.
- 8: the CLIs end with one line on stderr and a non-zero exit code, never a traceback (in-process through their
  entry points; one subprocess run of `python -m itm_models.cli.train`).
- 9: the readers and ``similarity_matrix`` raise named ``DataFormatError`` / ``ValueError``.

The raw C++ reproducers of item 9 (``sgr_step_`` with zero pairs, ``node_match_fused_`` with a repeated
``cap_index``) live beside their ops: ``tests/sgraf/test_sgr_step_boundary.py`` and
``tests/node_match/test_node_match_boundary.py``.
"""
from __future__ import annotations

import os
import stat
import struct
import subprocess
import sys
import warnings
import zipfile

import numpy as np
import pytest
import torch

import itm_models.checkpoints as checkpoints
from itm_models.checkpoints import (CheckpointError, CheckpointWarning, load_checkpoint, load_official_checkpoint,
                                    payload_sha256, restore_optimizer, save_checkpoint)
from itm_models.cli.demo import main as demo_main
from itm_models.cli.eval import main as eval_main
from itm_models.cli.train import cli as train_cli
from itm_models.data import DataFormatError, PrecompDataset, load_split_images
from itm_models.data.gsmn import load_split_parses
from itm_models.data.synthetic import make_synthetic_dataset
from itm_models.data.tokenize import Vocabulary
from itm_models.eval.similarity import similarity_matrix
from itm_models.scan import SCAN, SCANConfig
from itm_models.train import train
from conftest import REPO, golden_path

IMG_DIM, REGIONS = 16, 4


# --------------------------------------------------------------------------------------------------------------
# Scaffolding
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These tests train models of a few hundred weights: threads only add synchronisation (seconds per step on a
    loaded machine), so they run on one."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("adv_data")
    make_synthetic_dataset(out, n_train=20, n_dev=4, n_test=4, n_regions=REGIONS, img_dim=IMG_DIM, n_concepts=10,
                           seed=1)
    return out


@pytest.fixture(scope="module")
def vocab_size(data_dir):
    return len(Vocabulary.load(data_dir / "vocab.json"))


def tiny_config(vocab_size: int, **changes) -> SCANConfig:
    base = dict(vocab_size=vocab_size, word_dim=8, embed_size=8, img_dim=IMG_DIM, bi_gru=True, batch_size=25,
                learning_rate=2e-3, lr_update=1, num_epochs=1)
    return SCANConfig(**{**base, **changes})


RUN = dict(seed=0, device="cpu", backend="torch", progress=False, log=None)


@pytest.fixture
def saved(tmp_path, vocab_size):
    """A tiny SCAN checkpoint with an Adam state after one step: (path, model, optimizer)."""
    torch.manual_seed(0)
    model = SCAN(tiny_config(vocab_size))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    path = tmp_path / "model.pt"
    save_checkpoint(model, path, optimizer=opt, epoch=1, best_rsum=10.0, history=[])
    return path, model, opt


def rewrite(path, mutate, *, rehash: bool = True, dest=None):
    """Load a checkpoint's raw dict, ``mutate`` it in place, store it again (a valid zip with fresh CRCs), with the
    payload hash recomputed unless ``rehash`` is False. Returns the written path."""
    ckpt = torch.load(path, weights_only=True)
    mutate(ckpt)
    if rehash:
        ckpt["payload_sha256"] = payload_sha256(ckpt)
    dest = path if dest is None else dest
    torch.save(ckpt, dest)
    return dest


def member_span(path, pick) -> tuple[int, int]:
    """(offset of the data, size) of the zip member chosen by ``pick(infos) -> info``."""
    with zipfile.ZipFile(path) as archive:
        info = pick(archive.infolist())
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def flip_bytes(path, offset: int, count: int = 4) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        data = bytearray(f.read(count))
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in data))


def largest_tensor(infos):
    return max((i for i in infos if "/data/" in i.filename), key=lambda i: i.file_size)


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


def assert_one_line_error(err: str, prog: str, *words: str) -> None:
    assert "Traceback" not in err, err
    line = last_line(err)
    assert line.startswith(f"{prog}: error:"), err
    for w in words:
        assert w in line, (w, line)


# --------------------------------------------------------------------------------------------------------------
# 7. Checkpoints
# --------------------------------------------------------------------------------------------------------------
def test_flipped_bytes_in_the_weights_are_refused(saved):
    path, model, _ = saved
    offset, size = member_span(path, largest_tensor)
    flip_bytes(path, offset + size // 2)
    # the reproducer: torch.load itself reads the damaged file without a word, with other weights
    raw = torch.load(path, weights_only=True)["state_dict"]
    assert any(not torch.equal(raw[k], v) for k, v in model.state_dict().items())
    with pytest.raises(CheckpointError, match=r"model\.pt is corrupt.*CRC"):
        load_checkpoint(path)


def test_flipped_bytes_in_the_pickle_are_refused(saved):
    path, _, _ = saved
    offset, size = member_span(path, lambda infos: next(i for i in infos if i.filename.endswith("data.pkl")))
    flip_bytes(path, offset + size // 2, count=1)
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(path)


def test_the_payload_hash_catches_a_consistent_zip_with_other_content(saved):
    path, _, _ = saved

    def tamper(ckpt):
        ckpt["state_dict"]["img_enc.fc.weight"][0, 0] += 1.0
        ckpt["epoch"] = 7

    rewrite(path, tamper, rehash=False)                     # fresh CRCs, the old stored hash
    with pytest.raises(CheckpointError, match="does not match its stored SHA-256"):
        load_checkpoint(path)


def test_a_checkpoint_without_a_hash_still_loads_with_a_warning(saved):
    path, model, _ = saved
    rewrite(path, lambda c: c.pop("payload_sha256"), rehash=False)
    with pytest.warns(CheckpointWarning, match="no payload hash"):
        loaded = load_checkpoint(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[k], v), k
    assert loaded.epoch == 1 and loaded.best_rsum == 10.0


def test_a_fresh_checkpoint_loads_without_warnings(saved):
    path, _, _ = saved
    with warnings.catch_warnings():
        warnings.simplefilter("error", CheckpointWarning)
        load_checkpoint(path)


@pytest.mark.parametrize("key", ["config", "state_dict"])
def test_missing_config_or_state_dict_is_a_checkpoint_error(saved, key):
    path, _, _ = saved
    rewrite(path, lambda c: c.pop(key))
    with pytest.raises(CheckpointError, match=rf"lacks \['{key}'\]"):
        load_checkpoint(path)


@pytest.mark.parametrize("vocab", [10 ** 9, 1e9])
def test_a_huge_config_is_refused_before_any_model_is_built(saved, monkeypatch, vocab):
    path, _, _ = saved
    rewrite(path, lambda c: c["config"].update(vocab_size=vocab))
    devices = []

    class Spy(SCAN):
        def __init__(self, *args, **kwargs):
            devices.append(torch.get_default_device().type)
            super().__init__(*args, **kwargs)

    monkeypatch.setitem(checkpoints._MODEL_TYPES, "scan", (SCANConfig, Spy))
    with pytest.raises(CheckpointError, match="vocab_size|txt_enc.embed.weight"):
        load_checkpoint(path)
    assert all(d == "meta" for d in devices), devices   # built on the meta device only, if at all


@pytest.mark.parametrize("model_type", sorted(checkpoints._MODEL_TYPES))
def test_every_model_type_builds_on_the_meta_device(model_type):
    """The shape check before building needs every registered model to build on the meta device."""
    config_cls, model_cls = checkpoints._MODEL_TYPES[model_type]
    config = config_cls(vocab_size=10 ** 9)
    expected = checkpoints._expected_state(model_cls, config, "auto")
    assert expected is not None and all(v.device.type == "meta" for v in expected.values())


def _set_group(key, value):
    def mutate(c):
        c["optimizer"]["param_groups"][0][key] = value
    return mutate


def _set_state(key, value):
    def mutate(c):
        c["optimizer"]["state"][0][key] = value
    return mutate


@pytest.mark.parametrize("mutate, words", [
    (lambda c: c.update(epoch=-1), "'epoch' is -1"),
    (lambda c: c.update(epoch="3"), "'epoch' is '3'"),
    (lambda c: c.update(epoch=1.5), "'epoch' is 1.5"),
    (lambda c: c.update(epoch=True), "'epoch' is True"),
    (lambda c: c.update(best_rsum=float("nan")), "'best_rsum' is nan"),
    (lambda c: c.update(best_rsum="x"), "'best_rsum' is 'x'"),
    (lambda c: c.update(extra=[1]), "'extra' is a list"),
    (lambda c: c.update(optimizer="adam"), "'optimizer' must be None or an optimizer state_dict"),
    (lambda c: c["optimizer"].update(param_groups="x"), "'optimizer' must be None or an optimizer state_dict"),
    (lambda c: c["optimizer"]["param_groups"][0].update(params=[0, 0]), "repeats a parameter id"),
    (lambda c: c["optimizer"]["param_groups"][0].update(params=["a"]), "list of parameter ids"),
    (_set_group("lr", float("nan")), r"param_groups\[0\]\['lr'\] is nan"),
    (_set_group("betas", (0.9, float("inf"))), r"param_groups\[0\]\['betas'\]\[1\] is inf"),
    (_set_state("step", torch.tensor(float("nan"))), r"state\[0\]\['step'\]"),
    (_set_state("step", torch.tensor(-3.0)), r"state\[0\]\['step'\]"),
    (_set_state("exp_avg", "x"), r"state\[0\] must map names to tensors"),
    (lambda c: c["optimizer"]["state"].update({999: {}}), "parameter id 999"),
])
def test_bad_epoch_and_optimizer_entries_are_refused_at_load(saved, mutate, words):
    path, _, _ = saved
    rewrite(path, mutate)
    with pytest.raises(CheckpointError, match=words):
        load_checkpoint(path)


def test_restore_optimizer_refuses_a_state_that_does_not_fit(saved, vocab_size):
    path, model, opt = saved
    state = load_checkpoint(path).optimizer_state
    fresh = torch.optim.Adam(model.parameters(), lr=1e-3)
    restore_optimizer(fresh, state, path=str(path))                      # fits
    assert fresh.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    other = SCAN(tiny_config(vocab_size, num_layers=2))
    with pytest.raises(CheckpointError, match="parameter groups of sizes"):
        restore_optimizer(torch.optim.Adam(other.parameters()), state, path=str(path))
    bent = {**state, "state": {**state["state"], 0: {**state["state"][0], "exp_avg": torch.zeros(3)}}}
    with pytest.raises(CheckpointError, match=r"state\[0\]\['exp_avg'\] has shape \(3,\)"):
        restore_optimizer(torch.optim.Adam(model.parameters()), bent, path=str(path))
    groups = [{**state["param_groups"][0], "betas": (2.0, 0.5)}]
    with pytest.raises(CheckpointError, match="not valid for Adam"):
        restore_optimizer(torch.optim.Adam(model.parameters()), {**state, "param_groups": groups}, path=str(path))


def test_saves_fsync_the_file_and_its_folder(tmp_path, vocab_size, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    save_checkpoint(SCAN(tiny_config(vocab_size)), tmp_path / "m.pt")
    assert synced == [False, True]                       # the file, then its folder after the rename


@pytest.mark.parametrize("failing", ["torch.save", "os.replace"])
def test_a_failed_save_leaves_no_temporary_file_and_the_old_checkpoint_intact(saved, vocab_size, monkeypatch,
                                                                              failing):
    path, _, _ = saved
    before = path.read_bytes()

    def torn_save(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    def failed_replace(src, dst):
        raise OSError(13, "Permission denied")

    if failing == "torch.save":
        monkeypatch.setattr(torch, "save", torn_save)
    else:
        monkeypatch.setattr(os, "replace", failed_replace)
    with pytest.raises(OSError):
        save_checkpoint(SCAN(tiny_config(vocab_size)), path)
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.pt"]
    assert path.read_bytes() == before


def test_official_checkpoints_load_and_a_damaged_copy_is_refused(tmp_path):
    model = load_official_checkpoint(golden_path("scan_checkpoint.pth.tar"))
    assert model.checkpoint_info["epoch"] is not None
    copy = tmp_path / "scan_checkpoint.pth.tar"
    copy.write_bytes(golden_path("scan_checkpoint.pth.tar").read_bytes())
    offset, size = member_span(copy, largest_tensor)
    flip_bytes(copy, offset + size // 3)
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_official_checkpoint(copy)


@pytest.mark.parametrize("golden", ["scan_checkpoint.pth.tar", "sgraf_checkpoint.pth.tar"])
def test_an_official_opt_describing_a_huge_model_is_refused_before_building(golden, tmp_path, monkeypatch):
    import argparse

    import itm_models.scan.official as scan_official
    import itm_models.sgraf.official as sgraf_official

    with torch.serialization.safe_globals(checkpoints._official_safe_globals()):
        ckpt = torch.load(golden_path(golden), weights_only=True)
    assert isinstance(ckpt["opt"], argparse.Namespace)
    ckpt["opt"].vocab_size = 10 ** 9
    path = tmp_path / golden
    torch.save(ckpt, path)
    devices = []
    for module in (scan_official, sgraf_official):
        cls = module.SCAN if module is scan_official else module.SGRAF

        class Spy(cls):
            def __init__(self, *args, **kwargs):
                devices.append(torch.get_default_device().type)
                super().__init__(*args, **kwargs)

        monkeypatch.setattr(module, cls.__name__, Spy)
    with pytest.raises(CheckpointError, match=r"embed.weight.*1000000000"):
        load_official_checkpoint(path)
    assert devices == ["meta"]


def test_crc_checks_skip_files_written_without_crcs(tmp_path, vocab_size):
    """torch.serialization.set_crc32_options(False) writes CRC 0: such files are not called corrupt."""
    torch.serialization.set_crc32_options(False)
    try:
        save_checkpoint(SCAN(tiny_config(vocab_size)), tmp_path / "nocrc.pt")
    finally:
        torch.serialization.set_crc32_options(True)
    with zipfile.ZipFile(tmp_path / "nocrc.pt") as archive:
        assert all(i.CRC == 0 for i in archive.infolist())
    load_checkpoint(tmp_path / "nocrc.pt")                  # the payload hash still guards the content


# --------------------------------------------------------------------------------------------------------------
# 6. Run folders and the best checkpoint
# --------------------------------------------------------------------------------------------------------------
def test_training_into_a_used_folder_is_refused_and_the_best_kept(data_dir, vocab_size, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config(vocab_size), data_dir, out, **RUN)
    best = (out / "checkpoint_best.pt").read_bytes()
    with pytest.raises(FileExistsError, match="is not empty.*checkpoint_best.pt.*resume.*overwrite"):
        train(tiny_config(vocab_size), data_dir, out, **{**RUN, "seed": 1})
    assert (out / "checkpoint_best.pt").read_bytes() == best
    # any non-empty folder is refused, not only one holding checkpoints
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="readme.txt"):
        train(tiny_config(vocab_size), data_dir, tmp_path / "notes", **RUN)
    # overwrite: a new run replaces the old one's checkpoints (and only them)
    (out / "log.txt").write_text("kept")
    second = train(tiny_config(vocab_size), data_dir, out, **{**RUN, "seed": 1}, overwrite=True)
    assert second["run_id"] != first["run_id"] and (out / "log.txt").read_text() == "kept"
    assert load_checkpoint(out / "checkpoint_best.pt").extra["run_id"] == second["run_id"]
    # a file is not a run folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="not a folder"):
        train(tiny_config(vocab_size), data_dir, tmp_path / "file", **RUN, overwrite=True)


def test_checkpoints_record_the_run_id_and_a_resume_keeps_it(data_dir, vocab_size, tmp_path):
    out = tmp_path / "run"
    first = train(tiny_config(vocab_size), data_dir, out, **RUN)
    ids = {load_checkpoint(out / f).extra["run_id"] for f in ("checkpoint_last.pt", "checkpoint_best.pt")}
    assert ids == {first["run_id"]} and len(first["run_id"]) == 32
    resumed = train(tiny_config(vocab_size, num_epochs=2), data_dir, out, **RUN, resume=True)
    assert resumed["run_id"] == first["run_id"]
    assert load_checkpoint(out / "checkpoint_last.pt").extra["run_id"] == first["run_id"]


def test_a_resumed_run_keeps_the_folders_better_best(data_dir, vocab_size, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(vocab_size), data_dir, out, **RUN)
    # the folder's best scored higher than the checkpoint resumed from (e.g. resumed from an older last)
    rewrite(out / "checkpoint_best.pt", lambda c: c.update(best_rsum=600.0))
    best = (out / "checkpoint_best.pt").read_bytes()
    resumed = train(tiny_config(vocab_size, num_epochs=3), data_dir, out, **RUN, resume=True)
    assert resumed["best_rsum"] == 600.0
    assert (out / "checkpoint_best.pt").read_bytes() == best
    assert load_checkpoint(out / "checkpoint_last.pt").best_rsum == 600.0


def test_a_resume_refuses_the_best_checkpoint_of_another_run(data_dir, vocab_size, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(vocab_size), data_dir, out, **RUN)
    rewrite(out / "checkpoint_best.pt", lambda c: c["extra"].update(run_id="0" * 32, best_rsum=600.0))
    best = (out / "checkpoint_best.pt").read_bytes()
    with pytest.raises(CheckpointError, match="belongs to another run"):
        train(tiny_config(vocab_size, num_epochs=2), data_dir, out, **RUN, resume=True)
    assert (out / "checkpoint_best.pt").read_bytes() == best
    resumed = train(tiny_config(vocab_size, num_epochs=2), data_dir, out, **RUN, resume=True, overwrite=True)
    assert load_checkpoint(out / "checkpoint_best.pt").extra["run_id"] == resumed["run_id"] != "0" * 32


@pytest.mark.parametrize("mutate, words", [
    (lambda c: c["extra"].update(torch_rng=torch.zeros(3)), "torch_rng"),
    (lambda c: c["extra"].update(history="x"), "history"),
    (lambda c: c["extra"].update(best_epoch=5), "best_epoch"),
    (lambda c: c["optimizer"]["state"][0].update(exp_avg=torch.zeros(2)), "exp_avg"),
])
def test_a_resume_refuses_bad_training_state_before_training(data_dir, vocab_size, tmp_path, mutate, words):
    out = tmp_path / "run"
    train(tiny_config(vocab_size), data_dir, out, **RUN)
    rewrite(out / "checkpoint_last.pt", mutate)
    steps = []
    with pytest.raises(CheckpointError, match=words):
        train(tiny_config(vocab_size, num_epochs=2), data_dir, out, **RUN, resume=True,
              on_step=lambda *a: steps.append(a))
    assert steps == []


# --------------------------------------------------------------------------------------------------------------
# 8. CLIs: one line on stderr, a non-zero exit code, never a traceback
# --------------------------------------------------------------------------------------------------------------
class Untrusted:
    """A pickled class that a safe load refuses."""


def _train_argv(data_dir, out, *extra):
    return ["--data", str(data_dir), "--out", str(out), "--epochs", "1", "--batch-size", "25", "--embed-size", "8",
            "--word-dim", "8", "--img-dim", str(IMG_DIM), "--backend", "torch", "--device", "cpu", "--no-progress",
            *extra]


@pytest.mark.parametrize("flag, value, words", [
    ("--epochs", "0", "argument --epochs: must be a positive integer, got 0"),
    ("--lr", "nan", "argument --lr: expected a finite number, got 'nan'"),
    ("--lr", "-0.001", "argument --lr: must be a finite number > 0"),
    ("--lr-update", "0", "argument --lr-update: must be a positive integer"),
    ("--workers", "-1", "argument --workers: must be an integer >= 0, got -1"),
    ("--backend", "bogus", "argument --backend: unknown backend 'bogus'"),
    ("--device", "bogus", "argument --device: device 'bogus' is not a device name"),
    ("--batch-size", "0", "argument --batch-size: must be a positive integer"),
    ("--seed", "-2", "argument --seed: must be an integer >= 0"),
    ("--margin", "inf", "argument --margin: expected a finite number"),
])
def test_train_cli_refuses_bad_options_in_one_line(data_dir, tmp_path, capsys, flag, value, words):
    with pytest.raises(SystemExit) as exc:
        train_cli(_train_argv(data_dir, tmp_path / "o", flag, value))
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "python -m itm_models.cli.train", words)
    assert not (tmp_path / "o").exists()


def test_train_cli_refuses_an_out_that_is_a_file(data_dir, tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    for out in (tmp_path / "f", tmp_path / "f" / "below"):
        with pytest.raises(SystemExit) as exc:
            train_cli(_train_argv(data_dir, out))
        assert exc.value.code == 2
        assert_one_line_error(capsys.readouterr().err, "python -m itm_models.cli.train", "argument --out:")


def test_cli_device_cuda_without_cuda(data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exc:
        train_cli(_train_argv(data_dir, tmp_path / "o", "--device", "cuda"))
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "python -m itm_models.cli.train", "argument --device:",
                          "needs CUDA")
    with pytest.raises(SystemExit) as exc:
        eval_main(["--checkpoint", "x.pt", "--data", str(data_dir), "--device", "cuda:0"])
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "itm-eval", "argument --device:", "needs CUDA")


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory):
    """A one-epoch itm-train run: its folder."""
    out = tmp_path_factory.mktemp("cli_run") / "run"
    assert train_cli(_train_argv(data_dir, out)) == 0
    return out


def _corrupt_copy(src, dest):
    dest.write_bytes(src.read_bytes())
    offset, size = member_span(dest, largest_tensor)
    flip_bytes(dest, offset + size // 2)
    return dest


def _untrusted(dest):
    torch.save({"format": "itm_models.checkpoint", "payload": Untrusted()}, dest)
    return dest


def _bad_optimizer(src, dest):
    return rewrite(src, lambda c: c["optimizer"]["param_groups"][0].update(lr=float("nan")), dest=dest)


@pytest.mark.parametrize("make, words", [
    (lambda run, d: _corrupt_copy(run / "checkpoint_last.pt", d / "c.pt"), "is corrupt"),
    (lambda run, d: d / "missing.pt", "checkpoint not found"),
    (lambda run, d: _untrusted(d / "u.pt"), "a safe load refuses"),
    (lambda run, d: _bad_optimizer(run / "checkpoint_last.pt", d / "o.pt"), "'lr'] is nan"),
])
def test_train_cli_resume_from_a_bad_checkpoint_is_one_line(data_dir, trained_run, tmp_path, capsys, make, words):
    path = make(trained_run, tmp_path)
    code = train_cli(_train_argv(data_dir, tmp_path / "new", "--epochs", "2", "--resume", str(path)))
    assert code == 2
    assert_one_line_error(capsys.readouterr().err, "itm-train", words)


def test_train_cli_refuses_a_used_out_without_resume(data_dir, trained_run, capsys):
    best = (trained_run / "checkpoint_best.pt").read_bytes()
    assert train_cli(_train_argv(data_dir, trained_run)) == 2
    assert_one_line_error(capsys.readouterr().err, "itm-train", "is not empty", "--resume", "--overwrite")
    assert (trained_run / "checkpoint_best.pt").read_bytes() == best


@pytest.mark.parametrize("argv, words", [
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got 0"),
    (["--batch-size", "-3"], "argument --batch-size: must be a positive integer, got -3"),
    (["--device", "bogus"], "argument --device: device 'bogus' is not a device name"),
    (["--backend", "bogus"], "argument --backend: unknown backend 'bogus'"),
    (["--official-batch-size", "0"], "argument --official-batch-size: must be a positive integer"),
])
def test_eval_cli_refuses_bad_options_in_one_line(data_dir, trained_run, capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        eval_main(["--checkpoint", str(trained_run / "checkpoint_best.pt"), "--data", str(data_dir), *argv])
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "itm-eval", words)


def test_eval_cli_corrupt_checkpoint_is_one_line(data_dir, trained_run, tmp_path, capsys):
    path = _corrupt_copy(trained_run / "checkpoint_best.pt", tmp_path / "c.pt")
    assert eval_main(["--checkpoint", str(path), "--data", str(data_dir), "--no-progress"]) == 2
    assert_one_line_error(capsys.readouterr().err, "itm-eval", "is corrupt")


@pytest.mark.parametrize("argv, words", [
    (["--epochs", "0"], "argument --epochs: must be a positive integer"),
    (["--lr", "nan"], "argument --lr: expected a finite number"),
    (["--n-test", "-1"], "argument --n-test: must be a positive integer"),
    (["--batch-size", "0"], "argument --batch-size: must be a positive integer"),
])
def test_demo_cli_refuses_bad_options_in_one_line(tmp_path, capsys, argv, words):
    with pytest.raises(SystemExit) as exc:
        demo_main(["--out", str(tmp_path / "demo"), *argv])
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "itm-demo", words)


def test_demo_cli_refuses_an_out_that_is_a_file(tmp_path, capsys):
    (tmp_path / "f").write_text("x")
    with pytest.raises(SystemExit) as exc:
        demo_main(["--out", str(tmp_path / "f")])
    assert exc.value.code == 2
    assert_one_line_error(capsys.readouterr().err, "itm-demo", "argument --out:", "is not a folder")


def test_the_module_entry_point_ends_without_a_traceback(data_dir, trained_run, tmp_path):
    """The one real process: ``python -m itm_models.cli.train`` resuming from a corrupt checkpoint (the other CLI
    checks run in-process through the same entry functions)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    corrupt = _corrupt_copy(trained_run / "checkpoint_last.pt", tmp_path / "c.pt")
    argv = ["-m", "itm_models.cli.train", *_train_argv(data_dir, tmp_path / "o", "--resume", str(corrupt))]
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert_one_line_error(proc.stderr, "itm-train", "c.pt is corrupt")


# --------------------------------------------------------------------------------------------------------------
# 9. Readers and similarity_matrix
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture
def data_copy(data_dir, tmp_path):
    for name in ("test_ims.npy", "test_caps.txt", "vocab.json"):
        (tmp_path / name).write_bytes((data_dir / name).read_bytes())
    return tmp_path


def test_non_utf8_ids_file_is_a_data_format_error(data_copy):
    (data_copy / "test_ids.txt").write_bytes(b"1\n2\xff\xfe\n3\n4\n")
    with pytest.raises(DataFormatError, match=r"test_ids.txt line 2 is not valid UTF-8"):
        PrecompDataset(data_copy, "test")


def test_deeply_nested_json_is_a_data_format_error(data_copy):
    depth = 100_000
    (data_copy / "test_caps.json").write_text("[" * depth + "]" * depth)
    with pytest.raises(DataFormatError, match="test_caps.json is nested too deeply"):
        load_split_parses(data_copy, "test")
    (data_copy / "vocab.json").write_text('{"word2idx": ' + "[" * depth + "]" * depth + "}")
    with pytest.raises(DataFormatError, match="vocab.json is nested too deeply"):
        Vocabulary.load(data_copy / "vocab.json")


@pytest.mark.parametrize("shape, words", [
    ((4, 0, IMG_DIM), "no regions per image"),
    ((4, REGIONS, 0), "no features per region"),
    ((0, REGIONS, IMG_DIM), "no image rows"),
])
def test_image_features_with_an_empty_axis_are_refused(data_copy, shape, words):
    np.save(data_copy / "test_ims.npy", np.zeros(shape, dtype=np.float32))
    with pytest.raises(DataFormatError, match=words):
        load_split_images(data_copy, "test")
    with pytest.raises(DataFormatError, match=words):
        PrecompDataset(data_copy, "test")


@pytest.mark.parametrize("kwargs, name", [
    (dict(caption_chunk=0), "caption_chunk"),
    (dict(batch_size=-1), "batch_size"),
    (dict(captions_per_image=0), "captions_per_image"),
    (dict(caption_chunk=2.5), "caption_chunk"),
    (dict(batch_size=True), "batch_size"),
])
def test_similarity_matrix_names_a_bad_size_argument(data_dir, vocab_size, kwargs, name):
    model = SCAN(tiny_config(vocab_size))
    with pytest.raises(ValueError, match=rf"^{name} must be a positive int, got "):
        similarity_matrix(model, PrecompDataset(data_dir, "test"), progress=False, **kwargs)
