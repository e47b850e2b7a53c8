"""2-rank gloo evaluation (torch.distributed.run in a subprocess) equals 1-rank; a dying rank fails, no hang."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from itm_models.eval.distributed import read_world
from itm_models.eval.streaming import streaming_recall, streaming_topk, xattn_tile_fn

REPO = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("dist_worker.py")


def launch(n: int, out: Path, mode: str, timeout: float):
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               OMP_NUM_THREADS="1", ITM_DIST_TIMEOUT="15")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
           "--max_restarts=0", str(WORKER), str(out), mode]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


@pytest.fixture(scope="module")
def one_rank():
    sys.path.insert(0, str(WORKER.parent))
    from dist_worker import inputs, scan_topk
    im, cap, lens = inputs()
    tile = xattn_tile_fn(im, cap, lens, backend="cpu")
    metrics, ranks = streaming_recall(tile, 11, 5, img_chunk=3, cap_chunk=8, return_ranks=True)
    return {"metrics": metrics, "ranks": ranks,
            "topk_i": streaming_topk(tile, 11, 55, 7, queries="images", img_chunk=3, cap_chunk=8),
            "topk_c": streaming_topk(tile, 11, 55, 4, queries="captions", img_chunk=3, cap_chunk=8),
            "sims": tile(0, 11, 0, 55).numpy(), **scan_topk(im, cap, lens)}


def test_two_ranks_gloo_equal_one(tmp_path, one_rank):
    proc = launch(2, tmp_path, "ok", timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "result.pt", weights_only=False)
    assert got["world"] == 2
    assert got["metrics"] == one_rank["metrics"]
    for key in ("i2t_ranks", "t2i_ranks"):
        np.testing.assert_array_equal(got["ranks"][key], one_rank["ranks"][key])
    for key in ("topk_i", "topk_c", "scan_topk_i", "scan_topk_c"):
        assert all(torch.equal(a, b) for a, b in zip(got[key], one_rank[key])), key
    np.testing.assert_array_equal(np.load(tmp_path / "sims.npy"), one_rank["sims"])


@pytest.mark.slow
def test_rank_dies_mid_run_fails_without_hang(tmp_path):
    proc = launch(2, tmp_path, "die", timeout=120)  # a hang would raise TimeoutExpired
    assert proc.returncode != 0
    assert not (tmp_path / "result.pt").exists()
    assert "exitcode" in proc.stderr or "failed" in proc.stderr.lower(), proc.stderr[-2000:]


@pytest.mark.parametrize("env, msg", [
    ({}, "needs the environment variable RANK"),
    ({"RANK": "0", "WORLD_SIZE": "0"}, "WORLD_SIZE must be a positive int"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, r"RANK must lie in 0\.\.1"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE must be an integer"),
    ({"RANK": "0", "WORLD_SIZE": "-3"}, "WORLD_SIZE must be a positive int"),
])
def test_bad_world(env, msg):
    with pytest.raises(ValueError, match=msg):
        read_world(env)
