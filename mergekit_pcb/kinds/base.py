"""What a recipe kind is: a schema, a plan (checks, no work) and a runner, behind one face.

`pcbmerge run`, `validate` and `methods` go through this interface only: the command line
reads a recipe once, asks the registry for its kind by `merge_method`, refuses the flags
the kind does not take, and hands over.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from mergekit_pcb.errors import UserError

if TYPE_CHECKING:
    from mergekit_pcb.evolve.ray_executor import RaySettings

# Flags every kind takes.
COMMON_FLAGS = frozenset({"--output", "--force", "--seed", "--dry-run", "--json", "--quiet"})
# Flags of the kinds that score candidates (searches): where they are scored.
RAY_FLAGS = frozenset({"--executor", "--ray-address", "--cpus-per-worker", "--gpus-per-worker",
                       "--shared-run-dir"})


@dataclass(frozen=True)
class RunOptions:
    """The command line's options, as `run` passes them to a kind."""

    output: Path | None = None
    force: bool = False
    seed: int | None = None
    dry_run: bool = False
    quiet: bool = False
    device: str = "cpu"
    shard_size: int = 5 * 10**9
    threads: int | None = None
    allow_pickle: bool = False
    workers: int | None = 1  # None: as many as the Ray cluster holds
    resume: bool = False
    trust_code: bool = False
    ray: RaySettings | None = None  # searches: score on a Ray cluster (`--executor ray`)
    # merges, from mergekit-yaml's flags: mix architectures, copy the inputs' tokenizer,
    # write README.md and mergekit_config.yml
    allow_crimes: bool = False
    copy_tokenizer: bool = True
    write_model_card: bool = True
    # merges: write the merge's update over the base as a PEFT LoRA adapter of this rank
    as_lora: int | None = None


@dataclass(frozen=True)
class MethodInfo:
    """One method of a kind, as `pcbmerge methods` lists it."""

    name: str
    kind: str
    summary: str
    parameters: list[dict[str, Any]]  # name, default, where, type, choices, doc


class RecipeKind(ABC):
    name: ClassVar[str]
    flags: ClassVar[frozenset[str]]  # flags beyond COMMON_FLAGS this kind takes

    @abstractmethod
    def methods(self) -> list[MethodInfo]:
        """Every `merge_method` of this kind."""

    @abstractmethod
    def load(self, data: Any, text: str, source: Path) -> Any:
        """The recipe validated against this kind's schema."""

    @abstractmethod
    def plan(self, recipe: Any, source: Path, options: RunOptions) -> dict[str, Any]:
        """Every check that needs no computation; the plan as JSON data (nothing written)."""

    @abstractmethod
    def describe(self, plan: dict[str, Any]) -> list[str]:
        """The plan as lines for a person."""

    @abstractmethod
    def run(self, recipe: Any, source: Path, options: RunOptions) -> dict[str, Any]:
        """Execute; returns the summary `--json` prints."""

    def refuse_flags(self, given: set[str], source: Path, method: str) -> None:
        extra = sorted(given - COMMON_FLAGS - self.flags)
        if extra:
            takes = ", ".join(sorted(self.flags)) or "none"
            raise UserError(f"{extra[0]}: not used by {self.name} recipes ({source} is a "
                            f"{method} {self.name}; the {self.name} flags are: {takes})")
