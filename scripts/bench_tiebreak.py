"""Benchmark mergekit's TIES tie-break: `torch.argsort(|τ|, descending=True)[:k]` against
`methods.sort_order`'s emulation of the sort, which finds the same entries without sorting:
its numpy passes and its compiled kernel (numba).

Magnitudes are drawn as task vectors are (normal, scale 0.002), in float32 or rounded
through bf16 (where the cut always falls among equal values; the emulation then ranks their
16-bit patterns, as a merge does); the table gives the best of `--repeats` wall times on one
thread (the kernel's compilation is outside them), and whether the kept entries are the
same as the sort's.

    python scripts/bench_tiebreak.py
    python scripts/bench_tiebreak.py --sizes 4194304,11534336,65536000
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from mergekit_pcb.methods.sort_order import (
    descending_top,
    introsort_top_compiled,
    introsort_top_numpy,
)


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
    print("| entries | magnitudes | density | argsort s | numpy s | compiled s "
          "| speed-up numpy / compiled | same entries |")
    print("|---|---|---|---|---|---|---|---|")
    for size in (int(s) for s in args.sizes.split(",")):
        draws = 0.002 * torch.randn(size, generator=g)
        half = draws.bfloat16().abs()
        for label, values, keys in (("float32", draws.abs(), draws.abs().numpy()),
                                    ("bf16", half.float(), half.view(torch.int16).numpy())):
            introsort_top_compiled(keys[:64].copy(), 8)  # compile this key type, untimed
            for density in (float(d) for d in args.densities.split(",")):
                k = int(density * size)
                t_sort, ref = best_of(args.repeats,
                                      lambda v=values, k=k: torch.argsort(v, descending=True)[:k])
                t_numpy, by_numpy = best_of(args.repeats,
                                            lambda x=keys, k=k: introsort_top_numpy(x, k))
                t_kernel, by_kernel = best_of(args.repeats,
                                              lambda x=keys, k=k: introsort_top_compiled(x, k))
                want = np.sort(ref.numpy())  # type: ignore[union-attr]
                same = all(got is not None and np.array_equal(want, np.sort(got))
                           for got in (by_numpy, by_kernel))
                print(f"| {size:,} | {label} | {density} | {t_sort:.3f} | {t_numpy:.3f} "
                      f"| {t_kernel:.3f} | {t_sort / t_numpy:.1f}× / {t_sort / t_kernel:.1f}× "
                      f"| {'yes' if same else 'NO'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
