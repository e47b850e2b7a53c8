"""Galleries beyond one matrix: streamed evaluation at growing N, 1 vs 2 ranks, and two-stage retrieval.

    python benchmarks/bench_scale.py --quick          # 1K x 5K and 2K x 10K, 1 vs 2 ranks, two-stage up to 300
    python benchmarks/bench_scale.py                  # + 5K x 25K and 20K x 100K (run the big one ONCE)
    python benchmarks/bench_scale.py --table two-stage

Scale rows: SCAN t2i (clipped_l2norm, lse) on the cpu backend through ``streaming_recall`` (both passes); the
synthetic gallery is generated on the fly chunk by chunk (seeded per chunk), so nothing of size N is stored but
the O(N) rank counters. Small features to fit 2 shared cores: d = 64, K = 8 regions, L = 8 words (stated in the
table). Each size runs in a fresh subprocess so that its peak RSS (``ru_maxrss``) is its own.
1 vs 2 ranks: the same evaluation under ``torch.distributed.run --nproc_per_node 2`` (gloo), 1 thread per rank
vs 1 process with 1 thread and with 2 threads.
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--table", choices=["all", "scale", "ranks", "two-stage"], default="all")
    p.add_argument("--repeats", type=int, default=1, help="runs per size in the scale table (median, min-max)")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        return child_main(a.child)
    if a.table in ("all", "scale"):
        scale_table([1000, 2000] if a.quick else [1000, 5000, 20000], a.repeats)
    if a.table in ("all", "ranks"):
        ranks_table(1000)
    if a.table in ("all", "two-stage"):
        two_stage_table([10, 30, 100, 300] if a.quick else [10, 30, 100, 300, 1000])


if __name__ == "__main__":
    main()
