"""The Triton backend of xattn_sim: the kernels run in the Triton interpreter on CPU tensors and are compared with
the float64 reference; CI also compiles them for sm_80 and sm_90 (no GPU needed).

``TRITON_INTERPRET=1`` must be set before triton is first imported (triton builds its own tl.sum/tl.max/... for
the interpreter or for the compiler at import), so it is set here, at collection, before this module imports
triton. If a module collected earlier already imported triton without it (and there is no GPU), the kernel tests
skip here and ``test_kernel_tests_in_fresh_interpreter_process`` runs them in a child pytest with the variable set.
The compile check runs in a child process without it.
"""
import os
import sys

_TRITON_PREIMPORTED = "triton" in sys.modules
if not _TRITON_PREIMPORTED:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import json  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

triton = pytest.importorskip("triton")

from itm_kernels.xattn_sim import reference  # noqa: E402
from itm_kernels.xattn_sim import triton as xattn_triton  # noqa: E402
from conftest import assert_close_report  # noqa: E402
from kernel_helpers import REPO, TRITON_TOOL as TOOL, run_kernel_tests_in_child, triton_mode  # noqa: E402

_MODE = triton_mode()
INTERPRET, DEVICE, KERNELS_HERE = _MODE.INTERPRET, _MODE.DEVICE, _MODE.KERNELS_HERE
needs_kernels = _MODE.needs_kernels
# float32 against float64 truth, as |diff| <= TOL32 (1 + |truth|).
TOL32 = 1e-5
LAMBDAS = {"t2i": dict(lambda_softmax=9.0, lambda_lse=6.0), "i2t": dict(lambda_softmax=4.0, lambda_lse=5.0)}


def make_inputs(n_img, n_cap, K, L_max, d, *, img_lens, cap_lens, seed=0):
    """Random features with SCAN-like scale (unit-norm rows) and poisoned padding: NaN and 1e30 rows beyond the
    lengths, which the kernels must never read. Returns (images, captions, img_lens, cap_lens, clean copies)."""
    g = torch.Generator().manual_seed(seed)
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=2)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L_max, d, generator=g, dtype=torch.float64), dim=2)
    img_lens = torch.tensor(img_lens, dtype=torch.long)
    cap_lens = torch.tensor(cap_lens, dtype=torch.long)
    img_pad = torch.arange(K)[None, :] >= img_lens[:, None]
    cap_pad = torch.arange(L_max)[None, :] >= cap_lens[:, None]
    clean_img, clean_cap = img.masked_fill(img_pad[..., None], 0.0), cap.masked_fill(cap_pad[..., None], 0.0)
    img = img.masked_fill(img_pad[..., None], float("nan"))
    cap = cap.masked_fill(cap_pad[..., None], 1e30)
    cap[:, :, 0].masked_fill_(cap_pad, float("nan"))
    return img, cap, img_lens, cap_lens, clean_img, clean_cap


# Ragged on both sides, lengths 1 and the maximum present, d = 19 (two d-chunks, the second ragged).
SMALL = dict(n_img=3, n_cap=5, K=7, L_max=6, d=19, img_lens=[7, 1, 4], cap_lens=[6, 1, 3, 6, 2])


def run(images, captions, cap_lens, img_lens, **opts):
    return xattn_triton.xattn_sim(images.to(DEVICE), captions.to(DEVICE), cap_lens.to(DEVICE), img_lens.to(DEVICE),
                                  **opts).cpu()


def truth(clean_img, clean_cap, cap_lens, img_lens, dtype, **opts):
    """float64 reference on the inputs rounded to ``dtype`` (so only the kernel's arithmetic is measured)."""
    return reference.xattn_sim(clean_img.to(dtype).double(), clean_cap.to(dtype).double(), cap_lens,
                               img_lens=img_lens, **opts)


@needs_kernels
@pytest.mark.parametrize("norm", reference.NORMS)
@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_float32_matches_reference(direction, norm):
    img, cap, img_lens, cap_lens, clean_img, clean_cap = make_inputs(**SMALL)
    for agg in reference.AGGS:
        opts = dict(direction=direction, norm=norm, agg=agg, **LAMBDAS[direction])
        got = run(img.float(), cap.float(), cap_lens, img_lens, **opts)
        assert got.dtype == torch.float32 and got.shape == (3, 5)
        expected = truth(clean_img, clean_cap, cap_lens, img_lens, torch.float32, **opts)
        assert_close_report(got, expected, atol=TOL32, rtol=TOL32, what=f"float32 {opts}")


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_low_precision_within_twice_torch_error(direction, dtype):
    """bf16/fp16 inputs: at most twice the error of the reference computed in that dtype, plus 1e-3 (in practice
    the kernel, which multiplies exactly and accumulates in float32, is far closer)."""
    img, cap, img_lens, cap_lens, clean_img, clean_cap = make_inputs(**SMALL, seed=1)
    for norm, agg in [("clipped_l2norm", "lse"), ("softmax", "mean"), ("l1norm", "max"), ("no_norm", "sum")]:
        opts = dict(direction=direction, norm=norm, agg=agg, **LAMBDAS[direction])
        got = run(img.to(dtype), cap.to(dtype), cap_lens, img_lens, **opts)
        assert got.dtype == torch.float32
        exact = reference.xattn_sim(clean_img.to(dtype).double(), clean_cap.to(dtype).double(), cap_lens,
                                    img_lens=img_lens, **opts)
        low = reference.xattn_sim(clean_img.to(dtype), clean_cap.to(dtype), cap_lens, img_lens=img_lens,
                                  compute_dtype=dtype, **opts)
        torch_err = (low.double() - exact).abs().max().item()
        assert_close_report(got, exact, atol=2 * torch_err + 1e-3, rtol=0, what=f"{dtype} {opts}")
        assert_close_report(got, exact, atol=TOL32, rtol=TOL32, what=f"{dtype} vs exact products {opts}")


@needs_kernels
@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_float64_is_exact(direction):
    """float64 inputs are computed in float64 throughout, lambdas included (4.7 and 5.3 are not float32 values)."""
    img, cap, img_lens, cap_lens, clean_img, clean_cap = make_inputs(**SMALL, seed=2)
    for norm, agg in [("clipped_l2norm", "lse"), ("softmax", "max")]:
        opts = dict(direction=direction, norm=norm, agg=agg, lambda_softmax=4.7, lambda_lse=5.3)
        got = run(img, cap, cap_lens, img_lens, **opts)
        assert got.dtype == torch.float64
        expected = truth(clean_img, clean_cap, cap_lens, img_lens, torch.float64, **opts)
        assert_close_report(got, expected, atol=1e-12, rtol=1e-12, what=f"float64 {opts}")


@needs_kernels
@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_length_buckets_groups_and_long_features(direction):
    """Captions in three length buckets (1..16, 17..32, 33..40 words), K = 20 regions (a 32-row tile), more images
    than one program group (GROUP_CTX), d = 50 (four d-chunks): the bucketing, stacking and swizzle paths."""
    n_img = xattn_triton.GROUP_CTX + 2
    cap_lens = [40, 1, 17, 5, 33, 16, 2, 40]
    img_lens = [20, 1, 7, 20, 13, 3, 20, 9, 19, 2][:n_img]
    img, cap, img_lens, cap_lens, clean_img, clean_cap = make_inputs(n_img, len(cap_lens), 20, 40, 50,
                                                                     img_lens=img_lens, cap_lens=cap_lens, seed=3)
    opts = dict(direction=direction, norm="clipped_l2norm", agg="lse", **LAMBDAS[direction])
    got = run(img.float(), cap.float(), cap_lens, img_lens, **opts)
    expected = truth(clean_img, clean_cap, cap_lens, img_lens, torch.float32, **opts)
    assert_close_report(got, expected, atol=TOL32, rtol=TOL32, what=f"buckets {opts}")


@needs_kernels
def test_scores_do_not_depend_on_batching():
    """Each score depends only on its own pair: a sub-batch gives the same entries (up to float32 rounding)."""
    img, cap, img_lens, cap_lens, _, _ = make_inputs(**SMALL, seed=4)
    opts = dict(direction="t2i", norm="softmax", agg="mean", lambda_softmax=9.0, lambda_lse=6.0)
    full = run(img.float(), cap.float(), cap_lens, img_lens, **opts)
    part = run(img[1:].float(), cap[[4, 0, 2]].float(), cap_lens[[4, 0, 2]], img_lens[1:], **opts)
    assert_close_report(part, full[1:][:, [4, 0, 2]], atol=1e-6, rtol=1e-6, what="sub-batch")


@needs_kernels
def test_dispatcher_runs_triton_backend():
    """``itm_kernels.xattn_sim(backend="triton")`` on CPU tensors runs these kernels under the interpreter."""
    import itm_kernels

    if "triton" not in itm_kernels.available_backends(DEVICE):
        pytest.skip("the dispatcher does not offer the triton backend here")
    img, cap, img_lens, cap_lens, clean_img, clean_cap = make_inputs(**SMALL, seed=5)
    opts = dict(direction="i2t", norm="clipped_l2norm", agg="lse", lambda_softmax=4.0, lambda_lse=5.0)
    got = itm_kernels.xattn_sim(img.float().to(DEVICE), cap.float().to(DEVICE), cap_lens, img_lens=img_lens,
                                backend="triton", **opts).cpu()
    expected = truth(clean_img, clean_cap, cap_lens, img_lens, torch.float32, **opts)
    assert_close_report(got, expected, atol=TOL32, rtol=TOL32, what="dispatcher")


def test_kernel_config_keeps_tiles_legal():
    """Every tile dimension fed to tl.dot is a power of two >= 16, whatever the sizes."""
    for n in [1, 7, 16, 17, 36, 100]:
        assert xattn_triton.block_rows(n) >= max(16, n)
    for block_q in [16, 32, 64, 128]:
        for n_qry in [1, 3, 1000]:
            c, _ = xattn_triton.kernel_config(torch.bfloat16, block_c=64, block_q=block_q, n_qry=n_qry, d=1024,
                                              norm="clipped_l2norm", agg="lse")
            assert c["QB"] * c["BLOCK_Q"] >= 16 and c["BLOCK_D"] >= 16 and c["QB"] & (c["QB"] - 1) == 0


def _run_kernel_tests_in_child(interpret: str):
    run_kernel_tests_in_child(__file__, interpret, no_skips=True)


@pytest.mark.skipif(KERNELS_HERE, reason="the kernel tests run in this process")
def test_kernel_tests_in_fresh_interpreter_process():
    """This session imported triton before TRITON_INTERPRET=1 could be set: run the kernel tests in a child."""
    _run_kernel_tests_in_child("1")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_kernel_tests_on_gpu_in_fresh_process():
    """The same kernel tests, compiled and run on the GPU (this module turns the interpreter on by default)."""
    _run_kernel_tests_in_child("0")


@pytest.mark.slow  # ~15-40 s each; .ci/run runs the slow tests and tools/compile_check_triton.py
def test_compiles_for_sm80_and_sm90(tmp_path):
    """Compile the Gram kernel, the forward and its Gram-guard fix-up pass for sm_80 and sm_90, float32 and
    bfloat16, both directions, down to a cubin, in a fresh process without TRITON_INTERPRET and with an empty cache
    (so it really compiles); no register spills."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    check = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "import compile_check_triton as t; ok, why = t.cuda_compiler_available(); "
                            "print(why); sys.exit(0 if ok else 3)", str(TOOL.parent)],
                           env=env, capture_output=True, text=True, timeout=120)
    if check.returncode == 3:
        pytest.skip(f"triton's CUDA compiler backend is unavailable: {check.stdout.strip()}")
    proc = subprocess.run([sys.executable, str(TOOL), "--arch", "80", "--arch", "90", "--dtype", "float32",
                           "--dtype", "bfloat16", "--no-topk", "--json"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 3 * 2 * 2 * 2  # the Gram kernel, the forward and the forward's Gram-guard fix-up pass
    assert {(r["kernel"], r["arch"], r["dtype"], r["direction"]) for r in results} == {
        (k, a, d, s) for k in ("gram", "xattn_sim", "xattn_sim_fix") for a in ("sm_80", "sm_90")
        for d in ("float32", "bfloat16")
        for s in ("t2i", "i2t")}
    for info in results:
        assert info["ptx_bytes"] > 0 and info["cubin_bytes"] > 0, info
        if "stack" in info:
            assert info["stack"] == 0 and info.get("local", 0) == 0, f"register spills: {info}"


@needs_kernels
@pytest.mark.slow
@pytest.mark.parametrize("direction", ["t2i", "i2t"])
def test_backward_through_triton_backend_gradcheck(direction):
    """Training through backend="triton": its forward with the fused Triton backward
    (``itm_kernels.xattn_sim.triton.xattn_sim_backward``), float64 gradcheck at tiny sizes."""
    import itm_kernels

    if "triton" not in itm_kernels.available_backends(DEVICE):
        pytest.skip("the dispatcher does not offer the triton backend here")
    g = torch.Generator().manual_seed(9)
    img = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    cap = torch.randn(2, 3, 4, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()
    lens = torch.tensor([3, 2])
    fn = lambda a, b: itm_kernels.xattn_sim(a, b, lens, direction=direction, norm="clipped_l2norm",  # noqa: E731
                                            lambda_softmax=4.0, agg="lse", lambda_lse=3.0, backend="triton")
    assert torch.autograd.gradcheck(fn, (img, cap), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_compile_check_samples_every_reachable_variant(tmp_path):
    """--sample N --run R: 4 variants of the fixed shuffle of every reachable (fwd/bwd kernel x arch x dtype/precision
    x direction x norm x agg), compiled to cubins in a fresh process; consecutive runs cover all of them."""
    sys.path.insert(0, str(TOOL.parent))
    import compile_check_triton as tool

    variants = tool.all_variants()
    # xattn_sim fwd/fix-up/bwd: kernel x arch x dtype/precision x direction x norm x agg; then local_sim
    # fwd/fix-up/bwd (arch x 5 dtype/precisions x direction) and node_match (arch x 5, t2i only); then the top-k
    # kernel (2 ranked sides x arch x 5 dtype/precisions, no float64, x direction x norm x agg).
    assert len(variants) == len(set(variants)) == (3 * 2 * 6 * 2 * 7 * 4 + 3 * (2 * 5 * 2) + 2 * 5
                                                   + 2 * 2 * 5 * 2 * 7 * 4)
    runs = -(-len(variants) // 50)
    assert {v for r in range(runs) for v in tool.sampled_variants(50, r)} == set(variants)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    ok, why = tool.cuda_compiler_available()
    if not ok:
        pytest.skip(f"triton's CUDA compiler backend is unavailable: {why}")
    run = int(os.environ.get("GITHUB_RUN_NUMBER", "0"))
    proc = subprocess.run([sys.executable, str(TOOL), "--sample", "4", "--run", str(run), "--json"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 4 and all(r["cubin_bytes"] > 0 for r in results)
