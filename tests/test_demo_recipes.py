"""Every example recipe in ``recipes/`` runs through the CLI and produces the right values.

The recipes name the demo's checkpoints relative to the working directory
(``pcbmerge-demo/checkpoints/<name>``), so the tests build tiny untrained checkpoints with
the demo's state-dict layout at that path inside a temporary directory and run there.
No training happens: random initialisations with distinct seeds are enough.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import conftest
import pytest
import torch
import yaml

from mergekit_pcb.kinds import kind_of

REPO = Path(__file__).resolve().parent.parent
# Plain merge recipes; evolution recipes need fitness data and are tested elsewhere.
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml")
                 if kind_of(yaml.safe_load(p.read_text()), p)[0].name == "merge")
CHECKPOINTS = ("base", "orig", "flip", "transpose", "rot90")
PREFIX = "pcbmerge-demo/checkpoints/"
# LoRA adapters of the fine-tuned checkpoints over the base, as the adapter recipes'
# comments make them (`pcbmerge extract-lora ... -o <name>-lora`)
ADAPTERS = ("orig", "flip", "transpose")
ADAPTER_RANK = 4
RUNNING_STATS = ("running_mean", "running_var")
DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
}


def load_demo() -> ModuleType:
    """Import ``scripts/demo.py`` by path (it is a script, not part of the package)."""
    name = "pcbmerge_demo_script"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / "demo.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses need the module registered while it executes
    spec.loader.exec_module(module)
    return module


demo = load_demo()


def make_checkpoint(name: str, seed: int, root: Path) -> None:
    """A randomly initialised demo MLP with distinct BatchNorm buffers, saved like the demo."""
    model = demo.build_model(seed, hidden=16)
    gen = torch.Generator().manual_seed(1000 + seed)
    with torch.no_grad():
        model.bn1.running_mean.copy_(torch.randn(model.bn1.running_mean.shape, generator=gen))
        model.bn1.running_var.copy_(torch.rand(model.bn1.running_var.shape, generator=gen) + 0.5)
        model.bn1.num_batches_tracked.fill_(100 + seed)
    demo.save_checkpoint(model, root / PREFIX / name)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("demo-recipes")
    for seed, name in enumerate(CHECKPOINTS):
        make_checkpoint(name, seed, root)
    from mergekit_pcb.engine.extract import extract_lora

    for name in ADAPTERS:
        extract_lora(str(root / PREFIX / name), str(root / PREFIX / "base"),
                     root / PREFIX / f"{name}-lora", rank=ADAPTER_RANK)
    return root


@pytest.fixture
def in_workdir(workdir: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(workdir)
    yield workdir


def run_cli(recipe: Path, out: Path) -> subprocess.CompletedProcess[str]:
    return conftest.run_cli("run", recipe, "-o", out, "--quiet")


def load(ref: str) -> dict[str, torch.Tensor]:
    if "+" in ref:  # BASE+ADAPTER: read as our reader reads it (tests/test_lora.py checks
        # that against peft)
        from mergekit_pcb.io.checkpoints import open_checkpoint

        with open_checkpoint(ref) as ckpt:
            return {n: ckpt.read(n).clone() for n in ckpt.names()}
    return demo.load_state(Path(ref))


def model_ref(recipe: dict[str, Any], entry: dict[str, Any]) -> str:
    """An entry's model; an `adapter:` entry is BASE+ADAPTER."""
    if "adapter" in entry:
        return f"{entry.get('model') or recipe['base_model']}+{entry['adapter']}"
    return str(entry["model"])


def scalar(value: Any, what: str) -> float:
    """Recipe parameter as a number; the hand-written formulas only cover scalars."""
    assert isinstance(value, (int, float)) and not isinstance(value, bool), (
        f"{what}: expected a scalar in this recipe, got {value!r}"
    )
    return float(value)


def model_weight(recipe: dict[str, Any], entry: dict[str, Any]) -> float:
    params = entry.get("parameters") or {}
    value = params.get("weight", (recipe.get("parameters") or {}).get("weight", 1.0))
    return scalar(value, f"{entry.get('model', entry.get('adapter'))} weight")


def merged_inputs(recipe: dict[str, Any]) -> list[dict[str, Any]]:
    """The model entries the method combines (the base is excluded for task-vector methods)."""
    base = recipe.get("base_model")
    entries = [{**m, "model": model_ref(recipe, m)} for m in recipe["models"]]
    if recipe["merge_method"] == "linear":
        return entries
    return [m for m in entries if m["model"] != base]


def expected_linear(recipe: dict[str, Any], name: str) -> torch.Tensor:
    """Σ wᵢθᵢ / Σ wᵢ (no division with ``normalize: false``)."""
    entries = merged_inputs(recipe)
    weights = [model_weight(recipe, m) for m in entries]
    total = sum(w * load(m["model"])[name].double() for w, m in zip(weights, entries, strict=True))
    if (recipe.get("parameters") or {}).get("normalize", True):
        total = total / sum(weights)
    return total


def expected_task_arithmetic(recipe: dict[str, Any], name: str) -> torch.Tensor:
    """θ₀ + λ Σ wᵢ(θᵢ − θ₀) (divided by Σ wᵢ with ``normalize: true``)."""
    params = recipe.get("parameters") or {}
    lam = scalar(params.get("lambda", 1.0), "lambda")
    base = load(recipe["base_model"])[name].double()
    entries = merged_inputs(recipe)
    weights = [model_weight(recipe, m) for m in entries]
    delta = sum(
        w * (load(m["model"])[name].double() - base) for w, m in zip(weights, entries, strict=True)
    )
    if params.get("normalize", False):
        delta = delta / sum(weights)
    return base + lam * delta


FORMULAS = {"linear": expected_linear, "task_arithmetic": expected_task_arithmetic}


def test_recipes_exist() -> None:
    stems = {p.stem for p in RECIPES}
    assert {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties"} <= stems


@pytest.mark.parametrize("recipe_path", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_runs_and_merges_correctly(
    recipe_path: Path, in_workdir: Path, tmp_path: Path
) -> None:
    recipe = yaml.safe_load(recipe_path.read_text())
    refs = [recipe.get("base_model"), *(model_ref(recipe, m) for m in recipe["models"])]
    assert all(ref is None or ref.startswith(PREFIX) for ref in refs), refs

    out = tmp_path / f"merged-{recipe_path.stem}"
    result = run_cli(recipe_path, out)
    assert result.returncode == 0, result.stdout + result.stderr
    merged = demo.load_state(out)

    reference_ref = recipe.get("base_model") or model_ref(recipe, recipe["models"][0])
    reference = load(reference_ref)
    assert set(merged) == set(reference)
    dtype_name = recipe.get("out_dtype") or recipe.get("dtype")
    finetuned = [load(m["model"]) for m in merged_inputs(recipe)]
    formula = FORMULAS.get(recipe["merge_method"])

    for name, ref_tensor in reference.items():
        tensor = merged[name]
        assert tensor.shape == ref_tensor.shape, name
        if not ref_tensor.dtype.is_floating_point:
            # integer buffers (num_batches_tracked) are copied from the base
            assert tensor.dtype == ref_tensor.dtype, name
            assert torch.equal(tensor, ref_tensor), name
            continue
        expected_dtype = DTYPES[dtype_name] if dtype_name else ref_tensor.dtype
        assert tensor.dtype == expected_dtype, name
        assert torch.isfinite(tensor).all(), name
        if name.endswith(RUNNING_STATS):
            # normalisation statistics are averaged over the fine-tuned models
            expected = torch.stack([sd[name].double() for sd in finetuned]).mean(dim=0)
        elif formula is not None:
            expected = formula(recipe, name)
        else:
            continue
        torch.testing.assert_close(
            tensor.double(), expected.to(torch.float64), rtol=1e-5, atol=1e-6, msg=name
        )
