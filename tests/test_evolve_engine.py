"""The evolution engine on a tiny MLP population: selection rules, determinism (1 and 2
workers), resume after a crash or SIGKILL, CLI outputs and bad input."""

from __future__ import annotations

import itertools
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
from matplotlib.figure import Figure
from safetensors.torch import load_file
from tiny_mlp import write_mlp_population
from typer.testing import CliRunner

from mergekit_pcb.evolve.config import parse_fitness
from mergekit_pcb.evolve.fitness import build_evaluator
from mergekit_pcb.evolve.operators import interpolate
from mergekit_pcb.evolve.run import evolve
from mergekit_pcb.methods.ties import ties_merge

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
    """Mean cross-entropy; env hooks make it slow or make the N-th call crash."""
    time.sleep(float(os.environ.get("EVOLVE_TEST_SLEEP", "0")))
    counter = os.environ.get("EVOLVE_TEST_CRASH_FILE")
    if counter:
        left = int(open(counter).read()) - 1
        open(counter, "w").write(str(left))
        if left == 0:
            raise RuntimeError("crash requested by the test")
    z = np.load(data)
    x, y = torch.from_numpy(z["inputs"]), torch.from_numpy(z["labels"]).long()
    with torch.no_grad():
        out = torch.func.functional_call(_NET, dict(state), (x,))
    return float(torch.nn.functional.cross_entropy(out, y))
'''


def build_population(root: Path, n: int = 4) -> Path:
    """`n` perturbed copies of a base MLP, a 3-class task, select/report splits."""
    return write_mlp_population(root, n, "tinynet", NET_MODULE)


def recipe_dict(root: Path, *, n: int = 3, fitness: str = "torch",
                **params: Any) -> dict[str, Any]:
    fit: dict[str, Any]
    if fitness == "torch":
        fit = {"type": "torch", "arch": "tinynet:build", "select": "select.npz",
               "report": "report.npz", "metric": "loss", "batch_size": 50}
    else:
        fit = {"type": "callable", "function": "tinynet:loss", "select": "select.npz",
               "report": "report.npz", "minimize": True}
    return {
        "merge_method": "evolver",
        "base_model": str(root / "base"),
        "models": [{"model": str(root / f"m{i}")} for i in range(n)],
        "parameters": {"generations": 3, "F": 0.5, "CR": 0.5, "mode": "merged", **params},
        "merge": {"merge_method": "ties", "parameters": {"density": 0.5}},
        "fitness": fit,
        "seed": 0,
    }


def write_recipe(root: Path, data: dict[str, Any], name: str = "recipe.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture
def pop_dir(tmp_path: Path) -> Path:
    return build_population(tmp_path / "pop")


def tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model.safetensors"))


def same_tensors(a: Path, b: Path) -> bool:
    ta, tb = tensors(a), tensors(b)
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def search_record(out: Path) -> dict[str, Any]:
    """evolution.json without what legitimately differs between runs (times, workers)."""
    doc = json.loads((out / "evolution.json").read_text())
    for h in doc["history"]:
        h.pop("wall_s"), h.pop("fitness_s")
    doc.pop("totals"), doc.pop("workers")
    return doc


# ----------------------------------------------------------------------------- selection


def test_merged_mode_keeps_only_improving_trials(pop_dir: Path) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=4))
    out = pop_dir / "out"
    summary = evolve(recipe, out, trust_code=True)
    doc = json.loads((out / "evolution.json").read_text())
    objective = [h["objective"] for h in doc["history"]]
    assert all(b <= a for a, b in itertools.pairwise(objective))  # loss
    assert objective[-1] < objective[0], "nothing was accepted in 4 generations"
    assert doc["history"][0]["objective"] == doc["initial"]["merge_select"]
    # The output is the inner merge (ties) of the final population, recomputed here.
    run = summary.run_dir
    members = [load_file(str(run / "members" / m)) for m in doc["final"]["members"]]
    base = load_file(str(pop_dir / "base" / "model.safetensors"))
    result = tensors(out)
    for name, b in base.items():
        expected = ties_merge(b, [m[name] for m in members], [1.0] * 3, [0.5] * 3)
        torch.testing.assert_close(result[name], expected, rtol=0, atol=0)
    # The result's select score (measured on the written file) is the final objective.
    rows = {r["label"]: r for r in doc["scores"]}
    assert rows["result (evolver, merged)"]["select"] == objective[-1]
    assert rows["plain merge (ties)"]["select"] == objective[0]
    assert all(r["report"] is not None for r in doc["scores"])
    accepted = sum(h["accepted"] for h in doc["history"][1:])
    assert len([m for m in doc["final"]["members"] if m.startswith("g")]) <= accepted


def test_standalone_mode_keeps_trials_that_beat_their_parent(pop_dir: Path) -> None:
    data = recipe_dict(pop_dir, n=4, mode="standalone", generations=3)
    recipe = write_recipe(pop_dir, data)
    out = pop_dir / "out"
    summary = evolve(recipe, out, trust_code=True)
    doc = json.loads((out / "evolution.json").read_text())
    initial, final = doc["initial"]["select"], doc["final"]["fitness"]
    assert all(f <= i for f, i in zip(final, initial, strict=True))
    assert sum(final) < sum(initial)  # some trials were kept, each better than its parent
    best = min(range(4), key=lambda i: final[i])
    best_file = summary.run_dir / "members" / doc["final"]["members"][best]
    expected = load_file(str(best_file))
    assert all(torch.equal(expected[k], v) for k, v in tensors(out).items())
    # the cached fitness is the fitness of the member file
    evaluator = build_evaluator(parse_fitness(data["fitness"], "test"), pop_dir)
    assert evaluator.score(expected, "select") == final[best]


def test_larger_population_is_filled_with_seeded_interpolations(pop_dir: Path) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, pop=5, generations=0))
    summary = evolve(recipe, pop_dir / "out", seed=11, trust_code=True)
    members = summary.run_dir / "members"
    rng = random.Random(11)
    for k in (3, 4):
        a, b = rng.sample(range(3), 2)
        alpha = rng.random()
        ta = load_file(str(members / f"init-{a:03d}.safetensors"))
        tb = load_file(str(members / f"init-{b:03d}.safetensors"))
        tk = load_file(str(members / f"init-{k:03d}.safetensors"))
        for name in ta:
            assert torch.equal(tk[name], interpolate(ta[name], tb[name], alpha))
    doc = json.loads((pop_dir / "out" / "evolution.json").read_text())
    assert len(doc["final"]["members"]) == 5 and doc["history"][0]["generation"] == 0


@pytest.mark.parametrize("generations", [0, 4])
def test_a_result_no_better_than_the_plain_merge_is_said_and_drawn(
        pop_dir: Path, generations: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a guard, a result that does not beat the plain merge on select gets one
    closing note; fitness.png always draws the plain merge's select score."""
    drawn: list[Figure] = []
    save = Figure.savefig

    def keep(fig: Figure, *args: Any, **kwargs: Any) -> None:
        drawn.append(fig)  # the figure as it is written, read back below
        save(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=generations))
    out = pop_dir / "out"
    summary = evolve(recipe, out, trust_code=True)
    plain = json.loads((out / "evolution.json").read_text())["initial"]["merge_select"]
    result = summary.scores[-1].select
    assert summary.scores[-2].select == plain
    said = [n for n in summary.notes if "did not beat the plain merge" in n]
    if generations == 0:  # merged mode, no generation: the result is the plain merge
        assert result == plain
        assert said == [f"The search did not beat the plain merge of its inputs on select: "
                         f"the result scores {result:.4f}, 'plain merge (ties)' {plain:.4f}."]
    else:  # the loss went down: nothing to say
        assert result < plain and said == []
    [fig] = drawn
    lines = {line.get_label(): line for line in fig.axes[0].get_lines()}
    assert list(lines["plain merge (ties)"].get_ydata()) == [plain, plain]
    assert (out / "fitness.png").stat().st_size > 0


def test_rand_1_with_a_minimized_callable(pop_dir: Path) -> None:
    data = recipe_dict(pop_dir, n=4, fitness="callable", mutation="rand-1",
                       mode="standalone", generations=2)
    out = pop_dir / "out"
    evolve(write_recipe(pop_dir, data), out, trust_code=True)
    doc = json.loads((out / "evolution.json").read_text())
    assert doc["maximize"] is False and doc["mutation"] == "rand-1"
    best = [h["best"] for h in doc["history"]]
    assert all(b <= a for a, b in itertools.pairwise(best))


# ----------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("mode", ["merged", "standalone"])
def test_same_seed_same_result_with_one_and_two_workers(pop_dir: Path, mode: str) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, n=4, mode=mode, generations=3))
    a, b, c, d = (pop_dir / x for x in ("a", "b", "c", "d"))
    evolve(recipe, a, trust_code=True)
    evolve(recipe, b, trust_code=True)
    evolve(recipe, c, workers=2, trust_code=True)
    evolve(recipe, d, seed=1, trust_code=True)
    assert same_tensors(a, b) and search_record(a) == search_record(b)
    assert same_tensors(a, c) and search_record(a) == search_record(c)
    assert not same_tensors(a, d)  # the seed matters, so the equalities above mean something
    totals = json.loads((c / "evolution.json").read_text())["totals"]
    assert totals["evaluations"] == json.loads((a / "evolution.json").read_text())[
        "totals"]["evaluations"]


@pytest.mark.parametrize("inner", [
    {"merge_method": "ties", "parameters": {"density": 0.5, "scope": "global"}},
    {"merge_method": "pcb", "parameters": {"lambda": 1.25}},
    {"merge_method": "dare_ties", "parameters": {"density": 0.5}},
], ids=["ties-global", "pcb", "dare_ties"])
def test_the_next_candidate_prepared_on_a_spare_core_changes_nothing(
        pop_dir: Path, monkeypatch: pytest.MonkeyPatch, inner: dict[str, Any]) -> None:
    """With a core to spare, a merged-mode job builds and merges the next candidate (the
    generation's next, or the next generation's first) while its fitness runs, on the
    population it guesses its trial leaves (and on the other when the guess was wrong and
    the trial is kept). The run is the run without a spare core, bit for bit, and the
    prepared candidates were used."""
    from mergekit_pcb.evolve import engine as engine_module
    from mergekit_pcb.evolve import executor, jobs
    from mergekit_pcb.evolve.jobs import run_trial

    data = recipe_dict(pop_dir, n=4, generations=3)
    data["merge"] = inner
    recipe = write_recipe(pop_dir, data)
    taken: list[bool] = []
    order: list[tuple[int, int]] = []
    accepted: list[bool] = []
    guesses: dict[tuple[int, int], list[bool]] = {}
    crossing: set[tuple[int, int]] = set()
    take, prepare, trial = jobs.Runtime.take_prepared, jobs.Runtime.prepare_next, run_trial

    def counting_take(self: jobs.Runtime, job: jobs.TrialJob) -> jobs.Prepared | None:
        ready = take(self, job)
        taken.append(ready is not None)
        order.append((job.generation, job.step))
        return ready

    def counting_prepare(self: jobs.Runtime, job: jobs.TrialJob, *args: Any,
                         kept: bool) -> None:
        if job.next_step is not None:
            guesses.setdefault((job.generation, job.step), []).append(kept)
            if job.next_step.generation > job.generation:
                crossing.add((job.generation, job.step))
        prepare(self, job, *args, kept=kept)

    def recording_trial(item: tuple[jobs.WorkContext, jobs.TrialJob]) -> jobs.JobResult:
        result = trial(item)
        accepted.append(result.accepted)
        return result

    monkeypatch.setattr(jobs.Runtime, "take_prepared", counting_take)
    monkeypatch.setattr(jobs.Runtime, "prepare_next", counting_prepare)
    monkeypatch.setattr(engine_module, "run_trial", recording_trial)
    monkeypatch.setattr(executor, "usable_cores", lambda: 4)
    ahead, alone = pop_dir / "ahead", pop_dir / "alone"
    evolve(recipe, ahead, trust_code=True)
    # The first step was prepared while the initial population's merge was scored; every
    # other by the step before, across a generation's end too, and used unless that step
    # guessed its trial kept and it was not (a kept trial the guess missed is prepared for
    # again while it is scored).
    assert crossing == {(0, 3), (1, 3)}  # pop 4, 3 generations
    assert taken[0] and len(taken) == len(accepted) == 12
    for k in range(1, len(taken)):
        guess = guesses[order[k - 1]][0]
        assert taken[k] == (accepted[k - 1] or not guess), (order[k], guess)
    assert [False, True] in guesses.values()  # a wrong guess, then the kept population
    taken.clear()
    monkeypatch.setattr(executor, "usable_cores", lambda: 1)
    evolve(recipe, alone, trust_code=True)
    assert not any(taken)
    assert same_tensors(ahead, alone) and search_record(ahead) == search_record(alone)


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("crash_at", [2, 7, 13])
def test_resume_after_a_crash_matches_an_uninterrupted_run(
        pop_dir: Path, crash_at: int, monkeypatch: pytest.MonkeyPatch) -> None:
    data = recipe_dict(pop_dir, n=3, fitness="callable", generations=3)
    recipe = write_recipe(pop_dir, data)
    evolve(recipe, pop_dir / "ref", trust_code=True)
    counter = pop_dir / "counter"
    counter.write_text(str(crash_at))
    monkeypatch.setenv("EVOLVE_TEST_CRASH_FILE", str(counter))
    with pytest.raises(RuntimeError, match="crash requested"):
        evolve(recipe, pop_dir / "out", trust_code=True)
    assert not (pop_dir / "out").exists()
    monkeypatch.delenv("EVOLVE_TEST_CRASH_FILE")
    evolve(recipe, pop_dir / "out", resume=True, trust_code=True)
    assert same_tensors(pop_dir / "ref", pop_dir / "out")
    assert search_record(pop_dir / "ref") == search_record(pop_dir / "out")
    # nothing but the state's members is left in the population store
    state = json.loads((pop_dir / "out.run" / "state.json").read_text())
    on_disk = {p.name for p in (pop_dir / "out.run" / "members").iterdir()}
    assert on_disk == set(state["members"]) | set(state["initial"]["members"])


def _start(recipe: Path, out: Path, *extra: str, sleep: str = "0") -> subprocess.Popen[str]:
    env = {**os.environ, "EVOLVE_TEST_SLEEP": sleep}
    return subprocess.Popen(
        [sys.executable, "-m", "mergekit_pcb", "evolve", str(recipe), "-o", str(out),
         "--quiet", "--trust-code", *extra],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _resume_matches(recipe: Path, out: Path, ref: Path, *extra: str) -> None:
    """`evolve --resume` of a killed run finishes with the uninterrupted run's output and
    record, bit for bit."""
    proc = _start(recipe, out, "--resume", *extra)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert same_tensors(ref, out)
    assert search_record(ref) == search_record(out)


def _kill_when(proc: subprocess.Popen[str], state: Path, generation: int, step: int) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            st = json.loads(state.read_text())
        except (OSError, ValueError):
            st = None
        if st and (st["generation"], st["step"]) >= (generation, step):
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("the run never reached the kill point")


@pytest.mark.parametrize(("workers", "inner"), [("1", "ties"), ("2", "ties"), ("1", "pcb")])
def test_sigkill_mid_generation_then_resume_matches(pop_dir: Path, workers: str,
                                                    inner: str) -> None:
    data = recipe_dict(pop_dir, n=4, fitness="callable", generations=3)
    if inner == "pcb":  # whole-model statistics passes inside every evaluation
        data["merge"] = {"merge_method": "pcb", "parameters": {"lambda": 1.25}}
    recipe = write_recipe(pop_dir, data)
    evolve(recipe, pop_dir / "ref", trust_code=True)
    out, state = pop_dir / "out", pop_dir / "out.run" / "state.json"
    par = ("--workers", workers)
    # Killed twice, in the middle of generations 2 and 3 (steps are slow: 50 ms fitness);
    # by then kept trials are written over spares in place.
    _kill_when(_start(recipe, out, *par, sleep="0.05"), state, generation=1, step=1)
    first = json.loads(state.read_text())
    assert first["phase"] == "evolve" and 0 < first["step"] < 4
    _kill_when(_start(recipe, out, "--resume", *par, sleep="0.05"), state, generation=2,
               step=2)
    _resume_matches(recipe, out, pop_dir / "ref", *par)


# ----------------------------------------------------------------------------- CLI


def cli(*args: str | Path, cwd: Path | None = None) -> Any:
    from mergekit_pcb.cli import app  # the real `pcbmerge` app, evolve and eval wired in

    old = Path.cwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        # the tests' fitness code is their own: consent is given (refusal is tested apart)
        trust = ["--trust-code"] if args and args[0] in ("evolve", "run", "eval") \
            and not any(str(a).endswith("merge.yaml") for a in args) else []
        return CliRunner().invoke(app, [*map(str, args), *trust])
    finally:
        os.chdir(old)


def test_cli_evolve_and_eval(pop_dir: Path) -> None:
    write_recipe(pop_dir, recipe_dict(pop_dir, generations=2))
    # RECIPE left out: ./recipe.yaml; flags override the recipe
    res = cli("evolve", "--pop", "4", "--generations", "3", "-o", "evolved", cwd=pop_dir)
    assert res.exit_code == 0, res.output
    out = pop_dir / "evolved"
    for name in ("model.safetensors", "evolution.json", "README.md", "fitness.png",
                 "merge_recipe.yaml"):
        assert (out / name).is_file(), name
    assert (out / "fitness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "evolution.json").read_text())
    assert doc["pop"] == 4 and doc["generations"] == 3
    assert [h["generation"] for h in doc["history"]] == [0, 1, 2, 3]
    for h in doc["history"][1:]:
        assert h["evaluated"] == 4 and 0 <= h["acceptance_rate"] <= 1
        assert h["F"] == 0.5 and h["CR"] == 0.5 and h["wall_s"] >= 0
    assert "report loss" in res.output and "plain merge (ties)" in res.output
    # eval scores a checkpoint with the same code: an input member's select score
    res = cli("eval", pop_dir / "m0", "--fitness", pop_dir / "recipe.yaml", "--json")
    assert res.exit_code == 0, res.output
    scores = json.loads(res.output)
    assert scores["select"] == doc["initial"]["select"][0]
    assert scores["report"] == doc["scores"][0]["report"]
    # an existing output is never replaced without --force
    res = cli("evolve", "-o", "evolved", cwd=pop_dir)
    assert res.exit_code == 2 and "already exists; pass --force" in res.output


def _one_error_line(res: Any) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_bad_input_unknown_recipe_key(pop_dir: Path) -> None:
    data = recipe_dict(pop_dir)
    data["parameters"]["popsize"] = 8
    recipe = write_recipe(pop_dir, data)
    line = _one_error_line(cli("evolve", recipe, "-o", pop_dir / "o"))
    assert f"{recipe}: unknown key 'parameters.popsize'" in line


def test_bad_input_unknown_inner_merge_parameter(pop_dir: Path) -> None:
    data = recipe_dict(pop_dir)
    data["merge"]["parameters"]["densty"] = 0.5
    line = _one_error_line(cli("evolve", write_recipe(pop_dir, data), "-o", pop_dir / "o"))
    assert "merge.parameters.densty: unknown parameter for ties" in line


def test_bad_input_missing_fitness_data(pop_dir: Path) -> None:
    data = recipe_dict(pop_dir)
    data["fitness"]["select"] = "no-such.npz"
    line = _one_error_line(cli("evolve", write_recipe(pop_dir, data), "-o", pop_dir / "o"))
    assert "fitness.select: data file not found: no-such.npz" in line
    assert not (pop_dir / "o").exists()


def test_bad_input_resume_without_state(pop_dir: Path) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir))
    line = _one_error_line(cli("evolve", recipe, "-o", pop_dir / "o", "--resume"))
    assert "--resume: no run state in" in line


def test_bad_input_no_recipe_in_working_directory(tmp_path: Path) -> None:
    line = _one_error_line(cli("evolve", cwd=tmp_path))
    assert "recipe not found: recipe.yaml" in line


def test_bad_input_resume_with_other_settings(pop_dir: Path) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=1))
    assert cli("evolve", recipe, "-o", pop_dir / "o", "-q").exit_code == 0
    line = _one_error_line(cli("evolve", recipe, "-o", pop_dir / "o2", "--run-dir",
                               pop_dir / "o.run", "--resume", "--seed", "4"))
    assert "--resume: 'seed' differs" in line


def test_run_accepts_evolution_recipes(pop_dir: Path) -> None:
    """`pcbmerge run` hands an evolution recipe to the evolution engine: same result as
    `pcbmerge evolve` with the recipe's own values."""
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=2))
    res = cli("run", recipe, "-o", pop_dir / "via-run", "--quiet")
    assert res.exit_code == 0, res.output
    res = cli("evolve", recipe, "-o", pop_dir / "via-evolve", "--quiet")
    assert res.exit_code == 0, res.output
    ran = load_file(pop_dir / "via-run" / "model.safetensors")
    evolved = load_file(pop_dir / "via-evolve" / "model.safetensors")
    assert ran.keys() == evolved.keys()
    for name in ran:
        assert torch.equal(ran[name], evolved[name]), name
    history = json.loads((pop_dir / "via-run" / "evolution.json").read_text())["history"]
    assert [h["generation"] for h in history] == [0, 1, 2]
    # run takes the evolution flags too: two workers give the same bits
    res = cli("run", recipe, "-o", pop_dir / "two", "--quiet", "--workers", "2")
    assert res.exit_code == 0, res.output
    two = load_file(pop_dir / "two" / "model.safetensors")
    assert all(torch.equal(two[name], evolved[name]) for name in evolved)
    assert json.loads((pop_dir / "two" / "evolution.json").read_text())["workers"] == 2
    # --resume on a finished run with more generations asked for in the recipe goes on
    write_recipe(pop_dir, recipe_dict(pop_dir, generations=3))
    res = cli("run", recipe, "-o", pop_dir / "via-run", "--quiet", "--resume", "--force")
    assert res.exit_code == 0, res.output
    history = json.loads((pop_dir / "via-run" / "evolution.json").read_text())["history"]
    assert [h["generation"] for h in history] == [0, 1, 2, 3]


def test_dry_run_of_a_search_prints_the_plan_and_writes_nothing(pop_dir: Path) -> None:
    data = recipe_dict(pop_dir, n=3, generations=5, pop=6)
    data["merge"] = {"merge_method": "pcb", "parameters": {"lambda": 1.25}}
    recipe = write_recipe(pop_dir, data)
    before = sorted(p.name for p in pop_dir.iterdir())
    res = cli("run", recipe, "-o", pop_dir / "x", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    plan = json.loads(res.output)
    assert sorted(p.name for p in pop_dir.iterdir()) == before  # no output, no run dir
    assert plan["kind"] == "search" and plan["method"] == "evolver" and plan["dry_run"]
    assert plan["population"]["size"] == 6 and plan["population"]["filled"] == 3
    assert plan["inner_merge"]["method"] == "pcb" and plan["generations"] == 5
    assert plan["fitness"] == {"type": "torch", "metric": "loss", "maximize": False,
                               "select": "select.npz", "report": "report.npz"}
    # 6 members + the plain merge + the merge of the filled population; 6 trials per
    # generation, each scored merged and, when kept, alone; result + 3 inputs + 2 merges
    assert plan["evaluations"] == {"initial": 8, "per_generation_at_most": 12, "final": 6,
                                   "total_at_most": 8 + 12 * 5 + 6}
    # a global PCB merge of 6 members reads base + members in 5 passes
    member_bytes = plan["population"]["member_bytes"]
    assert member_bytes == (6 * 12 + 12 + 12 * 3 + 3) * 4  # the MLP's float32 parameters
    assert plan["per_evaluation"] == {"what": "pcb merge of the 6 members", "passes": 5,
                                      "read_bytes": 5 * 7 * member_bytes}
    # the same plan for a person, and from `validate`
    res = cli("run", recipe, "-o", pop_dir / "x", "--dry-run")
    assert res.exit_code == 0 and "dry run: nothing written" in res.output
    assert "reads" in res.output and "5 pass(es)" in res.output
    res = cli("validate", recipe, "--json")
    assert res.exit_code == 0 and json.loads(res.output)["evaluations"] == plan["evaluations"]
    assert not (pop_dir / "x").exists() and not (pop_dir / "x.run").exists()


def test_search_flags_are_refused_where_they_do_not_apply(pop_dir: Path) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir))
    line = _one_error_line(cli("run", recipe, "-o", pop_dir / "x", "--allow-crimes"))
    assert "--allow-crimes: a mergekit-yaml flag, used by merge recipes only" in line
    assert not (pop_dir / "x").exists()
    merge = write_recipe(pop_dir, {"merge_method": "linear", "models": [
        {"model": str(pop_dir / "m0")}, {"model": str(pop_dir / "m1")}]}, "merge.yaml")
    line = _one_error_line(cli("evolve", merge, "-o", pop_dir / "x"))
    assert "is a merge, not a search" in line


def test_methods_lists_every_kind() -> None:
    from mergekit_pcb.evolve.strategies import STRATEGIES
    from mergekit_pcb.methods import REGISTRY

    res = cli("methods", "--json")
    assert res.exit_code == 0, res.output
    listed = json.loads(res.output)
    assert set(listed) == set(REGISTRY) | set(STRATEGIES) | {"coefficient-search",
                                                              "osr-reprogram"}
    assert listed["evolver"]["kind"] == "search" and listed["ties"]["kind"] == "merge"
    evolver = {p["name"]: p for p in listed["evolver"]["parameters"]}
    assert evolver["generations"]["default"] == 15 and evolver["F"]["default"] == 0.5
    assert evolver["mode"]["choices"] == ["merged", "standalone"]


def test_run_refuses_evolution_flags_for_a_merge_recipe(pop_dir: Path) -> None:
    recipe = write_recipe(pop_dir, {"merge_method": "linear", "models": [
        {"model": str(pop_dir / "m0")}, {"model": str(pop_dir / "m1")}]}, "merge.yaml")
    res = cli("run", recipe, "-o", pop_dir / "out", "--workers", "2")
    assert res.exit_code == 2
    assert "--workers: not used by merge recipes" in res.output and "linear merge" in res.output
    assert not (pop_dir / "out").exists()
