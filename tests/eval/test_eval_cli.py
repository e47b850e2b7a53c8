"""itm-eval end to end on a tiny synthetic set; similarity_matrix against a direct computation; clear errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from itm_models.checkpoints import save_checkpoint
from itm_models.data import PrecompDataset
from itm_models.cli.eval import main as eval_main
from itm_models.eval.similarity import image_rows, similarity_matrix
from itm_models.eval.metrics import recall
from itm_models.scan import SCAN, SCANConfig
from itm_models.data.synthetic import make_synthetic_dataset
from itm_models.data.tokenize import Vocabulary
from conftest import assert_close_report, golden_path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    data = root / "data"
    make_synthetic_dataset(data, n_train=10, n_dev=4, n_test=8, img_dim=32, n_regions=6, n_concepts=20, seed=1)
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = SCAN(SCANConfig(vocab_size=len(vocab), img_dim=32, word_dim=12, embed_size=16, bi_gru=True))
    ckpt = root / "model.pt"
    save_checkpoint(model, ckpt)
    return data, ckpt, model.eval()


def test_similarity_matrix_matches_direct_computation(tiny):
    data, _, model = tiny
    dataset = PrecompDataset(data, "test")
    sims = similarity_matrix(model, dataset, caption_chunk=7, batch_size=3, progress=False)
    with torch.no_grad():
        rows = image_rows(len(dataset.captions) // 5, dataset.im_div)
        img_emb = model.encode_images(torch.from_numpy(np.array(dataset.images[rows], dtype=np.float32)))
        lens = torch.tensor([len(c) for c in dataset.captions])
        ids = torch.zeros(len(lens), int(lens.max()), dtype=torch.long)
        for j, c in enumerate(dataset.captions):
            ids[j, : len(c)] = torch.as_tensor(c)
        want = model.sims(img_emb, model.encode_captions(ids, lens), lens)
    assert sims.shape == (8, 40) and sims.dtype == np.float32
    assert_close_report(torch.from_numpy(sims), want, atol=1e-5, rtol=1e-5, what="similarity_matrix")


def test_cli_end_to_end(tiny, tmp_path, capsys):
    data, ckpt, model = tiny
    out = tmp_path / "sims.npy"
    assert eval_main(["--checkpoint", str(ckpt), "--data", str(data), "--split", "test", "--save-sims", str(out),
                      "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "rsum" in printed and "time:" in printed
    sims = np.load(out)
    metrics = recall(sims)
    assert f"{metrics['rsum']:.2f}" in printed
    assert eval_main(["--checkpoint", str(ckpt), "--ensemble", str(ckpt), "--data", str(data), "--split", "test",
                      "--no-progress"]) == 0
    assert f"{metrics['rsum']:.2f}" in capsys.readouterr().out  # the mean of two identical models


def test_cli_official_checkpoint_float64_matches_golden(tmp_path, capsys):
    path = golden_path("scan_checkpoint.pth.tar")
    golden = np.load(golden_path("scan_checkpoint_golden.npz"))
    from itm_models.cli.eval import load_model

    model = load_model(str(path))
    with torch.no_grad():
        img = model.encode_images(torch.from_numpy(golden["images_raw"])).double()
        cap = model.encode_captions(torch.from_numpy(golden["captions_ids"]),
                                    torch.from_numpy(golden["caption_lens"])).double()
        sims = model.sims(img, cap, torch.from_numpy(golden["caption_lens"]))
    assert_close_report(sims, torch.from_numpy(golden["sims"]), atol=1e-6, rtol=1e-6, what="official sims")
    assert recall(sims.numpy())["rsum"] == float(golden["metric_rsum"])


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "missing.pt"], "does not exist"),
    (["--split", "nosuchsplit"], "nosuchsplit"),
])
def test_cli_errors_are_one_line(tiny, capsys, args, words):
    data, ckpt, _ = tiny
    base = {"--checkpoint": str(ckpt), "--data": str(data), "--split": "test"}
    for k, v in zip(args[::2], args[1::2]):
        base[k] = v
    argv = [x for kv in base.items() for x in kv] + ["--no-progress"]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("itm-eval: error:") and words in err and "\n" not in err


def test_cli_refuses_a_checkpoint_that_does_not_fit_the_data(tiny, tmp_path, capsys):
    data, _, _ = tiny
    wrong = SCAN(SCANConfig(vocab_size=10, img_dim=64, word_dim=8, embed_size=8))
    path = tmp_path / "wrong.pt"
    save_checkpoint(wrong, path)
    assert eval_main(["--checkpoint", str(path), "--data", str(data), "--split", "test", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "itm-eval: error:" in err
