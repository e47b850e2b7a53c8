"""CUDA node_match kernel without a GPU: nvcc compile check for sm_80/sm_90, and the kernel's block code run on the CPU.

``tools/compile_check_cuda.sh --only node_match`` compiles every dtype of ``csrc/node_match/kernel.cuh`` with
nvcc (no spills allowed) and builds the host emulation (``csrc/node_match/emulate.cpp``, AddressSanitizer on),
which runs the very block code of the kernel (staging, score tile, softmaxes, chunked contexts and block cosines)
thread by thread in three thread orders. Its output is compared here with ``node_match_reference`` in float64.
What this cannot check: real concurrency (beyond the thread-order test), the launch configuration, the binding
(``csrc/node_match/cuda.cu``) and anything only a GPU run shows; the ``@pytest.mark.gpu`` tests cover those.
"""
from __future__ import annotations

import struct
import subprocess
from pathlib import Path

import pytest
import torch

from itm_kernels.node_match import node_match_reference
from conftest import assert_close_report
from kernel_helpers import DTYPE_CODES, REPO, build_emulator, built_emulator, check_compile_output, run_emulator

# The host emulator builds with g++ and AddressSanitizer (10-15 s per kernel): slow checks, run by .ci/run.
pytestmark = pytest.mark.slow

MAX_REGIONS, MAX_WORDS = 64, 128       # kMaxRegions, kMaxWords of csrc/node_match/kernel.cuh
# float32 accumulation against the float64 truth on the same (rounded) inputs; float64 accumulation agrees with the
# reference up to summation order.
TOL_FLOAT = 1e-5
TOL_DOUBLE = 1e-11


@pytest.fixture(scope="module")
def compile_check(tmp_path_factory):
    return build_emulator(tmp_path_factory, "node_match", "--node-match-emulator", "node_match")


@pytest.fixture(scope="module")
def nvcc_check(tmp_path_factory):
    """The full compile check with nvcc (~40 s per kernel): the slow test below only."""
    return build_emulator(tmp_path_factory, "node_match", "--node-match-emulator", "node_match", nvcc=True)


@pytest.fixture(scope="module")
def emulator(compile_check):
    return built_emulator(compile_check)


@pytest.mark.slow
def test_compile_check_passes_for_sm80_and_sm90(nvcc_check):
    proc, _ = nvcc_check
    check_compile_output(proc, "node_match ", 4)
    assert "node_match float32   K=36 L=32 d=1024 B=16: tile 48x32" in proc.stdout, proc.stdout


def smem_bytes(K, L, dtype):
    """Dynamic shared memory of one block (node_smem_layout): staged features, h/alpha and beta tiles, the chunk's
    contexts, the norms and the carried sums; K and L rounded up to 16."""
    kp, lp = -(-K // 16) * 16, -(-L // 16) * 16
    elems = 32 * (kp + 1) + 32 * (lp + 1) + 2 * kp * (lp + 1) + 33 * (kp + lp) + 4 * (kp + lp)
    return elems * (8 if dtype == torch.float64 else 4)


def test_plan_shared_memory(emulator):
    names = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}
    for K, L, d, B in ((36, 32, 1024, 16), (64, 128, 1024, 16), (1, 1, 1, 1), (17, 33, 96, 3)):
        out = subprocess.run([str(emulator), "--plan", str(K), str(L), str(d), str(B)], capture_output=True,
                             text=True, timeout=60).stdout
        lines = out.strip().splitlines()
        assert len(lines) == 4, out
        for line in lines:
            dtype = names[line.split()[1]]
            assert line.endswith(f"dynamic smem {smem_bytes(K, L, dtype)} B"), line
    # float64 at the limits exceeds every GPU's opt-in shared memory (H100: 232448 B): the binding refuses it.
    assert smem_bytes(64, 128, torch.float64) == 238592 and smem_bytes(64, 128, torch.float32) == 119296


def test_limits_match_the_header():
    kernel = (REPO / "csrc" / "node_match" / "kernel.cuh").read_text()
    assert f"kMaxRegions = {MAX_REGIONS};" in kernel
    assert f"kMaxWords = {MAX_WORDS};" in kernel


# --- host emulation of the kernel -------------------------------------------------------------------------------

def make_problem(n_img, n_cap, K, L, d, *, seed=0, dtype=torch.float64):
    """Unit-norm features, ragged captions (one of length L, one of length 1), NaN in every padding word (the
    kernel must never read them)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g, dtype=torch.float64), dim=-1)
    cap_lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    cap_lens[0] = L
    cap_lens[-1] = 1
    images, captions = images.to(dtype), captions.to(dtype)
    captions[torch.arange(L)[None, :] >= cap_lens[:, None]] = float("nan")
    return images, captions, cap_lens


def emulate(emulator: Path, tmp_path: Path, images, captions, cap_lens, *, lambda_softmax=20.0, num_blocks=16):
    """Run the kernel's block code on the CPU; returns (region, word, log) like the op (float32, float64 for float64
    inputs)."""
    n_img, K, d = images.shape
    n_cap, L, _ = captions.shape
    header = struct.pack("<8s6i2qd", b"NODEMEM1", DTYPE_CODES[images.dtype], K, L, d, num_blocks, 0, n_img, n_cap,
                         lambda_softmax)

    values, stdout = run_emulator(emulator, tmp_path, header, (images, captions, cap_lens.long()),
                                  float64=images.dtype == torch.float64)
    n_region = n_img * n_cap * K * num_blocks
    assert values.numel() == n_region + n_img * n_cap * L * num_blocks
    return (values[:n_region].view(n_img, n_cap, K, num_blocks), values[n_region:].view(n_img, n_cap, L, num_blocks),
            stdout)


def expected(images, captions, cap_lens, *, lambda_softmax=20.0, num_blocks=16):
    """The spec in float64 on the (rounded) inputs."""
    return node_match_reference(images.double(), captions.double(), cap_lens, lambda_softmax=lambda_softmax,
                                num_blocks=num_blocks, compute_dtype=torch.float64)


def check(got, want, tol, what):
    (region, word), (region_ref, word_ref) = got, want
    assert_close_report(region, region_ref, atol=tol, rtol=0, what=f"{what} region")
    assert_close_report(word, word_ref, atol=tol, rtol=0, what=f"{what} word")


# (n_img, n_cap, K, L, d, num_blocks), covering the pass-2 chunking: whole blocks per chunk (db <= 32: several
# blocks of 1, 3, 4, 10 features, one of 32) and blocks spanning chunks (db > 32: 80 = 32 + 32 + 16, GSMN's 64);
# K and L at 1, off the 16-multiples and at the kernel's limits.
SHAPES = [(2, 3, 1, 1, 1, 1), (2, 5, 9, 11, 48, 16), (3, 4, 17, 33, 96, 3), (2, 4, 5, 7, 70, 7),
          (2, 3, 36, 20, 160, 2), (1, 2, 64, 128, 64, 16), (2, 3, 13, 6, 40, 40), (2, 3, 36, 24, 1024, 16)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_emulated_shapes(emulator, tmp_path, shape):
    *sizes, num_blocks = shape
    for dtype, tol in ((torch.float64, TOL_DOUBLE), (torch.float32, TOL_FLOAT)):
        images, captions, cap_lens = make_problem(*sizes, seed=sum(shape), dtype=dtype)
        region, word, _ = emulate(emulator, tmp_path, images, captions, cap_lens, num_blocks=num_blocks)
        assert region.dtype == word.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        want = expected(images, captions, cap_lens, num_blocks=num_blocks)
        check((region, word), want, tol, f"emulated {dtype} {shape}")
        padding = torch.arange(sizes[3])[None, :] >= cap_lens[:, None]
        assert (word[:, padding] == 0).all(), "words beyond the caption lengths must be exactly 0"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_emulated_low_precision_inputs(emulator, tmp_path, dtype):
    """float32 accumulation of bf16/fp16 inputs, compared with the float64 truth on the same rounded inputs."""
    images, captions, cap_lens = make_problem(2, 5, 36, 19, 256, seed=7, dtype=dtype)
    region, word, _ = emulate(emulator, tmp_path, images, captions, cap_lens, num_blocks=16)
    assert region.dtype == word.dtype == torch.float32
    check((region, word), expected(images, captions, cap_lens, num_blocks=16), TOL_FLOAT, f"emulated {dtype}")


@pytest.mark.parametrize("lambda_softmax", [0.0, 4.0, 10.0])
def test_emulated_lambdas_and_degenerate_features(emulator, tmp_path, lambda_softmax):
    """lambda 0 (uniform attention), a zero feature block in an image (cosines clamp to 0), a zero region (h = 0
    on its row), a repeated word (equal softmax scores)."""
    images, captions, cap_lens = make_problem(2, 4, 10, 9, 64, seed=11)
    images[0, :, 16:32] = 0
    images[1, 3] = 0
    captions[0, 2] = captions[0, 1]
    for dtype, tol in ((torch.float64, TOL_DOUBLE), (torch.float32, TOL_FLOAT)):
        im, cap = images.to(dtype), captions.to(dtype)
        region, word, _ = emulate(emulator, tmp_path, im, cap, cap_lens, lambda_softmax=lambda_softmax, num_blocks=4)
        want = expected(im, cap, cap_lens, lambda_softmax=lambda_softmax, num_blocks=4)
        check((region, word), want, tol, f"emulated lambda={lambda_softmax} {dtype}")
        assert (region[0, :, :, 1] == 0).all() and (region[1, :, 3] == 0).all()


def test_emulated_refuses_what_the_kernel_cannot_run(emulator, tmp_path):
    for K, L, d, num_blocks, message in ((MAX_REGIONS + 1, 5, 4, 1, "at most 64 regions per image"),
                                         (5, MAX_WORDS + 1, 4, 1, "captions of at most 128 words"),
                                         (5, 6, 10, 3, "num_blocks must be >= 1 and divide d"),
                                         (5, 6, 10, 0, "num_blocks must be >= 1 and divide d")):
        images, captions, cap_lens = make_problem(1, 2, K, L, d)
        with pytest.raises(AssertionError, match=f"plan refused: .*{message}"):
            emulate(emulator, tmp_path, images, captions, cap_lens, num_blocks=num_blocks)
    images, captions, cap_lens = make_problem(1, 2, 5, 6, 8)
    with pytest.raises(AssertionError, match="lambda_softmax must be finite"):
        emulate(emulator, tmp_path, images, captions, cap_lens, lambda_softmax=-1.0, num_blocks=2)
    with pytest.raises(AssertionError, match=r"cap_lens must lie in 1\.\.6"):
        emulate(emulator, tmp_path, images, captions, cap_lens + 6, num_blocks=2)


# --- the compiled op on a GPU -------------------------------------------------------------------------------------

def cuda_op_available() -> bool:
    from itm_kernels._common import dispatch as backends

    return (backends.has_cuda_kernels() and torch.cuda.is_available()
            and hasattr(torch.ops.itm_kernels, "node_match_cuda"))


def node_match_cuda(images, captions, cap_lens, lambda_softmax=20.0, num_blocks=16):
    return torch.ops.itm_kernels.node_match_cuda(images, captions, cap_lens, float(lambda_softmax), int(num_blocks))


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_op_available(), reason="needs the extension built with CUDA and a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_cuda_op_matches_reference(dtype):
    shapes = SHAPES + [(8, 40, 36, 40, 1024, 16), (3, 5, 64, 128, 256, 8)]
    for shape in shapes:
        *sizes, num_blocks = shape
        images, captions, cap_lens = make_problem(*sizes, seed=sum(shape), dtype=dtype)
        if smem_bytes(sizes[2], sizes[3], dtype) > torch.cuda.get_device_properties(0).shared_memory_per_block_optin:
            with pytest.raises(RuntimeError, match="bytes of shared memory per block"):
                node_match_cuda(images.cuda(), captions.cuda(), cap_lens.cuda(), 20.0, num_blocks)
            continue
        for lam in (20.0, 0.0):
            region, word = node_match_cuda(images.cuda(), captions.cuda(), cap_lens.cuda(), lam, num_blocks)
            out_dtype = torch.float64 if dtype == torch.float64 else torch.float32
            assert region.dtype == word.dtype == out_dtype and region.is_cuda
            want = expected(images.cuda(), captions.cuda(), cap_lens.cuda(), lambda_softmax=lam, num_blocks=num_blocks)
            check((region, word), want, 1e-10 if dtype == torch.float64 else 2 * TOL_FLOAT,
                  f"cuda {dtype} {shape} lambda={lam}")
            again = node_match_cuda(images.cuda(), captions.cuda(), cap_lens.cuda(), lam, num_blocks)
            assert torch.equal(again[0], region) and torch.equal(again[1], word), "not deterministic"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_op_available(), reason="needs the extension built with CUDA and a CUDA device")
def test_cuda_op_meta_shapes():
    images, captions, cap_lens = make_problem(2, 3, 5, 7, 32, dtype=torch.float16)
    region, word = node_match_cuda(images.to("meta"), captions.to("meta"), cap_lens.to("meta"), 10.0, 4)
    assert region.shape == (2, 3, 5, 4) and word.shape == (2, 3, 7, 4) and region.dtype == torch.float32


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_op_available(), reason="needs the extension built with CUDA and a CUDA device")
def test_cuda_op_rejects_what_it_cannot_run():
    def call(images, captions, cap_lens, lam=10.0, num_blocks=2):
        return node_match_cuda(images, captions, cap_lens, lam, num_blocks)

    images, captions, cap_lens = make_problem(2, 3, 5, 6, 8, dtype=torch.float32)
    im, cap, lens = images.cuda(), captions.cuda(), cap_lens.cuda()
    with pytest.raises(RuntimeError, match="images must be a CUDA tensor"):
        call(images, cap, lens)
    with pytest.raises(RuntimeError, match="captions must be on"):
        call(im, captions, lens)
    with pytest.raises(RuntimeError, match="cap_lens must be on"):
        call(im, cap, cap_lens)
    with pytest.raises(RuntimeError, match="cap_lens must be int64"):
        call(im, cap, lens.int())
    with pytest.raises(RuntimeError, match=r"cap_lens must have shape \(3,\)"):
        call(im, cap, lens[:2])
    with pytest.raises(RuntimeError, match=r"cap_lens must lie in 1\.\.6"):
        call(im, cap, lens + 6)
    with pytest.raises(RuntimeError, match=r"cap_lens must lie in 1\.\.6"):
        call(im, cap, lens * 0)
    with pytest.raises(RuntimeError, match="captions must have the dtype of images"):
        call(im, cap.double(), lens)
    with pytest.raises(RuntimeError, match="captions must share d"):
        call(im, cap[:, :, :4].contiguous(), lens)
    with pytest.raises(RuntimeError, match="images must be contiguous"):
        call(im.transpose(0, 1), cap, lens)
    with pytest.raises(RuntimeError, match="images must be float32"):
        call(im.int(), cap.int(), lens)
    with pytest.raises(RuntimeError, match="num_blocks must be a positive divisor of d=8"):
        call(im, cap, lens, num_blocks=3)
    with pytest.raises(RuntimeError, match="lambda_softmax must be finite"):
        call(im, cap, lens, lam=float("inf"))
    big = torch.zeros(1, MAX_REGIONS + 1, 8, device="cuda")
    with pytest.raises(RuntimeError, match="at most 64 regions"):
        call(big, cap, lens)
    long = torch.zeros(3, MAX_WORDS + 1, 8, device="cuda")
    with pytest.raises(RuntimeError, match="at most 128 words"):
        call(im, long, lens)
