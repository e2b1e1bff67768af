"""Issue 31's recipe-level findings: what used to pass silently, or fail unclearly.

- a parameter the method does not take, but another method does (mergekit's test recipes
  give `weight` to every model, also for slerp), is ignored as mergekit ignores it, with
  one warning line; a key no method takes stays an error;
- hostile values: an empty `base_model`, NaN in a filtered weight, weights that overflow;
- warnings at the time they matter: filters that match no tensor, a two-model method given
  more models, an output without a tokenizer;
- the model count of a `slices:` recipe;
- `evolution.json` lists every member of generation 0, the filled-in ones included.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_recipe
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

from mergekit_pcb.cli import app
from mergekit_pcb.engine.plan import MergePlan, build_plan
from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods import REGISTRY
from mergekit_pcb.recipe.schema import parse_recipe

Models = Callable[[str, int], tuple[Path, list[Path]]]


@pytest.fixture
def llama(hf_models: Models) -> tuple[Path, list[Path]]:
    """A base with a tokenizer and three fine-tuned copies without one."""
    return hf_models("llama", 3)


def plan_of(recipe: dict[str, Any]) -> MergePlan:
    return build_plan(parse_recipe(recipe, "recipe"), "")


def warnings_of(recipe: dict[str, Any]) -> list[str]:
    plan = plan_of(recipe)
    plan.close()
    return plan.warnings


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(app, [str(a) for a in args])


def warning_lines(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("warning: ")]


def models_of(paths: list[Path], **params: Any) -> list[dict[str, Any]]:
    return [{"model": str(p), **({"parameters": params} if params else {})} for p in paths]


# ------------------------------------------------------- parameters of another method


# mergekit 0.1.5's methods that take no `weight`, each as its tests write them: `weight` on
# every model.
NO_WEIGHT = ("slerp", "sce", "ram", "ramplus_tl", "model_stock", "arcee_fusion", "nearswap",
             "karcher")


@pytest.mark.parametrize("method", NO_WEIGHT)
def test_weight_given_to_a_method_without_one_is_ignored_with_one_line(
        method: str, llama: tuple[Path, list[Path]]) -> None:
    base, tuned = llama
    cls = REGISTRY[method]
    assert cls.param_spec("weight") is None
    others = tuned[:1] if cls.pairwise else tuned[:2]
    recipe = {"merge_method": method, "base_model": str(base),
              "models": [{"model": str(base), "parameters": {"weight": 0.6}},
                         *models_of(others, weight=0.4)]}
    n = len(others)
    assert warnings_of(recipe) == [
        f"models[0].parameters.weight (and {n} more): {method} takes no 'weight' parameter; "
        "ignored, as mergekit ignores it"]


def test_ignored_weight_leaves_the_merge_as_without_it(llama: tuple[Path, list[Path]],
                                                       tmp_path: Path) -> None:
    """mergekit's slerp test recipe: the output equals the same recipe without `weight`,
    and `run` says so in one line."""
    base, tuned = llama
    plain = {"merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.35},
             "models": [{"model": str(base)}, {"model": str(tuned[0])}]}
    weighted = {**plain, "models": [{"model": str(base), "parameters": {"weight": 0.6}},
                                    {"model": str(tuned[0]), "parameters": {"weight": 0.4}}]}
    outs = []
    for name, recipe in (("plain", plain), ("weighted", weighted)):
        out = tmp_path / f"out-{name}"
        result = invoke("run", write_recipe(tmp_path / f"{name}.yaml", recipe), "-o", out, "-q")
        assert result.exit_code == 0, result.output
        outs.append((out, warning_lines(result)))
    assert outs[0][1] == []
    assert outs[1][1] == ["warning: models[0].parameters.weight (and 1 more): slerp takes no "
                          "'weight' parameter; ignored, as mergekit ignores it"]
    a, b = (load_file(str(out / "model.safetensors")) for out, _ in outs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # ...and the weights did not reach the merge: t = 0.35 from the base, not a 0.6/0.4 mix
    assert not torch.equal(a["model.norm.weight"], load_file(
        str(next(base.glob("*.safetensors"))))["model.norm.weight"])


@pytest.mark.parametrize("where", ["top", "model", "slice", "rule"])
def test_misspelt_key_stays_an_error(where: str, llama: tuple[Path, list[Path]]) -> None:
    base, tuned = llama
    recipe: dict[str, Any] = {"merge_method": "slerp", "base_model": str(base),
                              "models": models_of(tuned[:1])}
    if where == "top":
        recipe["parameters"] = {"wieght": 0.5}
        expect = "parameters.wieght: unknown parameter for slerp (known: t)"
    elif where == "model":
        recipe["models"][0]["parameters"] = {"wieght": 0.5}
        expect = "models[0].parameters.wieght: unknown parameter for slerp (known: t)"
    elif where == "slice":
        recipe["models"] = []
        recipe["slices"] = [{"sources": [
            {"model": str(base), "layer_range": [0, 2]},
            {"model": str(tuned[0]), "layer_range": [0, 2], "parameters": {"wieght": 1}}]}]
        expect = "slices[0].sources[1].parameters.wieght: unknown parameter for slerp"
    else:
        recipe["tensors"] = [{"filter": "mlp", "method": "ties", "parameters": {"denisty": 1}}]
        expect = "tensors[0].parameters.denisty: unknown parameter for ties"
    with pytest.raises(RecipeError, match="^" + re.escape(expect)):
        plan_of(recipe)


def test_ignored_keys_in_slices_and_rules_are_named(llama: tuple[Path, list[Path]]) -> None:
    base, tuned = llama
    recipe = {"merge_method": "ties", "base_model": str(base), "slices": [{
        "parameters": {"t": 0.5},
        "sources": [{"model": str(base), "layer_range": [0, 2]},
                    {"model": str(tuned[0]), "layer_range": [0, 2], "parameters": {"scale": 2}},
                    {"model": str(tuned[1]), "layer_range": [0, 2]}]}]}
    assert warnings_of(recipe) == [
        "slices[0].parameters.t: ties takes no 't' parameter; ignored, as mergekit ignores it",
        "slices[0].sources[1].parameters.scale: ties takes no 'scale' parameter; ignored, as "
        "mergekit ignores it"]


# ------------------------------------------------------------------- hostile values


def test_empty_base_model_is_one_bad_input_line(llama: tuple[Path, list[Path]],
                                                tmp_path: Path) -> None:
    """It used to read as "no base" and end in `internal error: AssertionError`."""
    _, tuned = llama
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "ties", "base_model": "",
        "models": [{"model": str(tuned[0]), "parameters": {"weight": -0.5, "density": [1]}},
                   {"model": str(tuned[1]), "parameters": {"weight": 1, "density": [1]}}]})
    for args in (("validate", recipe), ("run", recipe, "-o", tmp_path / "out")):
        result = invoke(*args)
        assert result.exit_code == 2, result.output
        assert result.stderr.splitlines() == [
            f"error: {recipe}: 'base_model': String should have at least 1 character"]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["model", "take", "tokenizer_source"])
def test_other_empty_model_names_are_refused(key: str, llama: tuple[Path, list[Path]]) -> None:
    _, tuned = llama
    recipe: dict[str, Any] = {"merge_method": "linear", "models": models_of(tuned[:2])}
    where = {"model": "models[1].model", "take": "tensors[0].take",
             "tokenizer_source": "tokenizer_source"}[key]
    if key == "model":
        recipe["models"][1]["model"] = ""
    elif key == "take":
        recipe["tensors"] = [{"filter": "mlp", "take": ""}]
    else:
        recipe["tokenizer_source"] = ""
    with pytest.raises(RecipeError, match=rf"'{re.escape(where)}': String should have at least"):
        plan_of(recipe)


def test_nan_in_a_filtered_weight_is_refused_by_dare_ties(
        llama: tuple[Path, list[Path]]) -> None:
    base, tuned = llama
    recipe = {"merge_method": "dare_ties", "base_model": str(base),
              "models": [{"model": str(tuned[0]), "parameters": {
                  "weight": [{"filter": "mlp", "value": 0.5}, {"value": math.nan}],
                  "density": 0.5}},
                  {"model": str(tuned[1]), "parameters": {"weight": 0.5, "density": 0.5}}]}
    with pytest.raises(RecipeError, match=r"^models\[0\]\.parameters\.weight\[1\]\.value: "
                                          r"must be a number in \[-1e6, 1e6\], got nan$"):
        plan_of(recipe)


def test_weights_that_overflow_are_refused(llama: tuple[Path, list[Path]],
                                           tmp_path: Path) -> None:
    """The rule: a weight is finite and within ±1e6 (checked before anything is read);
    a result that still overflows the output dtype (huge inputs times large weights) is
    refused naming the tensor, and nothing is written."""
    _, tuned = llama
    with pytest.raises(RecipeError, match=r"^models\[0\]\.parameters\.weight: must be a "
                                          r"number in \[-1e6, 1e6\], got 1e\+308$"):
        plan_of({"merge_method": "linear",
                 "models": [*models_of(tuned[:1], weight=1e308), *models_of(tuned[1:2])]})
    # inputs near float32's largest value: 1e6·x overflows although both are allowed
    big = tmp_path / "big"
    big.mkdir()
    tensors = load_file(str(next(tuned[0].glob("*.safetensors"))))
    name = next(iter(tensors))
    save_file({name: torch.full_like(tensors[name], 1e35)}, str(big / "model.safetensors"))
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "linear", "parameters": {"normalize": False},
        "models": [{"model": str(big), "parameters": {"weight": 1e6}},
                   {"model": str(big), "parameters": {"weight": 1e6}}]})
    result = invoke("run", recipe, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: tensor '{name}': linear gives NaN or Inf in float32")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------- warnings that matter


def test_filters_that_match_no_tensor_are_named(llama: tuple[Path, list[Path]]) -> None:
    base, tuned = llama
    recipe = {"merge_method": "ties", "base_model": str(base),
              "parameters": {"density": [{"filter": "self_attn", "value": 0.5},
                                         {"filter": "*", "value": 1}]},
              "models": [{"model": str(tuned[0]), "parameters": {
                  "weight": [{"filter": "mpl", "value": 0.5}, {"value": 1}]}},
                  {"model": str(tuned[1])}],
              "tensors": [{"filter": "lm_heads", "take": "base"},
                          {"filter": "mlp", "take": "base"},
                          {"filter": "mlp.up_proj", "method": "linear",
                           "parameters": {"weight": [{"filter": "rotary", "value": 2}]}}]}
    assert warnings_of(recipe) == [
        "tensors[0].filter: 'lm_heads' matches no tensor name; the rule does nothing",
        "tensors[2].filter: every tensor 'mlp.up_proj' matches goes to an earlier rule; the "
        "rule does nothing",
        "models[0].parameters.weight[0].filter: 'mpl' matches no tensor name; that value is "
        "never used",
        "tensors[2].parameters.weight[0].filter: 'rotary' matches no tensor name; that value "
        "is never used"]


def test_a_clean_recipe_warns_of_nothing(llama: tuple[Path, list[Path]],
                                         tmp_path: Path) -> None:
    base, tuned = llama
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "ties", "base_model": str(base),
        "parameters": {"density": [{"filter": "mlp", "value": 0.5}, {"value": 1}]},
        "models": models_of(tuned[:2]), "tensors": [{"filter": "norm", "take": "base"}]})
    result = invoke("validate", recipe, "--json")
    assert result.exit_code == 0 and result.stderr == ""
    assert json.loads(result.stdout)["warnings"] == []


def test_slerp_given_three_models_says_it_takes_their_mean(
        llama: tuple[Path, list[Path]], tmp_path: Path) -> None:
    base, tuned = llama
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "slerp", "base_model": str(base), "parameters": {"t": 0.5},
        "models": models_of(tuned)})
    result = invoke("run", recipe, "-o", tmp_path / "out", "--dry-run")
    assert result.exit_code == 0, result.output
    names = ", ".join(map(str, tuned))
    assert warning_lines(result) == [
        f"warning: slerp merges the base with one other model, but is given 3 ({names}): it "
        "merges with their uniform mean (mergekit refuses more than one)"]
    assert {n for n, cls in REGISTRY.items() if cls.pairwise} == {"slerp", "nearswap",
                                                                   "arcee_fusion"}
    assert warnings_of({"merge_method": "nearswap", "base_model": str(base),
                        "models": models_of(tuned[:1])}) == []


def test_output_without_a_tokenizer_is_said(llama: tuple[Path, list[Path]],
                                            tmp_path: Path) -> None:
    base, tuned = llama
    # the first model (where the tokenizer is copied from) has none; the base has one
    assert warnings_of({"merge_method": "linear", "models": models_of([tuned[0], base])}) == [
        f"the output gets no tokenizer: {tuned[0]} has no tokenizer files; set "
        f"tokenizer_source: {base} to take that model's"]
    # no input has one
    recipe = write_recipe(tmp_path / "r.yaml", {"merge_method": "linear",
                                                "models": models_of(tuned[:2])})
    result = invoke("run", recipe, "-o", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.output
    assert warning_lines(result) == [
        f"warning: the output gets no tokenizer: {tuned[0]} has no tokenizer files"]
    assert not (tmp_path / "out" / "tokenizer.json").exists()


# ------------------------------------------------------------------------- slices


def test_slices_recipe_counts_its_sources(llama: tuple[Path, list[Path]],
                                          tmp_path: Path) -> None:
    base, tuned = llama
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "ties", "base_model": str(base),
        "slices": [{"sources": [{"model": str(m), "layer_range": [0, 1]}
                                for m in (base, tuned[0], tuned[1])]},
                   {"sources": [{"model": str(m), "layer_range": [1, 2]}
                                for m in (base, tuned[0], tuned[2])]}]})
    result = invoke("validate", recipe)
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0].startswith(
        "recipe OK: ties over 4 model(s) in 2 slice(s), ")
    info = json.loads(invoke("run", recipe, "-o", tmp_path / "out", "--dry-run",
                             "--json").stdout)
    assert info["models"] == [str(base), *map(str, tuned)] and info["slices"] == 2


# ------------------------------------------------------------------ evolution.json


def test_evolution_json_lists_every_member_of_generation_0(tmp_path: Path) -> None:
    """`--pop 5` over 3 inputs fills in two seeded interpolations: each is listed with its
    select score and how it was made, and the generation-0 best is one of them or an
    input."""
    from test_evolve_engine import build_population, recipe_dict
    from test_evolve_engine import write_recipe as write_search

    from mergekit_pcb.evolve.config import parse_fitness
    from mergekit_pcb.evolve.fitness import build_evaluator
    from mergekit_pcb.evolve.operators import interpolate
    from mergekit_pcb.evolve.run import evolve

    pop = build_population(tmp_path / "pop")
    data = recipe_dict(pop, mode="standalone", generations=0)
    summary = evolve(write_search(pop, data), pop / "out", pop=5, seed=3, trust_code=True)
    doc = json.loads((pop / "out" / "evolution.json").read_text())
    population = doc["initial"]["population"]
    names = [m["member"] for m in population]
    assert names == [f"init-{k:03d}.safetensors" for k in range(5)]
    members = summary.run_dir / "members"
    evaluator = build_evaluator(parse_fitness(data["fitness"], "test"), pop)
    for k, entry in enumerate(population):
        state = load_file(str(members / entry["member"]))
        assert evaluator.score(state, "select") == entry["select"]
        if k < 3:
            assert entry["input"] == data["models"][k]["model"]
            continue
        a, b = (load_file(str(members / n)) for n in entry["interpolate"])
        assert all(torch.equal(state[t], interpolate(a[t], b[t], entry["alpha"])) for t in a)
    assert doc["history"][0]["best"] == min(m["select"] for m in population)
    assert {*doc["final"]["members"]} <= {*names}



def test_search_recipes_ignore_other_methods_parameters_with_one_line(
        capsys: pytest.CaptureFixture[str]) -> None:
    """An evolution's inner merge and a coefficient search's models: as in a merge recipe."""
    from mergekit_pcb.evolve.coefsearch.config import parse_search_recipe
    from mergekit_pcb.evolve.config import parse_evolution_recipe

    fitness = {"type": "callable", "function": "nowhere:f", "select": "s.npz"}
    parse_evolution_recipe({
        "merge_method": "evolver", "base_model": "b", "models": [{"model": "m1"},
                                                                 {"model": "m2"}],
        "merge": {"merge_method": "ties", "parameters": {"t": 0.5},
                  "tensors": [{"filter": "mlp", "method": "slerp",
                               "parameters": {"density": 0.5}}]},
        "fitness": fitness}, "e.yaml")
    parse_search_recipe({
        "merge_method": "coefficient-search", "base_model": "b",
        "models": [{"model": "m1", "parameters": {"weight": 1}}, {"model": "m2"}],
        "merge": {"merge_method": "slerp"}, "search": {"t": [0, 1]}, "fitness": fitness},
        "c.yaml")
    assert capsys.readouterr().err.splitlines() == [
        "warning: e.yaml: merge.parameters.t: ties takes no 't' parameter; ignored, as "
        "mergekit ignores it",
        "warning: e.yaml: merge.tensors[0].parameters.density: slerp takes no 'density' "
        "parameter; ignored, as mergekit ignores it",
        "warning: c.yaml: models[0].parameters.weight: slerp takes no 'weight' parameter; "
        "ignored, as mergekit ignores it"]
    with pytest.raises(RecipeError, match=r"^e\.yaml: merge\.parameters\.tt: unknown "):
        parse_evolution_recipe({
            "merge_method": "evolver", "base_model": "b", "models": [{"model": "m1"},
                                                                     {"model": "m2"}],
            "merge": {"merge_method": "ties", "parameters": {"tt": 0.5}},
            "fitness": fitness}, "e.yaml")


def test_a_spectral_merge_that_decomposes_nothing_says_so(hf_models: Models) -> None:
    """CART's official `attn`/`mlp` names match no BERT tensor: the merge would be the
    average everywhere. Said in one line with the option that changes it; a Llama (whose
    names match) and `matrices: all_2d` get no such line."""
    base, tuned = hf_models("bert", 2)
    recipe: dict[str, Any] = {"merge_method": "cart", "base_model": str(base),
                              "models": [{"model": str(t)} for t in tuned]}
    said = [w for w in warnings_of(recipe) if w.startswith("cart:")]
    assert said == ["cart: no tensor gets its matrix rule (not 2-D; not an attention/MLP "
                    "weight, matrices: attn_mlp; vocabulary matrix, vocabulary: false), so "
                    "every tensor gets its fallback; matrices: all_2d acts on every 2-D tensor"]
    recipe["parameters"] = {"matrices": "all_2d"}
    assert not [w for w in warnings_of(recipe) if w.startswith("cart:")]
    llama_base, llama_tuned = hf_models("llama", 2)
    assert not [w for w in warnings_of({
        "merge_method": "cart", "base_model": str(llama_base),
        "models": [{"model": str(t)} for t in llama_tuned]}) if w.startswith("cart:")]
