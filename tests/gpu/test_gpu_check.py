"""tools/gpu_check.py without a GPU: the plan, the no-device exit, the report logic, and one correctness case run
on the CPU through the Triton interpreter (the same function the GPU run calls)."""
import os
import subprocess
import sys

if "triton" not in sys.modules:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from kernel_helpers import REPO, triton_mode  # noqa: E402

sys.path.insert(0, str(REPO / "tools"))
import gpu_check  # noqa: E402

TOOL = REPO / "tools" / "gpu_check.py"


def test_dry_run_prints_the_plan():
    proc = subprocess.run([sys.executable, str(TOOL), "--dry-run"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "correctness cases" in proc.stdout and "scan_coco5k_t2i_bf16_seconds" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_it_says_so_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, str(TOOL), "--quick", "--out", str(tmp_path)], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "no CUDA device" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_plan_covers_every_kernel_dtype_and_option():
    cases = gpu_check.correctness_cases()
    for op, backend in gpu_check.OPS_BACKENDS:
        mine = [c for c in cases if (c["op"], c["backend"]) == (op, backend)]
        expected = {"float32", "bfloat16", "float16"} | ({"float64"} if op == "xattn_sim" or backend == "cuda" else
                                                          set())
        assert {c["dtype"].split("/")[0] for c in mine} == expected
        assert {"odd", "model"} <= {c["size"] for c in mine}
    xattn = [c for c in cases if c["op"] == "xattn_sim" and c["backend"] == "triton"]
    assert {c["opts"]["direction"] for c in xattn} == {"t2i", "i2t"}
    assert len({c["opts"]["norm"] for c in xattn}) >= 5 and len({c["opts"]["agg"] for c in xattn}) == 4
    assert {c["dtype"] for c in xattn} >= {"float32/tf32", "float32/tf32x3"}
    assert not [c for c in cases if c["backend"] == "cuda" and c["shape"]["K"] > 64]


def test_targets_verified_rows_and_table():
    report = gpu_check.target_report({"scan_coco5k_t2i_bf16_seconds": 0.8,
                                      "scan_coco5k_fused_over_bare_gemm_rate": 0.3})
    assert report["scan_coco5k_t2i_bf16_seconds"]["met"] is True
    assert report["scan_coco5k_fused_over_bare_gemm_rate"]["met"] is False
    assert report["scan_train_step_speedup_vs_reference"]["met"] is None
    ok = dict(op="xattn_sim", backend="cuda", dtype="float32", err=1e-7, ok=True)
    bad = dict(op="local_sim", backend="triton", dtype="bfloat16", err=5e-3, ok=False)
    record = dict(date="2026-12-04", device="H200", capability=[9, 0], torch="2.x", triton="3.9.0",
                  correctness=[ok, bad, dict(bad, backend="cuda", ok=True, err=1e-4)], targets=report,
                  gradients=dict(ok=True), no_sync=dict(ok=False, error="x"), cuda_graph=dict(ok=True))
    rows = gpu_check.verified_rows(record)
    assert [(r["op"], r["backend"]) for r in rows] == [("xattn_sim", "cuda"), ("local_sim", "cuda")]
    assert set(rows[0]) == {"op", "backend", "capability", "torch", "triton", "date", "device"}
    record["verified"] = rows
    table = gpu_check.markdown(record)
    assert "| cuda `xattn_sim` | 1 | 1 |" in table and "verified" in table and "FAILED" in table and "**no**" in table


def test_topk_plan_and_gating():
    """The top-k cases cover both ranked sides, directions, the three dtypes and k = 1/10/16; a failed top-k case
    keeps xattn_sim's Triton row out of VERIFIED_GPU_KERNELS (auto would run that kernel)."""
    cases = gpu_check.topk_cases()
    assert {(c["opts"]["queries"], c["opts"]["direction"], c["dtype"]) for c in cases} == {
        (q, s, d) for q in ("images", "captions") for s in ("t2i", "i2t") for d in ("float32", "bfloat16", "float16")}
    assert {c["opts"]["k"] for c in cases} >= {1, 5, 10, 16}
    ok = dict(op="xattn_sim", backend="triton", dtype="float32", err=1e-7, ok=True)
    record = dict(date="2026-12-06", device="H100", capability=[9, 0], torch="2.x", triton="3.9.0",
                  correctness=[ok], gradients=dict(ok=True), no_sync=dict(ok=True), cuda_graph=dict(ok=True),
                  topk=[dict(cases[0], err=1e-7, ok=True)])
    assert [r["op"] for r in gpu_check.verified_rows(record)] == ["xattn_sim"]
    record["topk"].append(dict(cases[1], err=1.0, ok=False))
    assert gpu_check.verified_rows(record) == []
    assert "| triton `xattn_topk` (in-kernel) | 2 | 1 |" in gpu_check.markdown(record)


@triton_mode().needs_kernels
def test_one_topk_case_runs_through_the_interpreter():
    """run_topk_case, as the GPU run calls it, on CPU tensors (a smaller shape: the interpreter is slow), captions
    in two buckets, both program shapes (images ranked in t2i: one per program; in i2t: a block per program)."""
    for case in [c for c in gpu_check.topk_cases() if c["size"] == "odd" and c["dtype"] == "bfloat16"][:2]:
        small = dict(case, shape=dict(n_img=3, n_cap=6, K=5, L_max=20, d=19, min_len=1),
                     opts=dict(case["opts"], k=min(case["opts"]["k"], 3)))
        result = gpu_check.run_topk_case(small, torch.device("cpu"))
        assert result["ok"] and result["ordered"], result


@triton_mode().needs_kernels
def test_one_case_runs_through_the_interpreter():
    """run_case, as the GPU run calls it, on CPU tensors: the odd-size xattn_sim triton float32 case."""
    case = next(c for c in gpu_check.correctness_cases() if c["op"] == "xattn_sim" and c["backend"] == "triton"
                and c["size"] == "odd" and c["dtype"] == "float32")
    result = gpu_check.run_case(case, torch.device("cpu"))
    assert result["ok"], result
    assert result["err"] < gpu_check.TOLERANCES["float32"]


@triton_mode().needs_kernels
@pytest.mark.parametrize("op,dtype,direction", [("local_sim", "bfloat16", "i2t"), ("local_sim", "float32", "t2i"),
                                                ("node_match", "float32", None)])
def test_local_sim_and_node_match_cases_run_through_the_interpreter(op, dtype, direction):
    case = next(c for c in gpu_check.correctness_cases() if c["op"] == op and c["backend"] == "triton"
                and c["size"] == "odd" and c["dtype"] == dtype and c["opts"].get("direction") == direction)
    result = gpu_check.run_case(case, torch.device("cpu"))
    assert result["ok"], result


@triton_mode().needs_kernels
@pytest.mark.slow  # ~11 s in the interpreter; the backward's numerics are tested in tests/local_sim by default
def test_local_sim_gradient_check_and_step_run_through_the_interpreter():
    """The gradient check of the fused local_sim backward (tiny shape) and the training step the no-sync and
    CUDA-graph checks capture, on CPU tensors."""
    result = gpu_check.check_local_sim_gradients(torch.device("cpu"), dict(n_img=2, n_cap=2, K=5, L_max=6, d=24,
                                                                           min_len=1), s=16)
    assert result["ok"] and len(result["cases"]) == len(gpu_check.local_sim_gradient_cases()), result
    step, leaves = gpu_check._local_sim_step_fn(torch.device("cpu"), n=2, d=16)
    grads = step()
    assert [g.shape for g in grads] == [t.shape for t in leaves] and all(torch.isfinite(g).all() for g in grads)
