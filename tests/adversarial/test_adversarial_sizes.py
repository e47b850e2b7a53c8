"""Size arguments of the streaming, top-k, retrieval and distributed evaluation paths (issue 14): every count,
chunk, batch, k or world size that is 0, negative, a float (also an integral one), a bool, a string or beyond its
bound raises a ValueError or TypeError naming the argument, at the public entry point and before any work (the
tile functions and models here fail the test if they are ever called); the CLI flags end with one line and exit
code 2."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from itm_kernels._common.validation import check_size
from itm_kernels.xattn_topk import xattn_topk
from itm_models.eval.distributed import read_world
from itm_models.eval.distributed_eval import evaluate_distributed
from itm_models.eval.metrics import recall, recall_fold5
from itm_models.eval.streaming import (model_topk_sharded, save_sims_npy, similarity_topk, streaming_recall,
                                       streaming_topk)
from itm_models.retrieval import shortlist_pooled, two_stage

ROOT = Path(__file__).resolve().parents[2]
BAD = [0, -1, 1.5, 2.0, True, "3", np.float64(2.0), torch.tensor(2)]
BAD_IDS = ["zero", "negative", "float", "integral_float", "bool", "str", "numpy_float", "tensor"]


def no_work(*args, **kwargs):
    raise AssertionError("work started before the size arguments were checked")


class NoWorkModel:
    sims = staticmethod(no_work)
    topk = staticmethod(no_work)

    def eval(self):
        raise AssertionError("the model was touched before the size arguments were checked")


def _embeddings():
    g = torch.Generator().manual_seed(0)
    return torch.randn(4, 3, 8, generator=g), torch.randn(8, 2, 8, generator=g), torch.tensor([2] * 8)


def raises_naming(name, call):
    with pytest.raises((ValueError, TypeError)) as info:
        call()
    assert name in str(info.value), f"the error does not name {name!r}: {info.value}"
    return str(info.value)


# entry point -> (size argument, call taking that argument's value)
def _cases(tmp_path):
    img, cap, lens = _embeddings()
    model = NoWorkModel()
    sims = np.zeros((2, 10))
    return {
        "streaming_topk.n_img": ("n_img", lambda v: streaming_topk(no_work, v, 10, 1)),
        "streaming_topk.n_cap": ("n_cap", lambda v: streaming_topk(no_work, 2, v, 1)),
        "streaming_topk.k": ("k", lambda v: streaming_topk(no_work, 2, 10, v)),
        "streaming_topk.img_chunk": ("img_chunk", lambda v: streaming_topk(no_work, 2, 10, 1, img_chunk=v)),
        "streaming_topk.cap_chunk": ("cap_chunk", lambda v: streaming_topk(no_work, 2, 10, 1, cap_chunk=v)),
        "streaming_recall.n_img": ("n_img", lambda v: streaming_recall(no_work, v)),
        "streaming_recall.captions_per_image": ("captions_per_image", lambda v: streaming_recall(no_work, 2, v)),
        "streaming_recall.img_chunk": ("img_chunk", lambda v: streaming_recall(no_work, 2, img_chunk=v)),
        "streaming_recall.cap_chunk": ("cap_chunk", lambda v: streaming_recall(no_work, 2, cap_chunk=v)),
        "similarity_topk.k": ("k", lambda v: similarity_topk(model, img, cap, lens, v)),
        "similarity_topk.img_chunk": ("img_chunk", lambda v: similarity_topk(model, img, cap, lens, 1, img_chunk=v)),
        "similarity_topk.cap_chunk": ("cap_chunk", lambda v: similarity_topk(model, img, cap, lens, 1, cap_chunk=v)),
        "model_topk_sharded.k": ("k", lambda v: model_topk_sharded(model, img, cap, lens, v)),
        "save_sims_npy.n_img": ("n_img", lambda v: save_sims_npy(no_work, v, 10, tmp_path / "s.npy")),
        "save_sims_npy.n_cap": ("n_cap", lambda v: save_sims_npy(no_work, 2, v, tmp_path / "s.npy")),
        "save_sims_npy.img_chunk": ("img_chunk", lambda v: save_sims_npy(no_work, 2, 10, tmp_path / "s.npy",
                                                                         img_chunk=v)),
        "save_sims_npy.cap_chunk": ("cap_chunk", lambda v: save_sims_npy(no_work, 2, 10, tmp_path / "s.npy",
                                                                         cap_chunk=v)),
        "xattn_topk.k": ("k", lambda v: xattn_topk(img, cap, lens, v)),
        "xattn_topk.query_chunk": ("query_chunk", lambda v: xattn_topk(img, cap, lens, 1, query_chunk=v)),
        "xattn_topk.gallery_chunk": ("gallery_chunk", lambda v: xattn_topk(img, cap, lens, 1, gallery_chunk=v)),
        "shortlist_pooled.n": ("n", lambda v: shortlist_pooled(img, cap, lens, v)),
        "shortlist_pooled.chunk": ("chunk", lambda v: shortlist_pooled(img, cap, lens, 1, chunk=v)),
        "two_stage.shortlist": ("shortlist", lambda v: two_stage(model, img, cap, lens, shortlist=v, k=1)),
        "two_stage.k": ("k", lambda v: two_stage(model, img, cap, lens, shortlist=2, k=v)),
        "evaluate_distributed.batch_size": ("batch_size", lambda v: evaluate_distributed([model], [None],
                                                                                          batch_size=v)),
        "evaluate_distributed.img_chunk": ("img_chunk", lambda v: evaluate_distributed([model], [None], img_chunk=v)),
        "evaluate_distributed.cap_chunk": ("cap_chunk", lambda v: evaluate_distributed([model], [None], cap_chunk=v)),
        "evaluate_distributed.captions_per_image": ("captions_per_image", lambda v: evaluate_distributed(
            [model], [None], captions_per_image=v)),
        "recall.captions_per_image": ("captions_per_image", lambda v: recall(sims, v)),
        "recall_fold5.n_folds": ("n_folds", lambda v: recall_fold5(np.zeros((5, 25)), 5, v)),
    }


CASE_NAMES = list(_cases(Path("/nonexistent")))


@pytest.mark.parametrize("value", BAD, ids=BAD_IDS)
@pytest.mark.parametrize("case", CASE_NAMES)
def test_bad_sizes_raise_naming_the_argument_before_any_work(case, value, tmp_path):
    name, call = _cases(tmp_path)[case]
    raises_naming(name, lambda: call(value))
    assert not (tmp_path / "s.npy").exists(), "save_sims_npy created its file before checking its sizes"


# k, shortlist, n: at most the gallery size (images: 4, captions: 8 in _embeddings; 10 captions in streaming_topk)
@pytest.mark.parametrize("case, value", [("streaming_topk.k", 11), ("similarity_topk.k", 9),
                                         ("model_topk_sharded.k", 9), ("xattn_topk.k", 9),
                                         ("shortlist_pooled.n", 5), ("two_stage.shortlist", 5),
                                         ("two_stage.k", 3)])
def test_k_beyond_the_gallery_is_refused(case, value, tmp_path):
    name, call = _cases(tmp_path)[case]
    raises_naming(name, lambda: call(value))


def test_good_sizes_still_run():
    """The checks accept every valid form (numpy ints included) and the paths run: a control for the tests above."""
    img, cap, lens = _embeddings()
    tile = lambda i0, i1, c0, c1: img[i0:i1, 0] @ cap[c0:c1, 0].t()          # noqa: E731
    v, i = streaming_topk(tile, 4, 8, np.int64(3), img_chunk=np.int32(3), cap_chunk=5)
    full = img[:, 0] @ cap[:, 0].t()
    torch.testing.assert_close(v, full.double().topk(3, dim=1).values)
    v, i = shortlist_pooled(img, cap, lens, 2, chunk=3)
    assert v.shape == (8, 2)
    assert check_size("x", np.int64(4), maximum=4) == 4


@pytest.mark.parametrize("env, name", [
    (dict(RANK="0", WORLD_SIZE="0"), "WORLD_SIZE"), (dict(RANK="0", WORLD_SIZE="-2"), "WORLD_SIZE"),
    (dict(RANK="0", WORLD_SIZE="1.5"), "WORLD_SIZE"), (dict(RANK="2", WORLD_SIZE="2"), "RANK"),
    (dict(RANK="-1", WORLD_SIZE="2"), "RANK"), (dict(RANK="x", WORLD_SIZE="2"), "RANK"),
    (dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="-1"), "LOCAL_RANK"), (dict(WORLD_SIZE="2"), "RANK")])
def test_bad_world_sizes_and_ranks(env, name):
    raises_naming(name, lambda: read_world(env))


def _bench_scale():
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "benchmarks" / "bench_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _exits_with_one_line(main, argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and "Traceback" not in err
    assert flag in err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag, value", [("--repeats", "0"), ("--ranks-size", "-3"), ("--ranks-repeats", "1.5"),
                                         ("--topk-repeats", "x"), ("--ranks-workloads", "bogus")])
def test_bench_scale_flags_end_with_one_line(flag, value, capsys):
    _exits_with_one_line(_bench_scale().main, [flag, value], flag, capsys)


@pytest.mark.parametrize("value", ["0", "-3", "1.5", "x"])
def test_itm_eval_batch_size_flag_ends_with_one_line(value, tmp_path, capsys):
    from itm_models.cli.eval import main
    _exits_with_one_line(main, ["--checkpoint", str(tmp_path / "m.pt"), "--data", str(tmp_path), "--distributed",
                                "--batch-size", value], "--batch-size", capsys)


def test_evaluate_checks_batch_sizes_before_loading(tmp_path):
    from itm_models.cli.eval import evaluate
    raises_naming("batch_size", lambda: evaluate([str(tmp_path / "missing.pt")], tmp_path, "test", batch_size=0))
    raises_naming("official_batch_size", lambda: evaluate([str(tmp_path / "missing.pt")], tmp_path, "test",
                                                          official_batch_size=-1))
