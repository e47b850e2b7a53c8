"""GSMN evaluated end to end from a data folder: similarity_matrix with the split's graph inputs (correct and released
box handling) against GSMN.sims computed directly, ensembles, PrecompDataset's caption_ids, and itm-eval on an
official-layout GSMN checkpoint (GSMN files read automatically, clear errors when they are missing)."""
from __future__ import annotations

import argparse
import json
import shutil

import numpy as np
import pytest
import torch

from itm_models.data import DataFormatError, PrecompDataset
from itm_models.cli.eval import main as eval_main
from itm_models.eval.similarity import gsmn_split, image_rows, is_graph_model, similarity_matrix
from itm_models.gsmn import GSMN, GSMNEnsemble
from itm_models.data.gsmn import load_gsmn_split
from itm_models.gsmn.geometry import official_eval_boxes
from itm_models.eval.metrics import recall
from itm_models.scan import SCAN, SCANConfig
from itm_models.data.synthetic import synthetic_boxes, synthetic_parses
from conftest import assert_close_report
from model_helpers import write_gsmn_files

N_IMG, K, IMG_DIM, VOCAB = 6, 6, 32, 40
SIZES = dict(vocab_size=VOCAB, embed_size=64, word_dim=16, img_dim=IMG_DIM)
pytestmark = pytest.mark.usefixtures("one_thread")       # tiny models: immune to OpenMP spin-waits on a busy box


def _write_split(root, split, *, seed=0, rows_per_caption=False):
    """A tiny GSMN data folder: features, caption ids (<start>=1 ... <end>=2), parses, pixel boxes, sizes."""
    rng = np.random.default_rng(seed)
    n_cap = 5 * N_IMG
    rows = n_cap if rows_per_caption else N_IMG
    np.save(root / f"{split}_ims.npy", rng.standard_normal((rows, K, IMG_DIM)).astype(np.float32))
    lens = rng.integers(4, 10, size=n_cap)
    ids = [[1] + rng.integers(4, VOCAB, size=n - 2).tolist() + [2] for n in lens]
    boxes, sizes = synthetic_boxes(N_IMG, K, seed=seed)
    if rows_per_caption:
        boxes, sizes = np.repeat(boxes, 5, axis=0), np.repeat(sizes, 5, axis=0)
    write_gsmn_files(root, split, ids, synthetic_parses(lens, seed=seed), boxes, sizes)
    return ids


def _official_checkpoint(model: GSMN, path, *, is_sparse: bool, batch_size: int):
    opt = argparse.Namespace(data_name="f30k_precomp", is_sparse=is_sparse, num_block=16, feat_dim=16, hid_dim=32,
                             out_dim=1, vocab_size=VOCAB, embed_size=64, word_dim=16, img_dim=IMG_DIM, bi_gru=True,
                             num_layers=1, lambda_softmax=20.0, batch_size=batch_size, margin=0.2)
    torch.save({"epoch": 3, "model": model.official_state_dicts(), "best_rsum": 12.5, "opt": opt, "Eiters": 99},
               path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_thread):
    root = tmp_path_factory.mktemp("gsmn")
    data = root / "data"
    data.mkdir()
    _write_split(data, "test")
    torch.manual_seed(0)
    dense = GSMN(variant="dense", **SIZES).eval()
    sparse = GSMN(variant="sparse", **SIZES).eval()
    paper = GSMN(variant="sparse", propagate=True, **SIZES).eval()   # boxes and parses both change its scores
    ckpts = {"dense": root / "dense.pth.tar", "sparse": root / "sparse.pth.tar"}
    _official_checkpoint(dense, ckpts["dense"], is_sparse=False, batch_size=8)
    _official_checkpoint(sparse, ckpts["sparse"], is_sparse=True, batch_size=8)
    return data, {"dense": dense, "sparse": sparse, "paper": paper}, ckpts


def _direct(model, dataset, graph, *, official=False, batch_size=64):
    """GSMN.sims on every encoded image and caption at once, boxes of the distinct images."""
    n_img = len(dataset.captions) // 5
    rows = image_rows(n_img, dataset.im_div)
    with torch.no_grad():
        img = model.encode_images(torch.from_numpy(np.array(dataset.images[rows], dtype=np.float32)))
        lens = torch.tensor([len(c) for c in dataset.captions])
        ids = torch.zeros(len(lens), int(lens.max()), dtype=torch.long)
        for j, c in enumerate(dataset.captions):
            ids[j, : len(c)] = torch.as_tensor(c)
        cap = model.encode_captions(ids, lens)
        if official:
            boxes = official_eval_boxes(graph["boxes"][rows], graph["image_sizes"][rows], batch_size=batch_size)
            return model.sims(img, cap, lens, boxes, None, graph["parses"])
        return model.sims(img, cap, lens, graph["boxes"][rows], graph["image_sizes"][rows], graph["parses"])


@pytest.mark.parametrize("name", ["dense", "sparse", "paper"])
def test_similarity_matrix_matches_direct_sims(tiny, name):
    data, models, _ = tiny
    model = models[name]
    dataset, graph = gsmn_split(data, "test", img_dim=IMG_DIM, vocab_size=VOCAB)
    sims = similarity_matrix(model, dataset, graph=graph, caption_chunk=7, batch_size=4, progress=False)
    assert sims.shape == (N_IMG, 5 * N_IMG) and sims.dtype == np.float32
    assert_close_report(torch.from_numpy(sims), _direct(model, dataset, graph), atol=1e-5, rtol=1e-5,
                        what=f"{name} correct boxes")
    official = similarity_matrix(model, dataset, graph=graph, official_boxes=True, caption_chunk=7, batch_size=4,
                                 progress=False)
    assert_close_report(torch.from_numpy(official), _direct(model, dataset, graph, official=True), atol=1e-5,
                        rtol=1e-5, what=f"{name} official boxes")
    assert np.abs(official - sims).max() > 1e-4            # the released box handling does move the scores


def test_official_boxes_batch_size_and_fold5_reach_the_boxes(tiny):
    data, models, _ = tiny
    model = models["paper"]
    dataset, graph = gsmn_split(data, "test")
    kw = dict(graph=graph, official_boxes=True, progress=False)
    b8 = similarity_matrix(model, dataset, official_batch_size=8, **kw)
    assert_close_report(torch.from_numpy(b8), _direct(model, dataset, graph, official=True, batch_size=8),
                        atol=1e-5, rtol=1e-5, what="batch 8")
    assert np.abs(b8 - similarity_matrix(model, dataset, **kw)).max() > 0      # batch boundaries cut images here
    fold5 = similarity_matrix(model, dataset, fold5=True, **kw)
    boxes = official_eval_boxes(graph["boxes"], graph["image_sizes"], fold5=True)
    with torch.no_grad():
        lens = torch.tensor([len(c) for c in dataset.captions])
        ids = torch.zeros(len(lens), int(lens.max()), dtype=torch.long)
        for j, c in enumerate(dataset.captions):
            ids[j, : len(c)] = torch.as_tensor(c)
        img = model.encode_images(torch.from_numpy(np.array(dataset.images, dtype=np.float32)))
        want = model.sims(img, model.encode_captions(ids, lens), lens, boxes, None, graph["parses"])
    assert_close_report(torch.from_numpy(fold5), want, atol=1e-5, rtol=1e-5, what="fold5 rows")


def test_ensemble_and_errors(tiny):
    data, models, _ = tiny
    dataset, graph = gsmn_split(data, "test")
    ens = GSMNEnsemble([models["dense"], models["sparse"]]).eval()
    assert is_graph_model(ens) and is_graph_model(models["dense"])
    got = similarity_matrix(ens, dataset, graph=graph, caption_chunk=11, progress=False)
    want = (_direct(models["dense"], dataset, graph) + _direct(models["sparse"], dataset, graph)) / 2
    assert_close_report(torch.from_numpy(got), want, atol=1e-5, rtol=1e-5, what="ensemble")
    with pytest.raises(ValueError, match="graph="):
        similarity_matrix(models["dense"], dataset, progress=False)
    scan = SCAN(SCANConfig(vocab_size=VOCAB, img_dim=IMG_DIM, word_dim=8, embed_size=16))
    assert not is_graph_model(scan)
    with pytest.raises(ValueError, match="GSMN models only"):
        similarity_matrix(scan, dataset, official_boxes=True, progress=False)
    shuffled = PrecompDataset(data, "test", caption_ids=graph["caption_ids"][::-1])
    with pytest.raises(ValueError, match="caption_ids"):
        similarity_matrix(models["dense"], shuffled, graph=graph, progress=False)


def test_row_per_caption_split(tmp_path):
    """A feature (and box) row per caption, as Flickr30K dev: image k = row 5k; the released pairing is refused."""
    _write_split(tmp_path, "dev", seed=3, rows_per_caption=True)
    torch.manual_seed(1)
    model = GSMN(variant="sparse", propagate=True, **SIZES).eval()
    dataset, graph = gsmn_split(tmp_path, "dev")
    assert dataset.im_div == 1
    sims = similarity_matrix(model, dataset, graph=graph, caption_chunk=9, progress=False)
    assert_close_report(torch.from_numpy(sims), _direct(model, dataset, graph), atol=1e-5, rtol=1e-5, what="dev")
    with pytest.raises(ValueError, match="feature row per caption"):
        similarity_matrix(model, dataset, graph=graph, official_boxes=True, progress=False)


def test_precomp_dataset_caption_ids(tiny):
    data, _, _ = tiny
    ids = load_gsmn_split(data, "test")["caption_ids"]
    ds = PrecompDataset(data, "test", caption_ids=ids)          # no test_caps.txt, no vocab.json in the folder
    assert ds.vocab is None and ds.im_div == 5 and len(ds) == 30
    image, caption, index, img_id = ds[12]
    assert caption.tolist() == ids[12] and img_id == 2 and image.shape == (K, IMG_DIM)
    assert len(PrecompDataset(data, "test", caption_ids=ids, max_captions=10)) == 10
    with pytest.raises(DataFormatError, match="caption_ids\\[0\\].*vocabulary size 5"):
        PrecompDataset(data, "test", caption_ids=ids, vocab_size=5)
    with pytest.raises(DataFormatError, match="caption_ids\\[1\\]"):
        PrecompDataset(data, "test", caption_ids=[ids[0], [], *ids[2:]])
    with pytest.raises(DataFormatError, match="31 captions"):
        PrecompDataset(data, "test", caption_ids=ids + [ids[0]])
    with pytest.raises(DataFormatError, match="precaps_stan.txt line 1.*vocabulary size 5"):
        gsmn_split(data, "test", vocab_size=5)


def test_cli_official_gsmn_checkpoints(tiny, tmp_path, capsys):
    data, models, ckpts = tiny
    out = tmp_path / "sims.npy"
    base = ["--data", str(data), "--split", "test", "--no-progress", "--save-sims", str(out)]
    assert eval_main(["--checkpoint", str(ckpts["sparse"])] + base) == 0
    printed = capsys.readouterr().out
    dataset, graph = gsmn_split(data, "test")
    want = _direct(models["sparse"], dataset, graph)
    sims = np.load(out)
    assert_close_report(torch.from_numpy(sims), want, atol=1e-5, rtol=1e-5, what="itm-eval sparse")
    assert "rsum" in printed and "time:" in printed and f"{recall(sims)['rsum']:.2f}" in printed

    # --official-boxes: the checkpoint's opt.batch_size (8 here, cutting images' captions) decides the divisions
    assert eval_main(["--checkpoint", str(ckpts["sparse"]), "--official-boxes"] + base) == 0
    printed = capsys.readouterr().out
    want = _direct(models["sparse"], dataset, graph, official=True, batch_size=8)
    assert_close_report(torch.from_numpy(np.load(out)), want, atol=1e-5, rtol=1e-5, what="itm-eval official")
    assert "released GSMN box handling" in printed and f"{recall(np.load(out))['rsum']:.2f}" in printed

    # the dense + sparse ensemble
    assert eval_main(["--checkpoint", str(ckpts["dense"]), "--ensemble", str(ckpts["sparse"])] + base) == 0
    capsys.readouterr()
    want = (_direct(models["dense"], dataset, graph) + _direct(models["sparse"], dataset, graph)) / 2
    assert_close_report(torch.from_numpy(np.load(out)), want, atol=1e-5, rtol=1e-5, what="itm-eval ensemble")


def test_cli_pickled_sizes_need_allow_pickle(tiny, tmp_path, capsys):
    data, _, ckpts = tiny
    folder = tmp_path / "released"
    shutil.copytree(data, folder)
    sizes = np.load(folder / "test_ims_size.npy")
    released = np.empty(len(sizes), dtype=object)
    released[:] = [{"image_w": int(s["image_w"]), "image_h": int(s["image_h"])} for s in sizes]
    np.save(folder / "test_ims_size.npy", released, allow_pickle=True)
    argv = ["--checkpoint", str(ckpts["dense"]), "--data", str(folder), "--no-progress"]
    assert eval_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("itm-eval: error:") and "--allow-pickle" in err and "\n" not in err
    assert eval_main(argv + ["--allow-pickle", "--save-sims", str(tmp_path / "a.npy")]) == 0
    capsys.readouterr()
    assert eval_main(["--checkpoint", str(ckpts["dense"]), "--data", str(data), "--no-progress", "--save-sims",
                      str(tmp_path / "b.npy")]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"))


@pytest.mark.parametrize("missing", ["test_caps.json", "test_ims_bbx.npy", "test_ims_size.npy",
                                     "test_precaps_stan.txt"])
def test_cli_missing_gsmn_file_is_a_clear_error(tiny, tmp_path, capsys, missing):
    data, _, ckpts = tiny
    folder = tmp_path / "d"
    shutil.copytree(data, folder)
    (folder / missing).unlink()
    assert eval_main(["--checkpoint", str(ckpts["dense"]), "--data", str(folder), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("itm-eval: error:") and missing in err and "\n" not in err


def test_cli_official_boxes_needs_gsmn(tmp_path, capsys):
    from itm_models.checkpoints import save_checkpoint
    from itm_models.data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(tmp_path / "d", n_train=5, n_dev=2, n_test=4, img_dim=16, n_regions=4, n_concepts=10)
    from itm_models.data.tokenize import Vocabulary

    vocab = Vocabulary.load(tmp_path / "d" / "vocab.json")
    save_checkpoint(SCAN(SCANConfig(vocab_size=len(vocab), img_dim=16, word_dim=8, embed_size=8)), tmp_path / "s.pt")
    assert eval_main(["--checkpoint", str(tmp_path / "s.pt"), "--data", str(tmp_path / "d"), "--official-boxes",
                      "--no-progress"]) == 2
    assert "needs a GSMN checkpoint" in capsys.readouterr().err
