"""Tiny SGRAF / GSMN models with random embeddings for the streaming tests."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from itm_models import GSMN, GSMNConfig, SGRAF, SGRAFConfig


def small_model_and_embs(name: str, n_img: int = 5, cpi: int = 2, K: int = 36, L: int = 5, d: int = 32):
    torch.manual_seed(0)
    if name == "sgraf":
        model = SGRAF.from_config(SGRAFConfig(vocab_size=9, img_dim=8, embed_size=d, sim_dim=16, word_dim=8))
    else:
        model = GSMN.from_config(GSMNConfig(vocab_size=9, img_dim=8, embed_size=d, word_dim=8, variant="dense"))
    model.eval()
    img = F.normalize(torch.randn(n_img, K, d), dim=-1)
    cap = F.normalize(torch.randn(n_img * cpi, L, d), dim=-1)
    lens = torch.randint(1, L + 1, (n_img * cpi,))
    lens[0] = L
    graph = None
    if name == "gsmn":
        xy = torch.rand(n_img, K, 2) * 50
        boxes = torch.cat([xy, xy + 1 + torch.rand(n_img, K, 2) * 40], -1)
        sizes = torch.full((n_img, 2), 100.0)
        graph = (boxes, sizes, None)
    return model, img, cap, lens, graph
