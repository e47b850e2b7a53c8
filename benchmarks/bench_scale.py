"""Galleries beyond one matrix: streamed evaluation at growing N, 1 vs 2 ranks, and two-stage retrieval.

    python benchmarks/bench_scale.py --quick          # 1K x 5K and 2K x 10K, 1 vs 2 ranks, two-stage up to 300
    python benchmarks/bench_scale.py                  # + 5K x 25K and 20K x 100K (run the big one ONCE)
    python benchmarks/bench_scale.py --table two-stage
    python benchmarks/bench_scale.py --table ranks-memory --ranks-size 3500   # 1 vs 2 ranks, peak memory per rank
    python benchmarks/bench_scale.py --table topk            # streaming driver vs in-kernel top-k vs full matrix

Scale rows: SCAN t2i (clipped_l2norm, lse) on the cpu backend through ``streaming_recall`` (both passes); the
synthetic gallery is generated on the fly chunk by chunk (seeded per chunk), so nothing of size N is stored but
the O(N) rank counters. Small features to fit 2 shared cores: d = 64, K = 8 regions, L = 8 words (stated in the
table). Each size runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own.
1 vs 2 ranks: the same evaluation under ``torch.distributed.run --nproc_per_node 2`` (gloo), 1 thread per rank
vs 1 process with 1 thread and with 2 threads.
1 vs 2 ranks with memory (``--table ranks-memory``): each workload (the streamed recall of the scale rows; the
in-kernel top-k of a SCAN head through ``model_topk_sharded``) runs in 1 process with 1 thread and under
``torch.distributed.run --nproc_per_node 2`` (gloo, 1 thread per rank), ``--ranks-repeats`` times each; every
rank reports its time and its peak memory (common.py's per-process method: the resident high-water mark reset
just before the call). Top-k rows (``--table topk``): ``xattn_topk(method="stream")`` (tiles materialised and
merged in torch) vs ``method="kernel"`` (the in-kernel CPU top-k) vs the full ``xattn_sim`` matrix + ``topk``,
same run, medians (min-max), peak memory of each in a fresh process (``common.peak_memory_subprocess``).
Two-stage: ``itm_models.retrieval.two_stage`` on matched synthetic embeddings (1,000 images, 1,000 captions,
caption c of image c, K = 36, d = 256), t2i recall vs exact all-pairs and the speed-up.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from itm_models.cli.args import positive_int  # noqa: E402

D, K, L = 64, 8, 8
IMG_CHUNK, CAP_CHUNK = 250, 2000


def chunked_gallery(n_img: int, seed: int = 0):
    """tile_fn of a synthetic gallery (n_img images, 5 captions each) generated per chunk on demand."""
    import itm_kernels

    def gen(kind, idx, n, length):
        g = torch.Generator().manual_seed(seed * 1_000_003 + (0 if kind == "img" else 500_000) + idx)
        x = torch.nn.functional.normalize(torch.randn(n, length, D, generator=g), dim=-1)
        lens = torch.randint(1, length + 1, (n,), generator=g)
        return x, lens

    cache = {}

    def chunk(kind, a, b, size, length):
        key = (kind, a)
        if key not in cache:
            if len(cache) > 4:
                cache.clear()
            cache[key] = gen(kind, a // size, b - a, length)
        return cache[key]

    def tile(i0, i1, c0, c1):
        assert i0 % IMG_CHUNK == 0 and c0 % CAP_CHUNK == 0, "tiles must lie on the generation grid"
        im, _ = chunk("img", i0, i1, IMG_CHUNK, K)
        cap, lens = chunk("cap", c0, c1, CAP_CHUNK, L)
        return itm_kernels.xattn_sim(im, cap, lens, backend="cpu")
    return tile


def run_size(n_img: int) -> dict:
    from common import run_measuring_peak
    from itm_models.eval.streaming import streaming_recall, world
    tile = chunked_gallery(n_img)
    t0 = time.perf_counter()
    m, extra = run_measuring_peak(lambda: streaming_recall(tile, n_img, 5, img_chunk=IMG_CHUNK, cap_chunk=CAP_CHUNK))
    return {"n_img": n_img, "seconds": time.perf_counter() - t0, "rsum": m["rsum"], "world": world()[1],
            "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "extra_mib": extra / 2**20}


def child(n_img: int, *, ranks: int = 1, threads: int | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    me = [str(Path(__file__).resolve()), "--child", str(n_img)]
    if ranks == 1:
        cmd = [sys.executable] + me
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] + me
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads([line for line in out.splitlines() if line.startswith("{")][0])


def child_main(n_img: int) -> None:
    rank = 0
    if "RANK" in os.environ:
        from itm_models.eval.distributed import init_distributed
        rank, _, _ = init_distributed("cpu")
    res = run_size(n_img)
    if rank == 0:
        print(json.dumps(res), flush=True)


def scale_table(sizes, repeats: int = 1):
    from common import Timing, machine_line, print_table
    rows, base = [], None
    for n in sizes:
        runs = [child(n) for _ in range(repeats)]
        t = Timing(tuple(r["seconds"] for r in runs))
        pairs = n * 5 * n
        per = t.median / pairs * 1e9
        base = base or per
        rows.append([f"{n:,} x {5 * n:,}", f"{pairs:.2e}", t.cell(".3g"), f"{per:.1f}", f"{per / base:.2f}",
                     f"{max(r['extra_mib'] for r in runs):.1f}", f"{max(r['maxrss_mib'] for r in runs):.0f}",
                     f"{4 * pairs / 2 ** 30:.1f}"])
    print_table(f"Streamed evaluation (SCAN t2i, cpu backend, d={D}, K={K}, L<={L}, {torch.get_num_threads()} "
                f"threads; s = median (min-max) of {repeats} runs, each in a fresh process) | {machine_line()}",
                ["gallery", "pairs", "s", "ns/pair", "vs first", "peak extra MiB (VmHWM rise)",
                 "peak RSS MiB (whole process)", "full matrix would be GiB"], rows)


def ranks_table(n_img: int):
    from common import print_table
    one1 = child(n_img, threads=1)
    one2 = child(n_img, threads=2)
    two = child(n_img, ranks=2, threads=1)
    print_table(f"1 vs 2 ranks (gloo), {n_img:,} x {5 * n_img:,}",
                ["run", "s", "rsum", "speed-up vs 1 rank 1 thread"],
                [["1 process, 1 thread", f"{one1['seconds']:.1f}", f"{one1['rsum']:.4f}", "1.00"],
                 ["1 process, 2 threads", f"{one2['seconds']:.1f}", f"{one2['rsum']:.4f}",
                  f"{one1['seconds'] / one2['seconds']:.2f}"],
                 ["2 ranks x 1 thread", f"{two['seconds']:.1f}", f"{two['rsum']:.4f}",
                  f"{one1['seconds'] / two['seconds']:.2f}"]])
    assert one1["rsum"] == two["rsum"] == one2["rsum"], "ranks disagree"


def two_stage_table(shortlists, n: int = 1000):
    import itm_kernels
    from common import matched_features, print_table
    from itm_models.retrieval import two_stage

    class Head:
        def sims(self, img, cap, lens):
            return itm_kernels.xattn_sim(img, cap, lens, backend="cpu")

    img, cap, lens = matched_features(n, n, K=36, d=256, min_len=6, max_len=12, seed=0)
    t0 = time.perf_counter()
    full = Head().sims(img, cap, lens).t()  # (captions, images)
    t_exact = time.perf_counter() - t0
    gt = torch.arange(n)

    def recalls(idx):
        hit = idx == gt[:, None]
        return [100.0 * hit[:, :k].any(1).float().mean().item() for k in (1, 5, 10)]
    exact = recalls(full.topk(10, dim=1).indices)
    rows = [["exact all-pairs", "-", *[f"{x:.1f}" for x in exact], f"{t_exact:.2f}", "1.00"]]
    for method in ("pooled", "hard"):
        for s in shortlists:
            t0 = time.perf_counter()
            _, idx = two_stage(Head(), img, cap, lens, shortlist=s, k=min(10, s), method=method)
            t = time.perf_counter() - t0
            rows.append([method, s, *[f"{x:.1f}" for x in recalls(idx)], f"{t:.2f}", f"{t_exact / t:.2f}"])
    print_table(f"Two-stage t2i retrieval, {n:,} images x {n:,} captions, K=36, d=256 (cpu head)",
                ["shortlist", "size", "R@1", "R@5", "R@10", "s", "speed-up"], rows)


# ----------------------------------------------------------------------------------------------------------------
# 1 vs 2 ranks with the peak memory of every rank
# ----------------------------------------------------------------------------------------------------------------
RANKS_K = 10


class _KernelTopkHead:
    """A SCAN-style head whose ``topk`` is ``itm_kernels.xattn_topk`` (the in-kernel top-k on the cpu backend)."""

    def topk(self, img, cap, lens, k, *, queries="images"):
        import itm_kernels
        return itm_kernels.xattn_topk(img, cap, lens, k, queries=queries, backend="cpu")


def _full_gallery(n_img: int, seed: int = 0):
    """The bench features (d=D, K regions, up to L words) for the whole gallery, 5 captions per image."""
    g = torch.Generator().manual_seed(seed)
    im = torch.nn.functional.normalize(torch.randn(n_img, K, D, generator=g), dim=-1)
    cap = torch.nn.functional.normalize(torch.randn(5 * n_img, L, D, generator=g), dim=-1)
    return im, cap, torch.randint(1, L + 1, (5 * n_img,), generator=g)


def ranks_child_main(n_img: int, what: str, out_dir: str) -> None:
    """One rank (or the single process): time and peak memory of one workload, written to OUT_DIR/rank<r>.json
    (not stdout: the ranks' lines would interleave)."""
    from common import measure_peak_here
    rank, size = 0, 1
    if "RANK" in os.environ:
        from itm_models.eval.distributed import init_distributed
        rank, size, _ = init_distributed("cpu")
    out = {}
    if what == "recall":
        from itm_models.eval.streaming import streaming_recall
        tile = chunked_gallery(n_img)

        def call():
            out["result"] = streaming_recall(tile, n_img, 5, img_chunk=IMG_CHUNK, cap_chunk=CAP_CHUNK)["rsum"]
    else:
        from itm_models.eval.streaming import model_topk_sharded
        im, cap, lens = _full_gallery(n_img)

        def call():
            v, i = model_topk_sharded(_KernelTopkHead(), im, cap, lens, RANKS_K, queries="captions")
            out["result"] = [float(v.sum()), int(i.sum())]
    t0 = time.perf_counter()
    peak = measure_peak_here(call)
    seconds = time.perf_counter() - t0
    report = {"rank": rank, "world": size, "seconds": seconds, "peak_mib": peak / 2 ** 20,
              "maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "result": out["result"]}
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(report))


def ranks_child(n_img: int, what: str, ranks: int) -> tuple[list[dict], float]:
    """Runs ``ranks_child_main`` in 1 process or under torch.distributed.run; (per-rank reports, process wall s)."""
    import tempfile
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", OMP_NUM_THREADS="1")
    out_dir = tempfile.mkdtemp(prefix="bench_scale_ranks_")
    me = [str(Path(__file__).resolve()), "--ranks-child", str(n_img), what, out_dir]
    cmd = [sys.executable] + me if ranks == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] + me
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{what} with {ranks} rank(s) failed:\n{proc.stderr[-3000:]}")
    files = sorted(Path(out_dir).glob("rank*.json"))
    reports = sorted((json.loads(f.read_text()) for f in files), key=lambda r: r["rank"])
    for f in files:
        f.unlink()
    os.rmdir(out_dir)
    if len(reports) != ranks:
        raise RuntimeError(f"expected {ranks} rank reports, got {len(reports)}:\n{proc.stdout[-2000:]}")
    return reports, wall


def ranks_memory_table(n_img: int, repeats: int, workloads=("recall", "topk")):
    from common import Timing, machine_line, print_table
    rows = []
    for what in workloads:
        runs = {1: [], 2: []}
        for _ in range(repeats):  # interleaved: 1 rank, then 2 ranks
            for ranks in (1, 2):
                runs[ranks].append(ranks_child(n_img, what, ranks))
        results = {json.dumps(r["result"]) for ranks in runs for reports, _ in runs[ranks] for r in reports}
        assert len(results) == 1, f"{what}: ranks disagree: {results}"
        t1 = Timing(tuple(max(r["seconds"] for r in reports) for reports, _ in runs[1]))
        for ranks in (1, 2):
            t = Timing(tuple(max(r["seconds"] for r in reports) for reports, _ in runs[ranks]))
            wall = Timing(tuple(w for _, w in runs[ranks]))
            peaks = [max(reports[r]["peak_mib"] for reports, _ in runs[ranks]) for r in range(ranks)]
            rss = [max(reports[r]["maxrss_mib"] for reports, _ in runs[ranks]) for r in range(ranks)]
            name = "1 process, 1 thread" if ranks == 1 else "2 ranks (gloo) x 1 thread"
            rows.append([what, name, t.cell(".1f"), wall.cell(".1f"), f"{t1.median / t.median:.2f}",
                         " / ".join(f"{p:.0f}" for p in peaks), " / ".join(f"{m:.0f}" for m in rss)])
    desc = {"recall": "streaming_recall (both passes)", "topk": f"in-kernel top-{RANKS_K} per caption"}
    print_table(f"1 vs 2 ranks, {n_img:,} x {5 * n_img:,} (SCAN t2i, cpu backend, d={D}, K={K}, L<={L}); "
                f"{', '.join(f'{w}: {desc[w]}' for w in workloads)}; {repeats} runs each, interleaved | "
                f"{machine_line()}",
                ["workload", "run", "s (slowest rank)", "process wall s", "speed-up vs 1 rank",
                 "peak extra MiB per rank", "max RSS MiB per rank"], rows)


# ----------------------------------------------------------------------------------------------------------------
# Streamed top-k: the streaming driver vs the in-kernel top-k vs the full matrix
# ----------------------------------------------------------------------------------------------------------------
TOPK_K = 10
TOPK_METHODS = ("full matrix + topk", "stream", "kernel")


def topk_call(method: str, features: str, n_img: int, queries: str):
    """Builds the inputs; returns the zero-argument call of one top-k method (module level: picklable)."""
    import itm_kernels
    im, cap, lens = _topk_inputs(features, n_img)
    if method == "full matrix + topk":
        def call():
            full = itm_kernels.xattn_sim(im, cap, lens, backend="cpu")
            full = full if queries == "images" else full.t()
            return full.topk(TOPK_K, dim=1)
        return call
    return lambda: itm_kernels.xattn_topk(im, cap, lens, TOPK_K, queries=queries, backend="cpu",
                                          method=method)


def _topk_inputs(features: str, n_img: int):
    from common import random_features
    if features == "small":
        return _full_gallery(n_img)
    return random_features(n_img, 5 * n_img, K=36, d=1024, min_len=8, max_len=20, seed=0)


def topk_peak_mib(method: str, features: str, n_img: int, queries: str) -> float:
    """Peak extra memory of one call in a fresh process, after one warm-up call in that process (the first call
    of the registered xattn_sim op path initialises about 75 MiB once; that is not the method's memory)."""
    from common import peak_memory_subprocess
    return peak_memory_subprocess(topk_call, method, features, n_img, queries, warmup=1) / 2 ** 20


def topk_memory_table(cases):
    from common import machine_line, print_table
    rows = [[f"{n_img:,} x {5 * n_img:,} ({features})", queries, m,
             f"{topk_peak_mib(m, features, n_img, queries):.1f}"]
            for features, n_img, queries in cases for m in TOPK_METHODS]
    print_table(f"Top-{TOPK_K} per query: peak extra memory of one call (after one warm-up call) in a fresh process "
                f"| {machine_line()}", ["gallery", "queries", "method", "peak extra MiB"], rows)


def topk_table(cases, repeats: int):
    from common import Timing, bare_product_timing, machine_line, print_table, timings
    rows = []
    for features, n_img, queries in cases:
        im, cap, lens = _topk_inputs(features, n_img)
        gemm, gemm_name = bare_product_timing(im, cap, lens, repeats=repeats)
        calls = {m: topk_call(m, features, n_img, queries) for m in TOPK_METHODS}
        outs = {m: calls[m]() for m in TOPK_METHODS}
        ref_v = outs["kernel"][0]
        for m in TOPK_METHODS:  # values must agree exactly (indices may differ among ties for torch.topk)
            assert torch.equal(outs[m][0], ref_v), f"{m}: values differ from the in-kernel top-k"
        assert torch.equal(outs["stream"][1], outs["kernel"][1]), "stream and kernel indices differ"
        del outs
        times = {m: [] for m in TOPK_METHODS}
        for _ in range(repeats):  # interleaved repeats: the load of the shared machine hits every method alike
            for m in TOPK_METHODS:
                times[m].extend(timings(calls[m], repeats=1, warmup=0).times)
        full_med = None
        for m in TOPK_METHODS:
            t = Timing(tuple(times[m]))
            full_med = full_med or t.median
            peak = topk_peak_mib(m, features, n_img, queries)
            shape = "d=64, K=8, L<=8" if features == "small" else "d=1024, K=36, L 8..20"
            rows.append([f"{n_img:,} x {5 * n_img:,} ({shape})", queries, m, t.cell(".3g"),
                         f"{full_med / t.median:.2f}", f"{gemm.median / t.median:.2f}", f"{peak:.1f}"])
    print_table(f"Top-{TOPK_K} per query, float32, cpu backend, {torch.get_num_threads()} threads; {repeats} "
                f"interleaved runs: median (min-max); peak extra memory of one call in a fresh process after one "
                f"warm-up call | "
                f"{machine_line()}",
                ["gallery", "queries", "method", "s", "speed-up vs full matrix", "bare GEMM / time",
                 "peak extra MiB"], rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--table", choices=["all", "scale", "ranks", "two-stage", "ranks-memory", "topk"],
                   default="all")
    p.add_argument("--repeats", type=positive_int, default=1, help="runs per size in the scale table (median, min-max)")
    p.add_argument("--ranks-size", type=positive_int, default=3500, help="images of the ranks-memory gallery (5 "
                   "captions "
                   "each); pick one that takes about a minute on 1 thread")
    p.add_argument("--ranks-repeats", type=positive_int, default=3)
    p.add_argument("--ranks-workloads", default="recall,topk")
    p.add_argument("--topk-repeats", type=positive_int, default=3)
    p.add_argument("--topk-memory-only", action="store_true", help="only the peak-memory column of --table topk")
    p.add_argument("--child", type=positive_int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--ranks-child", nargs=3, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    workloads = tuple(a.ranks_workloads.split(","))
    if not workloads or not set(workloads) <= {"recall", "topk"}:
        p.error(f"--ranks-workloads takes a comma-separated subset of recall,topk, got {a.ranks_workloads!r}")
    if a.child is not None:
        return child_main(a.child)
    if a.ranks_child is not None:
        return ranks_child_main(int(a.ranks_child[0]), a.ranks_child[1], a.ranks_child[2])
    if a.table in ("all", "scale"):
        scale_table([1000, 2000] if a.quick else [1000, 5000, 20000], a.repeats)
    if a.table in ("all", "ranks"):
        ranks_table(1000)
    if a.table in ("all", "two-stage"):
        two_stage_table([10, 30, 100, 300] if a.quick else [10, 30, 100, 300, 1000])
    if a.table in ("all", "ranks-memory"):
        ranks_memory_table(a.ranks_size, a.ranks_repeats, workloads)
    if a.table in ("all", "topk"):
        cases = [("small", 1000, "images"), ("small", 1000, "captions"), ("realistic", 200, "captions")]
        if not a.quick:
            cases += [("small", 2000, "captions"), ("realistic", 200, "images")]
        if a.topk_memory_only:
            topk_memory_table(cases)
        else:
            topk_table(cases, a.topk_repeats)


if __name__ == "__main__":
    main()
