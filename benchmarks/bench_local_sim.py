"""Benchmark of ``local_sim`` (SGRAF's local similarity vectors) on the CPU: the fused C++ kernel ("cpu", ours)
against the chunked torch path (the reference here), in float32 and bfloat16.

    python benchmarks/bench_local_sim.py --quick            # 20 x 100: well under a minute
    python benchmarks/bench_local_sim.py                    # the report size, 60 x 300, 1 thread
    python benchmarks/bench_local_sim.py --threads 2 --size 100x500

Both are called as ``itm_models.sgraf`` calls them: ``local_sim_torch`` / ``local_sim_cpu`` with a preallocated
float32 output (N_img, N_cap, L_max, s) and the per-image Gram matrices given. Columns: the torch path fed float32
and fed the row's dtype, ours, the speed-up over each, GFLOP/s counting 2 d s + 4 K d FLOPs per (image, word)
(projection, scores, attended vector), the bare-GEMM time of those FLOPs (the fastest of torch.mm, oneDNN linear
and brgemm on (4096 x d) @ (d x s) in the same dtype, timed in the same run, named), the fraction of that limit
(bare / ours), and the peak extra memory of one call of ours in a fresh process (the output is preallocated, an
input here, so it does not count).

On a shared machine compare only rows measured while the load average stayed below the core count.
K = 36, d = 1024, s = 256, unit-norm embeddings (``common.matched_features``), caption lengths uniform 8..20.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (OP_HEADERS, finish, gemm_yardstick, matched_features, op_rows, parse_size,  # noqa: E402
                    print_table, standard_parser, start)
from itm_kernels.local_sim import _have_cpu_kernel, local_sim_cpu, local_sim_gram, local_sim_torch  # noqa: E402

K, D, S = 36, 1024, 256
LAMBDA = 9.0
PATHS = {"torch": local_sim_torch, "cpu": local_sim_cpu}


def local_sim_call(n_img: int, n_cap: int, dtype_name: str, path: str):
    """Builder for ``common.peak_memory`` (and the timed runs): the inputs of one row, the float32 output buffer
    and the Gram matrices, and the call of ``path`` ("torch" | "cpu") on them."""
    dtype = getattr(torch, dtype_name)
    images, captions, lens = matched_features(n_img, n_cap, K=K, d=D, dtype=dtype)
    g = torch.Generator().manual_seed(0)
    weight = ((torch.rand(S, D, generator=g) * 2 - 1) * (6.0 / (D + S)) ** 0.5).to(dtype)  # as SGRAF: weight in
    bias = torch.rand(S, generator=g) * 0.1 - 0.05                                        # the features' dtype
    gram = local_sim_gram(images)
    out = torch.empty(n_img, n_cap, captions.shape[1], S)
    fn = PATHS[path]
    return lambda: fn(images, captions, lens, weight, bias, lambda_softmax=LAMBDA, out=out, gram=gram)


def main(argv=None):
    parser = standard_parser(__doc__, repeats=5, threads=1)
    parser.add_argument("--size", default="60x300", help="N_imgxN_cap")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    if not _have_cpu_kernel():
        sys.exit("the compiled extension (itm_kernels._C) with local_sim_cpu_ is not built")
    start("bench_local_sim", args)
    n_img, n_cap = parse_size("20x100" if args.quick else args.size)
    lens = matched_features(n_img, n_cap, K=K, d=D)[2]
    flops = int(lens.sum()) * n_img * (2 * D * S + 4 * K * D)
    notes = []
    rows = op_rows(local_sim_call, n_img, n_cap, args, flops,
                   lambda dtype: gemm_yardstick(flops, dtype, 4096, D, S, repeats=args.repeats), notes)
    print_table(f"local_sim forward, ours = fused C++ kernel, reference = chunked torch path (K={K}, d={D}, s={S}, "
                f"lengths 8..20, {(2 * D * S + 4 * K * D) / 1e6:.2f} MFLOP per (image, word); seconds, "
                f"{args.repeats} repeats; the output buffer is an input here)", OP_HEADERS, rows)
    finish(notes)

if __name__ == "__main__":
    main()
