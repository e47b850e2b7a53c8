"""Worker launched by tests/scale/test_distributed.py under ``python -m torch.distributed.run``.

argv: OUT_DIR MODE (``ok`` | ``die``). Scores a fixed synthetic gallery with the cpu xattn_sim backend through
the streaming evaluation, and a SCAN head's top-k through the in-kernel top-k (similarity_topk, images sharded
over the ranks); rank 0 saves the metrics, ranks and top-k lists to OUT_DIR/result.pt. MODE ``die``: rank 1
exits mid-run (after its first tile), the others must fail with an error, not hang.
"""
import os
import sys

import torch

from itm_models.eval.distributed import init_distributed
from itm_models.eval.streaming import (save_sims_npy, similarity_topk, streaming_recall, streaming_topk,
                                       xattn_tile_fn)


def inputs():
    g = torch.Generator().manual_seed(7)
    im = torch.randn(11, 5, 16, generator=g)
    cap = torch.randn(55, 6, 16, generator=g)
    lens = torch.randint(1, 7, (55,), generator=g)
    cap[3] = cap[0]; lens[3] = lens[0]   # exact ties
    im[9] = im[2]
    return im, cap, lens


def scan_model():
    """A SCAN head whose top-k runs the in-kernel CPU top-k (similarity_topk -> SCAN.topk -> xattn_topk)."""
    from itm_models import SCAN, SCANConfig
    return SCAN(SCANConfig(vocab_size=9, img_dim=8, embed_size=16, word_dim=8), backend="cpu")


def scan_topk(im, cap, lens):
    model = scan_model()
    return {"scan_topk_i": similarity_topk(model, im, cap, lens, 7, queries="images"),
            "scan_topk_c": similarity_topk(model, im, cap, lens, 6, queries="captions")}


def main():
    out_dir, mode = sys.argv[1], sys.argv[2]
    rank, size, _ = init_distributed("cpu", timeout_s=float(os.environ.get("ITM_DIST_TIMEOUT", "20")))
    im, cap, lens = inputs()
    base = xattn_tile_fn(im, cap, lens, backend="cpu")
    calls = [0]

    def tile(i0, i1, c0, c1):
        calls[0] += 1
        if mode == "die" and rank == 1 and calls[0] == 2:
            os._exit(3)
        return base(i0, i1, c0, c1)

    metrics, ranks = streaming_recall(tile, 11, 5, img_chunk=3, cap_chunk=8, return_ranks=True)
    topk_i = streaming_topk(tile, 11, 55, 7, queries="images", img_chunk=3, cap_chunk=8)
    topk_c = streaming_topk(tile, 11, 55, 4, queries="captions", img_chunk=3, cap_chunk=8)
    save_sims_npy(tile, 11, 55, os.path.join(out_dir, "sims.npy"), img_chunk=3, cap_chunk=8)
    scan = scan_topk(im, cap, lens)
    if rank == 0:
        torch.save({"metrics": metrics, "ranks": ranks, "topk_i": topk_i, "topk_c": topk_c, "world": size, **scan},
                   os.path.join(out_dir, "result.pt"))


if __name__ == "__main__":
    main()
