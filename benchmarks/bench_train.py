"""One training step of the SCAN similarity head + ContrastiveLoss: plain autograd on the reference versus
itm_kernels.xattn_sim (tiled forward, tiled analytic backward).

    python benchmarks/bench_train.py                 # batch 128, K = 36, d = 1024, lengths 8..20
    python benchmarks/bench_train.py --batch 32 --repeats 1

Prints forward + backward time, the bytes autograd saves for backward (counted exactly with
saved_tensors_hooks) and the rise of peak memory during the step, for t2i and i2t in float32 and bfloat16.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itm_kernels  # noqa: E402
from itm_kernels.xattn_sim import reference  # noqa: E402
from itm_models.losses import ContrastiveLoss  # noqa: E402
from common import machine_line, median_time, peak_extra_memory, print_table, random_features  # noqa: E402

LAMBDAS = {"t2i": (9.0, 6.0), "i2t": (4.0, 5.0)}


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
    lam1, lam2 = LAMBDAS[direction]

    def step(backward=True):
        im = images.detach().requires_grad_()
        cap = captions.detach().requires_grad_()
        sims = sim_fn(im, cap, lens, direction=direction, lambda_softmax=lam1, lambda_lse=lam2)
        loss = loss_fn(sims)
        if backward:
            loss.backward()
        return loss
    return step


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--directions", default="t2i,i2t")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    loss_fn = ContrastiveLoss(margin=0.2, max_violation=True)
    print(f"# bench_train | batch {args.batch} | {machine_line()}")
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        images, captions, lens = random_features(args.batch, args.batch, dtype=dtype, device=device)
        for direction in args.directions.split(","):
            ref_step = make_step(reference.xattn_sim, images, captions, lens, direction, loss_fn)
            our_step = make_step(itm_kernels.xattn_sim, images, captions, lens, direction, loss_fn)
            ref_saved, our_saved = saved_bytes(ref_step), saved_bytes(our_step)
            _, ref_peak = peak_extra_memory(ref_step)
            _, our_peak = peak_extra_memory(our_step)
            ref_t = median_time(ref_step, repeats=args.repeats, warmup=0)
            our_t = median_time(our_step, repeats=args.repeats, warmup=1)
            rows.append([direction, dtype_name, f"{ref_t:.2f}", f"{our_t:.2f}", f"{ref_t / our_t:.1f}x",
                         f"{ref_saved / 2**20:.0f}", f"{our_saved / 2**20:.1f}", f"{our_saved / ref_saved:.4f}",
                         f"{ref_peak / 2**20:.0f}", f"{our_peak / 2**20:.0f}"])
            print(" | ".join(rows[-1]), flush=True)
    print_table(f"training step, batch {args.batch} (similarity head + ContrastiveLoss, forward + backward)",
                ["dir", "dtype", "reference s", "ours s", "speed-up", "ref saved MiB", "ours saved MiB",
                 "saved ratio", "ref peak MiB", "ours peak MiB"], rows)


if __name__ == "__main__":
    main()
