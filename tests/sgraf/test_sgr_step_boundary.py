"""Issue 14: the raw SGR ops reject empty inputs with a clear error (it was std::bad_alloc)."""
from __future__ import annotations

import re

import pytest
import torch

import itm_kernels
from itm_kernels._common.dispatch import load_extension

pytestmark = pytest.mark.skipif("cpu" not in itm_kernels.available_backends("cpu"),
                                reason="compiled extension itm_kernels._C not built")


def test_sgr_ops_reject_zero_pairs():
    load_extension()
    if not hasattr(torch.ops.itm_kernels, "sgr_step_"):
        pytest.skip("sgr_step_ not compiled")
    s = 64
    x = torch.zeros(0, 3, s)
    pg, c, b = torch.zeros(s, 2 * s), torch.zeros(s), torch.zeros(s)
    with pytest.raises(RuntimeError, match=re.escape("sgr_step_: x must hold at least one pair")):
        torch.ops.itm_kernels.sgr_step_(x, pg, c, b, torch.zeros(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match=re.escape("sgr_global_attend: x must hold at least one pair")):
        torch.ops.itm_kernels.sgr_global_attend(x, torch.zeros(0, s), torch.zeros(0, dtype=torch.long))
    with pytest.raises(RuntimeError, match=re.escape("at least one node")):
        torch.ops.itm_kernels.sgr_step_(torch.zeros(2, 0, s), pg, c, b, torch.ones(2, dtype=torch.long))
