"""Coefficient search: candidates per second of the fast path (one weighted sum per tensor
over parts cached once) against a full merge through the engine per candidate.

    python scripts/bench_search.py                 # 30M parameters, ties and pcb
    python scripts/bench_search.py --size 30M --methods ties,pcb --fast 5 --full 2

Builds a base and 3 fine-tuned Llama-shaped checkpoints (as scripts/bench_merge.py does),
then for each inner merge times, per candidate, the merge of a random (weights, λ) point:
the plan of the candidate's recipe plus either the cached parts' weighted sum or the
engine's `merge_in_memory` (the statistics passes included). The fitness is left out, so
the table shows what the merge costs a candidate. Setup is the one-off cost of the parts
(statistics passes, scores or trims, and the check against the engine at the default point).
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench_merge import PRESETS, build_checkpoints

from mergekit_pcb.engine import build_plan
from mergekit_pcb.evolve.coefsearch.config import parse_search_recipe
from mergekit_pcb.evolve.coefsearch.fastpath import build_parts, verify
from mergekit_pcb.evolve.coefsearch.jobs import (
    PointJob,
    SearchContext,
    install_parts,
    release,
    runtime,
)

MERGES = {
    "ties": {"merge_method": "ties", "parameters": {"density": 0.5}},
    "pcb": {"merge_method": "pcb", "parameters": {"density": 0.1, "lambda": 1.0}},
    "task_arithmetic": {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.5}},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="30M", choices=list(PRESETS))
    ap.add_argument("--methods", default="ties,pcb")
    ap.add_argument("--fast", type=int, default=5, help="fast-path candidates timed")
    ap.add_argument("--full", type=int, default=2, help="full-merge candidates timed")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-search-"))
    shape = PRESETS[args.size]
    if not (work / "base").is_dir():
        build_checkpoints(shape, work, "2GB", seed=0, delta_scale=0.01)
    base, fts = work / "base", [work / f"ft{i}" for i in range(3)]
    rows = []
    for name in args.methods.split(","):
        data = {"merge_method": "coefficient-search", "base_model": str(base),
                "models": [{"model": str(p)} for p in fts], "merge": MERGES[name],
                "search": {"weight": [0.5, 1.5], "lambda": [0.5, 2.0]},
                "fitness": {"type": "callable", "function": "unused:fn"}}
        recipe, space = parse_search_recipe(data, name)
        t0 = time.perf_counter()
        plan = build_plan(space.merge_recipe(None, 0), "")
        parts = build_parts(plan)
        t_parts = time.perf_counter() - t0
        assert verify(plan, parts) is None, "fast path differs from the engine"
        t_setup = time.perf_counter() - t0
        plan.close()
        ctx = SearchContext(f"bench-{name}", space, recipe.fitness, str(work), None, 0, None)
        install_parts(ctx, parts)
        rt = runtime(ctx)
        rng = random.Random(0)
        points = [tuple(rng.uniform(v.low, v.high) for v in space.variables)
                  for _ in range(max(args.fast, args.full))]
        times = {}
        for mode, count in (("fast", args.fast), ("full", args.full)):
            start = time.perf_counter()
            for x in points[:count]:
                state, fast = rt.state(PointJob(x, engine=mode == "full"))
                assert fast == (mode == "fast")
                del state
            times[mode] = (time.perf_counter() - start) / count
        release(ctx)
        rows.append((name, parts.nbytes, t_parts, t_setup, times["fast"], times["full"]))
        del parts
    params = shape.param_count()
    print(f"\n{args.size} preset ({params / 1e6:.1f}M parameters, fp32), 3 fine-tuned models, "
          f"{args.threads} thread(s); {args.fast} fast / {args.full} full candidates\n")
    print("| inner merge | parts MB | parts s | setup s (with check) | fast ms/cand | "
          "full merge ms/cand | fast cand/s | full cand/s | speed-up |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, nbytes, tp, ts, fast, full in rows:
        print(f"| {name} | {nbytes / 1e6:.0f} | {tp:.2f} | {ts:.2f} | {fast * 1e3:.0f} | "
              f"{full * 1e3:.0f} | {1 / fast:.2f} | {1 / full:.2f} | {full / fast:.1f}x |")


if __name__ == "__main__":
    main()
