"""The population store: members as single-file safetensors in a run directory, and the
run state written atomically beside them.

Members are read memory-mapped (`io.mapped`) and written by `io.writer.write_safetensors`,
tensor by tensor to a temporary name renamed into place, so a member file is either
complete or absent. `state.json` is the
only source of truth: it names the member files, and a file it does not name is garbage
from an interrupted step.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from mergekit_pcb.errors import CheckpointError
from mergekit_pcb.io.files import atomic_write_json
from mergekit_pcb.io.mapped import open_readable
from mergekit_pcb.io.reader import Checkpoint
from mergekit_pcb.io.writer import OutputTensor as TensorSpec  # name, dtype, shape

STATE_FILE = "state.json"
MEMBERS_DIR = "members"
SPARE_PREFIX = ".spare-"  # dead member files kept to be overwritten in place


def layout_of(checkpoints: list[Checkpoint], base: Checkpoint | None = None) -> list[TensorSpec]:
    """The members' common tensor table; every input must match the first one exactly
    (floating-point dtypes may differ: the table holds the widest)."""
    ref = checkpoints[0]
    specs = [TensorSpec(i.name, i.dtype, i.shape) for i in ref.tensors.values()]
    for other in checkpoints[1:]:
        for name in other.names():
            if name not in ref:
                raise CheckpointError(f"tensor '{name}' is in model {other.ref} but not in "
                                      f"{ref.ref}; evolution needs models of one architecture")
        for k, s in enumerate(specs):
            info = other.info(s.name)
            floats = info.dtype.is_floating_point and s.dtype.is_floating_point
            if info.shape == s.shape and info.dtype != s.dtype and floats:
                # a LoRA input's adapted tensors read as float32 over a bf16 base: members
                # hold the wider type, so no input loses bits
                specs[k] = s = TensorSpec(s.name, torch.promote_types(s.dtype, info.dtype),
                                          s.shape)
            if info.shape != s.shape or (info.dtype != s.dtype and not floats):
                raise CheckpointError(
                    f"tensor '{s.name}': {ref.ref} has {list(s.shape)} {s.dtype}, "
                    f"{other.ref} has {list(info.shape)} {info.dtype}")
    if base is not None:
        for s in specs:
            if s.dtype.is_floating_point:
                info = base.info(s.name)
                if info.shape != s.shape:
                    raise CheckpointError(f"tensor '{s.name}': {ref.ref} has {list(s.shape)}, "
                                          f"base {base.ref} has {list(info.shape)}")
    return specs


MAX_STATE_BYTES = 64 << 20
PHASES = ("init", "evolve", "done")


def state_problem(state: Any) -> str | None:
    """What makes `state` unusable as a run state, or None: the engine indexes and loops by
    these fields, so each is checked for type and range before it is trusted."""
    if not isinstance(state, dict):
        return "not a JSON object"
    int_fields = ("generation", "generations", "step", "evaluations", "discarded")
    for key in ("format", "phase", "members", "fitness", *int_fields):
        if key not in state:
            return f"no '{key}'"
    for key in int_fields:
        value = state[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"'{key}' is not a non-negative integer"
    if state["phase"] not in PHASES:
        return f"unknown phase {str(state['phase'])[:40]!r}"
    members, fitness = state["members"], state["fitness"]
    if not isinstance(members, list) or not isinstance(fitness, list):
        return "'members' and 'fitness' must be lists"
    if state["phase"] == "init":
        return None  # the initial population is rebuilt whole
    if len(members) != len(fitness) or len(members) < 2:
        return "'members' and 'fitness' disagree in length"
    if not 0 <= state["step"] <= len(members):
        return f"'step' {state['step']} is outside the population of {len(members)}"
    initial = state.get("initial")
    if not isinstance(initial, dict) or not isinstance(initial.get("members"), list):
        return "no initial members"
    for name in [*members, *initial["members"]]:
        # member names are joined to the members folder: plain file names only
        if not isinstance(name, str) or Path(name).name != name or name.startswith(".") \
                or not name.endswith(".safetensors"):
            return f"member name {str(name)[:60]!r} is not a member file name"
    if any(isinstance(f, bool) or not isinstance(f, (int, float)) for f in fitness):
        return "'fitness' holds a value that is not a number"
    plan = state.get("plan")
    if plan is not None and not isinstance(plan, dict):
        return "'plan' is not an object"
    if not isinstance(state.get("rng"), dict) or "controller" not in state["rng"]:
        return "no RNG state"
    if not isinstance(state.get("history"), list) or not isinstance(state.get("current"), dict):
        return "no history"
    return None


class CheckpointCache:
    """Opened checkpoints by path (file handles only; tensors are read on demand)."""

    def __init__(self) -> None:
        self._open: dict[str, Checkpoint] = {}
        self.opened: set[str] = set()  # every path this cache has opened

    def get(self, path: str) -> Checkpoint:
        ckpt = self._open.get(path)
        if ckpt is None:
            ckpt = open_readable(path)
            self._open[path] = ckpt
            self.opened.add(path)
        return ckpt

    def checkpoints(self) -> list[Checkpoint]:
        return list(self._open.values())

    def keep_only(self, paths: Iterable[str]) -> None:
        keep = set(paths)
        for p in [p for p in self._open if p not in keep]:
            self._open.pop(p).close()

    def close(self) -> None:
        self.keep_only(())


class RunDir:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.members = root / MEMBERS_DIR
        self.state_path = root / STATE_FILE

    def create(self) -> None:
        self.members.mkdir(parents=True, exist_ok=True)

    def member_path(self, name: str) -> Path:
        return self.members / name

    def load_state(self) -> dict[str, Any] | None:
        if not self.state_path.is_file():
            return None
        try:
            if self.state_path.stat().st_size > MAX_STATE_BYTES:
                raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
            state = json.loads(self.state_path.read_text())
        except (OSError, ValueError, RecursionError) as e:
            raise CheckpointError(f"corrupt run state {self.state_path} ({e})") from None
        problem = state_problem(state)
        if problem is not None:
            raise CheckpointError(f"corrupt run state {self.state_path} ({problem})")
        return state

    def save_state(self, state: dict[str, Any], *, durable: bool = False) -> None:
        atomic_write_json(self.state_path, state, durable=durable)

    def collect_garbage(self, referenced: Iterable[str], spares: int = 0) -> list[str]:
        """Tidy the members folder; returns the spare files kept, by name.

        Member files the state does not name (replaced members, trials left by interrupted
        or discarded steps) become spares, up to `spares` of them, for later writes to
        overwrite in place (see write_safetensors); the rest, and temporary files, go.
        """
        keep = set(referenced)
        if not self.members.is_dir():
            return []
        kept: list[str] = []
        unused = sorted(f for f in self.members.iterdir() if f.name not in keep)
        # existing spares first, so that a steady run renames nothing
        unused.sort(key=lambda f: not f.name.startswith(SPARE_PREFIX))
        for f in unused:
            is_file = f.name.startswith(SPARE_PREFIX) or (
                f.suffix == ".safetensors" and not f.name.startswith("."))
            if is_file and len(kept) < spares:
                name = f.name if f.name.startswith(SPARE_PREFIX) else SPARE_PREFIX + f.name
                if name != f.name:
                    f.rename(self.members / name)
                kept.append(name)
            else:
                f.unlink(missing_ok=True)
        return kept

    def iter_member_files(self) -> Iterator[Path]:
        yield from sorted(self.members.glob("*.safetensors"))


__all__ = ["CheckpointCache", "RunDir", "TensorSpec", "layout_of", "state_problem"]
