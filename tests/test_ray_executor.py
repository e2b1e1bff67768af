"""Scoring on a Ray cluster: a real two-node cluster on this machine
(`ray.cluster_utils.Cluster`), compared bit for bit with the process pool.

Each node offers 1 CPU and each worker asks for 1, so two workers land on two nodes (the
third node, added by the fault test, is where a lost worker's replacement goes)."""

from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from test_coefsearch import build_population as build_coef_population
from test_coefsearch import recipe_dict as coef_recipe_dict
from test_coefsearch import record as coef_record
from test_coefsearch import search as coef_search
from test_coefsearch import write_recipe as write_coef_recipe
from test_de_ancestor import recipe as de_recipe
from test_de_ancestor import training_run  # noqa: F401 (a fixture)
from test_evolve_engine import (
    build_population,
    recipe_dict,
    same_tensors,
    search_record,
    write_recipe,
)
from typer.testing import CliRunner

from mergekit_pcb.cli import app
from mergekit_pcb.evolve import ray_executor
from mergekit_pcb.evolve.executor import executor_scope
from mergekit_pcb.evolve.ray_executor import RaySettings
from mergekit_pcb.evolve.run import evolve

ray = pytest.importorskip("ray")
# One cluster for the module: under pytest-xdist its tests all run in one worker.
pytestmark = pytest.mark.xdist_group("ray")
from ray.cluster_utils import Cluster  # noqa: E402

SLOW_MODULE = '''
import os
import time

from tinynet import loss as _loss


def loss(state, data):
    """tinynet's loss, slowed down while the file `slow` lies beside the data."""
    if os.path.exists(os.path.join(os.path.dirname(os.path.abspath(data)), "slow")):
        time.sleep(0.4)
    return _loss(state, data)
'''


# A small object store per node: CI machines have little shared memory, and the members
# here are kilobytes.
NODE = {"object_store_memory": 100 * 2**20}


@pytest.fixture(scope="module")
def cluster() -> Any:
    c = Cluster(initialize_head=True, connect=False,
                head_node_args={"num_cpus": 1, "include_dashboard": False, **NODE})
    c.add_node(num_cpus=1, **NODE)
    c.wait_for_nodes()
    ray.init(address=c.address, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield c
    ray.shutdown()
    c.shutdown()


def settings(**kw: Any) -> RaySettings:
    return RaySettings(cpus_per_worker=1, **kw)


def run_with_stats(recipe: Path, out: Path, **kw: Any) -> list[dict[str, Any]]:
    """`evolve` on Ray, and what each worker did (read before the executor closes)."""
    stats: list[dict[str, Any]] = []
    original = ray_executor.RayExecutor.close

    def close(self: ray_executor.RayExecutor) -> None:
        stats.extend(self.stats())
        original(self)

    ray_executor.RayExecutor.close = close  # type: ignore[method-assign]
    try:
        evolve(recipe, out, trust_code=True, **kw)
    finally:
        ray_executor.RayExecutor.close = original  # type: ignore[method-assign]
    return stats


@pytest.mark.parametrize("mode", ["merged", "standalone"])
def test_evolver_with_ties_on_two_nodes_equals_the_process_pool(
        cluster: Any, tmp_path: Path, mode: str) -> None:
    pop = build_population(tmp_path / "pop")
    recipe = write_recipe(pop, recipe_dict(pop, n=4, mode=mode, generations=3))
    # the pool once; the serial run equals it (test_evolve_engine) and starts no processes
    evolve(recipe, pop / "pool", workers=2 if mode == "merged" else 1, trust_code=True)
    stats = run_with_stats(recipe, pop / "ray", workers=2, ray=settings())
    assert same_tensors(pop / "pool", pop / "ray")
    assert search_record(pop / "pool") == search_record(pop / "ray")
    doc = json.loads((pop / "ray" / "evolution.json").read_text())
    assert sum(h["accepted"] for h in doc["history"]) > 0  # trials for the copies to follow
    # two workers on two nodes, each with its own copy of the population
    assert len({s["node"] for s in stats}) == 2
    run_dir = str((pop / "ray.run").resolve())
    for s in stats:
        assert s["received_bytes"] > 0 and s["opened"]
        # no member file was read from the driver's run directory by a worker
        assert not any(p.startswith(run_dir) for p in s["opened"])
        assert all(p.startswith(s["replica"]) for p in s["opened"])
    # accepted trials reached the other worker as seeds and were rebuilt there
    assert sum(s["rebuilt"] for s in stats) > 0


def test_three_workers_and_a_shared_run_directory_give_the_same_result(
        cluster: Any, tmp_path: Path) -> None:
    """Any number of workers (here 3 on 2 CPUs: the third waits its turn), and workers that
    read the members from the run directory when it is shared."""
    pop = build_population(tmp_path / "pop")
    recipe = write_recipe(pop, recipe_dict(pop, n=4, generations=2))
    evolve(recipe, pop / "serial", trust_code=True)
    evolve(recipe, pop / "three", workers=3, trust_code=True,
           ray=RaySettings(cpus_per_worker=0.5))
    stats = run_with_stats(recipe, pop / "shared", workers=2,
                           ray=settings(shared_run_dir=True))
    for other in ("three", "shared"):
        assert same_tensors(pop / "serial", pop / other)
        assert search_record(pop / "serial") == search_record(pop / other)
    run_dir = str((pop / "shared.run").resolve())
    assert all(s["replica"] is None for s in stats)
    assert any(p.startswith(run_dir) for s in stats for p in s["opened"])


def test_removing_a_node_mid_run_does_not_change_the_result(cluster: Any,
                                                            tmp_path: Path) -> None:
    pop = build_population(tmp_path / "pop")
    (pop / "slowfit.py").write_text(SLOW_MODULE)
    data = recipe_dict(pop, n=4, generations=3, fitness="callable")
    data["fitness"]["function"] = "slowfit:loss"
    recipe = write_recipe(pop, data)
    evolve(recipe, pop / "pool", trust_code=True)
    cluster.add_node(num_cpus=1, **NODE)  # room for the replacement worker
    cluster.wait_for_nodes()
    (pop / "slow").touch()
    state = pop / "ray.run" / "state.json"
    removed: list[str] = []

    def remove_a_worker_node(executors: list[ray_executor.RayExecutor]) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # mid-run: in the first generation's steps
            try:
                st = json.loads(state.read_text())
            except (OSError, ValueError):
                st = {}
            if executors and st.get("phase") == "evolve" and st.get("step", 0) >= 1:
                break
            time.sleep(0.05)
        busy = {s["node"] for s in executors[0].stats()}
        victim = next(n for n in cluster.list_all_nodes()
                      if n is not cluster.head_node and n.node_id in busy)
        removed.append(victim.node_id)
        cluster.remove_node(victim)

    executors: list[ray_executor.RayExecutor] = []
    init = ray_executor.RayExecutor.__init__

    def capture(self: ray_executor.RayExecutor, *a: Any, **kw: Any) -> None:
        init(self, *a, **kw)
        executors.append(self)

    killer = threading.Thread(target=remove_a_worker_node, args=(executors,))
    killer.start()
    ray_executor.RayExecutor.__init__ = capture  # type: ignore[method-assign]
    try:
        evolve(recipe, pop / "ray", workers=2, trust_code=True, ray=settings())
    finally:
        ray_executor.RayExecutor.__init__ = init  # type: ignore[method-assign]
        killer.join()
        (pop / "slow").unlink()
    assert removed and executors[0].replaced >= 1  # a worker died and was replaced
    assert same_tensors(pop / "pool", pop / "ray")
    assert search_record(pop / "pool") == search_record(pop / "ray")


def test_de_ancestor_on_ray_equals_the_serial_run(cluster: Any, training_run: Path,  # noqa: F811
                                                   tmp_path: Path) -> None:
    """A strategy with its own state (SaDE's adaptation) and a mini-batch per generation:
    members rescored on each batch, the result chosen on all of select."""
    path = de_recipe(training_run, "ray", generations=3)
    evolve(path, tmp_path / "serial", trust_code=True)
    evolve(path, tmp_path / "ray", workers=2, trust_code=True, ray=settings())
    assert same_tensors(tmp_path / "serial", tmp_path / "ray")
    assert search_record(tmp_path / "serial") == search_record(tmp_path / "ray")


def test_resume_on_ray_continues_a_run(cluster: Any, tmp_path: Path) -> None:
    """Workers of a resumed run start from the driver's members (a new epoch)."""
    pop = build_population(tmp_path / "pop")
    recipe = write_recipe(pop, recipe_dict(pop, n=4, generations=3))
    evolve(recipe, pop / "whole", trust_code=True)
    evolve(recipe, pop / "ray", generations=1, workers=2, trust_code=True, ray=settings())
    evolve(recipe, pop / "ray", generations=3, workers=2, resume=True, force=True,
           trust_code=True, ray=settings())
    assert same_tensors(pop / "whole", pop / "ray")


def test_coefficient_search_on_ray_equals_the_process_pool(cluster: Any,
                                                          tmp_path: Path) -> None:
    pop = build_coef_population(tmp_path / "pop")
    data = coef_recipe_dict(pop, budget=6,
                            merge={"merge_method": "ties", "parameters": {"density": 0.5}})
    recipe = write_coef_recipe(pop, data)
    coef_search(recipe, pop / "pool", workers=2)
    coef_search(recipe, pop / "ray", workers=2, ray=settings())
    assert coef_record(pop / "pool") == coef_record(pop / "ray")
    a = json.loads((pop / "pool" / "search.json").read_text())
    b = json.loads((pop / "ray" / "search.json").read_text())
    assert a["best"] == b["best"] and b["engine_check"]["equal"]
    assert all(e["fast"] for e in b["evaluations"])  # the workers built the parts
    assert not (pop / "ray.run" / "parts.safetensors").exists() or a["parts_in"] == "file"
    assert [r["report"] for r in a["scores"]] == [r["report"] for r in b["scores"]]


def test_worker_count_follows_the_resources_each_worker_asks_for(cluster: Any) -> None:
    cpus = ray.cluster_resources()["CPU"]
    with executor_scope(None, 1, RaySettings(cpus_per_worker=0.5)) as ex:
        assert ex.workers == int(cpus / 0.5)
        assert ex.map(abs, [-3, 4, -5]) == [3, 4, 5]


# ----------------------------------------------------------------------------- the CLI


def _cli(*args: str | Path) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def _line(res: Any) -> str:
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1, res.output
    return lines[0]


def test_ray_flags_are_refused_where_they_do_not_apply(tmp_path: Path,
                                                       monkeypatch: Any) -> None:
    pop = build_population(tmp_path / "pop")
    recipe = write_recipe(pop, recipe_dict(pop, n=3, generations=1))
    merge = pop / "merge.yaml"
    merge.write_text(f"merge_method: linear\nmodels:\n  - model: {pop / 'm0'}\n"
                     f"  - model: {pop / 'm1'}\n")
    assert "--executor: not used by merge recipes" in _line(
        _cli("run", merge, "-o", pop / "o", "--executor", "ray"))
    assert "--ray-address: only used with --executor ray" in _line(
        _cli("evolve", recipe, "-o", pop / "o", "--ray-address", "auto", "--trust-code"))
    assert "--gpus-per-worker must be at least 0" in _line(
        _cli("run", recipe, "-o", pop / "o", "--executor", "ray", "--gpus-per-worker", "-1",
             "--trust-code"))
    assert "a worker must ask for some CPU or GPU" in _line(
        _cli("evolve", recipe, "-o", pop / "o", "--executor", "ray", "--cpus-per-worker", "0",
             "--trust-code"))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    line = _line(_cli("evolve", recipe, "-o", pop / "o", "--executor", "ray",
                      "--trust-code"))
    assert "Ray is not installed" in line and "mergekit-pcb[ray]" in line
    assert not (pop / "o").exists() and not (pop / "o.run").exists()


def test_cli_evolve_on_the_cluster(cluster: Any, tmp_path: Path) -> None:
    pop = build_population(tmp_path / "pop")
    recipe = write_recipe(pop, recipe_dict(pop, n=4, generations=2))
    evolve(recipe, pop / "pool", trust_code=True)
    res = _cli("evolve", recipe, "-o", pop / "ray", "--executor", "ray", "--ray-address",
               cluster.address, "--cpus-per-worker", "1", "--quiet", "--trust-code")
    assert res.exit_code == 0, res.output
    assert same_tensors(pop / "pool", pop / "ray")
    # no --workers: one per CPU of the cluster
    workers = json.loads((pop / "ray" / "evolution.json").read_text())["workers"]
    assert workers == int(ray.cluster_resources()["CPU"])


def test_gpus_per_worker_places_one_worker_per_gpu(cluster: Any) -> None:
    """`--gpus-per-worker 1` is a Ray resource request: a node declaring a GPU (Ray counts
    it; this machine has none to use) gets the only worker, and Ray hands it that GPU."""
    node = cluster.add_node(num_cpus=1, num_gpus=1, **NODE)
    cluster.wait_for_nodes()
    with executor_scope(None, 1, RaySettings(cpus_per_worker=0, gpus_per_worker=1)) as ex:
        assert ex.workers == 1
        assert [s["node"] for s in ex.stats()] == [node.node_id]

        def gpu_ids(_: int) -> list[int]:  # a local function: Ray sends it by value
            return [int(i) for i in ray.get_gpu_ids()]

        assert ex.map(gpu_ids, [0]) == [[0]]
