"""What WUDI's Adam solver costs at a model size too large to run it there on a CPU: the
time of its steps on each distinct matrix shape of a Llama preset, and the whole merge
extrapolated from them (steps × matrices of each shape), beside its closed form.

    python scripts/bench_wudi_steps.py                 # the 1B bf16 preset of bench_merge.py
    python scripts/bench_wudi_steps.py --hidden 4096 --intermediate 14336 --layers 32 \\
        --kv-hidden 1024                               # Llama-3-8B's shapes

Random task vectors of the real shapes cost what real ones do: the solver's work depends
on the shapes only. The solver and its closed form are `mergekit_pcb.methods.wudi`'s,
as `pcbmerge run` calls them for each matrix.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from mergekit_pcb.methods.wudi import wudi_adam, wudi_closed_form  # noqa: E402


def seconds(fn: object, *args: object, **kwargs: object) -> float:
    start = time.perf_counter()
    fn(*args, **kwargs)  # type: ignore[operator]
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--kv-hidden", type=int, default=None,
                    help="rows of k_proj and v_proj (grouped-query attention); default hidden")
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300, help="the solver's steps (official: 300)")
    ap.add_argument("--timed-steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    h, kv, i = args.hidden, args.kv_hidden or args.hidden, args.intermediate
    # (rows, cols) -> matrices of that shape per layer (q/o, k/v, gate/up, down)
    shapes: dict[tuple[int, int], int] = {}
    for shape in ((h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)):
        shapes[shape] = shapes.get(shape, 0) + 1
    gen = torch.Generator().manual_seed(0)
    print(f"{args.tasks} tasks, {args.layers} layers, {args.threads} thread(s), "
          f"torch {torch.__version__}; {args.steps} Adam steps extrapolated from "
          f"{args.timed_steps}")
    print("| shape | per layer | setup s | s per step | Adam, one matrix s | closed form s |")
    print("|---|---:|---:|---:|---:|---:|")
    adam_total = closed_total = 0.0
    for (rows, cols), count in shapes.items():
        deltas = [0.005 * torch.randn(rows, cols, generator=gen) for _ in range(args.tasks)]
        one = seconds(wudi_adam, deltas, steps=1)
        more = seconds(wudi_adam, deltas, steps=1 + args.timed_steps)
        per_step = (more - one) / args.timed_steps
        setup = max(one - per_step, 0.0)
        adam = setup + args.steps * per_step
        closed = seconds(wudi_closed_form, deltas)
        adam_total += count * args.layers * adam
        closed_total += count * args.layers * closed
        print(f"| {rows} × {cols} | {count} | {setup:.2f} | {per_step:.3f} | {adam:.1f} | "
              f"{closed:.1f} |")
    print(f"\nall {sum(shapes.values()) * args.layers} matrices: Adam about "
          f"{adam_total / 3600:.1f} h, closed form about {closed_total / 60:.1f} min "
          f"(the solver alone; reading and writing aside)")


if __name__ == "__main__":
    main()
