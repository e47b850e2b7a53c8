"""TSHSR training and evaluation plumbing: ``itm-train --model tshsr`` (one tiny epoch), checkpoint round trip,
``itm-eval`` on the checkpoint, CLI option errors, and the synthetic generator's ``hard_negatives`` option (the
default output unchanged)."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from itm_models.checkpoints import load_checkpoint, save_checkpoint
from itm_models.cli import eval as eval_cli
from itm_models.cli.train import main
from itm_models.data import OFFICIAL_DEV_CAPTIONS, PrecompDataset, collate
from itm_models.data.synthetic import make_synthetic_dataset
from itm_models.train import validate
from itm_models.tshsr import TSHSR, TSHSRConfig
from model_helpers import resolved_cli_args, synthetic_data_dir

IMG_DIM, EMBED, SIM, WORD = 32, 16, 8, 8


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is as fast and immune to a busy machine."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data_dir(tmp_path_factory, "tshsr_data", n_train=24, n_dev=10, n_test=10, n_regions=36,
                              img_dim=IMG_DIM, n_concepts=20, seed=3, hard_negatives=0.5)


def sims_of(model, data_dir, n=10):
    dataset = PrecompDataset(data_dir, "dev")
    images, ids, lens, _ = collate([dataset[i] for i in range(n)])
    with torch.no_grad():
        return model.sims(model.encode_images(images), model.encode_captions(ids, lens), lens)


def test_cli_trains_one_epoch_the_checkpoint_round_trips_and_itm_eval_reads_it(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    result = main(["--data", str(data_dir), "--out", str(out), "--model", "tshsr", "--epochs", "1", "--batch-size",
                   "12", "--embed-size", str(EMBED), "--word-dim", str(WORD), "--img-dim", str(IMG_DIM), "--sim-dim",
                   str(SIM), "--sgr-step", "2", "--fusion", "learned", "--phrase-window", "2", "--device", "cpu",
                   "--no-progress"])
    assert result["epochs"] == 1 and "rsum" in capsys.readouterr().out
    loaded = load_checkpoint(out / "checkpoint_best.pt")
    model = loaded.model
    assert isinstance(model, TSHSR) and not model.training
    c = model.config
    assert (c.streams, c.levels, c.sgr_step, c.sim_dim, c.fusion, c.phrase_window, c.lr_update) == \
        (("t2i", "i2t"), ("global", "intermediate", "local"), 2, SIM, "learned", 2, 30)
    assert loaded.epoch == 1 and loaded.optimizer_state is not None
    dev = PrecompDataset(data_dir, "dev", max_captions=OFFICIAL_DEV_CAPTIONS)
    assert validate(model, dev, device="cpu")["rsum"] == loaded.best_rsum == result["best_rsum"]
    # the training step moved the weights away from the seeded initialisation
    torch.manual_seed(0)
    fresh = TSHSR(TSHSRConfig(**{**c.to_dict()}))
    assert not torch.equal(fresh.sim_enc.streams["i2t"].sim_tranloc_w.weight,
                           model.sim_enc.streams["i2t"].sim_tranloc_w.weight)
    save_checkpoint(model, tmp_path / "again.pt")
    again = load_checkpoint(tmp_path / "again.pt").model
    assert again.config == model.config
    assert torch.equal(sims_of(again, data_dir), sims_of(model, data_dir))
    # itm-eval loads it through itm_models.checkpoints and scores the test split
    assert eval_cli.main(["--checkpoint", str(out / "checkpoint_best.pt"), "--data", str(data_dir), "--split", "test",
                          "--device", "cpu", "--no-progress"]) == 0
    assert "rsum" in capsys.readouterr().out


def test_cli_tshsr_defaults_and_option_errors(capsys):
    a = resolved_cli_args("--model", "tshsr")
    assert (a.epochs, a.lr_update, a.batch_size, a.lr, a.sim_dim, a.sgr_step, a.streams, a.fusion) == \
        (40, 30, 128, 2e-4, 256, 3, "t2i,i2t", "sum")
    for argv, message in ((["--model", "tshsr", "--streams", "t2i,x"], "--streams"),
                          (["--model", "tshsr", "--levels", "global"], "--levels"),
                          (["--model", "sgraf", "--fusion", "sum"], "--fusion"),
                          (["--model", "tshsr", "--module", "SAF"], "--module")):
        with pytest.raises(SystemExit) as exc:
            resolved_cli_args(*argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err


def _digest(folder) -> str:
    h = hashlib.sha256()
    for name in sorted(os.listdir(folder)):
        h.update((folder / name).read_bytes())
    return h.hexdigest()


def test_synthetic_default_output_is_unchanged(tmp_path):
    # sha256 of the files written by the generator BEFORE the hard_negatives option existed (main at 42da6d1),
    # for this exact call: the option must not change what existing tests and benchmarks read.
    make_synthetic_dataset(tmp_path, n_train=7, n_dev=3, n_test=0, n_regions=6, img_dim=8, n_concepts=12, seed=2)
    assert _digest(tmp_path) == "f88e02c5dcf5b5903ab177d7a5a5bef80c412118802550f3ff52c0ea9954a593"


def test_synthetic_hard_negatives_share_all_concept_words_but_one(tmp_path):
    info = make_synthetic_dataset(tmp_path, n_train=0, n_dev=12, n_test=0, n_regions=12, img_dim=8, n_concepts=30,
                                  seed=1, hard_negatives=1.0)
    assert info["splits"]["dev"] == (12, 60)
    from itm_models.data.synthetic import FILLER_WORDS
    caps = (tmp_path / "dev_caps.txt").read_text().splitlines()
    filler = set(FILLER_WORDS)

    def concepts(i):
        words = set()
        for c in caps[5 * i:5 * i + 5]:
            words |= {w.strip(",.!").lower() for w in c.split()} - filler - {""}
        return words

    for i in range(1, 12):                 # every image is a twin of the previous one: one concept differs
        mine, prev = concepts(i), concepts(i - 1)
        own = mine - prev
        assert len(own) >= 1 and len(mine & prev) >= 1, (i, mine, prev)
        # the distinguishing concept is named in every caption of the twin
        distinct = [w for w in own if all(w in c.lower() for c in caps[5 * i:5 * i + 5])]
        assert distinct, (i, own)
    with pytest.raises(ValueError, match="hard_negatives"):
        make_synthetic_dataset(tmp_path, hard_negatives=1.5)
