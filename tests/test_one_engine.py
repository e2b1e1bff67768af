"""One merge engine: a search's population merge is `pcbmerge run` over the member files.

For every registered merge method (both scopes where it has them), the merge a search
computes inside the evolution engine (members memory-mapped, a trial in memory) is compared
bit for bit with `pcbmerge run` on a recipe naming the same member files.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from mergekit_pcb.cli import app
from mergekit_pcb.evolve.config import FitnessSpec, InnerMerge
from mergekit_pcb.evolve.jobs import Runtime, WorkContext
from mergekit_pcb.evolve.store import TensorSpec
from mergekit_pcb.evolve.strategies import STRATEGIES
from mergekit_pcb.evolve.strategies.evolver import EvolverParameters
from mergekit_pcb.io.mapped import MappedFiles, open_readable
from mergekit_pcb.io.memory import MemoryCheckpoint
from mergekit_pcb.methods import REGISTRY


def _state(seed: int, base: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if base is None:
        return {
            "layers.0.weight": torch.randn(64, 48, generator=g),
            "layers.0.bias": torch.randn(64, generator=g),
            "layers.1.weight": torch.randn(10, 64, generator=g),
            "norm.running_mean": torch.randn(64, generator=g),
            "norm.running_var": torch.rand(64, generator=g) + 0.5,
            "norm.num_batches_tracked": torch.tensor(7),
        }
    out = {}
    for k, v in base.items():
        out[k] = v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
    return out


@pytest.fixture(scope="module")
def population(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    root = tmp_path_factory.mktemp("pop")
    base = _state(0)
    (root / "base").mkdir()
    save_file(base, str(root / "base" / "model.safetensors"))
    members = []
    for i in range(4):
        path = root / f"member-{i}.safetensors"
        save_file(_state(10 + i, base), str(path))
        members.append(path)
    return root, members


def _parameter_sets() -> list[tuple[str, dict[str, Any]]]:
    """Every registered method, with each choice of `scope` where it has one."""
    out = []
    for name, cls in REGISTRY.items():
        params: dict[str, Any] = {}
        if cls.param_spec("density") is not None:
            params["density"] = 0.5 if name != "pcb" else 0.3
        if cls.param_spec("lambda") is not None:
            params["lambda"] = 0.9
        scope = cls.param_spec("scope")
        for choice in (scope.choices if scope and scope.choices else (None,)):
            out.append((name, {**params, **({"scope": choice} if choice else {})}))
    return out


def _runtime(root: Path, method: str, params: dict[str, Any], members: list[Path],
             seed: int) -> Runtime:
    layout = tuple(TensorSpec(n, i.dtype, i.shape)
                   for n, i in open_readable(str(members[0])).tensors.items())
    ctx = WorkContext(
        key=f"{method}-{params}-{seed}", fitness=FitnessSpec(type="callable", function="m:f"),
        root=str(root), model_ref=None, merge=InnerMerge(merge_method=method, parameters=params),
        base=str(root / "base"), dtype=None, seed=seed, layout=layout,
        strategy=STRATEGIES["evolver"](EvolverParameters()))
    return Runtime(ctx)  # its evaluator is never built: only the merge is exercised


def _run_recipe(root: Path, method: str, params: dict[str, Any], members: list[Path],
                seed: int, out: Path) -> dict[str, torch.Tensor]:
    recipe = {"merge_method": method, "base_model": str(root / "base"),
              "models": [{"model": str(m)} for m in members], "parameters": params,
              "seed": seed}
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    res = CliRunner().invoke(app, ["run", str(path), "-o", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    return load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize(("method", "params"), _parameter_sets(),
                         ids=[f"{m}-{p.get('scope', '')}" for m, p in _parameter_sets()])
def test_population_merge_is_pcbmerge_run(population: tuple[Path, list[Path]], tmp_path: Path,
                                          method: str, params: dict[str, Any]) -> None:
    root, members = population
    rt = _runtime(root, method, params, members, seed=3)
    try:
        # the population as a search holds it: members mapped, slot 2 a trial in memory
        trial = _state(99, load_file(str(members[2])))
        trial_file = tmp_path / "trial.safetensors"
        save_file(trial, str(trial_file))
        sources = [rt.cache.get(str(m)) for m in members]
        sources[2] = MemoryCheckpoint("trial", trial)
        merged = rt.merge(sources)
        plan = rt.plans[len(members)]
        if plan.base_key is not None:  # read in place by every candidate, not copied
            assert isinstance(plan.checkpoints[plan.base_key], MappedFiles)
        on_files = [*members[:2], trial_file, *members[3:]]
        expected = _run_recipe(root, method, params, on_files, 3, tmp_path / "out")
        assert merged.keys() == expected.keys()
        for name in expected:
            assert merged[name].dtype == expected[name].dtype, name
            assert torch.equal(merged[name], expected[name]), (method, params, name)
        # a second merge through the same cached plan gives the same bits (fresh statistics)
        again = rt.merge(sources)
        assert all(torch.equal(again[n], merged[n]) for n in merged)
        # the engine's buffer rules: running statistics averaged, integer buffers from base
        mean = torch.stack([load_file(str(p))["norm.running_mean"] for p in on_files]).mean(0)
        assert torch.equal(merged["norm.running_mean"], mean)
        assert int(merged["norm.num_batches_tracked"]) == 7
    finally:
        rt.close()


def test_every_registered_method_is_covered() -> None:
    assert {m for m, _ in _parameter_sets()} == set(REGISTRY)
    scoped = [m for m, p in _parameter_sets() if "scope" in p]
    assert sorted(scoped) == ["knots", "knots", "pcb", "pcb", "ties", "ties"]


def _separable_sets() -> list[tuple[str, dict[str, Any]]]:
    return [(m, p) for m, p in _parameter_sets()
            if REGISTRY[m]().separable({**_defaults(m), **p})]


def _defaults(method: str) -> dict[str, Any]:
    return {s.name: s.default for s in REGISTRY[method].params}


def test_separable_methods_are_the_expected_ones() -> None:
    assert sorted(m for m, _ in _separable_sets()) == ["dare_linear", "dare_ties", "ties"]


@pytest.mark.parametrize(("method", "params"), _separable_sets(),
                         ids=[f"{m}-{p.get('scope', '')}" for m, p in _separable_sets()])
def test_kept_member_steps_give_the_bits_of_a_fresh_merge(
        population: tuple[Path, list[Path]], tmp_path: Path, method: str,
        params: dict[str, Any]) -> None:
    """Candidate after candidate, a separable method reuses the members' prepared task
    vectors (trimmed, dropped) and still gives the bits a fresh merge gives; a member that
    is replaced (a new file) is prepared anew and the old one's tensors are let go."""
    root, members = population
    rt = _runtime(root, method, params, members, seed=3)
    fresh = _runtime(root, method, params, members, seed=3)
    fresh.prepared.budget_bytes = 0  # keeps nothing: every merge prepares every member
    try:
        base = load_file(str(members[0]))
        accepted = tmp_path / "accepted.safetensors"
        save_file(_state(77, base), str(accepted))
        candidates = [(2, "trial", 99), (0, "trial", 98), (1, "file", 0), (3, "trial", 97)]
        paths = [str(m) for m in members]
        prepared_before: set[tuple[int, str]] = set()  # (slot, file) prepared by now
        for step, (slot, kind, seed) in enumerate(candidates):
            if kind == "file":
                paths[slot] = str(accepted)
            on_file = {(i, p) for i, p in enumerate(paths) if not (kind == "trial" and i == slot)}
            hits_before = rt.prepared.hits
            for runtime_ in (rt, fresh):
                runtime_.cache.keep_only(paths)  # the population's files, as a trial's build
                sources = [runtime_.cache.get(p) for p in paths]
                if kind == "trial":
                    sources[slot] = MemoryCheckpoint("trial", _state(seed, base))
                got = runtime_.merge(sources)
                if runtime_ is rt:
                    kept = got
            for name in got:
                assert torch.equal(kept[name], got[name]), (step, name)
            # each member file already prepared at its slot is taken from the memo, for
            # each of the 3 tensors the method merges (the norm buffers are averaged)
            assert rt.prepared.hits - hits_before == 3 * len(on_file & prepared_before), step
            prepared_before |= on_file
        assert fresh.prepared.hits == 0
        # the population's members are held (slot 3's too: its trial was not kept), the
        # replaced member-1 is let go
        held = {k[0][0] for k in rt.prepared._entries}
        assert held == {str(Path(p).resolve()) for p in paths}
        assert str(members[1].resolve()) not in held
    finally:
        rt.close()
        fresh.close()


@pytest.mark.parametrize(("method", "params"), _separable_sets(),
                         ids=[f"{m}-{p.get('scope', '')}" for m, p in _separable_sets()])
def test_an_accepted_trials_steps_carry_over_to_its_file(
        population: tuple[Path, list[Path]], tmp_path: Path, method: str,
        params: dict[str, Any]) -> None:
    """A trial merged under a name (as `run_trial` names it) and then written to a member
    file is not prepared again: its kept task vectors move to the file's identity, and the
    next merge takes them from the memo with the bits a fresh merge gives."""
    from mergekit_pcb.io.mapped import file_identity

    root, members = population
    rt = _runtime(root, method, params, members, seed=3)
    fresh = _runtime(root, method, params, members, seed=3)
    fresh.prepared.budget_bytes = 0
    try:
        trial_state = _state(55, load_file(str(members[0])))
        paths = [str(m) for m in members]
        trial = MemoryCheckpoint("trial", trial_state)
        trial.identity = ("trial", "g1-s2")
        rt.merge([*[rt.cache.get(p) for p in paths[:2]], trial, rt.cache.get(paths[3])])
        written = tmp_path / "g1-s2.safetensors"
        save_file(trial_state, str(written))
        rt.prepared.rename(trial.identity, file_identity(written))
        paths[2] = str(written)
        hits = rt.prepared.hits
        got = rt.merge([rt.cache.get(p) for p in paths])
        # every member, the new one included, from the memo: 3 merged tensors each
        assert rt.prepared.hits - hits == 3 * len(paths)
        want = fresh.merge([fresh.cache.get(p) for p in paths])
        for name in want:
            assert torch.equal(got[name], want[name]), name
        assert not any(k[0] == trial.identity for k in rt.prepared._entries)
    finally:
        rt.close()
        fresh.close()


def test_a_trial_built_again_is_prepared_again(population: tuple[Path, list[Path]],
                                              tmp_path: Path) -> None:
    """A speculative step discarded by the driver is built again under the same out_path
    from other members: its trial must not find the first build's kept task vectors."""
    from mergekit_pcb.evolve.jobs import TrialJob, run_trial
    from mergekit_pcb.evolve.strategies.base import Step

    root, members = population
    (root / "fitness_sum.py").write_text(
        "def f(state):\n    return float(sum(t.double().sum() for t in state.values()))\n")
    params = {"density": 0.4}

    def context(key: str) -> WorkContext:
        ctx = _runtime(root, "ties", params, members, seed=5).ctx
        return WorkContext(**{**ctx.__dict__, "key": key, "fitness": FitnessSpec(
            type="callable", function="fitness_sum:f")})

    replaced = tmp_path / "accepted.safetensors"
    save_file(_state(66, load_file(str(members[0]))), str(replaced))
    out = str(tmp_path / "g0001-s0002.safetensors")
    job = TrialJob(generation=0, step=2, plan=Step(slot=2, donors=(0, 1), F=0.5, CR=0.5),
                   members=tuple(str(m) for m in members), merged=True,
                   threshold=float("inf"), out_path=out)  # never beaten: not written
    again = TrialJob(**{**job.__dict__, "members": (str(replaced), *job.members[1:])})
    ctx = context("built-twice")
    first = run_trial((ctx, job))
    second = run_trial((ctx, again))
    alone = run_trial((context("built-once"), again))
    assert not first.accepted and not second.accepted
    assert second.score == alone.score != first.score


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_global_pcb_reuses_members_statistics(population: tuple[Path, list[Path]],
                                              tmp_path: Path, clip: float,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Candidate after candidate, a global PCB takes each member's clip bounds and |τ|
    range from the previous merge (only the trial's |τ| is observed) and still gives the
    bits of a fresh merge."""
    from mergekit_pcb.methods.pcb import PcbGlobalStats

    root, members = population
    params = {"density": 0.3, "lambda": 0.9, "clip": clip, "scope": "global"}
    observed: list[int] = []
    unknown = PcbGlobalStats._unknown

    def count(self: PcbGlobalStats, inputs: Any) -> Any:
        found = unknown(self, inputs)
        observed.append(len(found))
        return found

    monkeypatch.setattr(PcbGlobalStats, "_unknown", count)
    rt = _runtime(root, "pcb", params, members, seed=3)
    try:
        base = load_file(str(members[0]))
        paths = [str(m) for m in members]
        for step, slot in enumerate([2, 0, 3]):
            sources = [rt.cache.get(p) for p in paths]
            sources[slot] = MemoryCheckpoint("trial", _state(90 + step, base))
            observed.clear()
            got = rt.merge(sources)
            # the |τ| passes observe every member the first time, then only the trial
            # (slot 2's file is first merged at step 1, and slot 0's at step 2)
            want = {0: 4, 1: 2, 2: 1}[step]
            assert observed and set(observed) == {want}, (step, set(observed))
            fresh = _runtime(root, "pcb", params, members, seed=3)
            try:
                expected = fresh.merge([fresh.cache.get(p) for p in paths[:slot]]
                                       + [sources[slot]]
                                       + [fresh.cache.get(p) for p in paths[slot + 1:]])
            finally:
                fresh.close()
            for name in expected:
                assert torch.equal(got[name], expected[name]), (step, name)
    finally:
        rt.close()


@pytest.mark.parametrize("member_score_fails", [False, True])
def test_a_kept_trial_is_written_while_it_is_scored(population: tuple[Path, list[Path]],
                                                    tmp_path: Path,
                                                    member_score_fails: bool) -> None:
    """In merged mode a kept trial's file is written on the runtime's writer thread while its
    own score (a second fitness call) runs: the job reports the CRC-32 of the file, which
    holds the trial's bits, and the next merge takes its kept task vectors from the memo. A
    failing member score is the error reported, with nothing left writing."""
    from mergekit_pcb.evolve.jobs import TrialJob, build_trial, run_trial, runtime
    from mergekit_pcb.evolve.strategies.base import Step
    from mergekit_pcb.io.writer import file_crc32

    root, members = population
    module = f"fitness_kept_{int(member_score_fails)}"
    (root / f"{module}.py").write_text(
        "CALLS = []\n"
        "def f(state):\n"
        "    CALLS.append(1)\n"
        f"    if {member_score_fails} and len(CALLS) == 2:\n"
        "        raise RuntimeError('member score failed')\n"
        "    return float(sum(t.double().sum() for t in state.values()))\n")
    base_ctx = _runtime(root, "ties", {"density": 0.4}, members, seed=9).ctx
    ctx = WorkContext(**{**base_ctx.__dict__, "key": module, "fitness": FitnessSpec(
        type="callable", function=f"{module}:f")})
    out = tmp_path / "g0001-s0001.safetensors"
    job = TrialJob(generation=0, step=1, plan=Step(slot=1, donors=(2, 3), F=0.5, CR=0.5),
                   members=tuple(str(m) for m in members), merged=True,
                   threshold=float("-inf"), out_path=str(out))  # always beaten: kept
    if member_score_fails:
        with pytest.raises(RuntimeError, match="member score failed"):
            run_trial((ctx, job))
        assert not list(tmp_path.glob(".*.tmp-*"))  # the write ended (complete, renamed)
        return
    result = run_trial((ctx, job))
    assert result.accepted and result.member_score is not None
    assert result.checksum == file_crc32(out)
    rt = runtime(ctx)
    want = build_trial(rt, job)
    got = load_file(str(out))
    assert list(got) == [s.name for s in ctx.layout]
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name
    paths = [str(m) for m in members]
    paths[1] = str(out)
    hits = rt.prepared.hits
    rt.merge([rt.cache.get(p) for p in paths])
    assert rt.prepared.hits - hits == 3 * len(paths)  # the new member's steps carried over


@pytest.mark.parametrize(("density", "miss"), [(0.1, False), (0.5, False), (0.97, False),
                                               (0.1, True)])
def test_global_pcb_candidate_scores_give_pcbmerge_runs_bits(
        tmp_path: Path, density: float, miss: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Merging in memory, a global PCB computes exact scores only where an upper bound
    reaches a floor sampled below each task's threshold (`PcbGlobalStats._sample`), and
    takes the members' task vectors and intra-balancing terms from the memo candidate after
    candidate. Each merge is `pcbmerge run`'s bits, also when the floors miss (forced:
    every score is then computed)."""
    from mergekit_pcb.methods import ops, pcb, selection
    from mergekit_pcb.threads import torch_threads

    assert all(k.wait(timeout=300) is not None
               for k in (pcb.KERNELS, selection.HISTOGRAMS, ops.FUSED))
    g = torch.Generator().manual_seed(11)
    base = {"a.weight": torch.randn(96, 128, generator=g),
            "b.weight": torch.randn(5003, generator=g), "c.bias": torch.randn(64, generator=g)}
    (tmp_path / "base").mkdir()
    save_file(base, str(tmp_path / "base" / "model.safetensors"))

    def model(seed: int) -> dict[str, torch.Tensor]:
        r = torch.Generator().manual_seed(seed)
        return {k: v + 0.02 * torch.randn(v.shape, generator=r) for k, v in base.items()}

    members = []
    for i in range(4):
        members.append(tmp_path / f"m{i}.safetensors")
        save_file(model(20 + i), str(members[-1]))
    found: list[tuple[float | None, int]] = []
    intra_calls: list[int] = []
    find, set_floors, intra = (pcb.PcbGlobalStats._find_candidates,
                               pcb.PcbGlobalStats._set_floors, pcb._intra)

    def finding(self: Any, part: Any, rows: Any) -> None:
        find(self, part, rows)
        found.extend((self._floors[i], part.index[i].size) for i in rows)

    def flooring(self: Any) -> None:
        set_floors(self)
        if miss:  # above every threshold
            self._floors = [float("inf")] * self.n

    def counting(*args: Any) -> torch.Tensor:
        intra_calls.append(1)
        return intra(*args)

    monkeypatch.setattr(pcb.PcbGlobalStats, "_find_candidates", finding)
    monkeypatch.setattr(pcb.PcbGlobalStats, "_set_floors", flooring)
    monkeypatch.setattr(pcb, "_intra", counting)
    params = {"density": density, "lambda": 1.1, "scope": "global"}
    rt = _runtime(tmp_path, "pcb", params, members, seed=3)
    try:
        for step, slot in enumerate([1, 1, 2]):
            trial = model(40 + step)
            sources = [rt.cache.get(str(m)) for m in members]
            sources[slot] = MemoryCheckpoint("trial", trial)
            found.clear()
            intra_calls.clear()
            with torch_threads(1):
                merged = rt.merge(sources)
            # two parts large enough for the kernels, four tasks: candidates for each
            # (with a missed floor, once more from no floor); intra-balancing terms computed
            # for every member at the first merge, then for the trial and a member file
            # not merged before (the one the first trial stood in for, at step 2)
            assert len(found) == 8 * (2 if miss else 1)
            assert all(f > float("-inf") for f, _ in found[:8]) or density > 0.9
            size = 96 * 128 + 5003
            first = [sum(n for _, n in found[k:8:4]) for k in range(4)]  # per task
            if miss:
                assert all(f == float("-inf") for f, _ in found[8:])
                assert sum(n for _, n in found[8:]) == 4 * size
            elif density < 0.9:  # the floors leave out most entries that weigh nothing
                assert max(first) < (density + 0.25) * size, first
            assert len(intra_calls) == {0: 8, 1: 2, 2: 4}[step]
            trial_file = tmp_path / f"trial-{step}.safetensors"
            save_file(trial, str(trial_file))
            on_files = [*members[:slot], trial_file, *members[slot + 1:]]
            expected = _run_recipe(tmp_path, "pcb", params, on_files, 3,
                                   tmp_path / f"out-{step}")
            for name in expected:
                assert torch.equal(merged[name].view(torch.int32),
                                   expected[name].view(torch.int32)), (step, name)
    finally:
        rt.close()
