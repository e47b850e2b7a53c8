"""Verify the GPU kernels of itm_kernels on this GPU: one command, a JSON record and a Markdown table.

    python tools/gpu_check.py                    # everything (< 8 min on one H100/H200)
    python tools/gpu_check.py --quick            # correctness, gradients, no-sync and graph capture only
    python tools/gpu_check.py --dry-run          # print the plan; runs anywhere, no GPU needed
    python tools/gpu_check.py --out DIR          # where gpu_check.json and gpu_check.md go (default: benchmarks/)

Sections, each recorded pass/fail with numbers:
 1. correctness: every GPU kernel (xattn_sim, local_sim, node_match x triton, cuda) against the float64 reference
    on the inputs rounded to the tested dtype, at small odd sizes and at model sizes (SCAN/SGRAF/GSMN: K = 36,
    d = 1024; K = 100 for the Triton kernels), dtypes and options sampled; per-dtype tolerances in ``TOLERANCES``.
 2. gradients: the fused Triton backwards of xattn_sim and local_sim (t2i and i2t, dW/db included) against autograd
    through the float64 reference.
 3. no host sync: the Triton xattn_sim and local_sim forward + fused backward, the node_match forward and the
    in-kernel top-k (xattn_topk), under torch.cuda.set_sync_debug_mode("error").
 4. CUDA graph: a training step (forward + fused backward) of xattn_sim and of local_sim captured with
    torch.cuda.graph and replayed on new data.
 5. timings (not with --quick): SCAN t2i all pairs COCO 5K (5000 x 25000, K = 36, d = 1024, bf16) against the bare
    tensor-core GEMM of the same products (torch.mm, same dtype, same run) and the official-style loop (subset,
    extrapolated); a SCAN training step at batch 128 through the fused backward against autograd through the
    reference, with torch.cuda.max_memory_allocated. Each issue-16 target is reported met / not met. Then
    local_sim (SGRAF: K = 36, d = 1024, s = 256, bf16) and node_match (GSMN: 16 blocks) all pairs of a batch of
    128 against the bare GEMM of the same FLOPs (torch.mm, same dtype, same run), and a local_sim training step
    (forward + fused backward) against autograd through the reference at batch 64, times and peak memory.
 6. top-k: the in-kernel Triton top-k (``xattn_topk(backend="triton", method="kernel")``, both ranked sides, both
    directions, float32/bfloat16/float16, k = 1, 10, 16, three caption buckets) against the top-k of the float64
    reference (values within the dtype's tolerance), the Triton matrix at the returned indices, and the tie order;
    with the timings, COCO 1K (1000 x 5000, bf16, k = 10) against the streaming driver over the same backend
    (``method="stream"``), times and peak memory.
The record lists, for every (op, backend) whose checks all passed, the row to add to
``itm_kernels._common.dispatch.VERIFIED_GPU_KERNELS`` (that is what lets ``backend="auto"`` pick the kernel).
Without a CUDA device (and without --dry-run) it exits with status 2 and says so.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# |kernel - float64 truth| <= tol (1 + |truth|), by tested dtype (and float32 tl.dot precision).
# bfloat16 allows one bf16 rounding of the result (2^-7 relative: local_sim/node_match return the input dtype).
TOLERANCES = {"float64": 1e-10, "float32": 1e-5, "float32/tf32x3": 1e-4, "float32/tf32": 2e-2, "bfloat16": 8e-3,
              "float16": 1e-3}
# Issue 16's targets on one H100/H200.
TARGETS = {
    "scan_coco5k_t2i_bf16_seconds": ("<", 1.0),
    "scan_coco5k_fused_over_bare_gemm_rate": (">=", 0.5),
    "scan_train_step_speedup_vs_reference": (">=", 5.0),
    "scan_train_step_memory_ratio_vs_reference": ("<", 0.1),
}
NOT_MEASURED = {"sgraf_f30k_1k_all_pairs_seconds (< 2 s)": "SGR+SAF all-pairs timing is not in this version",
                "gsmn_dense_sparse_seconds (< 5 s)": "GSMN dense+sparse timing is not in this version"}
OPS_BACKENDS = [("xattn_sim", "triton"), ("xattn_sim", "cuda"), ("local_sim", "triton"), ("local_sim", "cuda"),
                ("node_match", "triton"), ("node_match", "cuda")]


# ------------------------------------------------------------------------------------------------------------------
# The plan (pure Python: unit-tested on the CPU)
# ------------------------------------------------------------------------------------------------------------------

def correctness_cases(quick: bool = False) -> list[dict]:
    """(op, backend, size, dtype/precision, options) cases; sampled so that every dtype, norm, agg and direction
    appears for every kernel, at small odd sizes and model sizes."""
    norms = ["clipped_l2norm", "softmax", "l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm"]
    aggs = ["lse", "mean", "max", "sum"]
    dtypes = ["float32", "bfloat16", "float16", "float64", "float32/tf32x3", "float32/tf32"]
    sizes = {"odd": dict(n_img=3, n_cap=7, K=7, L_max=13, d=59, min_len=1),
             "model": dict(n_img=6, n_cap=30, K=36, L_max=40, d=1024, min_len=1),
             "wideK": dict(n_img=3, n_cap=9, K=100, L_max=24, d=96, min_len=1)}
    cases = []
    i = 0
    for op, backend in OPS_BACKENDS:
        for size in sizes:
            if size == "wideK" and backend == "cuda":
                continue                      # beyond the CUDA kernels' K <= 64 (supports() says so)
            for dtype in dtypes:
                if backend != "triton" and "/" in dtype:
                    continue                  # precision= is the Triton backends' keyword
                if op != "xattn_sim" and backend == "triton" and dtype == "float64":
                    continue                  # those Triton kernels take no float64 (their supports() says so)
                if quick and size == "model" and dtype not in ("float32", "bfloat16"):
                    continue
                opts = {}
                if op == "xattn_sim":
                    opts = dict(direction=("t2i", "i2t")[i % 2], norm=norms[i % len(norms)], agg=aggs[(i // 2) % 4])
                elif op == "local_sim" and backend == "triton":
                    opts = dict(direction=("t2i", "i2t")[i % 2])
                cases.append(dict(op=op, backend=backend, size=size, dtype=dtype, shape=sizes[size], opts=opts))
                i += 1
    return cases


# The in-kernel top-k: captions in three length buckets (odd: up to 37 words), several buffer merges per query.
TOPK_SIZES = {"odd": dict(n_img=5, n_cap=23, K=7, L_max=37, d=59, min_len=1),
              "model": dict(n_img=24, n_cap=120, K=36, L_max=40, d=1024, min_len=1)}


def topk_cases() -> list[dict]:
    """In-kernel Triton top-k cases: both ranked sides x both directions x float32/bfloat16/float16 x two sizes,
    k cycling through 1, 10, 16 (capped at the gallery size), norm/agg options sampled."""
    norms = ["clipped_l2norm", "softmax", "l2norm", "l1norm", "clipped_l1norm", "clipped", "no_norm"]
    aggs = ["lse", "mean", "max", "sum"]
    cases, i = [], 0
    for size, shape in TOPK_SIZES.items():
        for queries in ("images", "captions"):
            for direction in ("t2i", "i2t"):
                for dtype in ("float32", "bfloat16", "float16"):
                    gallery = shape["n_cap"] if queries == "images" else shape["n_img"]
                    opts = dict(queries=queries, direction=direction, norm=norms[i % len(norms)],
                                agg=aggs[(i // 2) % 4], k=min((1, 10, 16)[i % 3], gallery))
                    cases.append(dict(op="xattn_topk", backend="triton", size=size, dtype=dtype, shape=shape,
                                      opts=opts))
                    i += 1
    return cases


def gradient_cases() -> list[dict]:
    return [dict(dtype=dtype, direction=direction, norm=norm, agg=agg)
            for dtype in ("float64", "float32") for direction in ("t2i", "i2t")
            for norm, agg in (("clipped_l2norm", "lse"), ("softmax", "max"), ("l1norm", "mean"), ("no_norm", "sum"))]


def within(err: float, dtype: str) -> bool:
    return math.isfinite(err) and err <= TOLERANCES[dtype]


def target_report(measured: dict) -> dict:
    """{target: {"value", "bound", "met"}} for every target in TARGETS (value None when it was not measured)."""
    report = {}
    for name, (op, bound) in TARGETS.items():
        value = measured.get(name)
        met = None if value is None else (value < bound if op == "<" else value >= bound)
        report[name] = dict(value=value, bound=f"{op} {bound}", met=met)
    for name, why in NOT_MEASURED.items():
        report[name] = dict(value=None, bound=None, met=None, note=why)
    return report


def verified_rows(record: dict) -> list[dict]:
    """Rows for VERIFIED_GPU_KERNELS: (op, backend) whose every correctness case passed (and, for the Triton
    kernels, the gradient, no-sync and graph checks too: they cover xattn_sim's and local_sim's fused backwards and
    every Triton forward)."""
    rows = []
    for op, backend in OPS_BACKENDS:
        cases = [c for c in record.get("correctness", []) if (c["op"], c["backend"]) == (op, backend)]
        ok = bool(cases) and all(c.get("ok") for c in cases)
        if backend == "triton":
            extra = [record.get(k, {}) for k in ("gradients", "no_sync", "cuda_graph")]
            ok = ok and all(e.get("ok") for e in extra)
        if (op, backend) == ("xattn_sim", "triton") and "topk" in record:
            # "auto" resolving xattn_sim to triton also runs xattn_topk's Triton kernel: it must have passed too.
            ok = ok and bool(record["topk"]) and all(c.get("ok") for c in record["topk"])
        if ok:
            rows.append(dict(op=op, backend=backend, capability=record["capability"], torch=record["torch"],
                             triton=record["triton"], date=record["date"], device=record["device"]))
    return rows


def markdown(record: dict) -> str:
    """The table benchmarks/RESULTS.md expects: kernel status rows, then the targets."""
    lines = [f"## {record['date']} | {record['device']} (sm_{record['capability'][0]}{record['capability'][1]}) | "
             f"torch {record['torch']} | triton {record['triton']} | `python tools/gpu_check.py`", "",
             "| kernel | cases | passed | worst err / tol | status |", "|---|---|---|---|---|"]
    for op, backend in OPS_BACKENDS:
        cases = [c for c in record.get("correctness", []) if (c["op"], c["backend"]) == (op, backend)]
        passed = sum(bool(c.get("ok")) for c in cases)
        worst = max((c["err"] / TOLERANCES[c["dtype"]] for c in cases if c.get("err") is not None), default=None)
        verified = any((r["op"], r["backend"]) == (op, backend) for r in record.get("verified", []))
        status = "verified" if verified else ("skipped" if not cases or all(c.get("skipped") for c in cases)
                                              else "FAILED")
        lines.append(f"| {backend} `{op}` | {len(cases)} | {passed} | "
                     f"{'-' if worst is None else f'{worst:.2f}'} | {status} |")
    if "topk" in record:
        cases = record["topk"]
        worst = max((c["err"] / TOLERANCES[c["dtype"]] for c in cases if c.get("err") is not None), default=None)
        lines.append(f"| triton `xattn_topk` (in-kernel) | {len(cases)} | {sum(bool(c.get('ok')) for c in cases)} | "
                     f"{'-' if worst is None else f'{worst:.2f}'} | "
                     f"{'ok' if cases and all(c.get('ok') for c in cases) else 'FAILED'} |")
    lines += ["", "| check | result |", "|---|---|"]
    for key in ("gradients", "no_sync", "cuda_graph"):
        item = record.get(key, {})
        lines.append(f"| {key} | {'ok' if item.get('ok') else 'FAILED: ' + str(item.get('error', 'not run'))} |")
    lines += ["", "| target | value | bound | met |", "|---|---|---|---|"]
    for name, t in record.get("targets", {}).items():
        value = "-" if t["value"] is None else f"{t['value']:.4g}"
        met = {True: "yes", False: "**no**", None: t.get("note", "not measured")}[t["met"]]
        lines.append(f"| {name} | {value} | {t['bound'] or '-'} | {met} |")
    if record.get("timings"):
        lines += ["", "| timing | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" for k, v in record["timings"].items()]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------------------------
# The checks (need a GPU)
# ------------------------------------------------------------------------------------------------------------------

def _inputs(shape: dict, dtype, device, seed=0):
    import torch

    g = torch.Generator().manual_seed(seed)
    n_img, n_cap, K, L, d = shape["n_img"], shape["n_cap"], shape["K"], shape["L_max"], shape["d"]
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g, dtype=torch.float64), dim=2)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g, dtype=torch.float64), dim=2)
    cap_lens = torch.randint(shape.get("min_len", 1), L + 1, (n_cap,), generator=g)
    cap_lens[0] = L
    img_lens = torch.randint(1, K + 1, (n_img,), generator=g)
    img_lens[0] = K
    img, cap = img.to(dtype), cap.to(dtype)
    # Poison the padding: the kernels must never read it.
    pad = torch.arange(L)[None, :] >= cap_lens[:, None]
    cap = cap.masked_fill(pad[..., None], float("nan"))
    return img.to(device), cap.to(device), cap_lens.to(device), img_lens.to(device)


def _clean(x, lens):
    import torch

    pad = torch.arange(x.shape[1], device=x.device)[None, :] >= lens[:, None]
    return x.masked_fill(pad[..., None], 0.0)


def _max_rel_err(got, truth) -> float:
    got, truth = got.double(), truth.double()
    if got.shape != truth.shape:
        return float("inf")
    return float(((got - truth).abs() / (1 + truth.abs())).max()) if got.numel() else 0.0


def run_case(case: dict, device) -> dict:
    import torch

    import itm_kernels
    from itm_kernels.local_sim.i2t import local_sim_i2t_reference
    from itm_kernels.local_sim.reference import local_sim_reference
    from itm_kernels.node_match.reference import node_match_reference
    from itm_kernels.xattn_sim import reference

    dtype_name, _, precision = case["dtype"].partition("/")
    dtype = getattr(torch, dtype_name)
    img, cap, cap_lens, img_lens = _inputs(case["shape"], dtype, device)
    clean = _clean(cap, cap_lens).double()
    op, backend = case["op"], case["backend"]
    if backend not in itm_kernels.available_backends(device):
        return dict(case, ok=False, skipped=True, error=f"backend {backend} not available here")
    t0 = time.perf_counter()
    if op == "xattn_sim":
        got = itm_kernels.xattn_sim(img, cap, cap_lens, img_lens=img_lens, backend=backend,
                                    precision=precision or "ieee", **case["opts"])
        truth = reference.xattn_sim(img.double(), clean, cap_lens, img_lens=img_lens, **case["opts"])
    elif op == "local_sim":
        g = torch.Generator().manual_seed(1)
        s = 256 if case["shape"]["d"] >= 256 else 16
        weight = (torch.randn(s, img.shape[2], generator=g, dtype=torch.float64) / math.sqrt(img.shape[2]))
        bias = torch.randn(s, generator=g, dtype=torch.float64) * 0.1
        weight, bias = weight.to(device, dtype), bias.to(device, dtype)
        direction = case["opts"].get("direction", "t2i")
        got = itm_kernels.local_sim(img, cap, cap_lens, weight, bias, backend=backend, direction=direction,
                                    precision=precision or "ieee")
        spec = local_sim_reference if direction == "t2i" else local_sim_i2t_reference
        truth = spec(img.double(), clean, cap_lens, weight.double(), bias.double(), compute_dtype=torch.float64)
    else:
        blocks = 16 if img.shape[2] % 16 == 0 else 1
        got = itm_kernels.node_match(img, cap, cap_lens, num_blocks=blocks, backend=backend,
                                     precision=precision or "ieee")
        truth = node_match_reference(img.double(), clean, cap_lens, num_blocks=blocks, compute_dtype=torch.float64)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    if isinstance(got, tuple):
        err = max(_max_rel_err(a, b) for a, b in zip(got, truth))
    else:
        err = _max_rel_err(got, truth)
    return dict(case, err=err, ok=within(err, case["dtype"]), seconds=round(seconds, 3))


def run_topk_case(case: dict, device) -> dict:
    """One in-kernel top-k case: err = the worst relative difference of the returned values from (a) the top-k of
    the float64 reference, (b) the reference at the returned indices and (c) the Triton matrix at the returned
    indices; plus the order (values non-increasing, equal values by descending index)."""
    import torch

    import itm_kernels
    from itm_kernels.xattn_sim import reference

    dtype = getattr(torch, case["dtype"])
    img, cap, cap_lens, img_lens = _inputs(case["shape"], dtype, device, seed=3)
    clean = _clean(cap, cap_lens).double()
    opts = {key: v for key, v in case["opts"].items() if key not in ("queries", "k")}
    lambdas = (9.0, 6.0) if opts["direction"] == "t2i" else (4.0, 5.0)
    opts.update(lambda_softmax=lambdas[0], lambda_lse=lambdas[1])
    queries, k = case["opts"]["queries"], case["opts"]["k"]
    t0 = time.perf_counter()
    values, indices = itm_kernels.xattn_topk(img, cap, cap_lens, k, img_lens=img_lens, queries=queries,
                                             backend="triton", method="kernel", **opts)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    full = itm_kernels.xattn_sim(img, cap, cap_lens, img_lens=img_lens, backend="triton", **opts)
    truth = reference.xattn_sim(img.double(), clean, cap_lens, img_lens=img_lens, **opts)
    if queries == "captions":
        full, truth = full.t(), truth.t()
    err = max(_max_rel_err(values, truth.topk(k, dim=1).values), _max_rel_err(values, truth.gather(1, indices)),
              _max_rel_err(values, full.gather(1, indices)))
    same = values[:, 1:] == values[:, :-1]
    ordered = bool((values[:, 1:] <= values[:, :-1]).all()) and bool(((indices[:, 1:] < indices[:, :-1]) |
                                                                       ~same).all())
    return dict(case, err=err, ordered=ordered, ok=within(err, case["dtype"]) and ordered,
                seconds=round(seconds, 3))


def check_gradients(device) -> dict:
    import torch

    from itm_kernels.xattn_sim import reference
    from itm_kernels.xattn_sim import triton as xattn_triton

    worst, rows = 0.0, []
    shape = dict(n_img=5, n_cap=9, K=36, L_max=21, d=200, min_len=1)
    for case in gradient_cases():
        dtype = getattr(torch, case["dtype"])
        img, cap, cap_lens, img_lens = _inputs(shape, dtype, device, seed=3)
        grad = torch.randn(img.shape[0], cap.shape[0], device=device, dtype=torch.float64)
        opts = dict(direction=case["direction"], norm=case["norm"], agg=case["agg"], lambda_softmax=9.0,
                    lambda_lse=6.0)
        g_img, g_cap = xattn_triton.xattn_sim_backward(grad, img, cap, cap_lens, img_lens, **opts)
        a = img.double().requires_grad_()
        b = _clean(cap, cap_lens).double().requires_grad_()
        e_img, e_cap = torch.autograd.grad(reference.xattn_sim(a, b, cap_lens, img_lens=img_lens, **opts), (a, b),
                                           grad)
        err = max(_max_rel_err(g_img, e_img), _max_rel_err(g_cap, e_cap))
        tol = TOLERANCES[case["dtype"]] * 10          # gradients: one order looser than the forward
        rows.append(dict(case, err=err, ok=within(err, case["dtype"]) or err <= tol))
        worst = max(worst, err)
    local = check_local_sim_gradients(device)
    rows += local["cases"]
    worst = max(worst, local["worst"])
    return dict(ok=all(r["ok"] for r in rows), worst=worst, cases=rows)


def local_sim_gradient_cases() -> list[dict]:
    return [dict(op="local_sim", dtype=dtype, direction=direction, precision=precision)
            for dtype, precision in (("float32", "ieee"), ("float32", "tf32x3"), ("bfloat16", "ieee"))
            for direction in ("t2i", "i2t")]


def check_local_sim_gradients(device, shape: dict | None = None, s: int = 64) -> dict:
    """The fused local_sim backward (``local_sim_backward_triton``: images, captions, weight, bias) against
    autograd through the float64 reference, t2i and i2t, at SGRAF K = 36 with d = 200, s = 64."""
    import torch

    from itm_kernels.local_sim import triton as tls
    from itm_kernels.local_sim.i2t import local_sim_i2t_reference
    from itm_kernels.local_sim.reference import local_sim_reference

    rows, worst = [], 0.0
    shape = shape or dict(n_img=4, n_cap=7, K=36, L_max=21, d=200, min_len=1)
    for case in local_sim_gradient_cases():
        dtype = getattr(torch, case["dtype"])
        img, cap, cap_lens, _ = _inputs(shape, dtype, device, seed=4)
        g = torch.Generator().manual_seed(6)
        weight = (torch.randn(s, shape["d"], generator=g, dtype=torch.float64) / math.sqrt(shape["d"]))
        bias = torch.randn(s, generator=g, dtype=torch.float64) * 0.1
        weight, bias = weight.to(device, dtype), bias.to(device, dtype)
        rows_out = shape["L_max"] if case["direction"] == "t2i" else shape["K"]
        grad = torch.randn(shape["n_img"], shape["n_cap"], rows_out, s, device=device, dtype=torch.float64)
        got = tls.local_sim_backward_triton(grad, img, cap, cap_lens, weight, bias, lambda_softmax=9.0,
                                            direction=case["direction"], precision=case["precision"])
        spec = local_sim_reference if case["direction"] == "t2i" else local_sim_i2t_reference
        leaves = [t.double().requires_grad_() for t in (img, _clean(cap, cap_lens), weight, bias)]
        truth = torch.autograd.grad(spec(leaves[0], leaves[1], cap_lens, leaves[2], leaves[3], lambda_softmax=9.0),
                                    leaves, grad)
        err = max(_max_rel_err(a, b) for a, b in zip(got, truth))
        key = case["dtype"] if case["precision"] == "ieee" else f"{case['dtype']}/{case['precision']}"
        rows.append(dict(case, err=err, ok=err <= TOLERANCES[key] * 10))   # one order looser than the forward
        worst = max(worst, err)
    return dict(ok=all(r["ok"] for r in rows), worst=worst, cases=rows)


def _train_step_fn(device, dtype=None, n=32):
    import torch

    from itm_kernels.xattn_sim import xattn_sim_op

    dtype = dtype or torch.float32
    img, cap, cap_lens, img_lens = _inputs(dict(n_img=n, n_cap=n, K=36, L_max=24, d=1024, min_len=4), dtype,
                                           device, seed=5)
    cap = _clean(cap, cap_lens)
    img, cap = img.requires_grad_(), cap.requires_grad_()

    def step():
        out = xattn_sim_op(img, cap, cap_lens, img_lens, "t2i", "clipped_l2norm", 9.0, "lse", 6.0, "triton", 0,
                           "ieee")
        loss = (out - out.diagonal()[:, None] + 0.2).clamp_min(0).sum()
        return torch.autograd.grad(loss, (img, cap))
    return step, (img, cap)


def _local_sim_step_fn(device, dtype=None, n=16, d=1024):
    """A local_sim training step through backend "triton" (forward + fused backward, dW/db included)."""
    import torch

    from itm_kernels.local_sim import local_sim_op

    dtype = dtype or torch.float32
    img, cap, cap_lens, _ = _inputs(dict(n_img=n, n_cap=n, K=36, L_max=24, d=d, min_len=4), dtype, device, seed=7)
    cap = _clean(cap, cap_lens)
    g = torch.Generator().manual_seed(8)
    weight = (torch.randn(256, d, generator=g) / math.sqrt(d)).to(device, dtype)
    bias = (torch.randn(256, generator=g) * 0.1).to(device, dtype)
    leaves = tuple(t.requires_grad_() for t in (img, cap, weight, bias))

    def step():
        out = local_sim_op(*leaves[:2], cap_lens, *leaves[2:], 9.0, "triton", 0, "t2i", "ieee")
        return torch.autograd.grad(out.square().sum(), leaves)
    return step, leaves


def _node_match_forward_fn(device, n=16):
    import torch

    from itm_kernels.node_match import node_match_op

    img, cap, cap_lens, _ = _inputs(dict(n_img=n, n_cap=n, K=36, L_max=24, d=1024, min_len=4), torch.float32,
                                    device, seed=9)
    return lambda: node_match_op(img, cap, cap_lens, 10.0, 16, "triton", 0, "ieee"), (img, cap)


def _topk_kernel_fn(device, n=16):
    """The in-kernel Triton top-k on validated inputs (the public wrapper's argument checks read the lengths)."""
    import torch

    from itm_kernels.xattn_topk import triton as topk_triton

    img, cap, cap_lens, img_lens = _inputs(dict(n_img=n, n_cap=2 * n, K=36, L_max=40, d=1024, min_len=1),
                                           torch.bfloat16, device, seed=11)
    return lambda: topk_triton.xattn_topk(img, cap, cap_lens, img_lens, 10, queries="images", direction="t2i",
                                          norm="clipped_l2norm", lambda_softmax=9.0, agg="lse",
                                          lambda_lse=6.0), (img, cap)


def check_no_sync(device) -> dict:
    import torch

    checked = []
    for name, make in (("xattn_sim train step", _train_step_fn), ("local_sim train step", _local_sim_step_fn),
                       ("node_match forward", _node_match_forward_fn), ("xattn_topk kernel", _topk_kernel_fn)):
        step, _ = make(device)
        step()                                       # warm-up: compile (and autotune) outside the checked call
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        checked.append(name)
    return dict(ok=True, checked=checked)


def check_cuda_graph(device) -> dict:
    """xattn_sim's and local_sim's training steps, captured and replayed on new data, against eager steps."""
    errs = {}
    for name, make in (("xattn_sim", _train_step_fn), ("local_sim", _local_sim_step_fn)):
        errs[name] = _graph_replay_err(device, make)
    return dict(ok=all(e <= 1e-5 for e in errs.values()), err=max(errs.values()), per_op=errs)


def _graph_replay_err(device, make) -> float:
    import torch

    step, leaves = make(device)
    img, cap = leaves[0], leaves[1]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = step()
    with torch.no_grad():
        img.mul_(0.5).add_(0.01)
        cap.mul_(0.7)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    return max(_max_rel_err(a, b) for a, b in zip(static_grads, eager))


def _time(fn, repeats=3) -> float:
    import torch

    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def timings(device) -> dict:
    import torch

    import itm_kernels
    from itm_kernels.xattn_sim import reference
    from itm_models.baselines.scan import official_style_sims

    out = {}
    g = torch.Generator().manual_seed(0)
    n_img, n_cap, K, L, d = 5000, 25000, 36, 20, 1024
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g), dim=2).to(device, torch.bfloat16)
    lens = torch.randint(8, L + 1, (n_cap,), generator=g).to(device)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g), dim=2).to(device, torch.bfloat16)
    fused = _time(lambda: itm_kernels.xattn_sim(img, cap, lens, backend="triton"), repeats=2)
    out["scan_coco5k_t2i_bf16_seconds"] = fused
    words = cap[torch.arange(L, device=device)[None, :] < lens[:, None]]          # (sum L, d)
    a = img.reshape(-1, d)
    chunk = 32768
    prod = torch.empty(a.shape[0], chunk, dtype=torch.bfloat16, device=device)
    bt = words.t().contiguous()

    def bare():
        for w0 in range(0, bt.shape[1], chunk):
            b = bt[:, w0:w0 + chunk]
            torch.mm(a, b, out=prod[:, :b.shape[1]])
    bare_s = _time(bare, repeats=2)
    out["bare_gemm_same_products_seconds"] = bare_s
    out["scan_coco5k_fused_over_bare_gemm_rate"] = bare_s / fused
    del prod, bt, words
    sub_img, sub_cap = 100, 1000
    off = _time(lambda: official_style_sims(img[:sub_img].float(), cap[:sub_cap].float(), lens[:sub_cap]),
                repeats=1)
    out["official_style_coco5k_extrapolated_seconds"] = off * (n_img * n_cap) / (sub_img * sub_cap)
    del img, cap
    torch.cuda.empty_cache()

    # A SCAN training step at batch 128: fused (triton forward + fused backward) vs autograd through the reference.
    b = 128
    img = torch.nn.functional.normalize(torch.randn(b, K, d, generator=g), dim=2).to(device).requires_grad_()
    lens = torch.randint(8, L + 1, (b,), generator=g).to(device)
    cap = torch.nn.functional.normalize(torch.randn(b, L, d, generator=g), dim=2).to(device)
    cap = _clean(cap, lens).requires_grad_()

    def loss_of(sims):
        return (sims - sims.diagonal()[:, None] + 0.2).clamp_min(0).sum()

    def ours():
        return torch.autograd.grad(loss_of(itm_kernels.xattn_sim(img, cap, lens, backend="triton")), (img, cap))

    def ref():
        return torch.autograd.grad(loss_of(reference.xattn_sim(img, cap, lens)), (img, cap))
    for name, fn in (("ours", ours), ("reference", ref)):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        seconds = _time(fn, repeats=3)
        out[f"scan_train_step_{name}_seconds"] = seconds
        out[f"scan_train_step_{name}_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    out["scan_train_step_speedup_vs_reference"] = out["scan_train_step_reference_seconds"] / \
        out["scan_train_step_ours_seconds"]
    out["scan_train_step_memory_ratio_vs_reference"] = out["scan_train_step_ours_peak_mib"] / \
        max(out["scan_train_step_reference_peak_mib"], 1e-9)
    return out


def _bare_gemm_seconds(device, dtype, flops: float) -> float:
    """Median time of torch.mm (4096 x 1024) @ (1024 x n) in ``dtype`` with n chosen for ``flops`` FLOPs."""
    import torch

    m, k = 4096, 1024
    n = max(16, int(flops / (2 * m * k)))
    a = torch.randn(m, k, device=device).to(dtype)
    b = torch.randn(k, n, device=device).to(dtype)
    return _time(lambda: torch.mm(a, b), repeats=5)


def _peak_mib(fn) -> tuple[float, float]:
    """(median seconds, peak MiB above the memory in use before) of ``fn`` (torch.cuda.max_memory_allocated)."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    seconds = _time(fn, repeats=3)
    return seconds, (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def op_timings(device) -> dict:
    """local_sim (SGRAF) and node_match (GSMN) on a batch of 128 x 128 pairs, bf16, K = 36, d = 1024, captions of
    8..20 words: the fused Triton forward against the bare GEMM of the same FLOPs in the same run, peak memory;
    a local_sim training step (forward + fused backward, float32) against autograd through the reference at 64."""
    import torch

    import itm_kernels
    from itm_kernels.local_sim.reference import local_sim_reference

    out = {}
    g = torch.Generator().manual_seed(1)
    n, K, L, d, s = 128, 36, 20, 1024, 256
    bf = torch.bfloat16
    img = torch.nn.functional.normalize(torch.randn(n, K, d, generator=g), dim=2).to(device, bf)
    lens = torch.randint(8, L + 1, (n,), generator=g).to(device)
    cap = torch.nn.functional.normalize(torch.randn(n, L, d, generator=g), dim=2).to(device, bf)
    weight = (torch.randn(s, d, generator=g) / 32).to(device, bf)
    bias = (torch.randn(s, generator=g) * 0.1).to(device, bf)
    words = float(lens.sum()) * n                                        # (pair, word) count, once, outside timing
    seconds, mib = _peak_mib(lambda: itm_kernels.local_sim(img, cap, lens, weight, bias, backend="triton"))
    flops = words * (4 * K * d + 2 * d * s)
    bare = _bare_gemm_seconds(device, bf, flops)
    out.update(local_sim_sgraf_b128_bf16_seconds=seconds, local_sim_sgraf_b128_bf16_peak_mib=mib,
               local_sim_bare_gemm_same_flops_seconds=bare, local_sim_fused_over_bare_gemm_rate=bare / seconds)
    seconds, mib = _peak_mib(lambda: itm_kernels.node_match(img, cap, lens, num_blocks=16, backend="triton"))
    bare = _bare_gemm_seconds(device, bf, words * 6 * K * d)
    out.update(node_match_gsmn_b128_bf16_seconds=seconds, node_match_gsmn_b128_bf16_peak_mib=mib,
               node_match_bare_gemm_same_flops_seconds=bare, node_match_fused_over_bare_gemm_rate=bare / seconds)
    del img, cap
    torch.cuda.empty_cache()

    b = 64
    img = torch.nn.functional.normalize(torch.randn(b, K, d, generator=g), dim=2).to(device).requires_grad_()
    lens = torch.randint(8, L + 1, (b,), generator=g).to(device)
    cap = _clean(torch.nn.functional.normalize(torch.randn(b, L, d, generator=g), dim=2).to(device), lens)
    cap = cap.requires_grad_()
    w = (torch.randn(s, d, generator=g) / 32).to(device).requires_grad_()
    bb = (torch.randn(s, generator=g) * 0.1).to(device).requires_grad_()

    def ours():
        return torch.autograd.grad(itm_kernels.local_sim(img, cap, lens, w, bb, backend="triton").square().sum(),
                                   (img, cap, w, bb))

    def ref():
        return torch.autograd.grad(local_sim_reference(img, cap, lens, w, bb).square().sum(), (img, cap, w, bb))
    for name, fn in (("ours", ours), ("reference", ref)):
        seconds, mib = _peak_mib(fn)
        out[f"local_sim_train_step_b64_{name}_seconds"] = seconds
        out[f"local_sim_train_step_b64_{name}_peak_mib"] = mib
    out["local_sim_train_step_speedup_vs_reference"] = out["local_sim_train_step_b64_reference_seconds"] / \
        out["local_sim_train_step_b64_ours_seconds"]
    return out


def topk_timings(device) -> dict:
    """COCO 1K (1000 images x 5000 captions, K = 36, d = 1024, 8..20 words, bf16), k = 10, both ranked sides:
    the in-kernel Triton top-k against the streaming driver over the same backend (xattn_sim tiles + torch.topk
    merges), median seconds and peak MiB of each, and the ratio."""
    import torch

    import itm_kernels

    g = torch.Generator().manual_seed(2)
    n_img, n_cap, K, L, d = 1000, 5000, 36, 20, 1024
    img = torch.nn.functional.normalize(torch.randn(n_img, K, d, generator=g), dim=2).to(device, torch.bfloat16)
    lens = torch.randint(8, L + 1, (n_cap,), generator=g).to(device)
    cap = torch.nn.functional.normalize(torch.randn(n_cap, L, d, generator=g), dim=2).to(device, torch.bfloat16)
    out = {}
    for queries in ("images", "captions"):
        for method in ("kernel", "stream"):
            seconds, mib = _peak_mib(lambda: itm_kernels.xattn_topk(img, cap, lens, 10, queries=queries,
                                                                    backend="triton", method=method))
            out[f"topk_coco1k_{queries}_k10_bf16_{method}_seconds"] = seconds
            out[f"topk_coco1k_{queries}_k10_bf16_{method}_peak_mib"] = mib
        key = f"topk_coco1k_{queries}_k10_bf16"
        out[f"topk_coco1k_{queries}_kernel_speedup_vs_stream"] = (out[f"{key}_stream_seconds"]
                                                                  / out[f"{key}_kernel_seconds"])
    return out


def _guarded(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as exc:  # a failed check is a result, not a crash of the whole run
        return dict(ok=False, error=f"{type(exc).__name__}: {exc}", trace=traceback.format_exc(limit=3))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    parser.add_argument("--quick", action="store_true", help="skip the timings")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks", help="folder for gpu_check.json/.md")
    args = parser.parse_args(argv)
    cases = correctness_cases(args.quick)
    if args.dry_run:
        print(f"plan: {len(cases)} correctness cases over {OPS_BACKENDS}; {len(topk_cases())} in-kernel top-k "
              f"cases (xattn_topk triton); {len(gradient_cases())} xattn_sim + "
              f"{len(local_sim_gradient_cases())} local_sim gradient cases; no-sync (xattn_sim, local_sim, "
              f"node_match, xattn_topk); CUDA graph (xattn_sim, local_sim); "
              f"{'no timings' if args.quick else 'timings: ' + ', '.join(TARGETS)}"
              f"{'' if args.quick else '; local_sim/node_match vs bare GEMM of the same FLOPs, local_sim train step'}"
              f"{'' if args.quick else '; xattn_topk kernel vs stream (COCO 1K, k = 10)'}")
        for c in cases:
            print(f"  {c['op']:10s} {c['backend']:6s} {c['size']:6s} {c['dtype']:15s} {c['opts']}")
        return 0
    os.environ.setdefault("TRITON_INTERPRET", "0")
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a machine with an "
              "NVIDIA GPU, or use --dry-run to see the plan", file=sys.stderr)
        return 2
    import itm_kernels

    device = torch.device("cuda")
    info = itm_kernels.build_info()
    record = dict(date=datetime.date.today().isoformat(), device=torch.cuda.get_device_name(),
                  capability=list(torch.cuda.get_device_capability()), torch=torch.__version__,
                  triton=info.get("triton"), build=info)
    start = time.perf_counter()
    record["correctness"] = []
    for case in cases:
        result = _guarded(run_case, case, device)
        record["correctness"].append({**case, **result} if "op" not in result else result)
        r = record["correctness"][-1]
        print(f"{'ok ' if r.get('ok') else 'BAD'} {case['op']} {case['backend']} {case['size']} {case['dtype']} "
              f"{case['opts']} err={r.get('err')} {r.get('error', '')}", flush=True)
    record["topk"] = []
    for case in topk_cases():
        result = _guarded(run_topk_case, case, device)
        record["topk"].append({**case, **result} if "op" not in result else result)
        r = record["topk"][-1]
        print(f"{'ok ' if r.get('ok') else 'BAD'} xattn_topk triton {case['size']} {case['dtype']} {case['opts']} "
              f"err={r.get('err')} ordered={r.get('ordered')} {r.get('error', '')}", flush=True)
    for key, fn in (("gradients", check_gradients), ("no_sync", check_no_sync), ("cuda_graph", check_cuda_graph)):
        record[key] = _guarded(fn, device)
        print(key, "ok" if record[key].get("ok") else f"FAILED {record[key].get('error', '')}", flush=True)
    measured = {}
    if not args.quick:
        measured = _guarded(timings, device)
        ops = _guarded(op_timings, device)
        topk = _guarded(topk_timings, device)
        record["timings"] = {k: v for part in (measured, ops, topk) for k, v in part.items()
                             if isinstance(v, float)}
        errors = [part["error"] for part in (measured, ops, topk) if "error" in part]
        if errors:
            record["timings_error"] = "; ".join(errors)
    record["targets"] = target_report(measured)
    record["verified"] = verified_rows(record)
    record["seconds"] = round(time.perf_counter() - start, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_check.json").write_text(json.dumps(record, indent=1, default=str))
    table = markdown(record)
    (args.out / "gpu_check.md").write_text(table)
    print(table)
    print("rows for VERIFIED_GPU_KERNELS (itm_kernels/_common/dispatch.py):")
    for row in record["verified"]:
        print(f"    {row!r},")
    return 0 if all(c.get("ok") for c in record["correctness"] + record["topk"]) else 1


if __name__ == "__main__":
    sys.exit(main())
