"""The Triton kernel of local_sim (SGRAF's local similarity vectors): it runs in the Triton interpreter on CPU tensors
at tiny sizes and is compared with ``local_sim_reference`` in float64 on the same rounded inputs; a child process
compiles it for sm_80/sm_90 (no GPU needed); the SGRAF-size comparison is marked gpu.

Tolerances (outputs are unit vectors, so these are absolute errors on values in [-1, 1]):
  * float32: ``TOL32`` = 1e-5 absolute against the float64 reference (measured: below 1e-6).
  * bfloat16 / float16: twice the error of the reference computed entirely in that dtype (PyTorch's own error, the
    house rule of ``tests/test_local_sim.py``) plus ``TOL_LOW`` = 2e-3; the kernel multiplies in that dtype with
    float32 accumulation and keeps every normalisation in float32, so it is usually well inside.
The interpreter runs BLOCK_D = BLOCK_S = 16, so d in {16, 40, 64} covers one, a ragged three and four d-chunks and
s = 32 the two-chunk path that writes y and rescales it in place; s = 8 the one-chunk path.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so it is set here at collection (as in
``node_match/test_node_match_triton.py``); if triton was imported earlier without it and there is no GPU, the kernel tests skip
and ``test_kernel_tests_in_fresh_interpreter_process`` runs them in a child pytest with the variable set.
"""
import os
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

triton = pytest.importorskip("triton")

from itm_kernels.local_sim import triton as triton_local_sim  # noqa: E402
from itm_kernels.local_sim import local_sim_reference  # noqa: E402
from itm_kernels.local_sim.triton import local_sim_triton  # noqa: E402
from conftest import assert_close_report  # noqa: E402
from kernel_helpers import REPO, run_kernel_tests_in_child, triton_mode  # noqa: E402

_MODE = triton_mode()
INTERPRET, DEVICE, KERNELS_HERE = _MODE.INTERPRET, _MODE.DEVICE, _MODE.KERNELS_HERE
needs_kernels = _MODE.needs_kernels
TOL32 = 1e-5
TOL_LOW = 2e-3


def make_inputs(n_img, n_cap, K, L_max, d, s, cap_lens, *, seed=0):
    """SGRAF-like float64 problem: unit-norm regions and words, Xavier-scale weight, small bias; caption padding
    poisoned with 1e30 and NaN (never to be read). Returns (images, captions, lens, clean captions, weight, bias)."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: torch.nn.functional.normalize(  # noqa: E731
        torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)
    images, clean = unit(n_img, K, d), unit(n_cap, L_max, d)
    lens = torch.tensor(cap_lens, dtype=torch.long)
    pad = torch.arange(L_max)[None, :] >= lens[:, None]
    clean = clean.masked_fill(pad[..., None], 0.0)
    captions = clean.masked_fill(pad[..., None], 1e30)
    captions[:, :, 0].masked_fill_(pad, float("nan"))
    r = (6.0 / (d + s)) ** 0.5
    weight = (torch.rand(s, d, generator=g, dtype=torch.float64) * 2 - 1) * r
    bias = torch.rand(s, generator=g, dtype=torch.float64) * 0.1 - 0.05
    return images, captions, lens, clean, weight, bias


def run(images, captions, lens, weight, bias, lam):
    return local_sim_triton(images.to(DEVICE), captions.to(DEVICE), lens.to(DEVICE), weight.to(DEVICE),
                            bias.to(DEVICE), lambda_softmax=lam).cpu()


def check(got, images, clean, lens, weight, bias, dtype, lam, what):
    """``got`` against the float64 reference on the inputs as the kernel sees them (features and weight rounded to
    ``dtype``, bias to float32); returns the max error. Padding rows must be exactly zero."""
    x, y, w, b = images.to(dtype), clean.to(dtype), weight.to(dtype), bias.float()
    exact = local_sim_reference(x.double(), y.double(), lens, w.double(), b.double(), lambda_softmax=lam)
    assert got.dtype == torch.float32 and got.shape == exact.shape, (what, got.dtype, got.shape)
    pad = torch.arange(got.shape[2])[None, :] >= lens[:, None]
    assert torch.equal(got[:, pad], torch.zeros_like(got[:, pad])), f"{what}: padding rows not zero"
    err = (got.double() - exact).abs().max().item()
    if dtype == torch.float32:
        allowed = TOL32
    else:
        own = local_sim_reference(x, y, lens, w, b.to(dtype), lambda_softmax=lam, compute_dtype=dtype)
        allowed = 2 * (own.double() - exact).abs().max().item() + TOL_LOW
    assert_close_report(got, exact, atol=allowed, rtol=0, what=f"{what} (max err {err:.2e}, allowed {allowed:.2e})")
    return err


# (K, d, s): 1, 5 and SGRAF's 36 regions (16-, 16- and 64-row tiles); one, three (ragged) and four d-chunks;
# one (s = 8, padded) and two (s = 32) s-chunks.
CASES = [(1, 16, 8), (5, 40, 32), (36, 64, 8), (36, 40, 32), (5, 64, 8), (1, 40, 32)]


@needs_kernels
@pytest.mark.parametrize("K,d,s", CASES)
def test_float32_matches_reference(K, d, s):
    """2 images x 3 captions of 9, 1 and 4 of L_max = 9 words, NaN/1e30 padding, lambda 9 and 4."""
    images, captions, lens, clean, weight, bias = make_inputs(2, 3, K, 9, d, s, [9, 1, 4], seed=K + d + s)
    for lam in (9.0, 4.0):
        got = run(images.float(), captions.float(), lens, weight.float(), bias.float(), lam)
        check(got, images, clean, lens, weight, bias, torch.float32, lam, f"float32 K={K} d={d} s={s} lam={lam}")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """bf16/fp16 features; weight handed over in float32 and bias in float64 (cast by the launcher)."""
    for K, d, s in [(36, 64, 32), (5, 40, 8)]:
        images, captions, lens, clean, weight, bias = make_inputs(2, 3, K, 7, d, s, [7, 2, 1], seed=K + 1)
        got = run(images.to(dtype), captions.to(dtype), lens, weight.float(), bias, 9.0)
        check(got, images, clean, lens, weight, bias, dtype, 9.0, f"{dtype} K={K} d={d} s={s}")


@needs_kernels
def test_padding_content_never_matters():
    images, captions, lens, clean, weight, bias = make_inputs(2, 3, 5, 8, 40, 32, [8, 1, 3], seed=3)
    a = run(images.float(), captions.float(), lens, weight.float(), bias.float(), 9.0)
    b = run(images.float(), clean.float(), lens, weight.float(), bias.float(), 9.0)
    assert torch.equal(a, b)


@needs_kernels
def test_word_blocks_buckets_and_unwritten_memory(monkeypatch):
    """Captions of 40, 20, 1, 33 and 5 words in L_max = 45 with at most 16 words per program (MAX_BLOCK_L lowered):
    the 64-word bucket runs 4 word blocks (the last empty for 33 words), the 32-word bucket 2, the 16-word bucket 1
    whose rows 16..44 are zeroed by the tail loop. The output is allocated full of NaN, so every row must be
    written. Each pair's rows do not depend on the batch it is computed in."""
    monkeypatch.setattr(triton_local_sim, "MAX_BLOCK_L", 16)
    real_empty = torch.empty

    def nan_empty(*args, **kw):
        t = real_empty(*args, **kw)
        return t.fill_(float("nan")) if t.dtype.is_floating_point else t

    images, captions, lens, clean, weight, bias = make_inputs(2, 5, 17, 45, 16, 8, [40, 20, 1, 33, 5], seed=4)
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", nan_empty)
        got = run(images.float(), captions.float(), lens, weight.float(), bias.float(), 9.0)
    check(got, images, clean, lens, weight, bias, torch.float32, 9.0, "word blocks")
    sub = [4, 1]
    part = run(images[1:].float(), captions[sub].float(), lens[sub], weight.float(), bias.float(), 9.0)
    assert_close_report(part, got[1:, sub], atol=1e-6, rtol=0, what="sub-batch")


@needs_kernels
@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), n_img=st.integers(1, 2), n_cap=st.integers(1, 3), K=st.integers(1, 20),
       L=st.integers(1, 9), d=st.sampled_from([16, 23, 40]), s=st.sampled_from([8, 20, 32]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]), lam=st.sampled_from([9.0, 4.0]),
       data=st.data())
def test_property_matches_reference(seed, n_img, n_cap, K, L, d, s, dtype, lam, data):
    lens = data.draw(st.lists(st.integers(1, L), min_size=n_cap, max_size=n_cap), label="cap_lens")
    images, captions, _, clean, weight, bias = make_inputs(n_img, n_cap, K, L, d, s, lens, seed=seed)
    lens = torch.tensor(lens)
    got = run(images.to(dtype), captions.to(dtype), lens, weight.to(dtype), bias.to(dtype), lam)
    check(got, images, clean, lens, weight, bias.to(dtype).double(), dtype, lam, f"{dtype} K={K} d={d} s={s}")


def test_float64_is_a_clear_error():
    images, captions, lens, _, weight, bias = make_inputs(1, 2, 3, 4, 16, 8, [4, 2])
    with pytest.raises(ValueError, match="'torch' backend handles float64"):
        local_sim_triton(images, captions, lens, weight, bias, lambda_softmax=9.0)


def test_too_many_regions_is_a_clear_error():
    images, captions, lens, _, weight, bias = make_inputs(1, 2, triton_local_sim.MAX_K + 1, 4, 16, 8, [4, 2])
    with pytest.raises(ValueError, match=f"at most {triton_local_sim.MAX_K} regions"):
        local_sim_triton(images.float(), captions.float(), lens, weight, bias, lambda_softmax=9.0)


def test_kernel_config_keeps_tiles_legal():
    """Every tile dimension is a power of two >= 16; the word blocks tile the bucket; the K x L tiles and the
    L x s accumulator stay within their register budgets; one s-chunk iff s fits it."""
    for K in (1, 16, 36, 64, 100, 128):
        for bucket in (16, 32, 64, 128, 256):
            for s in (1, 8, 100, 256, 1000, 1024):
                for interpret in (False, True):
                    c, opts = triton_local_sim.kernel_config(torch.bfloat16, K=K, bucket=bucket, s=s,
                                                             interpret=interpret)
                    for name in ("BLOCK_K", "BLOCK_L", "BLOCK_S", "BLOCK_D"):
                        v = c[name]
                        assert v >= 16 and v & (v - 1) == 0, (K, bucket, s, name, v)
                    assert c["BLOCK_K"] >= K and c["NWB"] * c["BLOCK_L"] == bucket
                    assert c["BLOCK_K"] * c["BLOCK_L"] <= max(triton_local_sim.MAX_KL_TILE, 16 * c["BLOCK_K"])
                    assert c["BLOCK_L"] * c["BLOCK_S"] <= triton_local_sim.ACC_VALUES
                    assert c["ONE_S"] == (s <= c["BLOCK_S"])
                    assert opts["num_warps"] == triton_local_sim.NUM_WARPS
    c, _ = triton_local_sim.kernel_config(torch.float32, K=36, bucket=32, s=256)
    assert (c["BLOCK_K"], c["BLOCK_L"], c["NWB"], c["BLOCK_S"], c["ONE_S"]) == (64, 32, 1, 256, True)


# --------------------------------------------------------------------------------------------------------------
# Real GPUs: compile without one; run at SGRAF size with one
# --------------------------------------------------------------------------------------------------------------

_COMPILE = r"""
import json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import compile_check_triton as cc
from itm_kernels.local_sim import triton as tls

ok, why = cc.cuda_compiler_available()
if not ok:
    print(why)
    sys.exit(3)
K, L_OUT, D, S = 36, 64, 1024, 256          # SGRAF: 36 regions, d = 1024, s = 256
for arch in (80, 90):
    for name in ("float32", "bfloat16"):
        for bucket in (32, 64):
            constexprs, options = tls.kernel_config(getattr(torch, name), K=K, bucket=bucket, s=S)
            fn = tls.jit_kernel(False)
            elem = "*" + cc.DTYPES[name]
            types = dict(img_ptr=elem, img_len_ptr="*i64", cap_ptr=elem, cap_idx_ptr="*i32", cap_len_ptr="*i64",
                         cap_range_ptr="*i32", gram_ptr="*fp32", w_ptr=elem, b_ptr="*fp32", out_ptr="*fp32",
                         flag_ptr="*i8", lambda_softmax="fp64")
            values = dict(n_img=1000, n_cap=5000, L_out=L_OUT, D=D, S=S, stride_in=K * D, stride_ik=D,
                          stride_cn=L_OUT * D, stride_ct=D, stride_ws=D, stride_oi=5000 * L_OUT * S,
                          stride_oc=L_OUT * S)
            sig, ce, attrs = cc._specialize(fn, types, values, constexprs)
            c = triton.compile(ASTSource(fn, sig, constexprs=ce, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                               options=options)
            info = dict(arch=arch, dtype=name, bucket=bucket, cubin_bytes=len(c.asm["cubin"]),
                        shared=c.metadata.shared)
            info.update(cc._resources(c.asm["cubin"]))
            print(json.dumps(info))
"""


@pytest.mark.slow  # ~15-40 s each; .ci/run runs the slow tests and tools/compile_check_triton.py
def test_compiles_for_sm80_and_sm90(tmp_path):
    """The kernel compiles to a cubin for sm_80 and sm_90, float32 and bfloat16, the 32-word bucket (one program per
    pair) and the 64-word one (two word blocks) at SGRAF size (K = 36, d = 1024, s = 256), with the launcher's
    constexprs, in a fresh process without TRITON_INTERPRET and an empty cache; no register spill (measured:
    165-255 registers, 0 bytes of stack)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path), TRITON_ALWAYS_COMPILE="1")
    proc = subprocess.run([sys.executable, "-c", _COMPILE, str(REPO / "tools"), str(REPO)], env=env,
                          capture_output=True, text=True, timeout=600)
    if proc.returncode == 3:
        pytest.skip(f"triton's CUDA compiler backend is unavailable: {proc.stdout.strip()}")
    assert proc.returncode == 0, f"compile failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(results) == 8
    for info in results:
        assert info["cubin_bytes"] > 0, info
        assert info.get("stack", 0) == 0 and info.get("local", 0) == 0, f"register spills: {info}"


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or not KERNELS_HERE, reason="needs compiled kernels on a CUDA device (the "
                    "gpu-marked fresh-process test runs this)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sgraf_size_on_gpu(dtype):
    """SGRAF size: 36 regions, d = 1024, s = 256, lambda 9, captions of 1..60 words (16/32/64 buckets, the last in
    two word blocks)."""
    lens = [1, 5, 12, 16, 17, 23, 31, 32, 33, 47, 60, 9]
    images, captions, lens, clean, weight, bias = make_inputs(4, len(lens), 36, 60, 1024, 256, lens, seed=14)
    got = run(images.to(dtype), captions.to(dtype), lens, weight.to(dtype), bias.float(), 9.0)
    check(got, images, clean, lens, weight, bias, dtype, 9.0, f"SGRAF size {dtype}")


def _run_kernel_tests_in_child(interpret: str, marks: str):
    run_kernel_tests_in_child(__file__, interpret, marks=marks)


@pytest.mark.skipif(KERNELS_HERE, reason="the kernel tests run in this process")
def test_kernel_tests_in_fresh_interpreter_process():
    """This session imported triton before TRITON_INTERPRET=1 could be set: run the kernel tests in a child."""
    _run_kernel_tests_in_child("1", "not gpu and not slow")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or DEVICE == "cuda", reason="needs a CUDA device; runs when this "
                    "process interprets the kernels")
def test_kernel_tests_on_gpu_in_fresh_process():
    """The kernel tests, SGRAF size included, compiled and run on the GPU."""
    _run_kernel_tests_in_child("0", "not slow")


# ------------------------------------------------------------------------------------------------------------------
# The kernel behind the public API: local_sim(backend="triton")
# ------------------------------------------------------------------------------------------------------------------

@needs_kernels
def test_public_api_backend_triton_and_its_gradients():
    """local_sim(backend="triton") returns the kernel's output, and autograd through it (the fused Triton backward)
    gives the gradients of backend="torch" on the same inputs, within float32 summation-order noise relative to the
    gradients' size (rtol 2e-5: the two backwards sum in different orders; both are checked against the float64
    reference in test_local_sim_triton_backward.py)."""
    from itm_kernels.local_sim import local_sim

    images, captions, lens, clean, weight, bias = make_inputs(2, 3, 5, 6, 16, 8, [6, 2, 1], seed=7)
    args = [t.float().to(DEVICE) for t in (images, clean, lens, weight, bias)]
    args[2] = lens.to(DEVICE)
    direct = local_sim_triton(*args, lambda_softmax=9.0)
    leaves = [t.clone().requires_grad_(True) for t in (args[0], args[1])]
    got = local_sim(leaves[0], leaves[1], args[2], args[3], args[4], backend="triton")
    assert torch.equal(got.detach(), direct)
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    got.backward(grad)
    ref_leaves = [t.clone().requires_grad_(True) for t in (args[0], args[1])]
    local_sim(ref_leaves[0], ref_leaves[1], args[2], args[3], args[4], backend="torch").backward(grad)
    for a, b in zip(leaves, ref_leaves):
        assert_close_report(a.grad, b.grad, atol=1e-5, rtol=2e-5, what="gradient through backend='triton'")


@needs_kernels
def test_public_api_rejects_float64_and_auto_never_picks_triton(monkeypatch):
    import importlib

    local_sim_module = importlib.import_module("itm_kernels.local_sim")   # the package exports the function
    images, captions, lens, clean, weight, bias = make_inputs(1, 2, 3, 4, 16, 8, [4, 1])
    with pytest.raises(ValueError, match="float64"):
        local_sim_module.local_sim(images.to(DEVICE), clean.to(DEVICE), lens.to(DEVICE), weight.to(DEVICE),
                                   bias.to(DEVICE), backend="triton")
    monkeypatch.setattr(triton_local_sim, "local_sim_triton", lambda *a, **k: pytest.fail("auto picked triton"))
    local_sim_module.local_sim(images.float(), clean.float(), lens, weight.float(), bias.float())
