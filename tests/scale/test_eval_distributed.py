"""``itm-eval --distributed`` under torchrun (2 ranks, gloo) prints the same metrics as one process."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itm_models.checkpoints import save_checkpoint
from itm_models.cli.eval import evaluate
from itm_models.data.synthetic import make_synthetic_dataset
from itm_models.data.tokenize import Vocabulary
from itm_models.scan import SCAN, SCANConfig

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_dist")
    data = root / "data"
    make_synthetic_dataset(data, n_train=10, n_dev=4, n_test=12, img_dim=32, n_regions=6, n_concepts=20, seed=1)
    vocab = Vocabulary.load(data / "vocab.json")
    torch.manual_seed(0)
    model = SCAN(SCANConfig(vocab_size=len(vocab), img_dim=32, word_dim=12, embed_size=16, bi_gru=True))
    ckpt = root / "model.pt"
    save_checkpoint(model, ckpt)
    return data, ckpt, root


@pytest.mark.slow
def test_itm_eval_distributed_two_ranks_equals_one_process(tiny):
    data, ckpt, root = tiny
    one = evaluate([str(ckpt)], data, "test", progress=False, save_sims=str(root / "one.npy"))
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS=str(torch.get_num_threads()))  # the encoders' rounding depends on the thread count
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max_restarts=0",
           "-m", "itm_models.cli.eval", "--checkpoint", str(ckpt), "--data", str(data), "--split", "test",
           "--distributed", "--no-progress", "--save-sims", str(root / "two.npy")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 ranks" in proc.stdout
    for key in ("i2t", "t2i"):
        row = next(line for line in proc.stdout.splitlines() if line.startswith(key))
        vals = [float(x) for x in row.split()[1:]]
        exp = [one[f"{key}_r1"], one[f"{key}_r5"], one[f"{key}_r10"], one[f"{key}_medr"], one[f"{key}_meanr"]]
        np.testing.assert_allclose(vals, exp, atol=0.006)  # the table prints 2 decimals
    assert f"rsum {one['rsum']:.2f}" in proc.stdout
    np.testing.assert_array_equal(np.load(root / "two.npy"), np.load(root / "one.npy"))
