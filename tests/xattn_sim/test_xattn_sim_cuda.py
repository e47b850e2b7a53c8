"""CUDA backend without a GPU: nvcc compile check for sm_80/sm_90, and the kernels' block code run on the CPU.

``tools/compile_check_cuda.sh`` compiles every kernel variant with nvcc and builds the host emulation
(``csrc/xattn_sim/emulate.cpp``, AddressSanitizer on), which runs the very block code of
``csrc/xattn_sim/kernel.cuh`` (staging, score tile, epilogue, Gram prologue, chunked launches) thread by thread
in three thread orders. Its output is compared here with the reference. What this cannot check: real concurrency
(beyond the thread-order test), the CUDA launch configuration and anything only a GPU run shows; see
``@pytest.mark.gpu`` tests for those.
"""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest
import torch

from itm_kernels.xattn_sim import cuda as cuda_backend
from itm_kernels.xattn_sim import reference
from conftest import assert_close_report
from kernel_helpers import DTYPE_CODES, REPO, build_emulator, built_emulator, check_compile_output, run_emulator

# The host emulator builds with g++ and AddressSanitizer (10-15 s per kernel): slow checks, run by .ci/run.
pytestmark = pytest.mark.slow




@pytest.fixture(scope="module")
def compile_check(tmp_path_factory):
    return build_emulator(tmp_path_factory, "xattn", "--emulator", "xattn_sim")


@pytest.fixture(scope="module")
def nvcc_check(tmp_path_factory):
    """The full compile check with nvcc (~40 s per kernel): the slow test below only."""
    return build_emulator(tmp_path_factory, "xattn", "--emulator", "xattn_sim", nvcc=True)


@pytest.mark.slow
def test_compile_check_passes_for_sm80_and_sm90(nvcc_check):
    proc, _ = nvcc_check
    check_compile_output(proc, "", 12, no_spill=False)


def test_option_codes_and_limits_match_the_headers():
    text = (REPO / "csrc" / "xattn_sim" / "math.h").read_text()

    def enum(name):
        body = re.search(rf"enum {name} : int \{{([^}}]*)\}}", text).group(1)
        return [int(v) for v in re.findall(r"=\s*(\d+)", body)]

    assert enum("Norm") == [cuda_backend.NORM_CODES[n] for n in reference.NORMS]
    assert enum("Agg") == [cuda_backend.AGG_CODES[a] for a in reference.AGGS]
    assert enum("Direction") == [cuda_backend.DIRECTION_CODES[d] for d in reference.DIRECTIONS]
    kernel = (REPO / "csrc" / "xattn_sim" / "kernel.cuh").read_text()
    assert f"kMaxRegions = {cuda_backend.MAX_REGIONS};" in kernel
    assert f"kMaxWords = {cuda_backend.MAX_WORDS};" in kernel


# --- host emulation of the kernels ------------------------------------------------------------------------------

def make_problem(n_img, n_cap, K, L, d, *, seed=0, ragged=True, dtype=torch.float64):
    """Unit-norm features with NaN in every padding row (the kernels must never read them)."""
    g = torch.Generator().manual_seed(seed)
    images = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=-1)
    captions = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g, dtype=torch.float64), dim=-1)
    cap_lens = torch.randint(1, L + 1, (n_cap,), generator=g)
    cap_lens[0] = L
    cap_lens[-1] = 1
    img_lens = torch.randint(1, K + 1, (n_img,), generator=g) if ragged else torch.full((n_img,), K)
    img_lens[0] = K
    img_lens[-1] = 1 if ragged else K
    images, captions = images.to(dtype), captions.to(dtype)
    images[torch.arange(K)[None, :] >= img_lens[:, None]] = float("nan")
    captions[torch.arange(L)[None, :] >= cap_lens[:, None]] = float("nan")
    return images, captions, cap_lens, img_lens


def emulate(emulator: Path, tmp_path: Path, images, captions, cap_lens, img_lens, *, direction="t2i",
            norm="clipped_l2norm", lambda_softmax=9.0, agg="lse", lambda_lse=6.0, max_workspace_bytes=0):
    """Run the kernels' block code on the CPU; returns (N_img, N_cap) float32/float64 like the op."""
    n_img, K, d = images.shape
    n_cap, L, _ = captions.shape
    header = struct.pack("<8s8i3q2d", b"XATTNEM1", DTYPE_CODES[images.dtype], cuda_backend.DIRECTION_CODES[direction],
                         cuda_backend.NORM_CODES[norm], cuda_backend.AGG_CODES[agg], K, L, d, 0, n_img, n_cap,
                         max_workspace_bytes, lambda_softmax, lambda_lse)

    values, stdout = run_emulator(emulator, tmp_path, header, (images, captions, cap_lens.long(), img_lens.long()),
                                  float64=images.dtype == torch.float64)
    return values.reshape(n_img, n_cap), stdout


@pytest.fixture(scope="module")
def emulator(compile_check):
    return built_emulator(compile_check)


def expected(images, captions, cap_lens, img_lens, **opts):
    """The reference in float64 on the (rounded) inputs."""
    return reference.xattn_sim(images.double(), captions.double(), cap_lens, img_lens=img_lens,
                               compute_dtype=torch.float64, **opts)


# float64 accumulates like the reference up to ordering; float accumulation (float32/bf16/fp16 inputs) is compared
# with the float64 truth on the same rounded inputs.
TOL = {torch.float64: 1e-11, torch.float32: 2e-5, torch.bfloat16: 2e-5, torch.float16: 2e-5}


@pytest.mark.parametrize("direction", reference.DIRECTIONS)
@pytest.mark.parametrize("norm", reference.NORMS)
def test_emulated_every_option(emulator, tmp_path, direction, norm):
    seed = 10 * reference.NORMS.index(norm) + reference.DIRECTIONS.index(direction)
    images, captions, cap_lens, img_lens = make_problem(3, 7, 9, 11, 37, seed=seed)
    for agg, lam in (("lse", 6.0), ("mean", 9.0), ("max", 4.0), ("sum", 0.0)):
        opts = dict(direction=direction, norm=norm, lambda_softmax=lam, agg=agg, lambda_lse=5.0)
        got, _ = emulate(emulator, tmp_path, images, captions, cap_lens, img_lens, **opts)
        assert got.dtype == torch.float64
        assert_close_report(got, expected(images, captions, cap_lens, img_lens, **opts), atol=1e-11, rtol=1e-11,
                            what=f"emulated {opts}")


# (n_img, n_cap, K, L, d): tile shapes with 1, 2, 4 and 8 captions per block, partial caption blocks, K and L at
# 1 and at the kernel's limits, d below, at and above the 32-feature chunk.
SHAPES = [(2, 3, 1, 1, 1), (3, 10, 16, 16, 32), (2, 5, 17, 33, 70), (4, 9, 36, 20, 33), (2, 3, 64, 128, 40),
          (3, 4, 48, 65, 31), (1, 17, 5, 3, 64)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_emulated_shapes(emulator, tmp_path, shape, direction):
    images, captions, cap_lens, img_lens = make_problem(*shape, seed=sum(shape))
    for norm, agg in (("clipped_l2norm", "lse"), ("softmax", "max"), ("l1norm", "mean")):
        opts = dict(direction=direction, norm=norm, lambda_softmax=9.0, agg=agg, lambda_lse=6.0)
        got, _ = emulate(emulator, tmp_path, images, captions, cap_lens, img_lens, **opts)
        assert_close_report(got, expected(images, captions, cap_lens, img_lens, **opts), atol=1e-11, rtol=1e-11,
                            what=f"emulated {shape} {opts}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_emulated_low_precision_inputs(emulator, tmp_path, dtype, direction):
    images, captions, cap_lens, img_lens = make_problem(3, 6, 20, 27, 59, seed=7, dtype=dtype)
    opts = dict(direction=direction, norm="clipped_l2norm", lambda_softmax=9.0, agg="lse", lambda_lse=6.0)
    got, _ = emulate(emulator, tmp_path, images, captions, cap_lens, img_lens, **opts)
    assert got.dtype == torch.float32
    truth = expected(images, captions, cap_lens, img_lens, **opts)
    # At most twice the error PyTorch makes computing the same thing in float32, plus float32 rounding.
    torch_err = (reference.xattn_sim(images.float(), captions.float(), cap_lens, img_lens=img_lens,
                                     compute_dtype=torch.float32, **opts).double() - truth).abs().max().item()
    tol = 2 * torch_err + 4 * torch.finfo(torch.float32).eps * max(1.0, truth.abs().max().item())
    assert_close_report(got, truth, atol=tol, rtol=0, what=f"emulated {dtype} {direction}")


@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_emulated_workspace_chunks(emulator, tmp_path, direction):
    """A small workspace cap splits the context sets into several Gram + main launch pairs."""
    images, captions, cap_lens, img_lens = make_problem(5, 11, 10, 12, 40, seed=3)
    opts = dict(direction=direction, norm="clipped_l2norm", lambda_softmax=9.0, agg="lse", lambda_lse=6.0)
    got, log = emulate(emulator, tmp_path, images, captions, cap_lens, img_lens, max_workspace_bytes=1, **opts)
    chunks = int(re.search(r"(\d+) context chunk", log).group(1))
    assert chunks == (5 if direction == "t2i" else 2), log  # t2i: one image each; i2t: one 8-caption block each
    assert_close_report(got, expected(images, captions, cap_lens, img_lens, **opts), atol=1e-11, rtol=1e-11,
                        what=f"chunked {direction}")


def test_emulated_refuses_shapes_beyond_the_kernel(emulator, tmp_path):
    for K, L in ((65, 5), (5, 129)):
        images, captions, cap_lens, img_lens = make_problem(1, 1, K, L, 4, ragged=False)
        with pytest.raises(AssertionError, match="plan refused: the CUDA kernel supports"):
            emulate(emulator, tmp_path, images, captions, cap_lens, img_lens)


def check_goldens(emulator, tmp_path, scan_golden, names, n_img, n_cap):
    """Official SCAN float64 outputs on a slice of the golden inputs (each pair depends only on itself)."""
    img = torch.from_numpy(scan_golden["img"][:n_img]).double()
    cap = torch.from_numpy(scan_golden["cap"][:n_cap]).double()
    lens = torch.from_numpy(scan_golden["cap_lens"][:n_cap]).long()
    img_lens = torch.full((n_img,), img.shape[1])
    from test_xattn_sim import parse_golden_name

    for name in names:
        got, _ = emulate(emulator, tmp_path, img, cap, lens, img_lens, **parse_golden_name(name))
        assert_close_report(got, torch.from_numpy(scan_golden[name][:n_img, :n_cap]), atol=1e-12, rtol=1e-12,
                            what=f"emulated golden {name}")


def test_emulated_official_goldens_sample(emulator, tmp_path, scan_golden):
    from test_xattn_sim import golden_names

    names = golden_names(scan_golden)
    sample = names[::6]
    assert {n.split("__")[0] for n in sample} == {"t2i", "i2t"}
    check_goldens(emulator, tmp_path, scan_golden, sample, n_img=2, n_cap=5)


@pytest.mark.slow
def test_emulated_official_goldens_all(emulator, tmp_path, scan_golden):
    from test_xattn_sim import golden_names

    check_goldens(emulator, tmp_path, scan_golden, golden_names(scan_golden), n_img=3, n_cap=9)


# --- the compiled op on a GPU -------------------------------------------------------------------------------------

def cuda_op_available() -> bool:
    from itm_kernels._common import dispatch as backends

    return backends.has_cuda_kernels()


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_op_available(), reason="needs the extension built with CUDA and a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("direction", reference.DIRECTIONS)
def test_cuda_op_matches_reference(dtype, direction):
    for shape in SHAPES:
        images, captions, cap_lens, img_lens = make_problem(*shape, seed=sum(shape), dtype=dtype)
        for norm in reference.NORMS:
            for agg in reference.AGGS:
                opts = dict(direction=direction, norm=norm, lambda_softmax=9.0, agg=agg, lambda_lse=6.0)
                got = cuda_backend.xattn_sim(images.cuda(), captions.cuda(), cap_lens.cuda(), img_lens.cuda(),
                                             **opts).cpu()
                assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
                truth = expected(images, captions, cap_lens, img_lens, **opts)
                tol = 1e-10 if dtype == torch.float64 else 1e-4
                assert_close_report(got, truth, atol=tol, rtol=tol, what=f"cuda {dtype} {shape} {opts}")
                # A tiny workspace forces one launch pair per context chunk.
                chunked = cuda_backend.xattn_sim(images.cuda(), captions.cuda(), cap_lens.cuda(), img_lens.cuda(),
                                                 max_tile_bytes=1, **opts).cpu()
                assert torch.equal(chunked, got), f"chunked launches changed the result: {shape} {opts}"


@pytest.mark.gpu
@pytest.mark.skipif(not cuda_op_available(), reason="needs the extension built with CUDA and a CUDA device")
def test_cuda_op_rejects_what_it_cannot_run():
    images, captions, cap_lens, img_lens = make_problem(2, 3, 65, 5, 8, ragged=False)
    opts = dict(direction="t2i", norm="clipped_l2norm", lambda_softmax=9.0, agg="lse", lambda_lse=6.0)
    with pytest.raises(RuntimeError, match="at most 64 regions"):
        cuda_backend.xattn_sim(images.cuda(), captions.cuda(), cap_lens.cuda(), img_lens.cuda(), **opts)
    images, captions, cap_lens, img_lens = make_problem(2, 3, 5, 6, 8)
    with pytest.raises(RuntimeError, match="cap_lens must lie in 1..6"):
        cuda_backend.xattn_sim(images.cuda(), captions.cuda(), (cap_lens + 6).cuda(), img_lens.cuda(), **opts)
