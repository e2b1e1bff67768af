"""Bad input: one clear line on stderr, exit code 2, and nothing left at the destination."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest
import torch
from conftest import finetune_like, run_cli, save_hf, tiny_model, write_recipe
from safetensors.torch import save_file

from mergekit_pcb.engine import merge_recipe_file
from mergekit_pcb.errors import OutputError


@pytest.fixture
def llama(hf_models) -> tuple[Path, list[Path]]:
    return hf_models("llama")


def ties_recipe(base: Path | str, tuned: list[Path | str], **extra: object) -> dict:
    return {
        "merge_method": "ties", "base_model": str(base),
        "models": [{"model": str(t), "parameters": {"weight": 1.0, "density": 0.5}}
                   for t in tuned],
        **extra,
    }


def assert_fails(tmp_path: Path, recipe: dict | Path, message: str, *extra: str) -> str:
    path = recipe if isinstance(recipe, Path) else write_recipe(tmp_path / "r.yaml", recipe)
    out = tmp_path / "out"
    proc = run_cli("run", path, "-o", out, "--quiet", *extra)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and message in lines[0], lines[0]
    assert not out.exists()
    assert not list(tmp_path.glob(".out.*")), "a partial output was left behind"
    return lines[0]


def test_missing_model(llama, tmp_path: Path) -> None:
    base, tuned = llama
    missing = tmp_path / "no-such-model"
    assert_fails(tmp_path, ties_recipe(base, [tuned[0], missing]), f"model not found: {missing}")


def test_corrupt_header(llama, tmp_path: Path) -> None:
    base, tuned = llama
    shard = sorted(tuned[1].glob("*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[8:20] = b"not json!!!!"
    shard.write_bytes(bytes(data))
    assert_fails(tmp_path, ties_recipe(base, tuned), f"corrupt safetensors file {shard}")


def test_truncated_shard(llama, tmp_path: Path) -> None:
    base, tuned = llama
    shard = sorted(tuned[0].glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    line = assert_fails(tmp_path, ties_recipe(base, tuned), f"truncated safetensors file {shard}")
    assert "tensor '" in line


def test_shape_mismatch_names_tensor_and_models(tmp_path: Path) -> None:
    base = tiny_model("llama", 0)
    base_dir = save_hf(base, tmp_path / "base")
    ok = save_hf(finetune_like(base, 1), tmp_path / "ft-ok")
    other = finetune_like(base, 2)
    other.resize_token_embeddings(120)  # a fine-tune that grew its vocabulary
    bad = save_hf(other, tmp_path / "ft-bigvocab")
    line = assert_fails(tmp_path, ties_recipe(base_dir, [ok, bad]), "shape mismatch for tensor")
    assert "embed_tokens.weight" in line or "lm_head.weight" in line
    assert str(bad) in line and "[120, 32]" in line and "[96, 32]" in line


def test_unknown_recipe_key(llama, tmp_path: Path) -> None:
    base, tuned = llama
    recipe = ties_recipe(base, tuned)
    recipe["models"][1]["paramters"] = {"weight": 1}
    assert_fails(tmp_path, recipe, "unknown key 'models[1].paramters'")


def test_unknown_method_parameter(llama, tmp_path: Path) -> None:
    base, tuned = llama
    recipe = ties_recipe(base, tuned, parameters={"densty": 0.5})
    assert_fails(tmp_path, recipe, "parameters.densty: unknown parameter for ties")


def test_wrong_type_and_missing_key(llama, tmp_path: Path) -> None:
    base, tuned = llama
    recipe = ties_recipe(base, tuned)
    recipe["models"][0]["parameters"]["density"] = "lots"
    assert_fails(tmp_path, recipe, "models[0].parameters.density: must be a number")
    del recipe["merge_method"]
    assert_fails(tmp_path, recipe, "missing required key 'merge_method'")


def test_existing_output_needs_force(llama, tmp_path: Path) -> None:
    base, tuned = llama
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(base, tuned))
    proc = run_cli("run", recipe, "-o", out, "--quiet")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: output {out} already exists; pass --force to replace it"
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces only what a pcbmerge run wrote: this folder is the user's
    proc = run_cli("run", recipe, "-o", out, "--quiet", "--force")
    assert proc.returncode == 2
    assert "was not written by pcbmerge" in proc.stderr
    assert (out / "keep.txt").read_text() == "precious"
    (out / "keep.txt").unlink()
    proc = run_cli("run", recipe, "-o", out, "--quiet", "--force")  # empty: nothing to lose
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("run", recipe, "-o", out, "--quiet", "--force")  # a previous run's output
    assert proc.returncode == 0, proc.stderr
    assert (out / "model.safetensors").is_file() and (out / ".pcbmerge-output").is_file()


def test_pickle_refused_unless_allowed(tmp_path: Path) -> None:
    base = tiny_model("gpt2", 0)
    base_dir = save_hf(base, tmp_path / "base")
    tuned = finetune_like(base, 1)
    pickled = tmp_path / "ft-pickled"
    pickled.mkdir()
    # transformers 5 writes only safetensors; write the legacy pickle layout by hand
    torch.save({k: v.clone() for k, v in tuned.state_dict().items() if k != "lm_head.weight"},
               pickled / "pytorch_model.bin")
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(base_dir, [pickled]))
    assert_fails(tmp_path, recipe, "is a pickled checkpoint")
    proc = run_cli("run", recipe, "-o", tmp_path / "out", "--quiet", "--allow-pickle")
    assert proc.returncode == 0, proc.stderr
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "out" / "model.safetensors")
    name = "transformer.h.1.attn.c_attn.weight"
    expected = tuned.state_dict()[name]  # one task vector at weight 1: TIES keeps its top half
    kept = merged[name] != base.state_dict()[name]
    torch.testing.assert_close(merged[name][kept], expected[kept])
    assert abs(kept.float().mean().item() - 0.5) < 0.01


def test_nan_input_leaves_nothing(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    save_file({"w": torch.ones(4, 4), "v": torch.zeros(3)}, a / "model.safetensors")
    bad = torch.ones(3)
    bad[1] = float("nan")
    save_file({"w": torch.ones(4, 4), "v": bad}, b / "model.safetensors")
    recipe = {"merge_method": "linear", "models": [{"model": str(a)}, {"model": str(b)}]}
    assert_fails(tmp_path, recipe, f"tensor 'v' of model {b} contains NaN or Inf")


def test_tensor_missing_from_one_input(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    save_file({"w": torch.ones(2), "v": torch.ones(2)}, a / "model.safetensors")
    save_file({"w": torch.ones(2)}, b / "model.safetensors")
    recipe = {"merge_method": "task_arithmetic", "base_model": str(a),
              "models": [{"model": str(b)}]}
    assert_fails(tmp_path, recipe, f"tensor 'v' is missing from model {b}")


def test_disk_full_is_one_line_and_cleans_up(llama, tmp_path: Path, monkeypatch) -> None:
    base, tuned = llama
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(base, tuned))

    def no_space(_tensor: torch.Tensor) -> memoryview:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mergekit_pcb.io.writer.tensor_bytes", no_space)
    with pytest.raises(OutputError, match="disk full while writing the output"):
        merge_recipe_file(recipe, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.*"))


def test_validate_reports_without_writing(llama, tmp_path: Path) -> None:
    base, tuned = llama
    recipe = write_recipe(tmp_path / "r.yaml", ties_recipe(base, tuned))
    proc = run_cli("validate", recipe, "--json")
    assert proc.returncode == 0, proc.stderr
    import json

    info = json.loads(proc.stdout)
    assert info["tensors"] == 21 and info["method"] == "ties"
    expected = sum(f.stat().st_size for d in (base, *tuned) for f in d.glob("*.safetensors"))
    assert 0.9 * expected < info["read_bytes"] <= expected  # file sizes include headers
    proc = run_cli("run", recipe, "-o", tmp_path / "out", "--dry-run")
    assert proc.returncode == 0 and not (tmp_path / "out").exists()


def test_internal_error_exit_code_is_1(tmp_path: Path, monkeypatch) -> None:
    from typer.testing import CliRunner

    from mergekit_pcb.cli import app

    def boom(*_a: object, **_k: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr("mergekit_pcb.kinds.kind_of", boom)
    (tmp_path / "r.yaml").write_text("merge_method: linear\n")
    result = CliRunner().invoke(app, ["validate", str(tmp_path / "r.yaml")])
    assert result.exit_code == 1
    assert "internal error: RuntimeError: bug" in result.output


@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_recipe_that_is_not_yaml_is_refused_before_torch_loads(tmp_path: Path,
                                                                 command: str) -> None:
    """A YAML syntax error is refused without importing torch (seconds, before anything
    else is said): the kinds, and torch with them, are imported once the recipe has parsed."""
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("merge_method: [unclosed\n")
    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from mergekit_pcb.cli import app\n"
            f"r = CliRunner().invoke(app, [{command!r}, {str(bad)!r}, '-o', 'out'][:2 + 2 * "
            f"({command!r} == 'run')])\n"
            "print(r.exit_code, 'torch' in sys.modules)\n"
            "print(r.stderr.strip())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path)
    status, line = out.stdout.splitlines()[:2]
    assert status == "2 False", out.stdout
    assert line.startswith(f"error: {bad}: line 2 not valid YAML"), line


@pytest.mark.parametrize("ref", ["no-such-model", "no-such-org/no-such-model"])
def test_inspect_refuses_a_model_that_is_not_there_before_torch_loads(tmp_path: Path,
                                                                      ref: str) -> None:
    """A missing path, or a hub id not in the (empty, offline) cache, is refused with its one
    line before the reader imports torch."""
    import os
    import subprocess
    import sys

    code = ("import sys\n"
            "from typer.testing import CliRunner\n"
            "from mergekit_pcb.cli import app\n"
            f"r = CliRunner().invoke(app, ['inspect', {ref!r}])\n"
            "print(r.exit_code, 'torch' in sys.modules)\n"
            "print(r.stderr.strip())\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=tmp_path, env=env)
    status, line = out.stdout.splitlines()[:2]
    assert status == "2 False", out.stdout
    assert line == (f"error: model not found: {ref} is not a local path and is not in the "
                    "Hugging Face cache (HF_HUB_OFFLINE is set)" if "/" in ref else
                    f"error: model not found: {ref} (no such file or directory)")
