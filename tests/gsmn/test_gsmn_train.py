"""GSMN training: GSMNConfig (validation, official recipes, official opt), save/load round trips, training batches
with each caption's boxes, image size and parse, steps that reduce the loss (dense, sparse, paper propagation),
``itm-train --model gsmn`` (one epoch, checkpoint reload, dev rsum), resuming, and the CLI's option checks.
Tiny sizes (d = 32, 12 regions of 32 features, word_dim 16): seconds in all."""
from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import torch

from itm_models import GSMN, GSMNConfig, GSMNEnsemble, build_gsmn_from_official
from itm_models.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from itm_models.cli.eval import evaluate
from itm_models.cli.train import main
from itm_models.data import OFFICIAL_DEV_CAPTIONS, DataFormatError, PrecompDataset
from itm_models.data.synthetic import synthetic_boxes, synthetic_parses
from itm_models.eval.metrics import recall
from itm_models.eval.similarity import gsmn_split, similarity_matrix
from itm_models.gsmn.config import recipe
from itm_models.gsmn.geometry import normalize_boxes
from itm_models.losses import ContrastiveLoss
from itm_models.train import GSMNBatch, GSMNTrainSet, collate_gsmn, train, train_step, validate
from model_helpers import (check_resume_continues_the_same_run, resolved_cli_args, seeded, synthetic_data_dir,
                           vocab_size_of, write_gsmn_files)

IMG_DIM, K, EMBED, WORD = 32, 12, 32, 16
TINY = dict(img_dim=IMG_DIM, embed_size=EMBED, word_dim=WORD)
pytestmark = pytest.mark.usefixtures("one_thread")       # tiny models: immune to OpenMP spin-waits on a busy box


def _add_gsmn_files(root, split: str, seed: int) -> None:
    """GSMN's files for a synthetic split: its tokenised captions as ids, random parses, pixel boxes and sizes
    (a structured size array, as the released files' fields)."""
    dataset = PrecompDataset(root, split)
    ids = [c.tolist() for c in dataset.captions]
    boxes, sizes = synthetic_boxes(dataset.images.shape[0], K, seed=seed)
    write_gsmn_files(root, split, ids, synthetic_parses([len(c) for c in ids], seed=seed), boxes, sizes)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = synthetic_data_dir(tmp_path_factory, "gsmn_train_data", n_train=24, n_dev=8, n_test=0, n_regions=K,
                             img_dim=IMG_DIM, n_concepts=16, seed=5)
    _add_gsmn_files(out, "train", 1)
    _add_gsmn_files(out, "dev", 2)
    return out


@pytest.fixture(scope="module")
def vocab_size(data_dir):
    return vocab_size_of(data_dir)


def tiny_model(vocab_size: int, seed: int, variant: str = "dense", propagate: bool = False, **kw) -> GSMN:
    return seeded(seed, lambda: GSMN.from_config(GSMNConfig(vocab_size=vocab_size, variant=variant,
                                                            propagate=propagate, **TINY, **kw)))


def sims_of(model, data_dir, split: str = "dev"):
    dataset, graph = gsmn_split(data_dir, split)
    return torch.from_numpy(similarity_matrix(model, dataset, graph=graph, device="cpu", progress=False))


# ------------------------------------------------------------------------------------------------------------------
# Config
# ------------------------------------------------------------------------------------------------------------------

def test_config_recipes_and_validation():
    assert recipe("f30k") == {"learning_rate": 2e-4, "num_epochs": 30, "lr_update": 15, "batch_size": 64,
                              "lambda_softmax": 20.0}
    assert recipe("coco_precomp") == {"learning_rate": 5e-4, "num_epochs": 20, "lr_update": 5, "batch_size": 32,
                                      "lambda_softmax": 10.0}
    c = GSMNConfig(vocab_size=9)
    assert (c.learning_rate, c.num_epochs, c.lr_update, c.batch_size, c.lambda_softmax, c.margin, c.max_violation,
            c.grad_clip, c.bi_gru, c.variant, c.propagate, c.is_sparse) == \
        (2e-4, 30, 15, 64, 20.0, 0.2, True, 2.0, True, "dense", False, False)
    coco = GSMNConfig.for_dataset("coco", vocab_size=9, variant="sparse", batch_size=16)
    assert (coco.learning_rate, coco.num_epochs, coco.lr_update, coco.batch_size, coco.lambda_softmax,
            coco.is_sparse) == (5e-4, 20, 5, 16, 10.0, True)
    opt = argparse.Namespace(vocab_size=40, is_sparse=True, lambda_softmax=10, batch_size=32, embed_size=64,
                             data_path="x", workers=10)
    from_opt = GSMNConfig.from_opt(opt, propagate=True)
    assert (from_opt.variant, from_opt.propagate, from_opt.lambda_softmax, from_opt.batch_size, from_opt.bi_gru,
            from_opt.max_violation) == ("sparse", True, 10.0, 32, False, False)   # official parser defaults
    for kwargs, match in [(dict(variant="full"), "variant must be one of"),
                          (dict(embed_size=0), "embed_size must be a positive int"),
                          (dict(batch_size=2.5), "batch_size must be a positive int"),
                          (dict(bi_gru="yes"), "bi_gru must be a bool"),
                          (dict(lambda_softmax=-1.0), "lambda_softmax must be a finite number >= 0"),
                          (dict(learning_rate=float("nan")), "learning_rate must be a finite number"),
                          (dict(num_block=8), "num_block=8 entries, which must equal feat_dim=16"),
                          (dict(embed_size=40), "num_block=16 must divide embed_size=40"),
                          (dict(hid_dim=36), "hid_dim=36 must be a multiple"),
                          (dict(out_dim=2), "out_dim must be 1")]:
        with pytest.raises(ValueError, match=match):
            GSMNConfig(vocab_size=9, **kwargs)
    with pytest.raises(ValueError, match="no official GSMN recipe"):
        recipe("cub")
    with pytest.raises(ValueError, match="vocab_size"):
        GSMNConfig.from_opt({"is_sparse": True})
    with pytest.raises(TypeError, match="GSMNConfig"):
        GSMN.from_config({"vocab_size": 9})


def test_model_config_and_official_opt(vocab_size):
    model = GSMN(vocab_size=vocab_size, variant="sparse", propagate=True, lambda_softmax=10.0, **TINY)
    assert model.config == GSMNConfig(vocab_size=vocab_size, variant="sparse", propagate=True, lambda_softmax=10.0,
                                      **TINY)
    opt = argparse.Namespace(vocab_size=vocab_size, is_sparse=False, num_block=16, feat_dim=16, hid_dim=32,
                             out_dim=1, bi_gru=True, lambda_softmax=20.0, batch_size=48, **TINY)
    official = build_gsmn_from_official({"opt": opt, "model": tiny_model(vocab_size, 0).official_state_dicts()})
    assert official.official_opt["batch_size"] == 48 and official.config.variant == "dense"


@pytest.mark.parametrize("variant, propagate", [("dense", False), ("sparse", True)])
def test_save_load_round_trip_gives_identical_sims(data_dir, vocab_size, tmp_path, variant, propagate):
    model = tiny_model(vocab_size, 3, variant, propagate, lambda_softmax=10.0, batch_size=8).eval()
    with torch.no_grad():                                     # non-trivial head weights
        for p in model.sim.parameters():
            p.add_(0.1 * torch.rand(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    save_checkpoint(model, tmp_path / "m.pt", epoch=2, best_rsum=1.5)
    loaded = load_checkpoint(tmp_path / "m.pt")
    assert isinstance(loaded.model, GSMN) and not loaded.model.training and loaded.epoch == 2
    assert loaded.model.config == model.config and loaded.model.config.batch_size == 8
    assert (loaded.model.sim.variant, loaded.model.sim.propagate, loaded.model.sim.lambda_softmax) == \
        (variant, propagate, 10.0)
    assert torch.equal(sims_of(loaded.model, data_dir), sims_of(model, data_dir))


# ------------------------------------------------------------------------------------------------------------------
# Batches and training steps
# ------------------------------------------------------------------------------------------------------------------

def test_batches_carry_each_captions_boxes_size_and_parse(data_dir, vocab_size):
    train_set = GSMNTrainSet(data_dir, "train")
    graph = train_set.graph
    batch = collate_gsmn([train_set[i] for i in (7, 0, 33, 12, 64)])
    assert isinstance(batch, GSMNBatch) and batch.boxes.shape == (5, K, 4) and batch.image_sizes.shape == (5, 2)
    assert batch.lengths.tolist() == sorted(batch.lengths.tolist(), reverse=True)
    for j, index in enumerate(batch.indices.tolist()):
        img = index // 5
        assert batch.ids[j, :batch.lengths[j]].tolist() == graph["caption_ids"][index]
        assert torch.equal(batch.boxes[j], torch.from_numpy(graph["boxes"][img]))          # pixels, untouched
        assert batch.image_sizes[j].tolist() == graph["image_sizes"][img].tolist()
        assert batch.parses[j] == graph["parses"][index]
    assert np.array_equal(train_set.boxes, np.load(data_dir / "train_ims_bbx.npy"))       # never divided in place
    # the step's scores use boxes normalised once by their own image's size
    model = tiny_model(vocab_size, 0, "sparse", True).eval()
    with torch.no_grad():
        got = model(batch.images, batch.ids, batch.lengths, batch.boxes, batch.image_sizes, batch.parses)
        want = model(batch.images, batch.ids, batch.lengths,
                     normalize_boxes(batch.boxes, batch.image_sizes), None, batch.parses)
    assert torch.equal(got, want)


@pytest.mark.parametrize("variant, propagate", [("dense", False), ("sparse", False), ("sparse", True)])
def test_training_steps_reduce_the_loss(data_dir, vocab_size, variant, propagate):
    """25 steps on one batch of 12 distinct images, the official grad clip. The summed hinge loss (not hardest
    negatives): at d = 32 (16 blocks of 2 dimensions) the hardest-negative loss of a batch this small sits near its
    collapse value 2 B margin for many steps, which says little about whether the model learns."""
    model = tiny_model(vocab_size, 4, variant, propagate).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    criterion = ContrastiveLoss(0.2, max_violation=False)
    train_set = GSMNTrainSet(data_dir, "train")
    batch = collate_gsmn([train_set[5 * i] for i in range(12)])
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = [train_step(model, optimizer, criterion, batch, grad_clip=2.0) for _ in range(25)]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < 0.2 * np.mean(losses[:3]), losses
    frozen = [k for k, v in model.named_parameters() if torch.equal(v, before[k])]
    assert not frozen, frozen                                 # the gradient reaches encoders and both graphs
    with pytest.raises(TypeError, match="collate_gsmn"):
        train_step(model, optimizer, criterion, tuple(batch[:4]))


# ------------------------------------------------------------------------------------------------------------------
# CLI, checkpoints, resume
# ------------------------------------------------------------------------------------------------------------------

def test_cli_defaults_and_refusals():
    resolved = resolved_cli_args
    a = resolved("--model", "gsmn")
    assert (a.variant, a.propagate, a.lambda_softmax, a.lr, a.epochs, a.lr_update, a.batch_size, a.bi_gru,
            a.max_violation, a.allow_pickle, a.direction, a.module) == \
        ("dense", False, 20.0, 2e-4, 30, 15, 64, True, True, False, None, None)
    a = resolved("--model", "gsmn", "--recipe", "coco", "--variant", "sparse", "--propagate", "--batch-size", "8")
    assert (a.variant, a.propagate, a.lambda_softmax, a.lr, a.epochs, a.lr_update, a.batch_size) == \
        ("sparse", True, 10.0, 5e-4, 20, 5, 8)
    assert resolved("--model", "gsmn", "--lambda-softmax", "4").lambda_softmax == 4.0
    a = resolved()                                              # SCAN and SGRAF defaults unchanged
    assert (a.batch_size, a.lr, a.lambda_softmax, a.variant) == (128, 2e-4, 9.0, None)
    assert (resolved("--model", "sgraf").batch_size, resolved("--model", "sgraf").lr) == (128, 2e-4)
    for argv in (["--model", "gsmn", "--direction", "i2t"], ["--model", "gsmn", "--module", "SAF"],
                 ["--model", "gsmn", "--backend", "cpu"], ["--model", "gsmn", "--sim-dim", "8"],
                 ["--variant", "sparse"], ["--propagate"], ["--model", "sgraf", "--recipe", "coco"],
                 ["--model", "sgraf", "--lambda-softmax", "4"], ["--allow-pickle"]):
        with pytest.raises(SystemExit):
            resolved(*argv)


def test_cli_trains_one_epoch_and_the_checkpoint_reloads(data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    result = main(["--data", str(data_dir), "--out", str(out), "--model", "gsmn", "--variant", "sparse",
                   "--propagate", "--epochs", "1", "--batch-size", "16", "--embed-size", str(EMBED), "--word-dim",
                   str(WORD), "--img-dim", str(IMG_DIM), "--device", "cpu", "--no-progress"])
    assert result["epochs"] == 1 and result["history"][0]["steps"] == 8 and "rsum" in capsys.readouterr().out
    loaded = load_checkpoint(out / "checkpoint_best.pt")
    model = loaded.model
    assert isinstance(model, GSMN) and not model.training and loaded.epoch == 1 and loaded.optimizer_state
    assert (model.config.variant, model.config.propagate, model.config.lambda_softmax, model.config.batch_size,
            model.config.lr_update) == ("sparse", True, 20.0, 16, 15)
    # the checkpoint holds the weights the dev rsum was measured on
    dev, graph = gsmn_split(data_dir, "dev", max_captions=OFFICIAL_DEV_CAPTIONS)
    assert validate(model, dev, device="cpu", graph=graph)["rsum"] == loaded.best_rsum == result["best_rsum"]
    sims = sims_of(model, data_dir)
    assert recall(sims.numpy())["rsum"] == loaded.best_rsum
    save_checkpoint(model, tmp_path / "again.pt")
    assert torch.equal(sims_of(load_checkpoint(tmp_path / "again.pt").model, data_dir), sims)
    assert torch.equal(sims_of(load_checkpoint(out / "checkpoint_last.pt").model, data_dir), sims)
    # an ensemble of trained members validates as the mean of their matrices
    ens = GSMNEnsemble([model, tiny_model(model.config.vocab_size, 9)])
    mean = (sims.numpy() + sims_of(ens.models[1], data_dir).numpy()) / 2
    assert validate(ens, dev, device="cpu", graph=graph)["rsum"] == recall(mean)["rsum"]
    with pytest.raises(ValueError, match="needs graph="):
        validate(model, dev, device="cpu")
    # itm-eval scores our GSMN checkpoints (the dev split here) with the same result
    metrics = evaluate([str(out / "checkpoint_best.pt")], data_dir, "dev", device="cpu", progress=False)
    assert metrics["rsum"] == loaded.best_rsum


def test_resume_continues_the_same_run(data_dir, vocab_size, tmp_path):
    cfg = dict(vocab_size=vocab_size, variant="dense", batch_size=24, learning_rate=2e-3, lr_update=1, **TINY)
    run = check_resume_continues_the_same_run(lambda epochs: GSMNConfig(num_epochs=epochs, **cfg), data_dir,
                                              tmp_path, lambda model: sims_of(model, data_dir))
    with pytest.raises(CheckpointError, match=r"model options differ.*variant"):
        train(GSMNConfig(num_epochs=3, **{**cfg, "variant": "sparse"}), data_dir, tmp_path / "cut", **run,
              resume=True)


def test_cli_needs_only_the_gsmn_files(data_dir, tmp_path):
    """No captions file and no vocabulary: vocab_size is the largest caption id + 1; a missing GSMN file is named."""
    bare = tmp_path / "bare"
    bare.mkdir()
    for split in ("train", "dev"):
        for suffix in ("ims.npy", "ims_bbx.npy", "ims_size.npy", "precaps_stan.txt", "caps.json"):
            shutil.copy(data_dir / f"{split}_{suffix}", bare / f"{split}_{suffix}")
    argv = ["--data", str(bare), "--model", "gsmn", "--epochs", "1", "--batch-size", "40", "--embed-size", str(EMBED),
            "--word-dim", str(WORD), "--img-dim", str(IMG_DIM), "--device", "cpu", "--no-progress"]
    main(argv + ["--out", str(tmp_path / "run")])
    top = max(max(c) for split in ("train", "dev") for c in gsmn_split(bare, split)[1]["caption_ids"])
    assert load_checkpoint(tmp_path / "run" / "checkpoint_best.pt").model.config.vocab_size == top + 1
    (bare / "dev_caps.json").unlink()
    with pytest.raises(DataFormatError, match="dev_caps.json"):
        main(argv + ["--out", str(tmp_path / "run2")])
