"""Hostile recipes: every bad number, wrong type and unreadable file is one line and exit 2.

The battery is generated from the method registry: for every method and every numeric
parameter it declares, values that are NaN, ±inf, huge, just and far outside the declared
bounds, or of the wrong type, placed at the top level, per model, inside a gradient and
inside a filtered list. Each case drives the CLI in-process and checks: exit code 2, one
line on stderr starting `error: ` that names the recipe key or file, nothing written, and
the input files unchanged. Reading hazards (FIFOs, devices, bombs, encodings) follow, then
boundary values that must be accepted and merge to hand-computed results.
"""

from __future__ import annotations

import hashlib
import math
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_pcb.cli import app
from mergekit_pcb.methods import REGISTRY, MergeMethod, ParamSpec
from mergekit_pcb.methods.base import Range
from mergekit_pcb.methods.pcb import MAX_MODELS
from mergekit_pcb.recipe.params import evaluate
from mergekit_pcb.recipe.schema import MAX_YAML_BYTES, MAX_YAML_DEPTH, MAX_YAML_VALUES

SEED = 20240607
RUN_SHARE = 6  # one case in RUN_SHARE goes through `run -o OUT` instead of `validate`
TENSORS = ("model.layers.0.mlp.weight", "model.layers.1.mlp.weight", "model.norm.weight")


# ------------------------------------------------------------------------------ inputs
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """base, m1, m2: plain safetensors of small dyadic values, so merges are exact."""
    root = tmp_path_factory.mktemp("hostile-models")
    g = torch.Generator().manual_seed(SEED)
    base = {n: torch.randint(-8, 8, (3, 4), generator=g).float() / 4 for n in TENSORS}
    out = {}
    for key in ("base", "m1", "m2"):
        tensors = base if key == "base" else {
            n: base[n] + torch.randint(-4, 5, (3, 4), generator=g).float() / 4 for n in TENSORS}
        (root / key).mkdir()
        save_file(tensors, str(root / key / "model.safetensors"))
        out[key] = root / key
    return out


def _digest(paths: list[Path]) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


@pytest.fixture(scope="module")
def model_files(models: dict[str, Path]) -> dict[Path, str]:
    return _digest([d / "model.safetensors" for d in models.values()])


def tensors_of(d: Path) -> dict[str, torch.Tensor]:
    return load_file(str(d / "model.safetensors"))


def base_recipe(cls: type[MergeMethod], models: dict[str, Path]) -> dict[str, Any]:
    recipe: dict[str, Any] = {"merge_method": cls.name,
                              "models": [{"model": str(models["m1"])},
                                         {"model": str(models["m2"])}]}
    if cls.requires_base:
        recipe["base_model"] = str(models["base"])
    return recipe


# ------------------------------------------------------------------------------ driving
def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback escaped the CLI's handler: show it
    return result.exit_code, result.stderr


def assert_refused(tmp_path: Path, recipe: Path, expect: str, model_files: dict[Path, str],
                   command: str = "validate") -> str:
    """Exit 2, one `error: ` line containing `expect`, nothing written, inputs unchanged."""
    try:
        inputs = [recipe] if recipe.is_file() else []
    except OSError:  # e.g. a name too long to stat
        inputs = []
    before = _digest(inputs)
    out = tmp_path / "OUT"
    args = [command, str(recipe)] + (["-o", str(out), "--quiet"] if command == "run" else [])
    code, stderr = invoke(args)
    lines = stderr.splitlines()
    assert code == 2, (code, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error: ") and expect in lines[0], (expect, lines[0])
    assert not out.exists() and not list(tmp_path.glob(".OUT.*")), "output left behind"
    assert _digest(inputs) == before and _digest(list(model_files)) == model_files
    return lines[0]


def write(tmp_path: Path, recipe: dict[str, Any] | str | bytes,
          name: str = "recipe.yaml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(recipe, dict):
        recipe = yaml.safe_dump(recipe, sort_keys=False)
    path.write_bytes(recipe.encode() if isinstance(recipe, str) else recipe)
    return path


# ------------------------------------------------------------------------------ battery
def numeric_specs() -> Iterator[tuple[type[MergeMethod], ParamSpec]]:
    for name in sorted(REGISTRY):
        for spec in REGISTRY[name].params:
            if spec.bounds is not None:
                yield REGISTRY[name], spec


def inside(b: Range) -> float:
    """A value every method accepts for a parameter with bounds `b`."""
    low = b.low if not b.low_open else b.low + (b.high - b.low) / 4
    return min(max(0.5, low), b.high if not b.high_open else (b.low + b.high) / 2)


def bad_values(b: Range) -> list[tuple[str, Any]]:
    """NaN, ±inf, huge, wrong types, and just/far outside the bounds."""
    near_low = b.low if b.low_open else math.nextafter(b.low, -math.inf)
    near_high = b.high if b.high_open else math.nextafter(b.high, math.inf)
    return [("nan", math.nan), ("inf", math.inf), ("-inf", -math.inf), ("1e308", 1e308),
            ("-1e308", -1e308), ("int400", 10**400), ("string", "lots"), ("bool", True),
            ("below", near_low), ("far-below", b.low - max(1.0, abs(b.low))),
            ("above", near_high), ("far-above", b.high + max(1.0, abs(b.high)))]


@dataclass(frozen=True)
class Case:
    label: str
    value: Any
    command: str  # validate | run


@dataclass(frozen=True)
class Group:
    """The bad values of one parameter of one method, in one place of the recipe."""

    method: str
    param: str
    place: str  # top | model | gradient | filtered
    cases: tuple[Case, ...]

    @property
    def id(self) -> str:
        return f"{self.method}-{self.param}-{self.place}"


def battery() -> list[Group]:
    groups = []
    rng = random.Random(SEED)
    for cls, spec in numeric_specs():
        places = ["top", "model", "gradient", "filtered"] if spec.per_model else \
            ["top", "gradient", "filtered"]
        assert spec.bounds is not None
        for place in places:
            cases = tuple(Case(label, value, "run" if rng.randrange(RUN_SHARE) == 0
                               else "validate") for label, value in bad_values(spec.bounds))
            groups.append(Group(cls.name, spec.name, place, cases))
    return groups


BATTERY = battery()


def mutate(group: Group, value: Any, models: dict[str, Path]) -> tuple[dict[str, Any], str]:
    """The recipe with `value` in the group's place, and the key path the error must name."""
    cls = REGISTRY[group.method]
    spec = cls.param_spec(group.param)
    assert spec is not None and spec.bounds is not None
    recipe = base_recipe(cls, models)
    ok = inside(spec.bounds)
    per_model = group.place != "top" and spec.per_model
    holder = recipe["models"][1].setdefault("parameters", {}) if per_model else \
        recipe.setdefault("parameters", {})
    key = f"models[1].parameters.{spec.name}" if per_model else f"parameters.{spec.name}"
    if group.place in ("top", "model"):
        holder[spec.name] = value
        return recipe, key
    if group.place == "gradient":
        holder[spec.name] = [ok, value, ok]
        return recipe, f"{key}[1]"
    holder[spec.name] = [{"filter": "mlp", "value": ok}, {"value": value}]
    return recipe, f"{key}[1].value"


@pytest.mark.parametrize("group", BATTERY, ids=[g.id for g in BATTERY])
def test_bad_number_is_refused(group: Group, models: dict[str, Path],
                               model_files: dict[Path, str], tmp_path: Path) -> None:
    bounds = REGISTRY[group.method].param_spec(group.param).bounds  # type: ignore[union-attr]
    for case in group.cases:
        recipe, key = mutate(group, case.value, models)
        where = tmp_path / case.label
        assert_refused(where, write(where, recipe), f"{key}: must be a number in {bounds}, got ",
                       model_files, case.command)


def test_battery_covers_every_numeric_parameter() -> None:
    covered = {(g.method, g.param) for g in BATTERY}
    assert covered == {(cls.name, s.name) for cls, s in numeric_specs()}
    assert {"weight", "density", "lambda", "clip"} <= {p for _, p in covered}
    commands = [c.command for g in BATTERY for c in g.cases]
    assert len(commands) >= 150 and commands.count("run") >= len(commands) // (2 * RUN_SHARE)


def test_one_rule_per_parameter_name() -> None:
    """A parameter name means the same range in every method that has it."""
    bounds: dict[str, set[Range]] = {}
    for _, spec in numeric_specs():
        bounds.setdefault(spec.name, set()).add(spec.bounds)  # type: ignore[arg-type]
    assert all(len(b) == 1 for b in bounds.values()), bounds


@pytest.mark.parametrize("value, expect", [
    ([], "models[1].parameters.density: an empty list gives no value"),
    (None, "models[1].parameters.density"),
    ({"a": 1}, "models[1].parameters.density"),
    ([0.5, None], "models[1].parameters.density"),
    ([{"filter": "mlp", "value": [0.5, "x"]}], "models[1].parameters.density[0].value[1]"),
])
def test_wrong_shapes_of_a_value(value: Any, expect: str, models: dict[str, Path],
                                 model_files: dict[Path, str], tmp_path: Path) -> None:
    recipe = base_recipe(REGISTRY["ties"], models)
    recipe["models"][1]["parameters"] = {"density": value}
    assert_refused(tmp_path, write(tmp_path, recipe), expect, model_files)


def test_yaml_number_spellings(models: dict[str, Path], model_files: dict[Path, str],
                               tmp_path: Path) -> None:
    base = yaml.safe_dump(base_recipe(REGISTRY["task_arithmetic"], models), sort_keys=False)
    for spelling, shown in ((".NaN", "nan"), ("-.Inf", "-inf"), ("1.0e+400", "inf"),
                            ("1e400", "inf"), ("'1e-3'", "'1e-3'"), ("9" * 5000, "not valid YAML")):
        path = write(tmp_path, base + f"parameters:\n  lambda: {spelling}\n")
        line = assert_refused(tmp_path, path, shown, model_files)
        assert "parameters.lambda" in line or "not valid YAML" in line


def test_base_listed_among_models_keeps_recipe_indices(models: dict[str, Path],
                                                       model_files: dict[Path, str],
                                                       tmp_path: Path) -> None:
    recipe = base_recipe(REGISTRY["ties"], models)
    recipe["models"].insert(0, {"model": str(models["base"])})  # mergekit style
    recipe["models"][2]["parameters"] = {"density": 0}
    assert_refused(tmp_path, write(tmp_path, recipe), "models[2].parameters.density: must be "
                   "a number in [1e-6, 1], got 0", model_files, "run")


def test_unknown_key_with_a_newline_stays_one_line(models: dict[str, Path],
                                                   model_files: dict[Path, str],
                                                   tmp_path: Path) -> None:
    recipe = base_recipe(REGISTRY["ties"], models)
    recipe["parameters"] = {"dens\nity": 0.5}
    assert_refused(tmp_path, write(tmp_path, recipe), "parameters.'dens\\nity': unknown",
                   model_files)


def test_tensors_rule_parameters_are_checked(models: dict[str, Path],
                                             model_files: dict[Path, str],
                                             tmp_path: Path) -> None:
    recipe = base_recipe(REGISTRY["task_arithmetic"], models)
    recipe["tensors"] = [{"filter": "norm", "method": "pcb", "parameters": {"clip": 0.5}}]
    assert_refused(tmp_path, write(tmp_path, recipe),
                   "tensors[0].parameters.clip: must be a number in [0, 0.5), got 0.5",
                   model_files)


def test_evolution_inner_merge_parameters_are_checked(models: dict[str, Path],
                                                      model_files: dict[Path, str],
                                                      tmp_path: Path) -> None:
    recipe = {
        "merge_method": "evolver", "base_model": str(models["base"]),
        "models": [{"model": str(models["m1"])}, {"model": str(models["m2"])}],
        "merge": {"merge_method": "ties", "parameters": {"lambda": math.nan}},
        "fitness": {"type": "callable", "function": "nowhere:f", "select": "s.npz"},
    }
    assert_refused(tmp_path, write(tmp_path, recipe), "merge.parameters.lambda: must be a "
                   "number in [-1e6, 1e6], got nan", model_files, "run")


# ------------------------------------------------------------ rules across parameters
@pytest.mark.parametrize("weights", [[1.0, -1.0], [1e6, -999999.9999999], [0.0, 0.0],
                                     [0.1 + 0.2, -0.3]])
def test_linear_weights_that_cancel(weights: list[float], models: dict[str, Path],
                                    model_files: dict[Path, str], tmp_path: Path) -> None:
    recipe = base_recipe(REGISTRY["linear"], models)
    for entry, w in zip(recipe["models"], weights, strict=True):
        entry["parameters"] = {"weight": w}
    assert_refused(tmp_path, write(tmp_path, recipe), "linear: the weights for tensor '",
                   model_files, "run")


def test_pcb_model_count(models: dict[str, Path], model_files: dict[Path, str],
                         tmp_path: Path) -> None:
    recipe = base_recipe(REGISTRY["pcb"], models)
    recipe["models"] = [{"model": str(models["m1"])}] * (MAX_MODELS + 1)
    assert_refused(tmp_path, write(tmp_path, recipe),
                   f"models: pcb merges at most {MAX_MODELS} models", model_files)


# ---------------------------------------------------------------------- reading hazards
def _bomb() -> str:
    """Ten levels of ten aliases each: 10^10 values once expanded, 150 bytes on disk."""
    lines = ["    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"    l{i}: &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 10)]
    return "\n".join(lines) + "\n"


READ_HAZARDS: dict[str, tuple[str | bytes, str]] = {
    "not-utf8": (b"merge_method: linear\nname: caf\xe9\n", "not UTF-8 text (byte 0xe9"),
    "utf16": ("merge_method: linear\n".encode("utf-16"), "not UTF-8 text"),
    "deep-nesting": ("[" * 10_000 + "]" * 10_000, f"nested more than {MAX_YAML_DEPTH} levels"),
    "deep-mapping": ("".join(" " * i + "a:\n" for i in range(300)), "nested more than"),
    "alias-bomb": ("merge_method: evolver\nfitness:\n  type: torch\n  arch_kwargs:\n"
                   + _bomb(), f"aliases expand it past {MAX_YAML_VALUES} values"),
    "alias-depth": ("a: &a [[[[[[[[[[1]]]]]]]]]]\n" + "".join(
        f"a{i}: &a{i} [[[[[[[[[[*{'a' if i == 0 else f'a{i - 1}'}]]]]]]]]]]\n"
        for i in range(12)), "aliases nest it more than"),
    "recursive-alias": ("merge_method: linear\nmodels: &m [*m]\n", "an alias refers to a value"),
    "nul-byte": ("merge_method: linear\n\x00\n", "unacceptable character #x0000"),
    "huge-int": ("seed: " + "9" * 5000 + "\n", "not valid YAML"),
    "bad-date": ("merge_method: linear\nname: 2024-13-45\n", "not valid YAML"),
    "python-tag": ("merge_method: !!python/object/apply:os.system [true]\n",
                   "not valid YAML"),
    "two-documents": ("merge_method: linear\n---\nmerge_method: ties\n", "line 2 not valid"),
    "invalid": ("merge_method: [linear\n", "not valid YAML"),
    "empty": ("", "a recipe is a YAML mapping"),
    "a-list": ("- merge_method: linear\n", "a recipe is a YAML mapping"),
    "too-large": ("merge_method: linear\nname: '" + "x" * (2 * MAX_YAML_BYTES) + "'\n",
                  "too large for a recipe"),
}


@pytest.mark.parametrize("name", list(READ_HAZARDS))
@pytest.mark.parametrize("command", ["validate", "run"])
def test_unreadable_recipe_content(name: str, command: str, model_files: dict[Path, str],
                                   tmp_path: Path) -> None:
    content, expect = READ_HAZARDS[name]
    path = write(tmp_path, content, f"{name}.yaml")
    line = assert_refused(tmp_path, path, expect, model_files, command)
    assert str(path) in line


def test_unreadable_recipe_paths(model_files: dict[Path, str], tmp_path: Path) -> None:
    long_name = tmp_path / ("r" * 300 + ".yaml")
    assert_refused(tmp_path, long_name, "File name too long", model_files)
    assert_refused(tmp_path, tmp_path, "it is a directory, not a regular file", model_files)
    assert_refused(tmp_path, tmp_path / "missing.yaml", "No such file", model_files, "run")
    (tmp_path / "dangling.yaml").symlink_to(tmp_path / "nowhere")
    assert_refused(tmp_path, tmp_path / "dangling.yaml", "No such file", model_files)
    odd = write(tmp_path, "merge_method: [\n", "odd\nname.yaml")
    assert_refused(tmp_path, odd, repr(str(odd)), model_files)
    if os.geteuid() != 0:  # root reads anything
        locked = write(tmp_path, "merge_method: linear\n", "locked.yaml")
        locked.chmod(0)
        assert_refused(tmp_path, locked, "Permission denied", model_files)


def _cli_with_timeout(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess (as conftest's run_cli) with a short timeout: a regression
    that blocks on a FIFO or reads a device forever fails here instead of hanging."""
    return subprocess.run([sys.executable, "-m", "mergekit_pcb", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_recipe_that_would_block_or_never_end(kind: str, tmp_path: Path) -> None:
    recipe = tmp_path / "recipe.yaml"
    if kind == "fifo":
        os.mkfifo(recipe)
        expect = "it is a FIFO, not a regular file"
    else:
        if not Path("/dev/zero").exists():
            pytest.skip("no /dev/zero")
        recipe.symlink_to("/dev/zero")
        expect = "it is a character device, not a regular file"
    proc = _cli_with_timeout("run", recipe, "-o", tmp_path / "OUT", "--quiet")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [f"error: cannot read recipe {recipe}: {expect}"]
    assert not (tmp_path / "OUT").exists()


# -------------------------------------------------------------------- accepted values
def accepted_values(b: Range) -> list[float]:
    """The bounds themselves where closed, the nearest inside values where open."""
    return [b.low if not b.low_open else math.nextafter(b.low, math.inf),
            b.high if not b.high_open else math.nextafter(b.high, -math.inf)]


@pytest.mark.parametrize("method, param", sorted({(c.name, s.name)
                                                  for c, s in numeric_specs()}))
def test_boundary_values_are_accepted(method: str, param: str, models: dict[str, Path],
                                      tmp_path: Path) -> None:
    cls = REGISTRY[method]
    spec = cls.param_spec(param)
    assert spec is not None and spec.bounds is not None
    for value in accepted_values(spec.bounds):
        recipe = base_recipe(cls, models)
        if spec.per_model:
            recipe["models"][1]["parameters"] = {param: value}
        else:
            recipe["parameters"] = {param: value}
        code, stderr = invoke(["validate", str(write(tmp_path, recipe))])
        assert code == 0, (value, stderr)


def test_methods_listing_shows_ranges() -> None:
    result = CliRunner().invoke(app, ["methods", "--json"])
    assert result.exit_code == 0
    import json

    docs = {(m, p["name"]): p["doc"] for m, d in json.loads(result.stdout).items()
            for p in d["parameters"]}
    for cls, spec in numeric_specs():
        assert docs[(cls.name, spec.name)].endswith(f"in {spec.bounds}")
    assert docs[("ties", "density")].endswith("in [1e-6, 1]")
    assert docs[("pcb", "clip")].endswith("in [0, 0.5)")


def test_gradient_rounding_stays_inside_the_range() -> None:
    # (1 − f)·1e-6 + f·1e-6 rounds below 1e-6 at this f; the interpolation must not.
    t = 0.03897429296742427
    assert evaluate([1e-6, 1e-6], "model.layers.1.x", t) == 1e-6


def run_merge(tmp_path: Path, recipe: dict[str, Any]) -> dict[str, torch.Tensor]:
    out = tmp_path / "merged"
    code, stderr = invoke(["run", str(write(tmp_path, recipe)), "-o", str(out), "--quiet"])
    assert code == 0, stderr
    return tensors_of(out)


def test_linear_boundaries_hand_computed(models: dict[str, Path], tmp_path: Path) -> None:
    m1, m2 = tensors_of(models["m1"]), tensors_of(models["m2"])
    recipe = base_recipe(REGISTRY["linear"], models)
    recipe["models"][0]["parameters"] = {"weight": 0}  # weight 0 for one model: m2 alone
    for name, t in run_merge(tmp_path / "a", recipe).items():
        assert torch.equal(t, m2[name])
    recipe["models"][0]["parameters"] = {"weight": 1}
    recipe["models"][1]["parameters"] = {"weight": 3}
    for name, t in run_merge(tmp_path / "b", recipe).items():
        assert torch.equal(t, (m1[name] + 3 * m2[name]) / 4)
    # A gradient over the two layers: m1's weight 0 at layer 0 (and outside the layers),
    # 1 at layer 1; m2's weight 1 everywhere.
    recipe["models"][0]["parameters"] = {"weight": [0, 1]}
    recipe["models"][1]["parameters"] = {"weight": 1}
    merged = run_merge(tmp_path / "c", recipe)
    assert torch.equal(merged[TENSORS[0]], m2[TENSORS[0]])
    assert torch.equal(merged[TENSORS[1]], (m1[TENSORS[1]] + m2[TENSORS[1]]) / 2)
    assert torch.equal(merged[TENSORS[2]], m2[TENSORS[2]])


def test_task_arithmetic_boundaries_hand_computed(models: dict[str, Path],
                                                  tmp_path: Path) -> None:
    base, m1, m2 = (tensors_of(models[k]) for k in ("base", "m1", "m2"))
    recipe = base_recipe(REGISTRY["task_arithmetic"], models)
    recipe["parameters"] = {"lambda": 0}
    for name, t in run_merge(tmp_path / "a", recipe).items():
        assert torch.equal(t, base[name])
    recipe["parameters"] = {"lambda": 0.5}
    recipe["models"][0]["parameters"] = {"weight": 0.5}
    recipe["models"][1]["parameters"] = {"weight": 2}
    for name, t in run_merge(tmp_path / "b", recipe).items():
        tau1, tau2 = m1[name] - base[name], m2[name] - base[name]
        assert torch.equal(t, base[name] + 0.5 * (0.5 * tau1 + 2 * tau2))


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "pcb"])
def test_density_one_keeps_every_entry(method: str, models: dict[str, Path],
                                       tmp_path: Path) -> None:
    """density 1 (the upper bound) with one model: nothing trimmed or dropped, so the
    merge is base + λ·τ for TIES/DARE; PCB's soft weights are a mean over one task."""
    base, m1 = tensors_of(models["base"]), tensors_of(models["m1"])
    recipe = base_recipe(REGISTRY[method], models)
    recipe["models"] = [{"model": str(models["m1"]), "parameters": {"density": 1.0}}]
    recipe["parameters"] = {"lambda": 1.5}
    if method == "pcb":
        recipe["parameters"]["clip"] = 0
    for name, t in run_merge(tmp_path, recipe).items():
        tau = m1[name] - base[name]
        if method == "pcb":  # entries whose score is the row minimum get soft weight 0
            kept = t != base[name]
            assert torch.equal(t[kept], (base[name] + 1.5 * tau)[kept])
        else:
            torch.testing.assert_close(t, base[name] + 1.5 * tau, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method, top, per_model", [
    ("ties", {}, [{"weight": 0}, {"weight": 0}]),  # the divisor of nothing agreeing is 1
    ("dare_ties", {"normalize": True}, [{"weight": 0}, {"weight": 0}]),
    ("dare_linear", {}, [{"density": 1e-6}, {"density": 1e-6}]),
    ("pcb", {"clip": math.nextafter(0.5, 0), "scope": "tensor"},
     [{"density": 1e-6}, {"density": 1e-6}]),
    ("task_arithmetic", {"lambda": 1e6}, [{"weight": 1e6}, {"weight": -1e6}]),
])
def test_extreme_accepted_values_merge_finite(method: str, top: dict[str, Any],
                                              per_model: list[dict[str, Any]],
                                              models: dict[str, Path], tmp_path: Path) -> None:
    """Whatever the plan accepts, the method merges without NaN or Inf (float32 here)."""
    base = tensors_of(models["base"])
    recipe = base_recipe(REGISTRY[method], models)
    recipe["parameters"] = top
    for entry, params in zip(recipe["models"], per_model, strict=True):
        entry["parameters"] = params
    merged = run_merge(tmp_path, recipe)
    assert all(torch.isfinite(t).all() for t in merged.values())
    if method in ("ties", "dare_ties"):
        assert all(torch.equal(t, base[name]) for name, t in merged.items())
