"""Benchmark mergekit's TIES tie-break: `torch.argsort(|τ|, descending=True)[:k]` against
`methods.sort_order.descending_top`, which finds the same entries without the sort.

Magnitudes are drawn as task vectors are (normal, scale 0.002), in float32 or rounded
through bf16 (where the cut always falls among equal values); the table gives the best of
`--repeats` wall times on one torch thread, and whether the kept entries are the same.

    python scripts/bench_tiebreak.py
    python scripts/bench_tiebreak.py --sizes 4194304,11534336,65536000
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from mergekit_pcb.methods.sort_order import descending_top


def best_of(repeats: int, fn) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="16384,262144,4194304,11534336",
                    help="entries per tensor (4M: the 30M bench's embedding; 11.5M: a 1B MLP)")
    ap.add_argument("--densities", default="0.3,0.5,0.7")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    descending_top(torch.zeros(32), 16)  # the once-per-process probe, outside the timings
    g = torch.Generator().manual_seed(0)
    print("| entries | magnitudes | density | argsort s | sort-free s | speed-up | same entries |")
    print("|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        draws = 0.002 * torch.randn(size, generator=g)
        for label, values in (("float32", draws.abs()),
                              ("bf16", draws.bfloat16().abs().float())):
            for density in (float(d) for d in args.densities.split(",")):
                k = int(density * size)
                t_sort, ref = best_of(args.repeats,
                                      lambda v=values, k=k: torch.argsort(v, descending=True)[:k])
                t_free, got = best_of(args.repeats, lambda v=values, k=k: descending_top(v, k))
                same = np.array_equal(np.sort(ref.numpy()), np.sort(got.numpy()))  # type: ignore[union-attr]
                print(f"| {size:,} | {label} | {density} | {t_sort:.3f} | {t_free:.3f} "
                      f"| {t_sort / t_free:.1f}× | {'yes' if same else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
