"""The Triton backend of node_match: the kernel runs in the Triton interpreter on CPU tensors at tiny sizes and is
compared with the float64 ``node_match_reference``; a child process compiles it for sm_80/sm_90 (no GPU needed);
the GSMN-size comparison is marked gpu.

``TRITON_INTERPRET=1`` must be set before triton is first imported, so it is set here at collection (as in
``xattn_sim/test_xattn_sim_triton.py``); if triton was imported earlier without it and there is no GPU, the kernel tests skip and
``test_kernel_tests_in_fresh_interpreter_process`` runs them in a child pytest with the variable set.
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

triton = pytest.importorskip("triton")

import itm_kernels._common.dispatch  # noqa: E402
from itm_kernels.node_match import triton as triton_node_match  # noqa: E402
from itm_kernels.node_match import node_match, node_match_reference  # noqa: E402
from conftest import assert_close_report  # noqa: E402
from kernel_helpers import REPO, run_kernel_tests_in_child, triton_mode  # noqa: E402

_MODE = triton_mode()
INTERPRET, DEVICE, KERNELS_HERE = _MODE.INTERPRET, _MODE.DEVICE, _MODE.KERNELS_HERE
needs_kernels = _MODE.needs_kernels
# float32 kernel against float64 truth: at most twice the error of the reference run in float32, plus TOL32.
TOL32 = 1e-5


def make_inputs(n_img, n_cap, K, L_max, d, cap_lens, *, seed=0):
    """GSMN-scale features (unit-norm rows) with poisoned padding: NaN and 1e30 words beyond the lengths, which the
    kernel must never read. Returns (images, captions, lens, clean captions), float64."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=2)
    captions = torch.nn.functional.normalize(torch.randn(n_cap, L_max, d, generator=g, dtype=torch.float64), dim=2)
    lens = torch.tensor(cap_lens, dtype=torch.long)
    pad = torch.arange(L_max)[None, :] >= lens[:, None]
    clean = captions.masked_fill(pad[..., None], 0.0)
    captions = captions.masked_fill(pad[..., None], 1e30)
    captions[:, :, 0].masked_fill_(pad, float("nan"))
    return images, captions, lens, clean


def run(images, captions, lens, **opts):
    region, word = node_match(images.to(DEVICE), captions.to(DEVICE), lens, backend="triton", **opts)
    return region.cpu(), word.cpu()


def check_against_reference(got, images, clean, lens, dtype, what, **opts):
    """got (region, word) vs the float64 reference on the inputs rounded to ``dtype``, allowing twice the error of
    the reference computed in float32 (low-precision inputs are computed in float32) plus TOL32."""
    x, y = images.to(dtype), clean.to(dtype)
    exact = node_match_reference(x.double(), y.double(), lens, **opts)
    f32 = node_match_reference(x.float(), y.float(), lens, **opts)
    for name, g, e, t in zip(("region", "word"), got, exact, f32):
        assert g.dtype == torch.float32 and g.shape == e.shape, (name, g.dtype, g.shape)
        torch_err = (t.double() - e).abs().max().item()
        assert_close_report(g, e, atol=2 * torch_err + TOL32, rtol=0, what=f"{what} {name}")


# (d, num_blocks): block widths 16 (one step), 32 (two steps per block), 2 and 3 (several blocks per step), 4 with
# the last step half masked (10 blocks in steps of 4), 5 (blocks padded to 8 columns).
BLOCK_CASES = [(32, 2), (64, 2), (64, 4), (32, 16), (36, 12), (40, 10), (30, 6)]


@needs_kernels
@pytest.mark.parametrize("d,num_blocks", BLOCK_CASES)
def test_float32_matches_reference(d, num_blocks):
    """2 images x 3 captions, K = 5, lengths 6, 1, 3 of L_max = 7 (row 6 padding for everyone), garbage padding."""
    images, captions, lens, clean = make_inputs(2, 3, 5, 7, d, [6, 1, 3], seed=d + num_blocks)
    for lam in (20.0, 4.0):
        opts = dict(lambda_softmax=lam, num_blocks=num_blocks)
        got = run(images.float(), captions.float(), lens, **opts)
        check_against_reference(got, images, clean, lens, torch.float32, f"float32 d={d} {opts}", **opts)
        for c, n in enumerate(lens.tolist()):
            assert torch.equal(got[1][:, c, n:], torch.zeros_like(got[1][:, c, n:])), f"word rows >= {n} not zero"


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_inputs(dtype):
    """bf16/fp16 inputs: exact products, float32 everything else, float32 outputs."""
    images, captions, lens, clean = make_inputs(2, 3, 5, 6, 64, [6, 2, 4], seed=11)
    for num_blocks in (4, 16):
        opts = dict(lambda_softmax=20.0, num_blocks=num_blocks)
        got = run(images.to(dtype), captions.to(dtype), lens, **opts)
        check_against_reference(got, images, clean, lens, dtype, f"{dtype} {opts}", **opts)


@needs_kernels
def test_padding_content_never_matters():
    images, captions, lens, clean = make_inputs(2, 3, 5, 7, 32, [7, 1, 4], seed=3)
    opts = dict(lambda_softmax=9.0, num_blocks=4)
    a = run(images.float(), captions.float(), lens, **opts)
    b = run(images.float(), clean.float(), lens, **opts)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@needs_kernels
def test_length_buckets_masked_regions_and_sub_batches():
    """Captions in the 16- and 32-word buckets, K = 17 regions (a 32-row tile, 15 masked), d = 48 in 3 blocks; each
    pair's rows do not depend on the batch it is computed in."""
    lens = [1, 20, 17, 5, 16]
    images, captions, lens, clean = make_inputs(2, 5, 17, 21, 48, lens, seed=5)
    opts = dict(lambda_softmax=10.0, num_blocks=3)
    got = run(images.float(), captions.float(), lens, **opts)
    check_against_reference(got, images, clean, lens, torch.float32, "buckets", **opts)
    sub = [4, 1]
    part = run(images[1:].float(), captions[sub].float(), lens[sub], **opts)
    for p, g in zip(part, got):
        assert_close_report(p, g[1:, sub], atol=1e-6, rtol=0, what="sub-batch")


@needs_kernels
def test_oversize_inputs_go_to_torch(monkeypatch):
    """Caption buckets beyond MAX_ROWS words and images beyond MAX_ROWS regions run on the "torch" backend (here with
    MAX_ROWS lowered to 16): the kernel's and torch's captions are merged into one correct output."""
    monkeypatch.setattr(triton_node_match, "MAX_ROWS", 16)
    images, captions, lens, clean = make_inputs(2, 3, 5, 20, 32, [20, 3, 17], seed=6)
    opts = dict(lambda_softmax=20.0, num_blocks=2)
    got = run(images.float(), captions.float(), lens, **opts)
    check_against_reference(got, images, clean, lens, torch.float32, "long captions via torch", **opts)
    images, captions, lens, clean = make_inputs(1, 2, 17, 4, 16, [4, 2], seed=7)
    got = run(images.float(), captions.float(), lens, **opts)
    check_against_reference(got, images, clean, lens, torch.float32, "many regions via torch", **opts)


def _count_kernel_calls(monkeypatch):
    calls = []
    real = triton_node_match.node_match_triton

    def counted(*args, **kw):
        calls.append(args[0].dtype)
        return real(*args, **kw)

    monkeypatch.setattr(triton_node_match, "node_match_triton", counted)
    return calls


@needs_kernels
def test_autograd_through_triton_backend(monkeypatch):
    """Training through backend="triton": its forward, the shared registered backward (tiled torch recomputation).
    Gradients equal those through backend="torch" and match the float64 reference's autograd."""
    calls = _count_kernel_calls(monkeypatch)
    images, captions, lens, clean = make_inputs(2, 3, 5, 6, 32, [6, 1, 4], seed=8)
    g = torch.Generator().manual_seed(1)
    gr, gw = torch.randn(2, 3, 5, 4, generator=g), torch.randn(2, 3, 6, 4, generator=g)
    gw[:, 1, 1:] = 0
    gw[:, 2, 4:] = 0
    opts = dict(lambda_softmax=9.0, num_blocks=4)

    def grads(backend, dtype, caps):
        x = images.to(dtype).to(DEVICE).requires_grad_()
        y = caps.to(dtype).to(DEVICE).requires_grad_()
        if backend == "reference64":
            region, word = node_match_reference(x, y, lens, **opts)
        else:
            region, word = node_match(x, y, lens, backend=backend, **opts)
        ((region * gr.to(region)).sum() + (word * gw.to(word)).sum()).backward()
        return x.grad.cpu(), y.grad.cpu()

    got = grads("triton", torch.float32, clean)
    assert calls == [torch.float32]
    ref_torch = grads("torch", torch.float32, clean)
    exact = grads("reference64", torch.float64, clean)
    for name, a, b, e in zip(("images", "captions"), got, ref_torch, exact):
        assert torch.equal(a, b), f"{name}: the backward differs between the triton and torch backends"
        assert_close_report(a, e, atol=1e-4, rtol=1e-4, what=f"grad {name}")


@needs_kernels
def test_opcheck_triton_backend():
    images, captions, lens, _ = make_inputs(1, 2, 3, 4, 16, [4, 2], seed=9)
    args = (images.float().to(DEVICE), captions.float().to(DEVICE), lens.to(DEVICE), 9.0, 2, "triton", 0)
    torch.library.opcheck(torch.ops.itm_kernels.node_match.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_static"))


@needs_kernels
def test_float64_runs_on_torch(monkeypatch):
    """float64 inputs (Triton's float64 tl.dot is limited) run the "torch" backend's tiles, bit for bit."""
    calls = _count_kernel_calls(monkeypatch)
    images, captions, lens, _ = make_inputs(2, 3, 5, 6, 32, [6, 1, 4], seed=10)
    got = node_match(images.to(DEVICE), captions.to(DEVICE), lens, backend="triton", num_blocks=2)
    want = node_match(images.to(DEVICE), captions.to(DEVICE), lens, backend="torch", num_blocks=2)
    assert calls == [] and got[0].dtype == torch.float64
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_auto_never_picks_triton_on_cpu(monkeypatch):
    calls = _count_kernel_calls(monkeypatch)
    images, captions, lens, _ = make_inputs(1, 2, 3, 4, 32, [4, 2], seed=12)
    node_match(images.float(), captions.float(), lens, num_blocks=2)
    assert calls == []


def test_unavailable_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(itm_kernels._common.dispatch, "available_backends", lambda device=None: ["torch", "reference"])
    images, captions, lens, _ = make_inputs(1, 2, 3, 4, 32, [4, 2], seed=13)
    with pytest.raises(ValueError, match="backend 'triton' is not available for cpu tensors"):
        node_match(images.float(), captions.float(), lens, num_blocks=2, backend="triton")


def test_kernel_config_keeps_tiles_legal():
    """Every tl.dot dimension is a power of two >= 16, the per-block reshape is of powers of two, and the steps
    cover every block's columns, whatever the sizes."""
    for d, num_blocks in [(1024, 16), (1024, 1), (1024, 1024), (48, 16), (36, 12), (30, 6), (7, 7), (100, 4)]:
        db = d // num_blocks
        for chunk in (None, 16, 32, 64):
            c, _ = triton_node_match.kernel_config(torch.bfloat16, K=36, block_l=32, d=d, num_blocks=num_blocks,
                                                   chunk=chunk)
            sub, bpc = c["SUB"], c["BPC"]
            assert sub & (sub - 1) == 0 and bpc & (bpc - 1) == 0 and sub * bpc >= 16, (d, num_blocks, c)
            assert sub >= db or sub == (chunk or triton_node_match.TARGET_CHUNK), (d, num_blocks, c)
            assert c["BLOCK_K"] == 64 and c["BLOCK_L"] == 32


# --------------------------------------------------------------------------------------------------------------
# Real GPUs: compile without one; run at GSMN size with one
# --------------------------------------------------------------------------------------------------------------

_COMPILE = r"""
import json, os, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
import compile_check_triton as cc
from itm_kernels.node_match import triton as tn

ok, why = cc.cuda_compiler_available()
if not ok:
    print(why)
    sys.exit(3)
K, L_OUT, D, NB = 36, 64, 1024, 16          # GSMN: 36 regions, 1024 features in 16 blocks
for arch in (80, 90):
    for name in ("float32", "bfloat16"):
        for block_l in (16, 64):
            dtype = getattr(torch, name)
            constexprs, options = tn.kernel_config(dtype, K=K, block_l=block_l, d=D, num_blocks=NB)
            fn = tn.jit_kernel(False)
            elem = "*" + cc.DTYPES[name]
            types = dict(img_ptr=elem, cap_ptr=elem, cap_idx_ptr="*i32", cap_len_ptr="*i64", cap_range_ptr="*i32",
                         region_ptr="*fp32", word_ptr="*fp32", lambda_softmax="fp64")
            values = dict(n_img=1000, n_cap=5000, K=K, L_out=L_OUT, D=D, DB=D // NB, NB=NB,
                          stride_in=K * D, stride_ik=D, stride_cn=L_OUT * D, stride_ct=D)
            sig, ce, attrs = cc._specialize(fn, types, values, constexprs)
            c = triton.compile(ASTSource(fn, sig, constexprs=ce, attrs=attrs), target=GPUTarget("cuda", arch, 32),
                               options=options)
            info = dict(arch=arch, dtype=name, block_l=block_l, cubin_bytes=len(c.asm["cubin"]),
                        shared=c.metadata.shared)
            info.update(cc._resources(c.asm["cubin"]))
            print(json.dumps(info))
"""


@pytest.mark.slow  # ~15-40 s each; .ci/run runs the slow tests and tools/compile_check_triton.py
def test_compiles_for_sm80_and_sm90(tmp_path):
    """The kernel compiles to a cubin for sm_80 and sm_90, float32 and bfloat16, 16- and 64-word buckets at GSMN size
    (K = 36, d = 1024, 16 blocks), with the launcher's constexprs, in a fresh process without TRITON_INTERPRET and
    an empty cache; at most 64 bytes of register spill (measured: 8 bytes for float32 at 32 words on sm_90)."""
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
        assert info.get("stack", 0) <= 64 and info.get("local", 0) == 0, f"register spills: {info}"


@pytest.mark.gpu
@pytest.mark.skipif(DEVICE != "cuda" or not KERNELS_HERE, reason="needs compiled kernels on a CUDA device (the "
                    "gpu-marked fresh-process test runs this)")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gsmn_size_on_gpu(dtype):
    """GSMN size: 36 regions, d = 1024 in 16 blocks, lambda 20, captions of 1..60 words (16/32/64 buckets)."""
    lens = [1, 5, 12, 16, 17, 23, 31, 32, 33, 47, 60, 9]
    images, captions, lens, clean = make_inputs(4, len(lens), 36, 60, 1024, lens, seed=14)
    opts = dict(lambda_softmax=20.0, num_blocks=16)
    got = run(images.to(dtype), captions.to(dtype), lens, **opts)
    check_against_reference(got, images, clean, lens, dtype, f"GSMN size {dtype}", **opts)


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
    """The kernel tests, GSMN size included, compiled and run on the GPU."""
    _run_kernel_tests_in_child("0", "not slow")
