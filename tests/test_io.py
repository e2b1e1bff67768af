"""Checkpoint I/O: our header parser and shard writer against the safetensors library,
and hub ids resolved from a local Hugging Face cache layout built here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_recipe
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.io.checkpoints import open_checkpoint
from mergekit_pcb.io.resolve import resolve_model_path
from mergekit_pcb.io.writer import OutputTensor, ShardedSafetensorsWriter, plan_shards

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64,
          torch.int32, torch.int8, torch.uint8, torch.bool]


def sample_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        shape = [(3, 5), (7,), (), (2, 3, 4), (0, 4)][i % 5]
        x = torch.randn(shape, generator=g) * 10
        out[f"t{i}.{str(dtype)[6:]}"] = x.to(dtype)
    return out


def test_reader_matches_safetensors_library(tmp_path: Path) -> None:
    tensors = sample_tensors()
    save_file(tensors, tmp_path / "model.safetensors")
    ckpt = open_checkpoint(str(tmp_path))
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert set(f.keys()) == set(ckpt.names())
        for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            ours = ckpt.read(name)
            theirs = f.get_tensor(name)
            assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
            assert torch.equal(ours, theirs), name
    ckpt.close()


def test_mapped_files_read_what_the_reader_reads(tmp_path: Path) -> None:
    """A sharded checkpoint read through memory maps (a search's base): every tensor and
    slice equals the tensors saved, and a pickled checkpoint is left as it is."""
    from mergekit_pcb.io.mapped import MappedFiles, mapped_files

    tensors = sample_tensors()
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in shards.items():
        save_file({n: tensors[n] for n in part}, tmp_path / file)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: f for f, part in shards.items() for n in part}}))
    ckpt = open_checkpoint(str(tmp_path))
    mapped = mapped_files(ckpt)
    assert isinstance(mapped, MappedFiles) and mapped_files(mapped) is mapped
    for name, want in tensors.items():
        got = mapped.read(name)
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(got, want), name
        if want.numel() > 2:
            assert torch.equal(mapped.read(name, 1, want.numel() - 1),
                               want.reshape(-1)[1:-1]), name
    mapped.close()
    torch.save({"w": torch.ones(2)}, tmp_path / "pytorch_model.bin")
    for file in shards:
        (tmp_path / file).unlink()
    (tmp_path / "model.safetensors.index.json").unlink()
    pickled = open_checkpoint(str(tmp_path), allow_pickle=True)
    assert pickled.pickled and mapped_files(pickled) is pickled  # left to torch.load


def test_writer_output_loads_with_safetensors_library(tmp_path: Path) -> None:
    tensors = sample_tensors()
    specs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    shards = plan_shards(specs, shard_size=64)
    assert len(shards) > 2
    writer = ShardedSafetensorsWriter(tmp_path, shards)
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size()
                                                  for t in tensors.values())
    loaded: dict[str, torch.Tensor] = {}
    for f in sorted(tmp_path.glob("model-*.safetensors")):
        loaded.update(load_file(f))
    assert set(loaded) == set(tensors) == set(index["weight_map"])
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name
    # And our own reader reads the sharded directory back through the index.
    ckpt = open_checkpoint(str(tmp_path))
    for name, t in tensors.items():
        assert torch.equal(ckpt.read(name), t)
    ckpt.close()


def test_writer_flushes_to_disk_as_it_goes(tmp_path: Path, monkeypatch) -> None:
    # Every SYNC_EVERY_BYTES written, the shard is flushed to disk (so the closing fsync does
    # not wait for all of it); the bytes are those of one write at the end.
    from mergekit_pcb.io import writer as writer_module

    synced: list[int] = []
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(writer_module, "SYNC_EVERY_BYTES", 1000)
    monkeypatch.setattr(writer_module.os, "fdatasync",
                        lambda fd: synced.append(os.fstat(fd).st_size) or real_fdatasync(fd))
    tensors = {f"t{i}": torch.full((100,), float(i)) for i in range(7)}  # 400 bytes each
    specs = [OutputTensor(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
    writer = ShardedSafetensorsWriter(tmp_path, plan_shards(specs, shard_size=10**9))
    for name, t in tensors.items():
        writer.write(name, t)
    writer.close()
    header = (tmp_path / "model.safetensors").stat().st_size - 7 * 400
    assert synced == [header + 1200, header + 2400]  # after the 3rd and 6th tensors
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in tensors.items())


def test_single_file_reference(tmp_path: Path) -> None:
    save_file({"a": torch.arange(6.0).reshape(2, 3)}, tmp_path / "weights.safetensors")
    ckpt = open_checkpoint(str(tmp_path / "weights.safetensors"))
    assert torch.equal(ckpt.read("a"), torch.arange(6.0).reshape(2, 3))
    ckpt.close()


def test_index_pointing_at_missing_shard(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(CheckpointError, match=r"model-00002-of-00002\.safetensors named in"):
        open_checkpoint(str(tmp_path))


def make_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """The layout huggingface_hub writes: blobs, refs/main, snapshots/<commit>/ symlinks."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for i, (name, data) in enumerate(files.items()):
        blob = repo / "blobs" / f"blob{i:04d}"
        blob.write_bytes(data)
        os.symlink(os.path.relpath(blob, snapshot), snapshot / name)
    return snapshot


def test_hub_id_resolves_from_offline_cache(tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "hf-cache"
    weights = tmp_path / "w.safetensors"
    save_file({"x": torch.full((3,), 2.0)}, weights)
    snapshot = make_hub_cache(cache, "tiny-org/base", {
        "model.safetensors": weights.read_bytes(), "config.json": b'{"model_type": "toy"}'})
    save_file({"x": torch.full((3,), 4.0)}, weights)
    make_hub_cache(cache, "tiny-org/tuned", {"model.safetensors": weights.read_bytes()})
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model_path("tiny-org/base") == snapshot

    recipe = write_recipe(tmp_path / "r.yaml", {
        "merge_method": "task_arithmetic", "base_model": "tiny-org/base",
        "models": [{"model": "tiny-org/tuned", "parameters": {"weight": 0.5}}]})
    proc = run_cli("run", recipe, "-o", tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert torch.equal(load_file(tmp_path / "out" / "model.safetensors")["x"],
                       torch.full((3,), 3.0))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["model_type"] == "toy"

    proc = run_cli("inspect", "tiny-org/missing")
    assert proc.returncode == 2
    assert "tiny-org/missing is not a local path and is not in the Hugging Face cache" in \
        proc.stderr and "HF_HUB_OFFLINE is set" in proc.stderr


def test_inspect_totals(tmp_path: Path) -> None:
    save_file({"a": torch.ones(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)},
              tmp_path / "model.safetensors")
    proc = run_cli("inspect", tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    totals = json.loads(proc.stdout)["totals"]
    assert totals["parameters"] == 10 and totals["bytes"] == 6 * 4 + 4 * 2
    assert totals["parameters_by_dtype"] == {"float32": 6, "bfloat16": 4}
