"""Recipe schema errors and per-tensor parameter evaluation (filters, gradients, defaults)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods.ties import Ties
from mergekit_pcb.recipe.params import depth_position, evaluate, resolve_params
from mergekit_pcb.recipe.schema import FilteredValue, load_recipe, parse_recipe

MERGEKIT_TIES = """\
models:
  - model: psmathur/orca_mini_v3_13b
    parameters:
      density: [1, 0.7, 0.1] # density gradient
      weight: 1.0
  - model: garage-bAInd/Platypus2-13B
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def test_mergekit_readme_recipe_parses(tmp_path: Path) -> None:
    path = tmp_path / "ties.yml"
    path.write_text(MERGEKIT_TIES)
    recipe = load_recipe(path)
    assert recipe.merge_method == "ties" and recipe.dtype == "float16"
    assert recipe.models[2].parameters["weight"] == [FilteredValue(filter="mlp", value=0.5),
                                                     FilteredValue(value=0)]


def test_parameters_per_tensor_hand_computed(tmp_path: Path) -> None:
    path = tmp_path / "ties.yml"
    path.write_text(MERGEKIT_TIES)
    recipe = load_recipe(path)
    entries = [m.parameters for m in recipe.models]
    # 41 layers: layer 10 sits at t = 10/40 = 0.25.
    name = "model.layers.10.mlp.up_proj.weight"
    t = depth_position(name, 41)
    assert t == 0.25
    glob, per_model = resolve_params(Ties, recipe.parameters, entries, name, t, "")
    assert glob == {"lambda": 1.0, "normalize": True, "int8_mask": True, "scope": "tensor",
                    "rescale": False}
    # density [1, .7, .1] at t=.25: scaled .5 -> 1*.5 + .7*.5 = .85
    assert per_model[0] == {"weight": 1.0, "density": pytest.approx(0.85)}
    # weight [0, .3, .7, 1] at t=.25: scaled .75 -> 0*.25 + .3*.75 = .225
    assert per_model[1] == {"weight": pytest.approx(0.225), "density": 0.5}
    assert per_model[2] == {"weight": 0.5, "density": 0.33}  # 'mlp' filter matches
    attn = "model.layers.40.self_attn.q_proj.weight"
    _, per_model = resolve_params(Ties, recipe.parameters, entries, attn,
                                  depth_position(attn, 41), "")
    assert per_model[0]["density"] == pytest.approx(0.1)
    assert per_model[1]["weight"] == pytest.approx(1.0)
    assert per_model[2]["weight"] == 0  # falls through to the unfiltered item
    # Outside the layers, as in mergekit: t = 0 for embeddings and the output head alike.
    assert depth_position("lm_head.weight", 41) == 0.0
    assert depth_position("model.embed_tokens.weight", 41) == 0.0


def test_top_level_parameters_default_per_model_values() -> None:
    recipe = parse_recipe({
        "merge_method": "ties", "base_model": "b",
        "models": [{"model": "x", "parameters": {"density": 0.2}}, {"model": "y"}],
        "parameters": {"density": 0.7, "weight": 0.5},
    }, "r.yaml")
    _, per_model = resolve_params(Ties, recipe.parameters, [m.parameters for m in recipe.models],
                                  "w", 0.0, "")
    assert per_model == [{"weight": 0.5, "density": 0.2}, {"weight": 0.5, "density": 0.7}]


def test_evaluate_filters_first_match_and_star() -> None:
    items = [FilteredValue(filter="attn", value=1.0), FilteredValue(filter="*", value=2.0)]
    assert evaluate(items, "layers.0.attn.q", 0) == 1.0
    assert evaluate(items, "layers.0.mlp.up", 0) == 2.0
    assert evaluate([FilteredValue(filter="attn", value=1.0)], "mlp", 0) is None


@pytest.mark.parametrize(("data", "message"), [
    ({"merge_method": "ties", "modelz": []}, "unknown key 'modelz'"),
    ({"models": []}, "missing required key 'merge_method'"),
    ({"merge_method": "ties", "models": [{"parameters": {}}]}, "missing required key "
                                                               "'models[0].model'"),
    ({"merge_method": "ties", "dtype": "float8"}, "'dtype'"),
    ({"merge_method": "ties", "tensors": [{"filter": "x"}]}, "exactly one of 'take' or 'method'"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"weight": {"a": 1}}}]},
     "models[0].parameters.weight"),
])
def test_schema_errors_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe(data, "r.yaml")
    assert str(err.value).startswith("r.yaml: ")
    assert message in str(err.value)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("merge_method: ties\nmodels: [\n  - a: b\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: line \d+ not valid YAML"):
        load_recipe(path)


def test_exponent_without_a_dot_is_a_number(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1) reads `5e-1` as a string; mergekit's pydantic coerces it, so the
    # same recipe must work here. Quoted, it stays a string (and the schema refuses it).
    path = tmp_path / "ties.yml"
    path.write_text("merge_method: ties\nbase_model: b\nmodels:\n"
                    "  - model: m\n    parameters: {density: 5e-1, weight: 1E0}\n"
                    "parameters: {lambda: 2.5e+0, epsilon: .5e-1}\n")
    recipe = load_recipe(path)
    assert recipe.models[0].parameters == {"density": 0.5, "weight": 1.0}
    assert recipe.parameters == {"lambda": 2.5, "epsilon": 0.05}
    path.write_text("merge_method: ties\nbase_model: b\nmodels:\n"
                    "  - model: m\n    parameters: {density: '5e-1'}\n")
    assert load_recipe(path).models[0].parameters == {"density": "5e-1"}
