"""The result of a guarded search replaces the best start only if it beats it on the guard
by a one-sided paired test over the guard's examples (`fitness.guard_level`)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_evolve_engine import (
    _kill_when,
    _resume_matches,
    _start,
    build_population,
    recipe_dict,
    write_recipe,
)

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.evolve.config import parse_fitness
from mergekit_pcb.evolve.engine import EvolutionRun
from mergekit_pcb.evolve.fitness import GUARD, build_evaluator
from mergekit_pcb.evolve.jobs import JobResult, ScoreJob
from mergekit_pcb.evolve.run import closing_notes, evolve
from mergekit_pcb.evolve.stats import paired_bootstrap


def _run(chosen_rows: torch.Tensor, start_rows: torch.Tensor, *, type_: str = "torch",
         metric: str = "accuracy", level: float | None = None
         ) -> tuple[EvolutionRun, list[ScoreJob]]:
    """An EvolutionRun at the end of a guarded search over two inputs whose generation 2
    best scored `chosen_rows` on the guard's examples, the best start (input b)
    `start_rows`; its scoring answers those rows, and logs the jobs."""
    run = object.__new__(EvolutionRun)
    spec = parse_fitness({"type": type_, "select": "s.npz", "guard": "g.npz",
                          **({"arch": "x:y", "metric": metric} if type_ == "torch"
                             else {"function": "x:y"}),
                          **({"guard_level": level} if level is not None else {})}, "test")
    run.recipe = SimpleNamespace(fitness=spec, population_refs=lambda: ["a", "b"])
    run.settings = SimpleNamespace(seed=3, strategy=SimpleNamespace(
        params=SimpleNamespace(patience=None)))
    run.maximize = True
    jobs: list[ScoreJob] = []
    rows = {("m-gen2",): chosen_rows, ("m-b",): start_rows}

    def score(batch: list[ScoreJob]) -> list[JobResult]:
        jobs.extend(batch)
        return [JobResult(float(rows[j.members].mean()), examples=rows[j.members].tolist())
                for j in batch]

    run._score = score  # type: ignore[method-assign]
    run._path = lambda name: name  # type: ignore[method-assign]

    def c(label: str, files: list[str], guard: float, merged: bool = False,
          g: int = 0) -> dict[str, Any]:
        return {"label": label, "files": files, "merged": merged, "generation": g,
                "guard": guard, "select": 0.5}

    start = float(start_rows.mean())
    run._state = {"evaluations": 0, "guard": {"candidates": [
        c("input a", ["m-a"], start - 0.02), c("input b", ["m-b"], start),
        c("plain merge", ["m-a", "m-b"], start - 0.01, merged=True),
        c("generation 1: best member", ["m-gen1"], start - 0.005, g=1),
        c("generation 2: best member", ["m-gen2"], float(chosen_rows.mean()), g=2)],
        "final": []}}
    return run, jobs


def _rows(gained: int, lost: int = 0, n: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    start = torch.tensor([1.0, 0.0] * (n // 2))  # accuracy 0.5
    chosen = start.clone()
    chosen[1:2 * gained:2] = 1.0
    chosen[0:2 * lost:2] = 0.0
    return chosen, start


def test_a_small_noisy_guard_gain_leaves_the_best_start_as_the_result() -> None:
    # 5 guard examples gained, 2 lost: net 3 of 200, +0.015 on the guard
    chosen, start = _rows(gained=5, lost=2)
    run, jobs = _run(chosen, start)
    run._guard_test()
    test = run.state["guard"]["test"]
    # both scored on the guard, example by example, the chosen candidate first
    assert [(j.members, j.split, j.examples) for j in jobs] == [
        (("m-gen2",), GUARD, True), (("m-b",), GUARD, True)]
    assert run.state["evaluations"] == 2
    # the resampled gain is (wins − losses)/200, wins ~ Bin(200, 5/200), losses ~ Bin(200,
    # 2/200): P(gain ≤ 0) ≈ 0.17, far above the 5 % a one-sided test at 0.95 allows
    ref = paired_bootstrap(chosen, start, seed=3, level=0.90)
    assert test["gain"] == pytest.approx(0.015)
    assert (test["low"], test["high"]) == pytest.approx((ref.low, ref.high))
    assert test["low"] <= 0 and not test["passed"]
    assert run.guard_best()["label"] == "input b"  # the best start, not generation 2
    (note,) = closing_notes(run)
    assert note.startswith("The search did not beat its best start on the guard by the "
                           "paired test: the result is the starting point 'input b'")
    assert "+0.0150" in note and f"[{ref.low:+.4f}, {ref.high:+.4f}]" in note
    assert "over 200 examples" in note


def test_a_clear_guard_gain_is_chosen() -> None:
    chosen, start = _rows(gained=20, lost=2)  # +0.09: P(no resampled gain) ≈ 0
    run, _ = _run(chosen, start)
    run._guard_test()
    test = run.state["guard"]["test"]
    assert test["passed"] and test["gain"] == pytest.approx(0.09) and test["low"] > 0.05
    assert run.guard_best()["label"] == "generation 2: best member"
    (note,) = closing_notes(run)
    assert note.startswith("'generation 2: best member' beat the best start 'input b' "
                           "+0.0900 on the guard")


def test_the_level_is_read_from_the_fitness() -> None:
    chosen, start = _rows(gained=5, lost=2)
    # at 0.75 the 25 % quantile of the resampled gains must be above 0: P(gain ≤ 0) ≈ 0.17
    run, _ = _run(chosen, start, level=0.75)
    run._guard_test()
    test = run.state["guard"]["test"]
    assert test["level"] == 0.75 and test["interval_level"] == pytest.approx(0.5)
    assert test["passed"] and run.guard_best()["label"].startswith("generation 2")


def test_without_scores_per_example_the_best_on_the_guard_stays_and_the_note_says_so(
        ) -> None:
    chosen, start = _rows(gained=5, lost=2)
    run, jobs = _run(chosen, start, type_="callable")
    run._guard_test()
    assert jobs == [] and run.state["guard"]["test"]["tested"] is False
    assert run.guard_best()["label"] == "generation 2: best member"  # today's rule
    (note,) = closing_notes(run)
    assert note == ("The result is the best on the guard, not tested against the best "
                    "start: fitness type callable with metric 'value' has no scores per "
                    "example.")


def test_a_start_chosen_on_the_guard_needs_no_test() -> None:
    chosen, start = _rows(gained=0, lost=5)
    run, jobs = _run(chosen, start)
    run._guard_test()
    assert jobs == [] and run.guard_best()["label"] == "input b"


def test_guard_level_needs_a_guard() -> None:
    with pytest.raises(RecipeError, match="guard_level: the level of the test"):
        parse_fitness({"type": "torch", "arch": "x:y", "select": "s.npz",
                       "guard_level": 0.9}, "recipe.yaml")


def _accuracy_recipe(root: Path, generations: int = 3) -> Path:
    np.savez(root / "guard.npz", **dict(np.load(root / "report.npz")))
    data = recipe_dict(root, n=4, generations=generations)
    # cade: its soups are uniform averages, which the test below can redo by hand
    data.update({"merge_method": "cade", "parameters": {
        "generations": generations, "F": 0.5, "CR": 0.5, "jitter": False}})
    del data["merge"]
    data["fitness"].update({"guard": "guard.npz", "metric": "accuracy"})
    return write_recipe(root, data)


def test_a_real_run_tests_its_choice_on_the_guard_examples(tmp_path: Path) -> None:
    """The committed test equals an independent bootstrap of the two candidates' scores per
    guard example, computed by the evaluator from the files."""
    root = build_population(tmp_path / "pop", n=4)
    recipe = _accuracy_recipe(root)
    out = tmp_path / "out"
    summary = evolve(recipe, out, trust_code=True)
    state = json.loads((tmp_path / "out.run" / "state.json").read_text())
    guard = state["guard"]
    test = guard["test"]
    start = guard["candidates"][test["start"]]
    assert start["guard"] == max(c["guard"] for c in guard["candidates"][:5])
    assert test["tested"]  # the search's best on the guard is not a start
    chosen = next(c for c in [*guard["candidates"], *guard["final"]]
                  if c["label"] == test["label"])
    ev = build_evaluator(parse_fitness(yaml.safe_load(recipe.read_text())["fitness"],
                                       "test"), root)
    members = tmp_path / "out.run" / "members"

    def rows(c: dict[str, Any]) -> torch.Tensor:
        states = [load_file(str(members / f)) for f in c["files"]]
        average = {k: torch.stack([m[k] for m in states]).mean(0) for k in states[0]}
        assert float(ev.example_scores(average, GUARD).mean()) == pytest.approx(c["guard"])
        return ev.example_scores(average, GUARD)

    ref = paired_bootstrap(rows(chosen), rows(start), seed=0, level=0.9)
    assert (test["gain"], test["low"], test["high"]) == pytest.approx(
        (ref.delta, ref.low, ref.high))
    assert test["passed"] == (ref.low > 0)
    expected = chosen if test["passed"] else start
    assert summary.scores[-1].label.endswith(expected["label"])


def test_sigkill_then_resume_with_the_test_matches(tmp_path: Path) -> None:
    root = build_population(tmp_path / "pop", n=4)
    recipe = _accuracy_recipe(root)
    evolve(recipe, root / "ref", trust_code=True)
    ref_state = json.loads((root / "ref.run" / "state.json").read_text())
    assert ref_state["guard"]["test"]["tested"]  # the rule is at work in this run
    out, state = root / "out", root / "out.run" / "state.json"
    _kill_when(_start(recipe, out, sleep="0.02"), state, generation=1, step=2)
    assert json.loads(state.read_text())["phase"] == "evolve"
    _resume_matches(recipe, out, root / "ref")
    assert json.loads(state.read_text())["guard"]["test"] == ref_state["guard"]["test"]


# ----------------------------------------------------------------------------- coefficient search


def _coef_test(chosen: torch.Tensor, start: torch.Tensor, type_: str = "torch",
               state: dict[str, Any] | None = None
               ) -> tuple[dict[str, Any], str | None, list[Any], dict[str, Any]]:
    """The coefficient search's guard test on a log whose point 2 is the best on the guard
    (scores per guard example `chosen`) and point 0 the recipe's own (`start`)."""
    from mergekit_pcb.evolve.coefsearch.jobs import Outcome
    from mergekit_pcb.evolve.coefsearch.run import _guard_test

    asked: list[Any] = []
    rows = {(0.5,): chosen, None: start}

    class Ex:
        def map(self, fn: Any, items: list[Any]) -> list[Outcome]:
            asked.extend(job for _, job in items)
            return [Outcome(float(rows[j.x].mean()), examples=rows[j.x].tolist())
                    for _, j in items]

    spec = parse_fitness({"type": type_, "select": "s.npz", "guard": "g.npz",
                          **({"arch": "x:y", "metric": "accuracy"} if type_ == "torch"
                             else {"function": "x:y"})}, "test")
    evals = [{"n": 0, "phase": "default", "x": [1.0]}, {"n": 1, "phase": "grid", "x": [0.7]},
             {"n": 2, "phase": "search", "x": [0.5]}]
    st = state if state is not None else {}
    best, note = _guard_test(st, evals, evals[2], None, Ex(), spec, 3)  # type: ignore[arg-type]
    return best, note, asked, st


def test_the_coefficient_search_keeps_its_own_point_on_a_noisy_guard_gain() -> None:
    chosen, start = _rows(gained=5, lost=2)
    best, note, asked, st = _coef_test(chosen, start)
    assert [(j.x, j.split, j.examples) for j in asked] == [((0.5,), GUARD, True),
                                                            (None, GUARD, True)]
    ref = paired_bootstrap(chosen, start, seed=3, level=0.90)
    test = st["guard_test"]
    assert (test["gain"], test["low"], test["high"]) == pytest.approx((0.015, ref.low,
                                                                       ref.high))
    assert not test["passed"] and best["phase"] == "default"
    assert note is not None and note.startswith(
        "The search did not beat its start on the guard by the paired test: the result is "
        "the recipe's own point (evaluation 2, the best on the guard, gained +0.0150")
    # a resume reads the committed test: nothing is scored again
    again, note2, asked2, _ = _coef_test(chosen, start, state=st)
    assert asked2 == [] and again["phase"] == "default" and note2 == note


def test_the_coefficient_search_takes_a_clear_guard_gain() -> None:
    chosen, start = _rows(gained=20, lost=2)
    best, note, _, st = _coef_test(chosen, start)
    assert st["guard_test"]["passed"] and best["n"] == 2
    assert note is not None and note.startswith("Evaluation 2 beat the recipe's own point "
                                                "+0.0900 on the guard")


def test_the_coefficient_search_without_scores_per_example_keeps_the_best_on_the_guard(
        ) -> None:
    chosen, start = _rows(gained=5, lost=2)
    best, note, asked, st = _coef_test(chosen, start, type_="callable")
    assert asked == [] and st == {} and best["n"] == 2
    assert note is not None and "not tested against the recipe's own point" in note


def test_a_real_coefficient_search_tests_its_guard_choice(tmp_path: Path) -> None:
    """A torch fitness (scores per example) on the coefficient search: the committed test's
    mean gain is the guard accuracy of the point best on the guard minus the recipe's own
    point's, and the result is the one the test picks."""
    from test_coefsearch import build_population as coef_population
    from test_coefsearch import recipe_dict as coef_recipe
    from test_coefsearch import search
    from test_coefsearch import write_recipe as coef_write

    root = coef_population(tmp_path / "pop")
    np.savez(root / "guard.npz", **dict(np.load(root / "report.npz")))
    data = coef_recipe(root, budget=12, optimizer="RandomSearch")
    data["fitness"] = {"type": "torch", "arch": "coefnet:build", "select": "select.npz",
                       "report": "report.npz", "guard": "guard.npz", "metric": "accuracy"}
    summary = search(coef_write(root, data), tmp_path / "out")
    state = json.loads((tmp_path / "out.run" / "state.json").read_text())
    guards = state["guard"]
    best = max(guards, key=lambda g: (g["guard"], g["select"]))
    assert best["n"] != 0  # the search found a point better on the guard than its own
    test = state["guard_test"]
    assert test["n"] == best["n"]
    assert test["gain"] == pytest.approx(best["guard"] - guards[0]["guard"])
    assert (test["low"] > 0) == test["passed"]
    assert summary["best"]["n"] == (best["n"] if test["passed"] else 0)
    assert summary["notes"][-1].startswith(
        f"Evaluation {best['n']} beat" if test["passed"] else "The search did not beat")
