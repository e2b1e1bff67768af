"""Benchmark the evolution engine: candidates scored per second and engine overhead.

A population of `--pop` members of an MLP of about `--params` parameters (four square
layers), grown from four seeded inputs by the engine's interpolation fill, is evolved for
`--generations` generations. The fitness is a callable: one forward pass on a fixed batch,
run once with each `--batch` size (a column each): 64 rows, a fitness so cheap that the
engine's own work shows, and 2048 rows, about what scoring a small selection set costs.
Overhead is the wall time not spent inside the fitness function (building trials tensor by
tensor, crossover draws, merges, member writes, state commits), as a share of wall time;
the target is ≤ 10 % during the generations. With `--workers N` the fitness seconds of the
N workers add up, so the share is of worker time (wall × N), not of wall time.

In merged mode (`--mode merged --inner ties|pcb|...`) every candidate is a merge of the whole
population through the merge engine, then one fitness call. The merge is timed on its own as
well (the median of a few merges of the final population with one member replaced by an
in-memory trial, the same engine calls as a candidate's), so the table separates the inner
merge from the rest of the engine. With one worker whose threads leave a core idle, a job
prepares the next candidate on that core while its fitness runs: the merges then overlap
the fitness, and "engine without the merges" goes negative by what they hid.

    python scripts/bench_evolve.py                      # 30M parameters, pop 16, 2 generations
    python scripts/bench_evolve.py --mode merged --inner ties
    python scripts/bench_evolve.py --mode merged --inner pcb --params 5e6 --pop 8
    python scripts/bench_evolve.py --executor ray --workers 2   # Ray beside the process pool

With `--executor ray` every column is run twice, on the process pool and on a local Ray
(actors keeping their own copy of the population, as on a cluster without a shared
filesystem), and the table adds Ray's cost per candidate over the pool's.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table
from safetensors.torch import save_file

FITNESS_MODULE = '''
import os

import torch

_X: dict[int, torch.Tensor] = {}


def score(state):
    """Negative mean squared activation of a forward pass on a fixed batch."""
    batch = int(os.environ["BENCH_EVOLVE_BATCH"])  # read per call: one process, two columns
    weights = [state[f"layers.{i}.weight"] for i in range(4)]
    if batch not in _X:
        _X[batch] = torch.randn(batch, weights[0].shape[1],
                                generator=torch.Generator().manual_seed(0))
    h = _X[batch]
    for i, w in enumerate(weights):
        h = torch.nn.functional.linear(h, w, state[f"layers.{i}.bias"])
        if i < 3:
            h = torch.relu(h)
    return -float(h.pow(2).mean())
'''


def build_inputs(root: Path, params: float, inputs: int) -> int:
    width = int(math.sqrt(params / 4))
    g = torch.Generator().manual_seed(0)
    base = {}
    for i in range(4):
        base[f"layers.{i}.weight"] = torch.randn(width, width, generator=g) / math.sqrt(width)
        base[f"layers.{i}.bias"] = torch.zeros(width)
    (root / "base").mkdir(parents=True)
    save_file(base, str(root / "base" / "model.safetensors"))
    for k in range(inputs):
        tuned = {n: (t + 0.01 * torch.randn(t.shape, generator=g)).contiguous()
                 for n, t in base.items()}
        (root / f"m{k}").mkdir(parents=True)
        save_file(tuned, str(root / f"m{k}" / "model.safetensors"))
    (root / "benchfit.py").write_text(FITNESS_MODULE)
    return sum(t.numel() for t in base.values())


def bench_once(root: Path, args: argparse.Namespace, batch: int,
               executor: str = "local") -> dict[str, str]:
    """One evolution run with a fitness of `batch` rows; the table's column for it."""
    import os

    os.environ["BENCH_EVOLVE_BATCH"] = str(batch)
    from mergekit_pcb.evolve import ray_executor
    from mergekit_pcb.evolve.executor import SerialExecutor
    from mergekit_pcb.evolve.run import evolve

    recipe = {
        "merge_method": "evolver",
        "base_model": str(root / "inputs" / "base"),
        "models": [{"model": str(root / "inputs" / f"m{k}")} for k in range(4)],
        "parameters": {"generations": args.generations, "pop": args.pop, "F": 0.5,
                       "CR": 0.5, "mode": args.mode},
        "fitness": {"type": "callable", "function": "benchfit:score"},
        "seed": 0,
    }
    if args.mode == "merged":
        recipe["merge"] = {"merge_method": args.inner, "parameters": INNER_PARAMS[args.inner]}
    path = root / "inputs" / f"bench-{batch}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = root / f"out-{batch}-{executor}"
    ray_stats: list[dict] = []
    if executor == "ray":  # what the workers did, read before the executor closes
        close = ray_executor.RayExecutor.close

        def keep_stats(self: ray_executor.RayExecutor) -> None:
            ray_stats.extend(self.stats())
            close(self)

        ray_executor.RayExecutor.close = keep_stats  # type: ignore[method-assign]
    start = time.perf_counter()
    try:
        summary = evolve(path, out, workers=args.workers, threads=args.threads, force=True,
                         trust_code=True, ray=ray_executor.RaySettings()
                         if executor == "ray" else None)
    finally:
        if executor == "ray":
            ray_executor.RayExecutor.close = close  # type: ignore[method-assign]
    wall = time.perf_counter() - start
    doc = json.loads((out / "evolution.json").read_text())
    gens = doc["history"][1:]
    gen_wall = sum(h["wall_s"] for h in gens)
    gen_fit = sum(h["fitness_s"] for h in gens)
    gen_evals = sum(h["evaluated"] for h in gens)
    last = gens[-1]
    n = args.workers  # their fitness seconds add up: overhead is a share of worker time
    merge_s = time_inner_merge(out, recipe, args) if args.mode == "merged" else 0.0
    # merged mode: one merge per candidate (a kept trial adds a member score, no merge)
    worker_s = gen_wall * n
    engine_s = worker_s - gen_fit - merge_s * gen_evals
    row = {}
    if args.mode == "merged":
        row = {
            "inner merge per candidate": f"{1000 * merge_s:.0f} ms",
            "generations: inner merges": f"{100 * merge_s * gen_evals / worker_s:.1f} %",
            "generations: engine without the merges":
                f"{100 * engine_s / worker_s:.1f} %",
            "next candidate prepared on a spare core":
                "yes" if executor == "local" and args.workers == 1
                and SerialExecutor(args.threads).spare_core else "no",
        }
    if executor == "ray":
        row["ray: member bytes sent to workers"] = \
            f"{sum(s['received_bytes'] for s in ray_stats) / 1e6:.0f} MB"
        row["ray: trials rebuilt / adopted by workers"] = \
            f"{sum(s['rebuilt'] for s in ray_stats)} / {sum(s['adopted'] for s in ray_stats)}"
    return {
        "candidates scored (generations)": str(gen_evals),
        "fitness per candidate": f"{1000 * gen_fit / gen_evals:.0f} ms",
        "generations: wall s": f"{gen_wall:.2f}",
        "generations: inside fitness s": f"{gen_fit:.2f}",
        "generations: candidates / s": f"{gen_evals / gen_wall:.2f}",
        "generations: engine per candidate":
            f"{1000 * (worker_s - gen_fit) / gen_evals:.0f} ms",
        "generations: engine overhead": f"{100 * (1 - gen_fit / worker_s):.1f} %",
        "last generation: engine overhead":
            f"{100 * (1 - last['fitness_s'] / (last['wall_s'] * n)):.1f} %",
        "whole run: wall s (init, output)": f"{wall:.2f}",
        "whole run: evaluations": str(doc["totals"]["evaluations"]),
        "whole run: engine overhead":
            f"{100 * (1 - summary.fitness_seconds / (wall * n)):.1f} %",
        **row,
    }


INNER_PARAMS = {
    "linear": {}, "task_arithmetic": {"lambda": 1.0}, "ties": {"density": 0.5},
    "dare_ties": {"density": 0.5}, "dare_linear": {"density": 0.5}, "pcb": {"lambda": 1.0},
}


def time_inner_merge(out: Path, recipe: dict, args: argparse.Namespace) -> float:
    """Median wall time of the engine's merge of the final population (what each merged-mode
    candidate costs before its fitness call)."""
    from mergekit_pcb.evolve.config import FitnessSpec, InnerMerge
    from mergekit_pcb.evolve.jobs import Runtime, WorkContext
    from mergekit_pcb.evolve.store import RunDir, TensorSpec
    from mergekit_pcb.evolve.strategies import STRATEGIES
    from mergekit_pcb.evolve.strategies.evolver import EvolverParameters
    from mergekit_pcb.io.mapped import open_readable
    from mergekit_pcb.io.memory import MemoryCheckpoint
    from mergekit_pcb.threads import torch_threads

    run_dir = RunDir(out.parent / f"{out.name}.run")
    state = run_dir.load_state()
    assert state is not None
    members = [str(run_dir.member_path(n)) for n in state["members"]]
    layout = tuple(TensorSpec(n, i.dtype, i.shape)
                   for n, i in open_readable(members[0]).tensors.items())
    ctx = WorkContext(
        key="bench", fitness=FitnessSpec(type="callable", function="benchfit:score"),
        root=str(out.parent), model_ref=None, merge=InnerMerge(**recipe["merge"]),
        base=recipe["base_model"], dtype=None, seed=0, layout=layout,
        strategy=STRATEGIES["evolver"](EvolverParameters()))
    rt = Runtime(ctx)
    times = []
    with torch_threads(args.threads):
        # as a candidate: the members on file (their kept trims warm from an earlier merge,
        # as in a run), slot 0 a trial in memory, prepared anew each time
        population = [rt.cache.get(m) for m in members]
        rt.merge(population)
        # a trial unlike any member (a copy of one would tie every order statistic)
        first, second = rt.load(members[0]), rt.load(members[1])
        trial = MemoryCheckpoint("trial", {k: (first[k] + second[k]) / 2 for k in first})
        for _ in range(3):
            start = time.perf_counter()
            rt.merge([trial, *population[1:]])
            times.append(time.perf_counter() - start)
    rt.close()
    return sorted(times)[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", type=float, default=30e6, help="model size (parameters)")
    ap.add_argument("--pop", type=int, default=16)
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--batch", default="64,2048",
                    help="rows in the fitness batch; a comma list runs one column each")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per scorer")
    ap.add_argument("--mode", choices=["standalone", "merged"], default="standalone")
    ap.add_argument("--inner", choices=sorted(INNER_PARAMS), default="ties",
                    help="merged mode: the population's merge")
    ap.add_argument("--executor", choices=["local", "ray"], default="local",
                    help="ray: run each column on the process pool and on a local Ray")
    ap.add_argument("--workdir", type=Path, default=None, help="kept when given")
    ap.add_argument("--json", action="store_true", help="print a JSON summary")
    args = ap.parse_args()
    batches = [int(b) for b in args.batch.split(",")]

    root = args.workdir or Path(tempfile.mkdtemp(prefix="bench-evolve-"))
    root.mkdir(parents=True, exist_ok=True)
    try:
        n_params = build_inputs(root / "inputs", args.params, inputs=4)
        runs = ["local", "ray"] if args.executor == "ray" else ["local"]
        columns = {f"fitness batch {b}" + (f", {e}" if len(runs) > 1 else ""):
                   bench_once(root, args, b, e) for b in batches for e in runs}
        if len(runs) > 1:
            for b in batches:
                pool, ray = columns[f"fitness batch {b}, local"], columns[f"fitness batch {b}, ray"]
                n = int(ray["candidates scored (generations)"])
                extra = (float(ray["generations: wall s"])
                         - float(pool["generations: wall s"])) / n
                ray["ray: cost per candidate over the pool"] = f"{1000 * extra:.0f} ms"
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)

    head = {
        "model parameters": f"{n_params / 1e6:.1f} M ({n_params * 4 / 1e6:.0f} MB fp32)",
        "population / generations": f"{args.pop} / {args.generations} ({args.mode}"
                                    + (f", {args.inner} inside)" if args.mode == "merged"
                                       else ")"),
        "workers × threads": f"{args.workers} × {args.threads}",
    }
    if args.json:
        print(json.dumps({**head, "by_batch": columns}))
        return
    table = Table("measure", *columns, title="bench_evolve",
                  caption=" · ".join(f"{k}: {v}" for k, v in head.items()),
                  title_justify="left")
    keys = list(dict.fromkeys(k for c in columns.values() for k in c))
    for key in keys:
        table.add_row(key, *(c.get(key, "") for c in columns.values()))
    Console().print(table)


if __name__ == "__main__":
    sys.exit(main())
