"""Does `pcbmerge analyze`'s alignment track the accuracy a merge keeps? On the quality
benchmark's cached rows (scripts/bench_quality.py), per method: each task's alignment after
the merge beside the task's accuracy that merge kept, and their Spearman rank correlation.

    python scripts/bench_analyze_quality.py --work .bench/quality --family minilm

For each row of the benchmark's table (its cache `merges/<slug>/row.json`, or
`merges/<slug>.row/row.json` for a search), the merge the benchmark scored (the row's
`output`, read with `--merged`, so the weights are those that were scored, DARE's random
drops included) is measured by `pcbmerge analyze`'s own code against the row's chosen recipe
(a search row: PCB (global)'s, which names the same base and models). A task's alignment is
the mean over the report's layers of Iso's alignment (the share of the task's norm inside
the merged update's top subspace), the accuracy kept is the row's test accuracy over the
task's own fine-tune (the benchmark's normalized accuracy, from `results.json`'s
references). Spearman's ρ (scipy.stats.spearmanr) over the tasks of each method, and pooled
over every (method, task) pair, reported whichever way they come out.

Conv kernels are measured as matrices of one row per output channel (`analyze
--conv-matrix`): the vision family's EfficientNet has no other weight matrix (its one 2-D
tensor, the ImageNet head, is taken from the base), and its tensor names have no layer
numbers the report recognises (`_blocks.N.`), so its groups are its modules. Each row's
figures are cached under `--out` (keyed by the merged weights' file times and the recipe),
so a re-run only re-renders the table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from bench_quality import fmt_params, load_family, mean  # noqa: E402
from quality_family import atomic_write, log  # noqa: E402

from mergekit_pcb.analysis.report import aggregate  # noqa: E402
from mergekit_pcb.analysis.run import analyze_recipe_file  # noqa: E402


def cached_rows(root: Path, slugs: list[str]) -> list[dict[str, Any]]:
    """The benchmark's rows, from their caches, in the order of its table."""
    rows = []
    for slug in slugs:
        for cache in (root / "merges" / slug / "row.json",
                      root / "merges" / f"{slug}.row" / "row.json"):
            if cache.is_file():
                rows.append(json.loads(cache.read_text())["row"])
                break
        else:
            log(f"  {slug}: no cached row under {root / 'merges'}; left out")
    return rows


def measure(row: dict[str, Any], recipe: Path, cache_dir: Path) -> dict[str, Any]:
    """Per-layer alignment of each task with the row's scored merge (cached)."""
    out = Path(row["output"])
    key = json.dumps({"recipe": recipe.read_text(),
                      "weights": sorted((p.name, p.stat().st_mtime_ns, p.stat().st_size)
                                        for p in out.glob("*.safetensors"))})
    cache = cache_dir / f"{row['slug']}.json"
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("key") == key:
            return stored["figures"]
    t0 = time.perf_counter()
    report = aggregate(analyze_recipe_file(recipe, merged_dir=out, conv_matrix=True))
    layers = [{"name": g["name"], "alignment": g["alignment"]} for g in report["layers"]
              if g.get("alignment") is not None]
    figures = {"models": report["models"], "layers": layers,
               "model_alignment": report["model"].get("alignment"),
               "seconds": time.perf_counter() - t0}
    atomic_write(cache, json.dumps({"key": key, "figures": figures}))
    return figures


def spearman(x: list[float], y: list[float]) -> tuple[float, float]:
    from scipy.stats import spearmanr

    rho, p = spearmanr(x, y)
    return float(rho), float(p)


def family_table(name: str, work: Path, out: Path) -> dict[str, Any]:
    fam = load_family(name)
    root = (work / name).resolve()
    results = json.loads((work / "results.json").read_text())["families"][name]
    own = results["references"]["own"]
    rows = cached_rows(root, [r["slug"] for r in results["methods"]])
    pcb = next(r for r in rows if r["slug"] == "pcb_global")
    measured = []
    for row in rows:
        # a search's recipe names no method analyze can plan: PCB (global)'s names the same
        # base and models, and the figures come from the merged weights read with --merged
        recipe = Path(row["recipe"] if row.get("trials") else pcb["recipe"])
        log(f"{name}: {row['label']}")
        fig = measure(row, recipe, out / name)
        if not fig["layers"]:
            log(f"  {row['label']}: no 2-D matrix, no alignment; left out")
            continue
        tasks = [Path(m).name for m in fig["models"]]
        assert tasks == list(fam.tasks), (tasks, fam.tasks)
        # (a group the task left unchanged has no alignment for it)
        align = [mean(g["alignment"][i] for g in fig["layers"]
                      if g["alignment"][i] is not None) for i in range(len(tasks))]
        kept = [row["test"][t] / own[t] for t in tasks]
        rho, p = spearman(align, kept) if len(set(align)) > 1 else (math.nan, math.nan)
        measured.append({"label": row["label"], "slug": row["slug"], "chosen": row["chosen"],
                         "alignment": align, "model_alignment": fig["model_alignment"],
                         "kept": kept, "rho": rho, "p": p, "seconds": fig["seconds"]})
    # A row whose alignment is the same for every task (WUDI under its official rule on a
    # model without attn/mlp names leaves every matrix at the base: alignment 0) says
    # nothing about the order of the tasks: left out of the pooled figures, shown as n/a.
    ranked = [m for m in measured if not math.isnan(m["rho"])]
    pairs = [(a, k) for m in ranked for a, k in zip(m["alignment"], m["kept"], strict=True)]
    whole = [(a, k) for m in ranked for a, k in zip(m["model_alignment"], m["kept"],
                                                     strict=True)]
    return {"family": name, "title": fam.title, "tasks": list(fam.tasks),
            "task_titles": fam.task_titles, "methods": measured,
            "pooled": spearman(*zip(*pairs, strict=True)),
            "pooled_model_row": spearman(*zip(*whole, strict=True)),
            # each task across the methods: does a merge that aligns better with it keep more?
            "per_task": [spearman([m["alignment"][i] for m in ranked],
                                  [m["kept"][i] for m in ranked])
                         for i in range(len(fam.tasks))],
            # the methods against one another: mean alignment, mean accuracy kept
            "between_methods": spearman([mean(m["alignment"]) for m in ranked],
                                        [mean(m["kept"]) for m in ranked]),
            "mean_rho": mean(m["rho"] for m in ranked)}


def render(table: dict[str, Any]) -> list[str]:
    titles = [table["task_titles"][t] for t in table["tasks"]]
    head = ["method", "chosen", *titles, "ρ", "p"]
    lines = [f"### {table['title']}", "",
             "Each cell: the task's alignment after the merge (mean over layers) and, in "
             "brackets, the % of its own fine-tune's test accuracy the merge kept; ρ: "
             "Spearman's rank correlation of the two over the tasks.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in table["methods"]:
        cells = [f"{a:.2f} ({100 * k:.0f})" for a, k in zip(m["alignment"], m["kept"],
                                                            strict=True)]
        rho = ["n/a", "n/a"] if math.isnan(m["rho"]) else [f"{m['rho']:+.2f}", f"{m['p']:.2f}"]
        lines.append("| " + " | ".join([m["label"], fmt_params(m["chosen"]), *cells, *rho])
                     + " |")
    per_task = [f"{rho:+.2f}" for rho, _ in table["per_task"]]
    lines.append("| " + " | ".join(["ρ of each task across the methods", "", *per_task,
                                    "", ""]) + " |")
    ranked = [m for m in table["methods"] if not math.isnan(m["rho"])]
    left = [m["label"] for m in table["methods"] if math.isnan(m["rho"])]
    rho, p = table["pooled"]
    whole, whole_p = table["pooled_model_row"]
    n = sum(len(m["kept"]) for m in ranked)
    lines += ["", f"Pooled over the {n} (method, task) pairs: ρ = {rho:+.2f} (p = {p:.2g}); "
              f"with the report's whole-model alignment (its `model` row) instead of the mean "
              f"over layers: ρ = {whole:+.2f} (p = {whole_p:.2g}). Mean of the "
              f"{len(ranked)} methods' ρ: {table['mean_rho']:+.2f}. Between the methods "
              f"(each one's mean alignment against its mean accuracy kept): ρ = "
              f"{table['between_methods'][0]:+.2f} (p = {table['between_methods'][1]:.2g})."
              + (f" n/a: {', '.join(left)}: the same alignment for every task (no order to "
                 "correlate), left out of the pooled figures." if left else ""), ""]
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=REPO / ".bench" / "quality",
                   help="the quality benchmark's work dir (results.json, <family>/merges); "
                        "only read")
    p.add_argument("--family", default="minilm", help="comma-separated (minilm, effnet)")
    p.add_argument("--out", type=Path, default=REPO / ".bench" / "analyze-quality",
                   help="where the per-row figures are cached and results.md/json written")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (one is faster on a shared machine)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    tables = [family_table(name, args.work, args.out)
              for name in filter(None, args.family.split(","))]
    analysis_s = sum(m["seconds"] for t in tables for m in t["methods"])
    text = [f"`python scripts/bench_analyze_quality.py`, {time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} "
            f"thread(s): the analyses took {analysis_s / 60:.0f} min (as first run; cached "
            f"since), this run {(time.perf_counter() - t0) / 60:.0f} min.", ""]
    for table in tables:
        text += render(table)
    atomic_write(args.out / "results.md", "\n".join(text))
    atomic_write(args.out / "results.json", json.dumps(tables, indent=1))
    print("\n".join(text))


if __name__ == "__main__":
    main()
