"""Large tensors merged a slice at a time (`methods.ops.combine_in_slices`) and the engine's
budget of parts in flight (`engine.stream.part_budget`): the sliced merges give the whole
tensor's bits, the slicing is taken for a large tensor, and the budget holds the parts."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch
from test_pipeline import serial_and_pipelined

from mergekit_pcb.engine import pipeline, stream
from mergekit_pcb.engine.pipeline import InOrder, WriteBehind, read_ahead
from mergekit_pcb.engine.plan import build_plan
from mergekit_pcb.engine.rng import tensor_generator
from mergekit_pcb.methods import TensorInputs, get_method, ops, pcb
from mergekit_pcb.recipe.schema import parse_recipe
from mergekit_pcb.threads import torch_threads

N = 140_001  # three slices at the test's slice size, the last one uneven
SLICE = 1 << 16  # the test's `ops.SLICE_ELEMENTS`: slices without a large tensor


def _models(dtype: torch.dtype, ties: bool, seed: int = 0
            ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and three fine-tunes. With `ties`, task vectors on a coarse grid: equal
    magnitudes straddle every cut (the tie-break path); else continuous."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, generator=g)
    models = []
    for _ in range(3):
        delta = torch.randn(N, generator=g)
        if ties:
            delta = torch.round(delta * 4) / 16
        models.append((base + 0.05 * delta).to(dtype))
    return base.to(dtype), models


def _inputs(method: str, base: torch.Tensor, models: list[torch.Tensor],
            params: dict[str, object], per_model: list[dict[str, object]]) -> TensorInputs:
    m = get_method(method)
    top = {p.name: p.default for p in m.params if not p.per_model}
    top.update(params)
    model_params = [{**{p.name: p.default for p in m.params if p.per_model}, **pm}
                    for pm in per_model]
    gens = ([tensor_generator(7, "t", str(i)) for i in range(len(models))]
            if m.uses_rng else None)
    return TensorInputs("t", base, models, model_params, top, generators=gens)


CASES = [
    ("ties", {}, [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.7},
                  {"weight": 0.7, "density": 0.3}]),
    ("ties", {"normalize": False, "lambda": 0.8},
     [{"weight": 1.0, "density": 1.0}, {"weight": -0.5, "density": 0.2},
      {"weight": 0.7, "density": 1e-6}]),
    ("dare_ties", {}, [{"weight": 0.5, "density": 0.5}, {"weight": 0.3, "density": 0.7},
                       {"weight": 0.7, "density": 1.0}]),
    ("dare_linear", {"normalize": True},
     [{"weight": 0.5, "density": 0.4}, {"weight": 0.3, "density": 0.9},
      {"weight": 0.7, "density": 0.3}]),
    ("breadcrumbs", {}, [{"weight": 0.5, "density": 0.5, "gamma": 0.01},
                         {"weight": 0.3, "density": 0.9, "gamma": 0.1},
                         {"weight": 0.7, "density": 1.0, "gamma": 0.2}]),
    ("breadcrumbs_ties", {"normalize": True},
     [{"weight": 0.5, "density": 0.3, "gamma": 0.0}, {"weight": 0.3, "density": 0.6,
                                                       "gamma": 0.05},
      {"weight": 0.7, "density": 1e-6, "gamma": 0.01}]),
    ("pcb", {"scope": "tensor"}, [{"weight": 1.0, "density": 0.1}, {"weight": 0.5,
                                                                  "density": 0.3},
                                  {"weight": 1.0, "density": 1.0}]),
    ("pcb", {"scope": "tensor", "inter": "normalized", "clip": 0.0, "lambda": 1.2},
     [{"weight": 1.0, "density": 0.2}] * 3),
    ("pcb", {"scope": "tensor", "inter": "pairwise", "clip": 0.1},
     [{"weight": 0.7, "density": 0.5}, {"weight": -0.3, "density": 0.05}]),
]


def _merge(method: str, params: dict[str, object], per_model: list[dict[str, object]],
           base: torch.Tensor, models: list[torch.Tensor]) -> torch.Tensor:
    return get_method(method).merge(_inputs(method, base, models, params, per_model))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("method,params,per_model", CASES)
def test_sliced_merge_is_the_whole_merge_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, object],
        per_model: list[dict[str, object]], ties: bool, dtype: torch.dtype,
        threads: int) -> None:
    base, models = _models(dtype, ties)
    models = models[:len(per_model)]
    with torch_threads(threads):
        monkeypatch.setattr(ops, "SLICE_ELEMENTS", 1 << 40)  # one slice: the whole path
        whole = _merge(method, params, per_model, base, models)
        monkeypatch.setattr(ops, "SLICE_ELEMENTS", SLICE)
        sliced = _merge(method, params, per_model, base, models)
    assert sliced.dtype == whole.dtype and sliced.shape == whole.shape
    # bits, not values: the same signed zeros too
    assert torch.equal(sliced.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       whole.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))


def _count_combines(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the tensors the methods' last step (`combine_task_vectors`, `pcb_combine`)
    is called on."""
    sizes: list[int] = []
    for module, name in ((ops, "combine_task_vectors"), (pcb, "pcb_combine")):
        real: Callable[..., torch.Tensor] = getattr(module, name)

        def counted(base: torch.Tensor, *args: object,
                    real: Callable[..., torch.Tensor] = real, **kwargs: object
                    ) -> torch.Tensor:
            sizes.append(base.numel())
            return real(base, *args, **kwargs)
        monkeypatch.setattr(module, name, counted)
    return sizes


@pytest.mark.parametrize("method,params,per_model", CASES[::2])
def test_a_large_tensor_is_combined_in_slices(
        monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, object],
        per_model: list[dict[str, object]]) -> None:
    base, models = _models(torch.float32, ties=False)
    models = models[:len(per_model)]
    monkeypatch.setattr(ops, "SLICE_ELEMENTS", SLICE)
    sizes = _count_combines(monkeypatch)
    with torch_threads(1):
        _merge(method, params, per_model, base, models)
    assert sizes == [SLICE] * (N // SLICE) + [N % SLICE]
    # and a small tensor is merged whole
    sizes.clear()
    small = SLICE // 2
    with torch_threads(1):
        _merge(method, params, per_model, base[:small], [m[:small] for m in models])
    assert all(s == small for s in sizes) and sizes


def test_slices_are_multiples_of_the_combine_chunk_at_every_thread_count(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for threads in (1, 2, 3, 5):
        with torch_threads(threads):
            bounds = ops.slice_bounds(1 << 24)
        assert bounds is not None and bounds[0] == (0, bounds[0][1])
        chunk = ops.COMBINE_CHUNK * threads
        assert all((b - a) % chunk == 0 for a, b in bounds[:-1])
        assert bounds[-1][1] == 1 << 24
        assert all(bounds[i][1] == bounds[i + 1][0] for i in range(len(bounds) - 1))
    assert ops.slice_bounds(ops.SLICE_ELEMENTS) is None


def test_rand_in_pieces_is_rand_at_once() -> None:
    """What the sliced DARE relies on: torch's CPU generator gives the same uniforms drawn
    in pieces as drawn at once."""
    whole = torch.rand(N, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    pieces = torch.cat([torch.rand(min(SLICE + 5, N - a), generator=g)
                        for a in range(0, N, SLICE + 5)])
    assert torch.equal(whole, pieces)


class _AtOnce:
    """A stand-in for the reader's thread pool that reads at submission: which reads have
    started is then known exactly."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def submit(self, fn: Callable[[int], int], item: int) -> Future[int]:
        future: Future[int] = Future()
        future.set_result(fn(item))
        return future

    def shutdown(self, **kwargs: object) -> None:
        pass


def test_read_ahead_holds_at_most_the_budget_or_one_read(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline, "ThreadPoolExecutor", _AtOnce)
    sizes = [1, 1, 10, 1, 10, 10, 1, 1, 1, 1]
    started: list[int] = []

    def read(i: int) -> int:
        started.append(i)
        return i * i

    ahead = []
    for i, value in read_ahead(range(len(sizes)), read, depth=3, size=lambda i: sizes[i],
                               budget=10):
        assert value == i * i
        held = [j for j in started if j > i]  # read, not yet handed on
        ahead.append(held)
        assert sum(sizes[j] for j in held) <= 10 or len(held) == 1
        assert len(held) <= 3
    # small items are read `depth` ahead; a large one only once the reads before it are
    # handed on, and nothing is read ahead while it is held
    assert ahead == [[1], [], [], [], [], [], [7, 8, 9], [8, 9], [9], []]
    assert started == list(range(len(sizes)))


def test_write_behind_waits_past_the_budget() -> None:
    done: list[int] = []
    with WriteBehind(depth=8, budget=10) as behind:
        for i, size in enumerate([6, 6, 3, 3, 10]):
            behind.submit(done.append, i, size=size)
            assert behind._held <= 10 or len(behind._pending) == 1
        behind.drain()
    assert done == [0, 1, 2, 3, 4]


def test_in_order_width_does_not_change_what_is_held(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Budgeted`: parts in flight on the workers add up to at most the budget."""
    sizes = [3, 3, 8, 2, 2, 2, 8, 8]
    monkeypatch.setattr(stream, "part_elements", lambda part: sizes[part])
    peak = [0]
    with InOrder(4) as workers:
        budgeted = stream.Budgeted(workers, 8)
        for i in range(len(sizes)):
            done = budgeted.admit(i, lambda _: None)  # type: ignore[arg-type]
            peak[0] = max(peak[0], budgeted.held)
            workers.submit(lambda x: x, done, i)
        workers.drain()
    assert peak[0] == 8 and budgeted.held == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method,params", [("della", {}), ("della_linear", {"rescale": False}),
                                           ("della", {"normalize": False, "lambda": 0.7})])
def test_della_in_row_blocks_is_the_whole_merge_bit_for_bit(
        monkeypatch: pytest.MonkeyPatch, method: str, params: dict[str, object],
        dtype: torch.dtype) -> None:
    base, models = _models(dtype, ties=True)
    rows = (N - 1) // 100
    base = base[:rows * 100].reshape(rows, 100)
    models = [m[:rows * 100].reshape(rows, 100) for m in models]
    per_model = [{"weight": 0.5, "density": 0.5, "epsilon": 0.1},
                 {"weight": -0.3, "density": 0.8, "epsilon": 0.15},
                 {"weight": 0.7, "density": 1.0}]
    blocks: list[int] = []
    real = torch.rand

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        blocks.append(out.shape[0])
        return out

    with torch_threads(1):
        monkeypatch.setattr(ops, "SLICE_ELEMENTS", 1 << 40)
        whole = _merge(method, params, per_model, base, models)
        monkeypatch.setattr(ops, "SLICE_ELEMENTS", SLICE)
        monkeypatch.setattr(ops.torch, "rand", counted)
        sliced = _merge(method, params, per_model, base, models)
    view = torch.int16 if dtype == torch.bfloat16 else torch.int32
    assert torch.equal(sliced.view(view), whole.view(view))
    block = SLICE // 100
    assert blocks == 2 * ([block] * (rows // block) + [rows % block])  # two models drop


@pytest.mark.parametrize("method", ["ties", "della"])
def test_engine_holds_one_large_part_and_reads_it_once_admitted(
        hf_models: Callable[[str, int], tuple[Path, list[Path]]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """With three part workers, the parts admitted and not yet handed over never add up to
    more than the largest part, and a part larger than a slice is read by the thread that
    merges it (not read ahead); the bytes are the serial merge's."""
    base, tuned = hf_models("llama", 3)
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)
    recipe = parse_recipe({
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(t), "parameters": {"density": 0.5, "weight": 0.4}}
                   for t in tuned],
        "seed": 5}, "test")
    held: list[tuple[int, int]] = []
    real_admit = stream.Budgeted.admit

    def admit(self: stream.Budgeted, part: stream.Part, done: Callable[[object], None]
              ) -> Callable[[object], None]:
        wrapped = real_admit(self, part, done)
        held.append((self.held, self.budget))
        return wrapped
    monkeypatch.setattr(stream.Budgeted, "admit", admit)
    reads: list[tuple[str, int]] = []
    real_read = stream.read_part

    def read_part(plan: object, task: stream.TensorTask, device: torch.device,
                  start: int | None = None, stop: int | None = None) -> stream.Inputs:
        reads.append((threading.current_thread().name,
                      math.prod(task.shape) if start is None or stop is None
                      else stop - start))
        return real_read(plan, task, device, start, stop)  # type: ignore[arg-type]
    monkeypatch.setattr(stream, "read_part", read_part)
    digests = serial_and_pipelined(recipe, tmp_path)
    assert digests[0] == digests[1]
    assert held and all(h <= budget for h, budget in held)
    assert max(budget for _, budget in held) == max(
        math.prod(t.shape) for t in build_plan(recipe, "").tasks)
    large = [name for name, size in reads if size > 100]
    small = [name for name, size in reads if size <= 100]
    assert large and not any(name.startswith("pcbmerge-read") for name in large)
    assert any(name.startswith("pcbmerge-read") for name in small)
