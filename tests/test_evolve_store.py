"""The population store: member files written over spares in place, the tidy-up that turns
dead members into spares, and the checksums a resume checks members against."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import mergekit_pcb.evolve.jobs as jobs
from mergekit_pcb.errors import UserError
from mergekit_pcb.evolve.run import evolve
from mergekit_pcb.evolve.store import SPARE_PREFIX, RunDir, TensorSpec
from mergekit_pcb.io.writer import file_crc32, write_safetensors
from tests.test_evolve_engine import build_population, recipe_dict, write_recipe

LAYOUT = [TensorSpec("a", torch.float32, (3, 4)), TensorSpec("b", torch.int64, (2,))]


def _tensors(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [("a", torch.randn(3, 4, generator=g)), ("b", torch.tensor([seed, 7]))]


def test_write_over_a_spare_in_place(tmp_path: Path) -> None:
    fresh, spare, member = tmp_path / "fresh", tmp_path / "spare", tmp_path / "member"
    write_safetensors(fresh, LAYOUT, _tensors(1))
    spare.write_bytes(b"\xff" * 5000)  # a larger dead file: the rewrite must truncate it
    inode = spare.stat().st_ino
    crc = write_safetensors(member, LAYOUT, _tensors(1), reuse=spare)
    assert crc == zlib.crc32(member.read_bytes()) == file_crc32(member)
    assert not spare.exists()
    assert member.stat().st_ino == inode  # the same blocks, written over
    assert member.read_bytes() == fresh.read_bytes()
    loaded = load_file(str(member))
    assert torch.equal(loaded["a"], _tensors(1)[0][1]) and loaded["b"].tolist() == [1, 7]
    # a spare that is gone (taken by an interrupted write) falls back to a new file
    write_safetensors(tmp_path / "other", LAYOUT, _tensors(2), reuse=tmp_path / "missing")
    assert torch.equal(load_file(str(tmp_path / "other"))["a"], _tensors(2)[0][1])


def test_a_failed_write_over_a_spare_leaves_nothing(tmp_path: Path) -> None:
    spare, member = tmp_path / "spare", tmp_path / "member"
    spare.write_bytes(b"\0" * 100)
    bad = [("a", torch.zeros(3, 4)), ("b", torch.zeros(2))]  # float where int64 is due
    with pytest.raises(RuntimeError, match="writer expected b"):
        write_safetensors(member, LAYOUT, bad, reuse=spare)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_collect_garbage_keeps_members_and_some_spares(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    run.create()
    for name in ("init-000.safetensors", "g0001-s0000.safetensors", "g0001-s0001.safetensors",
                 "g0001-s0002.safetensors", f"{SPARE_PREFIX}g0000-s0003.safetensors",
                 ".g0001-s0004.safetensors.tmp-123"):
        (run.members / name).write_bytes(b"x")
    kept = run.collect_garbage(["init-000.safetensors", "g0001-s0002.safetensors"], spares=2)
    # the existing spare is kept first, then one dead member becomes a spare
    assert kept == [f"{SPARE_PREFIX}g0000-s0003.safetensors",
                    f"{SPARE_PREFIX}g0001-s0000.safetensors"]
    assert sorted(p.name for p in run.members.iterdir()) == sorted(
        [*kept, "init-000.safetensors", "g0001-s0002.safetensors"])
    assert run.collect_garbage(["init-000.safetensors"], spares=0) == []
    assert [p.name for p in run.members.iterdir()] == ["init-000.safetensors"]


def test_accepted_trials_are_written_over_spares(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    pop = build_population(tmp_path / "pop")
    calls: list[tuple[str, bool]] = []
    original = jobs.write_safetensors

    def spy(path: Path, *args: object, reuse: Path | None = None, **kw: object) -> None:
        calls.append((path.name, reuse is not None and reuse.exists()))
        original(path, *args, reuse=reuse, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(jobs, "write_safetensors", spy)
    data = recipe_dict(pop, n=4, mode="standalone", generations=6)
    summary = evolve(write_recipe(pop, data), pop / "out", trust_code=True)
    # Replaced inputs are kept (the closing table scores them), so only a replaced trial
    # leaves a spare: new files are made while fewer than pop + 1 trials exist, never after.
    fresh = [name for name, reused in calls if not reused]
    assert len(calls) > 8 and len(fresh) <= 4 + 1, calls
    assert not calls[0][1]
    # the finished run keeps only the state's members
    assert not any(p.name.startswith(SPARE_PREFIX)
                   for p in (summary.run_dir / "members").iterdir())


def test_resume_refuses_a_member_that_does_not_hold_what_was_written(tmp_path: Path) -> None:
    """What an operating-system crash after an in-place write leaves: the right length,
    other bytes. The recorded checksum catches it; a sound run directory resumes."""
    pop = build_population(tmp_path / "pop")
    recipe = write_recipe(pop, recipe_dict(pop, n=4, mode="standalone", generations=2))
    summary = evolve(recipe, pop / "out", trust_code=True)
    state = json.loads((summary.run_dir / "state.json").read_text())
    assert set(state["checksums"]) == set(state["members"]) | set(state["initial"]["members"])
    victim = summary.run_dir / "members" / state["members"][1]
    for name in state["checksums"]:
        assert file_crc32(summary.run_dir / "members" / name) == state["checksums"][name]

    write_recipe(pop, recipe_dict(pop, n=4, mode="standalone", generations=3))
    original = victim.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x01  # one bit, same length, header intact
    victim.write_bytes(bytes(damaged))
    with pytest.raises(UserError, match=rf"member file {victim} does not hold what was "
                                         r"written \(checksum mismatch"):
        evolve(recipe, pop / "out", resume=True, force=True, trust_code=True)
    victim.unlink()
    with pytest.raises(UserError, match=rf"member file {victim} is missing"):
        evolve(recipe, pop / "out", resume=True, force=True, trust_code=True)
    victim.write_bytes(original)
    evolve(recipe, pop / "out", resume=True, force=True, trust_code=True)
    doc = json.loads((pop / "out" / "evolution.json").read_text())
    assert [h["generation"] for h in doc["history"]] == [0, 1, 2, 3]
