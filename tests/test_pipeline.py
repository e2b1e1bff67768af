"""The pipelined merge (reader thread ahead, writer thread behind) writes exactly the bytes
of the serial one, for every registered method and scope, with tensors cut in many slices."""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from mergekit_pcb.engine import stream
from mergekit_pcb.engine.pipeline import InOrder, WriteBehind, read_ahead
from mergekit_pcb.engine.plan import build_plan
from mergekit_pcb.errors import RecipeError
from mergekit_pcb.methods import REGISTRY
from mergekit_pcb.methods.pcb import PcbGlobalStats
from mergekit_pcb.methods.ties import TiesGlobalStats
from mergekit_pcb.recipe.schema import parse_recipe
from mergekit_pcb.threads import torch_threads


def _cases() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for name, cls in sorted(REGISTRY.items()):
        scope = cls.param_spec("scope")
        for choice in (scope.choices if scope and scope.choices else (None,)):
            out.append((name, {"scope": choice} if choice else {}))
    return out


def _recipe(method: str, params: dict[str, Any], base: Path, tuned: list[Path]) -> Any:
    spec = REGISTRY[method].param_spec("density")  # knots' is one value for every model
    density = {"density": 0.5} if spec is not None and spec.per_model else {}
    return parse_recipe({
        "merge_method": method, "base_model": str(base),
        "models": [{"model": str(t), "parameters": density} for t in tuned],
        "parameters": params, "seed": 5}, "test")


def _digest(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.glob("*.safetensors"))}


def serial_and_pipelined(recipe: Any, tmp_path: Path, threads: int = 3
                         ) -> list[dict[str, str]]:
    """The shards' digests written serially, then pipelined, at `threads` torch threads."""
    outs = []
    for pipeline in (False, True):
        plan = build_plan(recipe, "")
        out = tmp_path / f"out-{pipeline}"
        out.mkdir()
        try:
            with torch_threads(threads):
                stream.write_plan(plan, out, shard_size=40_000, artifacts=False,
                                  pipeline=pipeline)
        finally:
            plan.close()
        outs.append(_digest(out))
    return outs


@pytest.mark.parametrize(("method", "params"), _cases(),
                         ids=[f"{m}-{p.get('scope', '')}" for m, p in _cases()])
def test_pipelined_equals_serial(hf_models: Any, tmp_path: Path, method: str,
                                 params: dict[str, Any], monkeypatch: pytest.MonkeyPatch
                                 ) -> None:
    base, tuned = hf_models("llama", 3)
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)  # every tensor in many slices
    recipe = _recipe(method, params, base, tuned)
    outs = []
    for pipeline in (False, True):
        try:
            plan = build_plan(recipe, "")
        except RecipeError as e:  # a method that needs another recipe shape
            pytest.skip(f"{method}: {e}")
        out = tmp_path / f"out-{pipeline}"
        out.mkdir()
        try:
            stream.write_plan(plan, out, shard_size=40_000, artifacts=False,
                              pipeline=pipeline)
        finally:
            plan.close()
        outs.append(_digest(out))
    assert len(outs[0]) > 1  # sharded output
    assert outs[0] == outs[1]


@pytest.mark.parametrize(("method", "params"), [
    ("pcb", {"scope": "global"}), ("ties", {"scope": "global"}), ("ties", {}),
    ("dare_ties", {}), ("linear", {})])
def test_parts_side_by_side_equal_serial(hf_models: Any, tmp_path: Path, method: str,
                                         params: dict[str, Any],
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Three part workers (whatever this machine's cores) give the serial bytes, and the
    statistics passes and the merge pass really ran on them."""
    base, tuned = hf_models("llama", 3)
    monkeypatch.setattr(stream, "CHUNK_ELEMENTS", 100)
    recipe = _recipe(method, params, base, tuned)
    computed_on: set[str] = set()
    observed_on: set[str] = set()

    def spy(record: set[str], fn: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            record.add(threading.current_thread().name.split("_")[0])
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(stream, "compute_part", spy(computed_on, stream.compute_part))
    global_stats = {"pcb": PcbGlobalStats, "ties": TiesGlobalStats}.get(method)
    if params.get("scope") == "global" and global_stats is not None:
        monkeypatch.setattr(global_stats, "observe", spy(observed_on, global_stats.observe))
    outs = serial_and_pipelined(recipe, tmp_path)
    assert outs[0] == outs[1]
    assert "pcbmerge-part" in computed_on
    if params.get("scope") == "global":
        assert "pcbmerge-part" in observed_on


def test_read_ahead_keeps_order_and_raises_in_the_caller() -> None:
    assert list(read_ahead(range(10), lambda i: i * i, depth=2)) == [(i, i * i)
                                                                    for i in range(10)]

    def bad(i: int) -> int:
        if i == 3:
            raise ValueError("bad read")
        return i

    got = []
    with pytest.raises(ValueError, match="bad read"):
        for item, _ in read_ahead(range(10), bad):
            got.append(item)
    assert got == [0, 1, 2]


def test_write_behind_runs_in_order_and_reports_errors() -> None:
    seen: list[int] = []
    with WriteBehind(depth=2) as behind:
        for i in range(20):
            behind.submit(seen.append, i)
        behind.drain()
    assert seen == list(range(20))

    def fail() -> None:
        raise OSError("disk full")

    with WriteBehind(depth=2) as behind, pytest.raises(OSError, match="disk full"):
        behind.submit(fail)
        for _ in range(5):
            behind.submit(lambda: torch.zeros(1))
        behind.drain()


def test_in_order_hands_results_back_in_submission_order() -> None:
    import time

    got: list[int] = []
    with InOrder(3) as workers:
        for i in range(12):
            # later calls finish first: order must come from submission, not completion
            workers.submit(lambda i: (time.sleep(0.002 * (3 - i % 3)), i)[1], got.append, i)
            assert len(got) >= i + 1 - 6  # never more than 2 × width in flight
        workers.run_here(lambda: 99, got.append)
        workers.drain()
    assert got == [*range(12), 99]

    def bad(i: int) -> int:
        if i == 2:
            raise ValueError("bad part")
        return i

    seen: list[int] = []
    with InOrder(2) as workers, pytest.raises(ValueError, match="bad part"):
        for i in range(6):
            workers.submit(bad, seen.append, i)
        workers.drain()
    assert seen == [0, 1]
