"""Hostile runs: code named by a recipe, outputs aimed at inputs, edited run states, resumes
after the code or the base changed, parameters that overflow. Each is refused with one line
and exit 2, and leaves every input as it was."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import write_recipe as write_yaml
from safetensors.torch import load_file, save_file
from test_evolve_engine import build_population, recipe_dict, write_recipe
from typer.testing import CliRunner

from mergekit_pcb.cli import app


def cli(*args: str | Path, cwd: Path | None = None,
        monkeypatch: pytest.MonkeyPatch | None = None) -> Any:
    if cwd is not None:
        assert monkeypatch is not None
        monkeypatch.chdir(cwd)
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(res: Any) -> str:
    assert res.exit_code == 2, res.output
    lines = [line for line in res.output.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def digest_tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture
def pop_dir(tmp_path: Path) -> Path:
    return build_population(tmp_path / "pop")


# ----------------------------------------------------------------------------- code consent


@pytest.mark.parametrize("command", ["run", "evolve"])
def test_recipe_code_needs_trust_code(pop_dir: Path, command: str) -> None:
    sentinel = pop_dir / "ran"
    (pop_dir / "evil.py").write_text(
        f"open({str(sentinel)!r}, 'w').write('import-time code ran')\n"
        "def build():\n    raise SystemExit('called')\n")
    data = recipe_dict(pop_dir)
    data["fitness"]["arch"] = "evil:build"
    recipe = write_recipe(pop_dir, data)
    before = digest_tree(pop_dir)
    line = one_line(cli(command, recipe, "-o", pop_dir / "out"))
    assert "fitness.arch: 'evil:build' is code (module 'evil')" in line
    assert "--trust-code" in line
    assert not sentinel.exists() and not (pop_dir / "out").exists()
    assert not (pop_dir / "out.run").exists()
    assert digest_tree(pop_dir) == before


def test_eval_needs_trust_code_and_os_system_never_runs(pop_dir: Path) -> None:
    data = recipe_dict(pop_dir, fitness="callable")
    data["fitness"]["function"] = "os:system"
    recipe = write_recipe(pop_dir, data)
    line = one_line(cli("eval", pop_dir / "m0", "--fitness", recipe))
    assert "fitness.function: 'os:system' is code (module 'os')" in line


def test_arch_kwargs_must_be_plain_data(pop_dir: Path) -> None:
    data = recipe_dict(pop_dir)
    data["fitness"]["arch_kwargs"] = {"hidden": float("nan")}
    line = one_line(cli("evolve", write_recipe(pop_dir, data), "-o", pop_dir / "o",
                        "--trust-code"))
    assert "fitness.arch_kwargs.hidden: must be a finite number" in line


def test_dry_run_names_the_code_without_running_it(pop_dir: Path) -> None:
    res = cli("run", write_recipe(pop_dir, recipe_dict(pop_dir)), "-o", pop_dir / "o",
              "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["code"] == {"fitness.arch": "tinynet:build"}


# ----------------------------------------------------------------------------- inputs are sacred


def _merge_recipe(pop_dir: Path) -> Path:
    return write_yaml(pop_dir / "merge.yaml", {
        "merge_method": "ties", "base_model": str(pop_dir / "base"),
        "models": [{"model": str(pop_dir / f"m{i}"), "parameters": {"density": 0.5}}
                   for i in range(2)]})


@pytest.mark.parametrize("target", ["m0", "base", ".", "base/model.safetensors", "link"])
def test_output_onto_an_input_is_refused_even_with_force(pop_dir: Path, target: str,
                                                         monkeypatch: pytest.MonkeyPatch
                                                         ) -> None:
    (pop_dir / "link").symlink_to(pop_dir / "m1")
    recipe = _merge_recipe(pop_dir)
    before = digest_tree(pop_dir)
    line = one_line(cli("run", recipe, "-o", target, "--force", cwd=pop_dir,
                        monkeypatch=monkeypatch))
    assert "refusing" in line
    assert digest_tree(pop_dir) == before


def test_run_dir_on_a_model_is_refused_even_with_force(pop_dir: Path) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir))
    before = digest_tree(pop_dir)
    line = one_line(cli("evolve", recipe, "-o", pop_dir / "o", "--run-dir", pop_dir / "m2",
                        "--force", "--trust-code"))
    assert "run directory" in line and "refusing" in line
    assert digest_tree(pop_dir) == before


def test_inputs_inside_the_output_folder_are_refused(pop_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = _merge_recipe(pop_dir)
    before = digest_tree(pop_dir)
    sub = pop_dir / "m0"
    line = one_line(cli("run", recipe, "-o", "..", "--force", cwd=sub, monkeypatch=monkeypatch))
    assert "refusing" in line
    assert digest_tree(pop_dir) == before


# ----------------------------------------------------------------------------- numbers


def test_an_output_that_overflows_names_the_tensor_and_parameters(tmp_path: Path) -> None:
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        save_file({"w": torch.full((4,), 60000.0, dtype=torch.float16)},
                  str(tmp_path / name / "model.safetensors"))
    recipe = write_yaml(tmp_path / "r.yaml", {
        "merge_method": "linear", "parameters": {"normalize": False},
        "models": [{"model": str(tmp_path / n), "parameters": {"weight": 1.0}}
                   for n in ("a", "b")]})
    line = one_line(cli("run", recipe, "-o", tmp_path / "out", "--quiet"))
    assert "tensor 'w'" in line and "NaN or Inf in float16" in line and "weight" in line
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------- run states


@pytest.mark.parametrize(("edit", "message"), [
    (lambda st: [], "not a JSON object"),
    (lambda st: {**st, "step": 99}, "'step' 99 is outside the population"),
    (lambda st: {**st, "step": -1}, "'step' is not a non-negative integer"),
    (lambda st: {**st, "members": ["../../base/model.safetensors", *st["members"][1:]]},
     "is not a member file name"),
    (lambda st: {**st, "plan": {"order": [0], "donors": [[9]], "F": 0.5, "CR": 0.5}},
     "corrupt run state"),
    (lambda st: {**st, "rng": {"controller": "x"}}, "corrupt run state"),
])
def test_a_malformed_run_state_is_refused(pop_dir: Path, edit: Any, message: str) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=1))
    assert cli("evolve", recipe, "-o", pop_dir / "o", "-q", "--trust-code").exit_code == 0
    state_path = pop_dir / "o.run" / "state.json"
    state = json.loads(state_path.read_text())
    state_path.write_text(json.dumps(edit(state)))
    line = one_line(cli("evolve", recipe, "-o", pop_dir / "o2", "--run-dir", pop_dir / "o.run",
                        "--resume", "--generations", "2", "--trust-code"))
    assert message in line


def test_resume_refuses_changed_fitness_code_and_base(pop_dir: Path) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=1))
    assert cli("evolve", recipe, "-o", pop_dir / "o", "-q", "--trust-code").exit_code == 0
    resume = ("evolve", recipe, "-o", pop_dir / "o2", "--run-dir", pop_dir / "o.run",
              "--resume", "--generations", "2", "--trust-code", "-q")
    module = pop_dir / "tinynet.py"
    original = module.read_text()
    module.write_text(original + "\n# changed\n")
    line = one_line(cli(*resume))
    assert "--resume: 'code' differs" in line
    module.write_text(original)
    base = pop_dir / "base" / "model.safetensors"
    weights = load_file(str(base))
    changed = {k: v + (1e-3 if i == 0 else 0) for i, (k, v) in enumerate(weights.items())}
    save_file(changed, str(base))
    line = one_line(cli(*resume))
    assert "--resume: 'base_weights' differs" in line
    save_file(weights, str(base))
    assert cli(*resume).exit_code == 0


def test_a_model_name_too_long_for_the_file_system(tmp_path: Path) -> None:
    recipe = write_yaml(tmp_path / "r.yaml", {"merge_method": "linear", "models": [
        {"model": "m" * 300}, {"model": "n" * 300}]})
    line = one_line(cli("run", recipe, "-o", tmp_path / "out", "--quiet"))
    assert "not a usable path (File name too long)" in line and "300 characters" in line


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--pop", "1", "--pop"), ("--generations", "-1", "--generations"),
    ("--workers", "0", "--workers must be at least 1"), ("--threads", "0", "--threads"),
    ("--shard-size", "inf", "--shard-size"),
])
def test_out_of_range_command_line_values(pop_dir: Path, flag: str, value: str,
                                          message: str) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir))
    line = one_line(cli("evolve", recipe, "-o", pop_dir / "o", flag, value, "--trust-code"))
    assert message in line
    assert not (pop_dir / "o").exists() and not (pop_dir / "o.run").exists()
