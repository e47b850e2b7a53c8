"""SGRAF beyond the head: the SGR + SAF ensemble, the config and its per-module schedule, training steps, the
``itm-train --model sgraf`` CLI with its checkpoints (reload gives identical scores and the recorded dev rsum) and
resuming. Tiny sizes (d = 16, s = 8, 36 regions of 32 features): seconds in all."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from itm_models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from itm_models.data import OFFICIAL_DEV_CAPTIONS, PrecompDataset, collate
from itm_models.cli.train import main
from itm_models.eval.metrics import recall
from itm_models.eval.similarity import similarity_matrix
from itm_models.losses import ContrastiveLoss
from itm_models.scan import SCAN, SCANConfig
from itm_models.sgraf import SGRAF, SGRAFConfig, SGRAFEnsemble, SGRAFSimilarity, recipe_schedule
from itm_models.train import train, train_step, validate
from conftest import assert_close_report
from model_helpers import (check_resume_continues_the_same_run, resolved_cli_args, seeded, synthetic_data_dir,
                           vocab_size_of)

IMG_DIM, EMBED, SIM, WORD = 32, 16, 8, 8
TINY = dict(img_dim=IMG_DIM, embed_size=EMBED, sim_dim=SIM, word_dim=WORD)


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_thread):
    """Tiny models: one intra-op thread is as fast and immune to a busy machine."""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return synthetic_data_dir(tmp_path_factory, "sgraf_data", n_train=40, n_dev=10, n_test=0, n_regions=36,
                              img_dim=IMG_DIM, n_concepts=20, seed=3)


@pytest.fixture(scope="module")
def vocab_size(data_dir):
    return vocab_size_of(data_dir)


def tiny_model(module: str, vocab_size: int, seed: int) -> SGRAF:
    return seeded(seed, lambda: SGRAF.from_config(SGRAFConfig(vocab_size=vocab_size, module_name=module, **TINY)))


def batch_of(data_dir, n: int, split: str = "train"):
    """The first ``n`` captions of a split, collated: (images (n, 36, 32), ids (n, L_max), lengths (n,), indices)."""
    dataset = PrecompDataset(data_dir, split)
    return collate([dataset[i] for i in range(n)])


def embeddings(model, batch):
    with torch.no_grad():
        return model.encode_images(batch[0]), model.encode_captions(batch[1], batch[2])


# ------------------------------------------------------------------------------------------------------------------
# SGRAFEnsemble
# ------------------------------------------------------------------------------------------------------------------

def test_ensemble_is_the_mean_of_the_members(data_dir, vocab_size):
    sgr, saf = tiny_model("SGR", vocab_size, 0).eval(), tiny_model("SAF", vocab_size, 1).eval()
    ensemble = SGRAFEnsemble([sgr, saf]).eval()
    assert ensemble.module_names == ("SGR", "SAF")
    images, ids, lens, _ = batch_of(data_dir, 10)
    img_embs, cap_embs = ensemble.encode_images(images), ensemble.encode_captions(ids, lens)
    assert len(img_embs) == len(cap_embs) == 2
    with torch.no_grad():
        got = ensemble.sims(img_embs, cap_embs, lens)
        want = [m.sims(*embeddings(m, (images, ids, lens)), lens) for m in (sgr, saf)]
        assert got.shape == (10, 10) and got.dtype == torch.float32
        assert_close_report(got, (want[0] + want[1]) / 2, atol=1e-7, rtol=0, what="ensemble sims")
        assert_close_report(ensemble(images, ids, lens), (sgr(images, ids, lens) + saf(images, ids, lens)) / 2,
                            atol=1e-7, rtol=0, what="ensemble forward (eval)")
        # keyword arguments reach every member (bfloat16 products)
        bf16 = ensemble.sims(img_embs, cap_embs, lens, dtype=torch.bfloat16)
    assert_close_report(bf16, got, atol=2e-2, rtol=0, what="ensemble bfloat16")


def test_ensemble_validation_metrics_are_those_of_the_mean(data_dir, vocab_size):
    sgr, saf = tiny_model("SGR", vocab_size, 2), tiny_model("SAF", vocab_size, 3)
    dev = PrecompDataset(data_dir, "dev", max_captions=OFFICIAL_DEV_CAPTIONS)
    metrics = validate(SGRAFEnsemble([sgr, saf]).train(), dev, batch_size=16, device="cpu")
    assert sgr.training and saf.training                                        # modes restored
    mean = (similarity_matrix(sgr, dev, device="cpu", progress=False) +
            similarity_matrix(saf, dev, device="cpu", progress=False)) / 2
    assert metrics["rsum"] == recall(mean)["rsum"] and metrics["n_images"] == 10


def test_ensemble_rejects_bad_input(vocab_size):
    sgr = tiny_model("SGR", vocab_size, 0)
    with pytest.raises(ValueError, match="at least one model"):
        SGRAFEnsemble([])
    with pytest.raises(TypeError, match=r"models\[1\] is a SCAN, expected SGRAF"):
        SGRAFEnsemble([sgr, SCAN(SCANConfig(vocab_size=vocab_size, img_dim=IMG_DIM, embed_size=EMBED))])
    with pytest.raises(TypeError, match=r"models\[0\] is a SGRAFSimilarity"):
        SGRAFEnsemble([SGRAFSimilarity(EMBED, SIM, "SAF")])
    with pytest.raises(TypeError, match="wrap it in a list"):
        SGRAFEnsemble(sgr)
    ensemble = SGRAFEnsemble([sgr, tiny_model("SAF", vocab_size, 1)])
    img, cap, lens = torch.randn(2, 36, EMBED), torch.randn(3, 4, EMBED), torch.tensor([4, 2, 1])
    with pytest.raises(ValueError, match="img_embs must be a list"):
        ensemble.sims(img, [cap, cap], lens)
    with pytest.raises(ValueError, match=r"cap_embs holds 1 embeddings, expected 2"):
        ensemble.sims([img, img], [cap], lens)


# ------------------------------------------------------------------------------------------------------------------
# Config and training
# ------------------------------------------------------------------------------------------------------------------

def test_config_schedule_defaults_and_validation():
    assert recipe_schedule("SGR") == (40, 30) and recipe_schedule("SAF") == (30, 20)
    assert recipe_schedule("SGR", "coco") == recipe_schedule("SAF", "coco") == (20, 10)
    sgr, saf = SGRAFConfig(vocab_size=5), SGRAFConfig(vocab_size=5, module_name="SAF")
    assert (sgr.num_epochs, sgr.lr_update, saf.num_epochs, saf.lr_update) == (40, 30, 30, 20)
    assert (sgr.batch_size, sgr.learning_rate, sgr.margin, sgr.max_violation, sgr.grad_clip, sgr.sim_dim,
            sgr.sgr_step, sgr.bi_gru) == (128, 2e-4, 0.2, True, 2.0, 256, 3, True)
    assert SGRAFConfig(vocab_size=5, num_epochs=20, lr_update=10).num_epochs == 20
    assert SGRAFConfig.from_opt({"vocab_size": 7, "module_name": "SAF", "data_path": "x"}).module_name == "SAF"
    with pytest.raises(ValueError, match="module_name must be one of"):
        SGRAFConfig(vocab_size=5, module_name="AVE")
    with pytest.raises(ValueError, match="sim_dim must be a positive int"):
        SGRAFConfig(vocab_size=5, sim_dim=0)
    with pytest.raises(ValueError, match="learning_rate must be a finite number >= 0"):
        SGRAFConfig(vocab_size=5, learning_rate=float("nan"))
    with pytest.raises(ValueError, match="vocab_size"):
        SGRAFConfig.from_opt({"module_name": "SGR"})
    with pytest.raises(ValueError, match="no official schedule"):
        recipe_schedule("SGR", "cub")


def test_cli_defaults_depend_on_the_model():
    resolved = resolved_cli_args
    a = resolved()
    assert (a.model, a.epochs, a.lr_update, a.direction, a.backend, a.module) == ("scan", 30, 15, "t2i", "auto",
                                                                                  None)
    assert (resolved("--model", "sgraf").epochs, resolved("--model", "sgraf").lr_update) == (40, 30)
    a = resolved("--model", "sgraf", "--module", "SAF")
    assert (a.module, a.epochs, a.lr_update, a.sim_dim, a.sgr_step, a.direction) == ("SAF", 30, 20, 256, 3, None)
    assert resolved("--model", "sgraf", "--epochs", "20", "--lr-update", "10").lr_update == 10
    for argv in (["--model", "sgraf", "--direction", "i2t"], ["--module", "SAF"], ["--model", "sgraf", "--backend",
                                                                                  "cpu"]):
        with pytest.raises(SystemExit):
            resolved(*argv)


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_training_steps_reduce_the_loss(data_dir, vocab_size, module):
    """40 steps on one batch of 16 distinct images. The summed hinge loss (not hardest negatives): SGRAF's scores
    start in a narrow sigmoid band, where the hardest-negative loss sits at its collapse value 2 B margin for many
    steps on a batch this small, so it says little about whether the model learns."""
    model = tiny_model(module, vocab_size, 4).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    criterion = ContrastiveLoss(0.2, max_violation=False)
    dataset = PrecompDataset(data_dir, "train")
    batch = collate([dataset[5 * i] for i in range(16)])                      # one caption per image
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = [train_step(model, optimizer, criterion, batch, grad_clip=2.0) for _ in range(40)]
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses
    # the gradient reaches the encoders and the head (graph_key_w.bias cancels in SGR's row softmax)
    frozen = [k for k, v in model.named_parameters() if torch.equal(v, before[k]) and
              not k.endswith("graph_key_w.bias")]
    assert not frozen, frozen


# ------------------------------------------------------------------------------------------------------------------
# CLI, checkpoints, resume
# ------------------------------------------------------------------------------------------------------------------

def sims_of(model, batch):
    model.eval()
    img, cap = embeddings(model, batch)
    return model.sims(img, cap, batch[2])


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_cli_trains_one_epoch_and_the_checkpoint_reloads(data_dir, tmp_path, capsys, module):
    out = tmp_path / module
    result = main(["--data", str(data_dir), "--out", str(out), "--model", "sgraf", "--module", module, "--epochs",
                   "1", "--batch-size", "16", "--embed-size", str(EMBED), "--word-dim", str(WORD), "--img-dim",
                   str(IMG_DIM), "--sim-dim", str(SIM), "--sgr-step", "2", "--device", "cpu", "--no-progress"])
    assert result["epochs"] == 1 and "rsum" in capsys.readouterr().out
    loaded = load_checkpoint(out / "checkpoint_best.pt")
    model = loaded.model
    assert isinstance(model, SGRAF) and not model.training
    assert (model.config.module_name, model.config.sgr_step, model.config.sim_dim, model.config.lr_update) == \
        (module, 2, SIM, recipe_schedule(module)[1])
    assert loaded.epoch == 1 and loaded.optimizer_state is not None
    # the checkpoint holds the weights (BatchNorm running statistics included) that the dev rsum was measured on
    dev = PrecompDataset(data_dir, "dev", max_captions=OFFICIAL_DEV_CAPTIONS)
    assert validate(model, dev, device="cpu")["rsum"] == loaded.best_rsum == result["best_rsum"]
    # and it round-trips: save the loaded model again, load it, identical scores
    batch = batch_of(data_dir, 12, "dev")
    save_checkpoint(model, tmp_path / "again.pt")
    again = load_checkpoint(tmp_path / "again.pt").model
    assert again.config == model.config
    assert torch.equal(sims_of(again, batch), sims_of(model, batch))
    assert torch.equal(sims_of(load_checkpoint(out / "checkpoint_last.pt").model, batch), sims_of(model, batch))


def test_resume_continues_the_same_run(data_dir, vocab_size, tmp_path):
    cfg = dict(vocab_size=vocab_size, module_name="SAF", batch_size=16, learning_rate=2e-3, lr_update=1, **TINY)
    batch = batch_of(data_dir, 12, "dev")
    run = check_resume_continues_the_same_run(lambda epochs: SGRAFConfig(num_epochs=epochs, **cfg), data_dir,
                                              tmp_path, lambda model: sims_of(model, batch))
    with pytest.raises(CheckpointError, match=r"model options differ.*module_name"):
        train(SGRAFConfig(num_epochs=3, **{**cfg, "module_name": "SGR"}), data_dir, tmp_path / "cut", **run,
              resume=True)
    with pytest.raises(CheckpointError, match="holds a SGRAF model, the run trains SCAN"):
        train(SCANConfig(vocab_size=vocab_size, img_dim=IMG_DIM, embed_size=EMBED, num_epochs=3), data_dir,
              tmp_path / "cut", **run, resume=True)


def test_a_last_batch_of_one_caption_is_dropped(data_dir, vocab_size, tmp_path):
    """BatchNorm over d in VisualSA cannot train on one image: 200 captions in batches of 199 -> one step."""
    result = train(SGRAFConfig(vocab_size=vocab_size, num_epochs=1, batch_size=199, **TINY), data_dir,
                   tmp_path / "drop", seed=0, device="cpu", progress=False, log=None, val_every_epoch=0)
    assert result["history"][0]["steps"] == 1
