"""Issue 14: node_match_fused_ rejects a repeated cap_index (two threads would write one output slice)."""
from __future__ import annotations

import re

import pytest
import torch

import itm_kernels
from itm_kernels._common.dispatch import load_extension

pytestmark = pytest.mark.skipif("cpu" not in itm_kernels.available_backends("cpu"),
                                reason="compiled extension itm_kernels._C not built")


def test_node_match_rejects_duplicate_cap_index():
    load_extension()
    f32 = dict(dtype=torch.float32)
    a = dict(region=torch.empty(2, 3, 4, 16, **f32), word=torch.empty(2, 3, 5, 16, **f32),
             img_blk=torch.zeros(2, 4, 2, 16, **f32), cap_blk=torch.zeros(3, 8, 2, 16, **f32),
             img_gram=torch.zeros(2, 4, 4, 16, **f32), img_sq=torch.ones(2, 4, 16, **f32),
             cap_gram=torch.zeros(3, 5, 5, 16, **f32), cap_sq=torch.ones(3, 5, 16, **f32),
             lens=torch.tensor([5, 1, 3]))

    def call(index):
        torch.ops.itm_kernels.node_match_fused_(a["region"], a["word"], a["img_blk"], a["cap_blk"], a["img_gram"],
                                                a["img_sq"], a["cap_gram"], a["cap_sq"], a["lens"], index, 20.0)

    call(torch.tensor([0, 2, 1]))
    with pytest.raises(RuntimeError, match=re.escape("cap_index must not repeat an entry: cap_index[0] = "
                                                     "cap_index[2] = 0")):
        call(torch.tensor([0, 1, 0]))
