"""SCAN model: the official checkpoint golden end to end, the official initialisation, encoders against plain
PyTorch modules, the similarity against the reference, checkpoints (official and ours), training and resuming, and
clear errors on bad inputs."""
from __future__ import annotations

import argparse
import dataclasses
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from conftest import assert_close_report, golden_path
from itm_kernels.xattn_sim import reference
from itm_models.checkpoints import (CheckpointError, load_checkpoint, load_official_checkpoint,
                                    read_official_checkpoint, save_checkpoint)
from itm_models.encoders import EncoderImagePrecomp, EncoderImageWeightNormPrecomp, EncoderText, l2norm
from itm_models.losses import ContrastiveLoss
from itm_models.scan import SCAN, SCANConfig, SCANEnsemble, encode_and_score
from itm_models.train import adjust_learning_rate, epoch_generator, train, train_step

from itm_models.eval import metrics as _metrics


pytestmark = pytest.mark.usefixtures("one_thread")


def _tiny_config(**kw) -> SCANConfig:
    base = dict(vocab_size=40, word_dim=12, embed_size=16, img_dim=24, bi_gru=True, max_violation=True)
    base.update(kw)
    return SCANConfig(**base)


def _random_captions(n, l_max, vocab, gen, min_len=1):
    lens = torch.randint(min_len, l_max + 1, (n,), generator=gen)
    lens[0] = l_max
    ids = torch.randint(0, vocab, (n, l_max), generator=gen)
    ids[torch.arange(l_max)[None, :] >= lens[:, None]] = 0
    return ids, lens


# --------------------------------------------------------------------------------------------------------------
# Golden: the official checkpoint, encoders, similarity and metrics
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def scan_ckpt():
    path = golden_path("scan_checkpoint.pth.tar")
    golden = np.load(golden_path("scan_checkpoint_golden.npz"))
    return path, {k: golden[k] for k in golden.files}


@pytest.fixture(scope="module")
def golden_model(scan_ckpt):
    return load_official_checkpoint(scan_ckpt[0])


def test_golden_checkpoint_rebuilds_the_model(golden_model):
    m = golden_model
    assert isinstance(m, SCAN) and not m.training
    c = m.config
    assert (c.vocab_size, c.embed_size, c.word_dim, c.img_dim, c.bi_gru) == (500, 256, 300, 2048, True)
    assert (c.cross_attn, c.raw_feature_norm, c.agg_func, c.lambda_softmax, c.lambda_lse) == \
        ("t2i", "clipped_l2norm", "LogSumExp", 9.0, 6.0)
    assert m.agg == "lse" and m.direction == "t2i"
    assert m.checkpoint_info == {"epoch": 7, "best_rsum": 321.5, "Eiters": 4242}
    sds = m.official_state_dicts()
    assert sorted(sds[0]) == ["fc.bias", "fc.weight"]
    assert "rnn.weight_ih_l0_reverse" in sds[1] and sds[1]["embed.weight"].shape == (500, 300)


def test_golden_encoders_sims_and_metrics(golden_model, scan_ckpt):
    g = scan_ckpt[1]
    lens = torch.from_numpy(g["caption_lens"])
    with torch.no_grad():
        img = golden_model.encode_images(torch.from_numpy(g["images_raw"]))
        cap = golden_model.encode_captions(torch.from_numpy(g["captions_ids"]), lens)
    assert img.dtype == cap.dtype == torch.float32
    assert_close_report(img, torch.from_numpy(g["img_embs"]), atol=1e-6, rtol=0, what="img_embs")
    assert_close_report(cap, torch.from_numpy(g["cap_embs"]), atol=1e-6, rtol=0, what="cap_embs")
    pad = torch.arange(cap.shape[1])[None, :] >= lens[:, None]
    assert torch.all(cap[pad] == 0), "cap_embs must be exact zeros beyond each length"
    # the official evaluation stores float64 embeddings and scores in float64
    sims = golden_model.sims(img.double(), cap.double(), lens)
    assert sims.dtype == torch.float64 and sims.shape == (10, 50)
    want = torch.from_numpy(g["sims"])
    assert_close_report(sims, want, atol=1e-6, rtol=1e-6, what="sims from our embeddings")
    # from the golden embeddings, only the similarity is compared: float64 round-off only
    sims_g = golden_model.sims(torch.from_numpy(g["img_embs"]).double(), torch.from_numpy(g["cap_embs"]).double(),
                               lens)
    assert_close_report(sims_g, want, atol=1e-12, rtol=1e-12, what="sims from golden embeddings")
    metrics, ranks = _metrics.recall(sims.numpy(), captions_per_image=5, return_ranks=True)
    for key, value in metrics.items():
        assert value == float(g[f"metric_{key}"]), (key, value, float(g[f"metric_{key}"]))
    for key in ("i2t_ranks", "t2i_ranks", "i2t_top1", "t2i_top1"):
        np.testing.assert_array_equal(ranks[key], g[key].astype(np.int64), err_msg=key)


def test_golden_encode_and_score_in_batches(golden_model, scan_ckpt):
    g = scan_ckpt[1]
    sims = encode_and_score(golden_model, g["images_raw"], torch.from_numpy(g["captions_ids"]),
                            torch.from_numpy(g["caption_lens"]), batch_size=16, caption_chunk=7,
                            sims_dtype=torch.float64)
    assert_close_report(sims, torch.from_numpy(g["sims"]), atol=1e-6, rtol=1e-6, what="batched sims")


def test_official_initialisation_is_reproduced(scan_ckpt, golden_model):
    """The golden checkpoint's weights are torch.manual_seed(4321) + official SCAN(opt), fc.bias replaced."""
    torch.manual_seed(4321)
    fresh = SCAN(golden_model.config)
    want = torch.load(scan_ckpt[0], weights_only=False)["model"]
    for sd, mod, name in zip(want, (fresh.img_enc, fresh.txt_enc), ("img_enc", "txt_enc")):
        own = mod.state_dict()
        for k, v in sd.items():
            if (name, k) == ("img_enc", "fc.bias"):
                assert torch.all(own[k] == 0)
                continue
            assert torch.equal(own[k], v), f"{name}.{k} differs from the official initialisation"


# --------------------------------------------------------------------------------------------------------------
# Encoders against plain PyTorch modules
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("no_imgnorm", [False, True])
def test_image_encoder_matches_plain_linear(no_imgnorm):
    torch.manual_seed(1)
    enc = EncoderImagePrecomp(24, 16, no_imgnorm=no_imgnorm)
    r = np.sqrt(6.0) / np.sqrt(24 + 16)
    assert enc.fc.weight.abs().max() <= r and torch.all(enc.fc.bias == 0)
    with torch.no_grad():
        enc.fc.bias.uniform_(-0.1, 0.1)
    lin = nn.Linear(24, 16)
    lin.load_state_dict(enc.fc.state_dict())
    x = torch.relu(torch.randn(3, 7, 24))
    y = lin(x)
    if not no_imgnorm:
        y = y / (y.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)
    assert torch.equal(enc(x), y)
    assert torch.equal(l2norm(torch.zeros(2, 3)), torch.zeros(2, 3))


def test_weight_norm_encoder_keys_and_values():
    torch.manual_seed(2)
    enc = EncoderImageWeightNormPrecomp(24, 16)
    sd = enc.state_dict()
    assert sorted(sd) == ["fc.bias", "fc.weight_g", "fc.weight_v"]
    assert sd["fc.weight_g"].shape == () and sd["fc.weight_v"].shape == (16, 24)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.nn.utils.weight_norm is deprecated, but it is what SCAN used
        plain = nn.utils.weight_norm(nn.Linear(24, 16), dim=None)
    assert sorted(plain.state_dict()) == ["bias", "weight_g", "weight_v"]
    with torch.no_grad():
        plain.weight_g.mul_(1.7)
    enc.fc.load_state_dict(plain.state_dict())
    x = torch.randn(2, 5, 24)
    y = plain(x)
    assert_close_report(enc(x), y / (y.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8), atol=1e-6, rtol=0,
                        what="weight_norm encoder")
    # an old-style gain of shape (1,) loads too
    old = {k: (v.reshape(1) if k == "weight_g" else v) for k, v in plain.state_dict().items()}
    enc.fc.load_state_dict(old)
    assert enc.fc.weight_g.shape == ()
    # SCAN with the variant builds the same keys, and they round-trip through the official state_dict list
    model = SCAN(_tiny_config(precomp_enc_type="weight_norm"))
    assert sorted(model.official_state_dicts()[0]) == ["fc.bias", "fc.weight_g", "fc.weight_v"]


def _plain_text_encoder(enc: EncoderText, ids, lens):
    """The official EncoderText.forward with plain modules (sorted lengths, as the official collate gives)."""
    embed = nn.Embedding(enc.vocab_size, enc.word_dim).to(enc.embed.weight.dtype)
    rnn = nn.GRU(enc.word_dim, enc.embed_size, enc.num_layers, batch_first=True,
                 bidirectional=enc.use_bi_gru).to(enc.embed.weight.dtype)
    embed.load_state_dict(enc.embed.state_dict())
    rnn.load_state_dict(enc.rnn.state_dict())
    packed = pack_padded_sequence(embed(ids), lens, batch_first=True)
    out, _ = pad_packed_sequence(rnn(packed)[0], batch_first=True)
    if enc.use_bi_gru:
        half = out.size(2) // 2
        out = (out[:, :, :half] + out[:, :, half:]) / 2
    if not enc.no_txtnorm:
        out = out / (out.pow(2).sum(-1, keepdim=True).sqrt() + 1e-8)
    return out


@pytest.mark.parametrize("bi_gru,num_layers,no_txtnorm,dtype", [
    (True, 1, False, torch.float32), (False, 1, False, torch.float32), (True, 2, False, torch.float64),
    (False, 2, True, torch.float64),
])
def test_text_encoder_matches_plain_gru_sorted_and_unsorted(bi_gru, num_layers, no_txtnorm, dtype):
    torch.manual_seed(3)
    enc = EncoderText(40, 12, 16, num_layers, use_bi_gru=bi_gru, no_txtnorm=no_txtnorm).to(dtype)
    assert enc.embed.weight.abs().max() <= 0.1
    gen = torch.Generator().manual_seed(4)
    ids, lens = _random_captions(9, 11, 40, gen)
    order = torch.argsort(lens, descending=True, stable=True)
    ids_s, lens_s = ids[order], lens[order]
    want = _plain_text_encoder(enc, ids_s, lens_s)
    with torch.no_grad():
        got_sorted = enc(ids_s, lens_s)
        got_unsorted = enc(ids, lens)
    assert got_sorted.shape == (9, 11, 16) and got_sorted.dtype == dtype
    assert torch.equal(got_sorted[:, :want.shape[1]], want.detach())
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    assert_close_report(got_unsorted[order], got_sorted, atol=tol, rtol=0, what="unsorted vs sorted batch")
    # each caption alone (batch of one) gives the same embedding: batching does not leak between captions
    for i in (0, 4, 8):
        with torch.no_grad():
            alone = enc(ids[i:i + 1, :int(lens[i])], lens[i:i + 1])
        assert_close_report(alone[0], got_unsorted[i, :int(lens[i])], atol=tol, rtol=0, what=f"caption {i} alone")
    # padding is never read: garbage ids beyond the lengths change nothing
    garbage = ids.clone()
    garbage[torch.arange(11)[None, :] >= lens[:, None]] = 10_000
    with torch.no_grad():
        assert torch.equal(enc(garbage, lens), got_unsorted)
    assert torch.all(got_unsorted[torch.arange(11)[None, :] >= lens[:, None]] == 0)


# --------------------------------------------------------------------------------------------------------------
# SCAN similarity, ensemble, config
# --------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cross_attn,agg_func,norm", [
    ("t2i", "LogSumExp", "clipped_l2norm"), ("i2t", "Mean", "clipped_l2norm"), ("t2i", "Max", "softmax"),
    ("i2t", "Sum", "l2norm"),
])
def test_sims_match_reference(cross_attn, agg_func, norm):
    torch.manual_seed(5)
    cfg = _tiny_config(cross_attn=cross_attn, agg_func=agg_func, raw_feature_norm=norm, lambda_softmax=4.0,
                       lambda_lse=5.0)
    model = SCAN(cfg).double().eval()
    gen = torch.Generator().manual_seed(6)
    images = torch.relu(torch.randn(3, 5, 24, generator=gen, dtype=torch.float64))
    ids, lens = _random_captions(7, 9, 40, gen)
    with torch.no_grad():
        img, cap = model.encode_images(images), model.encode_captions(ids, lens)
        got = model.sims(img, cap, lens)
        want = reference.xattn_sim(img, cap, lens, direction=cross_attn, norm=norm, lambda_softmax=4.0,
                                   agg={"LogSumExp": "lse", "Mean": "mean", "Max": "max", "Sum": "sum"}[agg_func],
                                   lambda_lse=5.0)
        assert_close_report(got, want, atol=1e-12, rtol=1e-12, what="SCAN.sims vs reference")
        fwd = model(images, ids, lens)
    assert torch.equal(fwd, got)


def test_ensemble_averages_members():
    torch.manual_seed(7)
    m1 = SCAN(_tiny_config(cross_attn="t2i")).eval()
    m2 = SCAN(_tiny_config(cross_attn="i2t", agg_func="mean", embed_size=8)).eval()
    ens = SCANEnsemble([m1, m2])
    gen = torch.Generator().manual_seed(8)
    images = torch.relu(torch.randn(4, 5, 24, generator=gen))
    ids, lens = _random_captions(6, 8, 40, gen)
    with torch.no_grad():
        want = (m1(images, ids, lens) + m2(images, ids, lens)) / 2
        assert_close_report(ens(images, ids, lens), want, atol=1e-7, rtol=0, what="ensemble forward")
        sims = ens.sims(ens.encode_images(images), ens.encode_captions(ids, lens), lens)
        assert_close_report(sims, want, atol=1e-7, rtol=0, what="ensemble sims")
    assert_close_report(encode_and_score(ens, images, ids, lens, batch_size=3), want, atol=1e-6, rtol=0,
                        what="ensemble encode_and_score")
    with pytest.raises(TypeError, match="expected SCAN"):
        SCANEnsemble([m1, nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="at least one"):
        SCANEnsemble([])


def test_config_from_opt_and_validation():
    opt = argparse.Namespace(vocab_size=10, embed_size=8, agg_func="Mean", data_path="./data", workers=3,
                             cross_attn="i2t")
    cfg = SCANConfig.from_opt(opt)
    assert (cfg.vocab_size, cfg.embed_size, cfg.agg_func, cfg.cross_attn, cfg.word_dim) == (10, 8, "Mean", "i2t", 300)
    assert dataclasses.asdict(cfg) == cfg.to_dict()
    assert SCANConfig(vocab_size=5, agg_func="lse").agg_func == "LogSumExp"
    for bad, match in [(dict(agg_func="Median"), "agg_func"), (dict(cross_attn="both"), "cross_attn"),
                       (dict(raw_feature_norm="l3"), "raw_feature_norm"), (dict(embed_size=0), "embed_size"),
                       (dict(precomp_enc_type="fancy"), "precomp_enc_type"), (dict(bi_gru="yes"), "bi_gru"),
                       (dict(lambda_lse=0.0), "lambda_lse"), (dict(learning_rate=float("inf")), "learning_rate")]:
        with pytest.raises(ValueError, match=match):
            SCANConfig(vocab_size=5, **bad)
    with pytest.raises(ValueError, match="vocab_size"):
        SCANConfig.from_opt({"embed_size": 8})


# --------------------------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(9)
    return SCAN(_tiny_config()).eval()


def test_bad_caption_inputs(tiny_model):
    ids = torch.tensor([[1, 5, 2, 0], [1, 39, 7, 2]])
    lens = torch.tensor([3, 4])
    with torch.no_grad():
        tiny_model.encode_captions(ids, lens)  # fine
    bad = ids.clone()
    bad[1, 2] = 40
    with pytest.raises(ValueError, match=r"caption 1 position 2 has token id 40, outside the vocabulary 0..39"):
        tiny_model.encode_captions(bad, lens)
    bad[1, 2] = -3
    with pytest.raises(ValueError, match=r"token id -3"):
        tiny_model.encode_captions(bad, lens)
    with pytest.raises(ValueError, match=r"caption\(s\) \[1\] have length 0"):
        tiny_model.encode_captions(ids, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match=r"length 5 > L_max=4"):
        tiny_model.encode_captions(ids, torch.tensor([5, 4]))
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        tiny_model.encode_captions(ids, torch.tensor([3, 4, 2]))
    with pytest.raises(TypeError, match="integer"):
        tiny_model.encode_captions(ids.float(), lens)
    with pytest.raises(TypeError, match="integers"):
        tiny_model.encode_captions(ids, lens.float())
    with pytest.raises(ValueError, match=r"\(N, L_max\)"):
        tiny_model.encode_captions(ids[0], lens)


def test_bad_image_inputs(tiny_model):
    with pytest.raises(ValueError, match=r"width 2048 .* expects img_dim=24"):
        tiny_model.encode_images(torch.zeros(2, 36, 2048))
    with pytest.raises(ValueError, match=r"\(N, regions, 24\)"):
        tiny_model.encode_images(torch.zeros(36, 24))
    with pytest.raises(TypeError, match="floating point"):
        tiny_model.encode_images(torch.zeros(2, 36, 24, dtype=torch.long))
    with pytest.raises(TypeError, match="torch.Tensor"):
        tiny_model.encode_images(np.zeros((2, 36, 24), dtype=np.float32))


# --------------------------------------------------------------------------------------------------------------
# Official checkpoints: wrong layouts and types
# --------------------------------------------------------------------------------------------------------------
def _scan_opt(**kw):
    d = dict(vocab_size=40, word_dim=12, embed_size=16, img_dim=24, bi_gru=True, num_layers=1, no_imgnorm=False,
             no_txtnorm=False, precomp_enc_type="basic", raw_feature_norm="clipped_l2norm", agg_func="LogSumExp",
             cross_attn="t2i", lambda_softmax=9.0, lambda_lse=6.0, margin=0.2, max_violation=True,
             data_path="./data/", workers=10)
    d.update(kw)
    return argparse.Namespace(**d)


def _official_file(tmp_path, name, obj):
    path = tmp_path / name
    torch.save(obj, path)
    return path


def test_official_roundtrip_with_numpy_best_rsum(tmp_path, tiny_model):
    obj = {"epoch": 3, "model": tiny_model.official_state_dicts(), "best_rsum": np.float64(400.5),
           "opt": _scan_opt(), "Eiters": 10}
    model = load_official_checkpoint(_official_file(tmp_path, "ok.pth.tar", obj))
    assert model.checkpoint_info["best_rsum"] == 400.5 and not model.training
    for a, b in zip(model.state_dict().values(), tiny_model.state_dict().values()):
        assert torch.equal(a, b)


def test_official_other_model_types_are_refused(tmp_path):
    sgraf_opt = argparse.Namespace(vocab_size=40, word_dim=12, embed_size=16, img_dim=24, bi_gru=True,
                                   module_name="SAF", sim_dim=8, sgr_step=3, margin=0.2)
    sds = [{"fc.weight": torch.zeros(16, 24)}, {"embed.weight": torch.zeros(40, 12)},
           {"sim_eval_w.weight": torch.zeros(1, 8)}]
    path = _official_file(tmp_path, "sgraf.pth.tar", {"model": sds, "opt": sgraf_opt, "epoch": 1})
    with pytest.raises(CheckpointError, match=r"the SGRAF weights do not fit the model its opt describes"):
        load_official_checkpoint(path)
    assert read_official_checkpoint(path)["model_type"] == "sgraf"
    gsmn_opt = argparse.Namespace(vocab_size=40, feat_dim=16, num_block=16, hid_dim=32, out_dim=1, is_sparse=False)
    path = _official_file(tmp_path, "gsmn.pth.tar", {"model": sds + [{}], "opt": gsmn_opt})
    with pytest.raises(CheckpointError, match=r"the GSMN weights do not fit the model its opt describes"):
        load_official_checkpoint(path)
    # an SGRAF opt with a SCAN-sized model list: the list length is checked against the detected type
    path = _official_file(tmp_path, "sgraf2.pth.tar", {"model": sds[:2], "opt": sgraf_opt})
    with pytest.raises(CheckpointError, match=r"holds 2 state_dicts, but a SGRAF checkpoint has 3"):
        load_official_checkpoint(path)


def test_official_sgraf_file_loads_as_sgraf_not_scan():
    from itm_models.sgraf import SGRAF

    model = load_official_checkpoint(golden_path("sgraf_checkpoint.pth.tar"))
    assert isinstance(model, SGRAF) and not model.training


def test_official_bad_layouts(tmp_path, tiny_model):
    sds = tiny_model.official_state_dicts()
    cases = [
        ({"state_dict": sds[0]}, r"lacks \['model', 'opt'\]"),
        ({"model": sds, "epoch": 1}, r"lacks \['opt'\]"),
        ([sds], r"holds a list, expected the official checkpoint dict"),
        ({"model": sds[:1], "opt": _scan_opt()}, r"holds 1 state_dicts, but a SCAN checkpoint has 2"),
        ({"model": sds + [{}], "opt": _scan_opt()}, r"holds 3 state_dicts, but a SCAN checkpoint has 2"),
        ({"model": sds[0], "opt": _scan_opt()}, r"'model' must be a list of state_dicts"),
        ({"model": sds, "opt": "t2i"}, r"'opt' is a str"),
        ({"model": sds, "opt": argparse.Namespace(vocab_size=3, lr=1)}, r"cannot tell the model type"),
        ({"model": sds, "opt": _scan_opt(vocab_size=50)},
         r"model\[1\] \(txt_enc\)\['embed.weight'\] has shape \(40, 12\) in the checkpoint but the model expects "
         r"\(50, 12\).*vocab_size=50"),
        ({"model": sds, "opt": _scan_opt(bi_gru=False)}, r"unexpected keys \['rnn.weight_ih_l0_reverse'"),
        ({"model": sds, "opt": _scan_opt(agg_func="Median")}, r"does not describe a valid SCAN model.*agg_func"),
    ]
    for i, (obj, match) in enumerate(cases):
        path = _official_file(tmp_path, f"bad{i}.pth.tar", obj)
        with pytest.raises(CheckpointError, match=match):
            load_official_checkpoint(path)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_official_checkpoint(text)
    with pytest.raises(CheckpointError, match="not found"):
        load_official_checkpoint(tmp_path / "missing.pth.tar")


class _Custom:
    def __init__(self):
        self.x = 1


def test_official_untrusted_pickle_needs_trusted(tmp_path, tiny_model):
    obj = {"model": tiny_model.official_state_dicts(), "opt": _scan_opt(), "logger": _Custom()}
    path = _official_file(tmp_path, "custom.pth.tar", obj)
    with pytest.raises(CheckpointError, match=r"refuses: \['[\w.]*_Custom'\].*trusted=True"):
        load_official_checkpoint(path)
    assert isinstance(load_official_checkpoint(path, trusted=True), SCAN)


# --------------------------------------------------------------------------------------------------------------
# Our checkpoints, training, resuming
# --------------------------------------------------------------------------------------------------------------
def _batch(gen, b=6, k=5, img_dim=24, vocab=40, l_max=8):
    images = torch.relu(torch.randn(b, k, img_dim, generator=gen))
    ids, lens = _random_captions(b, l_max, vocab, gen, min_len=2)
    return images, ids, lens, torch.arange(b)


def test_save_load_and_resume_gives_the_same_next_step(tmp_path):
    torch.manual_seed(10)
    cfg = _tiny_config(precomp_enc_type="weight_norm")
    model = SCAN(cfg, backend="torch")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    crit = ContrastiveLoss(0.2, True)
    gen = torch.Generator().manual_seed(11)
    b1, b2 = _batch(gen), _batch(gen)
    model.train()
    train_step(model, opt, crit, b1, grad_clip=2.0)
    path = tmp_path / "ck.pt"
    save_checkpoint(model, path, optimizer=opt, epoch=1, best_rsum=123.0, note="hello", values=[1, 2.5])
    raw = torch.load(path, weights_only=True)  # the safe loader reads it
    assert raw["config"] == dataclasses.asdict(cfg) and raw["extra"]["note"] == "hello"
    loaded = load_checkpoint(path, backend="torch")
    assert (loaded.epoch, loaded.best_rsum, loaded.extra["values"]) == (1, 123.0, [1, 2.5])
    assert not loaded.model.training and loaded.model.config == cfg
    model2 = loaded.model.train()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-3)
    opt2.load_state_dict(loaded.optimizer_state)
    loss_a = train_step(model, opt, crit, b2, grad_clip=2.0)
    loss_b = train_step(model2, opt2, crit, b2, grad_clip=2.0)
    assert abs(loss_a - loss_b) <= 1e-6, (loss_a, loss_b)
    loss_a, loss_b = train_step(model, opt, crit, b1), train_step(model2, opt2, crit, b1)
    assert abs(loss_a - loss_b) <= 1e-6, (loss_a, loss_b)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6, rtol=0), k
    # our loader refuses an official file and the official loader refuses ours
    with pytest.raises(CheckpointError, match="use load_official_checkpoint|use itm_models.checkpoints.load_off"):
        load_checkpoint(golden_path("scan_checkpoint.pth.tar"))
    with pytest.raises(CheckpointError, match="use itm_models.checkpoints.load_checkpoint"):
        load_official_checkpoint(path)
    with pytest.raises(TypeError, match="NumPy float64"):
        save_checkpoint(model, tmp_path / "np.pt", best=np.float64(1.0))
    with pytest.raises(TypeError, match="needs a dataclass .config"):
        save_checkpoint(SCANEnsemble([model]), tmp_path / "ens.pt")


def test_training_loss_decreases_and_all_parameters_learn():
    torch.manual_seed(12)
    model = SCAN(_tiny_config(learning_rate=2e-3), backend="torch").train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    crit = ContrastiveLoss(0.2, max_violation=True)
    batch = _batch(torch.Generator().manual_seed(13), b=8)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    losses = [train_step(model, opt, crit, batch, grad_clip=2.0) for _ in range(25)]
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3]), losses
    for k, v in model.named_parameters():
        assert not torch.equal(v, before[k]), f"{k} did not change"


def test_learning_rate_schedule_and_shuffle_generator():
    opt = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=1.0)
    assert [adjust_learning_rate(opt, 2e-4, e, 15) for e in (0, 14, 15, 29, 30)] == \
        pytest.approx([2e-4, 2e-4, 2e-5, 2e-5, 2e-6], rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(2e-6)
    a = torch.randperm(50, generator=epoch_generator(0, 3))
    assert torch.equal(a, torch.randperm(50, generator=epoch_generator(0, 3)))
    assert not torch.equal(a, torch.randperm(50, generator=epoch_generator(0, 4)))


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    synthetic = pytest.importorskip("itm_models.data.synthetic")
    out = tmp_path_factory.mktemp("syn")
    synthetic.make_synthetic_dataset(out, n_train=40, n_dev=10, n_test=0, n_regions=6, img_dim=64, n_concepts=20,
                                     seed=3)
    return out


def test_train_end_to_end_and_resume(synthetic_dir, tmp_path):
    from itm_models.data import load_vocab

    vocab = load_vocab(None, synthetic_dir)
    cfg = dict(vocab_size=len(vocab), word_dim=16, embed_size=24, img_dim=64, bi_gru=True, max_violation=True,
               batch_size=32, learning_rate=2e-3, lr_update=1)
    steps_a: list = []
    full = train(SCANConfig(num_epochs=2, **cfg), synthetic_dir, tmp_path / "a", seed=5, device="cpu",
                 backend="torch", progress=False, log=None, on_step=lambda e, s, l: steps_a.append((e, s, l)))
    assert full["epochs"] == 2 and len(full["history"]) == 2
    assert [h["lr"] for h in full["history"]] == pytest.approx([2e-3, 2e-4])
    assert full["history"][-1]["loss"] < full["history"][0]["loss"]
    assert full["best_rsum"] == max(h["rsum"] for h in full["history"])
    best = load_checkpoint(full["checkpoint_best"])
    assert best.epoch == full["best_epoch"] and best.best_rsum == full["best_rsum"]
    assert load_checkpoint(full["checkpoint_last"]).epoch == 2
    # interrupted after epoch 1, then resumed: the same steps, the same losses
    train(SCANConfig(num_epochs=1, **cfg), synthetic_dir, tmp_path / "b", seed=5, device="cpu", backend="torch",
          progress=False, log=None)
    steps_b: list = []
    resumed = train(SCANConfig(num_epochs=2, **cfg), synthetic_dir, tmp_path / "b", seed=5, device="cpu",
                    backend="torch", progress=False, log=None, resume=True,
                    on_step=lambda e, s, l: steps_b.append((e, s, l)))
    tail_a = [x for x in steps_a if x[0] >= 1]
    assert [x[:2] for x in steps_b] == [x[:2] for x in tail_a]
    for (e, s, la), (_, _, lb) in zip(tail_a, steps_b):
        assert abs(la - lb) <= 1e-6, (e, s, la, lb)
    assert [h["rsum"] for h in resumed["history"]] == [h["rsum"] for h in full["history"]]
    # resuming with different model options is refused
    with pytest.raises(CheckpointError, match=r"model options differ.*embed_size"):
        train(SCANConfig(num_epochs=3, **{**cfg, "embed_size": 8}), synthetic_dir, tmp_path / "b", seed=5,
              device="cpu", progress=False, log=None, resume=True)


def test_cli_main(synthetic_dir, tmp_path, capsys):
    from itm_models.cli.train import main

    out = tmp_path / "cli"
    result = main(["--data", str(synthetic_dir), "--out", str(out), "--epochs", "1", "--batch-size", "50",
                   "--embed-size", "16", "--word-dim", "8", "--img-dim", "64", "--direction", "i2t", "--agg", "Mean",
                   "--lambda-softmax", "4", "--no-bi-gru", "--no-max-violation", "--backend", "torch",
                   "--device", "cpu", "--no-progress"])
    assert (out / "checkpoint_last.pt").exists() and (out / "checkpoint_best.pt").exists()
    cfg = load_checkpoint(out / "checkpoint_best.pt").model.config
    assert (cfg.cross_attn, cfg.agg_func, cfg.lambda_softmax, cfg.bi_gru, cfg.max_violation) == \
        ("i2t", "Mean", 4.0, False, False)
    assert "rsum" in capsys.readouterr().out and result["epochs"] == 1
    with pytest.raises(SystemExit):
        main(["--help"])
