"""CUDA local_sim kernel without a GPU: nvcc compile check for sm_80/sm_90, and the kernel's block code run on the CPU.

``tools/compile_check_cuda.sh --only local_sim`` compiles every dtype of ``csrc/local_sim/kernel.cuh`` with nvcc
(no spills allowed) and builds the host emulation (``csrc/local_sim/emulate.cpp``, AddressSanitizer on), which
runs the very block code of the kernel (staging, score tile, normalisation and softmax, the |a|^2 pass, the fused
(a^ - e)^2 W^T projection, the row normalisation over one or several output tiles) thread by thread in three thread
orders. Its output is compared here with ``local_sim_reference`` in float64. What this cannot check: real
concurrency (beyond the thread-order test), the launch configuration, the binding (``csrc/local_sim/cuda.cu``)
and anything only a GPU run shows; the ``@pytest.mark.gpu`` tests cover those.
"""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
import torch

from itm_kernels.local_sim import local_sim_reference
from conftest import assert_close_report
from kernel_helpers import DTYPE_CODES, REPO, build_emulator, built_emulator, check_compile_output, run_emulator

# The host emulator builds with g++ and AddressSanitizer (10-15 s per kernel): slow checks, run by .ci/run.
pytestmark = pytest.mark.slow

MAX_REGIONS, MAX_WORDS, MAX_SIM_DIM = 64, 128, 1024   # kMaxRegions, kMaxWords, kMaxSimDim of local_sim/kernel.cuh
# Absolute tolerances on the unit-norm output rows, against the float64 truth on the same (rounded) inputs:
# float32 accumulation (float32/float16/bfloat16 inputs) measured <= 3e-7 here; float64 accumulation agrees with
# the reference up to summation order (measured <= 3e-16).
TOL_FLOAT = 1e-5
TOL_DOUBLE = 1e-11
LAMBDA = 9.0  # SGRAF's lambda_softmax


@pytest.fixture(scope="module")
def compile_check(tmp_path_factory):
    return build_emulator(tmp_path_factory, "local_sim", "--local-sim-emulator", "local_sim")


@pytest.fixture(scope="module")
def nvcc_check(tmp_path_factory):
    """The full compile check with nvcc (~40 s per kernel): the slow test below only."""
    return build_emulator(tmp_path_factory, "local_sim", "--local-sim-emulator", "local_sim", nvcc=True)


@pytest.fixture(scope="module")
def emulator(compile_check):
    return built_emulator(compile_check)


@pytest.mark.slow
def test_compile_check_passes_for_sm80_and_sm90(nvcc_check):
    proc, _ = nvcc_check
    check_compile_output(proc, "local_sim ", 4)
    assert "local_sim float32   K=36 L=32 d=1024 S=256: score tile 48x32" in proc.stdout, proc.stdout


def smem_bytes(K, L, S, dtype):
    """Dynamic shared memory of one block (local_smem_layout): the staged V chunk, the staged E chunk (pass 1) or W
    chunk (pass 3) in one buffer, h/alpha, the region norms, the (a^ - e)^2 chunk, 1/|a|, the partial sums and |y|^2
    per word; K and L rounded up to 16, S to 32 (at most 256)."""
    kp, lp, sp = -(-K // 16) * 16, -(-L // 16) * 16, min(-(-S // 32) * 32, 256)
    elems = 32 * (kp + 1) + 32 * (max(lp, sp) + 1) + kp * (lp + 1) + kp + 32 * 33 + 32 + 32 * 33 + 32
    return elems * (8 if dtype == torch.float64 else 4)


def test_plan_shared_memory(emulator):
    names = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
    for K, L, d, S in ((36, 32, 1024, 256), (64, 128, 1024, 1024), (1, 1, 1, 1), (17, 33, 111, 37)):
        out = subprocess.run([str(emulator), "--plan", str(K), str(L), str(d), str(S)], capture_output=True,
                             text=True, timeout=60).stdout
        lines = out.strip().splitlines()
        assert len(lines) == 4, out
        for line in lines:
            dtype = names[line.split()[1]]
            assert line.endswith(f"dynamic smem {smem_bytes(K, L, S, dtype)} B"), line
    # SGRAF (K = 36, L_max = 32, S = 256) and the limits; float64 at the limits fits A100's 166912 B opt-in.
    assert smem_bytes(36, 32, 256, torch.float32) == 54400
    assert smem_bytes(64, 128, 1024, torch.float32) == 83200 and smem_bytes(64, 128, 1024, torch.float64) == 166400


def test_limits_match_the_header():
    kernel = (REPO / "csrc" / "local_sim" / "kernel.cuh").read_text()
    assert f"kMaxRegions = {MAX_REGIONS};" in kernel
    assert f"kMaxWords = {MAX_WORDS};" in kernel
    assert f"kMaxSimDim = {MAX_SIM_DIM};" in kernel


# --- host emulation of the kernel -------------------------------------------------------------------------------

def make_problem(n_img, n_cap, K, L, d, S, *, seed=0, dtype=torch.float64, lens=None):
    """Unit-norm features, ragged captions (one of length L, one of length 1; or ``lens``), NaN in every padding
    word (the kernel must never read them), W ~ N(0, 1/d) and b ~ N(0, 0.1^2), all rounded to ``dtype`` (the
    binding converts W and b to the input dtype)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g, dtype=torch.float64), dim=-1)
    weight = torch.randn(S, d, generator=g, dtype=torch.float64) / d ** 0.5
    bias = 0.1 * torch.randn(S, generator=g, dtype=torch.float64)
    cap_lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    cap_lens[0] = L
    cap_lens[-1] = 1
    if lens is not None:
        cap_lens = torch.tensor(lens)
    images, captions, weight, bias = (t.to(dtype) for t in (images, captions, weight, bias))
    captions[torch.arange(L)[None, :] >= cap_lens[:, None]] = float("nan")
    return images, captions, cap_lens, weight, bias


def emulate(emulator: Path, tmp_path: Path, images, captions, cap_lens, weight, bias, *, lambda_softmax=LAMBDA):
    """Run the kernel's block code on the CPU; returns (out, log) like the op (float32, float64 for float64 inputs)."""
    n_img, K, d = images.shape
    n_cap, L, _ = captions.shape
    S = weight.shape[0]
    header = struct.pack("<8s6i2qd", b"LOCALSM1", DTYPE_CODES[images.dtype], K, L, d, S, 0, n_img, n_cap,
                         lambda_softmax)

    values, stdout = run_emulator(emulator, tmp_path, header, (images, captions, cap_lens.long(),
                                                               weight.to(images.dtype), bias.to(images.dtype)),
                                  float64=images.dtype == torch.float64)
    assert values.numel() == n_img * n_cap * L * S
    return values.view(n_img, n_cap, L, S), stdout


def expected(images, captions, cap_lens, weight, bias, *, lambda_softmax=LAMBDA):
    """The spec in float64 on the (rounded) inputs."""
    return local_sim_reference(images.double(), captions.double(), cap_lens, weight.double(), bias.double(),
                               lambda_softmax=lambda_softmax, compute_dtype=torch.float64)


# (n_img, n_cap, K, L, d, S): sizes of 1; SGRAF-like K = 36, d = 1024, S = 256; awkward d (111 = 3 x 32 + 15,
# 33 = 32 + 1) and S (37: two outputs per thread, part of a warp idle; 16: half a warp); L across word tiles (33,
# 128 = 4 tiles of 32); S beyond one output tile (300 = 256 + 44, 600 = 256 + 256 + 88: rescaled rows); the limits.
SHAPES = [(2, 3, 1, 1, 1, 1), (2, 3, 36, 20, 1024, 256), (2, 3, 17, 33, 111, 37), (2, 3, 13, 6, 33, 16),
          (1, 2, 64, 128, 64, 300), (2, 3, 5, 7, 40, 600), (1, 2, 3, 40, 8, MAX_SIM_DIM)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_shapes(emulator, tmp_path, shape):
    for dtype, tol in ((torch.float64, TOL_DOUBLE), (torch.float32, TOL_FLOAT)):
        images, captions, cap_lens, weight, bias = make_problem(*shape, seed=sum(shape), dtype=dtype)
        out, _ = emulate(emulator, tmp_path, images, captions, cap_lens, weight, bias)
        assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        want = expected(images, captions, cap_lens, weight, bias)
        assert_close_report(out, want, atol=tol, rtol=0, what=f"emulated {dtype} {shape}")
        padding = torch.arange(shape[3])[None, :] >= cap_lens[:, None]
        assert (out[:, padding] == 0).all(), "words beyond the caption lengths must be exactly 0"


def test_emulated_word_tile_edges(emulator, tmp_path):
    """Caption lengths on both sides of the 32-word tiles of passes 2 and 3 (and of the 16-word score tiles)."""
    lens = [31, 32, 33, 64, 65, 1, 16, 17]
    for dtype, tol in ((torch.float64, TOL_DOUBLE), (torch.float32, TOL_FLOAT)):
        images, captions, cap_lens, weight, bias = make_problem(2, len(lens), 20, 65, 40, 24, seed=5, dtype=dtype,
                                                                lens=lens)
        out, _ = emulate(emulator, tmp_path, images, captions, cap_lens, weight, bias)
        assert_close_report(out, expected(images, captions, cap_lens, weight, bias), atol=tol, rtol=0,
                            what=f"emulated tile edges {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_low_precision_inputs(emulator, tmp_path, dtype):
    """float32 accumulation of bf16/fp16 inputs (W and b too), against the float64 truth on the same rounded
    inputs."""
    images, captions, cap_lens, weight, bias = make_problem(2, 4, 36, 19, 256, 64, seed=7, dtype=dtype)
    out, _ = emulate(emulator, tmp_path, images, captions, cap_lens, weight, bias)
    assert out.dtype == torch.float32
    assert_close_report(out, expected(images, captions, cap_lens, weight, bias), atol=TOL_FLOAT, rtol=0,
                        what=f"emulated {dtype}")


@pytest.mark.parametrize("lambda_softmax", [0.0, 4.0, 20.0])
def test_emulated_lambdas_and_degenerate_features(emulator, tmp_path, lambda_softmax):
    """lambda 0 (uniform attention), an all-zero image (a = 0, so a^ = 0 and y = W e^2 + b), a zero region (h = 0
    on its row, norm eps), a repeated word, a word equal to a region."""
    images, captions, cap_lens, weight, bias = make_problem(3, 4, 10, 9, 70, 45, seed=11)
    images[1] = 0
    images[2, 3] = 0
    captions[0, 2] = captions[0, 1]
    captions[1, 0] = images[0, 4]
    for dtype, tol in ((torch.float64, TOL_DOUBLE), (torch.float32, TOL_FLOAT)):
        args = [t.to(dtype) for t in (images, captions)] + [cap_lens] + [t.to(dtype) for t in (weight, bias)]
        out, _ = emulate(emulator, tmp_path, *args, lambda_softmax=lambda_softmax)
        want = expected(*args, lambda_softmax=lambda_softmax)
        assert_close_report(out, want, atol=tol, rtol=0, what=f"emulated lambda={lambda_softmax} {dtype}")


def test_emulated_refuses_what_the_kernel_cannot_run(emulator, tmp_path):
    for K, L, S, message in ((MAX_REGIONS + 1, 5, 4, "at most 64 regions per image"),
                             (5, MAX_WORDS + 1, 4, "captions of at most 128 words"),
                             (5, 6, MAX_SIM_DIM + 1, "at most 1024 outputs per word")):
        images, captions, cap_lens, weight, bias = make_problem(1, 2, K, L, 4, S)
        with pytest.raises(AssertionError, match=f"plan refused: .*{message}"):
            emulate(emulator, tmp_path, images, captions, cap_lens, weight, bias)
    images, captions, cap_lens, weight, bias = make_problem(1, 2, 5, 6, 8, 3)
    with pytest.raises(AssertionError, match="lambda_softmax must be finite"):
        emulate(emulator, tmp_path, images, captions, cap_lens, weight, bias, lambda_softmax=-1.0)
    with pytest.raises(AssertionError, match=r"cap_lens must lie in 1\.\.6"):
        emulate(emulator, tmp_path, images, captions, cap_lens + 6, weight, bias)


# --- the compiled op on a GPU -------------------------------------------------------------------------------------

def cuda_op_available() -> bool:
    from itm_kernels._common import dispatch as backends

    return (backends.has_cuda_kernels() and torch.cuda.is_available()
            and hasattr(torch.ops.itm_kernels, "local_sim_cuda"))


def local_sim_cuda(images, captions, cap_lens, weight, bias, lambda_softmax=LAMBDA):
    return torch.ops.itm_kernels.local_sim_cuda(images, captions, cap_lens, weight, bias, float(lambda_softmax))


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_op_available(), reason="needs the extension built with CUDA and a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cuda_op_matches_reference(dtype):
    shapes = SHAPES + [(8, 40, 36, 40, 1024, 256), (3, 5, 64, 128, 256, 512)]
    for shape in shapes:
        images, captions, cap_lens, weight, bias = make_problem(*shape, seed=sum(shape), dtype=dtype)
        dev = [t.cuda() for t in (images, captions, cap_lens)]
        # W and b given in float32: the binding converts them to the input dtype (make_problem rounded them).
        w32, b32 = weight.float().cuda(), bias.float().cuda()
        K, L, S = shape[2], shape[3], shape[5]
        if smem_bytes(K, L, S, dtype) > torch.cuda.get_device_properties(0).shared_memory_per_block_optin:
            with pytest.raises(RuntimeError, match="bytes of shared memory per block"):
                local_sim_cuda(*dev, w32, b32)
            continue
        for lam in (LAMBDA, 0.0):
            out = local_sim_cuda(*dev, w32, b32, lam)
            assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.is_cuda
            want = expected(images.cuda(), captions.cuda(), cap_lens.cuda(), weight.cuda(), bias.cuda(),
                            lambda_softmax=lam)
            assert_close_report(out, want, atol=1e-10 if dtype == torch.float64 else 2 * TOL_FLOAT, rtol=0,
                                what=f"cuda {dtype} {shape} lambda={lam}")
            padding = torch.arange(L, device="cuda")[None, :] >= dev[2][:, None]
            assert (out[:, padding] == 0).all()
            assert torch.equal(local_sim_cuda(*dev, w32, b32, lam), out), "not deterministic"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_op_available(), reason="needs the extension built with CUDA and a CUDA device")
def test_cuda_op_meta_shapes():
    images, captions, cap_lens, weight, bias = make_problem(2, 3, 5, 7, 32, 11, dtype=torch.float16)
    out = local_sim_cuda(*(t.to("meta") for t in (images, captions, cap_lens, weight, bias)))
    assert out.shape == (2, 3, 7, 11) and out.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_op_available(), reason="needs the extension built with CUDA and a CUDA device")
def test_cuda_op_rejects_what_it_cannot_run():
    images, captions, cap_lens, weight, bias = make_problem(2, 3, 5, 6, 8, 4, dtype=torch.float32)
    im, cap, lens, w, b = (t.cuda() for t in (images, captions, cap_lens, weight, bias))

    def call(im=im, cap=cap, lens=lens, w=w, b=b, lam=LAMBDA):
        return local_sim_cuda(im, cap, lens, w, b, lam)

    cases = [
        (dict(im=images), "images must be a CUDA tensor"),
        (dict(cap=captions), "captions must be on"),
        (dict(lens=cap_lens), "cap_lens must be on"),
        (dict(lens=lens.int()), "cap_lens must be int64"),
        (dict(lens=lens[:2]), r"cap_lens must have shape \(3,\)"),
        (dict(lens=lens + 6), r"cap_lens must lie in 1\.\.6"),
        (dict(lens=lens * 0), r"cap_lens must lie in 1\.\.6"),
        (dict(cap=cap.double()), "captions must have the dtype of images"),
        (dict(cap=cap[:, :, :4].contiguous()), "captions must share d"),
        (dict(im=im.transpose(0, 1)), "images must be contiguous"),
        (dict(im=im.int(), cap=cap.int()), "images must be float32"),
        (dict(w=weight), "weight and bias must be on"),
        (dict(w=w.int()), "weight and bias must be floating point"),
        (dict(w=w[:, :4]), r"weight must have shape \(sim_dim, d=8\)"),
        (dict(b=b[:3]), r"bias must have shape \(4,\)"),
        (dict(w=torch.zeros(MAX_SIM_DIM + 1, 8, device="cuda"), b=torch.zeros(MAX_SIM_DIM + 1, device="cuda")),
         "at most 1024 outputs per word"),
        (dict(lam=float("inf")), "lambda_softmax must be finite"),
        (dict(lam=-1.0), "lambda_softmax must be finite"),
        (dict(im=torch.zeros(1, MAX_REGIONS + 1, 8, device="cuda")), "at most 64 regions"),
        (dict(cap=torch.zeros(3, MAX_WORDS + 1, 8, device="cuda")), "at most 128 words"),
    ]
    for kwargs, message in cases:
        with pytest.raises(RuntimeError, match=message):
            call(**kwargs)
    # W and b in another float dtype or layout are converted, not refused.
    ref = call()
    assert_close_report(call(w=w.double().t().contiguous().t(), b=b.double()), ref, atol=1e-6, rtol=0,
                        what="converted weight")
