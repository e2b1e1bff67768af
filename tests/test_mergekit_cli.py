"""mergekit-yaml's command line, unchanged (issue 31): `pcbmerge run CONFIG OUT_PATH` and our
`mergekit-yaml` console script, every flag of mergekit 0.1.5's `mergekit-yaml --help`
accepted with its effect checked or refused with one line; one-line and JSON errors;
`pcbmerge evolve --dry-run/--json`.

Everything runs in-process through the console scripts' entry functions (`main`,
`mergekit_yaml_main`) with an argv, on two tiny Llama checkpoints built once."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from conftest import finetune_like, save_hf, tiny_model, write_recipe, write_tokenizer_files
from safetensors import safe_open
from safetensors.torch import load_file

from mergekit_pcb.cli import main, mergekit_yaml_main
from mergekit_pcb.io.writer import parse_size
from mergekit_pcb.mergekit_compat import MERGEKIT_YAML_FLAGS

MERGEKIT_VENV = Path("/work/main/.bench/mergekit-venv")

# The flags of mergekit 0.1.5's `mergekit-yaml --help`, as it prints them (checked against
# the real one below when its venv is here). Each is walked in `WALK`.
MERGEKIT_YAML_HELP_FLAGS = [
    ("--allow-crimes", "--no-allow-crimes"),
    ("--unsafe-truncate-embeddings", "--no-unsafe-truncate-embeddings"),
    ("--trust-remote-code", "--no-trust-remote-code"),
    ("--transformers-cache",), ("--lora-merge-cache",), ("--lora-merge-dtype",),
    ("--random-seed",), ("-v",), ("--quiet", "--no-quiet"), ("--cuda", "--no-cuda"),
    ("--device",), ("--low-cpu-memory", "--no-low-cpu-memory"),
    ("--lazy-unpickle", "--no-lazy-unpickle"), ("--read-to-gpu", "--no-read-to-gpu"),
    ("--multi-gpu", "--no-multi-gpu"), ("-j", "--num-threads"), ("--gpu-rich",),
    ("--async-write", "--no-async-write"), ("--write-threads",), ("--out-shard-size",),
    ("--copy-tokenizer", "--no-copy-tokenizer"), ("--clone-tensors", "--no-clone-tensors"),
    ("--write-model-card", "--no-write-model-card"),
    ("--safe-serialization", "--no-safe-serialization"),
]
# mergekit's parse_kmb on these, worked by hand (mergekit/common.py: k, m, b = 1e3, 1e6, 1e9)
MERGEKIT_SIZES = {"5B": 5 * 10**9, "5b": 5 * 10**9, "20k": 20_000, "50K": 50_000,
                  "3m": 3_000_000, "123": 123}


def _help_flags(text: str) -> list[tuple[str, ...]]:
    """The option spellings of a click --help: the first column of each option line."""
    out = []
    for line in text.splitlines():
        if re.match(r"^  -", line):
            first = re.split(r"\s{2,}", line.strip())[0]
            out.append(tuple(re.findall(r"(?<![\w-])-{1,2}[a-z][\w-]*", first)))
    return out


def test_stored_flag_list_is_mergekits_and_ours() -> None:
    """The stored list is the one our table covers, and, with mergekit's venv here, the
    one its `mergekit-yaml --help` prints; its size parser agrees with ours on every
    size it reads."""
    assert [f.decls for f in MERGEKIT_YAML_FLAGS] == MERGEKIT_YAML_HELP_FLAGS
    assert sorted(WALK) == sorted(f.field for f in MERGEKIT_YAML_FLAGS)
    for text, value in MERGEKIT_SIZES.items():
        assert parse_size(text) == value, text
    python = MERGEKIT_VENV / "bin" / "python"
    if not python.exists():
        pytest.skip("mergekit's venv (/work/main/.bench/mergekit-venv) is not here")
    code = ("import json, sys\nfrom mergekit.scripts.run_yaml import main\n"
            "from mergekit.common import parse_kmb\n"
            "main(['--help'], prog_name='mergekit-yaml', standalone_mode=False)\n"
            f"print('SIZES', json.dumps({{s: parse_kmb(s) for s in {list(MERGEKIT_SIZES)}}}))")
    proc = subprocess.run([str(python), "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    help_text, _, sizes = proc.stdout.rpartition("SIZES ")
    assert help_text.startswith("Usage: mergekit-yaml [OPTIONS] CONFIG_FILE OUT_PATH")
    assert _help_flags(help_text) == MERGEKIT_YAML_HELP_FLAGS
    assert json.loads(sizes) == MERGEKIT_SIZES


# ---- tiny models, a recipe, and the plain merge every flag is compared with -------------

@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mk")
    base = tiny_model("llama", seed=0)
    for i in range(2):
        d = save_hf(finetune_like(base, seed=10 + i), root / f"ft{i}")
        write_tokenizer_files(d)
    write_recipe(root / "linear.yaml", {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(root / f"ft{i}"), "parameters": {"weight": 0.5}}
                   for i in range(2)]})
    # a random method, for the seed flags
    write_recipe(root / "dare.yaml", {
        "merge_method": "dare_linear", "base_model": str(root / "ft0"), "dtype": "float32",
        "models": [{"model": str(root / "ft1"), "parameters": {"weight": 1.0,
                                                               "density": 0.5}}]})
    return root


def call(entry: Callable[[list[str] | None], None], *args: str | Path,
         capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run a console script's entry in-process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        entry([str(a) for a in args])
    out, err = capsys.readouterr()
    return int(e.value.code or 0), out, err


def state(out: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


@pytest.fixture(scope="module")
def plain(models: Path) -> dict[str, torch.Tensor]:
    """The recipe's merge, from the formula: the mean of the two models, tensor by tensor."""
    a, b = state(models / "ft0"), state(models / "ft1")
    return {k: (a[k] + b[k]) / 2 for k in a}


def same(out: Path, expected: dict[str, torch.Tensor]) -> None:
    got = state(out)
    assert got.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-7, msg=k)


# ---- mergekit-yaml's documented command lines -------------------------------------------

def test_positional_output_as_mergekit(models: Path, tmp_path: Path, plain: dict,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`pcbmerge run CONFIG OUT_PATH` and `mergekit-yaml CONFIG OUT_PATH` write the merge,
    with mergekit_config.yml holding the recipe's text as mergekit writes it (the file as
    read); -o naming the same directory too is fine, a different one is one line."""
    recipe = models / "linear.yaml"
    rc, _, err = call(main, "run", recipe, tmp_path / "a", "--quiet", capsys=capsys)
    assert rc == 0, err
    same(tmp_path / "a", plain)
    assert (tmp_path / "a" / "mergekit_config.yml").read_text() == recipe.read_text()
    assert (tmp_path / "a" / "README.md").is_file()
    rc, _, err = call(mergekit_yaml_main, recipe, tmp_path / "b", capsys=capsys)
    assert rc == 0, err
    same(tmp_path / "b", plain)
    assert (tmp_path / "b" / "mergekit_config.yml").read_text() == recipe.read_text()
    rc, _, err = call(main, "run", recipe, tmp_path / "c", "-o", tmp_path / "c", "-q",
                      capsys=capsys)
    assert rc == 0, err
    rc, _, err = call(main, "run", recipe, tmp_path / "d", "-o", tmp_path / "e",
                      capsys=capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "two output directories" in err and "'" + str(tmp_path / "d") + "'" in err
    assert not (tmp_path / "d").exists() and not (tmp_path / "e").exists()
    rc, _, err = call(main, "run", recipe, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "no output directory" in err


def _shards(out: Path) -> list[int]:
    """Tensor bytes per output shard, in shard order."""
    sizes = []
    for f in sorted(out.glob("model*.safetensors")):
        with safe_open(f, "pt") as h:
            sizes.append(sum(h.get_tensor(k).nbytes for k in h.keys()))  # noqa: SIM118
    return sizes


def test_sizes_read_as_mergekit(models: Path, tmp_path: Path, plain: dict,
                                capsys: pytest.CaptureFixture[str]) -> None:
    """`--shard-size 5B` and `--out-shard-size 5B` are mergekit's five billion bytes (one
    shard here: the model is 198 kB), not 5 bytes (a shard per tensor); 50k is 50,000 bytes:
    every shard within it, each as full as the next tensor allows."""
    recipe = models / "linear.yaml"
    for i, flag in enumerate(("--shard-size", "--out-shard-size")):
        rc, _, err = call(main, "run", recipe, tmp_path / f"b{i}", flag, "5B", "-q",
                          capsys=capsys)
        assert rc == 0, err
        assert len(_shards(tmp_path / f"b{i}")) == 1
    rc, _, err = call(mergekit_yaml_main, recipe, tmp_path / "k", "--out-shard-size", "50k",
                      "--quiet", capsys=capsys)
    assert rc == 0, err
    same(tmp_path / "k", plain)
    sizes = _shards(tmp_path / "k")
    total = sum(v.nbytes for v in plain.values())
    assert sum(sizes) == total and len(sizes) >= -(-total // 50_000)
    assert all(s <= 50_000 for s in sizes), sizes
    rc, _, err = call(main, "run", recipe, tmp_path / "x", "--out-shard-size", "5XB",
                      capsys=capsys)
    assert rc == 2 and err.count("\n") == 1 and "cannot read size '5XB'" in err


# ---- the walk over every flag -------------------------------------------------------------

def _run_flag(models: Path, out: Path, capsys: pytest.CaptureFixture[str], *flags: str,
              recipe: str = "linear.yaml") -> tuple[int, str]:
    rc, _, err = call(mergekit_yaml_main, models / recipe, out, *flags, capsys=capsys)
    return rc, err


def _no_effect(note: str) -> Callable[..., None]:
    """A flag with nothing to change in a streamed merge: the same merge, and one note."""
    def check(models: Path, tmp: Path, plain: dict, capsys: Any, *flags: str) -> None:
        rc, err = _run_flag(models, tmp / "o", capsys, *flags)
        assert rc == 0, err
        same(tmp / "o", plain)
        notes = [line for line in err.splitlines() if line.startswith("note:")]
        assert len(notes) == 1 and note in notes[0], err
    return check


def _refused(why: str) -> Callable[..., None]:
    def check(models: Path, tmp: Path, plain: dict, capsys: Any, *flags: str) -> None:
        rc, err = _run_flag(models, tmp / "o", capsys, *flags)
        assert rc == 2 and err.count("\n") == 1, err
        assert err.startswith(f"error: {flags[0]}: not supported") and why in err
        assert not (tmp / "o").exists()
    return check


def _allow_crimes(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    """mergekit refuses models whose config.json name different architectures unless
    --allow-crimes; then the tensors merge as they line up."""
    other = tmp / "ft1-other"
    shutil.copytree(models / "ft1", other)
    config = json.loads((other / "config.json").read_text())
    config["architectures"] = ["MistralForCausalLM"]
    (other / "config.json").write_text(json.dumps(config))
    recipe = write_recipe(tmp / "mixed.yaml", {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": str(models / "ft0"), "parameters": {"weight": 0.5}},
                   {"model": str(other), "parameters": {"weight": 0.5}}]})
    for flags in ((), ("--no-allow-crimes",)):
        rc, _, err = call(mergekit_yaml_main, recipe, tmp / "refused", *flags, capsys=capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert "mix architectures (LlamaForCausalLM in" in err and "--allow-crimes" in err
    rc, _, err = call(mergekit_yaml_main, recipe, tmp / "o", "--allow-crimes", "-q",
                      capsys=capsys)
    assert rc == 0, err
    same(tmp / "o", plain)


def _transformers_cache(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    """Hub ids are read from the folder --transformers-cache names (a hub cache laid out as
    huggingface_hub lays it out, offline)."""
    cache = tmp / "cache"
    for i in range(2):
        repo = cache / f"models--test-org--ft{i}"
        snapshot = repo / "snapshots" / ("0" * 40)
        shutil.copytree(models / f"ft{i}", snapshot)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text("0" * 40)
    recipe = write_recipe(tmp / "hub.yaml", {
        "merge_method": "linear", "dtype": "float32",
        "models": [{"model": f"test-org/ft{i}", "parameters": {"weight": 0.5}}
                   for i in range(2)]})
    rc, _, err = call(mergekit_yaml_main, recipe, tmp / "none", capsys=capsys)
    assert rc == 2 and "model not found: test-org/ft0" in err
    rc, _, err = call(mergekit_yaml_main, recipe, tmp / "o", "--transformers-cache", cache,
                      "-q", capsys=capsys)
    assert rc == 0, err
    same(tmp / "o", plain)


def _seed(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    """--random-seed is --seed: the same DARE drops for the same number, others for another."""
    outs = {}
    for name, flags in (("random7", ("--random-seed", "7")), ("seed7", ("--seed", "7")),
                        ("random8", ("--random-seed", "8"))):
        rc, err = _run_flag(models, tmp / name, capsys, *flags, "-q", recipe="dare.yaml")
        assert rc == 0, err
        outs[name] = state(tmp / name)
    assert all(torch.equal(outs["random7"][k], outs["seed7"][k]) for k in outs["seed7"])
    assert any(not torch.equal(outs["random7"][k], outs["random8"][k]) for k in outs["seed7"])


def _verbosity(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    """-v sets Python logging to INFO, -vv to DEBUG, as mergekit's apply_global_options."""
    root = logging.getLogger()
    before = root.level
    try:
        for flags, level in ((("-v",), logging.INFO), (("-vv",), logging.DEBUG)):
            root.setLevel(logging.WARNING)
            rc, err = _run_flag(models, tmp / f"o{level}", capsys, *flags, "-q")
            assert rc == 0, err
            assert root.level == level
            same(tmp / f"o{level}", plain)
    finally:
        root.setLevel(before)


def _quiet(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    rc, err = _run_flag(models, tmp / "q", capsys, "--quiet")
    assert rc == 0 and err == "", err
    rc, err = _run_flag(models, tmp / "n", capsys, "--no-quiet")
    assert rc == 0 and "wrote " in err and "21 tensors" in err, err


def _gpu(*flags: str) -> Callable[..., None]:
    """--cuda (--multi-gpu, --gpu-rich) is --device cuda: the same merge on a GPU, or without
    one the one line that says there is none."""
    def check(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
        rc, err = _run_flag(models, tmp / "o", capsys, *flags, "-q")
        if torch.cuda.is_available():
            assert rc == 0, err
            same(tmp / "o", plain)
        else:
            assert rc == 2 and err.count("\n") == 1, err
            assert err.startswith("error: --device cuda: no CUDA device is available")
        rc, err = _run_flag(models, tmp / "cpu", capsys, *flags, "--device", "cpu")
        assert rc == 2 and "asks for a GPU but --device is cpu" in err, err
    return check


def _device(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    """mergekit's --device: cpu and auto (cuda only with a GPU) merge; a device this tool
    does not merge on is one line, exit 2 (not typer's box)."""
    for name in ("cpu", "auto"):
        rc, err = _run_flag(models, tmp / name, capsys, "--device", name, "-q")
        assert rc == 0, err
        same(tmp / name, plain)
    for bad in ("xpu", "cuda:x", "mps"):
        rc, err = _run_flag(models, tmp / "bad", capsys, "--device", bad)
        assert rc == 2 and err.count("\n") == 1 and "╭" not in err, err
        assert f"--device: {bad!r} is not a device" in err


def _threads(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    """-j / --num-threads is --threads: the merge is handed that thread count."""
    import mergekit_pcb.kinds.merge as merge_kind

    handed: list[int | None] = []
    real = merge_kind.run_plan

    def spy(*args: Any, **kwargs: Any) -> Any:
        handed.append(kwargs.get("threads"))
        return real(*args, **kwargs)

    merge_kind.run_plan = spy  # type: ignore[assignment]
    try:
        for i, flags in enumerate((("-j", "2"), ("--num-threads", "3"))):
            rc, err = _run_flag(models, tmp / f"o{i}", capsys, *flags, "-q")
            assert rc == 0, err
            same(tmp / f"o{i}", plain)
    finally:
        merge_kind.run_plan = real  # type: ignore[assignment]
    assert handed == [2, 3]
    rc, err = _run_flag(models, tmp / "zero", capsys, "-j", "0")
    assert rc == 2 and "--threads must be at least 1" in err


def _out_shard_size(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    rc, err = _run_flag(models, tmp / "o", capsys, "--out-shard-size", "20k", "-q")
    assert rc == 0, err
    sizes = _shards(tmp / "o")
    assert len(sizes) > 1 and all(s <= 20_000 for s in sizes)
    same(tmp / "o", plain)


def _copy_tokenizer(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    rc, err = _run_flag(models, tmp / "yes", capsys, "--copy-tokenizer", "-q")
    assert rc == 0, err
    assert (tmp / "yes" / "tokenizer.json").read_bytes() == \
        (models / "ft0" / "tokenizer.json").read_bytes()
    rc, err = _run_flag(models, tmp / "no", capsys, "--no-copy-tokenizer", "-q")
    assert rc == 0, err
    assert not list((tmp / "no").glob("tokenizer*")) and (tmp / "no" / "config.json").is_file()
    same(tmp / "no", plain)


def _write_model_card(models: Path, tmp: Path, plain: dict, capsys: Any, *_: str) -> None:
    """As mergekit, --no-write-model-card leaves out README.md and mergekit_config.yml."""
    rc, err = _run_flag(models, tmp / "no", capsys, "--no-write-model-card", "-q")
    assert rc == 0, err
    assert not (tmp / "no" / "README.md").exists()
    assert not (tmp / "no" / "mergekit_config.yml").exists()
    same(tmp / "no", plain)
    rc, err = _run_flag(models, tmp / "yes", capsys, "--write-model-card", "-q")
    assert rc == 0, err
    assert "linear" in (tmp / "yes" / "README.md").read_text()
    assert (tmp / "yes" / "mergekit_config.yml").read_text() == \
        (models / "linear.yaml").read_text()


# mergekit field -> (the flags to give, the check of their effect)
WALK: dict[str, tuple[tuple[str, ...], Callable[..., None]]] = {
    "allow_crimes": (("--allow-crimes",), _allow_crimes),
    "unsafe_truncate_embeddings": (("--unsafe-truncate-embeddings",),
                                   _refused("`tokenizer:` section")),
    "trust_remote_code": (("--trust-remote-code",), _no_effect("never runs model code")),
    "transformers_cache": ((), _transformers_cache),
    "lora_merge_cache": (("--lora-merge-cache", "/tmp/lora-cache"),
                         _no_effect("nothing is cached")),
    "lora_merge_dtype": (("--lora-merge-dtype", "bfloat16"),
                         _no_effect("always formed in float32")),
    "random_seed": ((), _seed),
    "verbosity": ((), _verbosity),
    "quiet": ((), _quiet),
    "cuda": ((), _gpu("--cuda")),
    "device": ((), _device),
    "low_cpu_memory": (("--low-cpu-memory",), _no_effect("streamed to disk")),
    "lazy_unpickle": (("--lazy-unpickle",), _no_effect("memory-mapped")),
    "read_to_gpu": (("--read-to-gpu",), _no_effect("one tensor at a time")),
    "multi_gpu": ((), _gpu("--multi-gpu")),
    "num_threads": ((), _threads),
    "gpu_rich": ((), _gpu("--gpu-rich")),
    "async_write": (("--async-write",), _no_effect("written by a thread")),
    "write_threads": (("--write-threads", "4"), _no_effect("one writer thread")),
    "out_shard_size": ((), _out_shard_size),
    "copy_tokenizer": ((), _copy_tokenizer),
    "clone_tensors": (("--clone-tensors",), _no_effect("its own copy")),
    "write_model_card": ((), _write_model_card),
    "safe_serialization": (("--no-safe-serialization",), _refused("safetensors only")),
}


@pytest.mark.parametrize("field", list(WALK))
def test_every_mergekit_yaml_flag(field: str, models: Path, tmp_path: Path, plain: dict,
                                  capsys: pytest.CaptureFixture[str],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each flag of mergekit-yaml --help: accepted with its effect checked, or refused
    with one line."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))  # restored after
    flags, check = WALK[field]
    check(models, tmp_path, plain, capsys, *flags)


def test_mergekit_defaults_spelled_out(models: Path, tmp_path: Path, plain: dict,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Every flag at mergekit's default value, spelled out, is the plain merge, no note."""
    flags = [f.decls[0] if f.default else f.decls[1] for f in MERGEKIT_YAML_FLAGS
             if isinstance(f.default, bool) and len(f.decls) == 2]
    assert len(flags) == 14  # every --x/--no-x pair
    flags += ["--write-threads", "1", "--out-shard-size", "5B", "--device", "cpu"]
    rc, _, err = call(mergekit_yaml_main, models / "linear.yaml", tmp_path / "o", *flags,
                      capsys=capsys)
    assert rc == 0, err
    assert "note:" not in err
    same(tmp_path / "o", plain)


# ---- one-line errors ---------------------------------------------------------------------

def test_method_with_a_newline_is_one_escaped_line(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"merge_method": "line\nar", "models": []}))
    rc, _, err = call(main, "validate", recipe, capsys=capsys)
    assert rc == 2 and err.count("\n") == 1, err
    assert "unknown method 'line\\nar'" in err


def test_unknown_method_did_you_mean(tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.yaml"
    for typo, meant in (("lineer", "linear"), ("dare_tie", "dare_ties"), ("SLERP", "slerp")):
        recipe.write_text(yaml.safe_dump({"merge_method": typo, "models": []}))
        rc, _, err = call(main, "validate", recipe, capsys=capsys)
        assert rc == 2 and err.count("\n") == 1, err
        assert f"did you mean '{meant}'?" in err
    recipe.write_text(yaml.safe_dump({"merge_method": "zzzzzz", "models": []}))
    rc, _, err = call(main, "validate", recipe, capsys=capsys)
    assert rc == 2 and "did you mean" not in err and "known: " in err


def test_json_errors_on_stdout(models: Path, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    """With --json an error is one JSON object on stdout (nothing on stderr), with the exit
    code it exits with: a bad recipe, a bad flag value (a usage error), a missing file."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"merge_method": "lineer", "models": []}))
    for args in (("run", bad, tmp_path / "o", "--json"),
                 ("run", models / "linear.yaml", tmp_path / "o", "--threads", "x", "--json"),
                 ("run", tmp_path / "missing.yaml", tmp_path / "o", "--json"),
                 ("validate", bad, "--json")):
        rc, out, err = call(main, *args, capsys=capsys)
        assert rc == 2 and err == "", (args, err)
        data = json.loads(out)
        assert data["exit_code"] == 2 and data["label"] == "error" and data["error"], data
    assert "did you mean 'linear'" in json.loads(
        call(main, "validate", bad, "--json", capsys=capsys)[1])["error"]
    assert not (tmp_path / "o").exists()


def test_usage_error_is_one_line(models: Path, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A flag typer itself refuses (a wrong type, an unknown flag) is one line, exit 2."""
    for args in (("run", models / "linear.yaml", tmp_path / "o", "--threads", "x"),
                 ("run", models / "linear.yaml", tmp_path / "o", "--no-such-flag"),
                 ("restore", tmp_path, tmp_path / "o", "--model", tmp_path, "--module",
                  tmp_path, "--device", "xpu")):
        rc, _, err = call(main, *args, capsys=capsys)
        assert rc == 2 and err.count("\n") == 1 and "╭" not in err, (args, err)
        assert err.startswith("error: pcbmerge ")


def test_mergekit_flag_on_a_search_is_refused(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from test_evolve_engine import build_population, recipe_dict
    from test_evolve_engine import write_recipe as write_search

    pop = build_population(tmp_path / "pop")
    recipe = write_search(pop, recipe_dict(pop, generations=1))
    rc, _, err = call(main, "run", recipe, tmp_path / "o", "--no-copy-tokenizer",
                      capsys=capsys)
    assert rc == 2 and err.count("\n") == 1
    assert "--no-copy-tokenizer: a mergekit-yaml flag, used by merge recipes only" in err


# ---- pcbmerge evolve --dry-run / --json -----------------------------------------------------

def test_evolve_dry_run_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`evolve --dry-run --json` prints the plan `run --dry-run --json` prints (with
    evolve's overrides applied) and writes nothing; `evolve --json` prints the summary."""
    from test_evolve_engine import build_population, recipe_dict
    from test_evolve_engine import write_recipe as write_search

    pop = build_population(tmp_path / "pop")
    recipe = write_search(pop, recipe_dict(pop, generations=1))
    out = tmp_path / "out"
    rc, plan_out, err = call(main, "evolve", recipe, "-o", out, "--dry-run", "--json",
                             capsys=capsys)
    assert rc == 0, err
    rc, run_out, err = call(main, "run", recipe, "-o", out, "--dry-run", "--json",
                            capsys=capsys)
    assert rc == 0, err
    plan, via_run = json.loads(plan_out), json.loads(run_out)
    assert plan == via_run and plan["dry_run"] is True and plan["kind"] == "search"
    assert not out.exists() and not Path(f"{out}.run").exists()
    rc, pop_out, _ = call(main, "evolve", recipe, "-o", out, "--dry-run", "--json",
                          "--pop", "5", "--generations", "4", capsys=capsys)
    assert rc == 0
    overridden = json.loads(pop_out)
    assert overridden["population"]["size"] == 5 and overridden["generations"] == 4
    rc, text_out, _ = call(main, "evolve", recipe, "-o", out, "--dry-run", capsys=capsys)
    assert rc == 0 and "dry run: nothing written" in text_out and not out.exists()

    rc, summary_out, err = call(main, "evolve", recipe, "-o", out, "--json", "--trust-code",
                                capsys=capsys)
    assert rc == 0, summary_out + err
    summary = json.loads(summary_out)
    history = json.loads((out / "evolution.json").read_text())["history"]
    assert summary["kind"] == "search" and summary["generations"] == len(history) - 1 == 1
    assert summary["output"] == str(out.resolve()) or Path(summary["output"]) == out
    assert summary["objective"] == history[-1]["objective"]
    assert os.path.isdir(summary["run_dir"])
