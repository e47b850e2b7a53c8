"""Data layout readers, the synthetic generator, the nltk-compatible tokeniser and the vocabulary."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from itm_models.data import (
    DataFormatError,
    PrecompDataset,
    collate,
    load_split_captions,
    load_split_images,
    precomp_loader,
    read_caption_lines,
)
from itm_models.eval.metrics import recall
from itm_models.data.synthetic import FILLER_WORDS
from itm_models.data.synthetic import main as synthetic_main
from itm_models.data.synthetic import make_synthetic_dataset
from itm_models.data.tokenize import Vocabulary, split_sentences, tokenize_caption, word_tokenize

TINY = dict(n_train=8, n_dev=0, n_test=8, n_regions=6, img_dim=64, n_concepts=20, seed=3)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny")
    info = make_synthetic_dataset(out, **TINY)
    return out, info


@pytest.fixture
def tiny_copy(tiny, tmp_path):
    """A writable copy of the tiny dataset, for corrupting."""
    src, _ = tiny
    dst = tmp_path / "data"
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------------------------------------
# Synthetic generator
# --------------------------------------------------------------------------------------------------------------
def test_generator_layout(tiny):
    out, info = tiny
    names = sorted(os.listdir(out))
    assert names == sorted(
        ["vocab.json"] + [f"{s}_{k}" for s in ("train", "test") for k in ("ims.npy", "caps.txt", "ids.txt")]
    )
    assert info["splits"] == {"train": (8, 40), "test": (8, 40)}
    ims = np.load(out / "test_ims.npy")
    assert ims.dtype == np.float32 and ims.shape == (8, 6, 64)
    assert (ims >= 0).all() and 0.05 < ims.mean() < 0.5 and (ims == 0).mean() > 0.2  # BUTD-like
    assert len(read_caption_lines(out, "test")) == 40
    vocab = Vocabulary.load(out / "vocab.json")
    assert len(vocab) == info["vocab_size"]
    for line in read_caption_lines(out, "train"):  # every caption word is in the vocabulary
        assert all(t in vocab for t in tokenize_caption(line)), line


def test_generator_deterministic_and_split_independent(tiny, tmp_path):
    out, _ = tiny
    make_synthetic_dataset(tmp_path / "a", **TINY)
    for name in ("test_ims.npy", "test_caps.txt", "train_caps.txt", "vocab.json"):
        assert (tmp_path / "a" / name).read_bytes() == (out / name).read_bytes(), name
    make_synthetic_dataset(tmp_path / "b", **{**TINY, "n_train": 3})  # other train size, same test split
    assert (tmp_path / "b" / "test_ims.npy").read_bytes() == (out / "test_ims.npy").read_bytes()
    assert (tmp_path / "b" / "test_caps.txt").read_bytes() == (out / "test_caps.txt").read_bytes()
    make_synthetic_dataset(tmp_path / "c", **{**TINY, "seed": 4})
    assert (tmp_path / "c" / "test_caps.txt").read_bytes() != (out / "test_caps.txt").read_bytes()


def test_generator_is_learnable(tmp_path):
    """A ridge regression from pooled region features to the concept words of an image's captions, fitted on
    train, retrieves test pairs far above chance (1 % R@1): the features really encode what the captions say."""
    make_synthetic_dataset(tmp_path, n_train=400, n_dev=0, n_test=100, n_regions=12, img_dim=64, n_concepts=40,
                           seed=1)
    first = 4 + len(FILLER_WORDS) + 3  # concept words follow the specials, the fillers and the punctuation

    def load(split):
        ds = PrecompDataset(tmp_path, split)
        bags = np.zeros((len(ds), len(ds.vocab) - first))
        for i, c in enumerate(ds.captions):
            bags[i, c[c >= first] - first] = 1
        x = np.asarray(ds.images)
        return np.concatenate([x.max(1), x.mean(1)], 1), bags

    f_tr, bags_tr = load("train")
    y_tr = bags_tr.reshape(len(f_tr), 5, -1).max(1)
    w = np.linalg.solve(f_tr.T @ f_tr + np.eye(f_tr.shape[1]), f_tr.T @ y_tr)
    f_te, bags_te = load("test")
    m = recall((f_te @ w) @ bags_te.T)
    assert m["i2t_r1"] > 60 and m["t2i_r1"] > 50 and m["rsum"] > 450, m


def test_generator_one_caption_per_row(tmp_path):
    make_synthetic_dataset(tmp_path, n_train=0, n_dev=3, n_test=0, n_regions=4, img_dim=16, n_concepts=10,
                           captions_per_image=1)
    ds = PrecompDataset(tmp_path, "dev")
    assert ds.im_div == 1 and len(ds) == 3 and ds[2][3] == 2


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="captions_per_image"):
        make_synthetic_dataset(tmp_path, captions_per_image=3)
    with pytest.raises(ValueError, match="n_test"):
        make_synthetic_dataset(tmp_path, n_test=-1)
    with pytest.raises(ValueError, match="vocab_size"):
        make_synthetic_dataset(tmp_path, vocab_size=10)


def test_generator_vocab_size_and_cli(tmp_path, capsys):
    info = make_synthetic_dataset(tmp_path / "v", n_train=0, n_dev=0, n_test=2, n_regions=4, img_dim=8,
                                  vocab_size=50)
    assert info["vocab_size"] == 50 and len(Vocabulary.load(tmp_path / "v" / "vocab.json")) == 50
    synthetic_main([str(tmp_path / "cli"), "--n-train", "2", "--n-dev", "0", "--n-test", "2", "--img-dim", "8",
                    "--n-regions", "3", "--n-concepts", "12"])
    assert "test: 2 images x 10 captions" in capsys.readouterr().out
    assert np.load(tmp_path / "cli" / "train_ims.npy").shape == (2, 3, 8)


# --------------------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------------------
def test_dataset_items_and_collate(tiny):
    out, _ = tiny
    ds = PrecompDataset(out, "test", img_dim=64, n_regions=6)
    assert len(ds) == 40 and ds.im_div == 5 and ds.image_ids == [str(8 + i) for i in range(8)]
    images = np.load(out / "test_ims.npy")
    for i in (0, 4, 5, 39):
        image, cap, index, img_id = ds[i]
        assert image.dtype == torch.float32 and image.shape == (6, 64)
        assert cap.dtype == torch.long and cap[0] == 1 and cap[-1] == 2 and (cap[1:-1] > 3).all()
        assert index == i and img_id == i // 5
        np.testing.assert_array_equal(image.numpy(), images[i // 5])
    assert ds[-1][2] == 39
    with pytest.raises(IndexError):
        ds[40]

    batch = [ds[i] for i in (3, 0, 17, 9)]
    imgs, caps, lengths, idx = collate(batch)
    order = sorted(range(4), key=lambda k: -len(batch[k][1]))  # stable, descending
    assert idx.tolist() == [batch[k][2] for k in order]
    assert lengths.tolist() == sorted((len(b[1]) for b in batch), reverse=True)
    assert caps.shape == (4, lengths[0]) and caps.dtype == torch.long and lengths.dtype == torch.long
    for row, k in enumerate(order):
        L = len(batch[k][1])
        assert torch.equal(caps[row, :L], batch[k][1]) and (caps[row, L:] == 0).all()
        assert torch.equal(imgs[row], batch[k][0])

    loader = precomp_loader(out, "test", batch_size=16)
    first = next(iter(loader))
    assert first[0].shape == (16, 6, 64) and len(loader) == 3


def test_dataset_pickles_without_features(tiny):
    import pickle

    out, _ = tiny
    ds = PrecompDataset(out, "train")
    blob = pickle.dumps(ds)
    assert len(blob) < ds.images.nbytes  # the features are not in the pickle
    back = pickle.loads(blob)
    assert isinstance(back.images, np.memmap) and torch.equal(back[7][0], ds[7][0])


def test_load_split_helpers(tiny):
    out, _ = tiny
    ims = load_split_images(out, "test", img_dim=64)
    assert isinstance(ims, np.memmap) and not ims.flags.writeable and ims.shape == (8, 6, 64)
    ids, lengths = load_split_captions(out, "test")
    ds = PrecompDataset(out, "test")
    assert ids.shape == (40, int(lengths.max())) and ids.dtype == torch.long
    for i in range(40):
        assert torch.equal(ids[i, : lengths[i]], ds[i][1]) and (ids[i, lengths[i]:] == 0).all()
    ds5 = PrecompDataset(out, "test", max_captions=7)
    assert len(ds5) == 7


def _expect(match, fn, *args, **kwargs):
    with pytest.raises(DataFormatError, match=match) as info:
        fn(*args, **kwargs)
    assert "\n" not in str(info.value)
    return info


def test_missing_files_named(tiny_copy, tmp_path):
    d = tiny_copy
    os.remove(d / "test_ims.npy")
    _expect(r"image features file not found: .*test_ims\.npy", PrecompDataset, d, "test")
    _expect(r"caption file not found: .*nosuch_caps\.txt", read_caption_lines, d, "nosuch")
    os.remove(d / "vocab.json")
    _expect(r"default vocabulary file is missing: .*vocab\.json", PrecompDataset, d, "train")
    _expect(r"vocabulary file not found: .*nope\.json", PrecompDataset, d, "train", vocab=tmp_path / "nope.json")


def test_malformed_images(tiny_copy):
    d = tiny_copy
    _expect(r"feature width 64, expected img_dim=2048", load_split_images, d, "test", img_dim=2048)
    _expect(r"6 regions per image, expected 36", PrecompDataset, d, "test", n_regions=36)
    np.save(d / "test_ims.npy", np.zeros((8, 64), dtype=np.float32))
    _expect(r"test_ims\.npy has shape \(8, 64\) \(ndim 2\)", load_split_images, d, "test")
    np.save(d / "test_ims.npy", np.zeros((8, 6, 64), dtype=np.int32))
    _expect(r"dtype int32", load_split_images, d, "test")
    np.save(d / "test_ims.npy", np.zeros((0, 6, 64), dtype=np.float32))
    _expect(r"no image rows", load_split_images, d, "test")
    (d / "test_ims.npy").write_bytes(b"not a numpy file at all")
    _expect(r"test_ims\.npy is not a readable \.npy array", load_split_images, d, "test")


def test_malformed_captions(tiny_copy):
    d = tiny_copy
    lines = read_caption_lines(d, "test")
    (d / "test_caps.txt").write_text("\n".join(lines[:39]) + "\n")
    _expect(r"has 39 captions for 8 image rows .*expected 8 \(one per row\) or 40", PrecompDataset, d, "test")
    (d / "test_caps.txt").write_text("")
    _expect(r"caption file is empty: .*test_caps\.txt", PrecompDataset, d, "test")
    _expect(r"caption file is empty", load_split_captions, d, "test")
    (d / "test_caps.txt").write_bytes(b"a dog\n\xff\xfe bad\n")
    _expect(r"test_caps\.txt line 2 is not valid UTF-8", read_caption_lines, d, "test")
    (d / "test_caps.txt").write_text("\n".join(lines) + "\n")
    (d / "test_ids.txt").write_text("1\n2\n3\n")
    _expect(r"test_ids\.txt has 3 lines, expected 8 \(image rows\) or 40", PrecompDataset, d, "test")


def test_caption_ids_out_of_vocabulary(tiny):
    out, info = tiny
    _expect(r"test_caps\.txt line 1: token '.+' has id \d+, outside the vocabulary size 10",
            load_split_captions, out, "test", vocab_size=10)
    _expect(r"outside the vocabulary size 10", PrecompDataset, out, "test", vocab_size=10)
    PrecompDataset(out, "test", vocab_size=info["vocab_size"])  # exactly enough is fine


def test_blank_caption_lines_are_captions(tmp_path):
    np.save(tmp_path / "x_ims.npy", np.zeros((2, 3, 4), dtype=np.float32))
    (tmp_path / "x_caps.txt").write_text("a dog\n\n")  # two captions, the second blank
    Vocabulary().save(tmp_path / "vocab.json")
    ds = PrecompDataset(tmp_path, "x")
    assert ds.im_div == 1 and ds[0][1].tolist() == [1, 3, 3, 2] and ds[1][1].tolist() == [1, 2]


# --------------------------------------------------------------------------------------------------------------
# Vocabulary
# --------------------------------------------------------------------------------------------------------------
def test_vocabulary_roundtrip_and_official_json(tmp_path):
    v = Vocabulary.build(["A dog runs.", "a dog sits", "the cat."], threshold=2)
    # counts: a 2, dog 2, "." 2, others 1; kept in order of first appearance
    assert [v.idx2word[i] for i in range(len(v))] == ["<pad>", "<start>", "<end>", "<unk>", "a", "dog", "."]
    assert v("dog") == 5 and v("zebra") == 3 and v.idx == 7
    assert v.encode_caption("A dog, a cat.") == [1, 4, 5, 3, 4, 3, 6, 2]
    v.save(tmp_path / "v.json")
    raw = json.loads((tmp_path / "v.json").read_text())
    assert raw["idx2word"]["5"] == "dog" and raw["idx"] == 7 and raw["word2idx"]["<unk>"] == 3
    w = Vocabulary.load(tmp_path / "v.json")
    assert w.word2idx == v.word2idx and w.idx2word == v.idx2word
    assert Vocabulary.from_json_dict({"word2idx": v.word2idx, "idx2word": {i: s for i, s in v.idx2word.items()},
                                      "idx": 7}).word2idx == v.word2idx


@pytest.mark.parametrize(
    "payload,match",
    [
        ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2}}, "must map '<unk>' to 3"),
        ({"word2idx": {"<start>": 0, "<pad>": 1, "<end>": 2, "<unk>": 3}}, "must map '<pad>' to 0"),
        ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3, "x": 9}}, r"ids must be exactly 0\.\.4"),
        ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "idx": 7}, "'idx' is 7"),
        ({"word2idx": {"<pad>": 0, "<start>": 1, "<end>": 2, "<unk>": 3}, "idx2word": {"3": "x"}},
         r"idx2word\[0\]"),
        ([1, 2], "expected a JSON object"),
    ],
)
def test_vocabulary_rejects_malformed(tmp_path, payload, match):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(payload))
    with pytest.raises(DataFormatError, match=match):
        Vocabulary.load(path)
    path.write_text("{not json")
    with pytest.raises(DataFormatError, match="not valid JSON"):
        Vocabulary.load(path)


# --------------------------------------------------------------------------------------------------------------
# Tokeniser: outputs of nltk.word_tokenize (NLTK 3.8/3.9, English Punkt) on lower-cased captions
# --------------------------------------------------------------------------------------------------------------
NLTK_CASES = [
    ("a man riding a horse.", ["a", "man", "riding", "a", "horse", "."]),
    ("two dogs, one black and one white, play in the snow.",
     ["two", "dogs", ",", "one", "black", "and", "one", "white", ",", "play", "in", "the", "snow", "."]),
    ("a dog's toy", ["a", "dog", "'s", "toy"]),
    ("the man isn't happy", ["the", "man", "is", "n't", "happy"]),
    ("they're playing; we'll watch", ["they", "'re", "playing", ";", "we", "'ll", "watch"]),
    ("i'm sure he'd say i've won", ["i", "'m", "sure", "he", "'d", "say", "i", "'ve", "won"]),
    ("what is this?", ["what", "is", "this", "?"]),
    ('a sign that says "stop".', ["a", "sign", "that", "says", "``", "stop", "''", "."]),
    ('"hello" he said', ["``", "hello", "''", "he", "said"]),
    ("a cat (black) sleeps on a [red] mat",
     ["a", "cat", "(", "black", ")", "sleeps", "on", "a", "[", "red", "]", "mat"]),
    ("a man cannot swim", ["a", "man", "can", "not", "swim"]),
    ("gonna go", ["gon", "na", "go"]),
    ("the price is $5.00 & 20% off", ["the", "price", "is", "$", "5.00", "&", "20", "%", "off"]),
    ("1,000 people at 3:00", ["1,000", "people", "at", "3:00"]),
    ("a list: eggs, milk", ["a", "list", ":", "eggs", ",", "milk"]),
    ("a man... walking", ["a", "man", "...", "walking"]),
    ("a man -- running", ["a", "man", "--", "running"]),
    ("it's a black-and-white dog", ["it", "'s", "a", "black-and-white", "dog"]),
    ("the players' shirts", ["the", "players", "'", "shirts"]),
    ("a 'fake' dog", ["a", "'fake", "'", "dog"]),
    ("wow!", ["wow", "!"]),
    ("a 3.5 inch screen.", ["a", "3.5", "inch", "screen", "."]),
    ("a dog. a cat.", ["a", "dog", ".", "a", "cat", "."]),
    ("a dog.  a cat runs. ", ["a", "dog", ".", "a", "cat", "runs", "."]),
    ("mr. smith walks.", ["mr.", "smith", "walks", "."]),
    ("a u.s. flag on a pole.", ["a", "u.s.", "flag", "on", "a", "pole", "."]),
    ("main st. at night.", ["main", "st.", "at", "night", "."]),
    ('he said "hi!" and left.', ["he", "said", "``", "hi", "!", "''", "and", "left", "."]),
    ("", []),
    ("   ", []),
]


@pytest.mark.parametrize("text,tokens", NLTK_CASES)
def test_word_tokenize_matches_nltk(text, tokens):
    assert word_tokenize(text) == tokens


def test_tokenize_caption_lowercases_and_strips():
    assert tokenize_caption("  A Man, Riding A HORSE.\n") == ["a", "man", ",", "riding", "a", "horse", "."]


def test_split_sentences():
    assert split_sentences("a dog. a cat.") == ["a dog.", "a cat."]
    assert split_sentences("mr. smith walks.") == ["mr. smith walks."]
    assert split_sentences("a boy (age 5.) runs") == ["a boy (age 5.)", "runs"]  # realigned bracket
    assert split_sentences("wow!!! a dog") == ["wow!!!", "a dog"]
    assert split_sentences("a 2. b") == ["a 2. b"]  # number before a lower-case word: no break
