"""The guard split: trials are kept on the fitting data, the result is chosen on the guard
among the starting points, each generation's best and the soups of the final population;
early stopping on the guard; report data never read before the result is chosen."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_evolve_engine import (
    _kill_when,
    _resume_matches,
    _start,
    build_population,
    recipe_dict,
    same_tensors,
    search_record,
    tensors,
    write_recipe,
)

from mergekit_pcb.errors import RecipeError, UserError
from mergekit_pcb.evolve.config import load_evolution_recipe, parse_fitness
from mergekit_pcb.evolve.fitness import build_evaluator, guard_split
from mergekit_pcb.evolve.run import evaluate_checkpoint, evolve, plan_evolution

# A callable fitness that logs which data file each call reads (what the report test
# checks the order of).
LOGGING = '''
import os

from tinynet import loss as _loss


def loss(state, data):
    with open(os.path.join(os.path.dirname(__file__), "calls.log"), "a") as f:
        f.write(os.path.basename(data) + "\\n")
    return _loss(state, data)
'''


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four tiny MLPs and a guard whose labels are the task's shifted by one class: what
    lowers the select loss raises the guard's (the select-best trial is worse on it)."""
    root = build_population(tmp_path_factory.mktemp("guard") / "pop", n=4)
    g = torch.Generator().manual_seed(9)
    x = torch.randn(120, 6, generator=g)
    y = ((x[:, 0] > 0).long() + (x[:, 1] > 0.3).long() + 1) % 3
    np.savez(root / "guard.npz", inputs=x.numpy(), labels=y.numpy())
    (root / "guardlog.py").write_text(LOGGING)
    return root


def guarded(root: Path, **fitness: Any) -> dict[str, Any]:
    data = recipe_dict(root, n=4, generations=3)
    data["fitness"].update({"guard": "guard.npz", **fitness})
    return data


def guard_loss(model: Path, root: Path) -> float:
    return evaluate_checkpoint(str(model), root / "recipe.yaml", ("guard",),
                               trust_code=True)["guard"]


# ----------------------------------------------------------------------------- the split


def test_guard_split_is_disjoint_stratified_and_fixed_by_the_seed() -> None:
    labels = [i % 3 for i in range(10)] + [0] * 20  # classes of 24, 3 and 3 rows
    fit, guard = guard_split(30, 0.25, seed=3, labels=labels)
    assert not set(fit.tolist()) & set(guard.tolist())
    assert sorted(fit.tolist() + guard.tolist()) == list(range(30))
    # round(0.25 × rows) of each class: 6 of class 0, 1 of class 1, 1 of class 2
    held = [labels[i] for i in guard.tolist()]
    assert (held.count(0), held.count(1), held.count(2)) == (6, 1, 1)
    again = guard_split(30, 0.25, seed=3, labels=labels)
    assert torch.equal(again[1], guard)
    assert not torch.equal(guard_split(30, 0.25, seed=4, labels=labels)[1], guard)


def test_guard_fraction_splits_the_select_file_of_a_torch_fitness(population: Path) -> None:
    spec = parse_fitness({"type": "torch", "arch": "tinynet:build", "select": "select.npz",
                          "guard_fraction": 0.3, "guard_seed": 1}, "test")
    ev = build_evaluator(spec, population)
    z = np.load(population / "select.npz")
    x_all = torch.from_numpy(z["inputs"])
    (xf, yf), (xg, yg) = ev.data("select"), ev.data("guard")  # type: ignore[attr-defined]
    assert len(yf) + len(yg) == len(x_all) and len(yg) == pytest.approx(0.3 * 120, abs=2)
    rows = {tuple(r.tolist()) for r in x_all}
    fit_rows = {tuple(r.tolist()) for r in xf}
    guard_rows = {tuple(r.tolist()) for r in xg}
    assert fit_rows | guard_rows == rows and not fit_rows & guard_rows


def test_guard_keys_are_checked() -> None:
    with pytest.raises(RecipeError, match=r"fitness\.guard_fraction: give guard data"):
        parse_fitness({"type": "torch", "arch": "a:b", "select": "s.npz", "guard": "g.npz",
                       "guard_fraction": 0.2}, "r.yaml", "fitness")
    with pytest.raises(RecipeError, match=r"fitness\.guard_fraction: a callable fitness"):
        parse_fitness({"type": "callable", "function": "a:b", "guard_fraction": 0.2},
                      "r.yaml", "fitness")


def test_patience_needs_a_guard(population: Path, tmp_path: Path) -> None:
    data = recipe_dict(population, n=4, generations=3, patience=2)
    path = write_recipe(tmp_path, data)
    with pytest.raises(RecipeError, match=r"parameters\.patience: early stopping watches"):
        load_evolution_recipe(path)


# ----------------------------------------------------------------------------- the result


def test_result_is_never_below_the_best_start_on_the_guard(population: Path) -> None:
    root = population
    write_recipe(root, recipe_dict(root, n=4, generations=3), "plain.yaml")
    plain = evolve(root / "plain.yaml", root / "plain-out", trust_code=True, force=True)
    write_recipe(root, guarded(root))
    out = root / "guarded-out"
    summary = evolve(root / "recipe.yaml", out, trust_code=True, force=True)
    starts = [guard_loss(root / f"m{i}", root) for i in range(4)]
    # the constructed case bites: the select-chosen result is worse on the guard
    assert plain.scores[-1].select < min(r.select for r in plain.scores[:-1])
    assert guard_loss(root / "plain-out", root) > min(starts)
    result = guard_loss(out, root)
    assert result <= min(starts) + 1e-6
    assert summary.scores[-1].guard == pytest.approx(result, abs=1e-6)
    doc = json.loads((out / "evolution.json").read_text())
    candidates = doc["guard"]["candidates"]
    assert [c["generation"] for c in candidates] == [0] * 5 + [1, 2, 3]
    assert [c["guard"] for c in candidates[:4]] == pytest.approx(starts, abs=1e-6)
    assert any("did not beat its best start" in n for n in summary.notes) == \
        (summary.scores[-1].label.endswith(tuple(c["label"] for c in candidates[:5])))


def test_selection_never_reads_report_data(population: Path, tmp_path: Path) -> None:
    root = population
    log = root / "calls.log"
    log.unlink(missing_ok=True)
    data = recipe_dict(root, n=4, fitness="callable", generations=2)
    data["fitness"].update({"function": "guardlog:loss", "guard": "guard.npz"})
    write_recipe(root, data, "logged.yaml")
    evolve(root / "logged.yaml", tmp_path / "out", trust_code=True)
    calls = log.read_text().split()
    reports = [i for i, c in enumerate(calls) if c == "report.npz"]
    # 4 inputs, their merge and the result; every one after every select and guard call
    assert len(reports) == 6
    assert calls.count("guard.npz") == 5 + 2  # the starting points, one a generation
    assert min(reports) > max(i for i, c in enumerate(calls) if c != "report.npz")


def test_patience_stops_on_the_guard_and_says_why(population: Path, tmp_path: Path) -> None:
    root = population
    data = guarded(root)
    data["parameters"].update({"generations": 8, "patience": 2})
    write_recipe(root, data, "patient.yaml")
    summary = evolve(root / "patient.yaml", tmp_path / "out", trust_code=True)
    doc = json.loads((tmp_path / "out" / "evolution.json").read_text())
    guards = [c["guard"] for c in doc["guard"]["candidates"]]
    best_at = min(range(len(guards)), key=lambda i: (guards[i], i))
    last_gain = doc["guard"]["candidates"][best_at]["generation"]
    assert doc["generations"] == last_gain + 2 < 8
    assert any(n.startswith(f"Stopped early after generation {last_gain + 2} of 8")
               for n in summary.notes)


def test_soups_of_the_final_population(tmp_path: Path) -> None:
    root = build_population(tmp_path / "pop", n=4)
    np.savez(root / "guard.npz", **dict(np.load(root / "report.npz")))
    data = recipe_dict(root, n=4, generations=2)
    data.update({"merge_method": "cade", "parameters": {
        "generations": 2, "F": 0.5, "CR": 0.5, "jitter": False}})
    del data["merge"]
    data["fitness"].update({"guard": "guard.npz"})
    write_recipe(root, data)
    out = tmp_path / "out"
    evolve(root / "recipe.yaml", out, trust_code=True)
    doc = json.loads((out / "evolution.json").read_text())
    final = doc["guard"]["final"]
    assert [c["label"].split(" (")[0] for c in final] == [
        "final population: uniform average", "final population: greedy soup on the guard"]
    members = [load_file(str(out.parent / "out.run" / "members" / m))
               for m in doc["final"]["members"]]
    average = {k: torch.stack([m[k] for m in members]).mean(0) for k in members[0]}
    ev = build_evaluator(parse_fitness(data["fitness"], "test"), root)
    assert final[0]["guard"] == pytest.approx(ev.score(average, "guard"), abs=1e-5)
    own = [ev.score(m, "guard") for m in members]
    assert final[1]["guard"] <= min(own) + 1e-6  # the soup starts from the best member
    result = tensors(out)
    assert doc["scores"][-1]["guard"] == pytest.approx(ev.score(result, "guard"), abs=1e-5)
    assert doc["scores"][-1]["label"].startswith("result (cade)")  # not "standalone"
    # the plan counts what the run scores (its final count adds the closing table's
    # result select and the 4 inputs, the average and the result on report)
    recipe, text = load_evolution_recipe(root / "recipe.yaml")
    plan = plan_evolution(recipe, text, root / "recipe.yaml", output=tmp_path / "planned")
    assert doc["totals"]["evaluations"] == plan["evaluations"]["total_at_most"] - (1 + 4 + 2)


def test_sigkill_then_resume_with_a_guard_matches(tmp_path: Path) -> None:
    root = build_population(tmp_path / "pop", n=4)
    np.savez(root / "guard.npz", **dict(np.load(root / "report.npz")))
    data = recipe_dict(root, n=4, fitness="callable", generations=3)
    data["fitness"]["guard"] = "guard.npz"
    recipe = write_recipe(root, data)
    evolve(recipe, root / "ref", trust_code=True)
    out, state = root / "out", root / "out.run" / "state.json"
    _kill_when(_start(recipe, out, sleep="0.02"), state, generation=1, step=2)
    killed = json.loads(state.read_text())
    assert killed["phase"] == "evolve" and len(killed["guard"]["candidates"]) == 6
    _resume_matches(recipe, out, root / "ref")


# ----------------------------------------------------------------------------- the interval


def test_paired_bootstrap_against_a_hand_computed_case() -> None:
    from mergekit_pcb.evolve.stats import paired_bootstrap

    a = torch.tensor([1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0])
    b = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 1.0])
    ci = paired_bootstrap(a, b, seed=0, resamples=4000)
    assert ci.delta == pytest.approx(0.25)
    # the resampled mean of 8 differences (two 1s, six 0s) is k/8, k ~ Binomial(8, 1/4):
    # P(k = 0) = 0.100 > 2.5%, P(k >= 5) = 0.027: the interval is [0, 4/8] or [0, 5/8]
    assert ci.low == 0.0 and ci.high in (0.5, 0.625)
    same = paired_bootstrap(a, a, seed=0)
    assert (same.delta, same.low, same.high) == (0.0, 0.0, 0.0)


def test_the_closing_notes_give_the_paired_interval(population: Path, tmp_path: Path) -> None:
    root = population
    data = guarded(root, metric="accuracy")
    write_recipe(root, data, "accuracy.yaml")
    out = tmp_path / "out"
    summary = evolve(root / "accuracy.yaml", out, trust_code=True)
    doc = json.loads((out / "evolution.json").read_text())
    interval = doc["report_interval"]
    start = interval["start"]
    # the best start on the guard, and the result, scored again here example by example
    ev = build_evaluator(parse_fitness(data["fitness"], "test"), root)
    start_model = (root / f"m{start}" / "model.safetensors") if start < 4 else None
    assert start_model is not None or doc["guard"]["candidates"][start]["merged"]
    result = ev.example_scores(tensors(out), "report")  # type: ignore[attr-defined]
    if start_model is not None:
        base = ev.example_scores(load_file(str(start_model)), "report")  # type: ignore[attr-defined]
        assert interval["delta"] == pytest.approx(float((result - base).mean()), abs=1e-9)
    assert interval["examples"] == len(result) == 120
    assert interval["low"] <= interval["delta"] <= interval["high"]
    assert any(n.startswith("report(result) − report(best start: ") for n in summary.notes)


# ----------------------------------------------------------------------------- margin


def test_a_margin_keeps_only_trials_that_gain_more_than_it(population: Path,
                                                           tmp_path: Path) -> None:
    root = population
    margin = 0.004
    write_recipe(root, recipe_dict(root, n=4, generations=3, margin=margin), "margin.yaml")
    evolve(root / "margin.yaml", tmp_path / "m", trust_code=True)
    history = json.loads((tmp_path / "m" / "evolution.json").read_text())["history"]
    # merged mode, loss: each kept trial lowered the objective by more than the margin
    for before, after in itertools.pairwise(history):
        assert before["objective"] - after["objective"] >= after["accepted"] * margin
    assert sum(h["accepted"] for h in history) > 0
    write_recipe(root, recipe_dict(root, n=4, generations=2, margin=10.0), "never.yaml")
    evolve(root / "never.yaml", tmp_path / "n", trust_code=True)
    never = json.loads((tmp_path / "n" / "evolution.json").read_text())["history"]
    assert [h["accepted"] for h in never] == [0, 0, 0]
    assert never[-1]["objective"] == never[0]["objective"]


def test_the_objective_header_says_when_it_is_scored_on_batches() -> None:
    from rich.console import Console

    from mergekit_pcb.evolve.output import history_table

    row = {"generation": 0, "objective": 0.5, "best": 0.5, "mean": 0.4, "accepted": 0,
           "evaluated": 4, "F": None, "CR": None, "wall_s": 0.1}
    console = Console(width=200, record=True)
    console.print(history_table([row], "loss", batched=True))
    assert "objective (loss; gen 0: select, then each gen's batch)" in console.export_text()
    console.print(history_table([row], "loss"))
    assert "objective (loss) " in console.export_text()


def test_quiet_evolve_still_says_where_the_result_is(population: Path, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from mergekit_pcb.cli import app

    recipe = write_recipe(population, recipe_dict(population, n=4, generations=1), "q.yaml")
    out = tmp_path / "quiet-out"
    res = CliRunner().invoke(app, ["evolve", str(recipe), "-o", str(out), "-q",
                                   "--trust-code"])
    assert res.exit_code == 0, res.output
    assert f"wrote {out.resolve()}" in res.output.replace("\n", "")
    assert "Scores" not in res.output  # quiet: no tables


def test_de_ancestor_with_a_guard_fraction(tmp_path: Path) -> None:
    """Mini-batches on the fitting part, the guard cut from select: the end-of-run
    candidates include the final member best on the fitting part and the two soups."""
    root = build_population(tmp_path / "pop", n=4)
    data = recipe_dict(root, n=4, generations=2)
    data.update({"merge_method": "de-ancestor", "parameters": {
        "generations": 2, "F": 0.5, "CR": 0.5, "batch_size": 40}})
    del data["merge"]
    data["fitness"].update({"guard_fraction": 0.25, "guard_seed": 2})
    write_recipe(root, data)
    out = tmp_path / "out"
    summary = evolve(root / "recipe.yaml", out, trust_code=True)
    doc = json.loads((out / "evolution.json").read_text())
    final = doc["guard"]["final"]
    assert final[0]["label"] == "final population: best member on select"
    assert final[0]["select"] == min(doc["final"]["select"])
    ev = build_evaluator(parse_fitness(data["fitness"], "test"), root)
    labels = np.load(root / "select.npz")["labels"].tolist()
    # round(0.25 × rows) of each class
    expected = sum(round(0.25 * labels.count(c)) for c in set(labels))
    assert len(ev.data("guard")[1]) == expected  # type: ignore[attr-defined]
    starts = [ev.score(load_file(str(root / f"m{i}" / "model.safetensors")), "guard")
              for i in range(4)]
    result = ev.score(tensors(out), "guard")
    assert result <= min(starts) + 1e-6
    assert summary.scores[-1].guard == pytest.approx(result, abs=1e-6)
    assert summary.scores[-1].label.startswith("result (de-ancestor): ")


def test_a_tie_on_the_guard_goes_to_the_better_on_select() -> None:
    from mergekit_pcb.evolve.engine import _guard_best

    def c(label: str, guard: float, select: float, **extra: str) -> dict[str, Any]:
        return {"label": label, "guard": guard, "select": select, **extra}

    start = c("input a", 0.97, 0.95)
    tied = c("generation 1: best member", 0.97, 0.976)
    on_batch = c("generation 2: best member", 0.97, 0.99, select_on="batch")
    worse = c("generation 3: best member", 0.96, 0.999)
    state = {"guard": {"candidates": [start, tied, on_batch, worse], "final": None}}
    assert _guard_best(state, maximize=True) is tied
    # a mini-batch score is not compared with whole-select ones
    state["guard"]["candidates"] = [start, on_batch]
    assert _guard_best(state, maximize=True) is start
    # loss: lower is better on both
    state["guard"]["candidates"] = [c("s", 0.3, 0.5), c("g", 0.3, 0.4), c("h", 0.31, 0.1)]
    assert _guard_best(state, maximize=False)["label"] == "g"


# ----------------------------------------------------------------------------- paired


def test_a_gain_within_noise_fails_the_paired_test_and_passes_the_papers_rule() -> None:
    from mergekit_pcb.evolve.fitness import better
    from mergekit_pcb.evolve.stats import paired_gain_holds

    parent = torch.tensor([1.0, 0.0] * 100)  # accuracy 0.5 on 200 examples
    noisy = parent.clone()
    noisy[[1, 3, 5, 7]] = 1.0  # 4 examples gained,
    noisy[[0, 2]] = 0.0  # 2 lost: mean gain +0.01
    assert better(float(noisy.mean()), float(parent.mean()), True)  # the papers' rule keeps it
    # the resampled gain is (wins − losses)/200 with wins ~ Bin(200, 4/200), losses ~
    # Bin(200, 2/200): P(gain ≤ 0) ≈ 0.24, far above 5 %
    assert not paired_gain_holds(noisy, parent, maximize=True, level=0.95)
    clear = parent.clone()
    clear[1:40:2] = 1.0  # 20 gained, none lost: P(no gain resampled) = (180/200)^200 ≈ 0
    assert paired_gain_holds(clear, parent, maximize=True, level=0.95)
    # a loss: lower is the gain (the same rows, negated, read as per-example losses)
    assert paired_gain_holds(-clear, -parent, maximize=False, level=0.95)
    assert not paired_gain_holds(-noisy, -parent, maximize=False, level=0.95)
    assert not paired_gain_holds(parent, clear, maximize=True, level=0.95)  # a clear loss


@pytest.mark.parametrize(("search", "metric", "greedy", "paired"),
                         [("merged", "accuracy", [0, 2, 0, 2], [0, 1, 0, 0]),
                          ("standalone", "loss", [0, 2, 3, 1], [0, 1, 1, 0]),
                          ("de-ancestor", "loss", [0, 1, 2, 1], [0, 1, 0, 1])])
def test_paired_acceptance_keeps_fewer_trials_than_the_papers_rule(
        population: Path, tmp_path: Path, search: str, metric: str, greedy: list[int],
        paired: list[int]) -> None:
    kept = {}
    for accept in ("greedy", "paired"):
        if search == "de-ancestor":  # mini-batches: the test is on the generation's batch
            data = recipe_dict(population, n=4)
            data.update({"merge_method": "de-ancestor", "parameters": {
                "generations": 3, "F": 0.5, "CR": 0.5, "batch_size": 40, "accept": accept}})
            del data["merge"]
        else:
            data = recipe_dict(population, n=4, generations=3, mode=search, accept=accept)
        data["fitness"]["metric"] = metric
        write_recipe(population, data, f"{accept}.yaml")
        evolve(population / f"{accept}.yaml", tmp_path / accept, trust_code=True)
        doc = json.loads((tmp_path / accept / "evolution.json").read_text())
        kept[accept] = [h["accepted"] for h in doc["history"]]
    # the same seed: the trials are the same up to the first one the test refuses
    assert kept == {"greedy": greedy, "paired": paired}


def test_paired_acceptance_resumes_and_is_part_of_the_run_settings(population: Path,
                                                                    tmp_path: Path) -> None:
    root = population

    def recipe(generations: int, **params: Any) -> Path:
        data = recipe_dict(root, n=4, generations=generations, **params)
        data["fitness"]["metric"] = "accuracy"
        return write_recipe(root, data, "paired-resume.yaml")

    evolve(recipe(3, accept="paired"), tmp_path / "ref", trust_code=True)
    evolve(recipe(2, accept="paired"), tmp_path / "out", trust_code=True)
    evolve(recipe(3, accept="paired"), tmp_path / "out", trust_code=True, resume=True,
           force=True)  # force: the finished run's output is replaced
    assert same_tensors(tmp_path / "ref", tmp_path / "out")
    assert search_record(tmp_path / "ref") == search_record(tmp_path / "out")
    with pytest.raises(UserError, match=r"--resume: 'accept' differs .* now the default"):
        evolve(recipe(4), tmp_path / "out", trust_code=True, resume=True, force=True)
    with pytest.raises(UserError, match=r"--resume: 'accept_level' differs .* \(was 0\.95, now "
                                        r"0\.9\)"):
        evolve(recipe(4, accept="paired", accept_level=0.9), tmp_path / "out",
               trust_code=True, resume=True, force=True)


def test_paired_acceptance_needs_scores_per_example(population: Path, tmp_path: Path) -> None:
    data = recipe_dict(population, n=4, fitness="callable", generations=1, accept="paired")
    path = write_recipe(tmp_path, data)
    with pytest.raises(RecipeError, match=r"parameters\.accept: paired needs scores per "
                                          r"example, which fitness type callable"):
        load_evolution_recipe(path)
