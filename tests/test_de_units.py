"""The pieces of `de-ancestor` and `cade` that are pure functions: the cosine schedule, the
SaDE-style CR memory, rand/1 donors, the fine crossover, ancestors' natural order, recipe
checks and the `pcbmerge methods` listing."""

from __future__ import annotations

import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.evolve.config import expand_ancestors, natural_key, parse_evolution_recipe
from mergekit_pcb.evolve.fitness import batch_indices
from mergekit_pcb.evolve.schedule import Cosine, make_schedule
from mergekit_pcb.evolve.strategies import STRATEGIES
from mergekit_pcb.evolve.strategies.cade import CADE, CADEParameters
from mergekit_pcb.evolve.strategies.de import fine_binomial_crossover
from mergekit_pcb.evolve.strategies.de_ancestor import DEAncestor, DEAncestorParameters

# ----------------------------------------------------------------------------- schedules


def test_cosine_schedule_hand_values() -> None:
    s = make_schedule({"schedule": "cosine", "max": 1e-5, "min": 1e-6, "period": 40},
                      "parameters.F")
    assert isinstance(s, Cosine)
    # t = 0: max; t = T/2: cos(π/2) = 0, so the midpoint; t = T: cos(π) = -1, so min
    assert s.value(0, 99) == pytest.approx(1e-5, rel=1e-12)
    assert s.value(20, 99) == pytest.approx(5.5e-6, rel=1e-12)
    assert s.value(40, 99) == pytest.approx(1e-6, rel=1e-12)
    # t = T/4: ½(1 + cos(π/4)) = 0.853553...
    assert s.value(10, 99) == pytest.approx(1e-6 + 9e-6 * 0.5 * (1 + math.sqrt(0.5)))
    assert s.value(80, 99) == pytest.approx(1e-5)  # the cosine goes on past T (period 2T)
    # no period: T is the run's number of generations
    s = make_schedule({"schedule": "cosine", "max": 0.8, "min": 0.2}, "parameters.CR",
                      high=1.0)
    assert (s.value(0, 10), s.value(5, 10), s.value(10, 10)) == pytest.approx((0.8, 0.5, 0.2))


@pytest.mark.parametrize(("setting", "message"), [
    ({"schedule": "cosine", "max": 1.0}, r"parameters.CR.min: required"),
    ({"schedule": "cosine", "max": 0.1, "min": 0.2}, r"0 <= min <= max"),
    ({"schedule": "cosine", "max": 2.0, "min": 0.2}, r"parameters.CR.max: must be at most"),
    ({"schedule": "cosine", "max": 0.5, "min": 0.1, "period": 0}, r"period: must be a positive"),
    ({"schedule": "cosine", "max": 0.5, "min": 0.1, "T": 4}, r"parameters.CR.T: unknown key"),
])
def test_cosine_schedule_refuses_bad_settings(setting: dict[str, Any], message: str) -> None:
    with pytest.raises(RecipeError, match=message):
        make_schedule(setting, "parameters.CR", high=1.0)


def test_cade_defaults_are_the_reference_setting_and_jitter_is_seeded() -> None:
    cade = CADE(CADEParameters())
    assert cade.params.generations == 99
    assert cade.F == cade.CR == Cosine(1e-5, 1e-6, 40)
    plan0 = cade.draw_generation(random.Random(0), 0, 99, 6)
    assert plan0["F"] == plan0["CR"] == pytest.approx(1e-5)  # no jitter in the first
    plans = [cade.draw_generation(random.Random(s), 20, 99, 6) for s in (1, 1, 2)]
    assert plans[0] == plans[1] and plans[0] != plans[2]
    for p in plans:  # cosine midpoint + U(min, max), capped at max
        assert 5.5e-6 + 1e-6 <= p["F"] <= 1e-5
        assert 5.5e-6 + 1e-6 <= p["CR"] <= 1e-5
    # the cap binds where the jitter would pass max: U(1e-6, 1e-5) > 4.5e-6 in most draws
    draws = [cade.draw_generation(random.Random(s), 20, 99, 6)["F"] for s in range(20)]
    assert max(draws) == 1e-5 and min(draws) < 1e-5
    plain = CADE(CADEParameters(jitter=False)).draw_generation(random.Random(1), 20, 99, 6)
    assert plain["F"] == pytest.approx(5.5e-6) and plain["order"] == list(range(6))
    with pytest.raises(RecipeError, match=r"parameters.jitter: .* parameters.F is not a cosine"):
        CADE(CADEParameters(F=0.5))


# ----------------------------------------------------------------------------- SaDE memory


def test_sade_memory_update_after_a_generation_with_known_successes() -> None:
    de = DEAncestor(DEAncestorParameters(adaptation="sade", CR=0.1, memory=3))
    state = de.initial_state()
    assert state == {"memory": [0.1, 0.1, 0.1], "next": 0}
    plan = {"CRs": [0.1, 0.2, 0.05, 0.3]}
    outcomes = [  # losses: steps 0 and 3 kept, gains 0.3 and 0.1
        {"accepted": True, "parent": 1.0, "trial": 0.7},
        {"accepted": False, "parent": 1.0, "trial": 1.2},
        {"accepted": False, "parent": 0.9, "trial": 0.9},
        {"accepted": True, "parent": 0.8, "trial": 0.7},
    ]
    new = de.end_generation(state, plan, outcomes)
    # weights 0.75 and 0.25: (0.75·0.1² + 0.25·0.3²) / (0.75·0.1 + 0.25·0.3) = 0.03 / 0.15
    assert new["memory"][0] == pytest.approx(0.2)
    assert new["memory"][1:] == [0.1, 0.1] and new["next"] == 1
    assert state == {"memory": [0.1, 0.1, 0.1], "next": 0}  # the old state is not touched
    # no kept trial: nothing changes; the pointer wraps around the memory
    assert de.end_generation(new, plan, [{**o, "accepted": False} for o in outcomes]) == new
    last = {"memory": [0.1, 0.1, 0.1], "next": 2}
    assert de.end_generation(last, plan, outcomes)["next"] == 0


def test_sade_draws_per_trial_F_and_CR_around_the_memory() -> None:
    de = DEAncestor(DEAncestorParameters(adaptation="sade", F=0.1, F_sd=0.04, CR_sd=0.05,
                                         CR_max=0.2))
    state = {"memory": [0.15] * 5, "next": 0}
    plan = de.draw_generation(random.Random(3), 0, 10, 400, state)
    Fs, CRs = plan["Fs"], plan["CRs"]
    assert all(1e-4 <= f <= 1.0 for f in Fs) and all(0.0 <= c <= 0.2 for c in CRs)
    assert plan["F"] == pytest.approx(sum(Fs) / 400) and plan["F"] == pytest.approx(0.1, abs=0.01)
    assert plan["CR"] == pytest.approx(sum(CRs) / 400)
    assert plan["batch"]["size"] == 256
    step = de.step(plan, 7)
    assert (step.slot, step.F, step.CR) == (7, Fs[7], CRs[7])
    with pytest.raises(RecipeError, match="adaptation sade takes a number"):
        DEAncestor(DEAncestorParameters(adaptation="sade",
                                        CR={"schedule": "cosine", "max": 0.2, "min": 0.1}))


# ----------------------------------------------------------------------------- donors


@pytest.mark.parametrize("name", ["de-ancestor", "cade"])
def test_rand_1_donors_are_three_distinct_members_other_than_the_slot(name: str) -> None:
    cls = STRATEGIES[name]
    strategy = cls(cls.parameters_model(**({"jitter": False} if name == "cade" else {})))
    rng = random.Random(0)
    pop = 6
    seen: Counter[tuple[int, int]] = Counter()
    for g in range(400):
        plan = strategy.draw_generation(rng, g, 400, pop, strategy.initial_state())
        assert plan["order"] == list(range(pop))  # slots in order, as the authors' de.py
        for position in range(pop):
            step = strategy.step(plan, position)
            assert len(step.donors) == 3 and len(set(step.donors)) == 3
            assert step.slot not in step.donors
            assert strategy.reads(step) == {step.slot, *step.donors}
            seen.update((step.slot, d) for d in step.donors)
    # every other member serves as a donor of every slot, about equally often (3/5 each)
    for i in range(pop):
        counts = [seen[(i, j)] for j in range(pop) if j != i]
        assert all(abs(c - 400 * 3 / 5) < 60 for c in counts), counts


# ----------------------------------------------------------------------------- crossover


def test_fine_crossover_resolves_tiny_rates() -> None:
    n = 2_000_000
    target, mutant = torch.zeros(n), torch.ones(n)
    u = fine_binomial_crossover(target, mutant, 5e-6, torch.Generator().manual_seed(0))
    assert 0 < int(u.sum()) < 30  # about 10 entries; the 16-bit crossover would round to 0
    again = fine_binomial_crossover(target, mutant.clone(), 5e-6,
                                    torch.Generator().manual_seed(0), out=torch.empty(n))
    assert torch.equal(u, again)
    assert torch.equal(fine_binomial_crossover(target, mutant, 0.0, torch.Generator()), target)


def test_batch_indices_are_seeded_and_cover_all_when_larger() -> None:
    a = batch_indices(100, {"seed": 4, "size": 10})
    assert a is not None and torch.equal(a, batch_indices(100, {"seed": 4, "size": 10}))
    assert len(set(a.tolist())) == 10 and not torch.equal(a, batch_indices(100, {"seed": 5,
                                                                                 "size": 10}))
    assert batch_indices(100, {"seed": 4, "size": 100}) is None


# ----------------------------------------------------------------------------- recipes


def test_ancestors_in_natural_order(tmp_path: Path) -> None:
    for e in (1, 2, 9, 10, 11):
        (tmp_path / f"epoch-{e}").mkdir()
    names = [Path(p).name for p in expand_ancestors(str(tmp_path / "epoch-*"))]
    assert names == ["epoch-1", "epoch-2", "epoch-9", "epoch-10", "epoch-11"]
    assert sorted(["b10", "b9", "a"], key=natural_key) == ["a", "b9", "b10"]
    recipe = parse_evolution_recipe({
        "merge_method": "de-ancestor",
        "ancestors": {"glob": str(tmp_path / "epoch-*"), "last": 4},
        "fitness": {"type": "torch", "arch": "m:f", "select": "s.npz", "metric": "loss"},
    }, "r.yaml")
    assert [Path(p).name for p in recipe.population_refs()] == \
        ["epoch-2", "epoch-9", "epoch-10", "epoch-11"]
    with pytest.raises(RecipeError, match=r"r.yaml: ancestors: '.*nope-\*' matches no"):
        parse_evolution_recipe({"merge_method": "de-ancestor",
                                "ancestors": str(tmp_path / "nope-*"),
                                "fitness": {"type": "torch", "arch": "m:f", "select": "s"}},
                               "r.yaml")


def test_mini_batches_need_a_torch_fitness(tmp_path: Path) -> None:
    data = {"merge_method": "de-ancestor", "ancestors": ["a", "b", "c", "d"],
            "fitness": {"type": "callable", "function": "m:f"}}
    with pytest.raises(RecipeError, match=r"parameters\.batch_size: mini-batches \(the "
                                          r"default batch_size: 256\) need fitness type torch"):
        parse_evolution_recipe(data, "r.yaml")
    with pytest.raises(RecipeError, match=r"mini-batches \(batch_size: 32\) need"):
        parse_evolution_recipe({**data, "parameters": {"batch_size": 32}}, "r.yaml")
    parse_evolution_recipe({**data, "parameters": {"batch_size": None}}, "r.yaml")
    with pytest.raises(RecipeError, match="not both"):
        parse_evolution_recipe({**data, "models": [{"model": "x"}]}, "r.yaml")


def test_methods_lists_both_with_their_parameters() -> None:
    from mergekit_pcb.cli import app

    res = CliRunner().invoke(app, ["methods", "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.output)
    for name in ("de-ancestor", "cade"):
        assert listed[name]["kind"] == "search"
        assert all(p["doc"] for p in listed[name]["parameters"]), name
    de = {p["name"]: p for p in listed["de-ancestor"]["parameters"]}
    assert de["adaptation"]["choices"] == ["none", "sade"] and de["batch_size"]["default"] == 256
    cade = {p["name"]: p for p in listed["cade"]["parameters"]}
    assert cade["F"]["default"] == {"schedule": "cosine", "max": 1e-5, "min": 1e-6,
                                    "period": 40}
    assert cade["generations"]["default"] == 99 and cade["jitter"]["default"] is True


# ----------------------------------------------------------------------------- runs


def _tiny_de_ancestor(tmp_path: Path, **params: Any) -> Path:
    """de-ancestor over the engine tests' tiny MLPs (4 'ancestors'), torch loss fitness."""
    from test_evolve_engine import build_population, write_recipe

    root = build_population(tmp_path / "pop")
    return write_recipe(root, {
        "merge_method": "de-ancestor",
        "ancestors": [str(root / f"m{i}") for i in range(4)],
        "parameters": {"generations": 3, "batch_size": 50, "adaptation": "sade", **params},
        "fitness": {"type": "torch", "arch": "tinynet:build", "select": "select.npz",
                    "report": "report.npz", "metric": "loss", "batch_size": 50},
        "seed": 0,
    })


def test_members_are_rescored_on_each_generations_batch(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from mergekit_pcb.evolve.config import parse_fitness
    from mergekit_pcb.evolve.fitness import build_evaluator
    from mergekit_pcb.evolve.run import evolve

    recipe = _tiny_de_ancestor(tmp_path, generations=2)
    out = tmp_path / "out"
    summary = evolve(recipe, out, trust_code=True)
    doc = json.loads((out / "evolution.json").read_text())
    fitness = parse_fitness({"type": "torch", "arch": "tinynet:build", "select": "select.npz",
                             "metric": "loss", "batch_size": 50}, "t")
    ev = build_evaluator(fitness, recipe.parent)
    members = [load_file(str(summary.run_dir / "members" / m))
               for m in doc["final"]["members"]]
    # the final select scores are on all of select; the result is the best of them
    full = [ev.score(m, "select") for m in members]
    assert doc["final"]["select"] == full
    assert doc["scores"][-1]["select"] == min(full)
    # the last generation's fitness is every member on that generation's mini-batch (50 of
    # the 120 select rows), which differs from the full-data score
    state = json.loads((summary.run_dir / "state.json").read_text())
    assert state["plan"] is None and len(state["outcomes"]) == 0
    assert doc["final"]["fitness"] != full
    # 4 members + their average; per generation 4 rescored + 4 trials; 4 on all of select
    assert doc["totals"]["evaluations"] == 4 + 1 + 2 * (4 + 4) + 4


def test_an_edited_strategy_state_is_refused_on_resume(tmp_path: Path) -> None:
    from mergekit_pcb.cli import app

    recipe = _tiny_de_ancestor(tmp_path)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["evolve", str(recipe), "-o", str(out), "-q", "--trust-code"])
    assert res.exit_code == 0, res.output
    path = tmp_path / "out.run" / "state.json"
    for edit in ({"memory": [0.1, "x", 0.1, 0.1, 0.1]}, {"next": 9}):
        state = json.loads(path.read_text())
        state["search"].update(edit)
        state["generation"] = 1
        path.write_text(json.dumps(state))
        res = CliRunner().invoke(app, ["evolve", str(recipe), "-o", str(out), "--resume",
                                       "--force", "-q", "--trust-code"])
        assert res.exit_code == 2 and "corrupt run state" in res.output, res.output
        assert "strategy state" in res.output
