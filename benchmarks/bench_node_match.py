"""Benchmark of ``node_match`` (GSMN's node-level matching vectors) on the CPU: the tiled torch path against the
fused C++ kernel ("cpu"), in float32 and bfloat16.

    python benchmarks/bench_node_match.py --quick            # 20 x 100: well under a minute
    python benchmarks/bench_node_match.py                    # the report size, 60 x 300, 1 thread
    python benchmarks/bench_node_match.py --threads 2 --size 100x500

Both are called as ``itm_models`` calls them: ``node_match_torch`` / ``node_match_cpu`` (no autograd) on a block of
pairs; the torch path is the reference. Columns: the torch path fed float32 and fed the row's dtype, ours (the
C++ kernel), the speed-up over each, GFLOP/s counting 2 K L d FLOPs per pair (the score product; the Gram forms of both directions add
2 B K L (K + L) more, left out so that the rate is comparable with the GEMM), the fraction of the bare GEMM of the
same FLOPs (the packed (N_img K x d) @ (d x sum L) product, by the fastest of ``torch.mm``, oneDNN linear and
brgemm, ``common.bare_product_timing``, timed in the same run, named), and the peak extra memory of one call of
ours in a fresh process (``common.peak_memory``; the outputs count, since the call allocates them).

On a shared machine compare only rows measured while the load average stayed below the core count.
K = 36, d = 1024, 16 blocks, lambda 20 (Flickr30K), unit-norm embeddings (``common.matched_features``), caption
lengths uniform 8..20.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import (OP_HEADERS, bare_product_timing, finish, matched_features, op_rows, parse_size,  # noqa: E402
                    print_table, standard_parser, start)
from itm_kernels.node_match.cpu import _have_cpu_kernel, node_match_cpu  # noqa: E402
from itm_kernels.node_match.torch import node_match_torch  # noqa: E402

K, D, B = 36, 1024, 16
LAMBDA = 20.0
PATHS = {"torch": node_match_torch, "cpu": node_match_cpu}


def node_match_call(n_img: int, n_cap: int, dtype_name: str, path: str):
    """Builder for ``common.peak_memory`` (and the timed runs): the inputs of one row and the call of ``path``
    ("torch" | "cpu") on them."""
    images, captions, lens = matched_features(n_img, n_cap, K=K, d=D, dtype=getattr(torch, dtype_name))
    fn = PATHS[path]
    return lambda: fn(images, captions, lens, lambda_softmax=LAMBDA, num_blocks=B)


def main(argv=None):
    parser = standard_parser(__doc__, repeats=5, threads=1)
    parser.add_argument("--size", default="60x300", help="N_imgxN_cap")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args(argv)
    if not _have_cpu_kernel():
        sys.exit("the compiled extension (itm_kernels._C) with node_match_fused_ is not built")
    start("bench_node_match", args)
    n_img, n_cap = parse_size("20x100" if args.quick else args.size)
    lens = matched_features(n_img, n_cap, K=K, d=D)[2]
    flops = 2 * n_img * K * D * int(lens.sum())

    def yardstick(dtype):
        images, captions, lens = matched_features(n_img, n_cap, K=K, d=D, dtype=dtype)
        return bare_product_timing(images, captions, lens, repeats=args.repeats)
    notes = []
    rows = op_rows(node_match_call, n_img, n_cap, args, flops, yardstick, notes)
    print_table(f"node_match forward, ours = fused C++ kernel, reference = tiled torch path (K={K}, d={D}, {B} blocks, "
                f"lengths 8..20, {2 * K * D * 14 / 1e6:.2f} MFLOP per pair of 14 words; seconds, {args.repeats} "
                "repeats)", OP_HEADERS, rows)
    finish(notes)

if __name__ == "__main__":
    main()
