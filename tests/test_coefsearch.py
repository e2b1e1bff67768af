"""Coefficient search (`merge_method: coefficient-search`) on a tiny MLP population: the fast
path equals the engine bit for bit, PCB scores are computed once, the result reproduces
with `pcbmerge run best_recipe.yaml`, resume after SIGKILL, outputs and bad input."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from tiny_mlp import write_mlp_population
from typer.testing import CliRunner

from mergekit_pcb.engine import build_plan, merge_in_memory
from mergekit_pcb.evolve.coefsearch.config import parse_search_recipe
from mergekit_pcb.evolve.coefsearch.fastpath import build_parts, fast_merge, matches
from mergekit_pcb.evolve.coefsearch.run import run_search
from mergekit_pcb.methods import pcb as pcb_module

NET_MODULE = '''
import os
import time

import numpy as np
import torch


def build(hidden=12):
    return torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(),
                               torch.nn.Linear(hidden, 3))


_NET = build()


def loss(state, data):
    time.sleep(float(os.environ.get("COEFSEARCH_TEST_SLEEP", "0")))
    z = np.load(data)
    x, y = torch.from_numpy(z["inputs"]), torch.from_numpy(z["labels"]).long()
    with torch.no_grad():
        out = torch.func.functional_call(_NET, dict(state), (x,))
    return float(torch.nn.functional.cross_entropy(out, y))
'''


def build_population(root: Path, n: int = 3) -> Path:
    """A base MLP and `n` fine-tuned-like copies (shared direction plus noise), a 3-class
    task with select/report splits."""
    return write_mlp_population(root, n, "coefnet", NET_MODULE, shared=0.3)


def recipe_dict(root: Path, *, n: int = 3, merge: dict[str, Any] | None = None,
                search: dict[str, Any] | None = None, **params: Any) -> dict[str, Any]:
    return {
        "merge_method": "coefficient-search",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / f"m{i}")} for i in range(n)],
        "merge": merge or {"merge_method": "pcb",
                           "parameters": {"density": 0.5, "lambda": 1.0}},
        "search": search or {"weight": [0.5, 1.5], "lambda": [0.5, 2.0]},
        "parameters": {"optimizer": "NGOpt", "budget": 8, **params},
        "fitness": {"type": "callable", "function": "coefnet:loss", "select": "select.npz",
                    "report": "report.npz", "minimize": True},
        "seed": 0,
    }


def write_recipe(root: Path, data: dict[str, Any], name: str = "search.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def load(path: Path) -> tuple[Any, Any, str]:
    text = path.read_text()
    recipe, space = parse_search_recipe(yaml.safe_load(text), str(path))
    return recipe, space, text


def search(path: Path, out: Path, **kw: Any) -> dict[str, Any]:
    return run_search(load(path), path, out, trust_code=True, **kw)


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def record(out: Path) -> list[dict[str, Any]]:
    """search.json's evaluations without their timings."""
    doc = json.loads((out / "search.json").read_text())
    return [{k: v for k, v in e.items() if k not in ("seconds", "fitness_s")}
            for e in doc["evaluations"]]


@pytest.fixture
def pop(tmp_path: Path) -> Path:
    return build_population(tmp_path / "pop")


def cli(*args: str | Path) -> Any:
    from mergekit_pcb.cli import app

    return CliRunner().invoke(app, [*map(str, args)])


# ----------------------------------------------------------------------------- fast path

MERGES = [
    {"merge_method": "linear", "parameters": {}},
    {"merge_method": "task_arithmetic", "parameters": {"lambda": 0.7}},
    {"merge_method": "ties", "parameters": {"density": 0.5}},
    {"merge_method": "ties", "parameters": {"density": 0.5, "rescale": True}},
    {"merge_method": "ties", "parameters": {"density": 0.5, "dtype": "bfloat16"}},
    {"merge_method": "ties", "parameters": {"density": 0.4, "scope": "global"}},
    {"merge_method": "dare_ties", "parameters": {"density": 0.6}},
    {"merge_method": "dare_linear", "parameters": {"density": 0.6}},
    {"merge_method": "pcb", "parameters": {"density": 0.3, "scope": "tensor"}},
    {"merge_method": "pcb", "parameters": {"density": 0.3, "inter": "pairwise"}},
    {"merge_method": "pcb", "parameters": {"density": 0.3, "clip": 0.0,
                                           "inter": "normalized"}},
]


@pytest.mark.parametrize("merge", MERGES, ids=lambda m: f"{m['merge_method']}-"
                         f"{'-'.join(str(v) for v in m['parameters'].values())}")
def test_fast_path_equals_the_engine_bit_for_bit(pop: Path, merge: dict[str, Any]) -> None:
    search_space = {"weight": [0.5, 1.5]}
    if merge["merge_method"] != "linear":
        search_space["lambda"] = [0.5, 2.0]
    merge = {**merge, "parameters": dict(merge["parameters"])}
    dtype = merge["parameters"].pop("dtype", None)
    data = recipe_dict(pop, merge=merge, search=search_space)
    if dtype:
        data["dtype"] = dtype
    _, space, _ = load(write_recipe(pop, data))
    ref = build_plan(space.merge_recipe(None, 3), "")
    parts = build_parts(ref)
    rng = random.Random(1)
    for _ in range(3):
        x = [rng.uniform(v.low, v.high) for v in space.variables]
        plan = build_plan(space.merge_recipe(x, 3), "")
        assert matches(plan, parts)
        fast, engine = fast_merge(plan, parts), merge_in_memory(plan)
        assert fast.keys() == engine.keys()
        for k in engine:
            assert fast[k].dtype == engine[k].dtype
            assert torch.equal(fast[k], engine[k]), k
        plan.close()
    ref.close()


def test_slices_of_large_tensors_match_too(tmp_path: Path) -> None:
    """A tensor above the engine's slice size is merged in slices; the parts follow them."""
    from mergekit_pcb.engine import stream

    root = tmp_path / "big"
    root.mkdir()
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 40, generator=g), "b": torch.randn(7, generator=g)}
    save_file(base, str(root / "base.safetensors"))
    for i in range(2):
        save_file({k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()},
                  str(root / f"m{i}.safetensors"))
    data = {"merge_method": "coefficient-search", "base_model": str(root / "base.safetensors"),
            "models": [{"model": str(root / f"m{i}.safetensors")} for i in range(2)],
            "merge": {"merge_method": "pcb", "parameters": {"density": 0.2}},
            "search": {"weight": [0.5, 1.5], "lambda": [0.5, 2.0]},
            "fitness": {"type": "callable", "function": "x:y"}}
    _, space = parse_search_recipe(data, "r")
    old = stream.CHUNK_ELEMENTS
    stream.CHUNK_ELEMENTS = 1000  # 12 slices for w
    try:
        ref = build_plan(space.merge_recipe(None, 0), "")
        parts = build_parts(ref)
        assert len(parts.pieces["w"]) == 12
        plan = build_plan(space.merge_recipe([0.7, 1.3, 1.6], 0), "")
        fast, engine = fast_merge(plan, parts), merge_in_memory(plan)
        assert all(torch.equal(fast[k], engine[k]) for k in engine)
    finally:
        stream.CHUNK_ELEMENTS = old


# ----------------------------------------------------------------------------- the search


def test_pcb_search_beats_the_default_and_reproduces_with_pcbmerge_run(
        pop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(pop, recipe_dict(pop, budget=12, grid={"lambda": [0.8, 1.2]}))
    summary = search(recipe, pop / "out")
    out = pop / "out"
    doc = json.loads((out / "search.json").read_text())
    phases = [e["phase"] for e in doc["evaluations"]]
    assert phases.count("search") == 12 and phases.count("default") == 1
    assert phases.count("grid") == 2
    assert all(e["fast"] for e in doc["evaluations"])
    default, grid, result = (r["select"] for r in doc["scores"])
    assert result <= default and result <= grid  # a loss: lower is better
    assert doc["engine_check"]["equal"], doc["engine_check"]
    assert summary["best"]["select"] == result
    for name in ("model.safetensors", "best_recipe.yaml", "search.json", "search.png",
                 "README.md", "merge_recipe.yaml"):
        assert (out / name).is_file(), name
    assert (out / "search.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # `pcbmerge run best_recipe.yaml`, from another folder, writes the same bits
    proc = subprocess.run([sys.executable, "-m", "mergekit_pcb", "run",
                           str(out / "best_recipe.yaml"), "-o", str(pop / "again"), "--quiet"],
                          cwd=pop.parent, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert same_tensors(out, pop / "again")
    best = yaml.safe_load((out / "best_recipe.yaml").read_text())
    assert best["merge_method"] == "pcb" and best["seed"] == 0
    point = doc["best"]["point"]
    if doc["best"]["phase"] != "default":
        assert best["parameters"]["lambda"] == point["lambda"]
        assert [m["parameters"]["weight"] for m in best["models"]] == \
            [point[f"weight[{i}]"] for i in range(3)]


def test_pcb_scores_are_computed_once_whatever_the_budget(
        pop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = [0]
    original = pcb_module.pcb_scores

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(pcb_module, "pcb_scores", counting)
    counts = []
    for budget in (3, 15):
        calls[0] = 0
        data = recipe_dict(pop, budget=budget)
        data["fitness"].pop("report")  # no engine merges for the report column
        recipe = write_recipe(pop, data, f"b{budget}.yaml")
        search(recipe, pop / f"out{budget}")
        counts.append(calls[0])
    # 4 tensors, 9 score computations each whatever the budget: statistics (2 score passes)
    # and parts (1) once, the engine's merge of the default point that checks the parts (3),
    # the output's write through the engine (3); no candidate computes a score
    assert counts == [4 * 9] * 2, counts


def test_two_workers_score_batches_of_two_with_parts_in_the_run_directory(pop: Path) -> None:
    """The batch is the optimizer's num_workers (nevergrad picks its algorithm by it), so a
    run with 2 workers is its own search; a resume keeps the run's batch."""
    data = recipe_dict(pop, budget=6,
                       merge={"merge_method": "ties", "parameters": {"density": 0.5}})
    recipe = write_recipe(pop, data)
    search(recipe, pop / "w2", workers=2)
    doc = json.loads((pop / "w2" / "search.json").read_text())
    assert doc["batch"] == 2 and doc["parts_in"] == "file"
    batches = [e["batch"] for e in doc["evaluations"] if e["phase"] == "search"]
    assert batches == [0, 0, 1, 1, 2, 2]
    assert all(e["fast"] for e in doc["evaluations"]) and doc["engine_check"]["equal"]
    assert (pop / "w2.run" / "parts.safetensors").is_file()  # shared with the workers


def test_density_search_falls_back_to_the_engine(pop: Path) -> None:
    data = recipe_dict(pop, budget=4, merge={"merge_method": "ties",
                                             "parameters": {"density": 0.5}},
                       search={"density": [0.2, 0.9], "lambda": [0.5, 1.5]})
    recipe = write_recipe(pop, data)
    search(recipe, pop / "out")
    doc = json.loads((pop / "out" / "search.json").read_text())
    assert not any(e["fast"] for e in doc["evaluations"])
    assert doc["engine_check"]["equal"]


def test_parts_that_differ_from_the_engine_are_not_used(
        pop: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The run checks the parts against the engine at the default point first."""
    from mergekit_pcb.evolve.coefsearch import run as run_module

    monkeypatch.setattr(run_module, "verify", lambda plan, parts: "0.weight")
    data = recipe_dict(pop, budget=2)
    data["fitness"].pop("report")
    search(write_recipe(pop, data), pop / "out")
    doc = json.loads((pop / "out" / "search.json").read_text())
    assert doc["parts_mismatch"] == "0.weight" and doc["parts_in"] is None
    assert not any(e["fast"] for e in doc["evaluations"]) and doc["engine_check"]["equal"]


def test_layer_groups_search_a_gradient(pop: Path) -> None:
    data = recipe_dict(pop, budget=4, layer_groups=2,
                       merge={"merge_method": "task_arithmetic", "parameters": {}},
                       search={"weight": [0.5, 1.5]})
    recipe = write_recipe(pop, data)
    search(recipe, pop / "out")
    doc = json.loads((pop / "out" / "search.json").read_text())
    assert len(doc["variables"]) == 6 and all(e["fast"] for e in doc["evaluations"])
    best = yaml.safe_load((pop / "out" / "best_recipe.yaml").read_text())
    if doc["best"]["phase"] != "default":
        assert len(best["models"][0]["parameters"]["weight"]) == 2


@pytest.mark.parametrize("optimizer", ["CMA", "DE", "TwoPointsDE", "PSO", "RandomSearch"])
def test_every_optimizer_runs_its_budget(pop: Path, optimizer: str) -> None:
    data = recipe_dict(pop, budget=5, optimizer=optimizer,
                       merge={"merge_method": "task_arithmetic", "parameters": {}})
    data["fitness"].pop("report")
    search(write_recipe(pop, data), pop / "out")
    doc = json.loads((pop / "out" / "search.json").read_text())
    assert doc["totals"]["search_evaluations"] == 5


# ----------------------------------------------------------------------------- resume


def _start(recipe: Path, out: Path, *extra: str, sleep: str = "0") -> subprocess.Popen[str]:
    env = {**os.environ, "COEFSEARCH_TEST_SLEEP": sleep}
    return subprocess.Popen(
        [sys.executable, "-m", "mergekit_pcb", "run", str(recipe), "-o", str(out), "--quiet",
         "--trust-code", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_after(proc: subprocess.Popen[str], state: Path, evaluations: int) -> int:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            n = len(json.loads(state.read_text())["evaluations"])
        except (OSError, ValueError, KeyError):
            n = -1
        if n >= evaluations:
            time.sleep(random.Random(evaluations).uniform(0, 0.05))  # anywhere in a batch
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return n
        time.sleep(0.005)
    proc.kill()
    raise AssertionError("the run never reached the kill point")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(pop: Path, workers: str) -> None:
    recipe = write_recipe(pop, recipe_dict(pop, budget=10))
    search(recipe, pop / "ref", workers=int(workers))
    out, state = pop / "out", pop / "out.run" / "state.json"
    par = ("--workers", workers)
    kill_at = random.Random(int(workers)).randint(3, 7)
    _kill_after(_start(recipe, out, *par, sleep="0.05"), state, kill_at)
    assert not out.exists()
    logged = len(json.loads(state.read_text())["evaluations"])
    assert 0 < logged < 11
    # without --resume or --force, the run directory is not reused
    proc = _start(recipe, out, *par)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "--resume" in err, err
    proc = _start(recipe, out, "--resume", *par)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert same_tensors(pop / "ref", out)
    assert record(pop / "ref") == record(out)


# ----------------------------------------------------------------------------- CLI


def test_cli_run_dry_run_and_methods(pop: Path) -> None:
    recipe = write_recipe(pop, recipe_dict(pop))
    res = cli("run", recipe, "-o", pop / "out", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert plan["kind"] == "coefficient-search" and plan["budget"] == 8
    assert len(plan["variables"]) == 4 and plan["per_evaluation"]["parts_in"] == "memory"
    assert not (pop / "out").exists() and not (pop / "out.run").exists()
    res = cli("validate", recipe)
    assert res.exit_code == 0 and "coefficient-search" in res.output
    res = cli("methods", "--json")
    assert json.loads(res.output)["coefficient-search"]["kind"] == "coefficient-search"
    res = cli("run", recipe, "-o", pop / "out", "--json", "--trust-code", "--workers", "1")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["kind"] == "coefficient-search" and summary["evaluations"] == 9
    res = cli("run", recipe, "-o", pop / "out", "--trust-code")  # exists: needs --force
    assert res.exit_code == 2
    res = cli("run", recipe, "-o", pop / "out", "--trust-code", "--force", "--quiet")
    assert res.exit_code == 0, res.output


def _error(res: Any) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, res.output
    return lines[0]


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda d: d.update(serach={}), "unknown key 'serach'"),
    (lambda d: d["parameters"].update(budjet=3), "parameters.budjet"),
    (lambda d: d["fitness"].update(metrc="x"), "fitness.metrc"),
    (lambda d: d["parameters"].update(optimizer="Adam"), "parameters.optimizer"),
    (lambda d: d["search"].update(clip=[0.3, 0.1]), "search.clip: [low, high] needs low < high"),
    (lambda d: d["search"].update(density=[0.0, 0.5]), "search.density: bounds must lie in"),
    (lambda d: d["search"].update(inter=[0, 1]), "search.inter: not a numeric parameter"),
    (lambda d: d["search"].update(normalize=[0, 1]), "search.normalize: not a numeric"),
    (lambda d: d["merge"].update(merge_method="nope"), "merge.merge_method: unknown method"),
    (lambda d: d["merge"]["parameters"].update(lamda=1), "merge.parameters.lamda"),
    (lambda d: d["models"][0].update(parameters={"weight": [1, 2]}),
     "models[0].parameters.weight: a searched parameter's recipe value must be one number"),
    (lambda d: d["parameters"].update(grid={"clip": [0.1]}), "parameters.grid.clip: not a"),
    (lambda d: d.pop("base_model"), "base_model: required by the inner merge pcb"),
    (lambda d: d["parameters"].update(layer_groups=2),
     "parameters.layer_groups: pcb with whole-model statistics"),
])
def test_bad_input_is_one_line_naming_the_key(pop: Path, edit: Any, expected: str) -> None:
    data = recipe_dict(pop)
    edit(data)
    res = cli("run", write_recipe(pop, data), "-o", pop / "out", "--trust-code")
    assert expected in _error(res)
    assert not (pop / "out").exists()


def test_code_runs_only_with_trust_code_and_merge_flags_are_refused(pop: Path) -> None:
    recipe = write_recipe(pop, recipe_dict(pop))
    line = _error(cli("run", recipe, "-o", pop / "out"))
    assert "fitness.function" in line and "--trust-code" in line
    assert not (pop / "out.run").exists()
    line = _error(cli("run", recipe, "-o", pop / "out", "--allow-crimes"))
    assert line.startswith("error: --allow-crimes: a mergekit-yaml flag, used by merge "
                           "recipes only")
    line = _error(cli("evolve", recipe, "-o", pop / "out", "--trust-code"))
    assert "run it with `pcbmerge run`" in line


def test_a_parameter_named_without_bounds_gets_the_methods_own_range(pop: Path) -> None:
    """`search: {alpha: null}` over iso_c spans the papers' 0 to 3 (the issue's range); CART's
    λ and rank ratio theirs; a parameter with no range of its own is refused, naming it."""
    iso = recipe_dict(pop, merge={"merge_method": "iso_c", "parameters": {}},
                      search={"alpha": None})
    res = cli("run", write_recipe(pop, iso), "-o", pop / "out", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    [alpha] = json.loads(res.output)["variables"]
    assert (alpha["label"], alpha["low"], alpha["high"], alpha["default"]) == ("alpha", 0, 3, 1)
    cart = recipe_dict(pop, merge={"merge_method": "cart", "parameters": {}},
                       search={"lambda": None, "rank_ratio": [0.1, 0.2]})
    _, space = parse_search_recipe(cart, "cart.yaml")
    assert space.bounds() == ([0.0, 0.1], [3.0, 0.2])
    assert space.ranges == {"lambda": (0.0, 3.0), "rank_ratio": (0.1, 0.2)}
    _, space = parse_search_recipe({**cart, "search": {"rank_ratio": None}}, "cart.yaml")
    assert space.bounds() == ([0.0], [1.0])
    pcb = recipe_dict(pop, search={"lambda": None})
    res = cli("validate", write_recipe(pop, pcb, "pcb.yaml"))
    assert res.exit_code == 2
    assert "search.lambda: pcb's lambda has no search range of its own" in res.output
