"""End to end: tiny sharded HF checkpoints merged through the CLI, loaded back, compared.

The expected tensors are computed in memory from the inputs' state dicts with the
formulas of methods.md; the CLI path adds everything else (lazy reading over shards,
routing, sharded writing, config and tokenizer copying).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_recipe
from safetensors.torch import load_file

from mergekit_pcb.methods.ties import ties_merge

AUTO_CLASS = {"llama": "AutoModelForCausalLM", "gpt2": "AutoModelForCausalLM",
              "bert": "AutoModelForSequenceClassification"}


def load_state(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(f))
    return state


def expected_merge(method: str, base: dict[str, torch.Tensor],
                   tuned: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    weights, densities, lam = [1.0, 0.5], [0.6, 0.4], 0.8
    out = {}
    for name, b in base.items():
        ts = [t[name] for t in tuned]
        if method == "linear":
            out[name] = sum(w * t for w, t in zip(weights, ts, strict=True)) / sum(weights)
        elif method == "task_arithmetic":
            out[name] = b + lam * sum(w * (t - b) for w, t in zip(weights, ts, strict=True))
        else:
            out[name] = ties_merge(b, ts, weights, densities, lambda_=lam, normalize=True)
    return out


def recipe_for(method: str, base: Path, tuned: list[Path]) -> dict:
    weights, densities = [1.0, 0.5], [0.6, 0.4]
    models = [{"model": str(t), "parameters": {"weight": w}}
              for t, w in zip(tuned, weights, strict=True)]
    recipe: dict = {"merge_method": method, "models": models, "dtype": "float32"}
    if method == "linear":  # no base: the tokenizer is named explicitly
        recipe["tokenizer_source"] = str(base)
    else:
        recipe["base_model"] = str(base)
        recipe["parameters"] = {"lambda": 0.8}
    if method == "ties":
        for m, d in zip(models, densities, strict=True):
            m["parameters"]["density"] = d
        recipe["parameters"]["normalize"] = True
    return recipe


@pytest.mark.parametrize("arch", ["llama", "bert", "gpt2"])
@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties"])
def test_merge_loads_with_from_pretrained(hf_models, tmp_path: Path, arch: str,
                                         method: str) -> None:
    import transformers

    base_dir, tuned_dirs = hf_models(arch)
    assert len(list(base_dir.glob("*.safetensors"))) >= 2  # inputs really are sharded
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_for(method, base_dir, tuned_dirs))
    out = tmp_path / "merged"
    proc = run_cli("run", recipe, "-o", out, "--shard-size", "30KB", "--quiet")
    assert proc.returncode == 0, proc.stderr

    # Output: sharded with an index, config and tokenizer carried over, card and recipe.
    assert len(list(out.glob("model-*.safetensors"))) >= 2
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(load_state(out))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md",
                 "merge_recipe.yaml"):
        assert (out / name).is_file(), name
    assert method in (out / "README.md").read_text()

    base = load_state(base_dir)
    tuned = [load_state(d) for d in tuned_dirs]
    expected = expected_merge(method, base, tuned)
    written = load_state(out)
    assert set(written) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(written[name], value, rtol=1e-6, atol=1e-7, msg=name)

    model = getattr(transformers, AUTO_CLASS[arch]).from_pretrained(out)
    loaded = model.state_dict()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value, rtol=1e-6, atol=1e-7, msg=name)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("w3 w4")["input_ids"] == [5, 6]


def test_dare_same_seed_same_output_whatever_tensor_order(hf_models, tmp_path: Path) -> None:
    """Re-sharding the inputs changes the order tensors stream in; the output must not move."""
    base_dir, tuned_dirs = hf_models("llama")
    state = load_state(base_dir)
    from safetensors.torch import save_file

    reordered = tmp_path / "llama-base-reordered"
    reordered.mkdir()
    names = sorted(state, reverse=True)
    save_file({n: state[n].contiguous() for n in names}, reordered / "model.safetensors")
    for f in ("config.json",):
        (reordered / f).write_text((base_dir / f).read_text())

    outputs = []
    for i, base in enumerate((base_dir, reordered, base_dir)):
        recipe = {
            "merge_method": "dare_ties", "base_model": str(base), "seed": 1234 if i < 2 else 99,
            "models": [{"model": str(t), "parameters": {"weight": 1.0, "density": 0.5}}
                       for t in tuned_dirs],
        }
        path = write_recipe(tmp_path / f"dare{i}.yaml", recipe)
        proc = run_cli("run", path, "-o", tmp_path / f"dare-out{i}", "--quiet")
        assert proc.returncode == 0, proc.stderr
        outputs.append(load_state(tmp_path / f"dare-out{i}"))
    first, second, other_seed = outputs
    assert set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name
    assert any(not torch.equal(first[n], other_seed[n]) for n in first)
    # Half the task-vector entries really were dropped somewhere (not a no-op).
    w = "model.layers.0.mlp.up_proj.weight"
    changed = (first[w] != state[w]).float().mean().item()
    assert 0.5 < changed < 0.95


def test_seed_flag_overrides_recipe(hf_models, tmp_path: Path) -> None:
    base_dir, tuned_dirs = hf_models("gpt2")
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "dare_linear", "base_model": str(base_dir), "seed": 5,
        "models": [{"model": str(t), "parameters": {"density": 0.3}} for t in tuned_dirs],
    })
    runs = {}
    for tag, extra in (("recipe", []), ("flag5", ["--seed", "5"]), ("flag6", ["--seed", "6"])):
        proc = run_cli("run", recipe, "-o", tmp_path / tag, "--quiet", *extra)
        assert proc.returncode == 0, proc.stderr
        runs[tag] = load_state(tmp_path / tag)
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(runs["recipe"][name], runs["flag5"][name])
    assert not torch.equal(runs["recipe"][name], runs["flag6"][name])


def test_buffers_rules_and_card(tmp_path: Path) -> None:
    """Integer buffers come from the base, running stats are averaged, rules route tensors."""
    from safetensors.torch import save_file

    def net(seed: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed)
        m = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.BatchNorm1d(6),
                                torch.nn.Linear(6, 3))
        m.train()
        m(torch.randn(16, 4) * (seed + 1))  # distinct running statistics per model
        return {k: v.contiguous() for k, v in m.state_dict().items()}

    states = [net(s) for s in range(3)]
    dirs = []
    for i, s in enumerate(states):
        d = tmp_path / f"m{i}"
        d.mkdir()
        save_file(s, d / "model.safetensors")
        dirs.append(d)
    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": str(dirs[0]),
        "models": [{"model": str(d), "parameters": {"weight": 1.0}} for d in dirs[1:]],
        "parameters": {"lambda": 0.5},
        "tensors": [{"filter": "2.weight", "take": str(dirs[2])},
                    {"filter": "2.bias", "method": "linear"}],
    })
    proc = run_cli("run", recipe, "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    out = load_state(tmp_path / "out")
    b, f1, f2 = states
    assert torch.equal(out["1.num_batches_tracked"], b["1.num_batches_tracked"])
    for stat in ("1.running_mean", "1.running_var"):
        torch.testing.assert_close(out[stat], (f1[stat] + f2[stat]) / 2)
    assert bool((out["1.running_var"] > 0).all())
    torch.testing.assert_close(out["0.weight"],
                               b["0.weight"] + 0.5 * (f1["0.weight"] - b["0.weight"]
                                                      + f2["0.weight"] - b["0.weight"]))
    assert torch.equal(out["2.weight"], f2["2.weight"])
    torch.testing.assert_close(out["2.bias"], (f1["2.bias"] + f2["2.bias"]) / 2)
    card = (tmp_path / "out" / "README.md").read_text()
    assert "tensors[0] (filter '2.weight'): taken from" in card
    assert "tensors[1] (filter '2.bias'): linear | 1 |" in card
    assert "running statistics) | 2 |" in card
    assert "integer or boolean buffers) | 1 |" in card
