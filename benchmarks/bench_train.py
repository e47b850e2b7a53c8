"""One training step of the SCAN similarity head + ContrastiveLoss: plain autograd on the reference (the
reference here) versus itm_kernels.xattn_sim (ours: tiled forward, tiled analytic backward).

    python benchmarks/bench_train.py --quick         # batch 16: well under a minute
    python benchmarks/bench_train.py                 # batch 128 (the report size), K = 36, d = 1024, lengths 8..20
    python benchmarks/bench_train.py --batch 32 --repeats 1

Prints, for t2i and i2t in float32 and bfloat16: the reference step fed float32 and fed the row's dtype, ours, the
speed-up over each, the bare-GEMM limit (6 x the packed (B K x d) @ (d x sum L) product by the fastest of torch.mm,
oneDNN linear and brgemm, named, timed in the same run: the forward's score and attended-vector products and two
gradient products for each) and its fraction (bare / ours), the bytes autograd saves for backward (counted
exactly with saved_tensors_hooks), and the peak extra memory of one step (forward + backward) in a fresh process
(``common.peak_memory``: the resident high-water mark cannot be hidden by memory an earlier step freed, which is
what made an in-process method print 0 MiB for bfloat16).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itm_kernels  # noqa: E402
from itm_kernels.xattn_sim import reference  # noqa: E402
from itm_models.losses import ContrastiveLoss  # noqa: E402
from common import (SCAN_LAMBDAS, bare_product_timing, finish, peak_memory, print_table,  # noqa: E402
                    random_features, speedup_cells, standard_parser, start, timings)

SIM_FNS = {"reference": reference.xattn_sim, "ours": itm_kernels.xattn_sim}


def saved_bytes(step) -> int:
    """Bytes of the tensors autograd saves for backward during ``step()`` (storage counted once)."""
    seen, total = set(), 0

    def pack(t):
        nonlocal total
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step(backward=False)
    return total


def make_step(sim_fn, images, captions, lens, direction, loss_fn):
    lam1, lam2 = SCAN_LAMBDAS[direction]

    def step(backward=True):
        im = images.detach().requires_grad_()
        cap = captions.detach().requires_grad_()
        sims = sim_fn(im, cap, lens, direction=direction, lambda_softmax=lam1, lambda_lse=lam2)
        loss = loss_fn(sims)
        if backward:
            loss.backward()
        return loss
    return step


def train_step_call(batch: int, dtype_name: str, direction: str, which: str, device: str = "cpu"):
    """Builder for ``common.peak_memory`` (and the timed runs): a batch and one training step (forward + backward)
    of ``which`` ("reference" | "ours")."""
    images, captions, lens = random_features(batch, batch, dtype=getattr(torch, dtype_name), device=device)
    return make_step(SIM_FNS[which], images, captions, lens, direction,
                     ContrastiveLoss(margin=0.2, max_violation=True))


def main(argv=None):
    parser = standard_parser(__doc__, repeats=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--directions", default="t2i,i2t")
    args = parser.parse_args(argv)
    batch = 16 if args.quick else args.batch
    start(f"bench_train | batch {batch}", args)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows, notes, ref32 = [], [], {}
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        images, captions, lens = random_features(batch, batch, dtype=dtype, device=device)
        bare = bare_product_timing(images, captions, lens, repeats=args.repeats).scaled(6.0)
        notes.append(f"# {dtype_name} (x6): {bare.note()}")
        for direction in args.directions.split(","):
            steps = {w: train_step_call(batch, dtype_name, direction, w, device) for w in SIM_FNS}
            ref_saved, our_saved = saved_bytes(steps["reference"]), saved_bytes(steps["ours"])
            ref = timings(steps["reference"], repeats=args.repeats, warmup=args.warmup)
            ours = timings(steps["ours"], repeats=args.repeats, warmup=args.warmup)
            if dtype == torch.float32:
                ref32[direction] = ref
            elif direction not in ref32:
                ref32[direction] = timings(train_step_call(batch, "float32", direction, "reference", device),
                                           repeats=args.repeats, warmup=args.warmup)
            mem = {w: peak_memory(train_step_call, batch, dtype_name, direction, w, device=device,
                                  enabled=not args.no_memory) for w in SIM_FNS}
            same = None if dtype == torch.float32 else ref
            rows.append([batch, direction, dtype_name, ref32[direction].cell(".3g"),
                         "-" if same is None else ref.cell(".3g"), ours.cell(".3g"),
                         *speedup_cells(ref32[direction], same, ours), bare.cell(".3g"), bare.fraction(ours),
                         f"{ref_saved / 2**20:.1f}", f"{our_saved / 2**20:.1f}", mem["reference"], mem["ours"]])
            print(" | ".join(str(c) for c in rows[-1]), flush=True)
    print_table(f"training step, batch {batch} (similarity head + ContrastiveLoss, forward + backward; seconds, "
                f"{args.repeats} repeats)",
                ["batch", "dir", "dtype", "reference fp32 s", "reference same dtype s", "ours s",
                 "speed-up vs fp32 reference", "speed-up vs same-dtype reference", "bare GEMM s x6 (winner)",
                 "fraction of GEMM limit", "ref saved MiB", "ours saved MiB", "ref peak extra MiB",
                 "ours peak extra MiB"], rows)
    finish(notes)

if __name__ == "__main__":
    main()
