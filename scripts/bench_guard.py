"""Each search of `scripts/bench_de.py` with and without a guard split: report accuracy of
the result against its best start, with the paired bootstrap interval, as a Markdown table.

    python scripts/bench_de.py --data digits      # first: builds the cached checkpoints
    python scripts/bench_guard.py --data digits

The searches are bench_de's (de-ancestor with its defaults, cade in its larger setting),
run once as they are and once with `fitness.guard_fraction: 0.25` (a quarter of the select
rows, stratified by label, chooses the result; trials see the other three quarters). The
best start is the starting point (an input or their uniform average) best on select
without a guard, best on the guard with one: what the search is measured against without
reading report. The guard-test column is the result's one-sided paired test against that
start on the guard (`fitness.guard_level` 0.95: the 90% interval's lower end above 0).
The interval is report accuracy(result) − report accuracy(best start),
95% paired bootstrap over the report rows (2,000 resamples, seed 0). `--accept paired`
runs the same searches with `parameters.accept: paired` (a trial kept only if its gain per
example passes a one-sided paired test) and writes `guard-<data>-paired.md`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import bench_de
import torch
import yaml
from bench_de import (
    CADE_SETTINGS,
    CNN_LAST,
    TASKS,
    WORK,
    build_cnn_run,
    build_snn_fine_tunes,
    evaluator,
    run_recipe,
    uniform_average,
)
from safetensors.torch import load_file

from mergekit_pcb.evolve.stats import paired_bootstrap

GUARD_FRACTION = 0.25


def searches(task: Any) -> list[tuple[str, Path, dict[str, Any], list[Path]]]:
    """(name, folder, recipe data, inputs) of each search bench_de runs on `task`."""
    root = WORK / task.name / "ancestor"
    dirs, _ = build_cnn_run(task, root, False)
    de = {"merge_method": "de-ancestor",
          "ancestors": {"glob": str(root / "run" / "epoch-*"), "last": CNN_LAST},
          "parameters": {"generations": 15, "F": 0.1, "CR": 0.1, "adaptation": "sade",
                         "F_sd": 0.04, "CR_sd": 0.05, "CR_max": 0.2, "memory": 5,
                         "batch_size": 256},
          "fitness": {"type": "torch", "arch": "bench_de_cnn:build",
                      "arch_kwargs": {"width": task.cnn_width, "side": task.side},
                      "select": "select.npz", "report": "report.npz", "metric": "loss",
                      "batch_size": task.eval_batch}, "seed": 0}
    croot = WORK / task.name / "cade"
    cdirs, _ = build_snn_fine_tunes(task, croot, False)
    cade = {"merge_method": "cade", "models": [{"model": str(d)} for d in cdirs],
            "parameters": CADE_SETTINGS["larger"],
            "fitness": {"type": "torch", "arch": "bench_de_sew:build",
                        "reset": "bench_de_sew:reset",
                        "arch_kwargs": {"width": task.snn_width, "T": 4, "side": task.side},
                        "select": "select.npz", "report": "report.npz", "metric": "accuracy",
                        "batch_size": task.eval_batch}, "seed": 0}
    return [("de-ancestor", root, de, dirs), ("cade (larger setting)", croot, cade, cdirs)]


def measure(name: str, root: Path, data: dict[str, Any], dirs: list[Path],
            guard: bool, accept: str = "greedy") -> str:
    if guard:
        data = {**data, "fitness": {**data["fitness"], "guard_fraction": GUARD_FRACTION}}
    tag = "guard" if guard else "plain"
    if accept != "greedy":
        data = {**data, "parameters": {**data["parameters"], "accept": accept}}
        tag += f"-{accept}"
    recipe = root / f"guard-bench-{tag}.yaml"
    recipe.write_text(yaml.safe_dump(data, sort_keys=False))
    out = root / f"guard-bench-{tag}-out"
    print(f"{name}, {tag} ...", file=sys.stderr, flush=True)
    doc, wall = run_recipe(recipe, out)
    start = doc["report_interval"]["start"]
    start_state = (uniform_average(dirs) if start == len(dirs)
                   else load_file(str(dirs[start] / "model.safetensors")))
    acc = evaluator(data["fitness"], root, "accuracy")
    result = acc.example_scores(load_file(str(out / "model.safetensors")), "report")
    base = acc.example_scores(start_state, "report")
    ci = paired_bootstrap(result, base, seed=0)
    start_label = doc["scores"][start]["label"]
    result_label = doc["scores"][-1]["label"]
    label = name if accept == "greedy" else f"{name}, accept: {accept}"
    return (f"| {label} | {'guard ' + str(GUARD_FRACTION) if guard else 'none'} | "
            f"{start_label} | {float(base.mean()):.4f} | {result_label} | "
            f"{float(result.mean()):.4f} | {ci.delta:+.4f} [{ci.low:+.4f}, {ci.high:+.4f}] | "
            f"{guard_test(doc)} | {doc['generations']} | {wall:.0f} s |")


def guard_test(doc: dict[str, Any]) -> str:
    """The result's paired test against the best start on the guard (evolution.json's
    guard.test): the best on the guard, its gain and interval, and whether it passed."""
    test = doc.get("guard", {}).get("test")
    if test is None:
        return "—"
    if not test["tested"]:  # the bench's torch fitness has scores per example
        return "none: a start is best on the guard"
    return (f"{test['label']} {test['gain']:+.4f} [{test['low']:+.4f}, {test['high']:+.4f}] "
            f"{'passed' if test['passed'] else 'failed'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="digits", help="digits or fashion")
    ap.add_argument("--fashion-dir", type=Path, default=Path("/usr/share/datasets/fashion-mnist"),
                    help="the Fashion-MNIST *-ubyte.gz files (as bench_de.py's --fashion-dir)")
    ap.add_argument("--accept", default="greedy", choices=("greedy", "paired"),
                    help="the searches' parameters.accept (paired: a one-sided paired test)")
    args = ap.parse_args()
    bench_de.FASHION_DIR = args.fashion_dir  # where bench_de's data loader reads them
    torch.set_num_threads(1)
    task = TASKS[args.data]
    lines = ["| search | guard | best start | its report acc. | result | report acc. | "
             "Δ [95% paired CI] | guard test: best on the guard, gain [90% CI] | generations | "
             "wall |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, root, data, dirs in searches(task):
        for guard in (False, True):
            lines.append(measure(name, root, data, dirs, guard, args.accept))
            print(lines[-1], flush=True)
    text = "\n".join(lines)
    suffix = "" if args.accept == "greedy" else f"-{args.accept}"
    (WORK / f"guard-{args.data}{suffix}.md").write_text(text + "\n")
    print("\n" + text)
    print(json.dumps({"data": args.data, "guard_fraction": GUARD_FRACTION,
                      "accept": args.accept}))


if __name__ == "__main__":
    main()
