"""`--device` for searches (evolve, run, coefficient search): the CPU path is the same bits
as without the flag; `cuda` without CUDA is one line; the built-in fitness kinds and the
population's merge go to the named device (checked without a GPU by a shim that records
every move to `cuda` and keeps the tensor on the CPU); a resume on another kind of device
is refused; and, where a GPU is present, a cuda search scores as the CPU does."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import finetune_like, save_hf, tiny_model, write_tokenizer_files
from test_coefsearch import build_population as build_coef_population
from test_coefsearch import recipe_dict as coef_recipe_dict
from test_coefsearch import search as coef_search
from test_coefsearch import write_recipe as write_coef_recipe
from test_evolve_engine import (
    _one_error_line,
    build_population,
    cli,
    recipe_dict,
    same_tensors,
    search_record,
    write_recipe,
)

from mergekit_pcb.errors import UserError
from mergekit_pcb.evolve import jobs as evolve_jobs
from mergekit_pcb.evolve.coefsearch import jobs as coef_jobs
from mergekit_pcb.evolve.config import parse_fitness
from mergekit_pcb.evolve.fitness import build_evaluator, example_scores
from mergekit_pcb.evolve.jobs import merge_in_memory
from mergekit_pcb.evolve.run import evolve


@pytest.fixture
def pop_dir(tmp_path: Path) -> Path:
    return build_population(tmp_path / "pop")


# ----------------------------------------------------------------------------- the CPU path


def test_device_cpu_gives_the_same_bits_as_no_flag(pop_dir: Path) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=2))
    for args, out in (((), "plain"), (("--device", "cpu"), "cpu"),
                      (("--device", "auto"), "auto")):
        res = cli("evolve", recipe, "-o", pop_dir / out, "-q", *args)
        assert res.exit_code == 0, res.output
    res = cli("run", recipe, "-o", pop_dir / "run-cpu", "-q", "--device", "cpu")
    assert res.exit_code == 0, res.output
    for out in ("cpu", "run-cpu") + (("auto",) if not torch.cuda.is_available() else ()):
        assert same_tensors(pop_dir / "plain", pop_dir / out), out
        assert search_record(pop_dir / out) == search_record(pop_dir / "plain"), out
    # a CPU run's state records no device: it reads as the states written before --device
    state = json.loads((pop_dir / "cpu.run" / "state.json").read_text())
    assert "device" not in state["identity"]


# ----------------------------------------------------------------------------- refusals


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA absent, also on a machine that has it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_cuda_without_cuda_is_one_line(pop_dir: Path, tmp_path: Path, no_cuda: None) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=1))
    coef = build_coef_population(tmp_path / "coef")
    coef_recipe = write_coef_recipe(coef, coef_recipe_dict(coef, budget=2))
    for args in (("evolve", recipe, "-o", pop_dir / "o", "--device", "cuda"),
                 ("evolve", recipe, "-o", pop_dir / "o", "--device", "cuda:1"),
                 ("run", recipe, "-o", pop_dir / "o", "--device", "cuda"),
                 ("run", coef_recipe, "-o", coef / "o", "--device", "cuda")):
        line = _one_error_line(cli(*args))
        assert line == (f"error: --device {args[-1]}: no CUDA device is available "
                        "(torch.cuda.is_available() is False)"), args
    assert not (pop_dir / "o").exists() and not (pop_dir / "o.run").exists()
    assert not (coef / "o").exists() and not (coef / "o.run").exists()
    line = _one_error_line(cli("evolve", recipe, "-o", pop_dir / "o", "--device", "gpu"))
    assert "--device: 'gpu' is not a device" in line


def test_cuda_on_ray_takes_the_workers_gpus(pop_dir: Path) -> None:
    """On Ray the driver needs no GPU, each worker uses the one Ray gives it: `cuda`
    with --gpus-per-worker, nothing else (checked before Ray starts)."""
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=1))
    line = _one_error_line(cli("evolve", recipe, "-o", pop_dir / "o", "--executor", "ray",
                               "--device", "cuda"))
    assert line == ("error: --device cuda: with --executor ray, give --gpus-per-worker (Ray "
                    "gives a worker no GPU without it)")
    line = _one_error_line(cli("run", recipe, "-o", pop_dir / "o", "--executor", "ray",
                               "--gpus-per-worker", "1", "--device", "cuda:1"))
    assert "--device cuda:1: with --executor ray each worker uses the GPU Ray gives it" in line
    assert not (pop_dir / "o.run").exists()


def test_evaluator_on_a_gpu_it_cannot_see_is_one_error(pop_dir: Path, no_cuda: None) -> None:
    """What a Ray worker without a GPU says (the CLI's check runs on the driver)."""
    spec = parse_fitness(recipe_dict(pop_dir)["fitness"], "r.yaml", "fitness")
    with pytest.raises(UserError, match="no CUDA device is available to the scoring process"):
        build_evaluator(spec, pop_dir, device="cuda")


def test_resume_on_another_device_is_refused(pop_dir: Path, tmp_path: Path) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=1))
    out = pop_dir / "out"
    evolve(recipe, out, trust_code=True)
    with pytest.raises(UserError) as e:  # refused before anything is scored (no GPU needed)
        evolve(recipe, out, trust_code=True, resume=True, force=True, device="cuda")
    assert str(e.value) == (f"--resume: the run in {out}.run was scored on cpu, now --device "
                            "cuda (scores may differ in the last bits); resume with --device "
                            "cpu or start over with --force")
    # a state scored on a GPU is not resumed on the CPU
    path = pop_dir / "out.run" / "state.json"
    state = json.loads(path.read_text())
    state["identity"]["device"] = "cuda"
    path.write_text(json.dumps(state))
    with pytest.raises(UserError, match="was scored on cuda, now --device cpu"):
        evolve(recipe, out, trust_code=True, resume=True, force=True)
    # the coefficient search's state likewise
    coef = build_coef_population(tmp_path / "coef")
    coef_recipe = write_coef_recipe(coef, coef_recipe_dict(coef, budget=2))
    coef_search(coef_recipe, coef / "out")
    with pytest.raises(UserError, match="was scored on cpu, now --device cuda:0"):
        coef_search(coef_recipe, coef / "out", resume=True, force=True, device="cuda:0")


# ----------------------------------------------------------------------------- plumbing


class CudaShim:
    """CUDA made to look present: every `.to` a cuda device (tensor or module) is
    recorded and stays on the CPU, so the code's moves can be checked without a GPU."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.modules: list[torch.nn.Module] = []
        self.moved: list[torch.Tensor] = []  # kept alive: their ids stay theirs
        tensor_to, module_to = torch.Tensor.to, torch.nn.Module.to
        shim = self

        def cuda_in(args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
            return any(isinstance(a, (str, torch.device)) and torch.device(a).type == "cuda"
                       for a in (*args, kwargs.get("device")))

        def to_tensor(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            if not cuda_in(args, kwargs):
                return tensor_to(self, *args, **kwargs)
            out = self.view_as(self)  # a new tensor object: the one the code must use
            shim.moved.append(out)
            return out

        def to_module(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
            if not cuda_in(args, kwargs):
                return module_to(self, *args, **kwargs)
            shim.modules.append(self)
            return self

        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.Tensor, "to", to_tensor)
        monkeypatch.setattr(torch.nn.Module, "to", to_module)

    def moved_here(self, t: torch.Tensor) -> bool:
        return any(t is m for m in self.moved)

    @contextlib.contextmanager
    def watching(self, model: torch.nn.Module) -> Iterator[list[torch.Tensor]]:
        """Every tensor the model's forward is given, while the block runs."""
        seen: list[torch.Tensor] = []

        def hook(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            seen.extend(v for v in (*args, *kwargs.values()) if isinstance(v, torch.Tensor))

        handle = model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            yield seen
        finally:
            handle.remove()


def _states(root: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {m: load_file(str(root / m / "model.safetensors")) for m in ("m0", "m1")}


def test_torch_fitness_moves_the_model_and_every_batch(pop_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    spec = parse_fitness({**recipe_dict(pop_dir)["fitness"], "batch_size": 50}, "r.yaml",
                         "fitness")
    states = _states(pop_dir)
    cpu, default = build_evaluator(spec, pop_dir, device="cpu"), build_evaluator(spec, pop_dir)
    mini = {"seed": 3, "size": 70}
    ref = {m: (cpu.score(s, "select"), cpu.score(s, "report"), cpu.score(s, "select", mini),
               example_scores(cpu, s, "report")) for m, s in states.items()}
    for m, s in states.items():  # --device cpu is no flag at all
        assert default.score(s, "select") == ref[m][0]
    shim = CudaShim(monkeypatch)
    ev = build_evaluator(spec, pop_dir, device="cuda")
    assert shim.modules == [ev.module]  # type: ignore[attr-defined]
    for m, s in states.items():
        shim.moved.clear()
        with shim.watching(ev.module) as seen:  # type: ignore[attr-defined]
            got = ev.score(s, "select")
        # 120 select rows in batches of 50: 3 inputs and their 3 label tensors moved
        assert len(seen) == 3 and all(shim.moved_here(t) for t in seen)
        assert len(shim.moved) == 6
        assert got == ref[m][0]
        assert ev.score(s, "report") == ref[m][1]
        assert ev.score(s, "select", mini) == ref[m][2]
        assert torch.equal(example_scores(ev, s, "report"), ref[m][3])


@pytest.fixture
def bert(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    base = tiny_model("bert", seed=0)
    base_dir = save_hf(base, tmp_path / "bert-base")
    write_tokenizer_files(base_dir)
    words = [" ".join(f"w{(i * 7 + j) % 20}" for j in range(2 + i % 6)) for i in range(21)]
    (tmp_path / "select.csv").write_text(
        "text,label\n" + "".join(f"{t},{i % 3}\n" for i, t in enumerate(words)))
    (tmp_path / "lm.txt").write_text("".join(f"{t}\n" for t in words))
    return base_dir, dict(finetune_like(base, seed=10, scale=0.2).state_dict())


@pytest.mark.parametrize("metric", ["accuracy", "macro_f1", "loss"])
def test_hf_classification_moves_the_model_and_every_batch(
        bert: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path, metric: str,
        monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir, state = bert
    spec = parse_fitness({"type": "hf-classification", "model": str(base_dir),
                          "select": "select.csv", "metric": metric, "batch_size": 8},
                         "r.yaml", "fitness")
    cpu = build_evaluator(spec, tmp_path, device="cpu")
    ref, ref_examples = cpu.score(state, "select"), example_scores(cpu, state, "select")
    shim = CudaShim(monkeypatch)
    ev = build_evaluator(spec, tmp_path, device="cuda")
    assert shim.modules == [ev.model]  # type: ignore[attr-defined]
    shim.moved.clear()
    with shim.watching(ev.model) as seen:  # type: ignore[attr-defined]
        assert ev.score(state, "select") == ref
    # 21 rows in batches of 8: 3 forwards of input_ids and attention_mask (the word-level
    # tokenizer gives no token_type_ids)
    assert len(seen) == 6 and all(shim.moved_here(t) for t in seen)
    assert len(shim.moved) == 9  # and the 3 label tensors
    got = example_scores(ev, state, "select")
    assert (got is None) == (ref_examples is None)
    if got is not None:
        assert ref_examples is not None and torch.equal(got, ref_examples)


def test_causal_lm_moves_the_model_and_every_batch(hf_models: Any, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base_dir, _ = hf_models("llama", 1)
    words = [" ".join(f"w{(i * 5 + j) % 20}" for j in range(2 + i % 5)) for i in range(11)]
    (tmp_path / "lm.txt").write_text("".join(f"{t}\n" for t in words))
    state = dict(finetune_like(tiny_model("llama", seed=0), seed=11, scale=0.2).state_dict())
    for metric in ("loss", "perplexity"):
        spec = parse_fitness({"type": "causal-lm", "model": str(base_dir), "select": "lm.txt",
                              "metric": metric, "batch_size": 4}, "r.yaml", "fitness")
        ref = build_evaluator(spec, tmp_path, device="cpu").score(state, "select")
        with monkeypatch.context() as mp:
            shim = CudaShim(mp)
            ev = build_evaluator(spec, tmp_path, device="cuda")
            assert shim.modules == [ev.model]  # type: ignore[attr-defined]
            shim.moved.clear()
            with shim.watching(ev.model) as seen:  # type: ignore[attr-defined]
                assert ev.score(state, "select") == ref
        # 11 texts in batches of 4: 3 forwards of input_ids and attention_mask
        assert len(seen) == 6 and all(shim.moved_here(t) for t in seen)
        assert len(shim.moved) == 6


def _recording_merge(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[str]:
    """`module`'s merge_in_memory records the device it is asked for and merges on the
    CPU (the shim cannot stand in for a dtype change on a GPU)."""
    devices: list[str] = []

    def merge(plan: Any, device: str = "cpu", memo: Any = None) -> dict[str, torch.Tensor]:
        devices.append(device)
        return merge_in_memory(plan, "cpu", memo=memo)

    monkeypatch.setattr(module, "merge_in_memory", merge)
    return devices


def test_a_cuda_evolution_merges_and_scores_on_its_device(
        pop_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=2))
    evolve(recipe, pop_dir / "cpu", trust_code=True)
    devices = _recording_merge(monkeypatch, evolve_jobs)
    shim = CudaShim(monkeypatch)
    evolve(recipe, pop_dir / "cuda", trust_code=True, device="cuda")
    # every population merge asked for the device, the fitness's module went there
    assert devices and set(devices) == {"cuda"}
    assert len(shim.modules) == 1 and shim.moved
    assert same_tensors(pop_dir / "cpu", pop_dir / "cuda")
    assert search_record(pop_dir / "cuda") == search_record(pop_dir / "cpu")
    state = json.loads((pop_dir / "cuda.run" / "state.json").read_text())
    assert state["identity"]["device"] == "cuda"


def test_a_cuda_coefficient_search_merges_and_scores_on_its_device(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from test_coefsearch import record

    root = build_coef_population(tmp_path / "coef")
    data = coef_recipe_dict(root, budget=3)
    data["fitness"] = {"type": "torch", "arch": "coefnet:build", "select": "select.npz",
                       "report": "report.npz", "metric": "loss", "batch_size": 64}
    recipe = write_coef_recipe(root, data)
    coef_search(recipe, root / "cpu")
    devices = _recording_merge(monkeypatch, coef_jobs)
    shim = CudaShim(monkeypatch)
    coef_search(recipe, root / "cuda", device="cuda")
    # the report rows of the default point go through the engine's merge, on the device
    assert devices and set(devices) == {"cuda"}
    assert shim.modules and shim.moved
    assert record(root / "cuda") == record(root / "cpu")
    assert json.loads((root / "cuda.run" / "state.json").read_text()
                      )["identity"]["device"] == "cuda"


# ----------------------------------------------------------------------------- on a GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_scores_equal_the_cpu_scores(pop_dir: Path) -> None:
    """The same candidates scored on the GPU: within 1e-5 relative of the CPU's (float32
    matmuls in another order); the initial population and its merge are the same states
    on both, whatever the search then accepts."""
    recipe = write_recipe(pop_dir, recipe_dict(pop_dir, generations=1))
    res = cli("evolve", recipe, "-o", pop_dir / "cpu", "-q")
    assert res.exit_code == 0, res.output
    res = cli("evolve", recipe, "-o", pop_dir / "cuda", "-q", "--device", "cuda")
    assert res.exit_code == 0, res.output
    a, b = (json.loads((pop_dir / d / "evolution.json").read_text())["initial"]
            for d in ("cpu", "cuda"))
    assert b["select"] == pytest.approx(a["select"], rel=1e-5, abs=1e-6)
    assert b["merge_select"] == pytest.approx(a["merge_select"], rel=1e-5, abs=1e-6)
    spec = parse_fitness(recipe_dict(pop_dir)["fitness"], "r.yaml", "fitness")
    cpu, gpu = (build_evaluator(spec, pop_dir, device=d) for d in ("cpu", "cuda"))
    for s in _states(pop_dir).values():
        assert gpu.score(s, "report") == pytest.approx(cpu.score(s, "report"), rel=1e-5)
