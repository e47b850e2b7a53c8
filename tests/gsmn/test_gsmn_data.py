"""Readers of GSMN's extra files (``itm_models.data.gsmn``): boxes, image sizes (structured, plain and the released
pickled object layout), caption ids, parses, and the consistency checks of ``load_gsmn_split``. Tiny files written
into tmp_path."""
from __future__ import annotations

import json

import numpy as np
import pytest

from itm_models.data import DataFormatError
from itm_models.data.gsmn import (load_gsmn_split, load_split_boxes, load_split_caption_ids, load_split_image_sizes,
                                  load_split_parses)

SIZES = [(640, 480), (333, 500)]


def pixel_boxes(n_img: int = 2, K: int = 3, dtype=np.float32) -> np.ndarray:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 200, (n_img, K, 2))
    return np.concatenate([xy, xy + rng.uniform(1, 100, (n_img, K, 2))], axis=-1).astype(dtype)


def structured_sizes(sizes=SIZES) -> np.ndarray:
    out = np.zeros(len(sizes), dtype=[("image_w", np.int64), ("image_h", np.int64)])
    out["image_w"], out["image_h"] = [w for w, _ in sizes], [h for _, h in sizes]
    return out


def object_sizes(sizes=SIZES) -> np.ndarray:
    out = np.empty(len(sizes), dtype=object)
    for i, (w, h) in enumerate(sizes):
        out[i] = {"image_w": w, "image_h": h}
    return out


CAPTIONS = ["1,2,3", "4,5", "6,7,8,9", "10", "11,12", "3,2,1", "0,4", "5,6,7", "8", "9,9,9"]
PARSES = [[[0, 2], [2, 1], [2, 3]], [[0, 1], [1, 2]], [[0, 1]], [], [[0, 2], [2, 1]],
          [[0, 3], [3, 1], [3, 2]], [[0, 1], [1, 2]], [[0, 2]], [[0, 1]], [[0, 1], [1, 2], [1, 3]]]


def write_split(root, split="test", *, boxes=None, sizes=None, captions=None, parses=None):
    np.save(root / f"{split}_ims_bbx.npy", pixel_boxes() if boxes is None else boxes)
    np.save(root / f"{split}_ims_size.npy", structured_sizes() if sizes is None else sizes,
            allow_pickle=True)
    (root / f"{split}_precaps_stan.txt").write_text("\n".join(CAPTIONS if captions is None else captions) + "\n")
    (root / f"{split}_caps.json").write_text(json.dumps(PARSES if parses is None else parses))
    return root


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_boxes(tmp_path, dtype):
    boxes = pixel_boxes(dtype=dtype)
    np.save(tmp_path / "test_ims_bbx.npy", boxes)
    got = load_split_boxes(tmp_path, "test")
    assert got.dtype == dtype and np.array_equal(got, boxes)       # dtype kept: it decides official_eval_boxes


@pytest.mark.parametrize("bad, message", [
    (pixel_boxes()[..., :3], r"expected a floating \(rows, K, 4\) array"),
    (pixel_boxes()[0], r"expected a floating \(rows, K, 4\) array"),
    (pixel_boxes().astype(np.int64), r"expected a floating \(rows, K, 4\) array"),
    (pixel_boxes()[..., [2, 1, 0, 3]], "x2 >= x1"),
    (pixel_boxes()[..., [0, 3, 2, 1]], "y2 >= y1"),
    (np.where(np.arange(4) == 1, np.nan, pixel_boxes()).astype(np.float32), "finite"),
])
def test_bad_boxes(tmp_path, bad, message):
    np.save(tmp_path / "test_ims_bbx.npy", bad)
    with pytest.raises(DataFormatError, match=message) as info:
        load_split_boxes(tmp_path, "test")
    assert "test_ims_bbx.npy" in str(info.value)


def test_boxes_missing_or_pickled(tmp_path):
    with pytest.raises(DataFormatError, match="GSMN file not found.*test_ims_bbx.npy"):
        load_split_boxes(tmp_path, "test")
    np.save(tmp_path / "test_ims_bbx.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataFormatError, match="test_ims_bbx.npy is not a readable numeric .npy array"):
        load_split_boxes(tmp_path, "test")
    (tmp_path / "test_ims_bbx.npy").write_bytes(b"not a npy file")
    with pytest.raises(DataFormatError, match="test_ims_bbx.npy"):
        load_split_boxes(tmp_path, "test")


@pytest.mark.parametrize("layout", ["structured", "plain_int", "plain_float"])
def test_image_sizes(tmp_path, layout):
    sizes = {"structured": structured_sizes(), "plain_int": np.array(SIZES, dtype=np.int32),
             "plain_float": np.array(SIZES, dtype=np.float64)}[layout]
    np.save(tmp_path / "test_ims_size.npy", sizes)
    got = load_split_image_sizes(tmp_path, "test")
    assert got.dtype == np.int64 and got.shape == (2, 2)
    assert got.tolist() == [list(s) for s in SIZES]


def test_image_sizes_released_object_layout_needs_allow_pickle(tmp_path):
    np.save(tmp_path / "test_ims_size.npy", object_sizes(), allow_pickle=True)
    with pytest.raises(DataFormatError, match=r"(?s)test_ims_size.npy is a pickled object array.*allow_pickle=True"):
        load_split_image_sizes(tmp_path, "test")
    got = load_split_image_sizes(tmp_path, "test", allow_pickle=True)
    assert got.dtype == np.int64 and got.tolist() == [list(s) for s in SIZES]


@pytest.mark.parametrize("bad, message", [
    (np.array([[640, 480], [0, 500]]), "positive integers"),
    (np.array([[640, -480], [333, 500]]), "positive integers"),
    (np.array([[640.5, 480], [333, 500]]), "positive integers"),
    (np.array([[640, np.nan], [333, 500]]), "positive integers"),
    (np.array([640, 480, 333]), r"expected \(rows, 2\)"),
    (np.array([[640, 480, 3], [333, 500, 3]]), r"expected \(rows, 2\)"),
    (np.zeros(2, dtype=[("width", np.int64), ("height", np.int64)]), "image_w and image_h"),
])
def test_bad_image_sizes(tmp_path, bad, message):
    np.save(tmp_path / "test_ims_size.npy", bad)
    with pytest.raises(DataFormatError, match=message) as info:
        load_split_image_sizes(tmp_path, "test")
    assert "test_ims_size.npy" in str(info.value)


def test_bad_object_image_sizes(tmp_path):
    bad = np.empty(2, dtype=object)
    bad[0], bad[1] = {"image_w": 640, "image_h": 480}, {"w": 3, "h": 4}
    np.save(tmp_path / "test_ims_size.npy", bad, allow_pickle=True)
    with pytest.raises(DataFormatError, match="image_w and image_h"):
        load_split_image_sizes(tmp_path, "test", allow_pickle=True)


def test_caption_ids(tmp_path):
    (tmp_path / "test_precaps_stan.txt").write_text("1,2,3\n4, 5\r\n0\n")
    assert load_split_caption_ids(tmp_path, "test") == [[1, 2, 3], [4, 5], [0]]
    for text, message in (("1,2\n3,x\n", r"test_precaps_stan.txt:2: expected comma-separated integer word ids"),
                          ("1,2\n\n", r"test_precaps_stan.txt:2: expected comma-separated"),
                          ("1,-2\n", r"test_precaps_stan.txt:1: a caption needs at least one id, all >= 0"),
                          ("", r"test_precaps_stan.txt: no captions")):
        (tmp_path / "test_precaps_stan.txt").write_text(text)
        with pytest.raises(DataFormatError, match=message):
            load_split_caption_ids(tmp_path, "test")


def test_parses(tmp_path):
    (tmp_path / "test_caps.json").write_text(json.dumps(PARSES))
    assert load_split_parses(tmp_path, "test") == PARSES
    for content, message in (("{not json", "test_caps.json is not readable JSON"),
                             (json.dumps({"0": [[0, 1]]}), "expected a JSON list with one parse per caption"),
                             (json.dumps([[[0, 1]], [[0, -1]]]), "parse 1 must be a list of"),
                             (json.dumps([[[0, 1, 2]]]), "parse 0 must be a list of"),
                             (json.dumps([[[0, 1.5]]]), "parse 0 must be a list of"),
                             (json.dumps([[0, 1]]), "parse 0 must be a list of")):
        (tmp_path / "test_caps.json").write_text(content)
        with pytest.raises(DataFormatError, match=message):
            load_split_parses(tmp_path, "test")


@pytest.mark.parametrize("sizes", ["structured", "object"])
def test_load_gsmn_split(tmp_path, sizes):
    write_split(tmp_path, sizes=structured_sizes() if sizes == "structured" else object_sizes())
    kwargs = {"allow_pickle": True} if sizes == "object" else {}
    split = load_gsmn_split(tmp_path, "test", **kwargs)
    assert set(split) == {"boxes", "image_sizes", "caption_ids", "parses"}
    assert np.array_equal(split["boxes"], pixel_boxes())
    assert split["image_sizes"].tolist() == [list(s) for s in SIZES]
    assert split["caption_ids"][0] == [1, 2, 3] and len(split["caption_ids"]) == 10
    assert split["parses"] == PARSES
    if sizes == "object":
        with pytest.raises(DataFormatError, match="allow_pickle=True"):
            load_gsmn_split(tmp_path, "test")
    # one caption per box row (the dev-style layout) is accepted too
    one = tmp_path / "one"
    one.mkdir()
    write_split(one, captions=CAPTIONS[:2], parses=PARSES[:2])
    assert len(load_gsmn_split(one, "test")["caption_ids"]) == 2
    # the readers feed the head: parses and sizes as GSMNSimilarity takes them
    from itm_models.gsmn.geometry import check_image_sizes, check_parses

    check_parses(split["parses"], [len(ids) for ids in split["caption_ids"]])
    assert check_image_sizes(split["image_sizes"], 2).tolist() == [list(map(float, s)) for s in SIZES]


@pytest.mark.parametrize("change, message", [
    (dict(sizes=structured_sizes(SIZES + [(10, 10)])), r"test: 2 box rows but 3 image sizes"),
    (dict(parses=PARSES[:9]), r"test: 10 captions in test_precaps_stan.txt but 9 parses in test_caps.json"),
    (dict(captions=CAPTIONS[:9], parses=PARSES[:9]), r"test: 9 captions for 2 box rows \(expected 1 or 5 per row\)"),
    (dict(captions=CAPTIONS + ["1"], parses=PARSES + [[]]), r"test: 11 captions for 2 box rows"),
])
def test_load_gsmn_split_consistency(tmp_path, change, message):
    write_split(tmp_path, **change)
    with pytest.raises(DataFormatError, match=message):
        load_gsmn_split(tmp_path, "test")


def test_load_gsmn_split_missing_file(tmp_path):
    write_split(tmp_path)
    (tmp_path / "test_caps.json").unlink()
    with pytest.raises(DataFormatError, match="GSMN file not found.*test_caps.json"):
        load_gsmn_split(tmp_path, "test")
    with pytest.raises(DataFormatError, match="GSMN file not found.*dev_ims_bbx.npy"):
        load_gsmn_split(tmp_path, "dev")
