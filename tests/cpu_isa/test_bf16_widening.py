"""bfloat16 never falls off a cliff: on a CPU without a native bfloat16 dot product no bfloat16 matrix product runs
in the models; every one is widened to float32 (itm_kernels/_common/bf16_widen.py).

"No native bf16" is forced by monkeypatching :func:`native_bf16` (the python side) and, for the C++ kernels, by
``_C._set_simd_level("avx2")`` (below AVX-512 the kernels widen bfloat16 themselves). A TorchDispatchMode records
every ATen matrix-product op with a bfloat16 operand; the test asserts there is none in a SGRAF (SGR and SAF) and a
GSMN forward (training mode, autograd on) and ``sims`` (evaluation) with bfloat16 parameters and inputs. Checked
path: the widening mode; the result is compared with the float32 model on the same (bfloat16-rounded) values.
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from itm_kernels._common import bf16_widen
from itm_kernels._common.dispatch import load_extension
from itm_models.gsmn import GSMNSimilarity
from itm_models.sgraf import SGRAFSimilarity

_C = load_extension()
aten = torch.ops.aten
MATMUL_OPS = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.baddbmm.default, aten.mv.default,
              aten.addmv.default, aten.matmul.default, aten.dot.default, aten._addmm_activation.default,
              aten.linear.default}


class RecordBf16Matmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in MATMUL_OPS or "gru" in str(func) or "lstm" in str(func):
            flat = torch.utils._pytree.tree_leaves((args, kwargs))
            if any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16 for t in flat):
                self.seen.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture()
def no_native_bf16(monkeypatch):
    monkeypatch.setattr(bf16_widen, "native_bf16", lambda: False)
    for mod in ("itm_models.sgraf.head",):
        monkeypatch.setattr(f"{mod}.native_bf16", lambda: False)
    before = None
    if _C is not None and hasattr(_C, "_set_simd_level"):
        before = _C.build_info()["simd"]
        _C._set_simd_level("avx2")
    yield
    if before is not None:
        _C._set_simd_level(before)


def _inputs(n_img=3, n_cap=4, K=5, L=6, d=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g), dim=-1)
    lens = torch.tensor([L, 1, 4, 3][:n_cap])
    return img.bfloat16(), cap.bfloat16(), lens


@pytest.mark.parametrize("module", ["SGR", "SAF"])
def test_sgraf_runs_no_bf16_matmul(no_native_bf16, module):
    torch.manual_seed(0)
    head = SGRAFSimilarity(embed_size=64, sim_dim=64, module=module)
    img, cap, lens = _inputs(K=36)
    ref_train = head(img.float(), cap.float(), lens)
    ref_sims = head.sims(img.float(), cap.float(), lens)
    head_bf16 = SGRAFSimilarity(embed_size=64, sim_dim=64, module=module).bfloat16()
    head_bf16.load_state_dict({k: v.bfloat16() if v.is_floating_point() else v for k, v in head.state_dict().items()})
    with RecordBf16Matmuls() as rec:
        out = head_bf16(img, cap, lens)
        out.float().sum().backward()
        sims = head_bf16.sims(img, cap, lens)
        sims_cast = head.sims(img, cap, lens, dtype=torch.bfloat16)
    assert rec.seen == [], sorted(set(rec.seen))
    # bfloat16 parameters and activations: only bfloat16 rounding differs from the float32 model.
    assert torch.allclose(out.float(), ref_train, atol=0.05), (out, ref_train)
    assert torch.allclose(sims.float(), ref_sims, atol=0.05)
    assert torch.allclose(sims_cast.float(), ref_sims, atol=0.02)


def test_gsmn_runs_no_bf16_matmul(no_native_bf16):
    torch.manual_seed(0)
    head = GSMNSimilarity("dense", 20.0, False, embed_size=64)
    img, cap, lens = _inputs()
    g = torch.Generator().manual_seed(1)
    xy = torch.rand(3, 5, 2, generator=g) * 0.6
    boxes = torch.cat([xy, xy + 0.05 + torch.rand(3, 5, 2, generator=g) * 0.3], dim=-1)
    ref_train = head(img.float(), cap.float(), lens, boxes)
    ref_sims = head.eval().sims(img.float(), cap.float(), lens, boxes)
    head_bf16 = GSMNSimilarity("dense", 20.0, False, embed_size=64).bfloat16()
    head_bf16.load_state_dict({k: v.bfloat16() if v.is_floating_point() else v for k, v in head.state_dict().items()})
    with RecordBf16Matmuls() as rec:
        out = head_bf16(img, cap, lens, boxes)
        out.float().sum().backward()
        sims = head_bf16.eval().sims(img, cap, lens, boxes)
    assert rec.seen == [], sorted(set(rec.seen))
    assert torch.allclose(out.float(), ref_train, atol=0.05), (out, ref_train)
    assert torch.allclose(sims.float(), ref_sims, atol=0.05)


def test_the_recorder_sees_bf16_matmuls_without_the_mode():
    """The check above can fail: the same recorder reports a plain bfloat16 product."""
    a = torch.randn(4, 8).bfloat16()
    with RecordBf16Matmuls() as rec:
        torch.mm(a, a.t())
        torch.nn.functional.linear(a, a)
    assert rec.seen


def test_the_mode_widens_with_float32_accumulation():
    """Under the mode a bfloat16 product equals the float32 product of the widened values rounded once to
    bfloat16 (autograd included: the gradient is the float32 one, rounded)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(16, 300, generator=g).bfloat16().requires_grad_()
    b = torch.randn(300, 8, generator=g).bfloat16()
    with bf16_widen.widen_bf16_matmuls(enabled=True):
        y = a @ b
        y2 = torch.addmm(torch.zeros(8, dtype=torch.bfloat16), a, b)
    assert y.dtype == torch.bfloat16
    want = (a.detach().float() @ b.float()).bfloat16()
    assert torch.equal(y, want) and torch.equal(y2, want)
    y.float().sum().backward()
    assert a.grad.dtype == torch.bfloat16
    assert torch.equal(a.grad, (torch.ones(16, 8) @ b.float().t()).bfloat16())
